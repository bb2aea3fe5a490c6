//! `rootlet-agent-demo`: `rootletd` managing a veth pair in its own
//! namespace, driven only through `rootletctl`: apply the signed sample
//! three-stage bundle, send traffic, show the state and the counters; push
//! the ddos stage's blocklist as a signed policy and see its drops; push a
//! bad policy that blocks everything and see the canary's drop-rate gate
//! roll it back, with traffic flowing again; replace stages live (a new
//! version, which keeps the blocklist) and roll it back. Every
//! `rootletctl` command is printed before it runs, as an operator would
//! type it.
//! Run by `scripts/demo.sh` after `rootlet-demo`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use rootlet_integration_tests::fleet::{RealFleet, sibling_binary};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Runs `rootletctl args...` in `dir`, printing the command and its output.
/// `rootletctl rollout start` of `bundle` on the demo's hosts and plan;
/// an error unless it succeeds.
fn rollout(dir: &Path, bundle: &str, journal: &str) -> Result<()> {
    let args = [
        "rollout",
        "start",
        "-i",
        "hosts.toml",
        "-p",
        "plan.toml",
        "-b",
        bundle,
        "-j",
        journal,
    ];
    match rootletctl(dir, &args)? {
        0 => Ok(()),
        code => Err(format!("the rollout of {bundle} exited {code}").into()),
    }
}

/// [`rootletctl`], an error unless it exits 0.
fn ctl_ok(dir: &Path, args: &[&str]) -> Result<()> {
    match rootletctl(dir, args)? {
        0 => Ok(()),
        code => Err(format!("rootletctl {} exited {code}", args.join(" ")).into()),
    }
}

