//! The rollout plan: a canary, waves, pauses, gates and limits, read from a
//! TOML file (errors name `file:line:col` and the field), and
//! [`Plan::steps`], which cuts a host list into steps.
//!
//! ```toml
//! soak = "30s"                 # a step counts as healthy after this long
//! progress_deadline = "10m"    # a step that is not healthy by then rolls back
//! max_unavailable = 1          # or "10%": hosts that may stop answering
//! pause_timeout = "24h"        # the longest a pause waits for `promote`
//!
//! canary = { hosts = 1, pause = "promote" }   # or { percent = 5 }
//!
//! [[waves]]
//! percent = 25
//! pause = "1m"
//!
//! [[waves]]
//! hosts = 10
//!
//! [gates]
//! health = true                # grpc.health.v1 on every changed host
//! apply = true                 # the agents report the new digest applied
//!
//! [[gates.counters]]
//! stage = "*"                  # every stage, or one stage by name
//! metric = "aborted_rate"      # aborted_rate, aborted_packets, drop_rate, drop_rate_change
//! max = 0.001
//! window = "10s"
//! min_packets = 100
//! dry_run = false              # true: measured and reported, not enforced
//! ```
//!
//! # Rounding
//!
//! Step sizes are counted in hosts of the selection (N hosts). A
//! percentage `p` of a step takes `ceil(N * p / 100)` hosts, at least 1,
//! and at most the hosts still left. After the declared waves, the last
//! wave repeats (with its pause) until every host is done; with no waves,
//! one wave takes every host after the canary. `max_unavailable` as a
//! percentage rounds down (`"10%"` of 15 hosts is 1). Percentages have at
//! most two decimals.

use std::{fmt, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

use crate::config::{
    self, Fields, Result, Src, boolean, duration, integer_in, number, string, table, tables, text,
};

/// Default [`Plan::progress_deadline`].
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
/// Default [`Plan::pause_timeout`].
pub const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Longest soak, window, pause or deadline.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);
/// Most declared waves.
pub const MAX_WAVES: usize = 1000;
/// Most counter gates.
pub const MAX_COUNTER_GATES: usize = 64;

/// How many hosts a step takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Hosts(u32),
    /// Hundredths of a percent (2500 = 25%).
    Basis(u32),
}

impl Size {
    /// How many of `total` hosts this is: hosts as given, percentages
    /// rounded up; at least 1.
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            Size::Hosts(h) => h as usize,
            Size::Basis(bp) => (total as u128 * u128::from(bp)).div_ceil(10_000) as usize,
        };
        n.max(1)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Hosts(1) => f.write_str("1 host"),
            Size::Hosts(h) => write!(f, "{h} hosts"),
            Size::Basis(bp) if bp % 100 == 0 => write!(f, "{}%", bp / 100),
            Size::Basis(bp) => write!(f, "{}.{:02}%", bp / 100, bp % 100),
        }
    }
}

/// A pause after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pause {
    #[serde(with = "config::millis")]
    For(Duration),
    /// Until `rootletctl rollout promote` (or [`Plan::pause_timeout`]).
    UntilPromote,
}

impl fmt::Display for Pause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pause::For(d) => write!(f, "pause {}", config::Human(*d)),
            Pause::UntilPromote => f.write_str("pause until promote"),
        }
    }
}

/// The hosts that may be unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    Hosts(u32),
    Basis(u32),
}

impl Budget {
    /// Of `total` hosts (percentages round down).
    pub fn of(self, total: usize) -> usize {
        match self {
            Budget::Hosts(h) => h as usize,
            Budget::Basis(bp) => (total as u128 * u128::from(bp) / 10_000) as usize,
        }
    }
}

/// What a counter gate measures, per stage, over the window after the
/// change (Δ = counter after − counter at the start of the window;
/// total = aborted + drop + pass + tx + redirect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Δaborted / Δtotal.
    AbortedRate,
    /// Δaborted.
    AbortedPackets,
    /// Δdrop / Δtotal.
    DropRate,
    /// Δdrop / Δtotal − the stage's drop rate before the change (over the
    /// baseline window); a stage new in the bundle has a baseline of 0.
    DropRateChange,
}

