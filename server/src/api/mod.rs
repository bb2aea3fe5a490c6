//! The rootlet.v1 gRPC service: translates requests to agent calls and
//! agent errors to statuses. Every RPC goes through [`RootletService::call`]:
//! identity from the client certificate (or the Unix socket), authorization,
//! the blocking work on a blocking thread, the status mapping, metrics, and
//! an audit line for each mutation. Mutations with an idempotency key replay
//! the stored response when the same request comes again.
//!
//! **Architecture invariant:** this is the only layer that knows gRPC.

pub mod convert;
pub mod oversize;
pub mod policy;
pub mod single_flight;
pub mod status;
pub mod verifier_logs;

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use prost::Message;
use rootlet_proto::v1::{self as pb, rootlet_server::RootletServer};
use sha2::{Digest, Sha256};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::registry::Pulls;
use rootlet_agent::{Agent, AgentError, BundleSource, Caller, Grant, RollbackHow, StageOp};
use rootlet_dataplane::budget::{self, Step};

/// The Rootlet service as served: with message size limits, whose
/// violations answer RESOURCE_EXHAUSTED.
pub type Served = oversize::Mapped<RootletServer<RootletService>>;

/// Builds the service with message size limits.
pub fn service(
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    pulls: Arc<Pulls>,
    max_message_bytes: usize,
) -> Served {
    oversize::Mapped::new(
        RootletServer::new(RootletService {
            agent,
            metrics,
            pulls,
            verifier_logs: Arc::default(),
            flights: Arc::default(),
        })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes),
    )
}

#[derive(Clone)]
pub struct RootletService {
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    /// ApplyBundle by reference: the registries this agent may pull from.
    pulls: Arc<Pulls>,
    verifier_logs: Arc<verifier_logs::VerifierLogs>,
    /// Keyed calls under way (see [`single_flight`]).
    flights: Arc<single_flight::Flights>,
}

/// The identity of a client certificate: its subject CN, else its first DNS
/// or URI subject alternative name.
fn cert_identity(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(s) | GeneralName::URI(s) => Some((*s).to_owned()),
        _ => None,
    })
}

fn caller<T>(req: &Request<T>, insecure_tcp: bool) -> Caller {
    if req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .is_some()
    {
        return Caller::Local;
    }
    if let Some(certs) = req.peer_certs()
        && let Some(id) = certs.first().and_then(|c| cert_identity(c.as_ref()))
    {
        return Caller::Cert(id);
    }
    if insecure_tcp {
        // Plain TCP behind the explicit insecure flag: no identities exist.
        return Caller::Local;
    }
    Caller::Anonymous
}

fn hash(msg: &impl Message) -> String {
    hex::encode(Sha256::digest(msg.encode_to_vec()))
}

type Reply<T> = Result<Response<T>, Status>;

impl RootletService {
    /// Runs one RPC: authenticate and authorize, do `f` on a blocking thread,
    /// map errors, record metrics and (for mutations) an audit line.
    async fn call<Req, Resp>(
        &self,
        method: &'static str,
        mutation: bool,
        req: Request<Req>,
        f: impl FnOnce(&Agent, &Grant, Req) -> Result<Resp, AgentError> + Send + 'static,
    ) -> Reply<Resp>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
    {
        let start = Instant::now();
        let who = caller(&req, self.agent.insecure_tcp());
        let agent = self.agent.clone();
        let req = req.into_inner();
        let result = match agent.grant(who.clone()) {
            Err(e) => Err(status::status(&e)),
            Ok(grant) => {
                let joined = tokio::task::spawn_blocking(move || {
                    // A mutation is one timed change, from the RPC's arrival:
                    // the data plane's steps, the agent's store writes and
                    // the idempotency record join it (rootlet_apply_*).
                    let _timed = mutation.then(|| budget::begin_at(start));
                    f(&agent, &grant, req)
                })
                .await;
                match joined {
                    Ok(r) => r.map_err(|e| {
                        self.verifier_logs.record(&e);
                        status::status(&e)
                    }),
                    Err(e) => Err(Status::internal(format!("the call failed: {e}"))),
                }
            }
        };
        let code = result.as_ref().err().map_or(Code::Ok, Status::code);
        self.metrics.observe_rpc(method, code, start.elapsed());
        if mutation {
            // A change's loads inflated the heap: hand it back once idle.
            crate::memory::trim_when_idle();
            let outcome = result.as_ref().err().map_or_else(
                || "ok".to_owned(),
                |s| format!("{:?}: {}", s.code(), s.message()),
            );
            tracing::info!(target: "audit", who = who.name(), method, outcome = %outcome);
        }
        result.map(Response::new)
    }

