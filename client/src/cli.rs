//! The command line: clap definitions and one function per command.
//!
//! Exit codes: 0 success; 1 failed (a command that could not do its work,
//! or a rollout that could not complete nor roll back cleanly); 2 usage or
//! configuration errors (bad flags, files, selections); 3 a rollout that
//! stopped and rolled back (gate, deadline, unavailable hosts, abort; a
//! first install rolled back leaves the hosts without the bundle); 4 a
//! rollout that finished but skipped hosts (unreachable to the end).
//! `policy diff` answers like diff(1): 0 the same policy, 1 different, 2
//! trouble (a file that cannot be read or parsed). `host` commands exit 0,
//! 1 (the agent refused or could not be reached, a watch that ended early,
//! a lost lease) or 2 (usage): see [`crate::host`].

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    bundle_cmd,
    config::{Human, parse_duration},
    host,
    inventory::{Inventory, Selector},
    plan::Plan,
    policy_cmd, registry_cmd,
    rollout::{
        self, BundleFile, Outcome, RolloutError, Start, StartRequest, control,
        journal::{self, JournalFile, JournalLock},
        policy::PolicyFile,
        progress::Mode,
        summary::{self, RunStats},
    },
    status,
    transport::{Fleet, TransportOptions},
};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_ROLLED_BACK: i32 = 3;
/// A rollout that finished on every host that answered, but skipped some.
pub const EXIT_INCOMPLETE: i32 = 4;
/// Interrupted by a signal (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Longest `--watch`.
const MAX_WATCH: Duration = Duration::from_secs(7 * 86_400);

