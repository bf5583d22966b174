//! Starting and stopping the services of one fleetgate process: `fleetgate up` runs them all on
//! one bus; `fleetgate gateway|dcx|auth` runs one on NATS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetgate_auth::{AuthConfig, AuthProvider, EndpointEntry};
use fleetgate_bus::{AnyBus, Bus, InProcessBus, NatsBus, NatsOptions};
use fleetgate_dcx::Dcx;
use fleetgate_transport_coap::CoapTransport;
use fleetgate_transport_core::Transport;
use fleetgate_transport_http::HttpTransport;
use fleetgate_transport_mqtt::server::MqttTransport;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState, MetricsSource};
use crate::config::Config;
use crate::service::Gateway;

/// Which services a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, in one process.
    Up,
    /// The communication service and its device transports.
    Gateway,
    /// The data collection extension.
    Dcx,
    /// The 16/ECAP provider.
    Auth,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Up => "up",
            Role::Gateway => "gateway",
            Role::Dcx => "dcx",
            Role::Auth => "auth",
        }
    }
}

/// Why a process could not start. Each names the setting to fix where there is one.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("{setting}: cannot listen on {addr}: {source}")]
    Bind {
        /// The setting that names the address.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// What the OS said (address in use, permission denied, ...).
        source: std::io::Error,
    },
    /// One service on the in-process bus would have nobody to talk to.
    #[error(
        "`fleetgate {0}` runs one service and needs nats.url (FLEETGATE_NATS_URL); use `fleetgate up` to run everything in one process"
    )]
    NeedsNats(&'static str),
    /// NATS is unreachable.
    #[error("nats.url: {0}")]
    Nats(fleetgate_bus::BusError),
    /// A service refused its configuration or the bus refused it.
    #[error("{0}")]
    Service(String),
}

/// The token of the demo endpoint `fleetgate up` accepts when it runs on built-in defaults.
pub const DEMO_TOKEN: &str = "demo-token";

/// With no configuration file and no endpoints, `fleetgate up` knows one demo endpoint so that
/// the README's quickstart works out of the box.
pub fn add_demo_endpoint(auth: &mut AuthConfig) {
    if auth.endpoints.is_empty() && !auth.auto_register {
        tracing::warn!(
            "no configuration file: accepting the demo endpoint token `{DEMO_TOKEN}` of app version `demo-v1`"
        );
        auth.endpoints.push(EndpointEntry {
            app_version: "demo-v1".into(),
            token: DEMO_TOKEN.into(),
            endpoint_id: "demo-endpoint".into(),
        });
    }
}

/// Runs `role` with `config` until SIGINT or SIGTERM, then drains and stops.
pub async fn run(role: Role, config: Config) -> Result<(), StartError> {
    run_until(role, config, wait_for_signal()).await
}

