//! `rootletctl host TARGET COMMAND`: one agent, one `rootlet.v1` call per
//! command, for the work a bundle rollout is too big a tool for: read the
//! capabilities, the rootlets, one rootlet and its counters; load and
//! unload a rootlet; link, replace, unlink, pin and unpin a stage; roll
//! a rootlet back to its previous generation; follow
//! the agent's events (Watch); hold a stage's lease (KeepAlive).
//!
//! TARGET is a host name of `--inventory FILE` (its address and TLS
//! settings), or without an inventory an address: `unix:/path`, or
//! `host:port` with `--ca --cert --key` (mTLS) or `--insecure`. The
//! connection is [`crate::transport::connect`]'s, as for every other
//! command. ROOTLET is a rootlet id (`netns:<inode>/if:<ifindex>`), an
//! interface name in the agent's own namespace, or `IFNAME@NETNS_FILE`.
//!
//! Output: a table for people, or with `--output json` one JSON document
//! (for `watch`, one JSON object per line and event) with the field names
//! of [`RootletView`], [`StageView`], [`StatsView`], [`CapsView`],
//! [`ChangeView`], [`RollbackView`], [`EventView`]: snake_case, stable.
//!
//! Errors: the call's name, gRPC status code and message, and the
//! google.rpc ErrorInfo reason (with BadRequest and PreconditionFailure
//! violations, and DebugInfo such as the end of a verifier log) where the
//! agent sends them ([`CallError`]); with `--output json` also as a JSON
//! object `{"error": ...}` on stdout.
//!
//! Calls answered UNAVAILABLE are retried (`--retries`, backoff with full
//! jitter); a change is retried with the same idempotency key, so it runs
//! at most once. A deadline is never retried.
//!
//! Exit codes ([`crate::cli`]'s constants): 0 success; 1 failed: the
//! agent answered with an error or could not be reached, the agent ended a
//! watch before it was done, or a lease held with `--hold` was lost; 2
//! usage or configuration error: flags, inventory, target, an object file
//! that cannot be read or is not ELF.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use serde::Serialize;
use tonic::{Code, Response, Status, transport::Channel};
use tonic_types::StatusExt;

use crate::{
    cli::{
        ChangeArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE, HostArgs, HostCmd, Output, StageArgs,
        VerdictArg, XdpModeArg,
    },
    config::Human,
    inventory::{self, Address, Host, Inventory, Security, TlsSettings},
    rollout::{gates::short, summary::fmt_time},
    status::columns,
    transport::{self, TransportOptions, code_name, request},
};

/// The largest object file `link` and `replace` send.
pub const MAX_OBJECT: u64 = 32 << 20;
/// The longest lease the agent grants.
pub const MAX_LEASE: Duration = Duration::from_secs(86_400);
/// First backoff after an UNAVAILABLE answer; doubled up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a `host` command failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Flags, inventory, target, files: exit 2.
    #[error("{0}")]
    Usage(String),
    /// The agent refused, or could not be reached: exit 1.
    #[error(transparent)]
    Call(Box<CallError>),
    /// Anything else that stopped the command (a lost lease, a watch the
    /// agent ended): exit 1.
    #[error("{0}")]
    Failed(String),
}

impl HostError {
    pub fn exit_code(&self) -> i32 {
        match self {
            HostError::Usage(_) => EXIT_USAGE,
            HostError::Call(_) | HostError::Failed(_) => EXIT_FAILED,
        }
    }
}

impl From<CallError> for HostError {
    fn from(e: CallError) -> HostError {
        HostError::Call(Box::new(e))
    }
}

/// A call the agent answered with an error (or that got no answer), with
/// the google.rpc details it carried.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{}", self.describe())]
pub struct CallError {
    /// The RPC: `GetRootlet`.
    pub rpc: &'static str,
    /// The status code's name: `NOT_FOUND`.
    pub code: &'static str,
    pub message: String,
    /// ErrorInfo.reason (empty: none sent).
    pub reason: String,
    /// ErrorInfo.metadata.
    pub metadata: BTreeMap<String, String>,
    /// BadRequest field violations and PreconditionFailure violations, as
    /// `field: description`.
    pub violations: Vec<String>,
    /// DebugInfo.detail (the end of a verifier log, for one).
    pub debug: String,
    pub attempts: u32,
}

impl CallError {
    fn of(rpc: &'static str, status: &Status, attempts: u32) -> CallError {
        let details = status.get_error_details();
        let (reason, metadata) = details.error_info().map_or_else(
            || (String::new(), BTreeMap::new()),
            |i| {
                (
                    i.reason.clone(),
                    i.metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )
            },
        );
        let mut violations = Vec::new();
        if let Some(b) = details.bad_request() {
            violations.extend(
                b.field_violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description)),
            );
        }
        if let Some(p) = details.precondition_failure() {
            violations.extend(
                p.violations
                    .iter()
                    .map(|v| format!("{} {}: {}", v.r#type, v.subject, v.description)),
            );
        }
        let debug = details
            .debug_info()
            .map(|d| d.detail.clone())
            .unwrap_or_default();
        // A server that enforces our grpc-timeout answers CANCELLED
        // "Timeout expired": the same deadline, seen from its side.
        let code = match status.code() {
            Code::Cancelled if status.message().contains("Timeout expired") => {
                Code::DeadlineExceeded
            }
            c => c,
        };
        CallError {
            rpc,
            code: code_name(code),
            message: status.message().to_string(),
            reason,
            metadata,
            violations,
            debug,
            attempts,
        }
    }

    fn describe(&self) -> String {
        let mut s = format!("{}: {}: {}", self.rpc, self.code, self.message);
        if !self.reason.is_empty() {
            let _ = write!(s, " (reason {}", self.reason);
            if !self.metadata.is_empty() {
                let meta: Vec<String> = self
                    .metadata
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let _ = write!(s, "; {}", meta.join(", "));
            }
            s.push(')');
        }
        if self.attempts > 1 {
            let _ = write!(s, " (after {} attempts)", self.attempts);
        }
        for v in &self.violations {
            let _ = write!(s, "\n  {v}");
        }
        if !self.debug.is_empty() {
            let _ = write!(s, "\n{}", self.debug.trim_end());
        }
        s
    }
}

