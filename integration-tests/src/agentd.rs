//! An in-process rootletd for the API suites: mTLS on loopback and a Unix
//! socket, a fixture's rootlet, a bundle signing key the agent trusts, and
//! the roles the suites use (`ops` admin, `team-a` owner of `a-*`,
//! `team-b` owner of `b-*`, `mon` reader).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use rootlet_server::{
    config::{Config, IdentityConfig, Role},
    runtime::{self, Running},
};
use tonic::{
    Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::{
    api,
    fixture::{self, Fixture},
    pki::Pki,
};

pub struct Agent {
    pub f: Fixture,
    pub pki: Pki,
    pub state_dir: PathBuf,
    pub signing_key: rootlet_bundle::SigningKey,
    pub running: Option<Running>,
}

pub fn identity(name: &str, role: Role, stages: &[&str]) -> IdentityConfig {
    IdentityConfig {
        name: name.into(),
        role,
        stages: stages.iter().map(|s| (*s).into()).collect(),
    }
}

impl Agent {
    pub fn config(f: &Fixture, pki: &Pki, state_dir: &Path, max_message_bytes: usize) -> Config {
        let public = state_dir.join("release.pub");
        let mut c = Config::default();
        c.listen.tcp = Some("127.0.0.1:0".parse().expect("addr"));
        c.listen.unix = Some(state_dir.join("rootletd.sock"));
        c.tls = Some(pki.tls_config());
        c.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.dataplane.bpffs_root = f.root.clone();
        // The fixture's store, so that `rootlet-dp` can hold the very store
        // the agent needs.
        c.dataplane.state_dir = f.store.parent().expect("store dir").to_owned();
        c.dataplane.backend = fixture::backend();
        // No loaders made ahead (`dataplane/src/warm.rs`): this suite starts
        // some forty rootletd processes, and under the VM tier's emulation
        // each pool's six kernel-BTF parses cost about 2 s of CPU that the
        // tests beside it would wait for. The pool is exercised by the
        // metrics test and the bench (`rootletd::Daemon`, default config)
        // and by its unit test.
        c.dataplane.warm_loaders = 0;
        c.bundles.trusted_keys = vec![public];
        c.limits.max_message_bytes = max_message_bytes;
        c.authz.identity = vec![
            identity("ops", Role::Admin, &[]),
            identity("team-a", Role::Owner, &["a-*"]),
            identity("team-b", Role::Owner, &["b-*"]),
            identity("mon", Role::Reader, &[]),
        ];
        c
    }

    pub async fn start_with(max_message_bytes: usize) -> Agent {
        Self::start_edited(max_message_bytes, |_| {}).await
    }

    /// [`Agent::start_with`], with `edit` applied to the configuration.
    pub async fn start_edited(max_message_bytes: usize, edit: impl Fn(&mut Config)) -> Agent {
        let f = Fixture::new();
        let pki = Pki::new();
        let state_dir = pki.dir.join("state");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        let signing_key = rootlet_bundle::generate_signing_key().expect("key");
        std::fs::write(
            state_dir.join("release.pub"),
            rootlet_bundle::verifying_key_to_pem(&signing_key.verifying_key()),
        )
        .expect("public key");
        let mut config = Self::config(&f, &pki, &state_dir, max_message_bytes);
        edit(&mut config);
        let mut running = runtime::start(config).await.expect("start rootletd");
        assert!(running.ready().await, "the agent serves");
        Agent {
            f,
            pki,
            state_dir,
            signing_key,
            running: Some(running),
        }
    }

    pub async fn start() -> Agent {
        Self::start_with(80 << 20).await
    }

    pub fn addr(&self) -> String {
        let a = self
            .running
            .as_ref()
            .and_then(|r| r.tcp_addr)
            .expect("tcp address");
        format!("https://localhost:{}", a.port())
    }

    pub async fn client_with(
        &self,
        id: Option<(&str, bool)>,
    ) -> Result<RootletClient<Channel>, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.pki.ca_pem()))
            .domain_name("localhost");
        if let Some((cn, rogue)) = id {
            let c = if rogue {
                self.pki.rogue_client(cn)
            } else {
                self.pki.client(cn)
            };
            tls = tls.identity(Identity::from_pem(c.cert_pem, c.key_pem));
        }
        let channel = Channel::from_shared(self.addr())
            .expect("uri")
            .tls_config(tls)?
            .timeout(Duration::from_secs(60))
            .connect()
            .await?;
        Ok(RootletClient::new(channel)
            .max_decoding_message_size(80 << 20)
            .max_encoding_message_size(80 << 20))
    }

    pub async fn client(&self, cn: &str) -> RootletClient<Channel> {
        self.client_with(Some((cn, false))).await.expect("connect")
    }

    /// A config file for this agent as a `rootletd` process on a free
    /// loopback port (mTLS, no metrics): its path and the address to dial.
    pub fn process_config(&self) -> (PathBuf, String) {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
            l.local_addr().expect("addr").port()
        };
        let mut config = Agent::config(&self.f, &self.pki, &self.state_dir, 80 << 20);
        config.listen.tcp = Some(format!("127.0.0.1:{port}").parse().expect("addr"));
        config.metrics.listen = None;
        let path = self.state_dir.join("rootletd.toml");
        std::fs::write(&path, toml_of(&config)).expect("config file");
        (path, format!("https://localhost:{port}"))
    }

    pub fn iface(&self) -> pb::Interface {
        api::interface(&self.f)
    }

    pub fn rootlet(&self) -> Option<pb::RootletRef> {
        api::rootlet_ref(&self.f)
    }

    pub async fn load(&self, ops: &mut RootletClient<Channel>) -> pb::RootletState {
        api::load(ops, &self.f).await
    }

    /// A signed bundle of embedded objects: (stage, object, priority).
    pub fn bundle(&self, version: &str, stages: &[(&str, &str, i32)], sign: bool) -> Vec<u8> {
        let stages: Vec<_> = stages.iter().map(|(n, o, p)| (*n, *o, *p, "ops")).collect();
        self.bundle_of("edge", version, &stages, sign)
    }

    /// A signed bundle `name` of embedded objects: (stage, object,
    /// priority, owner), for this agent's rootlet.
    pub fn bundle_of(
        &self,
        name: &str,
        version: &str,
        stages: &[(&str, &str, i32, &str)],
        sign: bool,
    ) -> Vec<u8> {
        self.bundle_for(name, version, &api::targets(&self.f), stages, sign)
    }

    /// A bundle with the manifest's `[[rootlets]]` tables given.
    pub fn bundle_for(
        &self,
        name: &str,
        version: &str,
        targets: &str,
        stages: &[(&str, &str, i32, &str)],
        sign: bool,
    ) -> Vec<u8> {
        let mut signed = api::bundle(&self.state_dir, name, version, targets, stages);
        if sign {
            signed.sign(&self.signing_key);
        }
        signed.to_bytes()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The runtime shuts down in the background when dropped.
        self.running.take();
    }
}

