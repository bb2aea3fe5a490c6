//! `rootletd.toml`: what the daemon listens on, its TLS identity, who may do
//! what, and where the data plane keeps its state. Every field has a default,
//! so an empty file gives a daemon for local use (the Unix socket only).
//!
//! [`Config::load`] reports a syntax or type error as `file:line:col: field:
//! message`; [`Config::validate`] checks what parsing cannot (files exist and
//! parse, TLS is configured where it is needed, roles are consistent) and is
//! what `rootletd --check-config` runs.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, Serialize};

pub use rootlet_agent::{AuthzConfig, IdentityConfig, Role};
use rootlet_dataplane::{self as dataplane, spec::BackendChoice};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    /// Required when `listen.tcp` is set, unless `listen.insecure_tcp`.
    pub tls: Option<TlsConfig>,
    pub metrics: MetricsConfig,
    pub health: HealthConfig,
    pub log: LogConfig,
    pub dataplane: DataplaneConfig,
    pub bundles: BundlesConfig,
    pub limits: LimitsConfig,
    pub authz: AuthzConfig,
    /// `[[registry]]`: the OCI registries this agent may pull bundles
    /// from (ApplyBundle by reference). None by default: a reference is
    /// refused (FAILED_PRECONDITION, REGISTRY_NOT_ALLOWED).
    pub registry: Vec<RegistryConfig>,
}

/// `[[registry]]`: one OCI registry the agent may pull bundles from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `host[:port]`, exactly as references name it
    /// (`host[:port]/repo@sha256:…`).
    pub host: String,
    /// PEM CA certificate(s) to trust for this registry instead of the
    /// system roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// A file of one line `username:password` (mode 0600): basic auth.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Bound on connecting and on each read from the registry.
    #[serde(default = "default_registry_timeout")]
    pub timeout_seconds: u64,
}

/// Seconds a registry has to connect or to send the next bytes.
pub const DEFAULT_REGISTRY_TIMEOUT_SECONDS: u64 = 30;

fn default_registry_timeout() -> u64 {
    DEFAULT_REGISTRY_TIMEOUT_SECONDS
}

/// `[listen]`: where the gRPC API is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// TCP, with mutual TLS unless `insecure_tcp`. Port 0 picks a free port.
    pub tcp: Option<SocketAddr>,
    /// A Unix socket for local callers (root: it is created mode 0600).
    /// `unix = ""` turns it off.
    #[serde(deserialize_with = "empty_path_is_none")]
    pub unix: Option<PathBuf>,
    /// Serve plain TCP without TLS (tests, local development). There are no
    /// identities then: every TCP caller has the admin role, like a caller
    /// on the Unix socket. Refused on an address that is not loopback
    /// unless `allow_insecure_tcp_on_non_loopback`.
    pub insecure_tcp: bool,
    /// Accept `insecure_tcp` on an address other hosts may reach: anyone
    /// who reaches it is admin, and the traffic is readable.
    pub allow_insecure_tcp_on_non_loopback: bool,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            tcp: None,
            unix: Some(PathBuf::from("/run/rootlet/rootletd.sock")),
            insecure_tcp: false,
            allow_insecure_tcp_on_non_loopback: false,
        }
    }
}

/// `[tls]`: the server's identity and the CA its clients' certificates
/// must chain to. PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    /// Refused if group or others may access it (mode & 0o077), unless
    /// `allow_key_access_by_group_or_others`.
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Accept a private key file that users other than its owner may read
    /// (or write): they could then impersonate this agent.
    #[serde(default)]
    pub allow_key_access_by_group_or_others: bool,
}

/// `[metrics]`: Prometheus text format on `GET /metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Off unless set.
    pub listen: Option<SocketAddr>,
}

/// `[health]`: a plain-TCP gRPC listener that serves `grpc.health.v1`
/// alone, with the statuses the API's listeners report: for probes that
/// cannot present a client certificate (kubelet's gRPC probes have no TLS).
/// Nothing else is served there: not the API, not reflection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Off unless set.
    pub listen: Option<SocketAddr>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive (`info`, `rootlet_server=debug,info`);
    /// `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Under a bpffs mount.
    pub bpffs_root: PathBuf,
    /// Holds `dataplane.redb` (the data plane's store) and `agent.redb`.
    pub state_dir: PathBuf,
    /// `auto` (freplace where the kernel permits it), `freplace`, `tailcall`.
    pub backend: BackendChoice,
    /// How often, in seconds, every rootlet is compared with the kernel so
    /// that drift (a link detached or replaced by another tool, a pin
    /// removed) reaches Watch subscribers (cause "drift") even when no call
    /// reads the rootlet. 0: only reads and changes detect drift.
    pub drift_check_seconds: u64,
    /// aya loaders made ahead of time, off the path of a change (aya 0.14
    /// parses the kernel BTF in each one: see dataplane/src/warm.rs); 0
    /// makes each when a load needs it. At most 64.
    pub warm_loaders: usize,
}

