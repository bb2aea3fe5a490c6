//! A throwaway PKI for tests of the gRPC API: a CA, a server certificate for
//! `localhost`, `127.0.0.1` and `::1`, client certificates by name, and a
//! second, untrusted CA for negative tests. Everything is written as PEM
//! files under a temporary directory that is removed on drop.
//!
//! ```
//! use rootlet_integration_tests::pki::Pki;
//!
//! let pki = Pki::new();
//! let tls = pki.tls_config(); // for rootletd's [tls]
//! let admin = pki.client("ops-admin"); // trusted: chains to the CA
//! let rogue = pki.rogue_client("ops-admin"); // same name, untrusted CA
//! assert!(tls.cert.exists() && admin.cert_path.exists() && rogue.key_path.exists());
//! assert_ne!(pki.ca_pem(), pki.rogue_ca_pem());
//! ```

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rootlet_server::config::TlsConfig;

/// A certificate authority: its parameters and key sign leaves.
struct Authority {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
    cert_path: PathBuf,
}

impl Authority {
    fn new(dir: &Path, name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert_pem = params.self_signed(&key).expect("self-signed CA").pem();
        let cert_path = dir.join(format!("{name}.pem"));
        write(&cert_path, &cert_pem, 0o644);
        Authority {
            params,
            key,
            cert_pem,
            cert_path,
        }
    }

    /// A leaf certificate and its key, signed by this authority.
    fn issue(
        &self,
        cn: Option<&str>,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf parameters");
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("signing a leaf");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(path: &Path, contents: &str, mode: u32) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A client's certificate and key, in memory and on disk.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// The subject CN (or the DNS SAN for [`Pki::client_san`]).
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// The test PKI; see the module docs.
pub struct Pki {
    /// Where every file is; removed on drop.
    pub dir: PathBuf,
    ca: Authority,
    rogue: Authority,
    server_cert: PathBuf,
    server_key: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Pki {
    /// A CA, a server certificate signed by it, and an untrusted CA.
    ///
    /// # Panics
    /// If the temporary directory cannot be made or key generation fails.
    pub fn new() -> Pki {
        let tmp = tempfile::Builder::new()
            .prefix("rootlet-pki-")
            .tempdir()
            .expect("temporary directory for the PKI");
        let dir = tmp.path().to_owned();
        let ca = Authority::new(&dir, "rootlet-test-ca");
        let rogue = Authority::new(&dir, "rootlet-rogue-ca");
        let (cert, key) = ca.issue(
            Some("rootletd"),
            &["localhost", "127.0.0.1", "::1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let server_cert = dir.join("server.pem");
        let server_key = dir.join("server.key");
        write(&server_cert, &cert, 0o644);
        write(&server_key, &key, 0o600);
        Pki {
            dir,
            ca,
            rogue,
            server_cert,
            server_key,
            _tmp: tmp,
        }
    }

    /// The server certificate (for `localhost`, `127.0.0.1`, `::1`) and key
    /// files.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.server_cert.clone(), self.server_key.clone())
    }

    /// The CA certificate (PEM) that signs the server and trusted clients.
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    pub fn ca_path(&self) -> &Path {
        &self.ca.cert_path
    }

    /// The untrusted CA's certificate (PEM).
    pub fn rogue_ca_pem(&self) -> &str {
        &self.rogue.cert_pem
    }

    /// rootletd's `[tls]`: the server certificate and key, clients by the CA.
    pub fn tls_config(&self) -> TlsConfig {
        TlsConfig {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: self.ca.cert_path.clone(),
            allow_key_access_by_group_or_others: false,
        }
    }

    /// A client certificate with subject CN `cn`, signed by the CA.
    pub fn client(&self, cn: &str) -> ClientIdentity {
        self.client_of(&self.ca, "client", Some(cn), &[], cn)
    }

    /// A client certificate with no subject CN and the DNS SAN `name`.
    pub fn client_san(&self, name: &str) -> ClientIdentity {
        self.client_of(&self.ca, "client-san", None, &[name], name)
    }

    /// A client certificate with subject CN `cn`, signed by the untrusted CA.
    pub fn rogue_client(&self, cn: &str) -> ClientIdentity {
        self.client_of(&self.rogue, "rogue", Some(cn), &[], cn)
    }

    fn client_of(
        &self,
        ca: &Authority,
        kind: &str,
        cn: Option<&str>,
        sans: &[&str],
        name: &str,
    ) -> ClientIdentity {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let (cert_pem, key_pem) = ca.issue(cn, sans, ExtendedKeyUsagePurpose::ClientAuth);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let stem: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let cert_path = self.dir.join(format!("{kind}-{stem}-{n}.pem"));
        let key_path = self.dir.join(format!("{kind}-{stem}-{n}.key"));
        write(&cert_path, &cert_pem, 0o644);
        write(&key_path, &key_pem, 0o600);
        ClientIdentity {
            name: name.to_owned(),
            cert_pem,
            key_pem,
            cert_path,
            key_path,
        }
    }
}
