//! The rootlet.v1 contract as a new client meets it (issue 13): a real
//! rootletd (in-process, and as a process across a restart) on its Unix
//! socket, called by a stock tonic client with default limits, managing a
//! rootlet on a veth pair in fresh namespaces, with real packets.
//!
//! - an unset enum never picks a destructive default;
//! - a digest has one spelling out and two accepted in, nothing else;
//! - a long verifier log does not break the error that carries it;
//! - drift reads the same before and after a restart, and reaches watchers;
//! - an unknown rootlet is NOT_FOUND.

use std::{
    net::SocketAddrV4,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::StreamExt;
use rootlet_dataplane::sys;
use rootlet_integration_tests::{
    api::{self, bad_fields, link, reason, stage},
    fixture::{self, Fixture},
    netns::HOST_IP,
    packet::seq_payload,
    rootletd::{exited, rootletd},
    traffic::{RawSocket, UdpSink},
    witness::StackDrops,
};
use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use rootlet_server::{
    config::Config,
    runtime::{self, Running},
};
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};
use tonic_types::StatusExt;

/// rootletd on a Unix socket only (callers there are root: admin), with
/// unsigned bundles allowed and a one-second drift check.
struct Local {
    f: Fixture,
    dir: tempfile::TempDir,
    running: Option<Running>,
}

impl Local {
    fn config(f: &Fixture, dir: &Path) -> Config {
        let mut c = Config::default();
        c.listen.tcp = None;
        c.listen.unix = Some(dir.join("rootletd.sock"));
        c.metrics.listen = None;
        c.dataplane.bpffs_root = f.root.clone();
        c.dataplane.state_dir = f.store.parent().expect("store dir").to_owned();
        c.dataplane.backend = fixture::backend();
        c.dataplane.drift_check_seconds = 1;
        c.bundles.allow_unsigned = true;
        c
    }

    async fn start() -> Local {
        let f = Fixture::new();
        let dir = tempfile::tempdir().expect("dir");
        let mut running = runtime::start(Self::config(&f, dir.path()))
            .await
            .expect("start rootletd");
        assert!(running.ready().await, "the agent serves");
        Local {
            f,
            dir,
            running: Some(running),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("rootletd.sock")
    }

    /// A stock client: tonic's default message and metadata limits.
    async fn client(&self) -> RootletClient<Channel> {
        let ch = Endpoint::from_shared(format!("unix:{}", self.socket().display()))
            .expect("uri")
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .expect("connect to the Unix socket");
        RootletClient::new(ch)
    }

    /// Stops the in-process agent (the data path stays).
    async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("graceful shutdown");
        }
    }

    fn iface(&self) -> pb::Interface {
        api::interface(&self.f)
    }

    fn rootlet(&self) -> Option<pb::RootletRef> {
        api::rootlet_ref(&self.f)
    }

    async fn load(&self, c: &mut RootletClient<Channel>) -> pb::RootletState {
        api::load(c, &self.f).await
    }

    /// An unsigned bundle `edge` `version` of embedded objects (stage,
    /// object, priority) for this rootlet, and what `rootletctl bundle
    /// inspect` shows of it.
    fn bundle(&self, version: &str, stages: &[(&str, &str, i32)]) -> (Vec<u8>, String) {
        let stages: Vec<_> = stages.iter().map(|(n, o, p)| (*n, *o, *p, "ops")).collect();
        let signed = api::bundle(
            self.dir.path(),
            "edge",
            version,
            &api::targets(&self.f),
            &stages,
        );
        (signed.to_bytes(), signed.inspect())
    }

    /// How many of `n` UDP packets sent now from the peer reach the host:
    /// the socket got them, or the host's stack counted them dropped after
    /// the data plane passed them.
    fn delivered(&self, n: u64, port: u16) -> u64 {
        let sink =
            UdpSink::bind(self.f.pair.host(), SocketAddrV4::new(HOST_IP, port)).expect("sink");
        let raw = RawSocket::open(self.f.pair.peer(), self.f.pair.peer_if()).expect("raw");
        let before = StackDrops::read(self.f.pair.host()).expect("snmp");
        for seq in 1..=n {
            let frame = self.f.pair.udp_to_host(40000, port, seq_payload(seq, 64));
            raw.send(&frame.to_bytes()).expect("send");
        }
        let got = sink
            .recv_until_idle(
                Duration::from_millis(300),
                Instant::now() + Duration::from_secs(5),
            )
            .expect("recv");
        let stack = StackDrops::read(self.f.pair.host())
            .expect("snmp")
            .since(&before);
        got.len() as u64 + stack.total()
    }

    /// Detaches the rootlet's XDP link by hand, as another tool would.
    fn detach_by_hand(&self, state: &pb::RootletState) {
        let link = sys::link_fd_by_id(state.xdp_link_id).expect("link by id");
        sys::link_detach(link.as_fd()).expect("detach");
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.running.take();
    }
}