impl Metric {
    pub const ALL: [Metric; 4] = [
        Metric::AbortedRate,
        Metric::AbortedPackets,
        Metric::DropRate,
        Metric::DropRateChange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::AbortedRate => "aborted_rate",
            Metric::AbortedPackets => "aborted_packets",
            Metric::DropRate => "drop_rate",
            Metric::DropRateChange => "drop_rate_change",
        }
    }

    /// Whether the value is a fraction of packets.
    pub fn is_rate(self) -> bool {
        !matches!(self, Metric::AbortedPackets)
    }

    /// Whether it compares with the pre-rollout baseline.
    pub fn needs_baseline(self) -> bool {
        matches!(self, Metric::DropRateChange)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A threshold on a stage's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterGate {
    /// A stage name, or `*` for every stage.
    pub stage: String,
    pub metric: Metric,
    /// The gate fails when the value exceeds this.
    pub max: f64,
    /// The shortest time the measurement covers.
    #[serde(with = "config::millis")]
    pub window: Duration,
    /// Fewer packets than this in the window: not enough to judge, so the
    /// gate passes (and says so).
    pub min_packets: u64,
    /// Measured and reported, never enforced.
    pub dry_run: bool,
}

impl CounterGate {
    /// Whether this gate applies to `stage`.
    pub fn covers(&self, stage: &str) -> bool {
        self.stage == "*" || self.stage == stage
    }
}

/// Which gates a step must pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    pub health: bool,
    pub apply: bool,
    pub counters: Vec<CounterGate>,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            health: true,
            apply: true,
            counters: Vec::new(),
        }
    }
}

/// A wave as declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveSpec {
    pub size: Size,
    pub pause: Option<Pause>,
}

/// A rollout plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub canary: Option<WaveSpec>,
    pub waves: Vec<WaveSpec>,
    pub max_unavailable: Budget,
    #[serde(with = "config::millis")]
    pub soak: Duration,
    #[serde(with = "config::millis")]
    pub progress_deadline: Duration,
    #[serde(with = "config::millis")]
    pub pause_timeout: Duration,
    pub gates: Gates,
}

impl Default for Plan {
    /// A canary of one host, then the rest in one wave; no soak.
    fn default() -> Self {
        Plan {
            canary: Some(WaveSpec {
                size: Size::Hosts(1),
                pause: None,
            }),
            waves: Vec::new(),
            max_unavailable: Budget::Hosts(0),
            soak: Duration::ZERO,
            progress_deadline: DEFAULT_PROGRESS_DEADLINE,
            pause_timeout: DEFAULT_PAUSE_TIMEOUT,
            gates: Gates::default(),
        }
    }
}

/// What a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Canary,
    /// Waves count from 1.
    Wave(u32),
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepKind::Canary => f.write_str("canary"),
            StepKind::Wave(n) => write!(f, "wave {n}"),
        }
    }
}

/// One step of a rollout: which hosts (indices into the ordered
/// selection) and the pause after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub kind: StepKind,
    pub first: usize,
    pub count: usize,
    pub pause: Option<Pause>,
}

impl Step {
    pub fn hosts(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.count
    }
}

