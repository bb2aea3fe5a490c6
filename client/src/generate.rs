//! Shell completions and manual pages, generated from the clap definitions
//! of the command line ([`crate::cli::Cli`]) by clap_complete and
//! clap_mangen, so that they never disagree with `--help`.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes `shell`'s completion script for rootletctl to `out`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "rootletctl", out);
}

/// Writes rootletctl's manual pages into `dir` (created if missing): one
/// for the command and one per subcommand at every depth
/// (`rootletctl-rollout-start.1`), in section 1. Returns the files written.
pub fn man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = vec![];
    let cmd = Cli::command().name("rootletctl").bin_name("rootletctl");
    write_pages(cmd, dir, &mut written)?;
    Ok(written)
}

/// `cmd`'s page, named as its file is (`rootletctl-rollout-start`) with
/// the synopsis as one types it (`rootletctl rollout start`), then its
/// subcommands'.
fn write_pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    let cmd = cmd.disable_help_subcommand(true);
    let name = cmd.get_name().to_owned();
    let bin = cmd.get_bin_name().unwrap_or(&name).to_owned();
    let path = dir.join(format!("{name}.1"));
    let mut page = vec![];
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(&path, page)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub = sub
            .clone()
            .name(format!("{name}-{}", sub.get_name()))
            .bin_name(format!("{bin} {}", sub.get_name()));
        write_pages(sub, dir, written)?;
    }
    Ok(())
}