// ---------------------------------------------------------------- item 1

#[tokio::test(flavor = "multi_thread")]
async fn a_rootlet_loaded_with_only_an_interface_passes_traffic() {
    let a = Local::start().await;
    let mut c = a.client().await;
    // What a new client sends first: the interface, nothing else.
    let state = c
        .load_rootlet(pb::LoadRootletRequest {
            interface: Some(a.iface()),
            ..Default::default()
        })
        .await
        .expect("load with only an interface")
        .into_inner();
    assert_eq!(
        state.final_verdict,
        pb::XdpAction::Pass as i32,
        "unset means PASS: {state:?}"
    );
    assert_ne!(state.mode, pb::XdpMode::Unspecified as i32, "{state:?}");
    assert_eq!(a.delivered(10, 7001), 10, "the empty pipeline passes");
    let read = c
        .get_rootlet(pb::GetRootletRequest {
            rootlet: a.rootlet(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read.final_verdict, pb::XdpAction::Pass as i32);

    // A stage with every enum unset: proceed_on [PASS], maps FRESH; the
    // packets still pass (test_pass passes, PASS proceeds, final PASS).
    let done = c
        .link_stage(link(
            a.rootlet(),
            pb::Stage {
                pin: true,
                ..stage("p", "test_pass", 10)
            },
        ))
        .await
        .expect("link with defaults")
        .into_inner();
    let slot = &done.rootlet.expect("state").slots[0];
    assert_eq!(slot.proceed_on, [pb::XdpAction::Pass as i32]);
    assert_eq!(a.delivered(10, 7002), 10, "a pass stage and the default");

    // UNSPECIFIED is no action: an explicit entry is refused, naming it.
    let err = c
        .link_stage(link(
            a.rootlet(),
            pb::Stage {
                proceed_on: vec![pb::XdpAction::Unspecified as i32],
                ..stage("q", "test_pass", 20)
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(bad_fields(&err), ["stage.proceed_on"]);
}

// ---------------------------------------------------------------- item 4

#[tokio::test(flavor = "multi_thread")]
async fn a_digest_has_one_spelling_out_and_two_in() {
    let a = Local::start().await;
    let mut c = a.client().await;
    let (v1, shown) = a.bundle("1.0", &[("edge-drop", "test_drop", 10)]);
    let (v2, _) = a.bundle("2.0", &[("edge-drop", "test_pass", 10)]);
    let d1 = c
        .apply_bundle(pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Bundle(v1)),
            ..Default::default()
        })
        .await
        .expect("apply 1.0")
        .into_inner()
        .digest;
    // The canonical form: 64 lowercase hex digits, also what rootletctl
    // prints (`bundle inspect`).
    assert!(
        d1.len() == 64 && d1.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{d1}"
    );
    assert!(shown.contains(&format!("digest   {d1}")), "{shown}");
    assert!(!shown.contains("sha256:"), "{shown}");
    let d2 = c
        .apply_bundle(pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Bundle(v2)),
            ..Default::default()
        })
        .await
        .expect("apply 2.0")
        .into_inner()
        .digest;
    let listed: Vec<String> = c
        .list_bundles(pb::ListBundlesRequest {})
        .await
        .expect("list")
        .into_inner()
        .bundles
        .into_iter()
        .map(|b| b.digest)
        .collect();
    assert_eq!(listed, [d2.clone(), d1.clone()], "the same spelling");

    for spelling in [
        d1.clone(),
        format!("sha256:{d1}"),
        d1.to_uppercase(),
        format!("sha256:{}", d1.to_uppercase()),
    ] {
        let has = c
            .has_bundle(pb::HasBundleRequest {
                digest: spelling.clone(),
            })
            .await
            .expect("has")
            .into_inner();
        assert!(has.present, "{spelling}");
    }
    // Anything else: INVALID_ARGUMENT naming the field, never "absent".
    for bad in [
        String::new(),
        "sha256:".into(),
        format!("sha512:{d1}"),
        d1[..40].to_owned(),
        format!("{d1} "),
    ] {
        let err = c
            .has_bundle(pb::HasBundleRequest {
                digest: bad.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), bad_fields(&err)),
            (Code::InvalidArgument, vec!["digest".to_owned()]),
            "{bad:?}: {err:?}"
        );
    }

    // ApplyBundle by digest, in the prefixed spelling: back to 1.0.
    let back = c
        .apply_bundle(pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Digest(format!(
                "sha256:{d1}"
            ))),
            ..Default::default()
        })
        .await
        .expect("apply by prefixed digest")
        .into_inner();
    assert_eq!((back.digest.as_str(), back.noop), (d1.as_str(), false));
    let err = c
        .apply_bundle(pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Digest("latest".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Rollback to a digest, prefixed.
    let rolled = c
        .rollback(pb::RollbackRequest {
            name: "edge".into(),
            to_digest: format!("sha256:{d2}"),
            ..Default::default()
        })
        .await
        .expect("rollback to a prefixed digest")
        .into_inner();
    assert_eq!(rolled.digest, d2);
    let err = c
        .rollback(pb::RollbackRequest {
            name: "edge".into(),
            to_digest: "sha256:nothex".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), bad_fields(&err)),
        (Code::InvalidArgument, vec!["to_digest".to_owned()])
    );
    let status = c
        .get_apply_status(pb::GetApplyStatusRequest {
            rootlet: a.rootlet(),
            ..Default::default()
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.applied_digest, d2, "{status:?}");
    // RemoveBundle's guard, prefixed; a malformed one changes nothing.
    let err = c
        .remove_bundle(pb::RemoveBundleRequest {
            name: "edge".into(),
            expected_digest: "2.0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), bad_fields(&err)),
        (Code::InvalidArgument, vec!["expected_digest".to_owned()])
    );
    let removed = c
        .remove_bundle(pb::RemoveBundleRequest {
            name: "edge".into(),
            expected_digest: format!("sha256:{d2}"),
            ..Default::default()
        })
        .await
        .expect("remove guarded by a prefixed digest")
        .into_inner();
    assert!(removed.removed && !removed.noop, "{removed:?}");
}

// ---------------------------------------------------------------- item 5

/// What gRPC metadata of a status may take at most, by a default client.
const METADATA_LIMIT: usize = 16 << 10;

#[tokio::test(flavor = "multi_thread")]
async fn a_long_verifier_log_reaches_a_default_client_as_a_short_error() {
    let a = Local::start().await;
    let mut c = a.client().await;
    let loaded = a.load(&mut c).await;
    let err = c
        .link_stage(link(a.rootlet(), stage("long", "test_long_log", 10)))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "VERIFIER_REJECTED"),
        "{err:?}"
    );
    let detail = err
        .get_error_details()
        .debug_info()
        .map(|d| d.detail.clone())
        .unwrap_or_default();
    assert!(
        err.message().len() + detail.len() < METADATA_LIMIT / 2,
        "message {} + detail {} bytes",
        err.message().len(),
        detail.len()
    );
    assert!(
        err.message().contains("outside of the packet"),
        "the reason is in the message: {}",
        err.message()
    );
    assert!(detail.contains("outside of the packet"), "{detail}");
    assert!(detail.contains("GetVerifierLog"), "{detail}");

    // The whole log, another way.
    let log = c
        .get_verifier_log(pb::GetVerifierLogRequest {
            stage: "long".into(),
        })
        .await
        .expect("the whole log")
        .into_inner();
    assert!(
        log.total_bytes > 200_000,
        "a log of hundreds of KB: {}",
        log.total_bytes
    );
    assert_eq!(
        (log.log.len() as u64, log.truncated),
        (log.total_bytes, false)
    );
    assert!(log.log.contains("outside of the packet"));
    // The program the kernel rejected: the tail-call backend loads the
    // stage's tail-call half (<rootlet/stage.h>).
    let rejected = if loaded.backend == pb::Backend::Tailcall as i32 {
        "long_log__chain"
    } else {
        "long_log"
    };
    assert_eq!(log.program, rejected);
    assert!(
        err.message()
            .contains(&format!("{} bytes of verifier log", log.total_bytes)),
        "{}",
        err.message()
    );
    let any = c
        .get_verifier_log(pb::GetVerifierLogRequest::default())
        .await
        .expect("the last one")
        .into_inner();
    assert_eq!(any.stage, "long");
    let err = c
        .get_verifier_log(pb::GetVerifierLogRequest {
            stage: "never-rejected".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The same through a bundle: the NACK and its recorded attempt are
    // short too.
    let (b, _) = a.bundle("1.0", &[("long", "test_long_log", 10)]);
    let err = c
        .apply_bundle(pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Bundle(b)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "VERIFIER_REJECTED"),
        "{err:?}"
    );
    let status = c
        .get_apply_status(pb::GetApplyStatusRequest {
            rootlet: a.rootlet(),
            ..Default::default()
        })
        .await
        .expect("status")
        .into_inner();
    let attempt = status.last_attempt.expect("the nack");
    assert!(
        attempt.outcome == "nack" && attempt.error.len() < 2048,
        "{attempt:?}"
    );
}

// ---------------------------------------------------------------- item 7

/// What must read the same before and after a restart.
fn summary(s: &pb::RootletState) -> (String, u64, u32, Vec<String>, bool) {
    (
        s.interface
            .as_ref()
            .map(|i| i.ifname.clone())
            .unwrap_or_default(),
        s.generation,
        s.rootlet.as_ref().map_or(0, |p| p.id),
        s.slots.iter().map(|s| s.stage.clone()).collect(),
        !s.drift.is_empty(),
    )
}

/// GetRootlet, GetStats and ListRootlets of the one rootlet.
async fn reads(
    c: &mut RootletClient<Channel>,
    r: Option<pb::RootletRef>,
) -> (pb::RootletState, pb::GetStatsResponse, pb::RootletState) {
    let got = c
        .get_rootlet(pb::GetRootletRequest { rootlet: r.clone() })
        .await
        .expect("GetRootlet of a drifted rootlet")
        .into_inner();
    let stats = c
        .get_stats(pb::GetStatsRequest { rootlet: r })
        .await
        .expect("GetStats of a drifted rootlet")
        .into_inner();
    let mut listed = c
        .list_rootlets(pb::ListRootletsRequest {})
        .await
        .expect("list")
        .into_inner()
        .rootlets;
    assert_eq!(listed.len(), 1);
    (got, stats, listed.remove(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_reads_the_same_before_and_after_a_restart() {
    let mut a = Local::start().await;
    let mut c = a.client().await;
    let loaded = a.load(&mut c).await;
    c.link_stage(link(a.rootlet(), stage("p", "test_pass", 10)))
        .await
        .expect("link");
    a.detach_by_hand(&loaded);
    let (got, stats, listed) = reads(&mut c, a.rootlet()).await;
    let before = summary(&got);
    assert!(before.4, "drift is set: {got:?}");
    assert_eq!(before.1, 2);
    assert_eq!(summary(&listed), before, "ListRootlets: the full state");
    assert_eq!((stats.generation, stats.slots.len()), (2, 1));
    drop(c);

    // A real rootletd process adopts the drifted rootlet.
    a.stop().await;
    let path = a.dir.path().join("rootletd.toml");
    let config = Local::config(&a.f, a.dir.path());
    std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("config");
    let mut child = rootletd(&path);
    let end = Instant::now() + Duration::from_secs(60);
    let mut c = loop {
        assert!(Instant::now() < end, "rootletd never served");
        if let Ok(ch) = Endpoint::from_shared(format!("unix:{}", a.socket().display()))
            .expect("uri")
            .connect()
            .await
        {
            let mut c = RootletClient::new(ch);
            if c.get_capabilities(pb::GetCapabilitiesRequest {})
                .await
                .is_ok()
            {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (got, stats, listed) = reads(&mut c, a.rootlet()).await;
    assert_eq!(
        summary(&got),
        before,
        "GetRootlet after the restart: {got:?}"
    );
    assert_eq!(summary(&listed), before, "ListRootlets after the restart");
    assert_eq!((stats.generation, stats.slots.len()), (2, 1));
    let err = c
        .link_stage(link(a.rootlet(), stage("q", "test_pass", 20)))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DRIFTED", "drift still stops changes");

    // `rootletctl status`: the generation and the rootlet, with the drift.
    let fleet = rootlet_client::transport::Fleet::new(
        vec![rootlet_client::inventory::Host {
            name: "local".into(),
            address: rootlet_client::inventory::Address::Unix(a.socket()),
            labels: Default::default(),
            security: rootlet_client::inventory::Security::Local,
        }],
        rootlet_client::transport::TransportOptions::default(),
    );
    let hosts = rootlet_client::status::read(&fleet, None).await;
    let r = &hosts[0].rootlets[0];
    assert_eq!(
        (r.generation, r.interface.as_str(), r.drift.is_empty()),
        (2, a.f.pair.host_if(), false),
        "{r:?}"
    );
    let table = rootlet_client::status::table(&hosts);
    assert!(table.contains(a.f.pair.host_if()), "{table}");
    drop(c);
    assert!(exited(&mut child, true).await.success());
}

// ---------------------------------------------------------------- item 8

#[tokio::test(flavor = "multi_thread")]
async fn drift_caused_out_of_band_reaches_a_watcher() {
    let a = Local::start().await;
    let mut c = a.client().await;
    let loaded = a.load(&mut c).await;
    let mut events = c
        .watch(pb::WatchRequest {
            rootlet: a.rootlet(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = events.next().await.expect("snapshot").expect("event");
    assert_eq!(first.cause, "snapshot");
    // Nobody reads the rootlet from now on: only the periodic check
    // (one second here) can notice.
    a.detach_by_hand(&loaded);
    let end = Instant::now() + Duration::from_secs(15);
    let drift = loop {
        let left = end.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, events.next())
            .await
            .expect("a drift event within 15 s")
            .expect("the stream goes on")
            .expect("event");
        if ev.cause == "drift" {
            break ev;
        }
    };
    let state = drift.rootlet.expect("the state with the drift");
    assert!(state.drift.contains("detached"), "{state:?}");
    assert_eq!(drift.rootlet_id, loaded.id);
}

// --------------------------------------------------------------- item 10

#[tokio::test(flavor = "multi_thread")]
async fn reads_of_an_unknown_rootlet_are_not_found() {
    let a = Local::start().await;
    let mut c = a.client().await;
    let unknown = || {
        Some(pb::RootletRef {
            r#ref: Some(pb::rootlet_ref::Ref::Id("netns:1/if:424242".into())),
        })
    };
    // By id, and by an interface that exists but runs no rootlet.
    for (what, r) in [("id", unknown()), ("interface", a.rootlet())] {
        let err = c
            .get_apply_status(pb::GetApplyStatusRequest {
                rootlet: r.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::NotFound, "ROOTLET_NOT_FOUND"),
            "GetApplyStatus by {what}: {err:?}"
        );
        let err = c
            .watch(pb::WatchRequest { rootlet: r.clone() })
            .await
            .expect_err("Watch of an unknown rootlet fails");
        assert_eq!(err.code(), Code::NotFound, "Watch by {what}: {err:?}");
        let err = c
            .get_rootlet(pb::GetRootletRequest { rootlet: r.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "GetRootlet by {what}");
        let err = c
            .get_stats(pb::GetStatsRequest { rootlet: r })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "GetStats by {what}");
    }
    // Once loaded, the same reads answer.
    a.load(&mut c).await;
    c.get_apply_status(pb::GetApplyStatusRequest {
        rootlet: a.rootlet(),
        ..Default::default()
    })
    .await
    .expect("known now");
    c.watch(pb::WatchRequest {
        rootlet: a.rootlet(),
    })
    .await
    .expect("watch a known rootlet");
}