#[derive(Parser, Debug)]
#[command(
    name = "rootletctl",
    version,
    about = "Builds and signs Rootlet bundles and rolls them out to a fleet of rootletd agents",
    after_help = "Exit codes: 0 success, 1 failed, 2 usage or configuration error, 3 rolled back, 4 incomplete (hosts skipped); `rootletctl host`: 0, 1 or 2 (see `rootletctl host --help`)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build, sign, verify and inspect bundles; generate signing keys.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Build, sign, verify, inspect and compare policies (the contents of a
    /// stage's maps), and roll one out to the fleet.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Roll a bundle out to the fleet, and steer or undo a rollout (of a
    /// bundle, a removal or a policy).
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Read back hosts × rootlets from the agents: versions, last attempts,
    /// stages and program ids, counters, drift.
    Status(StatusArgs),
    /// Check a plan and show the steps it makes for N hosts.
    Plan {
        plan: PathBuf,
        /// Hosts to cut into steps.
        #[arg(long, default_value_t = 100)]
        hosts: usize,
    },
    /// Talk to one agent: capabilities, rootlets, stages, stats, events
    /// (one rootlet.v1 call per command; see `rootletctl host --help`).
    Host(HostArgs),
    /// Check an inventory and list the hosts a selector picks, in rollout
    /// order.
    Inventory {
        inventory: PathBuf,
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
    },
    /// Print a shell's completion script for rootletctl (bash: `rootletctl
    /// completions bash > /etc/bash_completion.d/rootletctl`).
    Completions { shell: clap_complete::Shell },
    /// Write rootletctl's manual pages (section 1: one for the command and
    /// one per subcommand) into DIR.
    Man { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum BundleCmd {
    /// Build a bundle from a manifest (and sign it with --key).
    Build {
        manifest: PathBuf,
        /// Output file (default: <name>-<version>.rlb).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Sign with this private key (repeatable).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        /// Accept this object although it is outside the manifest's
        /// directory (repeatable); any other such object is refused.
        #[arg(long = "allow-object")]
        allow_objects: Vec<PathBuf>,
    },
    /// Add signatures to a bundle.
    Sign {
        bundle: PathBuf,
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Output file (default: in place).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Check a bundle's objects and that a trusted key signed it.
    Verify {
        bundle: PathBuf,
        /// A trusted public key (repeatable).
        #[arg(long = "trusted", required = true)]
        trusted: Vec<PathBuf>,
    },
    /// Show what a bundle holds.
    Inspect { bundle: PathBuf },
    /// Remove a bundle from the fleet, by name, with the same plan, waves
    /// and gates as a rollout (rolled back, by applying each host's
    /// previous version again, if it stops).
    Remove(RemoveArgs),
    /// Publish a signed bundle to an OCI registry as a Rootlet artifact;
    /// prints the reference pinned by digest (registry/repo@sha256:…),
    /// the one a rollout names.
    Push {
        bundle: PathBuf,
        /// registry[:port]/repo[:tag]
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Fetch a bundle from an OCI registry; its manifest and layer digests
    /// are checked before anything is written.
    Pull {
        /// registry[:port]/repo[:tag|@sha256:…]
        reference: String,
        /// Where to write the signed bundle.
        #[arg(long, short)]
        out: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Generate an ed25519 key pair (PEM).
    Keygen {
        #[arg(long)]
        private: PathBuf,
        #[arg(long)]
        public: PathBuf,
    },
}

/// How to reach an OCI registry.
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// PEM CA certificate(s) that sign the registry's certificate
    /// (instead of the system roots).
    #[arg(long = "registry-ca", env = "ROOTLET_REGISTRY_CA")]
    pub ca: Option<PathBuf>,
    /// A file of one line, username:password, for basic auth.
    #[arg(long = "registry-credentials", env = "ROOTLET_REGISTRY_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Parse a policy (TOML or JSON), canonicalise it and write it as a
    /// policy file (signed with --key).
    Build {
        /// The policy source (`.toml` or `.json`).
        file: PathBuf,
        /// Output file (default: <stage>-<version>.rlp).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Sign with this private key (repeatable).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        /// Check every entry against the map types of this stage object
        /// (its BTF), as the agent will: an entry that does not fit is an
        /// error at its file:line:col.
        #[arg(long)]
        object: Option<PathBuf>,
    },
    /// Add signatures to a policy file.
    Sign {
        policy: PathBuf,
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Output file (default: in place).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Check that a trusted key signed a policy file.
    Verify {
        policy: PathBuf,
        /// A trusted public key (repeatable).
        #[arg(long = "trusted-key", visible_alias = "trusted", required = true)]
        trusted: Vec<PathBuf>,
    },
    /// Show what a policy (file or source) sets: stage, version, digest,
    /// maps with entry counts, signatures.
    Inspect {
        policy: PathBuf,
        /// List every entry too.
        #[arg(long)]
        entries: bool,
    },
    /// Compare two policies (files or sources), map by map and entry by
    /// key. Exit code 0: the same policy; 1: different; 2: trouble.
    Diff { old: PathBuf, new: PathBuf },
    /// Roll a signed policy out to the fleet with the same plan, canary,
    /// waves, soak, gates, journal and rollback as a bundle rollout; steer
    /// it with `rootletctl rollout pause|resume|promote|abort|undo|status`.
    Rollout(PolicyRolloutArgs),
}

#[derive(Args, Debug)]
pub struct PolicyRolloutArgs {
    /// The signed policy (`rootletctl policy build` and `policy sign`).
    pub policy: PathBuf,
    #[arg(long, short = 'i')]
    pub inventory: PathBuf,
    /// The plan (default: a canary of one host, then the rest; health and
    /// apply gates).
    #[arg(long, short = 'p')]
    pub plan: Option<PathBuf>,
    /// Label selector: `role=edge,zone!=c,canary` (all terms must hold).
    #[arg(long, short = 'l', default_value = "")]
    pub selector: String,
    /// Only the rootlet on this interface (default: every rootlet of the
    /// host whose pipeline has the policy's stage).
    #[arg(long)]
    pub interface: Option<String>,
    /// The network namespace of `--interface` (a path such as
    /// /run/netns/NAME; default: the agent's own).
    #[arg(long, requires = "interface")]
    pub netns: Option<String>,
    /// A signed policy for the same stage that rollback and undo apply to
    /// rootlets that had no policy before (for example the same maps with
    /// no entries); without it such rootlets keep the new policy when the
    /// rollout is rolled back, and are reported as not put back.
    #[arg(long)]
    pub empty_policy: Option<PathBuf>,
    #[command(flatten)]
    pub journal: JournalArg,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Args, Debug, Clone)]
pub struct JournalArg {
    /// The rollout journal.
    #[arg(long, short = 'j', default_value = "rollout-journal.json")]
    pub journal: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Start a rollout (or resume the unfinished one of the same bundle in
    /// the journal).
    Start(StartArgs),
    /// Continue a paused rollout; or, if no rootletctl is running it (it
    /// crashed or was interrupted), continue it here.
    Resume {
        #[command(flatten)]
        journal: JournalArg,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Ask the running rollout not to start another step.
    Pause {
        #[command(flatten)]
        journal: JournalArg,
    },
    /// End the current pause (timed or until promote) now.
    Promote {
        #[command(flatten)]
        journal: JournalArg,
    },
    /// Stop the rollout and roll back every host it changed.
    Abort {
        #[command(flatten)]
        journal: JournalArg,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Return every host a finished rollout changed to its previous version.
    Undo {
        #[command(flatten)]
        journal: JournalArg,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show where a rollout is, from its journal.
    Status {
        #[command(flatten)]
        journal: JournalArg,
        /// Show it again every second until the rollout ends.
        #[arg(long)]
        watch: bool,
        /// Stop watching after this long.
        #[arg(long, default_value = "1h", value_parser = duration_arg)]
        watch_timeout: Duration,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Args, Debug)]
pub struct StartArgs {
    #[arg(long, short = 'i')]
    pub inventory: PathBuf,
    #[arg(long, short = 'p')]
    pub plan: PathBuf,
    /// The signed bundle: a file (`rootletctl bundle build --key ...`), or
    /// an OCI reference pinned by digest (`registry/repo@sha256:…`, as
    /// `bundle push` prints it). A reference is pulled here once, to plan
    /// and check; hosts are sent the reference and pull it themselves.
    #[arg(long, short = 'b')]
    pub bundle: String,
    /// Label selector: `role=edge,zone!=c,canary` (all terms must hold).
    #[arg(long, short = 'l', default_value = "")]
    pub selector: String,
    #[command(flatten)]
    pub journal: JournalArg,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// How to reach the registry of a bundle named by reference.
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// The bundle's name (as in its manifest).
    pub name: String,
    #[arg(long, short = 'i')]
    pub inventory: PathBuf,
    #[arg(long, short = 'p')]
    pub plan: PathBuf,
    /// Label selector: `role=edge,zone!=c,canary` (all terms must hold).
    #[arg(long, short = 'l', default_value = "")]
    pub selector: String,
    #[command(flatten)]
    pub journal: JournalArg,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Args, Debug, Clone)]
pub struct TransportArgs {
    /// Hosts in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Deadline of one call.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    pub rpc_timeout: Duration,
    /// Deadline of one ApplyBundle call.
    #[arg(long, default_value = "60s", value_parser = duration_arg)]
    pub apply_timeout: Duration,
    /// Deadline of one host's calls in one phase, retries included.
    #[arg(long, default_value = "2m", value_parser = duration_arg)]
    pub host_deadline: Duration,
    /// Retries of a call answered UNAVAILABLE.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
}

impl TransportArgs {
    pub fn options(&self) -> TransportOptions {
        TransportOptions {
            concurrency: self.concurrency.max(1),
            rpc_timeout: self.rpc_timeout,
            apply_timeout: self.apply_timeout,
            host_deadline: self.host_deadline,
            retries: self.retries.min(20),
            ..TransportOptions::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, short = 'i')]
    pub inventory: PathBuf,
    #[arg(long, short = 'l', default_value = "")]
    pub selector: String,
    /// A version (or digest) every rootlet should run; others show as drift.
    #[arg(long)]
    pub expect: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Follow each host's Watch stream and show the fleet again when a
    /// host changes (until --watch-timeout or Ctrl-C); one JSON array per
    /// update with --output json. Counters are as of the host's last change.
    #[arg(long)]
    pub watch: bool,
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    pub watch_timeout: Duration,
    #[command(flatten)]
    pub transport: TransportArgs,
}

/// `rootletctl host TARGET COMMAND`: one agent, one call per command.
#[derive(Args, Debug)]
#[command(
    after_help = "TARGET is a host name of --inventory FILE, or without --inventory an address: \
unix:/run/rootletd.sock, or host:port with --ca/--cert/--key (mTLS) or --insecure.\n\
ROOTLET is a rootlet id (netns:<inode>/if:<ifindex>), an interface name in the agent's own \
network namespace (rl0), or IFNAME@NETNS_FILE (rl0@/run/netns/edge).\n\
Exit codes: 0 success; 1 failed (the agent answered with an error, printed as its gRPC code, \
message and google.rpc ErrorInfo reason; the agent could not be reached; a watch stream that \
ended early; a held lease that was lost); 2 usage or configuration error (flags, inventory, \
target, object file)."
)]
pub struct HostArgs {
    /// An inventory host name (with --inventory), or an agent address.
    pub target: String,
    #[command(subcommand)]
    pub command: HostCmd,
    /// The inventory TARGET is a host of.
    #[arg(long, short = 'i', global = true)]
    pub inventory: Option<PathBuf>,
    /// mTLS to a TCP address: the CA that signed the agent's certificate.
    #[arg(long, global = true, conflicts_with = "inventory", requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// mTLS: the client certificate (PEM).
    #[arg(long, global = true, conflicts_with = "inventory", requires_all = ["ca", "key"])]
    pub cert: Option<PathBuf>,
    /// mTLS: the client key (PEM).
    #[arg(long, global = true, conflicts_with = "inventory", requires_all = ["ca", "cert"])]
    pub key: Option<PathBuf>,
    /// mTLS: the name the agent's certificate must carry (default: the
    /// address's host part).
    #[arg(long, global = true, conflicts_with = "inventory", requires = "ca")]
    pub server_name: Option<String>,
    /// Plain TCP without TLS (labs only).
    #[arg(long, global = true, conflicts_with_all = ["inventory", "ca"])]
    pub insecure: bool,
    /// Deadline of a read (caps, list, get, stats) and of opening a stream.
    #[arg(long, global = true, default_value = "10s", value_parser = duration_arg)]
    pub rpc_timeout: Duration,
    /// Deadline of a change (load, unload, link, replace, unlink, pin,
    /// unpin, rollback): the agent may load and verify programs.
    #[arg(long, global = true, default_value = "60s", value_parser = duration_arg)]
    pub change_timeout: Duration,
    /// Retries of a call answered UNAVAILABLE (a change is retried with
    /// the same idempotency key, so it runs at most once).
    #[arg(long, global = true, default_value_t = 3)]
    pub retries: u32,
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// What the kernel permits, and the backend new rootlets get
    /// (GetCapabilities).
    Caps,
    /// The rootlets the agent manages (ListRootlets).
    List,
    /// One rootlet: its stages, programs, pins, leases, counters
    /// (GetRootlet).
    Get { rootlet: String },
    /// Load a rootlet on an interface (LoadRootlet; the admin role). The
    /// backend is the agent's (`host TARGET caps`); the pipeline's slots
    /// are the agent's too.
    Load {
        /// IFNAME, or IFNAME@NETNS_FILE.
        interface: String,
        /// The network namespace of the interface (a netns file such as
        /// /run/netns/NAME; default: the agent's own).
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
        mode: XdpModeArg,
        /// The verdict of a packet every stage proceeded on.
        #[arg(long, value_enum, default_value_t = VerdictArg::Pass)]
        final_verdict: VerdictArg,
        /// The idempotency key (default: a random one per command, reused
        /// by its retries).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Unload a rootlet and every stage on it (UnloadRootlet; the admin
    /// role).
    Unload {
        rootlet: String,
        /// The idempotency key (default: a random one per command, reused
        /// by its retries).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Link a stage from an ELF object file (LinkStage). The caller's
    /// identity becomes the stage's owner; the agent picks the slot from
    /// the priority. With --lease D the stage is linked with a lease
    /// instead of a pin, and with --hold rootletctl keeps the lease alive
    /// over the KeepAlive stream for as long as it runs (until Ctrl-C or
    /// SIGTERM; the agent then unlinks the stage when the lease expires);
    /// if the lease is lost, it exits 1 saying so.
    Link {
        rootlet: String,
        stage: String,
        object: PathBuf,
        #[command(flatten)]
        stage_args: StageArgs,
        /// Link with a lease of this long (whole seconds, 1s..24h) instead
        /// of a pin: the agent unlinks the stage when nobody renews it.
        #[arg(long, value_parser = duration_arg)]
        lease: Option<Duration>,
        /// Keep the lease alive while this command runs (needs --lease).
        #[arg(long, requires = "lease")]
        hold: bool,
        /// Do not pin the stage's link: it lives as long as the agent
        /// process (ignored with --lease).
        #[arg(long)]
        no_pin: bool,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Replace a linked stage's object atomically (ReplaceStage).
    Replace {
        rootlet: String,
        stage: String,
        object: PathBuf,
        #[command(flatten)]
        stage_args: StageArgs,
        /// Keep the replaced stage's maps (their definitions must match).
        #[arg(long)]
        keep_maps: bool,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Unlink a stage (UnlinkStage).
    Unlink {
        rootlet: String,
        stage: String,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Pin a stage's link so that it outlives the agent (SetStagePin).
    Pin {
        rootlet: String,
        stage: String,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Unpin a stage's link: it lives as long as the agent process
    /// (SetStagePin).
    Unpin {
        rootlet: String,
        stage: String,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Return a rootlet to its previous generation, as a new generation
    /// (RollbackRootlet): instant with the tail-call backend (one write,
    /// nothing loaded); the answer says how. Needs the rights to change
    /// every stage the two generations differ in, none of them a bundle's
    /// (a bundle goes back with its own rollback). Not a bundle rollback.
    Rollback {
        rootlet: String,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Per-slot, per-action packet counters (GetStats).
    Stats { rootlet: String },
    /// Print state changes as they happen, after a snapshot of every
    /// rootlet (Watch), until Ctrl-C, --count events or --duration.
    Watch {
        /// Only this rootlet (default: every rootlet).
        rootlet: Option<String>,
        /// Stop after this many events (the snapshot's included).
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long.
        #[arg(long, value_parser = duration_arg)]
        duration: Option<Duration>,
    },
}

/// What a stage runs and where it goes in the pipeline.
#[derive(Args, Debug, Clone)]
pub struct StageArgs {
    /// The program (function) of the object to run.
    #[arg(long)]
    pub program: String,
    /// Lower runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// A verdict that goes on to the next stage (repeatable; default: pass).
    #[arg(long = "proceed-on", value_enum)]
    pub proceed_on: Vec<VerdictArg>,
}

/// Preconditions and idempotency of a change.
#[derive(Args, Debug, Clone)]
pub struct ChangeArgs {
    /// Change only if the rootlet is at this generation
    /// (FAILED_PRECONDITION otherwise).
    #[arg(long)]
    pub expected_generation: Option<u64>,
    /// The idempotency key (default: a random one per command, reused by
    /// its retries).
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpModeArg {
    Auto,
    Driver,
    Generic,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictArg {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_WATCH {
        return Err("longer than 7 days".into());
    }
    Ok(d)
}

/// Parses `std::env::args` and runs; returns the exit code.
pub fn main() -> i32 {
    run_from(std::env::args_os())
}

/// Parses `args` (the program name first) and runs; returns the exit code.
pub fn run_from<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rootletctl: cannot start the async runtime: {e}");
            return EXIT_FAILED;
        }
    };
    rt.block_on(run(cli))
}

fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("rootletctl: {msg}");
    code
}

/// Runs one command; returns the exit code.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Bundle(BundleCmd::Remove(a)) => remove(a).await,
        Command::Bundle(BundleCmd::Push {
            bundle,
            reference,
            registry,
        }) => registry_result(registry_cmd::push(&bundle, &reference, &registry).await),
        Command::Bundle(BundleCmd::Pull {
            reference,
            out,
            registry,
        }) => registry_result(registry_cmd::pull(&reference, &out, &registry).await),
        Command::Bundle(b) => bundle(b),
        Command::Policy(PolicyCmd::Rollout(a)) => policy_rollout(a).await,
        Command::Policy(p) => policy(p),
        Command::Rollout(r) => rollout_cmd(r).await,
        Command::Status(s) => status_cmd(s).await,
        Command::Host(h) => host::run(h).await,
        Command::Plan { plan, hosts } => match Plan::load(&plan) {
            Ok(p) => {
                print!("{}", describe_plan(&p, hosts));
                EXIT_OK
            }
            Err(e) => fail(EXIT_USAGE, e),
        },
        Command::Completions { shell } => {
            crate::generate::completions(shell, &mut std::io::stdout());
            EXIT_OK
        }
        Command::Man { dir } => match crate::generate::man_pages(&dir) {
            Ok(pages) => {
                for p in pages {
                    println!("{}", p.display());
                }
                EXIT_OK
            }
            Err(e) => fail(EXIT_FAILED, format!("{}: {e}", dir.display())),
        },
        Command::Inventory {
            inventory,
            selector,
        } => {
            let sel = match Selector::parse(&selector) {
                Ok(s) => s,
                Err(e) => return fail(EXIT_USAGE, e),
            };
            match Inventory::load(&inventory) {
                Ok(inv) => {
                    let hosts = inv.select(&sel);
                    for h in &hosts {
                        let labels: Vec<String> =
                            h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        let sec = match &h.security {
                            crate::inventory::Security::Tls(_) => "mtls",
                            crate::inventory::Security::Insecure => "insecure",
                            crate::inventory::Security::Local => "local",
                        };
                        println!("{}\t{}\t{sec}\t{}", h.name, h.address, labels.join(","));
                    }
                    println!(
                        "{} of {} hosts selected ({sel})",
                        hosts.len(),
                        inv.hosts.len()
                    );
                    EXIT_OK
                }
                Err(e) => fail(EXIT_USAGE, e),
            }
        }
    }
}

/// The steps of `plan` for `hosts` hosts, for `rootletctl plan`.
pub fn describe_plan(p: &Plan, hosts: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "soak {}, progress deadline {}, max unavailable {} of {hosts}, pause timeout {}",
        Human(p.soak),
        Human(p.progress_deadline),
        p.max_unavailable.of(hosts),
        Human(p.pause_timeout)
    );
    for s in p.steps(hosts) {
        let _ = writeln!(
            out,
            "  {:<9} {:>6} host{} (#{}..#{}){}",
            s.kind.to_string(),
            s.count,
            if s.count == 1 { "" } else { "s" },
            s.first,
            s.first + s.count.saturating_sub(1),
            s.pause.map(|p| format!(", then {p}")).unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "gates: health {}, apply {}, {} counter gate{}",
        p.gates.health,
        p.gates.apply,
        p.gates.counters.len(),
        if p.gates.counters.len() == 1 { "" } else { "s" }
    );
    for g in &p.gates.counters {
        let _ = writeln!(
            out,
            "  stage {} {} <= {} over {} (min {} packets){}",
            g.stage,
            g.metric,
            g.max,
            Human(g.window),
            g.min_packets,
            if g.dry_run { " [dry run]" } else { "" }
        );
    }
    out
}

fn bundle(cmd: BundleCmd) -> i32 {
    let r = match cmd {
        BundleCmd::Build {
            manifest,
            out,
            keys,
            allow_objects,
        } => bundle_cmd::build(&manifest, out.as_deref(), &keys, &allow_objects).map(|(_, r)| r),
        BundleCmd::Sign { bundle, keys, out } => bundle_cmd::sign(&bundle, &keys, out.as_deref()),
        BundleCmd::Verify { bundle, trusted } => bundle_cmd::verify(&bundle, &trusted),
        BundleCmd::Inspect { bundle } => bundle_cmd::inspect(&bundle),
        BundleCmd::Keygen { private, public } => bundle_cmd::keygen(&private, &public),
        BundleCmd::Remove(_) | BundleCmd::Push { .. } | BundleCmd::Pull { .. } => {
            return fail(
                EXIT_FAILED,
                "bundle remove, push and pull run asynchronously",
            );
        }
    };
    match r {
        Ok(text) => {
            print!("{text}");
            EXIT_OK
        }
        Err(e) => {
            use rootlet_bundle::BundleError as B;
            let code = match e {
                B::Manifest(_)
                | B::MissingObject { .. }
                | B::NotElf { .. }
                | B::DigestMismatch { .. }
                | B::PolicyOverlap { .. }
                | B::Key { .. } => EXIT_USAGE,
                // A policy file the manifest names, as `policy build` says.
                B::Policy(e) => {
                    let e = policy_cmd::PolicyCmdError::from(e);
                    return fail(
                        if e.is_usage() {
                            EXIT_USAGE
                        } else {
                            EXIT_FAILED
                        },
                        e,
                    );
                }
                _ => EXIT_FAILED,
            };
            fail(code, e)
        }
    }
}

fn registry_result(r: Result<String, registry_cmd::RegistryCmdError>) -> i32 {
    printed(r, registry_cmd::RegistryCmdError::is_usage)
}

/// Prints a command's text (exit 0), or its error: exit 2 where `usage`
/// says the invocation was wrong, else 1.
fn printed<E: std::fmt::Display>(r: Result<String, E>, usage: fn(&E) -> bool) -> i32 {
    match r {
        Ok(text) => {
            print!("{text}");
            EXIT_OK
        }
        Err(e) if usage(&e) => fail(EXIT_USAGE, e),
        Err(e) => fail(EXIT_FAILED, e),
    }
}

fn policy(cmd: PolicyCmd) -> i32 {
    let r = match cmd {
        PolicyCmd::Build {
            file,
            out,
            keys,
            object,
        } => policy_cmd::build(&file, out.as_deref(), &keys, object.as_deref()).map(|(_, r)| r),
        PolicyCmd::Sign { policy, keys, out } => policy_cmd::sign(&policy, &keys, out.as_deref()),
        PolicyCmd::Verify { policy, trusted } => policy_cmd::verify(&policy, &trusted),
        PolicyCmd::Inspect { policy, entries } => policy_cmd::inspect(&policy, entries),
        PolicyCmd::Rollout(_) => {
            return fail(EXIT_FAILED, "policy rollout runs as a rollout");
        }
        PolicyCmd::Diff { old, new } => {
            return match policy_cmd::diff(&old, &new) {
                Ok((text, same)) => {
                    print!("{text}");
                    if same { EXIT_OK } else { EXIT_FAILED }
                }
                Err(e) => fail(EXIT_USAGE, e),
            };
        }
    };
    printed(r, policy_cmd::PolicyCmdError::is_usage)
}

fn mode(output: Output) -> Mode {
    match output {
        Output::Json => Mode::Quiet,
        Output::Text => Mode::detect(),
    }
}

fn rollout_error(e: RolloutError) -> i32 {
    let code = match &e {
        RolloutError::Usage(_) | RolloutError::Bundle { .. } => EXIT_USAGE,
        RolloutError::Journal(journal::JournalError::Busy { .. }) => EXIT_USAGE,
        RolloutError::Journal(journal::JournalError::Corrupt { .. }) => EXIT_USAGE,
        RolloutError::Journal(_) => EXIT_FAILED,
    };
    fail(code, e)
}

/// Prints the end of a rollout and returns its exit code.
fn report(jf: &JournalFile, outcome: Outcome, output: Output, run: RunStats) -> i32 {
    let code = outcome.exit_code();
    match output {
        Output::Json => {
            if let Err(e) = summary::Summary::of(&jf.journal, Some(run), Some(code))
                .write(std::io::stdout().lock(), true)
            {
                eprintln!("rootletctl: cannot write the summary: {e}");
            }
        }
        Output::Text => print!("{}", summary::human(&jf.journal, Some(run))),
    }
    code
}

/// Reports a rollout run to its end (a take-over or an undo) that started at `t0`.
fn finished(
    result: Result<(Outcome, JournalFile, u64), RolloutError>,
    output: Output,
    t0: Instant,
) -> i32 {
    match result {
        Ok((outcome, jf, rpcs)) => report(
            &jf,
            outcome,
            output,
            RunStats {
                wall: t0.elapsed(),
                rpcs,
            },
        ),
        Err(e) => rollout_error(e),
    }
}

/// Runs an engine to its end, or until Ctrl-C.
async fn drive(engine: rollout::Engine, output: Output, t0: Instant) -> i32 {
    let path = engine.jf.path.clone();
    let rpcs = RpcCounter::of(&engine);
    tokio::select! {
        r = engine.run() => match r {
            Ok((outcome, jf)) => report(&jf, outcome, output, RunStats { wall: t0.elapsed(), rpcs: rpcs.get() }),
            Err(e) => fail(EXIT_FAILED, format!("the journal could not be written: {e}")),
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!(
                "rootletctl: interrupted; `rootletctl rollout resume --journal {}` continues the rollout from its journal",
                path.display()
            );
            EXIT_INTERRUPTED
        }
    }
}

/// A handle on the engine's RPC count that outlives the engine.
struct RpcCounter(Arc<Fleet>);

impl RpcCounter {
    fn of(engine: &rollout::Engine) -> RpcCounter {
        RpcCounter(engine.fleet_arc())
    }

    fn get(&self) -> u64 {
        self.0.rpcs()
    }
}

async fn rollout_cmd(cmd: RolloutCmd) -> i32 {
    match cmd {
        RolloutCmd::Start(a) => start(a).await,
        RolloutCmd::Resume { journal, output } => {
            let path = journal.journal;
            if JournalLock::is_held(&path) {
                return match control::request(&path, control::Request::Resume) {
                    Ok(_) => {
                        println!(
                            "resume requested; the running rootletctl continues within a second"
                        );
                        EXIT_OK
                    }
                    Err(e) => fail(EXIT_FAILED, e),
                };
            }
            if let Err(e) = control::request(&path, control::Request::Resume) {
                return fail(EXIT_FAILED, e);
            }
            let t0 = Instant::now();
            match take_over_engine(&path, output) {
                Ok((lock, engine)) => {
                    let code = drive(engine, output, t0).await;
                    drop(lock);
                    code
                }
                Err(code) => code,
            }
        }
        RolloutCmd::Pause { journal } => operator(&journal.journal, control::Request::Pause),
        RolloutCmd::Promote { journal } => operator(&journal.journal, control::Request::Promote),
        RolloutCmd::Abort { journal, output } => {
            let path = journal.journal;
            if JournalLock::is_held(&path) {
                return operator(&path, control::Request::Abort);
            }
            let j = match journal::read(&path) {
                Ok(j) => j,
                Err(e) => return fail(EXIT_USAGE, e),
            };
            if j.state.is_final() {
                println!(
                    "rollout {} already ended ({}); `rollout undo` returns the hosts it changed",
                    j.rollout_id,
                    j.state.name()
                );
                return EXIT_OK;
            }
            let t0 = Instant::now();
            finished(
                rollout::take_over(&path, mode(output), true).await,
                output,
                t0,
            )
        }
        RolloutCmd::Undo { journal, output } => {
            let t0 = Instant::now();
            finished(
                rollout::undo(&journal.journal, mode(output)).await,
                output,
                t0,
            )
        }
        RolloutCmd::Status {
            journal,
            watch,
            watch_timeout,
            output,
        } => rollout_status(&journal.journal, watch, watch_timeout, output).await,
    }
}

/// Takes over a rollout nobody runs: its lock, and an engine to continue
/// it.
fn take_over_engine(path: &Path, output: Output) -> Result<(JournalLock, rollout::Engine), i32> {
    let lock = JournalLock::acquire(path).map_err(|e| rollout_error(e.into()))?;
    let j = journal::read(path).map_err(|e| fail(EXIT_USAGE, e))?;
    if !j.state.is_resumable() {
        println!(
            "rollout {} already ended ({})",
            j.rollout_id,
            j.state.name()
        );
        return Err(Outcome::of(j.state).map_or(EXIT_OK, Outcome::exit_code));
    }
    let bundle = match rollout::bundle_of(&j) {
        Ok(b) => b,
        Err(e) => return Err(fail(EXIT_USAGE, e)),
    };
    let engine = rollout::engine_for(path, j, bundle, mode(output)).map_err(rollout_error)?;
    Ok((lock, engine))
}

fn operator(path: &Path, req: control::Request) -> i32 {
    let j = match journal::read(path) {
        Ok(j) => j,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if j.state.is_final() {
        return fail(
            EXIT_USAGE,
            format!(
                "rollout {} already ended ({})",
                j.rollout_id,
                j.state.name()
            ),
        );
    }
    if let Err(e) = control::request(path, req) {
        return fail(EXIT_FAILED, e);
    }
    let running = JournalLock::is_held(path);
    let what = match req {
        control::Request::Pause => "pause",
        control::Request::Resume => "resume",
        control::Request::Promote => "promote",
        control::Request::Abort => "abort",
    };
    if running {
        println!(
            "{what} requested for rollout {}; the running rootletctl acts on it within a second",
            j.rollout_id
        );
        if req == control::Request::Promote && j.state != journal::RolloutState::WaitingForPromote {
            println!(
                "(the rollout is {} now: this promote ends its next pause)",
                j.state.name()
            );
        }
    } else {
        println!(
            "{what} recorded for rollout {}, but no rootletctl is running it; `rootletctl rollout resume --journal {}` continues it",
            j.rollout_id,
            path.display()
        );
    }
    EXIT_OK
}

async fn start(a: StartArgs) -> i32 {
    let t0 = Instant::now();
    let (hosts, plan) = match hosts_and_plan(&a.selector, &a.inventory, Some(&a.plan)) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let bundle = if rootlet_oci::BundleRef::looks_like_reference(&a.bundle) {
        match registry_cmd::fetch(&a.bundle, &a.registry).await {
            Ok(bytes) => BundleFile::pulled(a.bundle.clone(), bytes),
            Err(e) => {
                let code = if e.is_usage() {
                    EXIT_USAGE
                } else {
                    EXIT_FAILED
                };
                return fail(code, e);
            }
        }
    } else {
        BundleFile::read(std::path::Path::new(&a.bundle))
    };
    let bundle = match bundle {
        Ok(b) => b,
        Err(e) => return rollout_error(e),
    };
    if bundle.signed.signatures.is_empty() {
        eprintln!(
            "rootletctl: warning: {} is unsigned; agents refuse it unless they allow unsigned bundles",
            a.bundle
        );
    }
    let path = a.journal.journal.clone();
    let lock = match JournalLock::acquire(&path) {
        Ok(l) => l,
        Err(e) => return rollout_error(e.into()),
    };
    let req = StartRequest {
        hosts,
        selector: a.selector.trim().to_string(),
        plan,
        bundle,
        journal: path.clone(),
        transport: a.transport.options(),
    };
    let (j, resumed) = match rollout::plan_start(&req) {
        Ok(Start::New(j)) => {
            if let Err(e) = control::reset(&path) {
                return fail(EXIT_FAILED, e);
            }
            (j, false)
        }
        Ok(Start::Resume(j)) => (j, true),
        Err(e) => return rollout_error(e),
    };
    let m = mode(a.output);
    if m != Mode::Quiet {
        if resumed {
            println!(
                "resuming rollout {} from {} ({}, {} of {} steps done)",
                j.rollout_id,
                path.display(),
                j.state.name(),
                j.steps_done,
                j.steps.len()
            );
        } else {
            println!(
                "rollout {}: {} {} to {} hosts in {} steps; journal {}",
                j.rollout_id,
                j.bundle.name,
                j.bundle.version,
                j.hosts.len(),
                j.steps.len(),
                path.display()
            );
        }
    }
    // A bundle named by reference is never uploaded: hosts pull it.
    let bytes = req
        .bundle
        .reference
        .is_none()
        .then(|| req.bundle.bytes.clone());
    let engine = match rollout::engine_for(&path, j, bytes, m) {
        Ok(e) => e,
        Err(e) => return rollout_error(e),
    };
    let code = drive(engine, a.output, t0).await;
    drop(lock);
    code
}

/// The hosts `selector` picks from the inventory, and the plan (None: the
/// default plan); a usage error (exit code) if any of them is wrong or
/// nothing is picked.
fn hosts_and_plan(
    selector: &str,
    inventory: &std::path::Path,
    plan: Option<&std::path::Path>,
) -> Result<(Vec<crate::inventory::Host>, Plan), i32> {
    let selector = Selector::parse(selector).map_err(|e| fail(EXIT_USAGE, e))?;
    let inv = Inventory::load(inventory).map_err(|e| fail(EXIT_USAGE, e))?;
    let plan = match plan {
        Some(p) => Plan::load(p).map_err(|e| fail(EXIT_USAGE, e))?,
        None => Plan::default(),
    };
    let hosts = inv.select(&selector);
    if hosts.is_empty() {
        return Err(fail(
            EXIT_USAGE,
            format!(
                "the selector {selector} matches none of the {} hosts of {}",
                inv.hosts.len(),
                inventory.display()
            ),
        ));
    }
    Ok((hosts, plan))
}

/// `policy rollout`: a rollout whose push is ApplyPolicy, through the same
/// engine (plan, waves, gates, journal, rollback, operator commands).
async fn policy_rollout(a: PolicyRolloutArgs) -> i32 {
    let t0 = Instant::now();
    let (hosts, plan) = match hosts_and_plan(&a.selector, &a.inventory, a.plan.as_deref()) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let policy = match PolicyFile::read(&a.policy) {
        Ok(p) => p,
        Err(e) => return rollout_error(e),
    };
    let empty = match a.empty_policy.as_deref().map(PolicyFile::read).transpose() {
        Ok(e) => e,
        Err(e) => return rollout_error(e),
    };
    let interface = a
        .interface
        .map(|ifname| (a.netns.unwrap_or_default(), ifname));
    let path = a.journal.journal.clone();
    let lock = match JournalLock::acquire(&path) {
        Ok(l) => l,
        Err(e) => return rollout_error(e.into()),
    };
    let req = rollout::PolicyRequest {
        hosts,
        selector: a.selector.trim().to_string(),
        plan,
        policy,
        interface,
        empty,
        journal: path.clone(),
        transport: a.transport.options(),
    };
    let (j, resumed) = match rollout::plan_policy(&req) {
        Ok(Start::New(j)) => {
            if let Err(e) = control::reset(&path) {
                return fail(EXIT_FAILED, e);
            }
            (j, false)
        }
        Ok(Start::Resume(j)) => (j, true),
        Err(e) => return rollout_error(e),
    };
    let m = mode(a.output);
    if m != Mode::Quiet {
        if resumed {
            println!(
                "resuming policy rollout {} from {} ({}, {} of {} steps done)",
                j.rollout_id,
                path.display(),
                j.state.name(),
                j.steps_done,
                j.steps.len()
            );
        } else {
            println!(
                "policy rollout {}: stage {} policy {} to {} hosts in {} steps; journal {}",
                j.rollout_id,
                j.bundle.name,
                j.bundle.version,
                j.hosts.len(),
                j.steps.len(),
                path.display()
            );
        }
    }
    let engine = match rollout::engine_for(&path, j, Some(req.policy.bytes.clone()), m) {
        Ok(e) => e,
        Err(e) => return rollout_error(e),
    };
    let code = drive(engine, a.output, t0).await;
    drop(lock);
    code
}

/// `bundle remove`: a rollout whose push is RemoveBundle, through the same
/// engine (plan, waves, gates, journal, rollback, operator commands).
async fn remove(a: RemoveArgs) -> i32 {
    let t0 = Instant::now();
    let (hosts, plan) = match hosts_and_plan(&a.selector, &a.inventory, Some(&a.plan)) {
        Ok(t) => t,
        Err(code) => return code,
    };
    if a.name.trim().is_empty() {
        return fail(EXIT_USAGE, "the bundle name is empty");
    }
    let path = a.journal.journal.clone();
    let lock = match JournalLock::acquire(&path) {
        Ok(l) => l,
        Err(e) => return rollout_error(e.into()),
    };
    let req = rollout::RemoveRequest {
        hosts,
        selector: a.selector.trim().to_string(),
        plan,
        name: a.name.trim().to_string(),
        journal: path.clone(),
        transport: a.transport.options(),
    };
    let j = match rollout::plan_remove(&req) {
        Ok(Start::New(j)) => {
            if let Err(e) = control::reset(&path) {
                return fail(EXIT_FAILED, e);
            }
            j
        }
        Ok(Start::Resume(j)) => j,
        Err(e) => return rollout_error(e),
    };
    let m = mode(a.output);
    if m != Mode::Quiet {
        println!(
            "removal {}: bundle {} from {} hosts in {} steps; journal {}",
            j.rollout_id,
            j.bundle.name,
            j.hosts.len(),
            j.steps.len(),
            path.display()
        );
    }
    let engine = match rollout::engine_for(&path, j, None, m) {
        Ok(e) => e,
        Err(e) => return rollout_error(e),
    };
    let code = drive(engine, a.output, t0).await;
    drop(lock);
    code
}

async fn rollout_status(path: &Path, watch: bool, timeout: Duration, output: Output) -> i32 {
    let t0 = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // Bounded by `timeout`.
    loop {
        let j = match journal::read(path) {
            Ok(j) => j,
            Err(e) => return fail(EXIT_USAGE, e),
        };
        let running = JournalLock::is_held(path);
        match output {
            Output::Json => {
                let control = serde_json::to_value(control::read(path)).unwrap_or_default();
                if let Err(e) =
                    summary::Summary::of(&j, None, Outcome::of(j.state).map(Outcome::exit_code))
                        .with_status(running, control)
                        .write(std::io::stdout().lock(), false)
                {
                    eprintln!("rootletctl: cannot write the status: {e}");
                }
            }
            Output::Text => {
                if watch && tty {
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", summary::status_table(&j));
                if j.state == journal::RolloutState::Incomplete {
                    println!(
                        "hosts were skipped: `rootletctl rollout resume --journal {}` tries them again",
                        path.display()
                    );
                } else if !j.state.is_final() {
                    println!(
                        "{}",
                        if running {
                            "a rootletctl is running this rollout"
                        } else {
                            "no rootletctl is running this rollout: `rollout resume` continues it"
                        }
                    );
                }
            }
        }
        if !watch || j.state.is_final() || t0.elapsed() >= timeout {
            return Outcome::of(j.state).map_or(EXIT_OK, Outcome::exit_code);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn status_cmd(a: StatusArgs) -> i32 {
    let selector = match Selector::parse(&a.selector) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let inv = match Inventory::load(&a.inventory) {
        Ok(i) => i,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let hosts = inv.select(&selector);
    if hosts.is_empty() {
        return fail(
            EXIT_USAGE,
            format!("the selector {selector} matches no host"),
        );
    }
    let fleet = Fleet::new(hosts, a.transport.options());
    let print =
        |hosts: &[status::HostStatus], updates: &[status::Update], clear: bool| match a.output {
            Output::Json => println!("{}", serde_json::to_string(&hosts).unwrap_or_default()),
            Output::Text => {
                if clear {
                    print!("\x1b[2J\x1b[H");
                }
                if !updates.is_empty() {
                    let said: Vec<String> = updates
                        .iter()
                        .map(|u| format!("{}: {}", u.host, u.cause))
                        .collect();
                    println!("-- {}", said.join(", "));
                }
                print!("{}", status::table(hosts));
            }
        };
    let bad = |hosts: &[status::HostStatus]| {
        if hosts.iter().any(|h| h.error.is_some() || h.has_drift()) {
            EXIT_FAILED
        } else {
            EXIT_OK
        }
    };
    if !a.watch {
        let hosts = status::read(&fleet, a.expect.as_deref()).await;
        print(&hosts, &[], false);
        return bad(&hosts);
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let until = tokio::time::Instant::now() + a.watch_timeout;
    let last = std::cell::Cell::new(EXIT_OK);
    let watched = status::follow(&fleet, a.expect.as_deref(), until, |hosts, updates| {
        print(hosts, updates, tty);
        last.set(bad(hosts));
    });
    tokio::select! {
        hosts = watched => bad(&hosts),
        // Ctrl-C or SIGTERM ends a watch as --watch-timeout does: the exit
        // code is the last state shown's.
        () = crate::host::interrupted() => last.get(),
    }
}
