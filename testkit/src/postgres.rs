//! A PostgreSQL server of its own for a test: `initdb` in a temporary directory, `postgres` on
//! an ephemeral port of 127.0.0.1, killed and removed on drop. As root (CI containers) it runs
//! as the `postgres` user, since PostgreSQL refuses to run as root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for_tcp};

/// A running PostgreSQL server.
pub struct PostgresServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

/// The directory of `initdb` and `postgres`: `$PG_BIN_DIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else whatever `PATH` finds.
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `program` from the PostgreSQL directory, as the `postgres` user when we are root.
fn command(program: &str) -> Command {
    let path = bin_dir().map_or_else(|| PathBuf::from(program), |d| d.join(program));
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl PostgresServer {
    /// Initializes a cluster (superuser `fleetgate`, no password, trust on 127.0.0.1) and starts
    /// it. Panics with a clear message when PostgreSQL is not installed (`scripts/test`
    /// installs it).
    pub fn start() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fleetgate-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the PostgreSQL directory");
        if is_root() {
            let status = Command::new("chown").arg("postgres:").arg(&dir).status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "cannot chown {} to postgres",
                dir.display()
            );
        }
        let data = dir.join("data");
        let out = command("initdb")
            .args(["-A", "trust", "-U", "fleetgate", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run initdb: {e} (scripts/test installs PostgreSQL)")
            });
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut server = Self { child: None, port: free_port(), dir };
        server.spawn(&data);
        server
    }

    fn spawn(&mut self, data: &Path) {
        let child = command("postgres")
            .arg("-D")
            .arg(data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres: {e}"));
        self.child = Some(child);
        wait_for_tcp(SocketAddr::from(([127, 0, 0, 1], self.port)), Duration::from_secs(30));
        // It accepts connections a moment before it takes queries: wait for those too.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "fleetgate"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "PostgreSQL is not ready after 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postgres://fleetgate@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://fleetgate@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: immediate shutdown, which also ends the server's own children.
            let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
