//! The policy RPCs' conversions: typed maps, dumps and policy applies
//! between the agent's types and rootlet.v1.

use rootlet_agent::{
    Agent, AgentError, Grant,
    policy::{AppliedMap, PolicyOutcome, PolicyView, TypedMap},
};
use rootlet_dataplane::policy;
use rootlet_proto::v1 as pb;

use super::convert;

type Result<T> = std::result::Result<T, AgentError>;

fn invalid(field: &str, message: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// The rootlet and stage a request names (a rootlet this agent does not
/// manage is NOT_FOUND).
fn stage_from(
    agent: &Agent,
    s: Option<pb::StageRef>,
) -> Result<(rootlet_dataplane::spec::RootletKey, String)> {
    let s = s.ok_or_else(|| invalid("stage", "required"))?;
    if s.stage.is_empty() {
        return Err(invalid("stage.stage", "a stage name is required"));
    }
    Ok((convert::known_key_from(agent, s.rootlet, false)?, s.stage))
}

fn schema_json(t: Option<&rootlet_schema::Type>) -> String {
    t.and_then(|t| serde_json::to_string(t).ok())
        .unwrap_or_default()
}

pub fn list_stage_maps(
    agent: &Agent,
    grant: &Grant,
    r: pb::ListStageMapsRequest,
) -> Result<pb::ListStageMapsResponse> {
    let (key, stage) = stage_from(agent, r.stage)?;
    let maps = agent.stage_maps(grant, key, &stage)?;
    let view = agent.policy(grant, key, &stage)?;
    let mut out = Vec::with_capacity(maps.len());
    for m in &maps {
        out.push(describe(m, &view)?);
    }
    Ok(pb::ListStageMapsResponse {
        rootlet_id: key.to_string(),
        stage,
        maps: out,
    })
}

fn describe(m: &TypedMap, view: &PolicyView) -> Result<pb::MapDescription> {
    let h = &m.handle;
    let entry = m.entry_schema();
    let policy_version = view
        .current
        .as_ref()
        .filter(|c| c.maps.iter().any(|a| a.name == h.name))
        .map_or(0, |c| c.version);
    let shape = match &h.inner {
        Some(i) => &i.info,
        None => &h.info,
    };
    Ok(pb::MapDescription {
        name: h.name.clone(),
        c_name: m
            .schema
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        id: h.id,
        map_type: rootlet_schema::MapType(shape.map_type).name().to_owned(),
        key_size: shape.key_size,
        value_size: shape.value_size,
        max_entries: shape.max_entries,
        map_flags: shape.map_flags,
        key_schema_json: schema_json(entry.map(|s| &s.key)),
        value_schema_json: schema_json(entry.map(|s| &s.value)),
        entries: policy::count(h)?,
        policy_map: h.is_policy(),
        inner_id: h.inner.as_ref().map_or(0, |i| i.id),
        policy_version,
    })
}

/// A page token: the inner map the page came from, and the page's last key.
fn token_from(t: &str) -> Result<Option<(u32, Vec<u8>)>> {
    if t.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token", "not a token a DumpMap response gave");
    let (inner, key) = t.split_once(':').ok_or_else(bad)?;
    Ok(Some((
        inner.parse().map_err(|_| bad())?,
        hex::decode(key).map_err(|_| bad())?,
    )))
}

pub fn dump_map(
    agent: &Agent,
    grant: &Grant,
    r: pb::DumpMapRequest,
) -> Result<pb::DumpMapResponse> {
    let (key, stage) = stage_from(agent, r.stage)?;
    if r.map.is_empty() {
        return Err(invalid("map", "a map name is required"));
    }
    let limit = match r.page_size as usize {
        0 => rootlet_agent::policy::DEFAULT_PAGE,
        n if n > rootlet_agent::policy::MAX_PAGE => {
            return Err(invalid(
                "page_size",
                format!("at most {}", rootlet_agent::policy::MAX_PAGE),
            ));
        }
        n => n,
    };
    let after = token_from(&r.page_token)?;
    let (entries, next, inner_id) = agent.dump_map(grant, key, &stage, &r.map, after, limit)?;
    Ok(pb::DumpMapResponse {
        entries: entries
            .into_iter()
            .map(|(k, v)| pb::MapEntry {
                key_json: k.to_string(),
                value_json: v.to_string(),
            })
            .collect(),
        next_page_token: next
            .map(|(inner, k)| format!("{inner}:{}", hex::encode(k)))
            .unwrap_or_default(),
        inner_id,
    })
}

fn map_result(m: &AppliedMap) -> pb::PolicyMapResult {
    pb::PolicyMapResult {
        map: m.name.clone(),
        atomic: m.atomic(),
        entries: m.entries,
        added: m.added,
        removed: m.removed,
        changed: m.changed,
        inner_id: m.inner_id.unwrap_or_default(),
    }
}

fn outcome_to(
    key: rootlet_dataplane::spec::RootletKey,
    o: &PolicyOutcome,
) -> pb::ApplyPolicyResponse {
    pb::ApplyPolicyResponse {
        rootlet_id: key.to_string(),
        stage: o.record.stage.clone(),
        version: o.record.version,
        digest: o.record.digest.clone(),
        previous_version: o.previous_version,
        noop: o.noop,
        maps: o.record.maps.iter().map(map_result).collect(),
        atomic: o.atomic(),
    }
}

pub fn apply_policy(
    agent: &Agent,
    grant: &Grant,
    r: pb::ApplyPolicyRequest,
) -> Result<pb::ApplyPolicyResponse> {
    let key = convert::known_key_from(agent, r.rootlet, false)?;
    if r.policy.is_empty() {
        return Err(invalid("policy", "a signed policy is required"));
    }
    let o = agent.apply_policy(grant, key, &r.policy, r.expected_version)?;
    Ok(outcome_to(key, &o))
}

pub fn rollback_policy(
    agent: &Agent,
    grant: &Grant,
    r: pb::RollbackPolicyRequest,
) -> Result<pb::ApplyPolicyResponse> {
    let (key, stage) = stage_from(agent, r.stage)?;
    let o = agent.rollback_policy(grant, key, &stage, r.to_version, r.expected_version)?;
    Ok(outcome_to(key, &o))
}

pub fn get_policy(
    agent: &Agent,
    grant: &Grant,
    r: pb::GetPolicyRequest,
) -> Result<pb::PolicyStatus> {
    let (key, stage) = stage_from(agent, r.stage)?;
    let view = agent.policy(grant, key, &stage)?;
    let current = view.current.as_ref();
    Ok(pb::PolicyStatus {
        rootlet_id: key.to_string(),
        stage,
        version: view.version(),
        digest: current.map(|c| c.digest.clone()).unwrap_or_default(),
        drift: view.drift.clone().unwrap_or_default(),
        history: view
            .history
            .iter()
            .map(|h| pb::PolicyVersion {
                version: h.version,
                digest: h.digest.clone(),
                applied_at_unix_ms: h.applied_at_unix_ms,
                applied_by: h.applied_by.clone(),
                current: current.is_some_and(|c| c.digest == h.digest),
            })
            .collect(),
        maps: current
            .map(|c| c.maps.iter().map(map_result).collect())
            .unwrap_or_default(),
    })
}