impl Plan {
    /// Reads and checks a plan file.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = config::read(path)?;
        Plan::parse(&text, &path.display().to_string())
    }

    /// Parses a plan; `file` names it in errors.
    pub fn parse(text_in: &str, file: &str) -> Result<Plan> {
        let (src, doc) = config::parse(file, text_in)?;
        let root = Fields::of(
            &src,
            doc.get_ref(),
            &doc.span(),
            "",
            &[
                "canary",
                "waves",
                "max_unavailable",
                "soak",
                "progress_deadline",
                "pause_timeout",
                "gates",
            ],
        )?;
        let mut plan = Plan {
            canary: None,
            ..Plan::default()
        };
        let dur = |key: &str| -> Result<Option<Duration>> {
            root.optional(key)
                .map(|v| {
                    let d = duration(&src, v, key)?;
                    if d > MAX_DURATION {
                        return Err(src.err(&v.span(), key, "longer than 7 days"));
                    }
                    Ok(d)
                })
                .transpose()
        };
        plan.soak = dur("soak")?.unwrap_or(Duration::ZERO);
        if let Some(d) = dur("pause_timeout")? {
            if d.is_zero() {
                let v = root.required("pause_timeout")?;
                return Err(src.err(&v.span(), "pause_timeout", "must be more than 0s"));
            }
            plan.pause_timeout = d;
        }

        if let Some(v) = root.optional("canary") {
            let (t, span) = table(&src, v, "canary")?;
            plan.canary = Some(parse_wave(&src, t, &span, "canary")?);
        }
        if let Some(v) = root.optional("waves") {
            let items = tables(&src, v, "waves")?;
            if items.len() > MAX_WAVES {
                return Err(src.err(&v.span(), "waves", format!("at most {MAX_WAVES} waves")));
            }
            for (i, (t, span)) in items.iter().enumerate() {
                plan.waves
                    .push(parse_wave(&src, t, span, &format!("waves[{i}]"))?);
            }
        }
        if plan.canary.is_none() && plan.waves.is_empty() {
            return Err(src.err(
                &doc.span(),
                "canary",
                "a plan needs a canary or at least one wave ([[waves]])",
            ));
        }

        if let Some(v) = root.optional("max_unavailable") {
            plan.max_unavailable = match v.get_ref() {
                DeValue::Integer(_) => {
                    Budget::Hosts(integer_in(&src, v, "max_unavailable", 0..=1_000_000)? as u32)
                }
                DeValue::String(s) => Budget::Basis(
                    parse_percent(s, true).map_err(|m| src.err(&v.span(), "max_unavailable", m))?,
                ),
                _ => {
                    return Err(config::wrong_type(
                        &src,
                        v,
                        "max_unavailable",
                        "an integer (hosts) or a percentage string (\"10%\")",
                    ));
                }
            };
        }

        if let Some(v) = root.optional("gates") {
            let (t, span) = table(&src, v, "gates")?;
            plan.gates = parse_gates(&src, t, &span)?;
        }

        let longest_window = plan
            .gates
            .counters
            .iter()
            .map(|g| g.window)
            .max()
            .unwrap_or_default();
        if let Some(d) = dur("progress_deadline")? {
            let v = root.required("progress_deadline")?;
            let needed = plan.soak.max(longest_window);
            if d <= needed {
                return Err(src.err(
                    &v.span(),
                    "progress_deadline",
                    format!(
                        "must be longer than the soak and every gate window ({}), or no step could ever finish",
                        config::Human(needed)
                    ),
                ));
            }
            plan.progress_deadline = d;
        } else if plan.progress_deadline <= plan.soak.max(longest_window) {
            plan.progress_deadline = plan.soak.max(longest_window) + DEFAULT_PROGRESS_DEADLINE;
        }
        Ok(plan)
    }

    /// Cuts `total` hosts into steps (see the module docs for rounding).
    pub fn steps(&self, total: usize) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut next = 0;
        let take = |next: &mut usize, size: Size| {
            let n = size.of(total).min(total - *next);
            let first = *next;
            *next += n;
            (first, n)
        };
        if total == 0 {
            return steps;
        }
        if let Some(c) = &self.canary {
            let (first, count) = take(&mut next, c.size);
            steps.push(Step {
                kind: StepKind::Canary,
                first,
                count,
                pause: c.pause,
            });
        }
        let mut wave = 0u32;
        for w in &self.waves {
            if next >= total {
                break;
            }
            wave += 1;
            let (first, count) = take(&mut next, w.size);
            steps.push(Step {
                kind: StepKind::Wave(wave),
                first,
                count,
                pause: w.pause,
            });
        }
        let repeat = self.waves.last().cloned().unwrap_or(WaveSpec {
            size: Size::Hosts(u32::try_from(total).unwrap_or(u32::MAX)),
            pause: None,
        });
        // Bounded: every iteration takes at least one host.
        while next < total {
            wave += 1;
            let (first, count) = take(&mut next, repeat.size);
            steps.push(Step {
                kind: StepKind::Wave(wave),
                first,
                count,
                pause: repeat.pause,
            });
        }
        // No pause after the last step: nothing is left to wait for.
        if let Some(last) = steps.last_mut() {
            last.pause = None;
        }
        steps
    }

    /// The longest window of a gate that compares with the baseline.
    pub fn baseline_window(&self) -> Duration {
        self.gates
            .counters
            .iter()
            .filter(|g| g.metric.needs_baseline())
            .map(|g| g.window)
            .max()
            .unwrap_or_default()
    }

    /// The longest window of any counter gate.
    pub fn longest_window(&self) -> Duration {
        self.gates
            .counters
            .iter()
            .map(|g| g.window)
            .max()
            .unwrap_or_default()
    }
}

