//! Property tests of the client's parsers of files people write: rollout
//! plans and inventories. A valid file with a few edits parses, or fails
//! naming `file:line:col` inside it; never panics. A plan that parses
//! also gives steps that cover every host exactly once.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

#[path = "../../bundle/tests/common/mutate.rs"]
mod mutate;

use std::path::Path;

use proptest::prelude::*;
use rootlet_client::{inventory::Inventory, plan::Plan};

const PLAN: &str = r#"soak = "30s"
progress_deadline = "5m"
pause_timeout = "1h30m"
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
"#;

const INVENTORY: &str = r#"[defaults.tls]
ca = "ca.pem"
cert = "c.pem"
key = "c.key"

[[hosts]]
name = "b"
address = "10.0.0.2:50051"
labels = { zone = "a", role = "edge" }
tls = { server_name = "b.example" }

[[hosts]]
name = "a"
address = "unix:/run/a.sock"

[[hosts]]
name = "c"
address = "127.0.0.1:1"
insecure = true
"#;

#[test]
fn the_valid_inputs_parse() {
    Plan::parse(PLAN, "plan.toml").unwrap();
    Inventory::parse(INVENTORY, "inv.toml", Path::new("/etc/rootlet")).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(768))]

    #[test]
    fn mutated_plans_fail_at_a_line(text in mutate::mutated_text(PLAN), hosts in 0usize..40) {
        match Plan::parse(&text, "plan.toml") {
            Ok(plan) => {
                let steps = plan.steps(hosts);
                let mut next = 0;
                for s in &steps {
                    prop_assert_eq!(s.hosts().start, next, "steps {:?} leave a gap", steps);
                    next = s.hosts().end;
                }
                prop_assert_eq!(next, hosts, "steps {:?} do not cover {} hosts", steps, hosts);
            }
            Err(e) => mutate::located(&e.to_string(), "plan.toml", &text)?,
        }
    }

    #[test]
    fn mutated_inventories_fail_at_a_line(text in mutate::mutated_text(INVENTORY)) {
        if let Err(e) = Inventory::parse(&text, "inv.toml", Path::new("/etc/rootlet")) {
            mutate::located(&e.to_string(), "inv.toml", &text)?;
        }
    }
}