/// One agent and the deadlines of calls to it.
struct Agent {
    channel: Channel,
    rpc_timeout: Duration,
    change_timeout: Duration,
    retries: u32,
}

impl Agent {
    fn client(&self) -> RootletClient<Channel> {
        RootletClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// One unary call of `req`: `f` sends the request it is given (a copy
    /// of `req` per attempt, carrying the deadline) as [`Self::call`] does.
    async fn unary<Q, T, F, Fut>(
        &self,
        rpc: &'static str,
        timeout: Duration,
        req: Q,
        f: F,
    ) -> Result<T, HostError>
    where
        Q: Clone,
        F: Fn(RootletClient<Channel>, tonic::Request<Q>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call(rpc, timeout, |c, t| f(c, request(req.clone(), t)))
            .await
    }

    /// Calls `f` with the deadline `timeout` (sent as `grpc-timeout` and
    /// enforced here), retrying on UNAVAILABLE with backoff.
    async fn call<T, F, Fut>(
        &self,
        rpc: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, HostError>
    where
        F: Fn(RootletClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let tries = self.retries.saturating_add(1);
        let mut backoff = BACKOFF_BASE;
        let mut n = 0;
        // Bounded by `tries`.
        loop {
            n += 1;
            let status = match tokio::time::timeout(timeout, f(self.client(), timeout)).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => s,
                Err(_) => Status::deadline_exceeded(format!("no answer within {}", Human(timeout))),
            };
            if status.code() != Code::Unavailable || n >= tries {
                return Err(CallError::of(rpc, &status, n).into());
            }
            let ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=ms))).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Runs `rootletctl host ...`; returns the exit code.
pub async fn run(a: HostArgs) -> i32 {
    let output = a.output;
    match dispatch(a).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            if output == Output::Json {
                let v = match &e {
                    HostError::Call(c) => serde_json::json!({ "error": c }),
                    other => serde_json::json!({ "error": { "message": other.to_string() } }),
                };
                println!("{v}");
            }
            eprintln!("rootletctl: {e}");
            e.exit_code()
        }
    }
}

