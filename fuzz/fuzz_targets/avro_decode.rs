//! Feeds arbitrary bytes to the decoder of every Avro record: none may panic.

#![no_main]

use fleetgate_messages::*;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ClientData::decode(data);
    let _ = ExtensionData::decode(data);
    let _ = DataSamplesEvent::decode(data);
    let _ = DataSamplesProcessed::decode(data);
    let _ = EndpointTokenValidationRequest::decode(data);
    let _ = EndpointTokenValidationResponse::decode(data);
    let _ = ClientUsernamePasswordValidationRequest::decode(data);
    let _ = ClientUsernamePasswordValidationResponse::decode(data);
    let _ = EndpointTokenRevokedEvent::decode(data);
    let _ = ClientCertificateValidationRequest::decode(data);
    let _ = ClientCertificateValidationResponse::decode(data);
    let _ = ClientCredentialRevokedEvent::decode(data);
    let _ = ConnectedEvent::decode(data);
    let _ = DisconnectedEvent::decode(data);
    let _ = TimeSeriesEvent::decode(data);
    let _ = ConfigUpdated::decode(data);
    let _ = ConfigApplied::decode(data);
    let _ = ConfigRequest::decode(data);
    let _ = ConfigResponse::decode(data);
});