fn rootletctl(dir: &Path, args: &[&str]) -> Result<i32> {
    println!("\n$ rootletctl {}", args.join(" "));
    let out = Command::new(sibling_binary("rootletctl"))
        .args(args)
        .current_dir(dir)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(out.status.code().unwrap_or(-1))
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    println!(
        "» starting rootletd for one host: a veth pair in fresh namespaces, the agent inside the host namespace,"
    );
    println!("  served over mTLS (certificates made for this demo) and a 0600 Unix socket");
    let mut fleet = RealFleet::start(1, &[0]).await?;
    fleet.wait_ready().await?;
    let dir: PathBuf = fleet.dir.clone();
    std::fs::write(dir.join("hosts.toml"), fleet.inventory_toml())?;
    std::fs::write(
        dir.join("plan.toml"),
        "# one host: the canary is the whole fleet\ncanary = { hosts = 1 }\nsoak = \"2s\"\nprogress_deadline = \"2m\"\n\
         [gates]\nhealth = true\n[[gates.counters]]\nstage = \"*\"\nmetric = \"aborted_rate\"\nmax = 0.01\nmin_packets = 50\n",
    )?;
    println!(
        "» inventory ({}):\n{}",
        dir.join("hosts.toml").display(),
        fleet.inventory_toml()
    );

    let v1 = fleet.sample_bundle("1.0.0", false)?;
    let v2 = fleet.sample_bundle_v2("1.1.0")?;
    // Both are built and signed in `dir` (rootletctl bundle build --key ...).
    let (v1, v2) = (name(&v1), name(&v2));
    rootletctl(&dir, &["bundle", "inspect", &v1])?;
    fleet.start_traffic(1000)?;
    println!("\n» traffic: 1000 UDP packets/s from the peer namespace through the host's veth");

    rollout(&dir, &v1, "rollout-1.json")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rootletctl(&dir, &["status", "-i", "hosts.toml"])?;

    // Policies: the ddos stage's blocklist, pushed as data, gated.
    std::fs::write(
        dir.join("policy-plan.toml"),
        "# a policy that raises the ddos stage's drop rate by more than 20 points rolls back\n\
         canary = { hosts = 1 }\nsoak = \"3s\"\nprogress_deadline = \"2m\"\n\
         [[gates.counters]]\nstage = \"ddos\"\nmetric = \"drop_rate_change\"\nmax = 0.2\nwindow = \"1s\"\nmin_packets = 100\n",
    )?;
    std::fs::write(
        dir.join("blocklist.toml"),
        "stage = \"ddos\"\nversion = 1\ndescription = \"two attack sources\"\n\n\
         [maps.ddos_blocklist]\nentries = [\n  { key = \"192.0.2.0/24\", value = 1 },\n  { key = \"198.51.100.7/32\", value = 2 },\n]\n",
    )?;
    std::fs::write(
        dir.join("everything.toml"),
        "stage = \"ddos\"\nversion = 2\ndescription = \"a typo: blocks the whole Internet\"\n\n\
         [maps.ddos_blocklist]\nentries = [\n  { key = \"0.0.0.0/0\", value = 3 },\n]\n",
    )?;
    let key = fleet.signing_key.display().to_string();
    println!(
        "\n» policy push: the ddos stage's blocklist, a signed document of the map's contents"
    );
    ctl_ok(
        &dir,
        &[
            "policy",
            "build",
            "blocklist.toml",
            "--key",
            &key,
            "-o",
            "ddos-1.rlp",
        ],
    )?;
    ctl_ok(&dir, &["policy", "inspect", "ddos-1.rlp", "--entries"])?;
    ctl_ok(
        &dir,
        &[
            "policy",
            "rollout",
            "ddos-1.rlp",
            "-i",
            "hosts.toml",
            "-p",
            "policy-plan.toml",
            "-j",
            "policy-1.json",
        ],
    )?;
    println!("\n» 300 packets from 192.0.2.77, an address the blocklist covers");
    fleet.send_from(0, "192.0.2.77".parse()?, 300)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctl_ok(&dir, &["status", "-i", "hosts.toml"])?;

    println!(
        "\n» a bad policy (0.0.0.0/0) pushed the same way: the canary's drop rate jumps, the gate rolls it back"
    );
    ctl_ok(
        &dir,
        &[
            "policy",
            "build",
            "everything.toml",
            "--key",
            &key,
            "-o",
            "ddos-2.rlp",
        ],
    )?;
    // Exit 1: the two differ (what the diff shows is the point).
    rootletctl(&dir, &["policy", "diff", "ddos-1.rlp", "ddos-2.rlp"])?;
    let code = rootletctl(
        &dir,
        &[
            "policy",
            "rollout",
            "ddos-2.rlp",
            "-i",
            "hosts.toml",
            "-p",
            "policy-plan.toml",
            "-j",
            "policy-2.json",
        ],
    )?;
    if code != 3 {
        return Err(format!("the bad policy's rollout exited {code}, not 3 (rolled back)").into());
    }
    ctl_ok(&dir, &["status", "-i", "hosts.toml"])?;
    let flows_policy = fleet.traffic_flows(0, 200)?;
    println!("» traffic flows again after the automatic rollback: {flows_policy}");
    if !flows_policy {
        return Err("traffic did not flow after the bad policy was rolled back".into());
    }

    println!(
        "\n» a live replacement: version 1.1.0 has new builds of sampler and ddos (ddos keeps its blocklist map, and so its policy)"
    );
    rollout(&dir, &v2, "rollout-2.json")?;
    rootletctl(&dir, &["status", "-i", "hosts.toml"])?;
    let flows = fleet.traffic_flows(0, 200)?;
    println!("» traffic flows through version 1.1.0: {flows}");

    println!("\n» rolling it back");
    let code = rootletctl(&dir, &["rollout", "undo", "-j", "rollout-2.json"])?;
    if code != 0 {
        return Err(format!("the undo exited {code}").into());
    }
    rootletctl(&dir, &["status", "-i", "hosts.toml", "--expect", "1.0.0"])?;
    let flows_after = fleet.traffic_flows(0, 200)?;
    println!("» traffic flows after the rollback: {flows_after}");
    fleet.stop_traffic();
    drop(fleet);
    println!("\n» the agent stopped; its namespaces, pins and certificates were removed");
    if !(flows && flows_after) {
        return Err("traffic did not flow".into());
    }
    Ok(())
}