fn parse_wave(
    src: &Src<'_>,
    t: &DeTable<'_>,
    span: &std::ops::Range<usize>,
    path: &str,
) -> Result<WaveSpec> {
    let f = Fields::of(src, t, span, path, &["hosts", "percent", "pause"])?;
    let size = match (f.optional("hosts"), f.optional("percent")) {
        (Some(_), Some(p)) => {
            return Err(src.err(
                &p.span(),
                &f.field("percent"),
                "give either hosts or percent, not both",
            ));
        }
        (None, None) => {
            return Err(src.err(
                span,
                &f.field("hosts"),
                "missing: give hosts = N or percent = P",
            ));
        }
        (Some(h), None) => {
            Size::Hosts(integer_in(src, h, &f.field("hosts"), 1..=1_000_000)? as u32)
        }
        (None, Some(p)) => {
            let field = f.field("percent");
            let n = number(src, p, &field)?;
            Size::Basis(basis_points(n, false).map_err(|m| src.err(&p.span(), &field, m))?)
        }
    };
    let pause = f
        .optional("pause")
        .map(|v| {
            let field = f.field("pause");
            let s = string(src, v, &field)?;
            if s == "promote" {
                return Ok(Pause::UntilPromote);
            }
            let d = config::parse_duration(s)
                .map_err(|m| src.err(&v.span(), &field, format!("{m}, or \"promote\"")))?;
            if d > MAX_DURATION {
                return Err(src.err(&v.span(), &field, "longer than 7 days"));
            }
            Ok(Pause::For(d))
        })
        .transpose()?;
    Ok(WaveSpec { size, pause })
}

fn parse_gates(src: &Src<'_>, t: &DeTable<'_>, span: &std::ops::Range<usize>) -> Result<Gates> {
    let f = Fields::of(src, t, span, "gates", &["health", "apply", "counters"])?;
    let mut gates = Gates::default();
    if let Some(v) = f.optional("health") {
        gates.health = boolean(src, v, "gates.health")?;
    }
    if let Some(v) = f.optional("apply") {
        gates.apply = boolean(src, v, "gates.apply")?;
    }
    if let Some(v) = f.optional("counters") {
        let items = tables(src, v, "gates.counters")?;
        if items.len() > MAX_COUNTER_GATES {
            return Err(src.err(
                &v.span(),
                "gates.counters",
                format!("at most {MAX_COUNTER_GATES} counter gates"),
            ));
        }
        for (i, (t, span)) in items.iter().enumerate() {
            let path = format!("gates.counters[{i}]");
            let g = Fields::of(
                src,
                t,
                span,
                &path,
                &["stage", "metric", "max", "window", "min_packets", "dry_run"],
            )?;
            let stage = match g.optional("stage") {
                None => "*".to_string(),
                Some(v) => {
                    let s = text(src, v, &g.field("stage"), 64)?;
                    if s != "*" && !rootlet_bundle::manifest::is_valid_name(s) {
                        return Err(src.err(
                            &v.span(),
                            &g.field("stage"),
                            "a stage name (A-Z a-z 0-9 _ . -) or \"*\" for every stage",
                        ));
                    }
                    s.to_string()
                }
            };
            let metric_v = g.required("metric")?;
            let name = string(src, metric_v, &g.field("metric"))?;
            let metric = Metric::ALL
                .into_iter()
                .find(|m| m.name() == name)
                .ok_or_else(|| {
                    let all: Vec<String> = Metric::ALL
                        .iter()
                        .map(|m| format!("{:?}", m.name()))
                        .collect();
                    src.err(
                        &metric_v.span(),
                        &g.field("metric"),
                        format!(
                            "unknown metric {name:?}; expected one of {}",
                            all.join(", ")
                        ),
                    )
                })?;
            let max_v = g.required("max")?;
            let max = number(src, max_v, &g.field("max"))?;
            let range = match metric {
                Metric::AbortedRate | Metric::DropRate => 0.0..=1.0,
                Metric::DropRateChange => -1.0..=1.0,
                Metric::AbortedPackets => 0.0..=f64::MAX,
            };
            if !range.contains(&max) {
                return Err(src.err(
                    &max_v.span(),
                    &g.field("max"),
                    if metric.is_rate() {
                        format!(
                            "{metric} is a fraction of packets: max must be between {} and {}",
                            range.start(),
                            range.end()
                        )
                    } else {
                        "must not be negative".to_string()
                    },
                ));
            }
            let window = match g.optional("window") {
                None => Duration::ZERO,
                Some(v) => {
                    let d = duration(src, v, &g.field("window"))?;
                    if d > MAX_DURATION {
                        return Err(src.err(&v.span(), &g.field("window"), "longer than 7 days"));
                    }
                    d
                }
            };
            let min_packets = match g.optional("min_packets") {
                None => 0,
                Some(v) => integer_in(src, v, &g.field("min_packets"), 0..=i64::MAX)? as u64,
            };
            let dry_run = match g.optional("dry_run") {
                None => false,
                Some(v) => boolean(src, v, &g.field("dry_run"))?,
            };
            gates.counters.push(CounterGate {
                stage,
                metric,
                max,
                window,
                min_packets,
                dry_run,
            });
        }
    }
    Ok(gates)
}