/// The default of `[dataplane] drift_check_seconds`.
pub const DEFAULT_DRIFT_CHECK_SECONDS: u64 = 10;

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            bpffs_root: "/sys/fs/bpf/rootlet".into(),
            state_dir: "/var/lib/rootlet".into(),
            backend: BackendChoice::Auto,
            drift_check_seconds: DEFAULT_DRIFT_CHECK_SECONDS,
            warm_loaders: dataplane::DEFAULT_WARM_LOADERS,
        }
    }
}

/// `[bundles]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BundlesConfig {
    /// Ed25519 public key files; a bundle must be signed by one of them.
    pub trusted_keys: Vec<PathBuf>,
    /// Accept unsigned bundles (development only).
    pub allow_unsigned: bool,
    /// Versions kept per bundle name, for rollback.
    pub history: usize,
}

impl Default for BundlesConfig {
    fn default() -> Self {
        BundlesConfig {
            trusted_keys: vec![],
            allow_unsigned: false,
            history: 5,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest gRPC message either way (a bundle travels in one).
    pub max_message_bytes: usize,
    /// How long a mutation's response is kept for a retry with the same
    /// idempotency key; past it, the key is a new request.
    pub idempotency_ttl_seconds: u64,
    /// How many applied policy versions per stage are kept for
    /// RollbackPolicy.
    pub policy_history: usize,
}

/// Kept policy versions per stage by default.
pub const DEFAULT_POLICY_HISTORY: usize = 10;

/// 80 MiB: bundles up to 64 MiB, plus framing.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 80 << 20;
const MIN_MESSAGE_BYTES: usize = 1 << 20;
const MAX_MESSAGE_BYTES: usize = 1 << 30;
/// 24 h: longer than any client's retries of one call.
pub const DEFAULT_IDEMPOTENCY_TTL_SECONDS: u64 =
    rootlet_agent::retention::DEFAULT_IDEMPOTENCY_TTL.as_secs();
/// 30 days.
const MAX_IDEMPOTENCY_TTL_SECONDS: u64 = 30 * 86_400;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            idempotency_ttl_seconds: DEFAULT_IDEMPOTENCY_TTL_SECONDS,
            policy_history: DEFAULT_POLICY_HISTORY,
        }
    }
}

/// One thing wrong (or, from [`Config::warnings`], dubious) in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted path of the field (`tls.cert`, `authz.identity[1].stages`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A TOML syntax error, an unknown field or a value of the wrong type.
    #[error("{}:{line}:{column}: {}{message}", path.display(), field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        /// The dotted path of the offending field, when there is one.
        field: Option<String>,
        message: String,
    },
    #[error("invalid configuration: {}", DisplayProblems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The file does not exist (as opposed to: exists and is wrong).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ConfigError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

struct DisplayProblems<'a>(&'a [Problem]);

impl fmt::Display for DisplayProblems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

fn empty_path_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let path = Option::<PathBuf>::deserialize(d)?;
    Ok(path.filter(|p| !p.as_os_str().is_empty()))
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

