//! Policies end to end: a real rootletd (in-process, and as a process for
//! the crash test) on loopback with mTLS, the ddos sample stage on a
//! rootlet on a veth pair in fresh namespaces, real packets, and policies
//! signed with the key the agent trusts.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use rootlet_bundle::policy::{PolicyDocument, SignedPolicy};
use rootlet_integration_tests::{
    agentd::{Agent, restart, serving},
    api::{self, bad_fields, link, reason, stage},
    packet::seq_payload,
    rootletd::{exited, rootletd_with},
    traffic::RawSocket,
};
use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use tonic::{Code, transport::Channel};

const STAGE: &str = "a-ddos";
const MAP: &str = "ddos_blocklist";

/// A policy document for the ddos stage that blocks `prefixes`.
fn blocklist_text(stage: &str, version: u64, prefixes: &[&str]) -> String {
    let mut t = format!("stage = \"{stage}\"\nversion = {version}\n\n[maps.{MAP}]\nentries = [\n");
    for p in prefixes {
        t.push_str(&format!("  {{ key = \"{p}\", value = 0 }},\n"));
    }
    t.push_str("]\n");
    t
}

fn signed(a: &Agent, text: &str) -> Vec<u8> {
    let doc = PolicyDocument::parse(text, "test.toml").expect("a valid document");
    let mut s = SignedPolicy::new(doc);
    s.sign(&a.signing_key);
    s.to_bytes()
}

fn unsigned(text: &str) -> Vec<u8> {
    SignedPolicy::new(PolicyDocument::parse(text, "test.toml").expect("valid")).to_bytes()
}

fn apply(a: &Agent, bytes: Vec<u8>) -> pb::ApplyPolicyRequest {
    pb::ApplyPolicyRequest {
        rootlet: a.rootlet(),
        policy: bytes,
        ..Default::default()
    }
}

fn stage_ref(a: &Agent, stage: &str) -> Option<pb::StageRef> {
    Some(pb::StageRef {
        rootlet: a.rootlet(),
        stage: stage.into(),
    })
}

async fn get_policy(c: &mut RootletClient<Channel>, a: &Agent) -> pb::PolicyStatus {
    c.get_policy(pb::GetPolicyRequest {
        stage: stage_ref(a, STAGE),
    })
    .await
    .expect("GetPolicy")
    .into_inner()
}