async fn dispatch(a: HostArgs) -> Result<(), HostError> {
    let host = resolve(&a)?;
    let opts = TransportOptions {
        rpc_timeout: a.rpc_timeout,
        ..TransportOptions::default()
    };
    let channel = transport::connect(&host, &opts).map_err(HostError::Usage)?;
    let agent = Agent {
        channel,
        rpc_timeout: a.rpc_timeout,
        change_timeout: a.change_timeout,
        retries: a.retries.min(20),
    };
    let out = a.output;
    match a.command {
        HostCmd::Caps => {
            let c = agent
                .unary(
                    "GetCapabilities",
                    agent.rpc_timeout,
                    pb::GetCapabilitiesRequest {},
                    |mut c, r| async move { c.get_capabilities(r).await },
                )
                .await?;
            let v = CapsView::of(&c);
            emit(out, &v, || v.text());
        }
        HostCmd::List => {
            let r = agent
                .unary(
                    "ListRootlets",
                    agent.rpc_timeout,
                    pb::ListRootletsRequest {},
                    |mut c, r| async move { c.list_rootlets(r).await },
                )
                .await?;
            let v: Vec<RootletView> = r.rootlets.iter().map(RootletView::of).collect();
            emit(out, &v, || list_text(&v));
        }
        HostCmd::Get { rootlet } => {
            let r = rootlet_ref(&rootlet)?;
            let s = agent
                .unary(
                    "GetRootlet",
                    agent.rpc_timeout,
                    pb::GetRootletRequest { rootlet: Some(r) },
                    |mut c, r| async move { c.get_rootlet(r).await },
                )
                .await?;
            let v = RootletView::of(&s);
            emit(out, &v, || v.text());
        }
        HostCmd::Load {
            interface,
            netns,
            mode,
            final_verdict,
            idempotency_key,
        } => {
            let iface = load_interface(&interface, netns)?;
            let req = pb::LoadRootletRequest {
                interface: Some(iface),
                mode: mode_of(mode) as i32,
                final_verdict: action_of(final_verdict) as i32,
                idempotency_key: key_or_random(idempotency_key),
            };
            let s = agent
                .unary(
                    "LoadRootlet",
                    agent.change_timeout,
                    req,
                    |mut c, r| async move { c.load_rootlet(r).await },
                )
                .await?;
            let v = RootletView::of(&s);
            emit(out, &v, || format!("loaded rootlet {}\n{}", v.id, v.text()));
        }
        HostCmd::Unload {
            rootlet,
            idempotency_key,
        } => {
            let req = pb::UnloadRootletRequest {
                rootlet: Some(rootlet_ref(&rootlet)?),
                idempotency_key: key_or_random(idempotency_key),
            };
            agent
                .unary(
                    "UnloadRootlet",
                    agent.change_timeout,
                    req,
                    |mut c, r| async move { c.unload_rootlet(r).await },
                )
                .await?;
            let v = serde_json::json!({ "unloaded": rootlet });
            emit(out, &v, || format!("unloaded rootlet {rootlet}\n"));
        }
        HostCmd::Link {
            rootlet,
            stage,
            object,
            stage_args,
            lease,
            hold,
            no_pin,
            change,
        } => {
            let lease_seconds = lease.map(lease_seconds).transpose()?;
            let mut s = stage_of(&stage, &object, &stage_args)?;
            s.pin = !no_pin && lease_seconds.is_none();
            s.lease_seconds = lease_seconds.unwrap_or(0);
            let req = pb::LinkStageRequest {
                rootlet: Some(rootlet_ref(&rootlet)?),
                stage: Some(s),
                expected_generation: change.expected_generation,
                idempotency_key: key_or_random(change.idempotency_key),
            };
            let r = agent
                .unary(
                    "LinkStage",
                    agent.change_timeout,
                    req,
                    |mut c, r| async move { c.link_stage(r).await },
                )
                .await?;
            let v = ChangeView::of(&r);
            emit(out, &v, || v.text(&format!("linked stage {stage}")));
            if hold && let Some(secs) = lease_seconds {
                if r.lease_id.is_empty() {
                    return Err(HostError::Failed(format!(
                        "the agent linked stage {stage} without a lease: nothing to hold"
                    )));
                }
                hold_lease(
                    &agent,
                    &r.lease_id,
                    &stage,
                    Duration::from_secs(secs.into()),
                )
                .await?;
            }
        }
        HostCmd::Replace {
            rootlet,
            stage,
            object,
            stage_args,
            keep_maps,
            change,
        } => {
            let mut s = stage_of(&stage, &object, &stage_args)?;
            let maps = if keep_maps {
                pb::MapPolicy::Keep
            } else {
                pb::MapPolicy::Fresh
            };
            s.maps = maps as i32;
            let req = pb::ReplaceStageRequest {
                rootlet: Some(rootlet_ref(&rootlet)?),
                stage: Some(s),
                expected_generation: change.expected_generation,
                idempotency_key: key_or_random(change.idempotency_key),
            };
            let r = agent
                .unary(
                    "ReplaceStage",
                    agent.change_timeout,
                    req,
                    |mut c, r| async move { c.replace_stage(r).await },
                )
                .await?;
            let v = ChangeView::of(&r);
            emit(out, &v, || v.text(&format!("replaced stage {stage}")));
        }
        HostCmd::Unlink {
            rootlet,
            stage,
            change,
        } => {
            let ChangeArgs {
                expected_generation,
                idempotency_key,
            } = change;
            let req = pb::UnlinkStageRequest {
                rootlet: Some(rootlet_ref(&rootlet)?),
                stage: stage_name(&stage)?,
                expected_generation,
                idempotency_key: key_or_random(idempotency_key),
            };
            let r = agent
                .unary(
                    "UnlinkStage",
                    agent.change_timeout,
                    req,
                    |mut c, r| async move { c.unlink_stage(r).await },
                )
                .await?;
            let v = ChangeView::of(&r);
            emit(out, &v, || v.text(&format!("unlinked stage {stage}")));
        }
        HostCmd::Pin {
            rootlet,
            stage,
            change,
        } => set_pin(&agent, out, &rootlet, &stage, true, change).await?,
        HostCmd::Unpin {
            rootlet,
            stage,
            change,
        } => set_pin(&agent, out, &rootlet, &stage, false, change).await?,
        HostCmd::Rollback { rootlet, change } => {
            let req = pb::RollbackRootletRequest {
                rootlet: Some(rootlet_ref(&rootlet)?),
                expected_generation: change.expected_generation,
                idempotency_key: key_or_random(change.idempotency_key),
            };
            let r = agent
                .unary(
                    "RollbackRootlet",
                    agent.change_timeout,
                    req,
                    |mut c, r| async move { c.rollback_rootlet(r).await },
                )
                .await?;
            let v = RollbackView::of(&r);
            emit(out, &v, || v.text(&rootlet));
        }
        HostCmd::Stats { rootlet } => {
            let r = rootlet_ref(&rootlet)?;
            let s = agent
                .unary(
                    "GetStats",
                    agent.rpc_timeout,
                    pb::GetStatsRequest { rootlet: Some(r) },
                    |mut c, r| async move { c.get_stats(r).await },
                )
                .await?;
            let v = StatsView::of(&s);
            emit(out, &v, || v.text());
        }
        HostCmd::Watch {
            rootlet,
            count,
            duration,
        } => {
            let r = rootlet.as_deref().map(rootlet_ref).transpose()?;
            watch(&agent, out, r, count, duration).await?;
        }
    }
    Ok(())
}

async fn set_pin(
    agent: &Agent,
    out: Output,
    rootlet: &str,
    stage: &str,
    pin: bool,
    change: ChangeArgs,
) -> Result<(), HostError> {
    let req = pb::SetStagePinRequest {
        rootlet: Some(rootlet_ref(rootlet)?),
        stage: stage_name(stage)?,
        pin,
        expected_generation: change.expected_generation,
        idempotency_key: key_or_random(change.idempotency_key),
    };
    let r = agent
        .unary(
            "SetStagePin",
            agent.change_timeout,
            req,
            |mut c, r| async move { c.set_stage_pin(r).await },
        )
        .await?;
    let v = ChangeView::of(&r);
    let what = if pin { "pinned" } else { "unpinned" };
    emit(out, &v, || v.text(&format!("{what} stage {stage}")));
    Ok(())
}

/// Prints `v` as JSON, or `text()` for people.
fn emit<T: Serialize>(out: Output, v: &T, text: impl FnOnce() -> String) {
    match out {
        Output::Json => match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("rootletctl: cannot encode the answer as JSON: {e}"),
        },
        Output::Text => print!("{}", text()),
    }
}

/// The host TARGET names: from the inventory, or an address with the TLS
/// flags.
fn resolve(a: &HostArgs) -> Result<Host, HostError> {
    let target = a.target.trim();
    if target.is_empty() {
        return Err(HostError::Usage("the target is empty".into()));
    }
    if let Some(path) = &a.inventory {
        let inv = Inventory::load(path).map_err(|e| HostError::Usage(e.to_string()))?;
        return inv
            .hosts
            .iter()
            .find(|h| h.name == target)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = inv.hosts.iter().take(10).map(|h| h.name.as_str()).collect();
                HostError::Usage(format!(
                    "{} has no host {target:?} (it has {}{})",
                    path.display(),
                    names.join(", "),
                    if inv.hosts.len() > names.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ))
            });
    }
    let address = inventory::parse_address(target).map_err(|e| {
        HostError::Usage(format!(
            "{e} (without --inventory, TARGET is an address: unix:/path or host:port)"
        ))
    })?;
    let security = match (&address, &a.ca, &a.cert, &a.key) {
        (Address::Unix(_), None, None, None) if !a.insecure => Security::Local,
        (Address::Unix(_), ..) => {
            return Err(HostError::Usage(
                "a Unix socket takes no TLS flags nor --insecure".into(),
            ));
        }
        (Address::Tcp(_), Some(ca), Some(cert), Some(key)) => Security::Tls(TlsSettings {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            server_name: a.server_name.clone(),
        }),
        (Address::Tcp(_), None, None, None) if a.insecure => Security::Insecure,
        (Address::Tcp(_), ..) => {
            return Err(HostError::Usage(
                "a TCP address needs --ca, --cert and --key (mTLS), or --insecure".into(),
            ));
        }
    };
    Ok(Host {
        name: target.to_string(),
        address,
        labels: BTreeMap::new(),
        security,
    })
}

