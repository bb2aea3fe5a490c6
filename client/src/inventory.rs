//! The inventory: the hosts a rollout can reach, each with its agent's
//! address, labels (`zone`, `role`, ...) and TLS settings; selecting hosts
//! by label ([`Selector`]); and the deterministic order rollouts use (by
//! host name).
//!
//! ```toml
//! [defaults.tls]                 # merged under every TCP host's own `tls`
//! ca = "pki/ca.pem"              # paths are relative to this file
//! cert = "pki/rootletctl.pem"
//! key = "pki/rootletctl.key"
//!
//! [[hosts]]
//! name = "edge-a-1"
//! address = "10.0.0.1:50051"     # TCP (mTLS), or "unix:/run/rootletd.sock"
//! labels = { zone = "a", role = "edge" }
//! tls = { server_name = "edge-a-1.example.net" }
//!
//! [[hosts]]
//! name = "lab-1"
//! address = "127.0.0.1:50051"
//! insecure = true                # plain TCP, no TLS: only for labs
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml::de::DeTable;

use crate::config::{self, Fields, Result, Src, boolean, string, table, tables, text};

/// Longest host name.
pub const MAX_HOST_NAME: usize = 128;
/// Most hosts in one inventory.
pub const MAX_HOSTS: usize = 100_000;

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Address {
    /// `host:port` (an IP address or a DNS name).
    Tcp(String),
    /// A Unix socket path; the agent treats it as local administration, and
    /// no TLS applies.
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => f.write_str(a),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How to reach a TCP host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// mTLS.
    Tls(TlsSettings),
    /// Plain TCP (`insecure = true`).
    Insecure,
    /// A Unix socket (no TLS).
    Local,
}

/// mTLS settings: the CA that signed the agent's certificate, the client
/// certificate and key, and the name the agent's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// None: the host part of the address.
    pub server_name: Option<String>,
}

/// One host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub address: Address,
    pub labels: BTreeMap<String, String>,
    pub security: Security,
}

/// An inventory: hosts sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub hosts: Vec<Host>,
}

/// TLS fields as written (host-level values override `[defaults.tls]`).
#[derive(Default, Clone)]
struct PartialTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
}

impl Inventory {
    /// Reads and checks an inventory file.
    pub fn load(path: &Path) -> Result<Inventory> {
        let text = config::read(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Inventory::parse(&text, &path.display().to_string(), dir)
    }

    /// Parses an inventory; `file` names it in errors and relative paths
    /// are taken from `dir`.
    pub fn parse(text: &str, file: &str, dir: &Path) -> Result<Inventory> {
        let (src, doc) = config::parse(file, text)?;
        let root = Fields::of(&src, doc.get_ref(), &doc.span(), "", &["defaults", "hosts"])?;

        let mut defaults = PartialTls::default();
        let mut default_insecure = false;
        if let Some(v) = root.optional("defaults") {
            let (t, span) = table(&src, v, "defaults")?;
            let f = Fields::of(&src, t, &span, "defaults", &["tls", "insecure"])?;
            if let Some(v) = f.optional("tls") {
                defaults = parse_tls(&src, v, "defaults.tls", dir)?;
            }
            if let Some(v) = f.optional("insecure") {
                default_insecure = boolean(&src, v, "defaults.insecure")?;
            }
        }

        let hosts_v = root.required("hosts")?;
        let items = tables(&src, hosts_v, "hosts")?;
        if items.is_empty() {
            return Err(src.err(&hosts_v.span(), "hosts", "at least one host is needed"));
        }
        if items.len() > MAX_HOSTS {
            return Err(src.err(
                &hosts_v.span(),
                "hosts",
                format!("at most {MAX_HOSTS} hosts"),
            ));
        }
        let mut hosts = Vec::with_capacity(items.len());
        // Where each name and address was first seen, as a span: its line
        // is counted only for the error (counting it for every host made
        // loading O(hosts²): 5000 hosts took seconds).
        let mut names: HashMap<String, std::ops::Range<usize>> = HashMap::new();
        let mut addresses: HashMap<String, std::ops::Range<usize>> = HashMap::new();
        for (i, (t, span)) in items.iter().enumerate() {
            let path = format!("hosts[{i}]");
            let (host, name_span, addr_span) =
                parse_host(&src, t, span, &path, dir, &defaults, default_insecure)?;
            if let Some(first) = names.insert(host.name.clone(), name_span.clone()) {
                return Err(src.err(
                    &name_span,
                    &format!("{path}.name"),
                    format!(
                        "host {:?} is already defined on line {}",
                        host.name,
                        src.line(&first)
                    ),
                ));
            }
            if let Some(first) = addresses.insert(host.address.to_string(), addr_span.clone()) {
                return Err(src.err(
                    &addr_span,
                    &format!("{path}.address"),
                    format!(
                        "address {} is already used on line {}",
                        host.address,
                        src.line(&first)
                    ),
                ));
            }
            hosts.push(host);
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Inventory { hosts })
    }

    /// The hosts `selector` matches, in name order.
    pub fn select(&self, selector: &Selector) -> Vec<Host> {
        self.hosts
            .iter()
            .filter(|h| selector.matches(&h.labels))
            .cloned()
            .collect()
    }
}

fn parse_host(
    src: &Src<'_>,
    t: &DeTable<'_>,
    span: &std::ops::Range<usize>,
    path: &str,
    dir: &Path,
    defaults: &PartialTls,
    default_insecure: bool,
) -> Result<(Host, std::ops::Range<usize>, std::ops::Range<usize>)> {
    let f = Fields::of(
        src,
        t,
        span,
        path,
        &["name", "address", "labels", "tls", "insecure"],
    )?;
    let name_v = f.required("name")?;
    let name = text(src, name_v, &f.field("name"), MAX_HOST_NAME)?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(src.err(
            &name_v.span(),
            &f.field("name"),
            "must be characters from A-Z a-z 0-9 - _ .",
        ));
    }