impl Config {
    /// Reads and parses `path`. Does not check that referenced files exist:
    /// that is [`Config::validate`].
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read (see
    /// [`ConfigError::is_not_found`]); [`ConfigError::Parse`] with the line,
    /// column and field of the first error.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// [`Config::load`], except that a missing file gives the defaults when
    /// `missing_ok` (the daemon's default path). Also returns where the
    /// config came from, for logs: the path, or "built-in defaults (no PATH)".
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_or_default(path: &Path, missing_ok: bool) -> Result<(Config, String), ConfigError> {
        match Config::load(path) {
            Ok(c) => Ok((c, path.display().to_string())),
            Err(e) if missing_ok && e.is_not_found() => Ok((
                Config::default(),
                format!("built-in defaults (no {})", path.display()),
            )),
            Err(e) => Err(e),
        }
    }

    /// Parses `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let parse_error =
            |span: Option<std::ops::Range<usize>>, field: Option<String>, message: &str| {
                let (line, column) = line_col(text, span.map_or(0, |s| s.start));
                ConfigError::Parse {
                    path: origin.to_owned(),
                    line,
                    column,
                    field,
                    message: message.to_owned(),
                }
            };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| parse_error(e.span(), None, e.message()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = (field != ".").then_some(field);
            parse_error(e.inner().span(), field, e.inner().message())
        })
    }

    /// What the data plane needs: its store is `state_dir/dataplane.redb`.
    pub fn dataplane_config(&self) -> dataplane::Config {
        dataplane::Config {
            bpffs_root: self.dataplane.bpffs_root.clone(),
            store_path: self.dataplane.state_dir.join("dataplane.redb"),
            backend: self.dataplane.backend,
            crash_at: None,
            warm_loaders: self.dataplane.warm_loaders,
        }
    }

    /// What the agent takes from this configuration.
    pub fn agent_options(&self) -> rootlet_agent::Options {
        rootlet_agent::Options {
            dataplane: self.dataplane_config(),
            store_path: self.agent_store_path(),
            trusted_keys: self.bundles.trusted_keys.clone(),
            authz: self.authz.clone(),
            allow_unsigned: self.bundles.allow_unsigned,
            history: self.bundles.history,
            insecure_tcp: self.listen.insecure_tcp,
            drift_check: (self.dataplane.drift_check_seconds > 0)
                .then(|| std::time::Duration::from_secs(self.dataplane.drift_check_seconds)),
            idempotency_ttl: std::time::Duration::from_secs(self.limits.idempotency_ttl_seconds),
            policy_history: self.limits.policy_history,
        }
    }

    /// The agent's own store: `state_dir/agent.redb`.
    pub fn agent_store_path(&self) -> PathBuf {
        self.dataplane.state_dir.join("agent.redb")
    }

    /// Checks what parsing cannot: the daemon listens somewhere; TCP has
    /// TLS unless `insecure_tcp`; the TLS files exist, parse, are within
    /// their validity period and the key matches the certificate; trusted
    /// key files are readable; roles and stage patterns are consistent; the
    /// log level is a valid filter; limits are sane.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = vec![];
        let mut problem = |field: &str, message: String| {
            problems.push(Problem {
                field: field.to_owned(),
                message,
            })
        };

        // Listeners.
        if self.listen.tcp.is_none() && self.listen.unix.is_none() {
            problem(
                "listen",
                "neither `tcp` nor `unix` is set: the API would be unreachable".into(),
            );
        }
        if let Some(unix) = &self.listen.unix {
            // sun_path holds 108 bytes including the terminating NUL.
            if unix.as_os_str().len() > 107 {
                problem(
                    "listen.unix",
                    format!(
                        "{} is longer than a Unix socket path may be (107 bytes)",
                        unix.display()
                    ),
                );
            }
            if unix.file_name().is_none() {
                problem(
                    "listen.unix",
                    format!("{} does not name a file", unix.display()),
                );
            }
        }
        if let (Some(tcp), Some(metrics)) = (self.listen.tcp, self.metrics.listen)
            && tcp == metrics
            && tcp.port() != 0
        {
            problem("metrics.listen", format!("{metrics} is also listen.tcp"));
        }
        if let Some(health) = self.health.listen
            && health.port() != 0
        {
            if self.listen.tcp == Some(health) {
                problem("health.listen", format!("{health} is also listen.tcp"));
            }
            if self.metrics.listen == Some(health) {
                problem("health.listen", format!("{health} is also metrics.listen"));
            }
        }
        match (&self.listen.tcp, self.listen.insecure_tcp, &self.tls) {
            (Some(_), false, None) => problem(
                "tls",
                "listen.tcp is set, so [tls] (cert, key, client_ca) is required (or listen.insecure_tcp = true)".into(),
            ),
            (_, true, Some(_)) => problem(
                "listen.insecure_tcp",
                "insecure_tcp = true and a [tls] section: remove one (insecure_tcp serves plain TCP)".into(),
            ),
            (None, true, None) => problem("listen.insecure_tcp", "insecure_tcp = true but listen.tcp is not set".into()),
            _ => {}
        }
        if let (Some(tcp), true, false) = (
            self.listen.tcp,
            self.listen.insecure_tcp,
            self.listen.allow_insecure_tcp_on_non_loopback,
        ) && !tcp.ip().is_loopback()
        {
            problem(
                "listen.insecure_tcp",
                format!(
                    "plain TCP without TLS on {tcp}, which is not a loopback address: anyone who reaches it would be admin; use a loopback address, or [tls], or set listen.allow_insecure_tcp_on_non_loopback = true to accept that risk"
                ),
            );
        }
        if let Some(tls) = &self.tls {
            for p in check_tls(tls) {
                problem(&p.field, p.message);
            }
        }

        // Log.
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            problem(
                "log.level",
                format!("`{}` is not a valid filter: {e}", self.log.level),
            );
        }

        // Data plane.
        for (field, path) in [
            ("dataplane.bpffs_root", &self.dataplane.bpffs_root),
            ("dataplane.state_dir", &self.dataplane.state_dir),
        ] {
            if !path.is_absolute() {
                problem(field, format!("{} is not an absolute path", path.display()));
            }
        }

        // Bundles.
        for (i, key) in self.bundles.trusted_keys.iter().enumerate() {
            let field = format!("bundles.trusted_keys[{i}]");
            match fs::read(key) {
                Ok(bytes) => {
                    let has_key = x509_parser::pem::Pem::iter_from_buffer(&bytes)
                        .filter_map(Result::ok)
                        .any(|p| p.label == "PUBLIC KEY");
                    if !has_key {
                        problem(&field, format!("{} holds no PEM public key", key.display()));
                    }
                }
                Err(e) => problem(&field, format!("cannot read {}: {e}", key.display())),
            }
        }
        if self.dataplane.warm_loaders > 64 {
            problem(
                "dataplane.warm_loaders",
                format!("{} is more than 64", self.dataplane.warm_loaders),
            );
        }
        if !(1..=1000).contains(&self.bundles.history) {
            problem(
                "bundles.history",
                format!("{} is not between 1 and 1000", self.bundles.history),
            );
        }

        // Limits.
        let max = self.limits.max_message_bytes;
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&max) {
            problem(
                "limits.max_message_bytes",
                format!(
                    "{max} is not between {MIN_MESSAGE_BYTES} (1 MiB) and {MAX_MESSAGE_BYTES} (1 GiB)"
                ),
            );
        }
        let ttl = self.limits.idempotency_ttl_seconds;
        if !(1..=MAX_IDEMPOTENCY_TTL_SECONDS).contains(&ttl) {
            problem(
                "limits.idempotency_ttl_seconds",
                format!("{ttl} is not between 1 and {MAX_IDEMPOTENCY_TTL_SECONDS} (30 days)"),
            );
        }
        if !(1..=1000).contains(&self.limits.policy_history) {
            problem(
                "limits.policy_history",
                format!("{} is not between 1 and 1000", self.limits.policy_history),
            );
        }

        // Registries.
        let mut hosts = BTreeSet::new();
        for (i, r) in self.registry.iter().enumerate() {
            let field = format!("registry[{i}]");
            if let Err(why) = check_registry_host(&r.host) {
                problem(&format!("{field}.host"), why);
            } else if !hosts.insert(r.host.as_str()) {
                problem(
                    &format!("{field}.host"),
                    format!("`{}` is listed twice", r.host),
                );
            }
            if let Some(ca) = &r.ca {
                let mut found = vec![];
                read_certs(&format!("{field}.ca"), ca, &mut found);
                for p in found {
                    problem(&p.field, p.message);
                }
            }
            if let Some(credentials) = &r.credentials {
                let field = format!("{field}.credentials");
                if let Some(mode) = shared_key_mode(credentials) {
                    problem(
                        &field,
                        format!(
                            "{} is accessible to group or others (mode {mode:o}); chmod 600 it",
                            credentials.display()
                        ),
                    );
                }
                if let Err(e) = rootlet_oci::read_credentials(credentials) {
                    problem(&field, e.to_string());
                }
            }
            if !(1..=600).contains(&r.timeout_seconds) {
                problem(
                    &format!("{field}.timeout_seconds"),
                    format!("{} is not between 1 and 600", r.timeout_seconds),
                );
            }
        }

        // Authorization.
        let mut names = BTreeSet::new();
        for (i, id) in self.authz.identity.iter().enumerate() {
            let field = format!("authz.identity[{i}]");
            if id.name.trim().is_empty() {
                problem(&format!("{field}.name"), "is empty".into());
            } else if !names.insert(id.name.as_str()) {
                problem(
                    &format!("{field}.name"),
                    format!("`{}` is listed twice", id.name),
                );
            }
            if id.role == Role::Owner && id.stages.is_empty() {
                problem(
                    &format!("{field}.stages"),
                    format!(
                        "owner `{}` has no stages: list the stage names (or `prefix-*`) it owns",
                        id.name
                    ),
                );
            }
            for (j, pattern) in id.stages.iter().enumerate() {
                if let Err(why) = check_stage_pattern(pattern) {
                    problem(&format!("{field}.stages[{j}]"), why);
                }
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// What is allowed but probably not meant; the daemon logs these at
    /// start and `--check-config` prints them.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut out = vec![];
        let mut warn = |field: &str, message: String| {
            out.push(Problem {
                field: field.to_owned(),
                message,
            })
        };
        if let (Some(tcp), true) = (self.listen.tcp, self.listen.insecure_tcp) {
            let reach = if tcp.ip().is_loopback() {
                "every local process"
            } else {
                "ANYONE WHO CAN REACH IT (not a loopback address)"
            };
            warn(
                "listen.insecure_tcp",
                format!(
                    "TCP {tcp} is served WITHOUT TLS: {reach} may call it as admin, and traffic is readable"
                ),
            );
        }
        if self.listen.tcp.is_some() && !self.listen.insecure_tcp && self.authz.identity.is_empty()
        {
            warn(
                "authz.identity",
                "no identities: TCP callers can authenticate but may do nothing".into(),
            );
        }
        if let Some(tls) = &self.tls
            && let Some(mode) = shared_key_mode(&tls.key)
        {
            warn(
                "tls.key",
                format!(
                    "{} is accessible to group or others (mode {mode:o}), accepted because tls.allow_key_access_by_group_or_others = true; 0600 is advised",
                    tls.key.display(),
                ),
            );
        }
        if self.bundles.allow_unsigned {
            warn(
                "bundles.allow_unsigned",
                "unsigned bundles are accepted (development only)".into(),
            );
        } else if self.bundles.trusted_keys.is_empty() {
            warn(
                "bundles.trusted_keys",
                "no trusted keys and allow_unsigned = false: every bundle will be refused".into(),
            );
        }
        for (i, id) in self.authz.identity.iter().enumerate() {
            if id.role != Role::Owner && !id.stages.is_empty() {
                warn(
                    &format!("authz.identity[{i}].stages"),
                    format!(
                        "ignored: `{}` is {}, and only owners are limited to stages",
                        id.name, id.role
                    ),
                );
            }
        }
        out
    }

    /// What `rootletd --check-config` prints: `Ok` with the warnings and
    /// "config OK: <origin>: <summary>", or `Err` with one problem a line.
    pub fn check(&self, origin: &str) -> Result<String, String> {
        match self.validate() {
            Ok(()) => {
                let mut out = String::new();
                for w in self.warnings() {
                    out.push_str(&format!("warning: {w}\n"));
                }
                out.push_str(&format!("config OK: {origin}: {}\n", self.summary()));
                Ok(out)
            }
            Err(ConfigError::Invalid(problems)) => Err(problems
                .iter()
                .map(|p| format!("config invalid: {origin}: {p}\n"))
                .collect()),
            Err(e) => Err(format!("config invalid: {origin}: {e}\n")),
        }
    }

    /// One line: what the daemon will do with this config.
    pub fn summary(&self) -> String {
        let mut parts = vec![];
        if let Some(tcp) = self.listen.tcp {
            let how = if self.listen.insecure_tcp {
                "plain, INSECURE"
            } else {
                "mTLS"
            };
            parts.push(format!("tcp {tcp} ({how})"));
        }
        if let Some(unix) = &self.listen.unix {
            parts.push(format!("unix {}", unix.display()));
        }
        if let Some(metrics) = self.metrics.listen {
            parts.push(format!("metrics {metrics}"));
        }
        if let Some(health) = self.health.listen {
            parts.push(format!("health {health} (plain, health only)"));
        }
        parts.push(format!("backend {}", backend_name(self.dataplane.backend)));
        parts.push(format!("bpffs {}", self.dataplane.bpffs_root.display()));
        parts.push(format!("state {}", self.dataplane.state_dir.display()));
        parts.push(format!(
            "{} identit{}",
            self.authz.identity.len(),
            if self.authz.identity.len() == 1 {
                "y"
            } else {
                "ies"
            }
        ));
        parts.push(format!(
            "{} trusted key{}{}",
            self.bundles.trusted_keys.len(),
            if self.bundles.trusted_keys.len() == 1 {
                ""
            } else {
                "s"
            },
            if self.bundles.allow_unsigned {
                ", unsigned allowed"
            } else {
                ""
            }
        ));
        if !self.registry.is_empty() {
            let hosts: Vec<&str> = self.registry.iter().map(|r| r.host.as_str()).collect();
            parts.push(format!("pulls from {}", hosts.join(" ")));
        }
        parts.join(", ")
    }
}