/// ROOTLET: a rootlet id, IFNAME, or IFNAME@NETNS_FILE.
pub fn rootlet_ref(s: &str) -> Result<pb::RootletRef, HostError> {
    let s = s.trim();
    let r = if s.starts_with("netns:") {
        pb::rootlet_ref::Ref::Id(s.to_string())
    } else {
        pb::rootlet_ref::Ref::Interface(interface(s)?)
    };
    Ok(pb::RootletRef { r#ref: Some(r) })
}

/// IFNAME or IFNAME@NETNS_FILE.
fn interface(s: &str) -> Result<pb::Interface, HostError> {
    let (ifname, netns) = s.split_once('@').unwrap_or((s, ""));
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '@']) {
        return Err(HostError::Usage(format!(
            "{s:?}: a rootlet is an id (netns:<inode>/if:<ifindex>), an interface name of at most 15 characters, or IFNAME@NETNS_FILE"
        )));
    }
    if s.contains('@') && !netns.starts_with('/') {
        return Err(HostError::Usage(format!(
            "{s:?}: the network namespace after @ is a file path (/run/netns/NAME)"
        )));
    }
    Ok(pb::Interface {
        netns: netns.to_string(),
        ifname: ifname.to_string(),
    })
}

fn load_interface(s: &str, netns: Option<String>) -> Result<pb::Interface, HostError> {
    let mut i = interface(s.trim())?;
    if let Some(ns) = netns {
        if !i.netns.is_empty() {
            return Err(HostError::Usage(
                "give the namespace once: IFNAME@NETNS_FILE or --netns".into(),
            ));
        }
        i.netns = ns;
    }
    Ok(i)
}

fn stage_name(s: &str) -> Result<String, HostError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(HostError::Usage("the stage name is empty".into()));
    }
    Ok(s.to_string())
}

fn stage_of(name: &str, object: &Path, a: &StageArgs) -> Result<pb::Stage, HostError> {
    Ok(pb::Stage {
        name: stage_name(name)?,
        object: read_object(object)?,
        program: a.program.clone(),
        priority: a.priority,
        proceed_on: a.proceed_on.iter().map(|&v| action_of(v) as i32).collect(),
        maps: pb::MapPolicy::Fresh as i32,
        pin: true,
        lease_seconds: 0,
    })
}

