//! `rootlet-dp`: drives the data plane from its own process, step by step.
//! Tests use it to own stages in a process they can kill, to crash a change
//! at a chosen step, and to show that pinned state outlives a process.
//!
//! ```text
//! rootlet-dp --root R --store S [--backend B] [--crash-at STEP] STEP...
//!   load=NETNS:IFNAME          load a rootlet (generic mode)
//!   link=NAME:OBJECT:PRIO[:unpinned]
//!   replace=NAME:OBJECT:PRIO[:unpinned][:keep]
//!   unlink=NAME
//!   rollback                   return to the previous generation (tail-call)
//!   state                      print the state as JSON
//!   hold                       print "ready", then wait (up to 10 min) to be killed
//! ```
//! OBJECT is a name from `rootlet_ebpf::STAGES`. Steps after `load` act on
//! that rootlet; without `load`, on the only rootlet the store holds.

use std::{io::Write, path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;
use rootlet_dataplane::{
    Config, Dataplane,
    crash::Step,
    spec::{
        ActionSet, BackendChoice, Change, InterfaceRef, MapPolicy, RootletKey, RootletSpec,
        StageSpec, XdpAction, XdpMode,
    },
};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    store: PathBuf,
    #[arg(long, default_value = "auto")]
    backend: String,
    #[arg(long)]
    crash_at: Option<String>,
    steps: Vec<String>,
}

fn main() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let backend = match args.backend.as_str() {
        "auto" => BackendChoice::Auto,
        "freplace" => BackendChoice::Freplace,
        "tailcall" => BackendChoice::TailCall,
        other => return Err(format!("unknown backend {other}")),
    };
    let crash_at = args
        .crash_at
        .as_deref()
        .map(|s| Step::from_name(s).ok_or_else(|| format!("unknown step {s}")))
        .transpose()?;
    let dp = Dataplane::open(Config {
        bpffs_root: args.root,
        store_path: args.store,
        backend,
        crash_at,
        // A short-lived process: each load makes its own loader.
        warm_loaders: 0,
    })
    .map_err(|e| e.to_string())?;
    let mut key: Option<RootletKey> = dp.list().first().copied();
    for step in &args.steps {
        let (verb, rest) = step.split_once('=').unwrap_or((step.as_str(), ""));
        let parts: Vec<&str> = rest.split(':').collect();
        let need_key = || key.ok_or_else(|| "no rootlet".to_string());
        match verb {
            "load" => {
                let [netns, ifname] = parts[..] else {
                    return Err(format!("bad step {step}"));
                };
                key = Some(
                    dp.load_rootlet(RootletSpec {
                        iface: InterfaceRef {
                            netns: Some(netns.into()),
                            ifname: ifname.into(),
                        },
                        mode: XdpMode::Generic,
                        final_verdict: XdpAction::Pass,
                    })
                    .map_err(|e| e.to_string())?,
                );
            }
            "link" | "replace" => {
                let [name, object, prio, ref flags @ ..] = parts[..] else {
                    return Err(format!("bad step {step}"));
                };
                let entry = rootlet_ebpf::stage(object)
                    .ok_or_else(|| format!("unknown object {object}"))?;
                let spec = StageSpec {
                    name: name.into(),
                    object: Arc::new(entry.object.to_vec()),
                    program: entry.program.into(),
                    priority: prio.parse().map_err(|e| format!("priority: {e}"))?,
                    proceed_on: ActionSet::default(),
                    pin: !flags.contains(&"unpinned"),
                    maps: if flags.contains(&"keep") {
                        MapPolicy::Keep
                    } else {
                        MapPolicy::Fresh
                    },
                    owner: "rootlet-dp".into(),
                };
                let change = if verb == "link" {
                    Change::Link(spec)
                } else {
                    Change::Replace(spec)
                };
                dp.apply(need_key()?, &[change], None)
                    .map_err(|e| e.to_string())?;
            }
            "unlink" => {
                dp.apply(need_key()?, &[Change::Unlink { name: rest.into() }], None)
                    .map_err(|e| e.to_string())?;
            }
            "rollback" => {
                dp.rollback(need_key()?).map_err(|e| e.to_string())?;
            }
            "state" => {
                let state = dp.state(need_key()?).map_err(|e| e.to_string())?;
                println!(
                    "{}",
                    serde_json::to_string(&state).map_err(|e| e.to_string())?
                );
            }
            "hold" => {
                println!("ready");
                std::io::stdout().flush().map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_secs(600));
                return Err("held for 10 minutes without being killed".into());
            }
            _ => return Err(format!("unknown step {step}")),
        }
    }
    Ok(())
}
