//! Certificates made at test time (feature `test-certs`): a CA, a server certificate for
//! `localhost` and 127.0.0.1, client certificates (valid, expired, revoked), a CRL, and a
//! second CA that nobody trusts. Only tests use it.

// Test support: a failure here is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber, date_time_ymd,
};

use crate::TlsConfig;

/// A certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationName, "fleetgate tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Self { issuer: Issuer::new(params, key), pem }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Pair {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, "localhost");
        self.sign(params)
    }

    /// A client certificate with common name `cn` and serial `serial`; `expired` puts its
    /// validity in the past.
    pub fn client(&self, cn: &str, serial: u64, expired: bool) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        self.sign(params)
    }

    /// A CRL revoking `serials`.
    pub fn crl(&self, serials: &[u64]) -> String {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: date_time_ymd(2024, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }

    fn sign(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// The usual set, written as PEM files into a directory.
pub struct TestFiles {
    pub dir: PathBuf,
    /// The CA that signed the server and the good clients.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// CN `device-1`, serial 1001.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// CN `device-old`, serial 1002, expired in 2021.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
    /// CN `device-revoked`, serial 1003, in the CRL.
    pub revoked_cert: PathBuf,
    pub revoked_key: PathBuf,
    /// CN `device-2`, serial 1004: valid, from the CA, but unknown to a 16/ECAP provider that
    /// lists only `client_cert`.
    pub unlisted_cert: PathBuf,
    pub unlisted_key: PathBuf,
    /// The CRL revoking serial 1003.
    pub crl: PathBuf,
    /// A CA nobody trusts, and a client it signed (CN `device-1` too).
    pub other_ca: PathBuf,
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

impl TestFiles {
    /// Makes the CAs and certificates and writes them into `dir`.
    pub fn write(dir: &Path) -> Self {
        let ca = TestCa::new("fleetgate test CA");
        let other = TestCa::new("untrusted CA");
        let path = |name: &str| dir.join(name);
        let put = |name: &str, text: &str| {
            std::fs::write(path(name), text).unwrap();
            path(name)
        };
        let server = ca.server();
        let client = ca.client("device-1", 1001, false);
        let expired = ca.client("device-old", 1002, true);
        let revoked = ca.client("device-revoked", 1003, false);
        let unlisted = ca.client("device-2", 1004, false);
        let stranger = other.client("device-1", 1001, false);
        Self {
            dir: dir.to_owned(),
            ca: put("ca.pem", &ca.pem),
            server_cert: put("server.pem", &server.cert),
            server_key: put("server.key", &server.key),
            client_cert: put("client.pem", &client.cert),
            client_key: put("client.key", &client.key),
            expired_cert: put("expired.pem", &expired.cert),
            expired_key: put("expired.key", &expired.key),
            revoked_cert: put("revoked.pem", &revoked.cert),
            revoked_key: put("revoked.key", &revoked.key),
            unlisted_cert: put("unlisted.pem", &unlisted.cert),
            unlisted_key: put("unlisted.key", &unlisted.key),
            crl: put("crl.pem", &ca.crl(&[1003])),
            other_ca: put("other-ca.pem", &other.pem),
            stranger_cert: put("stranger.pem", &stranger.cert),
            stranger_key: put("stranger.key", &stranger.key),
        }
    }

    /// What the gateway reads from the certificate in `cert_file` (issuer, base-10 serial,
    /// common name).
    pub fn identity(cert_file: &Path) -> crate::PeerCertificate {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_file(cert_file).unwrap();
        crate::PeerCertificate::parse(&der, crate::EndpointField::CommonName).unwrap()
    }

    /// A `tls` section serving the server certificate; with `mtls`, client certificates
    /// from the CA are required and the CRL is checked.
    pub fn tls_config(&self, mtls: bool) -> TlsConfig {
        TlsConfig {
            cert_file: self.server_cert.clone(),
            key_file: self.server_key.clone(),
            client_ca_file: mtls.then(|| self.ca.clone()),
            crl_files: if mtls { vec![self.crl.clone()] } else { Vec::new() },
            ..TlsConfig::default()
        }
    }
}
