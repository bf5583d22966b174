//! TLS for fleetgate's device transports (MQTT over TLS and WebSocket, QUIC, HTTPS).
//!
//! - [`TlsConfig`]: the `tls` section a secure listener has: certificate chain and key as PEM
//!   files, an optional client CA (mTLS) with CRLs, which certificate field names the endpoint,
//!   how often the files are checked for changes, the handshake timeout.
//! - [`TlsServer`]: the rustls `ServerConfig` built from those files, always with the ring
//!   provider (TLS 1.2 and 1.3; 1.3 alone for QUIC), rebuilt whole when the files change: new
//!   connections get the new certificate, live ones keep theirs. [`TlsServer::accept`] runs one
//!   handshake under the timeout and counts it, or its failure by reason
//!   (`fleetgate_transport_tls_handshake_failures_total{transport,reason}`); failures are
//!   logged at debug only, so that a scanner cannot flood the log.
//! - [`PeerCertificate`]: what a verified client certificate says (issuer, serial in base 10 as
//!   16/ECAP wants it, the configured endpoint field).
//!
//! The binary calls [`install_default_provider`] once, for third-party code that asks rustls
//! for the process default; this crate never relies on it. It knows nothing of MQTT or HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fleetgate_transport_core::ClientCertificate;
use fleetgate_transport_core::metrics::{Counter, TransportMetrics};
use fleetgate_transport_core::settings::below_minimum;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

pub use rustls;
pub use tokio_rustls::server::TlsStream;

/// The crypto provider of every configuration this crate builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process's default rustls provider, for libraries that build their
/// own configurations without naming one. Called once by the binary; later calls do nothing.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Which field of a client certificate names the endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointField {
    /// The subject's common name (CN).
    #[default]
    CommonName,
    /// The first DNS name of the subject alternative names.
    DnsName,
    /// The first URI of the subject alternative names.
    Uri,
    /// The serial number, in base 10.
    SerialNumber,
}

/// A secure listener's `tls` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM, leaf first.
    pub cert_file: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to. Set: mutual TLS, a
    /// client without a valid certificate is refused at the handshake.
    pub client_ca_file: Option<PathBuf>,
    /// Certificate revocation lists (PEM) for client certificates: a revoked one is refused.
    pub crl_files: Vec<PathBuf>,
    /// With a client CA: also accept clients that present no certificate (they authenticate
    /// with MQTT credentials instead). A certificate that is presented must still be valid.
    pub client_certificate_optional: bool,
    /// Which client certificate field names the endpoint.
    pub endpoint_field: EndpointField,
    /// How often the files are checked for changes (0: never); a change rebuilds the whole
    /// configuration for new connections.
    pub reload_interval_ms: u64,
    /// Time a client has to complete the handshake.
    pub handshake_timeout_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::from("/srv/fleetgate/tls/server.crt"),
            key_file: PathBuf::from("/srv/fleetgate/tls/server.key"),
            client_ca_file: None,
            crl_files: Vec::new(),
            client_certificate_optional: false,
            endpoint_field: EndpointField::CommonName,
            reload_interval_ms: 10_000,
            handshake_timeout_ms: 10_000,
        }
    }
}

impl TlsConfig {
    /// Values out of range, as `(setting under tls, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems =
            below_minimum(&[("tls.handshake_timeout_ms", self.handshake_timeout_ms, 1)]);
        if self.client_ca_file.is_none() && !self.crl_files.is_empty() {
            problems.push(("tls.crl_files", "CRLs need tls.client_ca_file".to_owned()));
        }
        problems
    }

    fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert_file.as_path(), self.key_file.as_path()];
        files.extend(self.client_ca_file.as_deref());
        files.extend(self.crl_files.iter().map(PathBuf::as_path));
        files
    }
}

/// Which TLS versions a listener offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// TLS 1.2 and 1.3 (TCP listeners).
    Tls12And13,
    /// TLS 1.3 alone (QUIC requires it).
    Tls13,
}

/// A configuration that could not be built: always the operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("tls.{setting} ({path}): {reason}")]
    File {
        /// The setting under `tls` that names it.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match the certificate, ...).
    #[error("tls: {0}")]
    Rustls(String),
}

/// The server configuration of one listener, reloaded when its files change.
#[derive(Clone)]
pub struct TlsServer {
    config: TlsConfig,
    alpn: Vec<Vec<u8>>,
    versions: Versions,
    current: Arc<watch::Sender<Arc<ServerConfig>>>,
    counters: TlsCounters,
}

/// A listener's handshake counters (shared families, labelled by transport).
#[derive(Clone)]
struct TlsCounters {
    metrics: fleetgate_transport_core::metrics::TransportCounters,
    handshakes: Counter,
}