/// A registry as references name it: `host[:port]`, no scheme, no path.
fn check_registry_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("is empty".into());
    }
    if host.contains("://") || host.contains('/') || host.contains('@') {
        return Err(format!(
            "`{host}` is not host[:port] (no scheme, path or digest): references name it as host[:port]/repo@sha256:…"
        ));
    }
    let probe = format!("{host}/probe@sha256:{}", "0".repeat(64));
    match rootlet_oci::BundleRef::parse_pinned(&probe) {
        Ok(r) if r.registry() == host => Ok(()),
        Ok(r) => Err(format!(
            "`{host}` is read as registry `{}`: name it that way",
            r.registry()
        )),
        Err(e) => Err(format!("`{host}` is not a registry host: {e}")),
    }
}

fn backend_name(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Auto => "auto",
        BackendChoice::Freplace => "freplace",
        BackendChoice::TailCall => "tailcall",
    }
}

/// A stage name, or a prefix of one followed by `*`.
fn check_stage_pattern(pattern: &str) -> Result<(), String> {
    let (name, is_prefix) = match pattern.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (pattern, false),
    };
    if name.contains('*') {
        return Err(format!("`{pattern}`: `*` may only end a pattern"));
    }
    if is_prefix && name.is_empty() {
        return Ok(()); // `*`: every stage
    }
    if !dataplane::spec::valid_name(name) {
        return Err(format!(
            "`{pattern}` is not a stage name (1-64 characters from [A-Za-z0-9_.-], optionally followed by `*`)"
        ));
    }
    Ok(())
}

