//! The shared transport compliance kit against the CoAP transport.

mod common;

use std::sync::Arc;

use fleetgate_transport_coap::CoapConfig;
use fleetgate_transport_core::compliance::{self, ScriptedGateway};

#[tokio::test]
async fn coap_passes_the_compliance_kit() {
    let gateway = Arc::new(ScriptedGateway::default());
    let (addr, _metrics, _stop) = common::serve(gateway.clone(), CoapConfig::default()).await;
    compliance::run(&gateway, |creds| common::connect(addr, creds)).await;
}

#[tokio::test]
async fn coap_passes_the_compliance_kit_with_separate_responses() {
    // An ACK timeout shorter than the `slow` extension: its answers come separately.
    let gateway = Arc::new(ScriptedGateway::default());
    let config = CoapConfig { ack_timeout_ms: 50, ..CoapConfig::default() };
    let (addr, metrics, _stop) = common::serve(gateway.clone(), config).await;
    compliance::run(&gateway, |creds| common::connect(addr, creds)).await;
    assert!(metrics.separate_responses.get() >= 1);
}

#[tokio::test]
async fn coap_passes_the_compliance_kit_with_reuse_port() {
    let gateway = Arc::new(ScriptedGateway::default());
    let config = CoapConfig { reuse_port: true, ..CoapConfig::default() };
    let (addr, _metrics, _stop) = common::serve(gateway.clone(), config).await;
    compliance::run(&gateway, |creds| common::connect(addr, creds)).await;
}
