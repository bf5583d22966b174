#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::test_certs::{TestCa, TestFiles};

fn client_config(ca: &Path, identity: Option<(&Path, &Path)>, tls12: bool) -> rustls::ClientConfig {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
    }
}

/// One handshake of `client` against `server`; the server's result, and whether the client
/// could then read a byte the server wrote.
async fn handshake(
    server: &TlsServer,
    client: rustls::ClientConfig,
) -> (Result<Option<PeerCertificate>, HandshakeFailure>, bool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let Ok(mut tls) = connector.connect(name, tcp).await else { return false };
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.is_ok() && byte == [7]
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let result = match server.accept(tcp).await {
        Ok(mut stream) => {
            let peer = server.peer_certificate(stream.get_ref().1.peer_certificates());
            let _ = stream.write_all(&[7]).await;
            let _ = stream.flush().await;
            Ok(peer)
        }
        Err(e) => Err(e),
    };
    (result, client.await.unwrap())
}

fn server(files: &TestFiles, mtls: bool, metrics: &TransportMetrics) -> TlsServer {
    TlsServer::load(&files.tls_config(mtls), Vec::new(), Versions::Tls12And13, "t", metrics)
        .unwrap()
}

fn failures(metrics: &TransportMetrics, reason: &'static str) -> u64 {
    metrics.counters("t").tls_handshake_failures(reason).get()
}

#[tokio::test]
async fn tls_12_and_13_handshakes_are_served_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let metrics = TransportMetrics::default();
    let server = server(&files, false, &metrics);
    for tls12 in [false, true] {
        let (result, read) = handshake(&server, client_config(&files.ca, None, tls12)).await;
        assert_eq!(result, Ok(None));
        assert!(read);
    }
    assert_eq!(metrics.counters("t").tls_handshakes().get(), 2);
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let metrics = TransportMetrics::default();
    let server = server(&files, false, &metrics);
    let (result, read) = handshake(&server, client_config(&files.other_ca, None, false)).await;
    assert_eq!(result, Err(HandshakeFailure::AlertReceived));
    assert!(!read);
    assert_eq!(failures(&metrics, "alert_received"), 1);
}

#[tokio::test]
async fn mtls_takes_valid_client_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    let f = TestFiles::write(dir.path());
    let metrics = TransportMetrics::default();
    let server = server(&f, true, &metrics);

    let good = client_config(&f.ca, Some((&f.client_cert, &f.client_key)), false);
    let (result, read) = handshake(&server, good).await;
    let peer = result.unwrap().unwrap();
    assert_eq!(peer.endpoint.as_deref(), Some("device-1"));
    assert_eq!(peer.serial, "1001");
    assert!(peer.issuer.contains("CN=fleetgate test CA"), "{}", peer.issuer);
    assert!(read);

    for (cert, key, failure) in [
        (&f.expired_cert, &f.expired_key, HandshakeFailure::ClientCertificateExpired),
        (&f.revoked_cert, &f.revoked_key, HandshakeFailure::ClientCertificateRevoked),
        (&f.stranger_cert, &f.stranger_key, HandshakeFailure::ClientCertificateInvalid),
    ] {
        for tls12 in [false, true] {
            let client = client_config(&f.ca, Some((cert, key)), tls12);
            let (result, read) = handshake(&server, client).await;
            assert_eq!(result, Err(failure), "{}", cert.display());
            assert!(!read);
        }
        assert_eq!(failures(&metrics, failure.reason()), 2);
    }
    let (result, _) = handshake(&server, client_config(&f.ca, None, false)).await;
    assert_eq!(result, Err(HandshakeFailure::NoClientCertificate));
}

#[tokio::test]
async fn the_endpoint_field_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let f = TestFiles::write(dir.path());
    let config = TlsConfig { endpoint_field: EndpointField::SerialNumber, ..f.tls_config(true) };
    let metrics = TransportMetrics::default();
    let server = TlsServer::load(&config, Vec::new(), Versions::Tls13, "t", &metrics).unwrap();
    let good = client_config(&f.ca, Some((&f.client_cert, &f.client_key)), false);
    let (result, _) = handshake(&server, good).await;
    assert_eq!(result.unwrap().unwrap().endpoint.as_deref(), Some("1001"));
}

#[tokio::test]
async fn plaintext_and_silence_are_refused_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let metrics = TransportMetrics::default();
    let config = TlsConfig { handshake_timeout_ms: 200, ..files.tls_config(false) };
    let server = TlsServer::load(&config, Vec::new(), Versions::Tls12And13, "t", &metrics).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // An MQTT CONNECT in plaintext.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(&[0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'c', b'1'])
        .await
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    assert_eq!(server.accept(tcp).await.err(), Some(HandshakeFailure::NotTls));
    // The server closes: the client reads an alert at most, then EOF.
    let mut rest = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut rest)).await.unwrap();

    let _silent = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    assert_eq!(server.accept(tcp).await.err(), Some(HandshakeFailure::Timeout));
    assert_eq!(failures(&metrics, "not_tls"), 1);
    assert_eq!(failures(&metrics, "timeout"), 1);
}

#[tokio::test]
async fn changed_files_are_reloaded_for_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let metrics = TransportMetrics::default();
    let config = TlsConfig { reload_interval_ms: 50, ..files.tls_config(false) };
    let server = TlsServer::load(&config, Vec::new(), Versions::Tls12And13, "t", &metrics).unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let watcher = tokio::spawn(server.clone().watch_files(stop));

    // A bad file is logged and the old certificate stays.
    std::fs::write(&files.server_cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(handshake(&server, client_config(&files.ca, None, false)).await.1);

    // A new CA's certificate: clients of the old CA are refused, of the new one served.
    let ca = TestCa::new("second CA");
    let pair = ca.server();
    std::fs::write(dir.path().join("ca2.pem"), &ca.pem).unwrap();
    std::fs::write(&files.server_key, &pair.key).unwrap();
    std::fs::write(&files.server_cert, &pair.cert).unwrap();
    let new_ca = dir.path().join("ca2.pem");
    let mut switched = false;
    for _ in 0..100 {
        if handshake(&server, client_config(&new_ca, None, false)).await.1 {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched, "the new certificate was not loaded");
    assert!(!handshake(&server, client_config(&files.ca, None, false)).await.1);
    stop_tx.send(true).unwrap();
    watcher.await.unwrap();
}

#[test]
fn unreadable_files_name_their_setting() {
    let dir = tempfile::tempdir().unwrap();
    let files = TestFiles::write(dir.path());
    let metrics = TransportMetrics::default();
    let load = |c: &TlsConfig| {
        TlsServer::load(c, Vec::new(), Versions::Tls13, "t", &metrics).err().unwrap().to_string()
    };
    let missing = TlsConfig { cert_file: dir.path().join("nope.pem"), ..files.tls_config(false) };
    assert!(load(&missing).starts_with("tls.cert_file"), "{}", load(&missing));
    let swapped = TlsConfig { key_file: files.client_key.clone(), ..files.tls_config(false) };
    assert!(load(&swapped).contains("key"), "{}", load(&swapped));
    let bad_ca =
        TlsConfig { client_ca_file: Some(files.server_key.clone()), ..files.tls_config(true) };
    assert!(load(&bad_ca).starts_with("tls.client_ca_file"), "{}", load(&bad_ca));
}
