//! Feeds arbitrary DER to the client certificate reader (issuer, serial, endpoint field).
#![no_main]

use fleetgate_tls::EndpointField;
use fleetgate_tls::rustls::pki_types::CertificateDer;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let der = CertificateDer::from(data);
    for field in [EndpointField::CommonName, EndpointField::DnsName, EndpointField::Uri, EndpointField::SerialNumber] {
        let _ = fleetgate_tls::PeerCertificate::parse(&der, field);
    }
});
