//! Who may do what. A caller is identified by its client certificate (the
//! subject CN, else a DNS/URI SAN) or is the host itself (the Unix socket);
//! the config maps identities to roles: `admin` (everything), `owner` of
//! named stages (a team may touch only its own), `reader`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Over the local Unix socket (mode 0600: root on this host).
    Local,
    /// A verified client certificate with this identity.
    Cert(String),
    /// No client certificate.
    Anonymous,
}

impl Caller {
    /// The name recorded as a stage's owner and in the audit log.
    pub fn name(&self) -> &str {
        match self {
            Caller::Local => "local",
            Caller::Cert(n) => n,
            Caller::Anonymous => "anonymous",
        }
    }
}

/// Why a call is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    #[error("no client certificate")]
    Unauthenticated,
    #[error("{who} may not {what}")]
    PermissionDenied { who: String, what: String },
}

/// What a caller is allowed, resolved from the config.
#[derive(Debug, Clone)]
pub struct Grant {
    pub caller: Caller,
    role: Role,
    stages: Vec<String>,
}

impl Grant {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Reading state: any known identity.
    pub fn read(&self) -> Result<(), Denied> {
        Ok(())
    }

    /// Any change at all: admins and owners (within their stages), never
    /// readers.
    pub fn mutate(&self, what: &str) -> Result<(), Denied> {
        if self.role == Role::Reader {
            return Err(self.deny(what));
        }
        Ok(())
    }

    /// Loading and unloading rootlets: admins only.
    pub fn admin(&self, what: &str) -> Result<(), Denied> {
        if self.is_admin() {
            return Ok(());
        }
        Err(self.deny(what))
    }

    /// Touching stage `name`, currently owned by `owner` (None: not linked).
    pub fn stage(&self, name: &str, owner: Option<&str>) -> Result<(), Denied> {
        if self.is_admin() {
            return Ok(());
        }
        let matches = self.stages.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        });
        let owns = owner.is_none_or(|o| o == self.caller.name());
        if self.role == Role::Owner && matches && owns {
            return Ok(());
        }
        Err(self.deny(&match owner {
            Some(o) if o != self.caller.name() => format!("touch stage `{name}` (owned by {o})"),
            _ => format!("touch stage `{name}`"),
        }))
    }

    fn deny(&self, what: &str) -> Denied {
        Denied::PermissionDenied {
            who: self.caller.name().to_owned(),
            what: what.to_owned(),
        }
    }
}

/// The identities the config knows.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    config: AuthzConfig,
}

impl Authz {
    pub fn new(config: AuthzConfig) -> Self {
        Authz { config }
    }

    /// What `caller` may do; unknown certificates get nothing.
    pub fn grant(&self, caller: Caller) -> Result<Grant, Denied> {
        match &caller {
            Caller::Anonymous => Err(Denied::Unauthenticated),
            Caller::Local => Ok(Grant {
                caller,
                role: Role::Admin,
                stages: vec![],
            }),
            Caller::Cert(name) => {
                let id = self
                    .config
                    .identity
                    .iter()
                    .find(|i| &i.name == name)
                    .ok_or_else(|| Denied::PermissionDenied {
                        who: name.clone(),
                        what: "call this agent (identity not in the authz config)".into(),
                    })?;
                Ok(Grant {
                    role: id.role,
                    stages: id.stages.clone(),
                    caller,
                })
            }
        }
    }
}

/// `[authz]`: who may do what, by client certificate identity. Callers on
/// the Unix socket are root on this host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzConfig {
    pub identity: Vec<IdentityConfig>,
}

/// One `[[authz.identity]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The client certificate's subject CN, or one of its DNS/URI SANs.
    pub name: String,
    pub role: Role,
    /// For owners: the stage names they may touch; a trailing `*` matches
    /// a prefix (`ddos-*`).
    #[serde(default)]
    pub stages: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including loading and unloading rootlets.
    Admin,
    /// Its own stages (`stages`), and reading.
    Owner,
    /// Reading only.
    Reader,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Owner => "owner",
            Role::Reader => "reader",
        })
    }
}

impl AuthzConfig {
    /// The identity named `name`, if the config lists it.
    pub fn find(&self, name: &str) -> Option<&IdentityConfig> {
        self.identity.iter().find(|i| i.name == name)
    }
}

impl IdentityConfig {
    /// Whether one of `stages` matches `stage` (exactly, or by prefix for a
    /// pattern ending in `*`). Says nothing about the role.
    pub fn matches_stage(&self, stage: &str) -> bool {
        self.stages.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => stage.starts_with(prefix),
            None => p == stage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authz() -> Authz {
        Authz::new(AuthzConfig {
            identity: vec![
                IdentityConfig {
                    name: "ops".into(),
                    role: Role::Admin,
                    stages: vec![],
                },
                IdentityConfig {
                    name: "team-ddos".into(),
                    role: Role::Owner,
                    stages: vec!["ddos".into(), "ddos-*".into()],
                },
                IdentityConfig {
                    name: "mon".into(),
                    role: Role::Reader,
                    stages: vec!["ddos".into()],
                },
            ],
        })
    }

    #[test]
    fn roles() {
        let a = authz();
        assert_eq!(
            a.grant(Caller::Anonymous).unwrap_err(),
            Denied::Unauthenticated
        );
        assert!(matches!(
            a.grant(Caller::Cert("stranger".into())),
            Err(Denied::PermissionDenied { .. })
        ));
        let ops = a.grant(Caller::Cert("ops".into())).unwrap();
        assert!(ops.admin("load").is_ok() && ops.stage("lb", Some("team-lb")).is_ok());
        let ddos = a.grant(Caller::Cert("team-ddos".into())).unwrap();
        assert!(ddos.admin("load").is_err());
        assert!(ddos.stage("ddos", None).is_ok());
        assert!(ddos.stage("ddos-v4", Some("team-ddos")).is_ok());
        assert!(
            ddos.stage("ddos", Some("team-lb")).is_err(),
            "someone else's stage of that name"
        );
        assert!(ddos.stage("lb", None).is_err());
        let mon = a.grant(Caller::Cert("mon".into())).unwrap();
        assert!(mon.read().is_ok() && mon.stage("ddos", None).is_err());
        assert!(a.grant(Caller::Local).unwrap().is_admin());
    }
}
