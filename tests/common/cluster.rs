//! A throwaway PostgreSQL cluster for tests that stop, restart or reconfigure the server
//! (the shared one must not be disturbed): started in a temporary directory on a free
//! port, stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use engine::testing::{free_port, is_root};

/// A PostgreSQL cluster in a temporary directory, stopped and removed on drop.
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Server settings beyond the defaults (`-c name=value`).
    settings: Vec<String>,
}

impl Cluster {
    pub fn start() -> Result<Cluster, String> {
        Cluster::start_with(|_| Ok(Vec::new()))
    }

    /// A cluster whose server also gets the settings `prepare` returns (`name=value`);
    /// `prepare` gets the cluster's directory (owned by the server's user) to put files in.
    pub fn start_with(
        prepare: impl FnOnce(&Path) -> Result<Vec<String>, String>,
    ) -> Result<Cluster, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("no PostgreSQL binaries in /usr/lib/postgresql: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .ok_or("no initdb under /usr/lib/postgresql/*/bin")?;
        let dir = std::env::temp_dir().join(format!("reel-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut cluster = Cluster {
            bin,
            dir,
            port: 0,
            settings: Vec::new(),
        };
        if is_root() {
            run(Command::new("chown").arg("postgres").arg(&cluster.dir))?;
        }
        let data = cluster.dir.join("data");
        cluster.pg(&["initdb", "-D", path(&data), "-A", "trust", "-U", "postgres"])?;
        cluster.settings = prepare(&cluster.dir)?;
        if is_root() {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres")
                .arg(&cluster.dir))?;
        }
        // Every cluster needs its own port: `cargo test` runs this file's tests in one
        // process, at the same time. A port that was free a moment ago can be taken before
        // PostgreSQL binds it, so a failed start tries another one.
        let mut failures = Vec::new();
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.ctl("start") {
                Ok(()) => return Ok(cluster),
                Err(why) => failures.push(why),
            }
        }
        Err(failures.join("\n"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn ctl(&self, action: &str) -> Result<(), String> {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            path(&self.dir)
        );
        for setting in &self.settings {
            options.push_str(&format!(" -c {setting}"));
        }
        self.pg(&[
            "pg_ctl",
            "-D",
            path(&data),
            "-l",
            path(&log),
            "-w",
            "-m",
            "fast",
            "-o",
            &options,
            action,
        ])
    }

    pub fn pg(&self, args: &[&str]) -> Result<(), String> {
        let program = self.bin.join(args[0]);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        run(command.args(&args[1..]))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.ctl("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn run(command: &mut Command) -> Result<(), String> {
    let out = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