/// The bytes of an ELF object file (at most [`MAX_OBJECT`]).
fn read_object(path: &Path) -> Result<Vec<u8>, HostError> {
    let bad = |e: std::io::Error| HostError::Usage(format!("cannot read {}: {e}", path.display()));
    let len = std::fs::metadata(path).map_err(bad)?.len();
    if len > MAX_OBJECT {
        return Err(HostError::Usage(format!(
            "{}: {len} bytes, more than the {MAX_OBJECT} an object may have",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(bad)?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(HostError::Usage(format!(
            "{}: not an ELF object",
            path.display()
        )));
    }
    Ok(bytes)
}

/// A lease's length in whole seconds, 1 s to [`MAX_LEASE`].
pub fn lease_seconds(d: Duration) -> Result<u32, HostError> {
    if d < Duration::from_secs(1) || d > MAX_LEASE || d.subsec_nanos() != 0 {
        return Err(HostError::Usage(format!(
            "--lease {}: a lease is whole seconds, 1s to 24h",
            Human(d)
        )));
    }
    u32::try_from(d.as_secs()).map_err(|_| HostError::Usage("--lease is too long".into()))
}

fn key_or_random(k: Option<String>) -> String {
    k.unwrap_or_else(|| format!("rootletctl-host-{:016x}", fastrand::u64(..)))
}

fn mode_of(m: XdpModeArg) -> pb::XdpMode {
    match m {
        XdpModeArg::Auto => pb::XdpMode::Auto,
        XdpModeArg::Driver => pb::XdpMode::Driver,
        XdpModeArg::Generic => pb::XdpMode::Generic,
    }
}

fn action_of(v: VerdictArg) -> pb::XdpAction {
    match v {
        VerdictArg::Aborted => pb::XdpAction::Aborted,
        VerdictArg::Drop => pb::XdpAction::Drop,
        VerdictArg::Pass => pb::XdpAction::Pass,
        VerdictArg::Tx => pb::XdpAction::Tx,
        VerdictArg::Redirect => pb::XdpAction::Redirect,
    }
}

/// `pass`, `drop`, ...: an action's name as the flags spell it.
fn action_name(a: i32) -> String {
    match pb::XdpAction::try_from(a) {
        Ok(pb::XdpAction::Aborted) => "aborted".into(),
        Ok(pb::XdpAction::Drop) => "drop".into(),
        Ok(pb::XdpAction::Pass) => "pass".into(),
        Ok(pb::XdpAction::Tx) => "tx".into(),
        Ok(pb::XdpAction::Redirect) => "redirect".into(),
        Ok(pb::XdpAction::Unspecified) => "unspecified".into(),
        Err(_) => format!("action-{a}"),
    }
}

fn mode_name(m: i32) -> String {
    match pb::XdpMode::try_from(m) {
        Ok(pb::XdpMode::Auto) => "auto".into(),
        Ok(pb::XdpMode::Driver) => "driver".into(),
        Ok(pb::XdpMode::Generic) => "generic".into(),
        Ok(pb::XdpMode::Unspecified) => "unspecified".into(),
        Err(_) => format!("mode-{m}"),
    }
}

fn backend_name(b: i32) -> String {
    match pb::Backend::try_from(b) {
        Ok(pb::Backend::Freplace) => "freplace".into(),
        Ok(pb::Backend::Tailcall) => "tailcall".into(),
        Ok(pb::Backend::Unspecified) => "none".into(),
        Err(_) => format!("backend-{b}"),
    }
}

/// A kernel program.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramView {
    pub id: u32,
    pub name: String,
    pub tag: String,
    pub verified_insns: u32,
    pub loaded_at_unix_ms: i64,
}

impl ProgramView {
    fn of(p: &pb::Program) -> ProgramView {
        ProgramView {
            id: p.id,
            name: p.name.clone(),
            tag: p.tag.clone(),
            verified_insns: p.verified_insns,
            loaded_at_unix_ms: p.loaded_at_unix_ms,
        }
    }
}

/// Packets a stage returned each action for.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CountersView {
    pub pass: u64,
    pub drop: u64,
    pub aborted: u64,
    pub tx: u64,
    pub redirect: u64,
    /// The slot was enabled but empty: the placeholder proceeded.
    pub empty: u64,
}

impl CountersView {
    fn of(c: Option<&pb::Counters>) -> CountersView {
        c.map_or_else(CountersView::default, |c| CountersView {
            pass: c.pass,
            drop: c.drop,
            aborted: c.aborted,
            tx: c.tx,
            redirect: c.redirect,
            empty: c.empty,
        })
    }
}

/// One stage (a slot of the pipeline).
#[derive(Debug, Clone, Serialize)]
pub struct StageView {
    pub name: String,
    pub slot: u32,
    pub position: u32,
    pub owner: String,
    pub priority: i32,
    pub proceed_on: Vec<String>,
    pub digest: String,
    pub pinned: bool,
    /// Null: the slot is empty (an unpinned stage whose owner went away).
    pub program: Option<ProgramView>,
    pub link_id: u32,
    pub pin_path: String,
    /// Empty: not linked with a lease.
    pub lease_id: String,
    pub lease_expires_unix_ms: i64,
    /// The generation that loaded the stage's current build.
    pub loaded_generation: u64,
    /// The generation the counters count from.
    pub counters_since_generation: u64,
    /// False: the rootlet cannot see this stage's verdicts.
    pub counted: bool,
    pub counters: CountersView,
    /// Null: the stage's maps hold no policy.
    pub policy_version: Option<u64>,
}

impl StageView {
    fn of(s: &pb::Slot) -> StageView {
        StageView {
            name: s.stage.clone(),
            slot: s.slot,
            position: s.position,
            owner: s.owner.clone(),
            priority: s.priority,
            proceed_on: s.proceed_on.iter().map(|&a| action_name(a)).collect(),
            digest: s.digest.clone(),
            pinned: s.pinned,
            program: s.program.as_ref().map(ProgramView::of),
            link_id: s.link_id,
            pin_path: s.pin_path.clone(),
            lease_id: s.lease_id.clone(),
            lease_expires_unix_ms: s.lease_expires_unix_ms,
            loaded_generation: s.loaded_generation,
            counters_since_generation: s.counters_since_generation,
            counted: !s.uncounted,
            counters: CountersView::of(s.counters.as_ref()),
            policy_version: (s.policy_version > 0).then_some(s.policy_version),
        }
    }
}

/// One rootlet.
#[derive(Debug, Clone, Serialize)]
pub struct RootletView {
    pub id: String,
    pub interface: String,
    /// Empty: the agent's own namespace.
    pub netns: String,
    pub backend: String,
    pub mode: String,
    pub final_verdict: String,
    pub generation: u64,
    /// The rootlet's own program (null: gone, see `drift`).
    pub program: Option<ProgramView>,
    pub xdp_link_id: u32,
    /// Empty unless the kernel no longer runs what the agent built.
    pub drift: String,
    pub final_verdict_count: u64,
    pub applied_version: String,
    /// In pipeline order.
    pub stages: Vec<StageView>,
}

impl RootletView {
    fn of(r: &pb::RootletState) -> RootletView {
        let (netns, ifname) = r
            .interface
            .as_ref()
            .map_or_else(Default::default, |i| (i.netns.clone(), i.ifname.clone()));
        let mut stages: Vec<StageView> = r.slots.iter().map(StageView::of).collect();
        stages.sort_by_key(|s| (s.position, s.slot));
        RootletView {
            id: r.id.clone(),
            interface: ifname,
            netns,
            backend: backend_name(r.backend),
            mode: mode_name(r.mode),
            final_verdict: action_name(r.final_verdict),
            generation: r.generation,
            program: r.rootlet.as_ref().map(ProgramView::of),
            xdp_link_id: r.xdp_link_id,
            drift: r.drift.clone(),
            final_verdict_count: r.final_verdict_count,
            applied_version: r.applied_version.clone(),
            stages,
        }
    }

    fn where_(&self) -> String {
        if self.netns.is_empty() {
            self.interface.clone()
        } else {
            format!("{}@{}", self.interface, self.netns)
        }
    }

    /// The rootlet's line, then a table of its stages.
    fn text(&self) -> String {
        let mut out = format!(
            "rootlet {} on {}: generation {}, {} backend, {} mode, final verdict {} ({} packets), program {}, xdp link {}\n",
            self.id,
            self.where_(),
            self.generation,
            self.backend,
            self.mode,
            self.final_verdict,
            self.final_verdict_count,
            self.program
                .as_ref()
                .map_or_else(|| "-".to_string(), |p| p.id.to_string()),
            self.xdp_link_id
        );
        if !self.applied_version.is_empty() {
            let _ = writeln!(out, "bundle version {}", self.applied_version);
        }
        if !self.drift.is_empty() {
            let _ = writeln!(out, "DRIFT: {}", self.drift);
        }
        if self.stages.is_empty() {
            out.push_str("no stages\n");
            return out;
        }
        let mut rows = vec![
            [
                "POS", "SLOT", "STAGE", "OWNER", "PRIO", "PROCEED", "PROGRAM", "LOADED", "PIN",
                "LEASE", "DIGEST", "PASS", "DROP", "ABORTED", "TX", "REDIRECT", "POLICY",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for s in &self.stages {
            let counter = |n: u64| if s.counted { n.to_string() } else { "-".into() };
            rows.push(vec![
                s.position.to_string(),
                s.slot.to_string(),
                s.name.clone(),
                dash(&s.owner),
                s.priority.to_string(),
                if s.proceed_on.is_empty() {
                    "pass".into()
                } else {
                    s.proceed_on.join(",")
                },
                s.program
                    .as_ref()
                    .map_or_else(|| "empty".to_string(), |p| format!("{} {}", p.id, p.name)),
                format!("g{}", s.loaded_generation),
                if s.pinned { "yes" } else { "no" }.into(),
                if s.lease_id.is_empty() {
                    "-".into()
                } else {
                    format!("{} until {}", s.lease_id, fmt_time(s.lease_expires_unix_ms))
                },
                short(&s.digest),
                counter(s.counters.pass),
                counter(s.counters.drop),
                counter(s.counters.aborted),
                counter(s.counters.tx),
                counter(s.counters.redirect),
                s.policy_version
                    .map_or_else(|| "-".to_string(), |v| format!("v{v}")),
            ]);
        }
        out.push_str(&columns(&rows));
        out
    }
}

fn list_text(rootlets: &[RootletView]) -> String {
    if rootlets.is_empty() {
        return "no rootlets\n".into();
    }
    let mut rows = vec![
        [
            "ROOTLET",
            "INTERFACE",
            "BACKEND",
            "MODE",
            "FINAL",
            "GEN",
            "STAGES (program id)",
            "DRIFT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rootlets {
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|s| {
                format!(
                    "{}#{}",
                    s.name,
                    s.program
                        .as_ref()
                        .map_or_else(|| "empty".to_string(), |p| p.id.to_string())
                )
            })
            .collect();
        rows.push(vec![
            r.id.clone(),
            r.where_(),
            r.backend.clone(),
            r.mode.clone(),
            r.final_verdict.clone(),
            r.generation.to_string(),
            if stages.is_empty() {
                "-".into()
            } else {
                stages.join(" ")
            },
            dash(&r.drift),
        ]);
    }
    columns(&rows)
}

/// What a change did.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeView {
    pub generation: u64,
    /// Set for a stage linked with a lease.
    pub lease_id: String,
    pub rootlet: Option<RootletView>,
}

impl ChangeView {
    fn of(r: &pb::ChangeResult) -> ChangeView {
        ChangeView {
            generation: r.generation,
            lease_id: r.lease_id.clone(),
            rootlet: r.rootlet.as_ref().map(RootletView::of),
        }
    }

    fn text(&self, what: &str) -> String {
        let mut out = format!("{what}: generation {}", self.generation);
        if !self.lease_id.is_empty() {
            let _ = write!(out, ", lease {}", self.lease_id);
        }
        out.push('\n');
        if let Some(r) = &self.rootlet {
            out.push_str(&r.text());
        }
        out
    }
}

/// What a rootlet rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackView {
    /// The new generation, which runs the restored pipeline.
    pub generation: u64,
    /// The generation whose pipeline it runs again.
    pub restored_generation: u64,
    /// `instant` (the previous generation was still built: one write) or
    /// `rebuilt` (built again as a change).
    pub how: String,
    pub rootlet: Option<RootletView>,
}

impl RollbackView {
    fn of(r: &pb::RollbackRootletResponse) -> RollbackView {
        let how = match pb::RollbackHow::try_from(r.how) {
            Ok(pb::RollbackHow::Instant) => "instant",
            Ok(pb::RollbackHow::Rebuilt) => "rebuilt",
            _ => "unspecified",
        };
        RollbackView {
            generation: r.generation,
            restored_generation: r.restored_generation,
            how: how.to_owned(),
            rootlet: r.rootlet.as_ref().map(RootletView::of),
        }
    }

    fn text(&self, rootlet: &str) -> String {
        let mut out = format!(
            "rolled back rootlet {rootlet}: generation {} runs generation {}'s pipeline ({})\n",
            self.generation, self.restored_generation, self.how
        );
        if let Some(r) = &self.rootlet {
            out.push_str(&r.text());
        }
        out
    }
}

/// One slot's counters.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatsView {
    pub slot: u32,
    pub stage: String,
    pub counted: bool,
    pub counters_since_generation: u64,
    pub counters: CountersView,
}