pub fn toml_of(c: &Config) -> String {
    toml::to_string(c).expect("config serializes")
}

/// Stops the agent gracefully and starts it again, with `edit` applied to
/// its configuration.
pub async fn restart(a: &mut Agent, edit: impl Fn(&mut Config)) {
    if let Some(r) = a.running.take() {
        r.shutdown().await.expect("graceful shutdown");
    }
    let mut config = Agent::config(&a.f, &a.pki, &a.state_dir, 80 << 20);
    edit(&mut config);
    let mut running = runtime::start(config).await.expect("restart rootletd");
    assert!(running.ready().await, "the agent serves again");
    a.running = Some(running);
}

pub async fn health(addr: &str, a: &Agent) -> Option<i32> {
    health_of(addr, a, "rootlet.v1.Rootlet").await
}

/// The health of `service` at the rootletd at `addr`: 1 SERVING,
/// 2 NOT_SERVING; None if it does not answer.
pub async fn health_of(addr: &str, a: &Agent, service: &str) -> Option<i32> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(a.pki.ca_pem()))
        .domain_name("localhost")
        .identity({
            let c = a.pki.client("mon");
            Identity::from_pem(c.cert_pem, c.key_pem)
        });
    let ch = Channel::from_shared(addr.to_owned())
        .ok()?
        .tls_config(tls)
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    h.check(Request::new(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    }))
    .await
    .ok()
    .map(|r| r.into_inner().status)
}

/// Waits, bounded, until the rootletd at `addr` serves; then an ops client.
/// The bound is for the VM tier: a start-up there takes about 10 s alone,
/// and its probe took 38 s (8 s alone) in a 6.1 guest while another test of
/// the suite ran beside it, so 60 s was too tight for a restart.
pub async fn serving(addr: &str, a: &Agent) -> RootletClient<Channel> {
    let end = Instant::now() + Duration::from_secs(180);
    while health(addr, a).await != Some(1) {
        assert!(Instant::now() < end, "rootletd at {addr} never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(a.pki.ca_pem()))
        .domain_name("localhost")
        .identity({
            let c = a.pki.client("ops");
            Identity::from_pem(c.cert_pem, c.key_pem)
        });
    let ch = Channel::from_shared(addr.to_owned())
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .expect("connect");
    RootletClient::new(ch)
}
