//! Test support shared by the crates' tests: a real `nats-server` as a child process on an
//! ephemeral port (killed on drop, restartable), a PostgreSQL server of its own
//! ([`PostgresServer`]), free ports, and polling helpers.
//!
//! It is a dev-dependency only; nothing in a shipped binary links it.

// Test support: a broken expectation here is a failed test, so it may panic.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod postgres;

pub use postgres::PostgresServer;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Waits until a TCP connection to `addr` succeeds, or panics after `timeout`.
pub fn wait_for_tcp(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `nats-server` child process on 127.0.0.1 and an ephemeral port.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    ports_dir: PathBuf,
}

impl NatsServer {
    /// Starts a server on a port it picks itself (so parallel tests never race for one) and
    /// waits until it accepts connections. Panics with a clear message when `nats-server` is
    /// not installed (`.ci/run` installs it).
    pub fn start() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ports_dir =
            std::env::temp_dir().join(format!("fleetgate-nats-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("create ports dir");
        let mut server = Self { child: None, port: 0, ports_dir };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let binary = std::env::var_os("NATS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let log = if std::env::var_os("NATS_SERVER_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port_arg, "--ports_file_dir"])
            .arg(&self.ports_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {}: {e} (run .ci/run, which installs it)", binary.display())
            });
        let pid = child.id();
        self.child = Some(child);
        self.port = match port {
            Some(p) => p,
            None => self.read_ports_file(pid),
        };
        wait_for_tcp(self.addr(), Duration::from_secs(10));
    }

    /// nats-server writes `<name>_<pid>.ports` with its client URL once it listens.
    fn read_ports_file(&mut self, pid: u32) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("nats-server exited at start-up: {status}");
            }
            let found = std::fs::read_dir(&self.ports_dir).ok().and_then(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(&format!("_{pid}.ports")))
                    .find_map(|e| std::fs::read_to_string(e.path()).ok())
            });
            if let Some(port) = found.as_deref().and_then(client_port) {
                return port;
            }
            assert!(Instant::now() < deadline, "nats-server wrote no ports file");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: a NATS that stops reading, so that
    /// publishers fill their buffers.
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            let signal = if frozen { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
        }
    }

    /// Kills the server and starts a new one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(Some(self.port));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.ports_dir);
    }
}

/// The port of the first `nats://host:port` URL in a ports file.
fn client_port(ports_file: &str) -> Option<u16> {
    let rest = &ports_file[ports_file.find("nats://")? + "nats://".len()..];
    let end = rest.find('"')?;
    rest[..end].rsplit(':').next()?.parse().ok()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