    /// A mutation with an idempotency key: the same key and request return
    /// the stored response; the same key with another request is an error.
    /// One call per key runs at a time: a duplicate that arrives while the
    /// first runs waits for it and gets its outcome ([`single_flight`]).
    async fn idempotent<Req, Resp>(
        &self,
        method: &'static str,
        req: Request<Req>,
        key: impl Fn(&Req) -> &str + Send + 'static,
        f: impl FnOnce(&Agent, &Grant, Req) -> Result<Resp, AgentError> + Send + 'static,
    ) -> Reply<Resp>
    where
        Req: Message + Send + 'static,
        Resp: Message + Default + Send + 'static,
    {
        let k = key(req.get_ref()).to_owned();
        if k.is_empty() {
            return self.call(method, true, req, f).await;
        }
        let start = Instant::now();
        let who = caller(&req, self.agent.insecure_tcp());
        // The scope the store uses too: a key is the caller's own.
        let scope = format!("{method}\n{}", who.name());
        let h = hash(req.get_ref());
        let leader = match self.flights.join(&scope, &k, &h) {
            single_flight::Joined::Lead(leader) => leader,
            joined => {
                let outcome = match joined {
                    single_flight::Joined::Follow(slot) => single_flight::wait(slot).await,
                    _ => Err(status::status(&AgentError::IdempotencyConflict(k))),
                };
                let result = outcome.and_then(|bytes| {
                    Resp::decode(bytes.as_slice())
                        .map_err(|e| Status::internal(format!("the first call's response: {e}")))
                });
                let code = result.as_ref().err().map_or(Code::Ok, Status::code);
                self.metrics.observe_rpc(method, code, start.elapsed());
                tracing::info!(target: "audit", who = who.name(), method, outcome = "duplicate of a call under way", code = ?code);
                return result.map(Response::new);
            }
        };
        // The first call runs in its own task: if its client goes away, the
        // change still completes and its duplicates still get the answer.
        let this = self.clone();
        let run = tokio::spawn(async move {
            let result = this
                .call(method, true, req, move |agent, grant, req| {
                    if let Some(stored) = agent.idempotent_get(&scope, &k, &h)? {
                        return Resp::decode(stored.as_slice())
                            .map_err(|e| AgentError::NotFound(format!("stored response: {e}")));
                    }
                    let resp = f(agent, grant, req)?;
                    agent.idempotent_put(&scope, &k, &h, resp.encode_to_vec())?;
                    Ok(resp)
                })
                .await;
            leader.publish(match &result {
                Ok(resp) => Ok(resp.get_ref().encode_to_vec()),
                Err(s) => Err(s.clone()),
            });
            result
        });
        run.await
            .unwrap_or_else(|e| Err(Status::internal(format!("the call failed: {e}"))))
    }
}