/// Why a handshake failed: the `reason` label, a short fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client did not finish within the handshake timeout.
    Timeout,
    /// The client closed or reset the connection during the handshake.
    Closed,
    /// What arrived is not TLS (a plaintext client on the TLS port).
    NotTls,
    /// No protocol version, cipher suite or ALPN protocol in common.
    NoCommonParameters,
    /// The client refused our certificate (unknown CA, ...): it sent an alert.
    AlertReceived,
    /// mTLS: the client presented no certificate.
    NoClientCertificate,
    /// mTLS: the client certificate has expired or is not yet valid.
    ClientCertificateExpired,
    /// mTLS: the client certificate is revoked.
    ClientCertificateRevoked,
    /// mTLS: the client certificate does not chain to the client CA, or is bad otherwise.
    ClientCertificateInvalid,
    /// Anything else (a malformed handshake message, ...).
    Other,
}

impl HandshakeFailure {
    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::NotTls => "not_tls",
            Self::NoCommonParameters => "no_common_parameters",
            Self::AlertReceived => "alert_received",
            Self::NoClientCertificate => "no_client_certificate",
            Self::ClientCertificateExpired => "client_certificate_expired",
            Self::ClientCertificateRevoked => "client_certificate_revoked",
            Self::ClientCertificateInvalid => "client_certificate_invalid",
            Self::Other => "other",
        }
    }

    /// Classifies the error a TLS handshake ended with.
    pub fn classify(error: &std::io::Error) -> Self {
        use rustls::{CertificateError, Error, PeerIncompatible};
        let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
            return match error.kind() {
                std::io::ErrorKind::InvalidData => Self::NotTls,
                _ => Self::Closed,
            };
        };
        match tls {
            Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => Self::NotTls,
            Error::NoCertificatesPresented => Self::NoClientCertificate,
            Error::InvalidCertificate(e) => match e {
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Self::ClientCertificateExpired,
                CertificateError::Revoked => Self::ClientCertificateRevoked,
                _ => Self::ClientCertificateInvalid,
            },
            Error::AlertReceived(_) => Self::AlertReceived,
            Error::PeerIncompatible(
                PeerIncompatible::NoCipherSuitesInCommon
                | PeerIncompatible::NoKxGroupsInCommon
                | PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled
                | PeerIncompatible::SupportedVersionsExtensionRequired,
            )
            | Error::NoApplicationProtocol => Self::NoCommonParameters,
            _ => Self::Other,
        }
    }
}

impl TlsServer {
    /// Reads the files of `config` and builds the server configuration, offering `alpn` (none:
    /// no ALPN) and `versions`; handshakes are counted as `transport`'s.
    pub fn load(
        config: &TlsConfig,
        alpn: Vec<Vec<u8>>,
        versions: Versions,
        transport: &'static str,
        metrics: &TransportMetrics,
    ) -> Result<Self, TlsError> {
        let built = build(config, &alpn, versions)?;
        let (current, _) = watch::channel(Arc::new(built));
        let metrics = metrics.counters(transport);
        let counters = TlsCounters { handshakes: metrics.tls_handshakes(), metrics };
        Ok(Self { config: config.clone(), alpn, versions, current: Arc::new(current), counters })
    }