/// Every key of the blocklist, as DumpMap gives them, page by page.
async fn dumped(c: &mut RootletClient<Channel>, a: &Agent) -> Vec<String> {
    let mut keys = vec![];
    let mut token = String::new();
    for _ in 0..1000 {
        let page = c
            .dump_map(pb::DumpMapRequest {
                stage: stage_ref(a, STAGE),
                map: MAP.into(),
                page_token: token.clone(),
                page_size: 7,
            })
            .await
            .expect("DumpMap")
            .into_inner();
        for e in page.entries {
            let k: serde_json::Value = serde_json::from_str(&e.key_json).expect("json key");
            keys.push(k.as_str().expect("an LPM key is a string").to_owned());
        }
        if page.next_page_token.is_empty() {
            keys.sort();
            return keys;
        }
        token = page.next_page_token;
    }
    panic!("DumpMap never ended");
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

/// Sends `n` UDP frames from each source to the host.
fn send_from(a: &Agent, sources: &[Ipv4Addr], n: u64) {
    let raw = RawSocket::open(a.f.pair.peer(), a.f.pair.peer_if()).expect("raw");
    for &src in sources {
        for i in 0..n {
            let mut f = a.f.pair.udp_to_host(40000, 6000, seq_payload(i, 64));
            f.src_ip = src;
            raw.send(&f.to_bytes()).expect("send");
        }
    }
}

async fn counters(c: &mut RootletClient<Channel>, a: &Agent) -> pb::Counters {
    let s = c
        .get_stats(pb::GetStatsRequest {
            rootlet: a.rootlet(),
        })
        .await
        .expect("stats")
        .into_inner();
    s.slots
        .iter()
        .find(|x| x.stage == STAGE)
        .and_then(|x| x.counters)
        .expect("the ddos stage's counters")
}

/// The ddos stage's counters once `drop + pass` reaches `total` (bounded).
async fn counters_at(c: &mut RootletClient<Channel>, a: &Agent, total: u64) -> pb::Counters {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let k = counters(c, a).await;
        if k.drop + k.pass >= total || Instant::now() > end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return counters(c, a).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// ReplaceStage of the ddos stage with `object` and map policy `maps`.
async fn replace_ddos(
    c: &mut RootletClient<Channel>,
    a: &Agent,
    object: &str,
    maps: pb::MapPolicy,
) -> Result<pb::ChangeResult, tonic::Status> {
    let mut s = stage(STAGE, object, 10);
    s.maps = maps as i32;
    c.replace_stage(pb::ReplaceStageRequest {
        rootlet: a.rootlet(),
        stage: Some(s),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// An agent with a rootlet and team a's ddos stage linked.
async fn with_ddos() -> (Agent, RootletClient<Channel>) {
    with_ddos_edited(|_| {}).await
}

/// [`with_ddos`], with `edit` applied to the agent's configuration.
async fn with_ddos_edited(
    edit: impl Fn(&mut rootlet_server::config::Config),
) -> (Agent, RootletClient<Channel>) {
    let a = Agent::start_edited(80 << 20, edit).await;
    let mut ops = a.client("ops").await;
    a.load(&mut ops).await;
    let mut team_a = a.client("team-a").await;
    team_a
        .link_stage(link(a.rootlet(), stage(STAGE, "ddos", 10)))
        .await
        .expect("team a links its ddos stage");
    (a, team_a)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocklist_pushed_over_grpc_drops_exactly_those_sources() {
    let (a, mut team_a) = with_ddos().await;
    let blocked_host: Ipv4Addr = "192.0.2.7".parse().expect("ip");
    let in_blocked_net: Ipv4Addr = "198.51.100.200".parse().expect("ip");
    let allowed: Ipv4Addr = "203.0.113.9".parse().expect("ip");
    let next_to_blocked: Ipv4Addr = "192.0.2.8".parse().expect("ip");
    let all = [blocked_host, in_blocked_net, allowed, next_to_blocked];
    const N: u64 = 50;

    // No policy: an empty blocklist, everything passes.
    let none = get_policy(&mut team_a, &a).await;
    assert_eq!((none.version, none.digest.as_str()), (0, ""));
    send_from(&a, &all, N);
    let before = counters_at(&mut team_a, &a, 4 * N).await;
    assert_eq!((before.drop, before.pass), (0, 4 * N), "{before:?}");

    let v1 = blocklist_text(STAGE, 1, &["192.0.2.7/32", "198.51.100.0/24"]);
    let r = team_a
        .apply_policy(apply(&a, signed(&a, &v1)))
        .await
        .expect("team a applies its policy")
        .into_inner();
    assert_eq!((r.version, r.previous_version, r.noop), (1, 0, false));
    assert!(r.atomic, "one policy map, one swap: {r:?}");
    assert_eq!(r.maps.len(), 1);
    assert_eq!(
        (r.maps[0].map.as_str(), r.maps[0].entries, r.maps[0].added),
        (MAP, 2, 2)
    );

    send_from(&a, &all, N);
    let after = counters_at(&mut team_a, &a, 8 * N).await;
    assert_eq!(
        (after.drop - before.drop, after.pass - before.pass),
        (2 * N, 2 * N),
        "exactly the two blocked sources drop: {after:?}"
    );

    // What the agent reports is what the kernel holds.
    let p = get_policy(&mut team_a, &a).await;
    assert_eq!((p.version, p.drift.as_str()), (1, ""), "{p:?}");
    assert_eq!(p.digest, r.digest);
    assert_eq!(
        dumped(&mut team_a, &a).await,
        sorted(&["192.0.2.7/32", "198.51.100.0/24"])
    );
    let maps = team_a
        .list_stage_maps(pb::ListStageMapsRequest {
            stage: stage_ref(&a, STAGE),
        })
        .await
        .expect("ListStageMaps")
        .into_inner();
    let m = maps
        .maps
        .iter()
        .find(|m| m.name == MAP)
        .expect("the blocklist");
    assert!(m.policy_map, "{m:?}");
    assert_eq!(
        (m.map_type.as_str(), m.entries, m.policy_version),
        ("lpm_trie", 2, 1),
        "{m:?}"
    );
    assert_eq!(m.inner_id, r.maps[0].inner_id);
    assert!(m.key_schema_json.contains("prefixlen"), "{m:?}");
    let state = team_a
        .get_rootlet(pb::GetRootletRequest {
            rootlet: a.rootlet(),
        })
        .await
        .expect("state")
        .into_inner();
    let slot = state.slots.iter().find(|s| s.stage == STAGE).expect("slot");
    assert_eq!(
        (slot.policy_version, slot.policy_digest.as_str()),
        (1, r.digest.as_str())
    );

    // The next version replaces the set as a whole: the old /24 passes again.
    let v2 = blocklist_text(STAGE, 2, &["203.0.113.9/32"]);
    let r2 = team_a
        .apply_policy(pb::ApplyPolicyRequest {
            expected_version: Some(1),
            ..apply(&a, signed(&a, &v2))
        })
        .await
        .expect("version 2")
        .into_inner();
    assert_eq!((r2.version, r2.previous_version), (2, 1));
    assert_eq!((r2.maps[0].added, r2.maps[0].removed), (1, 2), "{r2:?}");
    send_from(&a, &all, N);
    let last = counters_at(&mut team_a, &a, 12 * N).await;
    assert_eq!(
        (last.drop - after.drop, last.pass - after.pass),
        (N, 3 * N),
        "only the newly blocked source drops: {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_policies_change_nothing_and_each_gets_a_precise_error() {
    let (a, mut team_a) = with_ddos().await;
    let v1 = blocklist_text(STAGE, 1, &["192.0.2.0/24"]);
    team_a
        .apply_policy(apply(&a, signed(&a, &v1)))
        .await
        .expect("v1");
    let team_b = a.client("team-b").await;
    let mon = a.client("mon").await;
    let forger = rootlet_bundle::generate_signing_key().expect("key");
    let forged = {
        let mut s = SignedPolicy::new(
            PolicyDocument::parse(&blocklist_text(STAGE, 9, &["0.0.0.0/0"]), "f.toml")
                .expect("doc"),
        );
        s.sign(&forger);
        s.to_bytes()
    };
    let tampered = {
        let mut b = signed(&a, &blocklist_text(STAGE, 9, &["10.0.0.0/8"]));
        // Flip the address inside the signed document: 10.x becomes 11.x.
        let at = b
            .windows(4)
            .position(|w| w == b"10.0")
            .expect("the address in the encoding");
        b[at + 1] = b'1';
        b
    };
    let cases: Vec<(
        &str,
        RootletClient<Channel>,
        pb::ApplyPolicyRequest,
        Code,
        &str,
    )> = vec![
        (
            "not an address",
            team_a.clone(),
            apply(
                &a,
                signed(&a, &blocklist_text(STAGE, 2, &["192.0.2.300/32"])),
            ),
            Code::InvalidArgument,
            "maps.ddos_blocklist.entries[0].key",
        ),
        (
            "bits past the prefix",
            team_a.clone(),
            apply(&a, signed(&a, &blocklist_text(STAGE, 2, &["192.0.2.1/24"]))),
            Code::InvalidArgument,
            "maps.ddos_blocklist.entries[0].key",
        ),
        (
            "a value out of range",
            team_a.clone(),
            apply(
                &a,
                signed(
                    &a,
                    &format!(
                        "stage = \"{STAGE}\"\nversion = 2\n[maps.{MAP}]\nentries = [{{ key = \"192.0.2.0/24\", value = -1 }}]\n"
                    ),
                ),
            ),
            Code::InvalidArgument,
            "maps.ddos_blocklist.entries[0].value",
        ),
        (
            "an unknown map",
            team_a.clone(),
            apply(
                &a,
                signed(
                    &a,
                    &format!(
                        "stage = \"{STAGE}\"\nversion = 2\n[maps.no_such_map]\nentries = []\n"
                    ),
                ),
            ),
            Code::NotFound,
            "",
        ),
        (
            "an unknown stage",
            team_a.clone(),
            apply(
                &a,
                signed(&a, &blocklist_text("a-nope", 2, &["192.0.2.0/24"])),
            ),
            Code::NotFound,
            "",
        ),
        (
            "another team's stage",
            team_b.clone(),
            apply(&a, signed(&a, &blocklist_text(STAGE, 2, &["0.0.0.0/0"]))),
            Code::PermissionDenied,
            "",
        ),
        (
            "a reader",
            mon.clone(),
            apply(&a, signed(&a, &blocklist_text(STAGE, 2, &["0.0.0.0/0"]))),
            Code::PermissionDenied,
            "",
        ),
        (
            "unsigned",
            team_a.clone(),
            apply(&a, unsigned(&blocklist_text(STAGE, 2, &["0.0.0.0/0"]))),
            Code::FailedPrecondition,
            "",
        ),
        (
            "signed by an untrusted key",
            team_a.clone(),
            apply(&a, forged),
            Code::PermissionDenied,
            "",
        ),
        (
            "changed after signing",
            team_a.clone(),
            apply(&a, tampered),
            Code::PermissionDenied,
            "",
        ),
        (
            "a stale expected version",
            team_a.clone(),
            pb::ApplyPolicyRequest {
                expected_version: Some(0),
                ..apply(&a, signed(&a, &blocklist_text(STAGE, 2, &["192.0.2.0/25"])))
            },
            Code::FailedPrecondition,
            "",
        ),
    ];
    let before = get_policy(&mut team_a, &a).await;
    for (what, mut c, req, code, field) in cases {
        let err = c.apply_policy(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        if !field.is_empty() {
            assert_eq!(bad_fields(&err), vec![field.to_owned()], "{what}: {err:?}");
        }
        if what == "a stale expected version" {
            assert_eq!(reason(&err), "POLICY_VERSION_MISMATCH", "{err:?}");
        }
        // Nothing changed.
        let now = get_policy(&mut team_a, &a).await;
        assert_eq!((now.version, &now.digest), (1, &before.digest), "{what}");
        assert_eq!(
            dumped(&mut team_a, &a).await,
            sorted(&["192.0.2.0/24"]),
            "{what}"
        );
    }
    drop((team_b, mon));
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_roll_back_replay_their_key_and_are_watched() {
    let (a, mut team_a) = with_ddos().await;
    let mut watch = team_a
        .watch(pb::WatchRequest {
            rootlet: a.rootlet(),
        })
        .await
        .expect("watch")
        .into_inner();
    let v1 = signed(&a, &blocklist_text(STAGE, 1, &["192.0.2.0/24"]));
    let v2 = signed(&a, &blocklist_text(STAGE, 2, &["198.51.100.0/24"]));
    team_a
        .apply_policy(apply(&a, v1.clone()))
        .await
        .expect("v1");
    let keyed = pb::ApplyPolicyRequest {
        idempotency_key: "push-2".into(),
        ..apply(&a, v2.clone())
    };
    let first = team_a
        .apply_policy(keyed.clone())
        .await
        .expect("v2")
        .into_inner();
    // The same key and request: the first answer, not a second apply.
    let again = team_a
        .apply_policy(keyed)
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(again, first);
    // The same policy without a key: a no-op.
    let same = team_a
        .apply_policy(apply(&a, v2))
        .await
        .expect("same")
        .into_inner();
    assert!(same.noop && same.version == 2, "{same:?}");

    let back = team_a
        .rollback_policy(pb::RollbackPolicyRequest {
            stage: stage_ref(&a, STAGE),
            ..Default::default()
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!((back.version, back.previous_version), (1, 2));
    assert_eq!(dumped(&mut team_a, &a).await, sorted(&["192.0.2.0/24"]));
    let p = get_policy(&mut team_a, &a).await;
    let kept: Vec<(u64, bool)> = p.history.iter().map(|h| (h.version, h.current)).collect();
    assert_eq!(kept, vec![(1, true), (2, false)], "{p:?}");
    let err = team_a
        .rollback_policy(pb::RollbackPolicyRequest {
            stage: stage_ref(&a, STAGE),
            to_version: 7,
            ..Default::default()
        })
        .await
        .expect_err("no version 7");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Watchers heard every change.
    let mut causes = 0;
    let end = Instant::now() + Duration::from_secs(20);
    while causes < 3 && Instant::now() < end {
        match tokio::time::timeout(Duration::from_secs(5), watch.message()).await {
            Ok(Ok(Some(e))) if e.cause == "policy" => causes += 1,
            Ok(Ok(Some(_))) => {}
            _ => break,
        }
    }
    assert_eq!(causes, 3, "three policy events: v1, v2 and the rollback");
}

/// The store keeps the documents of the kept versions and no others, at
/// once: a version that leaves the history takes its document with it (the
/// policy-only soak grew by ~400 B per apply while they waited for the
/// periodic sweep). Read from the store after a shutdown, which sweeps
/// nothing; a sweep within the test (the first runs at start, the next a
/// minute later) could only hide the fault, never fail the fixed code.
#[tokio::test(flavor = "multi_thread")]
async fn a_version_that_leaves_the_history_takes_its_document_from_the_store_at_once() {
    const KEPT: usize = 3;
    const APPLIES: u64 = 12;
    let (mut a, mut team_a) = with_ddos_edited(|c| c.limits.policy_history = KEPT).await;
    for v in 1..=APPLIES {
        let prefix = format!("192.0.2.{v}/32");
        team_a
            .apply_policy(apply(&a, signed(&a, &blocklist_text(STAGE, v, &[&prefix]))))
            .await
            .unwrap_or_else(|e| panic!("version {v}: {e:?}"));
    }
    let p = get_policy(&mut team_a, &a).await;
    let mut kept: Vec<String> = p.history.iter().map(|h| h.digest.clone()).collect();
    let versions: Vec<u64> = p.history.iter().map(|h| h.version).collect();
    assert_eq!(versions, vec![12, 11, 10], "{p:?}");
    drop(team_a);
    if let Some(r) = a.running.take() {
        r.shutdown().await.expect("graceful shutdown");
    }
    let path = Agent::config(&a.f, &a.pki, &a.state_dir, 80 << 20).agent_store_path();
    let kv = rootlet_dataplane::kv::Kv::open(&path, &[]).expect("the agent's store");
    let mut stored = kv.bytes_keys("policy_bytes").expect("policy documents");
    stored.sort();
    kept.sort();
    assert_eq!(stored, kept, "only the kept versions' documents are stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_survives_a_keep_replacement_and_a_restart_and_new_maps_start_empty() {
    let (mut a, mut team_a) = with_ddos().await;
    let v1 = blocklist_text(STAGE, 1, &["192.0.2.0/24"]);
    team_a
        .apply_policy(apply(&a, signed(&a, &v1)))
        .await
        .expect("v1");

    restart(&mut a, |_| {}).await;
    let mut team_a = a.client("team-a").await;
    assert_eq!(
        get_policy(&mut team_a, &a).await.version,
        1,
        "after a restart"
    );
    assert_eq!(dumped(&mut team_a, &a).await, sorted(&["192.0.2.0/24"]));

    // Another build, keeping the maps: the policy stays.
    replace_ddos(&mut team_a, &a, "ddos_v2", pb::MapPolicy::Keep)
        .await
        .expect("replace keeping the maps");
    let p = get_policy(&mut team_a, &a).await;
    assert_eq!((p.version, p.drift.as_str()), (1, ""), "{p:?}");
    send_from(&a, &["192.0.2.1".parse().expect("ip")], 20);
    let k = counters_at(&mut team_a, &a, 20).await;
    assert_eq!(k.drop, 20, "still blocked after the replacement: {k:?}");

    // A build whose blocklist means something else (the same sizes, a
    // signed value) cannot keep it: refused, and the policy stays.
    let err = replace_ddos(&mut team_a, &a, "test_ddos_retyped", pb::MapPolicy::Keep)
        .await
        .expect_err("a retyped kept map");
    assert!(
        err.message()
            .contains("map `ddos_blocklist` cannot be kept")
            && err.message().contains("value"),
        "{err:?}"
    );
    assert_eq!(get_policy(&mut team_a, &a).await.version, 1);

    // New maps: the stage holds no policy, and says so.
    replace_ddos(&mut team_a, &a, "ddos", pb::MapPolicy::Fresh)
        .await
        .expect("replace with new maps");
    let p = get_policy(&mut team_a, &a).await;
    assert_eq!(p.version, 0, "{p:?}");
    assert!(p.drift.contains("new map"), "{p:?}");
    assert!(dumped(&mut team_a, &a).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_a_policy_apply_leaves_the_old_or_the_new_policy() {
    let (mut a, mut team_a) = with_ddos().await;
    let old = ["192.0.2.0/24"];
    let new = ["198.51.100.0/24", "203.0.113.0/24"];
    team_a
        .apply_policy(apply(&a, signed(&a, &blocklist_text(STAGE, 1, &old))))
        .await
        .expect("v1");
    drop(team_a);
    if let Some(r) = a.running.take() {
        r.shutdown().await.expect("graceful shutdown");
    }
    let (path, addr) = a.process_config();
    let mut version = 1;
    let mut crashes = 0;
    for step in rootlet_agent::crash::Step::POLICY {
        let step = step.name();
        let (from, to) = if version % 2 == 1 {
            (&old[..], &new[..])
        } else {
            (&new[..], &old[..])
        };
        let mut child = rootletd_with(&path, &[("ROOTLETD_CRASH_AT", step)]);
        // An admin's client (an admin may apply any stage's policy).
        let mut c = serving(&addr, &a).await;
        let answer = c
            .apply_policy(apply(
                &a,
                signed(&a, &blocklist_text(STAGE, version + 1, to)),
            ))
            .await;
        drop(c);
        assert!(answer.is_err(), "{step}: the agent crashed: {answer:?}");
        crashes += 1;
        assert!(
            !exited(&mut child, false).await.success(),
            "{step}: aborted"
        );

        // After the restart the record and the kernel agree: on the old
        // policy if the crash came before the swap (nothing packets see had
        // changed), on the new one after it (the apply is finished).
        let mut child = rootletd_with(&path, &[]);
        let mut c = serving(&addr, &a).await;
        let p = get_policy(&mut c, &a).await;
        let held = dumped(&mut c, &a).await;
        let swapped = !matches!(step, "policy-built" | "policy-pending");
        if swapped {
            assert_eq!(p.version, version + 1, "{step}: finished: {p:?}");
            assert_eq!(
                held,
                sorted(to),
                "{step}: the new version holds the new set"
            );
            version += 1;
        } else {
            assert_eq!(p.version, version, "{step}: untouched: {p:?}");
            assert_eq!(
                held,
                sorted(from),
                "{step}: the old version holds the old set"
            );
        }
        assert_eq!(p.drift, "", "{step}: {p:?}");
        drop(c);
        assert!(
            exited(&mut child, true).await.success(),
            "{step}: clean exit"
        );
    }
    assert_eq!(crashes, rootlet_agent::crash::Step::POLICY.len());

    // A plain map (the per-rule counters, written entry by entry, not
    // atomic for packets) is crash-consistent too: until the record is
    // written a restart puts the journalled contents back; after it, the
    // new contents stay. (No policy map, so no `policy-swapped` point.)
    let cpus = possible_cpus();
    let plain = |version: u64, n: u64| {
        format!(
            "stage = \"{STAGE}\"\nversion = {version}\n\n[maps.ddos_hits]\nentries = [{{ key = 9, value = {} }}]\n",
            on_cpu0(cpus, n)
        )
    };
    let mut held_value = 0;
    let mut v = version;
    for step in rootlet_agent::crash::Step::POLICY {
        let step = step.name();
        if step == "policy-swapped" {
            continue;
        }
        let mut child = rootletd_with(&path, &[("ROOTLETD_CRASH_AT", step)]);
        let mut c = serving(&addr, &a).await;
        let want = held_value + 100;
        let answer = c
            .apply_policy(apply(&a, signed(&a, &plain(v + 1, want))))
            .await;
        drop(c);
        assert!(
            answer.is_err(),
            "{step} (plain): the agent crashed: {answer:?}"
        );
        assert!(
            !exited(&mut child, false).await.success(),
            "{step} (plain): aborted"
        );
        let mut child = rootletd_with(&path, &[]);
        let mut c = serving(&addr, &a).await;
        let p = get_policy(&mut c, &a).await;
        let held = counter(&mut c, &a, "9").await;
        if step == "policy-committed" {
            assert_eq!(
                (p.version, held),
                (v + 1, want),
                "{step} (plain): the new contents stay"
            );
            v += 1;
            held_value = want;
        } else {
            assert_eq!(
                (p.version, held),
                (v, held_value),
                "{step} (plain): the old contents are back"
            );
        }
        assert_eq!(p.drift, "", "{step} (plain): {p:?}");
        drop(c);
        assert!(
            exited(&mut child, true).await.success(),
            "{step} (plain): clean exit"
        );
    }
    // Start in-process again so that Drop tears down as usual.
    restart(&mut a, |_| {}).await;
}

/// A backend: (IP, MAC).
type Backend<'a> = (&'a str, &'a str);
/// A service: (VIP, UDP port, backends).
type Service<'a> = (&'a str, u16, &'a [Backend<'a>]);

/// An l4lb policy: services whose backends are a struct array.
fn service_text(version: u64, services: &[Service<'_>]) -> String {
    let mut t =
        format!("stage = \"a-l4lb\"\nversion = {version}\n\n[maps.l4lb_services]\nentries = [\n");
    for (vip, port, backends) in services {
        let bs: Vec<String> = backends
            .iter()
            .map(|(ip, mac)| format!("{{ ip = \"{ip}\", mac = \"{mac}\" }}"))
            .collect();
        t.push_str(&format!(
            "  {{ key = {{ vip = \"{vip}\", port = {}, proto = 17 }}, value = {{ num_backends = {}, backends = [{}] }} }},\n",
            port.to_be(),
            backends.len(),
            bs.join(", ")
        ));
    }
    t.push_str("]\n");
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn a_typed_policy_names_the_field_that_does_not_fit_and_the_map_bounds_its_entries() {
    let a = Agent::start().await;
    let mut ops = a.client("ops").await;
    a.load(&mut ops).await;
    let mut team_a = a.client("team-a").await;
    team_a
        .link_stage(link(a.rootlet(), stage("a-l4lb", "l4lb", 10)))
        .await
        .expect("team a links its l4lb stage");
    let lb = |team: &mut RootletClient<Channel>| {
        let stage = stage_ref(&a, "a-l4lb");
        let mut t = team.clone();
        async move {
            t.get_policy(pb::GetPolicyRequest { stage })
                .await
                .expect("GetPolicy")
                .into_inner()
        }
    };
    let good = service_text(
        1,
        &[(
            "192.0.2.1",
            53,
            &[
                ("10.0.0.1", "02:00:00:00:00:01"),
                ("10.0.0.2", "02:00:00:00:00:02"),
            ],
        )],
    );
    let r = team_a
        .apply_policy(apply(&a, signed(&a, &good)))
        .await
        .expect("a service with two backends")
        .into_inner();
    assert_eq!((r.version, r.maps[0].entries), (1, 1), "{r:?}");
    // Read back as typed JSON: struct members by name, addresses as text.
    let page = team_a
        .dump_map(pb::DumpMapRequest {
            stage: stage_ref(&a, "a-l4lb"),
            map: "l4lb_services".into(),
            ..Default::default()
        })
        .await
        .expect("DumpMap")
        .into_inner();
    assert_eq!(page.entries.len(), 1);
    let key: serde_json::Value = serde_json::from_str(&page.entries[0].key_json).expect("json");
    let value: serde_json::Value = serde_json::from_str(&page.entries[0].value_json).expect("json");
    assert_eq!(key["vip"], "192.0.2.1", "{key}");
    assert_eq!(value["num_backends"], 2, "{value}");
    assert_eq!(value["backends"][1]["ip"], "10.0.0.2", "{value}");
    assert_eq!(value["backends"][1]["mac"], "02:00:00:00:00:02", "{value}");

    let bad_ip = service_text(
        2,
        &[(
            "192.0.2.1",
            53,
            &[
                ("10.0.0.1", "02:00:00:00:00:01"),
                ("10.0.0.300", "02:00:00:00:00:02"),
            ],
        )],
    );
    let bad_mac = service_text(2, &[("192.0.2.1", 53, &[("10.0.0.1", "02:00:00:00:00")])]);
    let too_many_backends: Vec<(&str, &str)> = vec![("10.0.0.1", "02:00:00:00:00:01"); 65];
    let too_many_backends = service_text(2, &[("192.0.2.1", 53, &too_many_backends)]);
    let ips: Vec<String> = (0..=64u32).map(|i| format!("192.0.2.{}", i + 1)).collect();
    let services: Vec<Service<'_>> = ips
        .iter()
        .map(|ip| (ip.as_str(), 53u16, &[("10.0.0.1", "02:00:00:00:00:01")][..]))
        .collect();
    let too_many = service_text(2, &services);
    for (what, text, field) in [
        (
            "a backend's address",
            bad_ip,
            "maps.l4lb_services.entries[0].value.backends[1].ip",
        ),
        (
            "a backend's MAC",
            bad_mac,
            "maps.l4lb_services.entries[0].value.backends[0].mac",
        ),
        (
            "more backends than the array holds",
            too_many_backends,
            "maps.l4lb_services.entries[0].value.backends",
        ),
        (
            "more services than the map holds",
            too_many,
            "maps.l4lb_services.entries",
        ),
    ] {
        let err = team_a
            .apply_policy(apply(&a, signed(&a, &text)))
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert_eq!(bad_fields(&err), vec![field.to_owned()], "{what}: {err:?}");
        let p = lb(&mut team_a).await;
        assert_eq!(
            (p.version, &p.digest),
            (1, &r.digest),
            "{what}: nothing changed"
        );
    }
}

/// A signed bundle of the ddos stage (owned by team a) carrying `policy`
/// as its initial policy.
fn bundle_with_policy(a: &Agent, version: &str, policy: &str) -> Vec<u8> {
    let dir = a.state_dir.join(format!("bundle-policy-{version}"));
    std::fs::create_dir_all(&dir).expect("dir");
    let e = rootlet_ebpf::stage("ddos").expect("object");
    std::fs::write(dir.join("ddos.o"), e.object).expect("object file");
    std::fs::write(dir.join("blocklist.toml"), policy).expect("policy file");
    let manifest = format!(
        "name = \"edge\"\nversion = \"{version}\"\n{}[[stages]]\nname = \"{STAGE}\"\nobject = \"ddos.o\"\nprogram = \"{}\"\npriority = 10\nowner = \"team-a\"\npolicies = [\"blocklist.toml\"]\n",
        api::targets(&a.f),
        e.program
    );
    std::fs::write(dir.join("manifest.toml"), manifest).expect("manifest");
    let bundle = rootlet_bundle::Bundle::build(dir.join("manifest.toml")).expect("build bundle");
    let mut signed = rootlet_bundle::SignedBundle::new(bundle);
    signed.sign(&a.signing_key);
    signed.to_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_brings_programs_and_their_initial_policy_in_one_apply() {
    let a = Agent::start().await;
    let mut ops = a.client("ops").await;
    let apply_bundle = |bytes: Vec<u8>| pb::ApplyBundleRequest {
        source: Some(pb::apply_bundle_request::Source::Bundle(bytes)),
        ..Default::default()
    };

    // A policy that does not fit the stage's types: refused before the
    // bundle changes anything (no rootlet is even loaded).
    let bad = bundle_with_policy(&a, "0.9", &blocklist_text(STAGE, 1, &["192.0.2.1/24"]));
    let err = ops
        .apply_bundle(apply_bundle(bad))
        .await
        .expect_err("bad policy");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        bad_fields(&err),
        vec!["maps.ddos_blocklist.entries[0].key".to_owned()]
    );
    let none = ops
        .get_rootlet(pb::GetRootletRequest {
            rootlet: a.rootlet(),
        })
        .await
        .expect_err("no rootlet");
    assert_eq!(none.code(), Code::NotFound);

    // A new host gets the stage and its blocklist in one apply.
    let v1 = bundle_with_policy(&a, "1.0", &blocklist_text(STAGE, 3, &["192.0.2.0/24"]));
    ops.apply_bundle(apply_bundle(v1)).await.expect("1.0");
    let mut team_a = a.client("team-a").await;
    let p = get_policy(&mut team_a, &a).await;
    assert_eq!((p.version, p.drift.as_str()), (3, ""), "{p:?}");
    assert_eq!(dumped(&mut team_a, &a).await, sorted(&["192.0.2.0/24"]));
    send_from(
        &a,
        &[
            "192.0.2.9".parse().expect("ip"),
            "203.0.113.1".parse().expect("ip"),
        ],
        25,
    );
    let k = counters_at(&mut team_a, &a, 50).await;
    assert_eq!((k.drop, k.pass), (25, 25), "{k:?}");

    // Pushed since: a later bundle version does not overwrite it.
    team_a
        .apply_policy(apply(
            &a,
            signed(&a, &blocklist_text(STAGE, 4, &["198.51.100.0/24"])),
        ))
        .await
        .expect("v4");
    let v2 = bundle_with_policy(&a, "2.0", &blocklist_text(STAGE, 5, &["0.0.0.0/0"]));
    ops.apply_bundle(apply_bundle(v2)).await.expect("2.0");
    assert_eq!(get_policy(&mut team_a, &a).await.version, 4);
    assert_eq!(dumped(&mut team_a, &a).await, sorted(&["198.51.100.0/24"]));
}

/// A per-CPU value for `cpus` CPUs: `n` on the first, 0 on the others.
fn on_cpu0(cpus: usize, n: u64) -> String {
    let mut v = vec!["0".to_owned(); cpus];
    v[0] = n.to_string();
    format!("[{}]", v.join(", "))
}

/// The ddos stage's per-rule drop counter `rule`, summed over the CPUs,
/// as DumpMap gives it.
async fn counter(c: &mut RootletClient<Channel>, a: &Agent, rule: &str) -> u64 {
    let page = c
        .dump_map(pb::DumpMapRequest {
            stage: stage_ref(a, STAGE),
            map: "ddos_hits".into(),
            page_size: 10_000,
            ..Default::default()
        })
        .await
        .expect("DumpMap")
        .into_inner();
    let e = page
        .entries
        .iter()
        .find(|e| e.key_json == rule)
        .unwrap_or_else(|| panic!("no counter {rule}"));
    let v: serde_json::Value = serde_json::from_str(&e.value_json).expect("json");
    v.as_array()
        .expect("one value per CPU")
        .iter()
        .map(|x| x.as_u64().expect("u64"))
        .sum()
}

/// The possible CPUs (a per-CPU value has one value for each).
fn possible_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    s.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().expect("cpu") - a.parse::<usize>().expect("cpu") + 1,
            None => 1,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_map_is_written_entry_by_entry_and_reported_not_atomic() {
    let (a, mut team_a) = with_ddos().await;
    let n = possible_cpus();
    let per_cpu = |first: u64| on_cpu0(n, first);
    // The blocklist (a policy map) and the per-rule drop counters (a plain
    // per-CPU array) in one policy: rule 5's counter is set by hand.
    let text = format!(
        "stage = \"{STAGE}\"\nversion = 1\n\n[maps.{MAP}]\nentries = [{{ key = \"192.0.2.0/24\", value = 5 }}]\n\n\
         [maps.ddos_hits]\nentries = [{{ key = 5, value = {} }}]\n",
        per_cpu(7)
    );
    let r = team_a
        .apply_policy(apply(&a, signed(&a, &text)))
        .await
        .expect("a policy with a plain map")
        .into_inner();
    assert!(
        !r.atomic,
        "two maps, one of them plain: not atomic as a whole: {r:?}"
    );
    let hits = r
        .maps
        .iter()
        .find(|m| m.map == "ddos_hits")
        .expect("ddos_hits");
    let block = r.maps.iter().find(|m| m.map == MAP).expect("blocklist");
    assert!(!hits.atomic && block.atomic, "{r:?}");
    assert_eq!(
        hits.changed, 1,
        "one counter changed (an array has every key): {r:?}"
    );

    // The counter holds what the policy wrote, and then what the stage adds
    // for rule 5's drops.
    assert_eq!(counter(&mut team_a, &a, "5").await, 7);
    send_from(&a, &["192.0.2.1".parse().expect("ip")], 10);
    let k = counters_at(&mut team_a, &a, 10).await;
    assert_eq!(k.drop, 10, "{k:?}");
    assert_eq!(
        counter(&mut team_a, &a, "5").await,
        17,
        "7 written, 10 dropped by rule 5"
    );
    // A plain-map value that does not fit (a value for one CPU more than
    // there are): refused before anything changes.
    let too_many_cpus = format!("[{}]", vec!["1"; n + 1].join(", "));
    let bad = text
        .replace(&per_cpu(7), &too_many_cpus)
        .replace("version = 1", "version = 2");
    let err = team_a
        .apply_policy(apply(&a, signed(&a, &bad)))
        .await
        .expect_err("values for more CPUs than there are");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        bad_fields(&err),
        vec!["maps.ddos_hits.entries[0].value".to_owned()],
        "{err:?}"
    );
    assert_eq!(counter(&mut team_a, &a, "5").await, 17);
    assert_eq!(get_policy(&mut team_a, &a).await.version, 1);
}
