//! The shared transport compliance kit against the HTTP transport.

mod common;

use std::sync::Arc;

use fleetgate_transport_core::compliance::{self, ScriptedGateway};

#[tokio::test]
async fn http_passes_the_compliance_kit() {
    let gateway = Arc::new(ScriptedGateway::default());
    let served = common::serve(gateway.clone(), common::config());
    let (addr, metrics) = (served.addr, served.metrics.clone());
    compliance::run(&gateway, |creds| common::HttpClient::connect(addr, metrics.clone(), creds))
        .await;
}
