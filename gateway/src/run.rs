//! Starting and stopping the services of one fleetgate process: `fleetgate up` runs every
//! service of the registry on one bus; `fleetgate <service>` runs one on NATS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_auth::{AuthConfig, EndpointEntry};
use fleetgate_bus::{AnyBus, Bus, InProcessBus, NatsBus, NatsOptions};
use fleetgate_service::{Running, Service, ServiceError, StartContext};
use fleetgate_transport_core::metrics::{Registry, TransportMetrics};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::registry::{SERVICES, ServiceEntry};
use crate::reload::{Origin, Reloads, watch_and_reload};

/// Which services a process runs.
#[derive(Clone, Copy)]
pub enum Role {
    /// Every registered service, in one process.
    Up,
    /// One service, on NATS.
    One(&'static ServiceEntry),
}

impl Role {
    /// `up` or the service's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Up => "up",
            Role::One(s) => s.name,
        }
    }

    fn services(self) -> Vec<&'static ServiceEntry> {
        match self {
            Role::Up => SERVICES.iter().collect(),
            Role::One(s) => vec![s],
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
    Nats(#[source] fleetgate_bus::BusError),
    /// A service refused its configuration, a port, or the bus refused it.
    #[error(transparent)]
    Service(#[from] ServiceError),
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

/// With no configuration file, `fleetgate up` (and `fleetgate auth`) let clients without
/// credentials in, on their endpoint token alone, as the README's quickstart expects; anywhere
/// else `auth.allow_anonymous` is off unless configured.
pub fn allow_demo_anonymous(auth: &mut AuthConfig) {
    auth.allow_anonymous = true;
}

/// With no configuration file and no applications, `fleetgate up` has the demo application
/// `demo` (app version `demo-v1`) with EPTS auto-extraction on, and EPTS a reliable receiver
/// of DCX, so that a device's `/status` means its data is stored; devices reach CMX too.
pub fn add_demo_application(config: &mut Config) {
    if !config.gateway.extensions.contains(&config.cmx.instance) {
        config.gateway.extensions.push(config.cmx.instance.clone());
    }
    if config.applications.is_empty() {
        let mut demo = crate::config::ApplicationConfig {
            versions: vec!["demo-v1".into()],
            ..Default::default()
        };
        demo.time_series.auto_extract = true;
        config.applications.insert("demo".into(), demo);
        if config.dcx.reliable_receivers.is_empty() {
            config.dcx.reliable_receivers.push(config.epts.instance.clone());
        }
    }
}

/// Runs `role` with `config` until SIGINT or SIGTERM, then drains and stops. On SIGHUP, and
/// when the file changes, the configuration is loaded again from `origin` and what can change
/// live is applied ([`crate::reload`]).
pub async fn run(role: Role, config: Config, origin: Origin) -> Result<(), StartError> {
    run_with(role, config, wait_for_signal(), Some(origin)).await
}

/// Runs `role` with `config` until `until` resolves, then drains and stops: `run` for tests and
/// tools that host fleetgate in their own process (without reloads).
pub async fn run_until(
    role: Role,
    config: Config,
    until: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    run_with(role, config, until, None).await
}

async fn run_with(
    role: Role,
    config: Config,
    until: impl std::future::Future<Output = ()>,
    origin: Option<Origin>,
) -> Result<(), StartError> {
    let (stop_tx, stop) = watch::channel(false);

    // The admin listener first: a taken port fails start-up at once, and while NATS is still
    // being reached `/healthz` answers and `/readyz` says why the process is not ready.
    let admin_listener = match config.admin.enabled {
        true => Some(bind_tcp("admin.listen", config.admin.listen).await?),
        false => None,
    };
    let state = Arc::new(AdminState::with_api_tokens(config.admin.api_tokens.clone()));
    if let Some(listener) = admin_listener {
        tracing::info!(listen = %admin::describe(&listener), "admin endpoints listening");
        tokio::spawn(admin::serve(listener, state.clone(), stop.clone()));
    }
    let bus = connect_bus(role, &config).await?;

    // Make and bind everything else before any service runs, so that a taken port fails
    // start-up first.
    let mut registry = Registry::with_prefix("fleetgate");
    let transport_metrics = TransportMetrics::register(&mut registry);
    let mut reloads = Reloads::default();
    let mut services: Vec<Box<dyn Service>> = role
        .services()
        .iter()
        .map(|s| (s.make)(&config, &transport_metrics, &mut reloads))
        .collect();
    for service in &mut services {
        service.bind()?;
        service.register_metrics(&mut registry);
    }

    let mut running: Vec<Running> = Vec::with_capacity(services.len());
    for service in services {
        let name = service.name();
        let context = StartContext { bus: bus.clone(), shutdown: stop.clone() };
        running.push(service.start(context).await?);
        tracing::debug!(service = name, "service started");
    }

    if let Some(origin) = origin {
        let watching =
            watch_and_reload(origin, config.clone(), reloads, &mut registry, stop.clone());
        tokio::spawn(watching);
    }
    let statuses: Vec<_> = running.iter().map(|r| r.status.clone()).collect();
    state.started(bus.clone(), statuses.clone(), registry);
    tracing::info!(role = role.name(), bus = bus.kind(), "fleetgate ready");

    until.await;
    tracing::info!("stopping: taking no new requests, finishing those in flight");
    state.draining();
    for service in &statuses {
        service.drain();
    }
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(config.process.drain_timeout_ms);
    while statuses.iter().any(|s| s.in_flight() > 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    // Bounded, so that a bus that is gone (NATS down) cannot keep the process from exiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for service in running {
        let _ = tokio::time::timeout_at(deadline, service.stopped).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), bus.flush()).await;
    tracing::info!("stopped");
    Ok(())
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
            options.health_interval = Duration::from_millis(config.nats.health_probe_interval_ms);
            options.health_timeout = Duration::from_millis(config.nats.health_probe_timeout_ms);
            let bus = connect_nats(&options).await.map_err(StartError::Nats)?;
            tracing::info!(url, "connected to NATS");
            Ok(AnyBus::Nats(bus))
        }
        _ => match role {
            Role::One(service) => Err(StartError::NeedsNats(service.name)),
            Role::Up => Ok(AnyBus::InProcess(InProcessBus::new(config.bus.in_process_capacity))),
        },
    }
}

/// Connects to NATS, trying again with backoff (100 ms doubling to 2 s) until
/// `options.connect_timeout` has passed since the first try: in a cluster the bus may come up
/// after the gateway. The last error is the one reported.
async fn connect_nats(options: &NatsOptions) -> Result<NatsBus, fleetgate_bus::BusError> {
    let deadline = tokio::time::Instant::now() + options.connect_timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = NatsOptions {
            connect_timeout: left.max(Duration::from_millis(100)),
            ..options.clone()
        };
        match NatsBus::connect(&attempt).await {
            Ok(bus) => return Ok(bus),
            Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "NATS is not reachable yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
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