    /// The configuration new connections get now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.borrow().clone()
    }

    /// Sees every new configuration (QUIC hands it to its endpoint).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ServerConfig>> {
        self.current.subscribe()
    }

    /// The `tls` section it was built from.
    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    /// Rebuilds the configuration from the files now. On an error the old one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let built = build(&self.config, &self.alpn, self.versions)?;
        self.current.send_replace(Arc::new(built));
        Ok(())
    }

    /// Checks the files every `reload_interval_ms` and reloads when one has changed (its
    /// modification time or length), until `stop`. A file that cannot be loaded is logged and
    /// the old configuration kept; it is tried again at the next change.
    pub async fn watch_files(self, mut stop: watch::Receiver<bool>) {
        if self.config.reload_interval_ms == 0 {
            return;
        }
        let interval = Duration::from_millis(self.config.reload_interval_ms);
        let mut seen = stamps(&self.config);
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = stamps(&self.config);
            if now == seen {
                continue;
            }
            seen = now;
            match self.reload() {
                Ok(()) => {
                    tracing::info!(cert = %self.config.cert_file.display(), "TLS certificate reloaded")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but cannot be loaded; the previous certificate stays")
                }
            }
        }
    }

    /// Runs the server side of a handshake on `io` under the handshake timeout. A failure is
    /// counted by reason and logged at debug.
    pub async fn accept<IO>(&self, io: IO) -> Result<TlsStream<IO>, HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let result = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => {
                let failure = HandshakeFailure::classify(&e);
                tracing::debug!(error = %e, reason = failure.reason(), "TLS handshake failed");
                Err(failure)
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                Err(HandshakeFailure::Timeout)
            }
        };
        match &result {
            Ok(_) => self.count_handshake(),
            Err(failure) => self.count_failure(*failure),
        }
        result
    }

    /// Counts a handshake that completed elsewhere (QUIC).
    pub fn count_handshake(&self) {
        self.counters.handshakes.inc();
    }

    /// Counts a handshake failure found elsewhere (QUIC).
    pub fn count_failure(&self, failure: HandshakeFailure) {
        self.counters.metrics.tls_handshake_failures(failure.reason()).inc();
    }

    /// The verified client certificate of an accepted TLS stream, as the gateway sees it.
    pub fn client_certificate<IO>(&self, stream: &TlsStream<IO>) -> Option<ClientCertificate> {
        self.peer_certificate(stream.get_ref().1.peer_certificates()).map(Into::into)
    }

    /// What the client's leaf certificate says, when it presented one.
    pub fn peer_certificate(
        &self,
        chain: Option<&[CertificateDer<'_>]>,
    ) -> Option<PeerCertificate> {
        let leaf = chain?.first()?;
        PeerCertificate::parse(leaf, self.config.endpoint_field)
    }
}

/// What a client certificate (already verified at the handshake) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The issuer's distinguished name (RFC 4514 string).
    pub issuer: String,
    /// The serial number in base 10 (what 16/ECAP's certificate request carries).
    pub serial: String,
    /// The configured endpoint field, when the certificate has it.
    pub endpoint: Option<String>,
}

impl PeerCertificate {
    /// Reads a DER certificate; `None` when it does not parse (it passed the verifier, so
    /// that is not expected).
    pub fn parse(der: &CertificateDer<'_>, field: EndpointField) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let serial = cert.tbs_certificate.serial.to_str_radix(10);
        let san = |want: fn(&GeneralName<'_>) -> Option<String>| {
            cert.subject_alternative_name()
                .ok()
                .flatten()
                .and_then(|san| san.value.general_names.iter().find_map(want))
        };
        let endpoint = match field {
            EndpointField::CommonName => cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            EndpointField::DnsName => san(|n| match n {
                GeneralName::DNSName(s) => Some((*s).to_owned()),
                _ => None,
            }),
            EndpointField::Uri => san(|n| match n {
                GeneralName::URI(s) => Some((*s).to_owned()),
                _ => None,
            }),
            EndpointField::SerialNumber => Some(serial.clone()),
        };
        Some(Self { issuer: cert.issuer().to_string(), serial, endpoint })
    }
}

impl From<PeerCertificate> for ClientCertificate {
    fn from(c: PeerCertificate) -> Self {
        ClientCertificate { issuer: c.issuer, serial: c.serial, endpoint: c.endpoint }
    }
}

/// Each file's modification time and length (`None` where it cannot be read).
fn stamps(config: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
    config
        .files()
        .into_iter()
        .map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn file_error(setting: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { setting, path: path.to_owned(), reason: reason.to_string() }
}

fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(setting, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(setting, path, e))?;
    if certs.is_empty() {
        return Err(file_error(setting, path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// Builds a whole server configuration from the files.
fn build(
    config: &TlsConfig,
    alpn: &[Vec<u8>],
    versions: Versions,
) -> Result<ServerConfig, TlsError> {
    let chain = certificates("cert_file", &config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| file_error("key_file", &config.key_file, e))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match versions {
        Versions::Tls12And13 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Versions::Tls13 => &[&rustls::version::TLS13],
    };
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("client_ca_file", ca_file)? {
                roots.add(ca).map_err(|e| file_error("client_ca_file", ca_file, e))?;
            }
            let mut crls = Vec::new();
            for crl_file in &config.crl_files {
                let found = CertificateRevocationListDer::pem_file_iter(crl_file)
                    .map_err(|e| file_error("crl_files", crl_file, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| file_error("crl_files", crl_file, e))?;
                crls.extend(found);
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .with_crls(crls);
            if config.client_certificate_optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("tls.cert_file and tls.key_file: {e}")))?;
    server.alpn_protocols = alpn.to_vec();
    // 0-RTT stays off (the default): early data is replayable and MQTT PUBLISH is not
    // idempotent.
    Ok(server)
}

#[cfg(feature = "test-certs")]
pub mod test_certs;

#[cfg(test)]
mod tests;