/// The certificates in a PEM file, parsed.
fn read_certs(field: &str, path: &Path, problems: &mut Vec<Problem>) -> Option<Vec<u8>> {
    let mut problem = |message: String| {
        problems.push(Problem {
            field: field.to_owned(),
            message,
        })
    };
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            problem(format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    let mut count = 0;
    for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
        let pem = match pem {
            Ok(p) => p,
            Err(e) => {
                problem(format!("{} is not valid PEM: {e}", path.display()));
                return None;
            }
        };
        if pem.label != "CERTIFICATE" {
            continue;
        }
        count += 1;
        let cert = match pem.parse_x509() {
            Ok(c) => c,
            Err(e) => {
                problem(format!(
                    "{}: certificate {count} does not parse: {e}",
                    path.display()
                ));
                return None;
            }
        };
        let validity = cert.validity();
        if !validity.is_valid() {
            problem(format!(
                "{}: certificate {count} ({}) is valid only from {} to {}",
                path.display(),
                cert.subject(),
                validity.not_before,
                validity.not_after
            ));
        }
    }
    if count == 0 {
        problem(format!("{} holds no PEM certificate", path.display()));
        return None;
    }
    Some(bytes)
}

/// The mode of `key` if group or others may access it.
fn shared_key_mode(key: &Path) -> Option<u32> {
    let mode = fs::metadata(key).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

fn check_tls(tls: &TlsConfig) -> Vec<Problem> {
    let mut problems = vec![];
    if !tls.allow_key_access_by_group_or_others
        && let Some(mode) = shared_key_mode(&tls.key)
    {
        problems.push(Problem {
            field: "tls.key".into(),
            message: format!(
                "{} is accessible to group or others (mode {mode:o}): they could impersonate this agent; chmod 600 it, or set tls.allow_key_access_by_group_or_others = true to accept that risk",
                tls.key.display()
            ),
        });
    }
    let cert = read_certs("tls.cert", &tls.cert, &mut problems);
    let ca = read_certs("tls.client_ca", &tls.client_ca, &mut problems);
    let key = match fs::read(&tls.key) {
        Ok(bytes) => {
            let is_key = x509_parser::pem::Pem::iter_from_buffer(&bytes)
                .filter_map(Result::ok)
                .any(|p| p.label.ends_with("PRIVATE KEY"));
            if is_key {
                Some(bytes)
            } else {
                problems.push(Problem {
                    field: "tls.key".into(),
                    message: format!("{} holds no PEM private key", tls.key.display()),
                });
                None
            }
        }
        Err(e) => {
            problems.push(Problem {
                field: "tls.key".into(),
                message: format!("cannot read {}: {e}", tls.key.display()),
            });
            None
        }
    };
    // Each file is fine on its own: does rustls accept them together (the
    // key matches the certificate)?
    if let (Some(cert), Some(key), Some(ca), true) = (cert, key, ca, problems.is_empty())
        && let Err(e) = server_tls(&cert, &key, &ca)
            .and_then(|t| tonic::transport::Server::builder().tls_config(t))
    {
        problems.push(Problem {
            field: "tls".into(),
            message: format!(
                "the certificate, key and CA do not make a TLS server: {}",
                crate::runtime::error_chain(&e)
            ),
        });
    }
    problems
}

/// The mTLS configuration of the TCP listener: a client certificate is
/// optional at the TLS layer (so that a caller without one reaches the API
/// and is told UNAUTHENTICATED), but one that is presented must chain to
/// `client_ca`.
pub(crate) fn server_tls(
    cert: &[u8],
    key: &[u8],
    ca: &[u8],
) -> Result<tonic::transport::ServerTlsConfig, tonic::transport::Error> {
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .client_ca_root(tonic::transport::Certificate::from_pem(ca))
        .client_auth_optional(true)
        .timeout(std::time::Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("rootletd.toml"))
    }

    #[test]
    fn empty_file_gives_defaults_for_local_use() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(
            c.listen.unix.as_deref(),
            Some(Path::new("/run/rootlet/rootletd.sock"))
        );
        assert_eq!(c.listen.tcp, None);
        assert!(c.tls.is_none() && c.metrics.listen.is_none());
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        assert_eq!(c.dataplane.backend, BackendChoice::Auto);
        assert_eq!(c.bundles.history, 5);
        assert!(!c.bundles.allow_unsigned);
        assert_eq!(c.limits.max_message_bytes, 80 * 1024 * 1024);
        assert_eq!(c.limits.idempotency_ttl_seconds, 86_400);
        c.validate().unwrap();
        let dp = c.dataplane_config();
        assert_eq!(dp.store_path, Path::new("/var/lib/rootlet/dataplane.redb"));
        assert_eq!(dp.bpffs_root, Path::new("/sys/fs/bpf/rootlet"));
        assert_eq!(
            c.agent_store_path(),
            Path::new("/var/lib/rootlet/agent.redb")
        );
    }

    #[test]
    fn the_example_in_deploy_parses() {
        let c = parse(include_str!("../../deploy/rootletd.toml")).unwrap();
        assert_eq!(c.listen.tcp, Some("0.0.0.0:50051".parse().unwrap()));
        assert!(c.tls.is_some());
        assert_eq!(c.authz.identity.len(), 3);
        let ddos = c.authz.find("team-ddos").unwrap();
        assert_eq!(ddos.role, Role::Owner);
        assert!(
            ddos.matches_stage("ddos")
                && ddos.matches_stage("ddos-v6")
                && !ddos.matches_stage("lb")
        );
    }

    #[test]
    fn full_schema() {
        let c = parse(
            r#"
[listen]
tcp = "127.0.0.1:0"
unix = ""
insecure_tcp = true
[metrics]
listen = "[::1]:9464"
[log]
format = "json"
level = "rootlet_server=debug,info"
[dataplane]
bpffs_root = "/sys/fs/bpf/x"
state_dir = "/tmp/x"
backend = "tailcall"
[bundles]
trusted_keys = ["/etc/k1.pub"]
allow_unsigned = true
history = 3
[limits]
max_message_bytes = 2097152
idempotency_ttl_seconds = 60
[[authz.identity]]
name = "ops"
role = "admin"
[[authz.identity]]
name = "team-ddos"
role = "owner"
stages = ["ddos", "ddos-*"]
[[authz.identity]]
name = "mon"
role = "reader"
"#,
        )
        .unwrap();
        assert_eq!(c.listen.unix, None, "an empty path turns the socket off");
        assert!(c.listen.insecure_tcp);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.dataplane.backend, BackendChoice::TailCall);
        assert_eq!(c.dataplane_config().backend, BackendChoice::TailCall);
        assert_eq!(
            c.agent_options().idempotency_ttl,
            std::time::Duration::from_secs(60)
        );
        assert_eq!(
            c.dataplane_config().store_path,
            Path::new("/tmp/x/dataplane.redb")
        );
        assert_eq!(c.bundles.history, 3);
        assert_eq!(c.limits.max_message_bytes, 2 << 20);
        assert_eq!(
            c.authz.identity.iter().map(|i| i.role).collect::<Vec<_>>(),
            [Role::Admin, Role::Owner, Role::Reader]
        );
        assert!(
            c.summary().contains("tcp 127.0.0.1:0 (plain, INSECURE)"),
            "{}",
            c.summary()
        );
        assert!(
            c.warnings()
                .iter()
                .any(|w| w.field == "listen.insecure_tcp")
        );
    }

    fn parse_err(text: &str) -> (usize, usize, Option<String>, String) {
        match parse(text) {
            Err(ConfigError::Parse {
                line,
                column,
                field,
                message,
                ..
            }) => (line, column, field, message),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_line_column_and_field() {
        let (line, col, field, msg) = parse_err("[listen]\n\ntcp = \"nonsense\"\n");
        assert_eq!((line, col, field.as_deref()), (3, 7, Some("listen.tcp")));
        assert!(msg.contains("socket address"), "{msg}");

        let (line, col, field, msg) = parse_err("[log]\nlevel = \"info\"\ncolour = true\n");
        assert_eq!((line, col, field.as_deref()), (3, 1, Some("log.colour")));
        assert!(msg.contains("unknown field `colour`"), "{msg}");

        let (line, _, field, msg) = parse_err("[limits]\nmax_message_bytes = \"80M\"\n");
        assert_eq!(
            (line, field.as_deref()),
            (2, Some("limits.max_message_bytes"))
        );
        assert!(msg.contains("invalid type"), "{msg}");

        let (line, col, field, msg) = parse_err(
            "[[authz.identity]]\nname = \"a\"\nrole = \"admin\"\n[[authz.identity]]\nname = \"b\"\nrole = \"root\"\n",
        );
        assert_eq!(
            (line, col, field.as_deref()),
            (6, 8, Some("authz.identity[1].role"))
        );
        assert!(msg.contains("unknown variant `root`"), "{msg}");

        let (line, _, field, msg) = parse_err("[tls]\ncert = \"/c\"\nkey = \"/k\"\n");
        assert_eq!((line, field.as_deref()), (1, Some("tls")));
        assert!(msg.contains("missing field `client_ca`"), "{msg}");

        let (line, col, field, _) = parse_err("[dataplane]\nbackend = \"ebpf\"\n");
        assert_eq!(
            (line, col, field.as_deref()),
            (2, 11, Some("dataplane.backend"))
        );

        // A syntax error has no field.
        let (line, col, field, msg) = parse_err("[listen\ntcp = 1\n");
        assert_eq!((line, col, field), (1, 8, None));
        assert!(msg.contains("expected `]`"), "{msg}");

        let e = parse("[log]\nformat = \"xml\"\n").unwrap_err().to_string();
        assert!(
            e.starts_with("rootletd.toml:2:10: log.format: unknown variant `xml`"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_file_gives_defaults_only_when_allowed() {
        let missing = Path::new("/nonexistent/rootletd.toml");
        let (c, origin) = Config::load_or_default(missing, true).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(origin, "built-in defaults (no /nonexistent/rootletd.toml)");
        let e = Config::load_or_default(missing, false).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert_eq!(
            e.to_string(),
            "cannot read /nonexistent/rootletd.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é = 1", 3), (1, 3));
        assert_eq!(line_col("x", 99), (1, 2));
    }

    fn problems(c: &Config) -> Vec<Problem> {
        match c.validate() {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    fn fields(c: &Config) -> Vec<String> {
        problems(c).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn tcp_needs_tls_unless_insecure() {
        let c = parse("[listen]\ntcp = \"127.0.0.1:50051\"\n").unwrap();
        assert_eq!(fields(&c), ["tls"]);
        let c = parse("[listen]\ntcp = \"127.0.0.1:50051\"\ninsecure_tcp = true\n").unwrap();
        c.validate().unwrap();
        let c = parse("[listen]\nunix = \"\"\n").unwrap();
        assert_eq!(fields(&c), ["listen"]);
        let c = parse(
            "[listen]\ntcp = \"127.0.0.1:1\"\ninsecure_tcp = true\n[tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_ca = \"/a\"\n",
        )
        .unwrap();
        assert!(fields(&c).contains(&"listen.insecure_tcp".to_owned()));
    }

    #[test]
    fn missing_tls_files_are_named() {
        let c = parse(
            "[listen]\ntcp = \"127.0.0.1:1\"\n[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\nclient_ca = \"/nonexistent/ca.pem\"\n",
        )
        .unwrap();
        let p = problems(&c);
        assert_eq!(
            p.iter().map(|p| p.field.as_str()).collect::<Vec<_>>(),
            ["tls.cert", "tls.client_ca", "tls.key"]
        );
        assert!(p[0].message.contains("/nonexistent/c.pem"), "{}", p[0]);
    }

    #[test]
    fn authz_and_limits_are_checked() {
        let c = parse(
            r#"
[bundles]
history = 0
trusted_keys = ["/nonexistent/key.pub"]
[limits]
max_message_bytes = 1000
idempotency_ttl_seconds = 0
[log]
level = "info,=[bad"
[dataplane]
state_dir = "relative"
[[authz.identity]]
name = "a"
role = "owner"
[[authz.identity]]
name = "a"
role = "admin"
[[authz.identity]]
name = "b"
role = "owner"
stages = ["ok", "ok-*", "bad*name", "no spaces"]
"#,
        )
        .unwrap();
        assert_eq!(
            fields(&c),
            [
                "log.level",
                "dataplane.state_dir",
                "bundles.trusted_keys[0]",
                "bundles.history",
                "limits.max_message_bytes",
                "limits.idempotency_ttl_seconds",
                "authz.identity[0].stages",
                "authz.identity[1].name",
                "authz.identity[2].stages[2]",
                "authz.identity[2].stages[3]",
            ]
        );
        let text = c.validate().unwrap_err().to_string();
        assert!(
            text.starts_with("invalid configuration: log.level: "),
            "{text}"
        );
    }

    #[test]
    fn the_health_listener_shares_no_address_and_says_what_it_serves() {
        let c = parse("[listen]\ninsecure_tcp = true\ntcp = \"127.0.0.1:7000\"\n[health]\nlisten = \"127.0.0.1:7000\"\n").unwrap();
        let text = c.validate().unwrap_err().to_string();
        assert!(
            text.contains("health.listen: 127.0.0.1:7000 is also listen.tcp"),
            "{text}"
        );
        let c = parse(
            "[metrics]\nlisten = \"127.0.0.1:7001\"\n[health]\nlisten = \"127.0.0.1:7001\"\n",
        )
        .unwrap();
        let text = c.validate().unwrap_err().to_string();
        assert!(
            text.contains("health.listen: 127.0.0.1:7001 is also metrics.listen"),
            "{text}"
        );
        let c = parse("[health]\nlisten = \"0.0.0.0:9091\"\n").unwrap();
        c.validate().unwrap();
        assert!(
            c.summary()
                .contains("health 0.0.0.0:9091 (plain, health only)"),
            "{}",
            c.summary()
        );
    }

    #[test]
    fn stage_patterns() {
        assert!(check_stage_pattern("ddos").is_ok());
        assert!(check_stage_pattern("ddos-*").is_ok());
        assert!(check_stage_pattern("*").is_ok());
        assert!(check_stage_pattern("*ddos").is_err());
        assert!(check_stage_pattern("").is_err());
        let id = IdentityConfig {
            name: "t".into(),
            role: Role::Owner,
            stages: vec!["lb".into(), "ddos-*".into()],
        };
        assert!(id.matches_stage("lb") && id.matches_stage("ddos-") && id.matches_stage("ddos-x"));
        assert!(!id.matches_stage("lb2") && !id.matches_stage("ddos"));
    }

    #[test]
    fn role_names() {
        for (text, role) in [
            ("admin", Role::Admin),
            ("owner", Role::Owner),
            ("reader", Role::Reader),
        ] {
            assert_eq!(role.to_string(), text);
            let c = parse(&format!(
                "[[authz.identity]]\nname = \"x\"\nrole = \"{text}\"\nstages = [\"s\"]\n"
            ))
            .unwrap();
            assert_eq!(c.authz.identity[0].role, role);
        }
    }

    #[test]
    fn registries_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("registry.credentials");
        fs::write(&creds, "fleet:secret\n").unwrap();
        fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).unwrap();
        let shared = dir.path().join("shared.credentials");
        fs::write(&shared, "nocolon\n").unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o644)).unwrap();
        let good = format!(
            "[[registry]]\nhost = \"registry.example.com:5000\"\ncredentials = {:?}\n",
            creds.display().to_string()
        );
        let c = parse(&good).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.registry[0].timeout_seconds,
            DEFAULT_REGISTRY_TIMEOUT_SECONDS
        );
        assert!(
            c.summary().contains("pulls from registry.example.com:5000"),
            "{}",
            c.summary()
        );

        let c = parse(&format!(
            r#"
[[registry]]
host = "https://registry.example.com"
[[registry]]
host = "127.0.0.1:5000"
ca = "/nonexistent/ca.pem"
timeout_seconds = 0
[[registry]]
host = "127.0.0.1:5000"
credentials = {:?}
[[registry]]
host = ""
"#,
            shared.display().to_string()
        ))
        .unwrap();
        let p = problems(&c);
        let said = |field: &str| -> Vec<String> {
            p.iter()
                .filter(|p| p.field == field)
                .map(|p| p.message.clone())
                .collect()
        };
        assert!(
            said("registry[0].host")[0].contains("not host[:port]"),
            "{p:?}"
        );
        assert!(
            said("registry[1].ca")[0].contains("/nonexistent/ca.pem"),
            "{p:?}"
        );
        assert!(
            said("registry[1].timeout_seconds")[0].contains("between 1 and 600"),
            "{p:?}"
        );
        assert!(
            said("registry[2].host")[0].contains("listed twice"),
            "{p:?}"
        );
        let creds = said("registry[2].credentials");
        assert!(creds.iter().any(|m| m.contains("mode 644")), "{creds:?}");
        assert!(
            creds.iter().any(|m| m.contains("username:password")),
            "{creds:?}"
        );
        assert_eq!(said("registry[3].host"), ["is empty"]);
        assert_eq!(p.len(), 7, "{p:?}");
    }
}
