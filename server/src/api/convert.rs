//! Translation between rootlet.v1 messages and the agent's and data plane's
//! types. Invalid input becomes `AgentError::InvalidArgument` naming the
//! field.

use std::{sync::Arc, time::Duration};

use rootlet_proto::v1 as pb;

use rootlet_agent::{Agent, AgentError, Attempt, Result, StatusView, unix_ms};
use rootlet_dataplane::{
    spec::{
        ActionSet, Backend, InterfaceRef, MapPolicy, RootletKey, StageSpec, XdpAction, XdpMode,
    },
    state::{Counters, ProgState, RootletState},
};

fn invalid(field: &str, message: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// An action; UNSPECIFIED is invalid here (see [`final_verdict_from`]).
pub fn action_from(field: &str, v: i32) -> Result<XdpAction> {
    let a =
        pb::XdpAction::try_from(v).map_err(|_| invalid(field, format!("unknown action {v}")))?;
    Ok(match a {
        pb::XdpAction::Unspecified => {
            return Err(invalid(field, "XDP_ACTION_UNSPECIFIED is not an action"));
        }
        pb::XdpAction::Aborted => XdpAction::Aborted,
        pb::XdpAction::Drop => XdpAction::Drop,
        pb::XdpAction::Pass => XdpAction::Pass,
        pb::XdpAction::Tx => XdpAction::Tx,
        pb::XdpAction::Redirect => XdpAction::Redirect,
    })
}

/// A rootlet's final verdict: unspecified (proto3's zero, what a caller
/// that leaves the field unset sends) is PASS, never a verdict that drops.
pub fn final_verdict_from(v: i32) -> Result<XdpAction> {
    if v == pb::XdpAction::Unspecified as i32 {
        return Ok(XdpAction::Pass);
    }
    action_from("final_verdict", v)
}

pub fn action_to(a: XdpAction) -> pb::XdpAction {
    match a {
        XdpAction::Aborted => pb::XdpAction::Aborted,
        XdpAction::Drop => pb::XdpAction::Drop,
        XdpAction::Pass => pb::XdpAction::Pass,
        XdpAction::Tx => pb::XdpAction::Tx,
        XdpAction::Redirect => pb::XdpAction::Redirect,
    }
}

pub fn mode_from(v: i32) -> Result<XdpMode> {
    match pb::XdpMode::try_from(v).map_err(|_| invalid("mode", format!("unknown mode {v}")))? {
        pb::XdpMode::Unspecified | pb::XdpMode::Auto => Ok(XdpMode::Auto),
        pb::XdpMode::Driver => Ok(XdpMode::Driver),
        pb::XdpMode::Generic => Ok(XdpMode::Generic),
    }
}

fn mode_to(m: XdpMode) -> pb::XdpMode {
    match m {
        XdpMode::Auto => pb::XdpMode::Auto,
        XdpMode::Driver => pb::XdpMode::Driver,
        XdpMode::Generic => pb::XdpMode::Generic,
    }
}

pub fn backend_to(b: Backend) -> pb::Backend {
    match b {
        Backend::Freplace => pb::Backend::Freplace,
        Backend::TailCall => pb::Backend::Tailcall,
    }
}

pub fn interface_from(i: Option<pb::Interface>) -> Result<InterfaceRef> {
    let i = i.ok_or_else(|| invalid("interface", "required"))?;
    if i.ifname.is_empty() || i.ifname.len() > 15 {
        return Err(invalid("interface.ifname", "1 to 15 characters"));
    }
    Ok(InterfaceRef {
        netns: (!i.netns.is_empty()).then(|| i.netns.into()),
        ifname: i.ifname,
    })
}

/// A digest from a request, in its canonical form (bare lowercase hex):
/// `sha256:<hex>` is accepted too, anything else is INVALID_ARGUMENT.
pub fn digest_from(field: &str, s: &str) -> Result<String> {
    rootlet_bundle::Digest::parse(s)
        .map(|d| d.canonical())
        .map_err(|e| invalid(field, e.to_string()))
}

/// [`digest_from`] for a field where empty means "not set".
pub fn optional_digest_from(field: &str, s: &str) -> Result<Option<String>> {
    (!s.is_empty()).then(|| digest_from(field, s)).transpose()
}

/// Parses "netns:<inode>/if:<ifindex>" (what `RootletKey` displays).
pub fn parse_id(id: &str) -> Result<RootletKey> {
    let bad = || {
        invalid(
            "rootlet.id",
            format!("`{id}` is not of the form netns:<inode>/if:<ifindex>"),
        )
    };
    let (ns, ifx) = id.split_once('/').ok_or_else(bad)?;
    Ok(RootletKey {
        netns_ino: ns
            .strip_prefix("netns:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?,
        ifindex: ifx
            .strip_prefix("if:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?,
    })
}

/// Resolves a RootletRef (blocking: an interface is looked up in its netns).
pub fn key_from(agent: &Agent, r: Option<pb::RootletRef>) -> Result<RootletKey> {
    match r.and_then(|r| r.r#ref) {
        Some(pb::rootlet_ref::Ref::Id(id)) => parse_id(&id),
        Some(pb::rootlet_ref::Ref::Interface(i)) => agent.key_of(&interface_from(Some(i))?),
        None => Err(invalid("rootlet", "an id or an interface is required")),
    }
}

/// [`key_from`] for a read that names one rootlet: a rootlet this agent
/// does not manage is NOT_FOUND (ROOTLET_NOT_FOUND), never an empty answer.
/// `or_recorded`: a rootlet that is gone but whose apply status the agent
/// still holds (a failed first install undone) counts as known.
pub fn known_key_from(
    agent: &Agent,
    r: Option<pb::RootletRef>,
    or_recorded: bool,
) -> Result<RootletKey> {
    let key = key_from(agent, r)?;
    if agent.dataplane().list().contains(&key) || (or_recorded && agent.has_status(key)?) {
        Ok(key)
    } else {
        Err(AgentError::Dataplane(rootlet_dataplane::Error::NoRootlet(
            key,
        )))
    }
}

/// A stage from the API: object bytes, program, placement, terms.
pub fn stage_from(s: Option<pb::Stage>) -> Result<(StageSpec, Option<Duration>)> {
    let s = s.ok_or_else(|| invalid("stage", "required"))?;
    if s.object.is_empty() {
        return Err(invalid("stage.object", "an ELF object is required"));
    }
    if s.program.is_empty() {
        return Err(invalid("stage.program", "required"));
    }
    let proceed_on = if s.proceed_on.is_empty() {
        ActionSet::default()
    } else {
        ActionSet::of(
            &s.proceed_on
                .iter()
                .map(|&a| action_from("stage.proceed_on", a))
                .collect::<Result<Vec<_>>>()?,
        )
    };
    let maps = match pb::MapPolicy::try_from(s.maps)
        .map_err(|_| invalid("stage.maps", "unknown map policy"))?
    {
        pb::MapPolicy::Unspecified | pb::MapPolicy::Fresh => MapPolicy::Fresh,
        pb::MapPolicy::Keep => MapPolicy::Keep,
    };
    let lease = (s.lease_seconds > 0).then(|| Duration::from_secs(u64::from(s.lease_seconds)));
    Ok((
        StageSpec {
            name: s.name,
            object: Arc::new(s.object),
            program: s.program,
            priority: s.priority,
            proceed_on,
            pin: s.pin,
            maps,
            owner: String::new(),
        },
        lease,
    ))
}

fn prog_to(p: &ProgState) -> pb::Program {
    pb::Program {
        id: p.id,
        name: p.name.clone(),
        tag: p.tag.clone(),
        verified_insns: p.verified_insns,
        loaded_at_unix_ms: unix_ms(p.loaded_at),
    }
}

pub fn counters_to(c: &Counters) -> pb::Counters {
    pb::Counters {
        aborted: c.aborted,
        drop: c.drop,
        pass: c.pass,
        tx: c.tx,
        redirect: c.redirect,
        empty: c.empty,
    }
}

fn attempt_to(a: &Attempt) -> pb::Attempt {
    pb::Attempt {
        version: a.version.clone(),
        outcome: a.outcome.clone(),
        error: a.error.clone(),
        at_unix_ms: a.at_unix_ms,
        digest: a.digest.clone(),
        idempotency_key: a.idempotency_key.clone(),
    }
}

/// Every bundle applied on a rootlet, by name.
fn applied_to(s: &rootlet_agent::ApplyStatus) -> Vec<pb::AppliedBundle> {
    s.applied
        .iter()
        .filter(|(_, a)| !a.digest.is_empty())
        .map(|(name, a)| pb::AppliedBundle {
            name: name.clone(),
            version: a.version.clone(),
            digest: a.digest.clone(),
        })
        .collect()
}

pub fn status_to(key: RootletKey, v: &StatusView) -> pb::ApplyStatus {
    let s = &v.status;
    pb::ApplyStatus {
        rootlet_id: key.to_string(),
        applied_version: s.applied_version.clone(),
        applied_digest: s.applied_digest.clone(),
        last_attempt: s.last_attempt.as_ref().map(attempt_to),
        bundle: s.bundle.clone(),
        drift: v
            .drift
            .iter()
            .map(|d| pb::StageDrift {
                bundle: d.bundle.clone(),
                stage: d.stage.clone(),
                expected_digest: d.expected_digest.clone(),
                running_digest: d.running_digest.clone(),
                reason: d.reason.clone(),
            })
            .collect(),
        keyed_attempt: v.keyed.as_ref().map(attempt_to),
        undo: s.undo.as_ref().map(|u| pb::UndoOutstanding {
            bundle: u.bundle.clone(),
            version: u.version.clone(),
            error: u.error.clone(),
            attempts: u.attempts,
            since_unix_ms: u.since_unix_ms,
            last_attempt_unix_ms: u.last_attempt_unix_ms,
        }),
        applied: applied_to(s),
    }
}

/// The full state of a rootlet: the kernel's view plus leases and the
/// bundle status.
pub fn state_to(agent: &Agent, s: &RootletState) -> Result<pb::RootletState> {
    let status = agent.status(s.key)?;
    Ok(pb::RootletState {
        id: s.key.to_string(),
        interface: Some(pb::Interface {
            netns: s
                .netns
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ifname: s.ifname.clone(),
        }),
        backend: backend_to(s.backend) as i32,
        mode: mode_to(s.mode) as i32,
        final_verdict: action_to(s.final_verdict) as i32,
        generation: s.generation,
        // Absent: a drifted rootlet whose program the kernel no longer holds.
        rootlet: (s.rootlet.id != 0).then(|| prog_to(&s.rootlet)),
        xdp_link_id: s.xdp_link_id,
        drift: s.drift.clone().unwrap_or_default(),
        slots: s
            .slots
            .iter()
            .map(|slot| {
                let lease = agent.lease_of(s.key, &slot.stage);
                let policy = agent.policy_version(s.key, &slot.stage);
                pb::Slot {
                    slot: slot.slot,
                    position: slot.position as u32,
                    stage: slot.stage.clone(),
                    owner: slot.owner.clone(),
                    priority: slot.priority,
                    proceed_on: slot
                        .proceed_on
                        .iter()
                        .map(|&a| action_to(a) as i32)
                        .collect(),
                    digest: slot.digest.clone(),
                    pinned: slot.pinned,
                    program: slot.prog.as_ref().map(prog_to),
                    link_id: slot.link_id.unwrap_or_default(),
                    pin_path: slot
                        .pin_path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    counters: Some(counters_to(&slot.counters)),
                    lease_id: lease.as_ref().map(|l| l.id.clone()).unwrap_or_default(),
                    lease_expires_unix_ms: lease.as_ref().map_or(0, |l| l.expires_unix_ms()),
                    uncounted: !slot.counted,
                    policy_version: policy.0,
                    policy_digest: policy.1,
                    counters_since_generation: slot.linked_generation,
                    loaded_generation: slot.loaded_generation,
                    instances: slot
                        .instances
                        .iter()
                        .map(|i| pb::ProgramInstance {
                            parity: i.parity,
                            program_id: i.id,
                            live: i.live,
                        })
                        .collect(),
                    maps: slot
                        .maps
                        .iter()
                        .map(|m| pb::StageMap {
                            name: m.name.clone(),
                            id: m.id,
                            shared_with: m.shared_with.clone(),
                        })
                        .collect(),
                }
            })
            .collect(),
        applied_version: status.applied_version.clone(),
        last_attempt: status.last_attempt.as_ref().map(attempt_to),
        final_verdict_count: s.final_verdict_count,
        applied: applied_to(&status),
    })
}