/// GetStats.
#[derive(Debug, Clone, Serialize)]
pub struct StatsView {
    pub rootlet_id: String,
    pub generation: u64,
    pub final_verdict_count: u64,
    pub slots: Vec<SlotStatsView>,
}

impl StatsView {
    fn of(s: &pb::GetStatsResponse) -> StatsView {
        StatsView {
            rootlet_id: s.rootlet_id.clone(),
            generation: s.generation,
            final_verdict_count: s.final_verdict_count,
            slots: s
                .slots
                .iter()
                .map(|x| SlotStatsView {
                    slot: x.slot,
                    stage: x.stage.clone(),
                    counted: !x.uncounted,
                    counters_since_generation: x.counters_since_generation,
                    counters: CountersView::of(x.counters.as_ref()),
                })
                .collect(),
        }
    }

    fn text(&self) -> String {
        let mut out = format!(
            "rootlet {}: generation {}, {} packets with the final verdict\n",
            self.rootlet_id, self.generation, self.final_verdict_count
        );
        if self.slots.is_empty() {
            out.push_str("no stages\n");
            return out;
        }
        let mut rows = vec![
            [
                "SLOT", "STAGE", "SINCE", "PASS", "DROP", "ABORTED", "TX", "REDIRECT", "EMPTY",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for s in &self.slots {
            let c = |n: u64| if s.counted { n.to_string() } else { "-".into() };
            rows.push(vec![
                s.slot.to_string(),
                dash(&s.stage),
                format!("g{}", s.counters_since_generation),
                c(s.counters.pass),
                c(s.counters.drop),
                c(s.counters.aborted),
                c(s.counters.tx),
                c(s.counters.redirect),
                s.counters.empty.to_string(),
            ]);
        }
        out.push_str(&columns(&rows));
        out
    }
}

/// One probe of GetCapabilities.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeView {
    pub name: String,
    pub permitted: bool,
    pub reason: String,
}

/// GetCapabilities.
#[derive(Debug, Clone, Serialize)]
pub struct CapsView {
    pub kernel: String,
    /// What new rootlets get: `freplace`, `tailcall`, or `none`.
    pub backend: String,
    pub probes: Vec<ProbeView>,
}

impl CapsView {
    fn of(c: &pb::Capabilities) -> CapsView {
        CapsView {
            kernel: c.kernel.clone(),
            backend: backend_name(c.backend),
            probes: c
                .probes
                .iter()
                .map(|p| ProbeView {
                    name: p.name.clone(),
                    permitted: p.permitted,
                    reason: p.reason.clone(),
                })
                .collect(),
        }
    }