/// Runs `role` with `config` until `until` resolves, then drains and stops: `run` for tests and
/// tools that host fleetgate in their own process.
pub async fn run_until(
    role: Role,
    config: Config,
    until: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let (stop_tx, stop) = watch::channel(false);
    let bus = connect_bus(role, &config).await?;

    // Bind everything first, so that a taken port fails start-up before any service runs.
    let admin_listener = match config.admin.enabled {
        true => Some(bind_tcp("admin.listen", config.admin.listen).await?),
        false => None,
    };
    let serves_devices = matches!(role, Role::Up | Role::Gateway);
    let transports = &config.transports;
    let bind_error = |setting: &'static str, addr: SocketAddr| {
        move |source| StartError::Bind { setting, addr, source }
    };
    let mqtt = match serves_devices && transports.mqtt.enabled {
        true => Some(
            MqttTransport::bind(transports.mqtt.clone())
                .map_err(bind_error("transports.mqtt.listen", transports.mqtt.listen))?,
        ),
        false => None,
    };
    let coap = match serves_devices && transports.coap.enabled {
        true => Some(
            CoapTransport::bind(transports.coap.clone())
                .map_err(bind_error("transports.coap.listen", transports.coap.listen))?,
        ),
        false => None,
    };
    let http = match serves_devices && transports.http.enabled {
        true => Some(
            HttpTransport::bind(transports.http.clone())
                .map_err(bind_error("transports.http.listen", transports.http.listen))?,
        ),
        false => None,
    };

    let service_error = |e: &dyn std::fmt::Display| StartError::Service(e.to_string());
    let mut metrics: Vec<MetricsSource> = Vec::new();
    let mut services: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    if matches!(role, Role::Up | Role::Auth) {
        let auth = AuthProvider::start(bus.clone(), config.auth.clone(), stop.clone())
            .await
            .map_err(|e| service_error(&e))?;
        services.push(tokio::spawn(auth.join()));
    }
    if matches!(role, Role::Up | Role::Dcx) {
        let dcx = Dcx::start(bus.clone(), config.dcx.clone(), stop.clone())
            .await
            .map_err(|e| service_error(&e))?;
        let m = dcx.metrics.clone();
        metrics.push(Box::new(move |out| m.render(out)));
        services.push(tokio::spawn(dcx.join()));
    }
    let mut gateway = None;
    if serves_devices {
        let g = Gateway::start(bus.clone(), config.gateway.clone(), stop.clone())
            .await
            .map_err(|e| service_error(&e))?;
        let m = g.clone();
        metrics.push(Box::new(move |out| m.render_metrics(out)));
        if let Some(mqtt) = mqtt {
            let m = mqtt.metrics();
            metrics.push(Box::new(move |out| m.render(out)));
            services.push(serve(mqtt, &g, &stop));
        }
        if let Some(coap) = coap {
            let m = coap.metrics();
            metrics.push(Box::new(move |out| m.render(out)));
            services.push(serve(coap, &g, &stop));
        }
        if let Some(http) = http {
            let m = http.metrics();
            metrics.push(Box::new(move |out| m.render(out)));
            services.push(serve(http, &g, &stop));
        }
        gateway = Some(g);
    }

    let state = Arc::new(AdminState {
        ready: Default::default(),
        bus_connected: {
            let bus = bus.clone();
            Box::new(move || bus.is_connected())
        },
        metrics,
    });
    if let Some(listener) = admin_listener {
        tracing::info!(listen = %admin::describe(&listener), "admin endpoints listening");
        tokio::spawn(admin::serve(listener, state.clone(), stop.clone()));
    }
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(role = role.name(), bus = bus.kind(), "fleetgate ready");

    until.await;
    tracing::info!("stopping: draining requests in flight");
    state.ready.store(false, Ordering::Relaxed);
    if let Some(gateway) = &gateway {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(config.process.drain_timeout_ms);
        while gateway.pending_requests() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = stop_tx.send(true);
    // Bounded, so that a bus that is gone (NATS down) cannot keep the process from exiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for service in services {
        let _ = tokio::time::timeout_at(deadline, service).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), bus.flush()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves devices on `transport` until `stop`.
fn serve<T: Transport>(
    transport: T,
    gateway: &Arc<Gateway<AnyBus>>,
    stop: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tracing::info!(listen = %transport.local_addr(), "{} transport listening", transport.name());
    tokio::spawn(transport.serve(gateway.clone(), stop.clone()))
}

async fn connect_bus(role: Role, config: &Config) -> Result<AnyBus, StartError> {
    match &config.nats.url {
        Some(url) if !url.is_empty() => {
            let mut options = NatsOptions::new(url.clone(), format!("fleetgate-{}", role.name()));
            options.publish_capacity = config.nats.publish_capacity;
            options.subscription_capacity = config.nats.subscription_capacity;
            options.connect_timeout = Duration::from_millis(config.nats.connect_timeout_ms);
            options.publish_linger = Duration::from_millis(config.nats.publish_linger_ms);
            options.publish_batch = config.nats.publish_batch;
            let bus = NatsBus::connect(&options).await.map_err(StartError::Nats)?;
            tracing::info!(url, "connected to NATS");
            Ok(AnyBus::Nats(bus))
        }
        _ if role != Role::Up => Err(StartError::NeedsNats(role.name())),
        _ => Ok(AnyBus::InProcess(InProcessBus::new(config.bus.in_process_capacity))),
    }
}

async fn bind_tcp(setting: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { setting, addr, source })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