/// `"25%"` or `"12.5%"` as hundredths of a percent.
fn parse_percent(s: &str, allow_zero: bool) -> Result<u32, String> {
    let n = s
        .trim()
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("{s:?} is not a percentage (\"10%\")"))?;
    basis_points(n, allow_zero)
}

fn basis_points(n: f64, allow_zero: bool) -> Result<u32, String> {
    let low_ok = if allow_zero { n >= 0.0 } else { n > 0.0 };
    if !(n.is_finite() && low_ok && n <= 100.0) {
        return Err(format!(
            "must be a percentage {} 0 and at most 100, not {n}",
            if allow_zero { "from" } else { "above" }
        ));
    }
    let bp = (n * 100.0).round();
    if ((n * 100.0) - bp).abs() > 1e-6 {
        return Err(format!("{n}: at most two decimals"));
    }
    Ok(bp as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::assert_field_error;

    fn parse(s: &str) -> Result<Plan> {
        Plan::parse(s, "plan.toml")
    }

    fn sizes(plan: &Plan, n: usize) -> Vec<usize> {
        plan.steps(n).iter().map(|s| s.count).collect()
    }

    #[test]
    fn full_plan() {
        let p = parse(
            r#"
soak = "30s"
progress_deadline = "5m"
max_unavailable = "10%"
canary = { hosts = 1, pause = "promote" }

[[waves]]
percent = 25
pause = "1m"

[[waves]]
hosts = 3

[gates]
health = true

[[gates.counters]]
stage = "*"
metric = "aborted_rate"
max = 0.001
window = "10s"
min_packets = 100

[[gates.counters]]
stage = "ddos"
metric = "drop_rate_change"
max = 0.05
dry_run = true
"#,
        )
        .unwrap();
        assert_eq!(p.soak, Duration::from_secs(30));
        assert_eq!(p.max_unavailable, Budget::Basis(1000));
        assert_eq!(p.max_unavailable.of(15), 1);
        assert_eq!(p.gates.counters.len(), 2);
        assert!(p.gates.counters[1].dry_run);
        assert_eq!(p.baseline_window(), Duration::ZERO);
        // 20 hosts: canary 1, 25% = 5, then 3, 3, 3, 3, 2.
        assert_eq!(sizes(&p, 20), [1, 5, 3, 3, 3, 3, 2]);
        let steps = p.steps(20);
        assert_eq!(steps[0].pause, Some(Pause::UntilPromote));
        assert_eq!(steps[1].pause, Some(Pause::For(Duration::from_secs(60))));
        assert_eq!(steps.last().unwrap().pause, None);
        assert_eq!(steps[2].kind, StepKind::Wave(2));
    }

    #[test]
    fn rounding() {
        let p = parse("canary = { percent = 10 }\n[[waves]]\npercent = 30\n").unwrap();
        // 10% of 30 is exactly 3 (no float error), 30% is 9.
        assert_eq!(sizes(&p, 30), [3, 9, 9, 9]);
        // 10% of 8 rounds up to 1; 30% of 8 = 2.4 rounds up to 3.
        assert_eq!(sizes(&p, 8), [1, 3, 3, 1]);
        // One host: the canary is the whole fleet.
        assert_eq!(sizes(&p, 1), [1]);
        assert_eq!(sizes(&p, 0), Vec::<usize>::new());
        let p = parse("canary = { hosts = 1 }\n").unwrap();
        assert_eq!(sizes(&p, 1000), [1, 999]);
        let p = parse("[[waves]]\npercent = 12.5\n").unwrap();
        assert_eq!(sizes(&p, 8), [1; 8]);
        assert_eq!(sizes(&p, 1000), [125; 8]);
        let p = parse("canary = { hosts = 1 }\n[[waves]]\npercent = 33\n[[waves]]\npercent = 33\n[[waves]]\npercent = 34\n").unwrap();
        assert_eq!(sizes(&p, 1000), [1, 330, 330, 339]);
        assert_eq!(Budget::Hosts(2).of(5), 2);
        assert_eq!(Budget::Basis(1000).of(5), 0);
    }

    #[test]
    fn errors_name_field_and_position() {
        let e = parse("canary = { hosts = 1, percent = 5 }\n").unwrap_err();
        assert_field_error(&e, 1, 33, "canary.percent", "not both");
        let e = parse("canary = { hosts = 0 }\n").unwrap_err();
        assert_field_error(&e, 1, 20, "canary.hosts", "between 1 and");
        let e = parse("[[waves]]\npercent = 150\n").unwrap_err();
        assert_field_error(&e, 2, 11, "waves[0].percent", "at most 100");
        let e = parse("[[waves]]\nhosts = 2\npause = \"soon\"\n").unwrap_err();
        assert_field_error(&e, 3, 9, "waves[0].pause", "\"promote\"");
        let e = parse("[[waves]]\nhosts = 2\n[[waves]]\nprecent = 2\n").unwrap_err();
        assert_field_error(&e, 4, 1, "waves[1].precent", "unknown key");
        let e = parse("soak = \"1m\"\nprogress_deadline = \"30s\"\n[[waves]]\nhosts = 1\n")
            .unwrap_err();
        assert_field_error(&e, 2, 21, "progress_deadline", "longer than the soak");
        let e = parse("[[waves]]\nhosts = 1\n[[gates.counters]]\nmetric = \"aborted\"\nmax = 1\n")
            .unwrap_err();
        assert_field_error(&e, 4, 10, "gates.counters[0].metric", "unknown metric");
        let e =
            parse("[[waves]]\nhosts = 1\n[[gates.counters]]\nmetric = \"aborted_rate\"\nmax = 2\n")
                .unwrap_err();
        assert_field_error(&e, 5, 7, "gates.counters[0].max", "fraction");
        let e = parse("[[waves]]\nhosts = 1\n[[gates.counters]]\nmetric = \"aborted_rate\"\n")
            .unwrap_err();
        assert_field_error(&e, 3, 1, "gates.counters[0].max", "missing");
        let e = parse("soak = 30\n[[waves]]\nhosts = 1\n").unwrap_err();
        assert_field_error(&e, 1, 8, "soak", "expected a string");
        let e = parse("soak = \"30\"\n[[waves]]\nhosts = 1\n").unwrap_err();
        assert_field_error(&e, 1, 8, "soak", "not a duration");
        let e = parse("max_unavailable = \"ten\"\n[[waves]]\nhosts = 1\n").unwrap_err();
        assert_field_error(&e, 1, 19, "max_unavailable", "not a percentage");
        let e = parse("soak = \"1s\"\n").unwrap_err();
        assert_field_error(&e, 1, 1, "canary", "at least one wave");
        let e = parse("[[waves]]\nhosts = 1\n[gates]\nhealth = \"yes\"\n").unwrap_err();
        assert_field_error(&e, 4, 10, "gates.health", "expected a boolean");
    }
}
