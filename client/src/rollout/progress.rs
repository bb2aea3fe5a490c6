//! What a person watching a rollout sees: a progress bar per step (canary,
//! each wave) when stdout is a terminal, else plain log lines; nothing in
//! quiet mode (`--output json`).

use std::{io::IsTerminal, time::Duration};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// indicatif bars.
    Bars,
    /// One line per event, on stdout.
    Lines,
    /// Nothing.
    Quiet,
}

impl Mode {
    /// Bars on a terminal, lines otherwise.
    pub fn detect() -> Mode {
        if std::io::stdout().is_terminal() {
            Mode::Bars
        } else {
            Mode::Lines
        }
    }
}

pub struct Progress {
    mode: Mode,
    multi: MultiProgress,
    bars: Vec<Option<ProgressBar>>,
}

impl Progress {
    pub fn new(mode: Mode, steps: usize) -> Progress {
        let multi = MultiProgress::with_draw_target(match mode {
            Mode::Bars => ProgressDrawTarget::stdout(),
            _ => ProgressDrawTarget::hidden(),
        });
        Progress {
            mode,
            multi,
            bars: vec![None; steps],
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A line of its own (above the bars).
    pub fn line(&self, msg: impl AsRef<str>) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(msg.as_ref());
            }
            Mode::Lines => println!("{}", msg.as_ref()),
            Mode::Quiet => {}
        }
    }

    /// A step starts: its bar counts `hosts` pushes.
    pub fn step_started(&mut self, step: usize, label: &str, hosts: usize, done: usize) {
        match self.mode {
            Mode::Bars => {
                let bar = self.multi.add(ProgressBar::new(hosts as u64));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>9.bold} [{bar:32.cyan/blue}] {pos:>5}/{len:<5} {elapsed:>4} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(label.to_string());
                bar.set_position(done as u64);
                bar.set_message("preparing");
                bar.enable_steady_tick(Duration::from_millis(200));
                if let Some(slot) = self.bars.get_mut(step) {
                    *slot = Some(bar);
                }
            }
            Mode::Lines => println!(
                "{label}: {hosts} host{} starting",
                if hosts == 1 { "" } else { "s" }
            ),
            Mode::Quiet => {}
        }
    }

    /// A host of the step was pushed (or gave up).
    pub fn host_done(&self, step: usize) {
        if let Some(Some(bar)) = self.bars.get(step) {
            bar.inc(1);
        }
    }

    /// The step's current phase.
    pub fn phase(&self, step: usize, label: &str, msg: impl Into<String>) {
        let msg = msg.into();
        match self.mode {
            Mode::Bars => {
                if let Some(Some(bar)) = self.bars.get(step) {
                    bar.set_message(msg);
                }
            }
            Mode::Lines => println!("{label}: {msg}"),
            Mode::Quiet => {}
        }
    }

    /// The phase message, on bars only (for frequent updates such as the
    /// soak countdown).
    pub fn tick(&self, step: usize, msg: impl Into<String>) {
        if let Some(Some(bar)) = self.bars.get(step) {
            bar.set_message(msg.into());
        }
    }

    /// The step ended.
    pub fn step_finished(&self, step: usize, label: &str, msg: impl Into<String>) {
        let msg = msg.into();
        match self.mode {
            Mode::Bars => {
                if let Some(Some(bar)) = self.bars.get(step) {
                    bar.finish_with_message(msg);
                }
            }
            Mode::Lines => println!("{label}: {msg}"),
            Mode::Quiet => {}
        }
    }

    /// Stops every bar that is still drawing.
    pub fn finish(&self) {
        for bar in self.bars.iter().flatten() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}
