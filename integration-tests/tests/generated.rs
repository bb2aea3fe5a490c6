//! Shell completions and manual pages of both binaries, generated from
//! their clap definitions (`rootletctl completions|man`, `rootletd
//! --completions|--man`): bash really completes with the script, and groff
//! renders every page without a warning.

use std::{
    path::Path,
    process::{Command, Output},
};

use clap::CommandFactory;
use rootlet_integration_tests::fleet::sibling_binary;

fn run(bin: &str, args: &[&str]) -> Output {
    let out = Command::new(sibling_binary(bin))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    assert!(
        out.status.success(),
        "{bin} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What bash's completion offers for `line` (the word being completed
/// last), with the script `bin` generated loaded.
fn bash_completes(bin: &str, script: &Path, line: &[&str]) -> Vec<String> {
    let words = line
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let snippet = format!(
        "source '{}' && COMP_WORDS=({words}) && COMP_CWORD={} && COMP_LINE='{}' && COMP_POINT=${{#COMP_LINE}} && _{bin} {bin} '{}' '{}' && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        line.len() - 1,
        line.join(" "),
        line[line.len() - 1],
        line.get(line.len().wrapping_sub(2)).unwrap_or(&""),
    );
    let out = Command::new("bash")
        .args(["-c", &snippet])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{snippet}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// groff renders `page` as a manual page with every warning on (input
/// through preconv, `-k`, as man(1) does), and says nothing.
fn renders_cleanly(page: &Path) {
    let out = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .arg(page)
        .output()
        .expect("groff (groff-base)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}: {}",
        page.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rootletctl_completes_in_bash_and_has_a_clean_page_per_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("rootletctl.bash");
    std::fs::write(&script, run("rootletctl", &["completions", "bash"]).stdout).expect("write");
    assert_eq!(
        bash_completes("rootletctl", &script, &["rootletctl", "ro"]),
        ["rollout"]
    );
    let subs = bash_completes("rootletctl", &script, &["rootletctl", "rollout", ""]);
    for want in ["start", "status", "abort"] {
        assert!(subs.iter().any(|s| s == want), "{want} in {subs:?}");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run("rootletctl", &["completions", shell]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("rootletctl"),
            "{shell}"
        );
    }

    // One page per command, at every depth, as clap defines them.
    fn count(c: &clap::Command) -> usize {
        1 + c
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(count)
            .sum::<usize>()
    }
    let want = count(&rootlet_client::cli::Cli::command());
    let man = dir.path().join("man");
    let listed = run("rootletctl", &["man", man.to_str().expect("utf-8")]).stdout;
    let listed: Vec<_> = String::from_utf8_lossy(&listed)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(listed.len(), want, "{listed:?}");
    for page in &listed {
        renders_cleanly(Path::new(page));
    }
    let start = std::fs::read_to_string(man.join("rootletctl-rollout-start.1")).expect("page");
    assert!(
        start.contains("rootletctl rollout start") && start.contains("inventory"),
        "the synopsis as one types it, and the flags:\n{start}"
    );
    // Usage errors stay usage errors.
    let bad = Command::new(sibling_binary("rootletctl"))
        .args(["completions", "tcsh"])
        .output()
        .expect("rootletctl");
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn rootletd_completes_in_bash_and_has_a_clean_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("rootletd.bash");
    std::fs::write(&script, run("rootletd", &["--completions", "bash"]).stdout).expect("write");
    let offered = bash_completes("rootletd", &script, &["rootletd", "--che"]);
    assert_eq!(offered, ["--check-config"]);
    let man = dir.path().join("man");
    run("rootletd", &["--man", man.to_str().expect("utf-8")]);
    let page = man.join("rootletd.8");
    renders_cleanly(&page);
    let text = std::fs::read_to_string(&page).expect("page");
    assert!(
        text.contains(".TH rootletd 8") && text.contains("check\\-config"),
        "{text}"
    );
    // Each is exclusive: it is never mistaken for a start.
    let both = Command::new(sibling_binary("rootletd"))
        .args(["--man", "/nonexistent", "--check-config"])
        .output()
        .expect("rootletd");
    assert_eq!(both.status.code(), Some(2));
}