/// One stage change on the rootlet `r` refers to, answered with the new state.
fn stage_change(
    agent: &Agent,
    grant: &Grant,
    r: Option<pb::RootletRef>,
    op: StageOp,
    expected: Option<u64>,
) -> Result<pb::ChangeResult, AgentError> {
    let key = convert::key_from(agent, r)?;
    let outcome = agent.change(grant, key, op, expected)?;
    let rootlet = budget::time(Step::Respond, || {
        convert::state_to(agent, &agent.dataplane().state(key)?)
    })?;
    Ok(pb::ChangeResult {
        generation: outcome.generation,
        rootlet: Some(rootlet),
        lease_id: outcome.lease.map(|l| l.id).unwrap_or_default(),
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type LeaseStream = Pin<Box<dyn Stream<Item = Result<pb::RenewLeaseResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::rootlet_server::Rootlet for RootletService {
    async fn get_capabilities(
        &self,
        req: Request<pb::GetCapabilitiesRequest>,
    ) -> Reply<pb::Capabilities> {
        self.call("GetCapabilities", false, req, |agent, grant, _| {
            grant.read()?;
            let caps = agent.dataplane().capabilities();
            let probe = |name: &str, p: &rootlet_dataplane::probe::Probe| pb::Probe {
                name: name.to_owned(),
                permitted: p.permitted(),
                reason: p.reason().unwrap_or_default(),
            };
            Ok(pb::Capabilities {
                kernel: caps.kernel.clone(),
                probes: vec![
                    probe("xdp", &caps.xdp),
                    probe("xdp_link", &caps.xdp_link),
                    probe("link_update", &caps.link_update),
                    probe("tail_call", &caps.tail_call),
                    probe("ext_load", &caps.ext_load),
                    probe("ext_attach", &caps.ext_attach),
                    probe("tcx", &caps.tcx),
                ],
                backend: agent
                    .dataplane()
                    .backend()
                    .map_or(pb::Backend::Unspecified, convert::backend_to)
                    as i32,
            })
        })
        .await
    }

    async fn load_rootlet(&self, req: Request<pb::LoadRootletRequest>) -> Reply<pb::RootletState> {
        self.idempotent(
            "LoadRootlet",
            req,
            |r| &r.idempotency_key,
            |agent, grant, r| {
                let spec = rootlet_dataplane::spec::RootletSpec {
                    iface: convert::interface_from(r.interface)?,
                    mode: convert::mode_from(r.mode)?,
                    final_verdict: convert::final_verdict_from(r.final_verdict)?,
                };
                let key = agent.load_rootlet(grant, spec)?;
                convert::state_to(agent, &agent.dataplane().state(key)?)
            },
        )
        .await
    }

    async fn list_rootlets(
        &self,
        req: Request<pb::ListRootletsRequest>,
    ) -> Reply<pb::ListRootletsResponse> {
        self.call("ListRootlets", false, req, |agent, grant, _| {
            let mut rootlets = vec![];
            for key in agent.list(grant)? {
                match agent.state(grant, key) {
                    Ok(s) => rootlets.push(convert::state_to(agent, &s)?),
                    // Unloaded since the list was taken.
                    Err(AgentError::Dataplane(rootlet_dataplane::Error::NoRootlet(_))) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(pb::ListRootletsResponse { rootlets })
        })
        .await
    }

    async fn get_rootlet(&self, req: Request<pb::GetRootletRequest>) -> Reply<pb::RootletState> {
        self.call("GetRootlet", false, req, |agent, grant, r| {
            let key = convert::key_from(agent, r.rootlet)?;
            convert::state_to(agent, &agent.state(grant, key)?)
        })
        .await
    }

    async fn unload_rootlet(
        &self,
        req: Request<pb::UnloadRootletRequest>,
    ) -> Reply<pb::UnloadRootletResponse> {
        self.idempotent(
            "UnloadRootlet",
            req,
            |r| &r.idempotency_key,
            |agent, grant, r| {
                let key = convert::key_from(agent, r.rootlet)?;
                agent.unload_rootlet(grant, key)?;
                Ok(pb::UnloadRootletResponse {})
            },
        )
        .await
    }

    async fn link_stage(&self, req: Request<pb::LinkStageRequest>) -> Reply<pb::ChangeResult> {
        self.idempotent(
            "LinkStage",
            req,
            |r| &r.idempotency_key,
            |agent, grant, r| {
                let (spec, lease) = convert::stage_from(r.stage)?;
                stage_change(
                    agent,
                    grant,
                    r.rootlet,
                    StageOp::Link { spec, lease },
                    r.expected_generation,
                )
            },
        )
        .await
    }

    async fn replace_stage(
        &self,
        req: Request<pb::ReplaceStageRequest>,
    ) -> Reply<pb::ChangeResult> {
        self.idempotent(
            "ReplaceStage",
            req,
            |r| &r.idempotency_key,
            |agent, grant, r| {
                let (spec, lease) = convert::stage_from(r.stage)?;
                stage_change(
                    agent,
                    grant,
                    r.rootlet,
                    StageOp::Replace { spec, lease },
                    r.expected_generation,
                )
            },
        )
        .await
    }

    async fn unlink_stage(&self, req: Request<pb::UnlinkStageRequest>) -> Reply<pb::ChangeResult> {
        self.idempotent(
            "UnlinkStage",
            req,
            |r| &r.idempotency_key,
            |agent, grant, r| {
                stage_change(
                    agent,
                    grant,
                    r.rootlet,
                    StageOp::Unlink { name: r.stage },
                    r.expected_generation,
                )
            },
        )
        .await
    }

    async fn set_stage_pin(&self, req: Request<pb::SetStagePinRequest>) -> Reply<pb::ChangeResult> {
        self.idempotent(
            "SetStagePin",
            req,
            |r| &r.idempotency_key,
            |agent, grant, r| {
                let op = StageOp::SetPin {
                    name: r.stage,
                    pin: r.pin,
                };
                stage_change(agent, grant, r.rootlet, op, r.expected_generation)
            },
        )
        .await
    }

    async fn rollback_rootlet(
        &self,
        req: Request<pb::RollbackRootletRequest>,
    ) -> Reply<pb::RollbackRootletResponse> {
        self.idempotent(
            "RollbackRootlet",
            req,
            |r| &r.idempotency_key,
            |agent, grant, r| {
                let key = convert::key_from(agent, r.rootlet)?;
                let done = agent.rollback_rootlet(grant, key, r.expected_generation)?;
                let rootlet = budget::time(Step::Respond, || {
                    convert::state_to(agent, &agent.dataplane().state(key)?)
                })?;
                let how = match done.how {
                    RollbackHow::Instant => pb::RollbackHow::Instant,
                    RollbackHow::Rebuilt => pb::RollbackHow::Rebuilt,
                };
                Ok(pb::RollbackRootletResponse {
                    generation: done.generation,
                    how: how as i32,
                    rootlet: Some(rootlet),
                    restored_generation: done.restored,
                })
            },
        )
        .await
    }

    async fn get_stats(&self, req: Request<pb::GetStatsRequest>) -> Reply<pb::GetStatsResponse> {
        self.call("GetStats", false, req, |agent, grant, r| {
            let key = convert::key_from(agent, r.rootlet)?;
            let s = agent.state(grant, key)?;
            Ok(pb::GetStatsResponse {
                rootlet_id: key.to_string(),
                generation: s.generation,
                slots: s
                    .slots
                    .iter()
                    .map(|slot| pb::SlotStats {
                        slot: slot.slot,
                        stage: slot.stage.clone(),
                        counters: Some(convert::counters_to(&slot.counters)),
                        uncounted: !slot.counted,
                        counters_since_generation: slot.linked_generation,
                    })
                    .collect(),
                final_verdict_count: s.final_verdict_count,
            })
        })
        .await
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Reply<Self::WatchStream> {
        let mut events = self.agent.subscribe();
        let snapshot = self
            .call("Watch", false, req, |agent, grant, r| {
                let only = match r.rootlet {
                    Some(r) => Some(convert::known_key_from(agent, Some(r), false)?),
                    None => None,
                };
                let mut snap = vec![];
                for key in agent.list(grant)? {
                    if only.is_none_or(|o| o == key) {
                        let state = agent
                            .state(grant, key)
                            .ok()
                            .map(|s| convert::state_to(agent, &s))
                            .transpose()?;
                        snap.push(pb::WatchEvent {
                            rootlet_id: key.to_string(),
                            cause: "snapshot".into(),
                            rootlet: state,
                        });
                    }
                }
                Ok((only, snap))
            })
            .await?
            .into_inner();
        let (only, snap) = snapshot;
        let agent = self.agent.clone();
        let live = async_stream(move |tx| async move {
            loop {
                // Ends when the watcher goes away: this task must not keep
                // the agent (and its stores) alive after shutdown.
                let received = tokio::select! {
                    r = events.recv() => r,
                    () = tx.closed() => return,
                };
                let event = match received {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell behind by {n} events; watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(_) => return,
                };
                if only.is_some_and(|o| o != event.key) {
                    continue;
                }
                let agent = agent.clone();
                let key = event.key;
                let state = tokio::task::spawn_blocking(move || {
                    agent
                        .dataplane()
                        .state(key)
                        .ok()
                        .and_then(|s| convert::state_to(&agent, &s).ok())
                })
                .await
                .ok()
                .flatten();
                let ev = pb::WatchEvent {
                    rootlet_id: key.to_string(),
                    cause: event.cause.into(),
                    rootlet: state,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        let stream = futures::stream::iter(snap.into_iter().map(Ok)).chain(live);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Reply<pb::RenewLeaseResponse> {
        self.call("RenewLease", false, req, |agent, grant, r| {
            let lease = agent.renew_lease(grant, &r.lease_id)?;
            Ok(pb::RenewLeaseResponse {
                lease_id: lease.id.clone(),
                expires_unix_ms: lease.expires_unix_ms(),
            })
        })
        .await
    }

    type KeepAliveStream = LeaseStream;

    async fn keep_alive(
        &self,
        req: Request<Streaming<pb::RenewLeaseRequest>>,
    ) -> Reply<Self::KeepAliveStream> {
        let who = caller(&req, self.agent.insecure_tcp());
        let grant = self.agent.grant(who).map_err(|e| status::status(&e))?;
        let agent = self.agent.clone();
        let mut incoming = req.into_inner();
        let out = async_stream(move |tx| async move {
            // Bounded by the client: the stream ends when it closes or errs.
            while let Some(Ok(r)) = incoming.next().await {
                let reply = agent
                    .renew_lease(&grant, &r.lease_id)
                    .map(|l| pb::RenewLeaseResponse {
                        lease_id: l.id.clone(),
                        expires_unix_ms: l.expires_unix_ms(),
                    })
                    .map_err(|e| status::status(&e));
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn get_verifier_log(
        &self,
        req: Request<pb::GetVerifierLogRequest>,
    ) -> Reply<pb::VerifierLog> {
        let logs = self.verifier_logs.clone();
        self.call("GetVerifierLog", false, req, move |_, grant, r| {
            grant.read()?;
            logs.get(&r.stage)
        })
        .await
    }

    async fn has_bundle(&self, req: Request<pb::HasBundleRequest>) -> Reply<pb::HasBundleResponse> {
        self.call("HasBundle", false, req, |agent, grant, r| {
            grant.read()?;
            Ok(pb::HasBundleResponse {
                present: agent.has_bundle(&convert::digest_from("digest", &r.digest)?)?,
            })
        })
        .await
    }

    async fn apply_bundle(
        &self,
        req: Request<pb::ApplyBundleRequest>,
    ) -> Reply<pb::ApplyBundleResponse> {
        let metrics = self.metrics.clone();
        let pulls = self.pulls.clone();
        self.idempotent(
            "ApplyBundle",
            req,
            |r| &r.idempotency_key,
            move |agent, grant, r| {
                let source = match r.source {
                    Some(pb::apply_bundle_request::Source::Bundle(b)) => BundleSource::Bytes(b),
                    Some(pb::apply_bundle_request::Source::Digest(d)) => {
                        BundleSource::Digest(convert::digest_from("digest", &d)?)
                    }
                    // Inside the idempotent call: a retry with the key gets
                    // the first call's answer and pulls nothing. A reader
                    // is refused before anything is fetched.
                    Some(pb::apply_bundle_request::Source::Reference(reference)) => {
                        grant.mutate("apply bundles")?;
                        let pulled = pulls.fetch_blocking(&reference);
                        match &pulled {
                            Ok(bytes) => metrics.observe_pull("ok", bytes.len()),
                            Err(e) => metrics.observe_pull(status::reason_of(e), 0),
                        }
                        BundleSource::Bytes(pulled?)
                    }
                    None => {
                        return Err(AgentError::InvalidArgument {
                            field: "source".into(),
                            message: "a bundle or a digest is required".into(),
                        });
                    }
                };
                let expected: BTreeMap<String, u64> = r.expected_generations.into_iter().collect();
                let outcome = agent.apply_bundle(grant, source, &expected, &r.idempotency_key);
                record_apply(&metrics, agent, &outcome);
                apply_response(outcome?)
            },
        )
        .await
    }

    async fn get_apply_status(
        &self,
        req: Request<pb::GetApplyStatusRequest>,
    ) -> Reply<pb::ApplyStatus> {
        self.call("GetApplyStatus", false, req, |agent, grant, r| {
            grant.read()?;
            let key = convert::known_key_from(agent, r.rootlet, true)?;
            Ok(convert::status_to(
                key,
                &agent.apply_status(key, &r.idempotency_key)?,
            ))
        })
        .await
    }

    async fn list_bundles(
        &self,
        req: Request<pb::ListBundlesRequest>,
    ) -> Reply<pb::ListBundlesResponse> {
        self.call("ListBundles", false, req, |agent, grant, _| {
            let mut bundles = vec![];
            for (name, history) in agent.list_bundles(grant)? {
                for (i, h) in history.into_iter().enumerate() {
                    bundles.push(pb::BundleInfo {
                        name: name.clone(),
                        version: h.version,
                        digest: h.digest,
                        applied_at_unix_ms: h.applied_at_unix_ms,
                        current: i == 0 && !h.removed,
                        removed: i == 0 && h.removed,
                    });
                }
            }
            bundles.sort_by_key(|b| std::cmp::Reverse(b.applied_at_unix_ms));
            Ok(pb::ListBundlesResponse { bundles })
        })
        .await
    }

    async fn rollback(&self, req: Request<pb::RollbackRequest>) -> Reply<pb::ApplyBundleResponse> {
        let metrics = self.metrics.clone();
        self.idempotent(
            "Rollback",
            req,
            |r| &r.idempotency_key,
            move |agent, grant, r| {
                let to = convert::optional_digest_from("to_digest", &r.to_digest)?;
                let outcome = agent.rollback(grant, &r.name, to.as_deref(), &r.idempotency_key);
                record_apply(&metrics, agent, &outcome);
                apply_response(outcome?)
            },
        )
        .await
    }

    async fn remove_bundle(
        &self,
        req: Request<pb::RemoveBundleRequest>,
    ) -> Reply<pb::ApplyBundleResponse> {
        let metrics = self.metrics.clone();
        self.idempotent(
            "RemoveBundle",
            req,
            |r| &r.idempotency_key,
            move |agent, grant, r| {
                let expected =
                    convert::optional_digest_from("expected_digest", &r.expected_digest)?;
                let outcome =
                    agent.remove_bundle(grant, &r.name, expected.as_deref(), &r.idempotency_key);
                record_apply(&metrics, agent, &outcome);
                apply_response(outcome?)
            },
        )
        .await
    }
    async fn list_stage_maps(
        &self,
        req: Request<pb::ListStageMapsRequest>,
    ) -> Reply<pb::ListStageMapsResponse> {
        self.call("ListStageMaps", false, req, policy::list_stage_maps)
            .await
    }

    async fn dump_map(&self, req: Request<pb::DumpMapRequest>) -> Reply<pb::DumpMapResponse> {
        self.call("DumpMap", false, req, policy::dump_map).await
    }

    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Reply<pb::ApplyPolicyResponse> {
        self.idempotent(
            "ApplyPolicy",
            req,
            |r| &r.idempotency_key,
            policy::apply_policy,
        )
        .await
    }

    async fn get_policy(&self, req: Request<pb::GetPolicyRequest>) -> Reply<pb::PolicyStatus> {
        self.call("GetPolicy", false, req, policy::get_policy).await
    }

    async fn rollback_policy(
        &self,
        req: Request<pb::RollbackPolicyRequest>,
    ) -> Reply<pb::ApplyPolicyResponse> {
        self.idempotent(
            "RollbackPolicy",
            req,
            |r| &r.idempotency_key,
            policy::rollback_policy,
        )
        .await
    }
}

fn record_apply(
    metrics: &Metrics,
    agent: &Agent,
    outcome: &Result<rootlet_agent::ApplyOutcome, AgentError>,
) {
    match outcome {
        Ok(o) if o.noop => metrics.observe_apply("noop"),
        Ok(o) if o.removed => {
            metrics.observe_apply("removed");
            // Only this bundle's series: another bundle on the same rootlet
            // still runs there.
            for (key, _, _) in &o.rootlets {
                metrics.clear_applied_version(&key.to_string(), &o.name);
            }
        }
        Ok(o) => {
            metrics.observe_apply("ack");
            for (key, _, _) in &o.rootlets {
                if agent.status(*key).is_ok() {
                    metrics.set_applied_version(&key.to_string(), &o.name, &o.version);
                }
            }
        }
        // A refusal whose undo left rootlets running part of the bundle is
        // its own outcome, as in the apply status: not a clean NACK.
        Err(AgentError::Nack { unrestored, .. }) if !unrestored.is_empty() => {
            metrics.observe_apply("undo_failed")
        }
        Err(_) => metrics.observe_apply("nack"),
    }
}

fn apply_response(o: rootlet_agent::ApplyOutcome) -> Result<pb::ApplyBundleResponse, AgentError> {
    Ok(pb::ApplyBundleResponse {
        digest: o.digest,
        version: o.version,
        noop: o.noop,
        removed: o.removed,
        rootlets: o
            .rootlets
            .into_iter()
            .map(|(key, generation, changed)| pb::RootletOutcome {
                rootlet_id: key.to_string(),
                generation,
                changed,
            })
            .collect(),
    })
}

/// A stream fed by a task through a small bounded channel.
fn async_stream<T: Send + 'static, F: std::future::Future<Output = ()> + Send + 'static>(
    producer: impl FnOnce(tokio::sync::mpsc::Sender<T>) -> F,
) -> impl Stream<Item = T> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(producer(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How long a lease stage may go unrenewed, at most (re-exported for docs).
pub const MAX_LEASE: Duration = rootlet_agent::MAX_LEASE;
