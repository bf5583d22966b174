//! The `gateway` service: the communication service and the device transports of the
//! registry, wired together. The only place where transports meet the bus.

use std::sync::Arc;

use fleetgate_bus::{AnyBus, Bus};
use fleetgate_communication::{Gateway, GatewayConfig, GatewayMetrics};
use fleetgate_live::Live;
use fleetgate_service::{BoxFuture, Running, Service, ServiceError, ServiceStatus, StartContext};
use fleetgate_transport_core::metrics::{Registry, TransportMetrics};
use fleetgate_transport_core::{KpHandler, Shutdown, Transport};

use crate::config::Config;
use crate::registry::TRANSPORTS;
use crate::reload::{Keys, Reloads};

/// The communication service with its transports, made from `gateway.*` and `transports.*`.
pub struct GatewayService {
    settings: Live<GatewayConfig>,
    transports: Vec<Box<dyn Transport>>,
    metrics: GatewayMetrics,
}

impl GatewayService {
    /// Makes every enabled transport of the registry (unbound). New extensions and app
    /// versions apply while running, and a change of the authentication provider's settings
    /// empties the token cache.
    pub fn new(config: &Config, metrics: &TransportMetrics, reloads: &mut Reloads) -> Self {
        let transports = TRANSPORTS
            .iter()
            .filter_map(|t| (t.make)(&config.transports, metrics, reloads))
            .collect();
        let mut gateway = config.gateway.clone();
        gateway.app_names = config
            .applications
            .iter()
            .flat_map(|(app, a)| a.versions.iter().map(move |v| (v.clone(), app.clone())))
            .collect();
        let settings = Live::new(gateway);
        let keys = Keys::Only(&["extensions", "app_versions", "max_subscriptions_per_session"]);
        reloads.follow("gateway", keys, settings.clone(), |c| &c.gateway);
        let tokens = settings.clone();
        reloads.on("auth", Keys::AllBut(&["instance"]), move |_| tokens.touch());
        Self { settings, transports, metrics: GatewayMetrics::default() }
    }
}

impl Service for GatewayService {
    fn name(&self) -> &'static str {
        "gateway"
    }

    fn bind(&mut self) -> Result<(), ServiceError> {
        for transport in &mut self.transports {
            transport.bind().map_err(|e| ServiceError::new("gateway", e))?;
        }
        Ok(())
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
        for transport in &self.transports {
            transport.register_metrics(registry);
        }
    }

    fn start(
        self: Box<Self>,
        context: StartContext,
    ) -> BoxFuture<'static, Result<Running, ServiceError>> {
        Box::pin(async move {
            let StartContext { bus, shutdown } = context;
            let gateway = Gateway::start(bus, self.settings, self.metrics, shutdown.clone())
                .await
                .map_err(|e| ServiceError::new("gateway", e))?;
            let handler: Arc<dyn KpHandler> = gateway.clone();
            // The transports drain when the service does, and stop with the process.
            let (drain, drain_rx) = tokio::sync::watch::channel(false);
            let signals = Shutdown { drain: drain_rx, stop: shutdown };
            let mut serving = Vec::new();
            for transport in self.transports {
                for addr in transport.local_addrs() {
                    tracing::info!(listen = %addr, "{} transport listening", transport.name());
                }
                serving.push(tokio::spawn(transport.serve(handler.clone(), signals.clone())));
            }
            let status = Arc::new(GatewayStatus { gateway, drain });
            let stopped = Box::pin(async move {
                for task in serving {
                    let _ = task.await;
                }
            });
            Ok(Running { status, stopped })
        })
    }
}

/// The gateway's readiness, drain and requests in flight, for `/readyz` and the graceful stop.
struct GatewayStatus<B: Bus> {
    gateway: Arc<Gateway<B>>,
    drain: tokio::sync::watch::Sender<bool>,
}

impl ServiceStatus for GatewayStatus<AnyBus> {
    fn readiness(&self) -> Result<(), String> {
        self.gateway.readiness()
    }

    fn drain(&self) {
        self.gateway.drain();
        let _ = self.drain.send(true);
    }

    fn in_flight(&self) -> usize {
        self.gateway.in_flight()
    }
}