    fn text(&self) -> String {
        let mut out = format!(
            "kernel {}; new rootlets get the {} backend\n",
            self.kernel, self.backend
        );
        let mut rows = vec![vec!["PROBE".into(), "PERMITTED".into(), "REASON".into()]];
        for p in &self.probes {
            rows.push(vec![
                p.name.clone(),
                if p.permitted { "yes" } else { "no" }.into(),
                dash(&p.reason),
            ]);
        }
        out.push_str(&columns(&rows));
        out
    }
}

/// One Watch event.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    /// When rootletctl received it.
    pub received_unix_ms: i64,
    pub rootlet_id: String,
    /// `snapshot`, `loaded`, `changed`, `unloaded`, `lease-expired`,
    /// `drift`, `policy`.
    pub cause: String,
    /// Null when unloaded.
    pub rootlet: Option<RootletView>,
}

impl EventView {
    fn of(e: &pb::WatchEvent) -> EventView {
        EventView {
            received_unix_ms: now_ms(),
            rootlet_id: e.rootlet_id.clone(),
            cause: e.cause.clone(),
            rootlet: e.rootlet.as_ref().map(RootletView::of),
        }
    }

    fn line(&self) -> String {
        let state = self.rootlet.as_ref().map_or_else(String::new, |r| {
            let stages: Vec<String> = r
                .stages
                .iter()
                .map(|s| {
                    format!(
                        "{}#{}",
                        s.name,
                        s.program
                            .as_ref()
                            .map_or_else(|| "empty".to_string(), |p| p.id.to_string())
                    )
                })
                .collect();
            format!(
                " {} generation {} stages [{}]{}",
                r.where_(),
                r.generation,
                stages.join(" "),
                if r.drift.is_empty() {
                    String::new()
                } else {
                    format!(" DRIFT: {}", r.drift)
                }
            )
        });
        format!(
            "{} {:<13} {}{state}\n",
            fmt_time(self.received_unix_ms),
            self.cause,
            self.rootlet_id
        )
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Prints Watch events until Ctrl-C (or SIGTERM), `count` events or
/// `duration`. The stream is opened with the RPC deadline (retried on
/// UNAVAILABLE); an agent that ends it before then is a failure.
async fn watch(
    agent: &Agent,
    out: Output,
    rootlet: Option<pb::RootletRef>,
    count: Option<u64>,
    duration: Option<Duration>,
) -> Result<(), HostError> {
    if count == Some(0) {
        return Ok(());
    }
    let stop = interrupted();
    tokio::pin!(stop);
    let mut stream = agent
        .call("Watch", agent.rpc_timeout, |mut c, _| {
            let r = rootlet.clone();
            // No grpc-timeout: it would end the stream.
            async move { c.watch(pb::WatchRequest { rootlet: r }).await }
        })
        .await?;
    let end = duration.map(|d| tokio::time::Instant::now() + d);
    let mut seen = 0u64;
    // Bounded by `count`, `end`, Ctrl-C, or the agent ending the stream.
    loop {
        let next = async {
            match end {
                Some(end) => tokio::time::timeout_at(end, stream.message()).await.ok(),
                None => Some(stream.message().await),
            }
        };
        let msg = tokio::select! {
            m = next => m,
            () = &mut stop => return Ok(()),
        };
        match msg {
            // --duration passed.
            None => return Ok(()),
            Some(Ok(Some(e))) => {
                let v = EventView::of(&e);
                match out {
                    Output::Json => match serde_json::to_string(&v) {
                        Ok(s) => println!("{s}"),
                        Err(e) => eprintln!("rootletctl: cannot encode an event as JSON: {e}"),
                    },
                    Output::Text => print!("{}", v.line()),
                }
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
            Some(Ok(None)) => {
                return Err(HostError::Failed(format!(
                    "the agent ended the watch after {seen} events"
                )));
            }
            Some(Err(s)) => return Err(CallError::of("Watch", &s, 1).into()),
        }
    }
}

/// Keeps lease `lease_id` (of stage `stage`, `ttl` long) alive over the
/// KeepAlive stream, renewing it every third of its length, until Ctrl-C
/// or SIGTERM. A stream that breaks (the connection dropped) is opened
/// again while the lease has not expired; the lease is lost when the agent
/// refuses a renewal (it no longer has the lease: expired, or the stage
/// was unlinked) or no renewal succeeded before it expired: then this
/// returns the error that says so.
async fn hold_lease(
    agent: &Agent,
    lease_id: &str,
    stage: &str,
    ttl: Duration,
) -> Result<(), HostError> {
    let every = (ttl / 3).max(Duration::from_millis(200));
    eprintln!(
        "rootletctl: holding lease {lease_id} of stage {stage} ({}), renewed every {}; Ctrl-C stops renewing it (the agent then unlinks the stage when it expires)",
        Human(ttl),
        Human(every)
    );
    let stop = interrupted();
    tokio::pin!(stop);
    let lost = |why: String| {
        HostError::Failed(format!(
            "lease {lease_id} of stage {stage} lost: {why}; the agent unlinks the stage (or already did)"
        ))
    };
    // The lease is good until then, as far as we know.
    let mut good_until = Instant::now() + ttl;
    let mut last_problem = String::from("no renewal answered");
    // Bounded by `good_until` (every pass either renews it or waits for it
    // to pass) and Ctrl-C.
    loop {
        if Instant::now() >= good_until {
            return Err(lost(last_problem));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::RenewLeaseRequest>(4);
        let mut client = agent.client();
        let opened = tokio::select! {
            r = tokio::time::timeout(
                agent.rpc_timeout,
                client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)),
            ) => r,
            () = &mut stop => return stopped(lease_id, good_until),
        };
        let mut replies = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if transient(s.code()) => {
                last_problem = CallError::of("KeepAlive", &s, 1).to_string();
                if pause(&mut stop, Duration::from_millis(500)).await {
                    return stopped(lease_id, good_until);
                }
                continue;
            }
            Ok(Err(s)) => return Err(lost(CallError::of("KeepAlive", &s, 1).to_string())),
            Err(_) => {
                last_problem = format!("KeepAlive: no answer within {}", Human(agent.rpc_timeout));
                continue;
            }
        };
        // Renew on this stream until it breaks.
        loop {
            let sent_at = Instant::now();
            if tx
                .send(pb::RenewLeaseRequest {
                    lease_id: lease_id.to_string(),
                })
                .await
                .is_err()
            {
                last_problem = "the keep-alive stream closed".into();
                break;
            }
            let wait = good_until
                .saturating_duration_since(Instant::now())
                .min(agent.rpc_timeout);
            let reply = tokio::select! {
                r = tokio::time::timeout(wait, replies.message()) => r,
                () = &mut stop => return stopped(lease_id, good_until),
            };
            match reply {
                Ok(Ok(Some(_))) => good_until = sent_at + ttl,
                Ok(Ok(None)) => {
                    last_problem = "the agent closed the keep-alive stream".into();
                    break;
                }
                Ok(Err(s)) if transient(s.code()) => {
                    last_problem = CallError::of("KeepAlive", &s, 1).to_string();
                    break;
                }
                Ok(Err(s)) => return Err(lost(CallError::of("KeepAlive", &s, 1).to_string())),
                Err(_) => {
                    last_problem = "no renewal answered in time".into();
                    break;
                }
            }
            let next = tokio::time::sleep(every);
            tokio::select! {
                () = next => {}
                () = &mut stop => return stopped(lease_id, good_until),
            }
        }
        if pause(&mut stop, Duration::from_millis(200)).await {
            return stopped(lease_id, good_until);
        }
    }
}

/// The connection, not the agent, failed: the lease may still be good.
fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Sleeps `d`; true if `stop` fired first.
async fn pause<F: Future<Output = ()> + Unpin>(stop: &mut F, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = stop => true,
    }
}

