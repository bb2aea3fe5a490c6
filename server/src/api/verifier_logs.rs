//! The verifier logs of the last loads the verifier rejected, for
//! `GetVerifierLog`. An error carries only a log's last lines (statuses
//! travel as HTTP/2 trailers, and a default client refuses more than 16 KiB
//! of them); the whole log is kept here, in memory, per stage name.

use std::{collections::BTreeMap, sync::Mutex, time::SystemTime};

use rootlet_proto::v1 as pb;

use rootlet_agent::{AgentError, unix_ms};
use rootlet_dataplane::Error as DpError;

/// The longest log kept (its end: where the verifier says why).
pub const MAX_LOG_BYTES: usize = 1 << 20;
/// Stages whose last rejected log is kept.
const MAX_STAGES: usize = 32;

#[derive(Default)]
pub struct VerifierLogs {
    by_stage: Mutex<BTreeMap<String, pb::VerifierLog>>,
}

/// The verifier rejection inside `e`, if any (a NACK wraps its cause).
fn rejection(e: &AgentError) -> Option<(&str, &str, &str)> {
    match e {
        AgentError::Dataplane(DpError::Verifier {
            stage,
            program,
            log,
            ..
        }) => Some((stage, program, log)),
        AgentError::Nack { source, .. } => rejection(source),
        _ => None,
    }
}

/// The end of `log`, at most `max` bytes, from a line start when it is cut.
pub fn tail(log: &str, max: usize) -> &str {
    if log.len() <= max {
        return log;
    }
    let mut start = log.len() - max;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    match log[start..].find('\n') {
        Some(nl) if start + nl + 1 < log.len() => &log[start + nl + 1..],
        _ => &log[start..],
    }
}

impl VerifierLogs {
    /// Keeps the log of `e` if it is a verifier rejection.
    pub fn record(&self, e: &AgentError) {
        let Some((stage, program, log)) = rejection(e) else {
            return;
        };
        let kept = tail(log, MAX_LOG_BYTES);
        let entry = pb::VerifierLog {
            stage: stage.to_owned(),
            program: program.to_owned(),
            log: kept.to_owned(),
            total_bytes: log.len() as u64,
            truncated: kept.len() < log.len(),
            at_unix_ms: unix_ms(SystemTime::now()),
        };
        let mut by_stage = self.by_stage.lock().unwrap_or_else(|p| p.into_inner());
        by_stage.insert(stage.to_owned(), entry);
        while by_stage.len() > MAX_STAGES {
            let oldest = by_stage
                .iter()
                .min_by_key(|(_, l)| l.at_unix_ms)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => by_stage.remove(&k),
                None => break,
            };
        }
    }

    /// The last rejected log of `stage`, or of any stage if `stage` is empty.
    pub fn get(&self, stage: &str) -> Result<pb::VerifierLog, AgentError> {
        let by_stage = self.by_stage.lock().unwrap_or_else(|p| p.into_inner());
        let found = if stage.is_empty() {
            by_stage.values().max_by_key(|l| l.at_unix_ms)
        } else {
            by_stage.get(stage)
        };
        found.cloned().ok_or_else(|| {
            AgentError::NotFound(if stage.is_empty() {
                "no load was rejected by the verifier since rootletd started".into()
            } else {
                format!(
                    "no load of stage `{stage}` was rejected by the verifier since rootletd started"
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_starts_at_a_line_and_fits() {
        let log: String = (0..1000).map(|i| format!("{i}: insn\n")).collect();
        let t = tail(&log, 100);
        assert!(t.len() <= 100, "{}", t.len());
        assert!(t.ends_with("999: insn\n"), "{t}");
        assert!(t.split('\n').next().is_some_and(|l| l.ends_with("insn")));
        assert_eq!(tail("short", 100), "short");
    }
}
