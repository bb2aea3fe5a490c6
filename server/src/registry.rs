//! The agent's side of ApplyBundle by reference: pull a signed bundle from
//! an allow-listed OCI registry, then hand its bytes to the agent, which
//! verifies them exactly as uploaded bytes.
//!
//! The pull itself is `rootlet-oci` (the client `rootletctl bundle pull`
//! uses): it checks the reference's manifest digest, that the manifest is
//! a Rootlet artifact, the layer's size bound and the layer's digest,
//! before returning a byte. What this module adds is the agent's policy:
//! only references pinned by digest, only registries its `[[registry]]`
//! configuration lists (each with its CA, credentials and timeout), and an
//! overall bound on one pull. It lives in the API layer because the agent
//! crate has no HTTP stack (scripts/check-layers.sh).
//!
//! A failure is an [`AgentError::Fetch`] with a [`FetchFailure`]; the one
//! status mapping (`api::status`) turns it into a code and a reason.

use std::collections::BTreeMap;
use std::time::Duration;

use rootlet_agent::{AgentError, FetchFailure};
use rootlet_oci::{BundleRef, OciError, Registry, RegistryOptions};

use crate::config::RegistryConfig;

/// One pull may take this many times the registry's timeout in all (the
/// timeout bounds connecting and each read; a registry that sends a byte
/// just within it each time would otherwise hold the call for ever).
const WHOLE_PULL_TIMEOUTS: u32 = 10;

/// The registries an agent may pull from, by `host[:port]`.
#[derive(Debug, Default)]
pub struct Pulls {
    allowed: BTreeMap<String, RegistryOptions>,
}

impl Pulls {
    /// From the `[[registry]]` tables (already validated).
    pub fn new(registries: &[RegistryConfig]) -> Pulls {
        Pulls {
            allowed: registries
                .iter()
                .map(|r| {
                    let opts = RegistryOptions {
                        ca: r.ca.clone(),
                        credentials: r.credentials.clone(),
                        insecure_http: false,
                        timeout: Some(Duration::from_secs(r.timeout_seconds)),
                    };
                    (r.host.clone(), opts)
                })
                .collect(),
        }
    }

    /// Pulls the signed bundle `reference` names, on the calling thread: a
    /// blocking thread of the runtime (the API runs agent calls there).
    ///
    /// # Errors
    ///
    /// [`AgentError::Fetch`].
    pub fn fetch_blocking(&self, reference: &str) -> Result<Vec<u8>, AgentError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| {
            failed(
                reference,
                FetchFailure::Registry,
                format!("no runtime to pull on: {e}"),
            )
        })?;
        handle.block_on(self.fetch(reference))
    }

    /// Pulls the signed bundle `reference` names.
    ///
    /// # Errors
    ///
    /// [`AgentError::Fetch`].
    pub async fn fetch(&self, reference: &str) -> Result<Vec<u8>, AgentError> {
        let r = BundleRef::parse_pinned(reference)
            .map_err(|e| failed(reference, FetchFailure::Reference, e.to_string()))?;
        let Some(opts) = self.allowed.get(r.registry()) else {
            let listed: Vec<&str> = self.allowed.keys().map(String::as_str).collect();
            return Err(failed(
                reference,
                FetchFailure::NotAllowed,
                format!(
                    "registry {} is not in this agent's [[registry]] allow-list ({})",
                    r.registry(),
                    if listed.is_empty() {
                        "none is listed".to_owned()
                    } else {
                        format!("listed: {}", listed.join(", "))
                    }
                ),
            ));
        };
        let client = Registry::new(opts).map_err(|e| oci_failure(reference, e))?;
        let whole = opts
            .timeout
            .unwrap_or(Duration::from_secs(
                crate::config::DEFAULT_REGISTRY_TIMEOUT_SECONDS,
            ))
            .saturating_mul(WHOLE_PULL_TIMEOUTS);
        match tokio::time::timeout(whole, client.pull(&r)).await {
            Ok(pulled) => pulled.map_err(|e| oci_failure(reference, e)),
            Err(_) => Err(failed(
                reference,
                FetchFailure::Unavailable,
                format!(
                    "registry {} did not finish sending it within {} s",
                    r.registry(),
                    whole.as_secs()
                ),
            )),
        }
    }
}

fn failed(reference: &str, failure: FetchFailure, detail: String) -> AgentError {
    AgentError::Fetch {
        reference: reference.to_owned(),
        failure,
        detail,
    }
}

fn oci_failure(reference: &str, e: OciError) -> AgentError {
    let failure = match &e {
        OciError::Reference { .. } | OciError::NotByDigest(_) => FetchFailure::Reference,
        // The agent's own files for this registry: its configuration,
        // not the registry, is what an operator must fix.
        OciError::Io { .. } | OciError::Credentials { .. } | OciError::Denied { .. } => {
            FetchFailure::Denied
        }
        OciError::Unavailable { .. } => FetchFailure::Unavailable,
        OciError::Tls { .. } => FetchFailure::Tls,
        OciError::NotFound { .. } => FetchFailure::NotFound,
        OciError::DigestMismatch { .. } => FetchFailure::DigestMismatch,
        OciError::NotABundle { .. } => FetchFailure::NotABundle,
        OciError::TooLarge { .. } => FetchFailure::TooLarge,
        OciError::Registry { .. } => FetchFailure::Registry,
    };
    failed(reference, failure, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure_of(r: Result<Vec<u8>, AgentError>) -> FetchFailure {
        match r {
            Err(AgentError::Fetch { failure, .. }) => failure,
            other => panic!("expected a fetch failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn only_pinned_references_to_listed_registries_are_pulled() {
        let pulls = Pulls::new(&[RegistryConfig {
            host: "127.0.0.1:1".into(),
            ca: None,
            credentials: None,
            timeout_seconds: 1,
        }]);
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            failure_of(pulls.fetch("127.0.0.1:1/fleet/edge:1.0").await),
            FetchFailure::Reference
        );
        assert_eq!(
            failure_of(pulls.fetch("bundle.rlb").await),
            FetchFailure::Reference
        );
        let unlisted = pulls
            .fetch(&format!("registry.example:5000/fleet/edge@{digest}"))
            .await;
        let Err(AgentError::Fetch {
            failure: FetchFailure::NotAllowed,
            detail,
            ..
        }) = unlisted
        else {
            panic!("{unlisted:?}");
        };
        assert!(detail.contains("registry.example:5000"), "{detail}");
        assert!(detail.contains("listed: 127.0.0.1:1"), "{detail}");
        assert_eq!(
            failure_of(
                Pulls::default()
                    .fetch(&format!("127.0.0.1:1/x@{digest}"))
                    .await
            ),
            FetchFailure::NotAllowed
        );
    }
}