fn stopped(lease_id: &str, good_until: Instant) -> Result<(), HostError> {
    eprintln!(
        "rootletctl: stopped renewing lease {lease_id}; it expires within {}",
        Human(good_until.saturating_duration_since(Instant::now()))
    );
    Ok(())
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootlet_refs() {
        let id = rootlet_ref("netns:4026531840/if:7").unwrap();
        assert_eq!(
            id.r#ref,
            Some(pb::rootlet_ref::Ref::Id("netns:4026531840/if:7".into()))
        );
        let i = rootlet_ref("rl0@/run/netns/edge").unwrap();
        assert_eq!(
            i.r#ref,
            Some(pb::rootlet_ref::Ref::Interface(pb::Interface {
                netns: "/run/netns/edge".into(),
                ifname: "rl0".into()
            }))
        );
        for bad in [
            "",
            "a/b",
            "rl0@edge",
            "averyveryverylongname",
            "@/run/netns/x",
        ] {
            assert!(
                matches!(rootlet_ref(bad), Err(HostError::Usage(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn leases_are_whole_seconds_up_to_a_day() {
        assert_eq!(lease_seconds(Duration::from_secs(30)).unwrap(), 30);
        assert!(lease_seconds(Duration::from_millis(1500)).is_err());
        assert!(lease_seconds(Duration::from_millis(500)).is_err());
        assert!(lease_seconds(MAX_LEASE + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn call_errors_carry_the_reason_and_violations() {
        use tonic_types::{ErrorDetails, StatusExt as _};
        let mut d = ErrorDetails::new();
        d.set_error_info(
            "ROOTLET_NOT_FOUND",
            "rootlet.v1",
            [("rootlet".to_string(), "netns:1/if:2".to_string())],
        );
        d.add_bad_request_violation("stage.program", "required");
        let s = Status::with_error_details(Code::NotFound, "no rootlet netns:1/if:2", d);
        let e = CallError::of("GetRootlet", &s, 1);
        let text = e.to_string();
        assert!(
            text.starts_with("GetRootlet: NOT_FOUND: no rootlet"),
            "{text}"
        );
        assert!(
            text.contains("reason ROOTLET_NOT_FOUND; rootlet=netns:1/if:2"),
            "{text}"
        );
        assert!(text.contains("stage.program: required"), "{text}");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], "NOT_FOUND");
        assert_eq!(v["reason"], "ROOTLET_NOT_FOUND");
    }

    #[test]
    fn tables_align() {
        let t = columns(&[
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["long".into(), "x".into(), "y".into()],
        ]);
        assert_eq!(t, "A     BB  C\nlong  x   y\n");
    }
}
