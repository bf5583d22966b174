//! Serves the CoAP transport in front of the compliance kit's scripted gateway (`echo`, `fail`,
//! `reject`, `slow` extensions), for trying real clients and load tools by hand:
//! `cargo run -p fleetgate-transport-coap --example scripted_server -- 127.0.0.1:5683`.

use std::sync::Arc;

use fleetgate_transport_coap::{CoapConfig, CoapTransport};
use fleetgate_transport_core::Transport;
use fleetgate_transport_core::compliance::ScriptedGateway;
use fleetgate_transport_core::metrics::TransportMetrics;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:5683".into());
    let listen =
        listen.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let reuse_port = std::env::var_os("COAP_REUSE_PORT").is_some();
    let config = CoapConfig { listen, reuse_port, ..CoapConfig::default() };
    let mut transport = CoapTransport::new(config, &TransportMetrics::default());
    transport.bind().map_err(std::io::Error::other)?;
    println!("listening on {:?}", transport.local_addrs());
    let gateway = Arc::new(ScriptedGateway::default());
    let (_stop, shutdown) = fleetgate_transport_core::Shutdown::channel();
    let pusher = gateway.clone();
    tokio::spawn(async move {
        // Push a configuration every second, for observers of kp1/demo-v1/echo/tok-1/config/json.
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            pusher.push("tok-1", "/config/json", b"{\"configId\":\"pushed\"}");
        }
    });
    Box::new(transport).serve(gateway, shutdown).await;
    Ok(())
}