    let addr_v = f.required("address")?;
    let addr_field = f.field("address");
    let addr = text(src, addr_v, &addr_field, 4096)?;
    let address = parse_address(addr).map_err(|msg| src.err(&addr_v.span(), &addr_field, msg))?;

    let mut labels = BTreeMap::new();
    if let Some(v) = f.optional("labels") {
        let (lt, _) = table(src, v, &f.field("labels"))?;
        let mut entries: Vec<_> = lt.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        for (k, v) in entries {
            let key: &str = k.get_ref();
            let field = format!("{path}.labels.{key}");
            if !is_label(key) {
                return Err(src.err(
                    &k.span(),
                    &field,
                    "label names are 1 to 63 characters from a-z A-Z 0-9 - _ . /",
                ));
            }
            let value = string(src, v, &field)?;
            if value.len() > 256 || value.chars().any(|c| c.is_control() || c == ',') {
                return Err(src.err(
                    &v.span(),
                    &field,
                    "label values are at most 256 characters, without commas or control characters",
                ));
            }
            labels.insert(key.to_string(), value.to_string());
        }
    }

    let mut tls = defaults.clone();
    let mut tls_span = None;
    if let Some(v) = f.optional("tls") {
        let own = parse_tls(src, v, &f.field("tls"), dir)?;
        tls.ca = own.ca.or(tls.ca);
        tls.cert = own.cert.or(tls.cert);
        tls.key = own.key.or(tls.key);
        tls.server_name = own.server_name.or(tls.server_name);
        tls_span = Some(v.span());
    }
    let insecure = match f.optional("insecure") {
        Some(v) => boolean(src, v, &f.field("insecure"))?,
        None => default_insecure,
    };

    let security = match &address {
        Address::Unix(_) => Security::Local,
        Address::Tcp(_) if insecure => Security::Insecure,
        Address::Tcp(_) => {
            let at = tls_span.unwrap_or_else(|| span.clone());
            let need = |what: &str, p: Option<PathBuf>| {
                p.ok_or_else(|| {
                    src.err(
                        &at,
                        &format!("{path}.tls.{what}"),
                        format!(
                            "a TCP host needs tls.{what} (here or in [defaults.tls]), or insecure = true"
                        ),
                    )
                })
            };
            Security::Tls(TlsSettings {
                ca: need("ca", tls.ca)?,
                cert: need("cert", tls.cert)?,
                key: need("key", tls.key)?,
                server_name: tls.server_name,
            })
        }
    };
    Ok((
        Host {
            name: name.to_string(),
            address,
            labels,
            security,
        },
        name_v.span(),
        addr_v.span(),
    ))
}

fn parse_tls(src: &Src<'_>, v: &config::Value<'_>, path: &str, dir: &Path) -> Result<PartialTls> {
    let (t, span) = table(src, v, path)?;
    let f = Fields::of(src, t, &span, path, &["ca", "cert", "key", "server_name"])?;
    let file = |key: &str| -> Result<Option<PathBuf>> {
        f.optional(key)
            .map(|v| text(src, v, &f.field(key), 4096).map(|s| dir.join(s)))
            .transpose()
    };
    Ok(PartialTls {
        ca: file("ca")?,
        cert: file("cert")?,
        key: file("key")?,
        server_name: f
            .optional("server_name")
            .map(|v| text(src, v, &f.field("server_name"), 253).map(str::to_string))
            .transpose()?,
    })
}

/// `unix:/path`, or `host:port`.
pub fn parse_address(s: &str) -> Result<Address, String> {
    if let Some(p) = s
        .strip_prefix("unix://")
        .or_else(|| s.strip_prefix("unix:"))
    {
        if !p.starts_with('/') {
            return Err(format!(
                "{s:?}: a Unix socket address needs an absolute path (unix:/run/rootletd.sock)"
            ));
        }
        return Ok(Address::Unix(PathBuf::from(p)));
    }
    if s.contains("://") {
        return Err(format!(
            "{s:?}: write host:port (TLS is chosen by the tls settings) or unix:/path"
        ));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected host:port or unix:/path"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "{s:?}: expected host:port with a port from 1 to 65535"
        ));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{s:?}: write IPv6 addresses in brackets, [::1]:50051"
        ));
    }
    Ok(Address::Tcp(s.to_string()))
}

fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// A label selector: comma-separated terms, all of which must hold:
/// `key=value`, `key!=value`, `key` (present), `!key` (absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    terms: Vec<Term>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Has(String),
    Lacks(String),
}

impl Selector {
    /// Every host.
    pub fn all() -> Selector {
        Selector::default()
    }

    /// Parses `role=edge,zone!=c`.
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for raw in s.split(',') {
            let t = raw.trim();
            if t.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(format!("selector {s:?}: empty term"));
            }
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once('=') {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = t.strip_prefix('!') {
                Term::Lacks(k.trim().into())
            } else {
                Term::Has(t.into())
            };
            let key = match &term {
                Term::Eq(k, _) | Term::Ne(k, _) | Term::Has(k) | Term::Lacks(k) => k,
            };
            if !is_label(key) {
                return Err(format!(
                    "selector {s:?}: {key:?} is not a label name (a-z A-Z 0-9 - _ . /)"
                ));
            }
            terms.push(term);
        }
        Ok(Selector {
            terms,
            text: s.trim().to_string(),
        })
    }

    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Has(k) => labels.contains_key(k),
            Term::Lacks(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            f.write_str("(all hosts)")
        } else {
            f.write_str(&self.text)
        }
    }
}

/// Checks that an inventory error is a field error at `line:col` whose
/// message contains `needle` (for tests).
#[cfg(test)]
pub(crate) fn assert_field_error(
    e: &config::ConfigError,
    line: usize,
    col: usize,
    field: &str,
    needle: &str,
) {
    match e {
        config::ConfigError::Field {
            line: l,
            col: c,
            field: f,
            msg,
            ..
        } => {
            assert_eq!(
                (*l, *c, f.as_str()),
                (line, col, field),
                "{e} (wanted {line}:{col} {field})"
            );
            assert!(msg.contains(needle), "{e}: wanted {needle:?}");
        }
        other => panic!("expected a field error, got {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    fn parse(s: &str) -> Result<Inventory> {
        Inventory::parse(s, "inv.toml", Path::new("/etc/rootlet"))
    }

    #[test]
    fn hosts_sorted_defaults_merged() {
        let inv = parse(
            r#"
[defaults.tls]
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
"#,
        )
        .unwrap();
        let names: Vec<_> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(inv.hosts[0].security, Security::Local);
        assert_eq!(
            inv.hosts[1].security,
            Security::Tls(TlsSettings {
                ca: "/etc/rootlet/ca.pem".into(),
                cert: "/etc/rootlet/c.pem".into(),
                key: "/etc/rootlet/c.key".into(),
                server_name: Some("b.example".into()),
            })
        );
        assert_eq!(inv.hosts[2].security, Security::Insecure);
        let edge = inv.select(&Selector::parse("role=edge").unwrap());
        assert_eq!(edge.len(), 1);
        assert_eq!(inv.select(&Selector::parse("!role").unwrap()).len(), 2);
        assert_eq!(inv.select(&Selector::parse("zone!=a").unwrap()).len(), 2);
        assert_eq!(inv.select(&Selector::all()).len(), 3);
    }

    #[test]
    fn errors_name_field_and_position() {
        let e = parse("[[hosts]]\nname = \"a\"\naddress = \"10.0.0.1:50051\"\n").unwrap_err();
        assert_field_error(&e, 1, 1, "hosts[0].tls.ca", "needs tls.ca");
        let e = parse("[[hosts]]\nname = \"a\"\naddress = \"10.0.0.1\"\ninsecure = true\n")
            .unwrap_err();
        assert_field_error(&e, 3, 11, "hosts[0].address", "host:port");
        let e = parse(
            "[[hosts]]\nname = \"a\"\naddress = \"unix:/a\"\n[[hosts]]\nname = \"a\"\naddress = \"unix:/b\"\n",
        )
        .unwrap_err();
        assert_field_error(&e, 5, 8, "hosts[1].name", "already defined on line 2");
        let e = parse("[[hosts]]\nname = \"a\"\nadress = \"unix:/a\"\n").unwrap_err();
        assert_field_error(&e, 3, 1, "hosts[0].adress", "unknown key");
        let e = parse("[[hosts]]\nname = \"a\"\naddress = \"unix:/a\"\nlabels = { zone = 1 }\n")
            .unwrap_err();
        assert_field_error(&e, 4, 19, "hosts[0].labels.zone", "expected a string");
        let e = parse("hosts = [\n").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Syntax {
                    line: 1,
                    col: 10,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn selectors() {
        assert!(Selector::parse("role=edge, zone=a").is_ok());
        assert!(Selector::parse("role=edge,,").is_err());
        assert!(Selector::parse("ro le=x").is_err());
        assert_eq!(Selector::parse("").unwrap(), Selector::all());
    }
}
