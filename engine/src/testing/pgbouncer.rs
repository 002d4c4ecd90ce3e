//! A real PgBouncer (Debian's package) in front of a PostgreSQL server, started on a free
//! port in the pool mode a test (or the bench) asks for, stopped and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PgBouncer.
#[derive(Debug)]
pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
}

impl PgBouncer {
    /// PgBouncer on a free port, in `pool_mode` (`transaction` or `session`), in front of
    /// the server `upstream` (`host:port`) for every database, trusting every login of the
    /// user `postgres`. Each database gets up to 40 server connections: in session mode
    /// every client connection holds one, and four workers' pools of 8 must fit.
    pub fn start(
        pool_mode: &str,
        upstream_host: &str,
        upstream_port: u16,
    ) -> Result<PgBouncer, String> {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("pgbouncer is not installed (apt-get install -y pgbouncer)")?;
        let mut failures = Vec::new();
        for _ in 0..5 {
            let dir = std::env::temp_dir()
                .join(format!("reel-pgbouncer-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let port = free_port()?;
            let config = dir.join("pgbouncer.ini");
            let users = dir.join("users.txt");
            std::fs::write(
                &config,
                format!(
                    "[databases]\n* = host={upstream_host} port={upstream_port}\n\n\
                     [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                     unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                     pool_mode = {pool_mode}\nmax_client_conn = 500\ndefault_pool_size = 40\n\
                     ignore_startup_parameters = extra_float_digits,options\n",
                    users = users.display()
                ),
            )
            .map_err(|e| e.to_string())?;
            std::fs::write(&users, "\"postgres\" \"\"\n").map_err(|e| e.to_string())?;
            let mut command = Command::new(&binary);
            if is_root() {
                // PgBouncer refuses to run as root: it switches to `postgres` itself.
                let _ = Command::new("chmod").arg("755").arg(&dir).status();
                command.args(["-u", "postgres"]);
            }
            let child = command
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start pgbouncer: {e}"))?;
            let mut bouncer = PgBouncer { child, dir, port };
            if bouncer.wait_until_listening(Duration::from_secs(5)) {
                return Ok(bouncer);
            }
            failures.push(format!("pgbouncer did not listen on {port}"));
        }
        Err(failures.join("; "))
    }

    /// The URL of `database` through this bouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn wait_until_listening(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on right now: the kernel picks it for a listener we then drop.
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// Whether this process runs as root (PostgreSQL's and PgBouncer's programs then run as
/// `postgres`).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}
