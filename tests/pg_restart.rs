//! PostgreSQL restarted mid-run: workers reconnect and carry on; every task completes and
//! nothing is lost. Runs against a throwaway cluster this test starts itself, so other
//! tests are not disturbed.

use std::path::{Path, PathBuf};
mod common;

use std::process::{Child, Command};
use std::time::Duration;

use engine::{ChannelId, Event, NewTask, PgStore, TaskStatus};
use serde_json::json;

/// A PostgreSQL cluster in a temporary directory, stopped and removed on drop.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Result<Cluster, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("no PostgreSQL binaries in /usr/lib/postgresql: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .ok_or("no initdb under /usr/lib/postgresql/*/bin")?;
        let dir = std::env::temp_dir().join(format!("reel-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut cluster = Cluster { bin, dir, port: 0 };
        if is_root() {
            run(Command::new("chown").arg("postgres").arg(&cluster.dir))?;
        }
        let data = cluster.dir.join("data");
        cluster.pg(&["initdb", "-D", path(&data), "-A", "trust", "-U", "postgres"])?;
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

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn ctl(&self, action: &str) -> Result<(), String> {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            path(&self.dir)
        );
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

    fn pg(&self, args: &[&str]) -> Result<(), String> {
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

/// A port nothing listens on right now: the kernel picks it for a listener we then drop.
fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| e.to_string())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_a_postgres_restart_and_lose_nothing() {
    let cluster = Cluster::start().unwrap_or_else(|why| {
        panic!("cannot start a throwaway PostgreSQL cluster for this test (it needs initdb/pg_ctl and, as root, the postgres user): {why}")
    });
    let url = cluster.url("reel");
    let migrate = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("migrate");
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let store = PgStore::new(engine::db::connect(&url, 4).await.expect("connect"));
    let channel = ChannelId::parse("restart").expect("channel");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let task = NewTask::new(
            steps::WORKFLOW,
            channel.clone(),
            json!({"topic": format!("t{i}"), "faults": []}),
        );
        tasks.push(store.create_task(task).await.expect("submit").task_id());
    }
    let artifacts = tempfile::tempdir().expect("tempdir");
    let mut workers: Vec<Child> = ["r1", "r2"]
        .iter()
        .map(|id| common::spawn_reel_worker(&url, id, artifacts.path(), "0.0001", &[]))
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    let unfinished = store
        .unfinished_tasks(&[steps::WORKFLOW.into()], &[])
        .await
        .expect("count");
    assert!(unfinished > 0, "the restart must hit a run in progress");
    cluster.ctl("restart").expect("restart PostgreSQL");

    for worker in &mut workers {
        common::wait_for_success(worker, Duration::from_secs(120)).await;
    }
    let store = PgStore::new(engine::db::connect(&url, 2).await.expect("reconnect"));
    for task in tasks {
        let events = store.read_stream(task, 1).await.expect("read");
        assert_eq!(
            engine::fold(&events).status(),
            TaskStatus::FINAL_REVIEW,
            "task {task}"
        );
        let completions = events
            .iter()
            .filter(|e| matches!(e.event, Event::ItemCompleted { .. }))
            .count();
        assert_eq!(completions, 78, "task {task}: every item exactly once");
    }
}

/// notion-projector through a PostgreSQL restart: it steps back, reconnects, takes the
/// leader lock again and mirrors what changed after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_reconnects_after_a_postgres_restart() {
    use notion_projector::fake::{FakeNotion, FakeNotionOptions};
    use notion_projector::{Metrics, Projector, ProjectorOptions};

    let cluster = Cluster::start().unwrap_or_else(|why| {
        panic!("cannot start a throwaway PostgreSQL cluster for this test: {why}")
    });
    let url = cluster.url("reel");
    let migrate = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("migrate");
    assert!(migrate.status.success());
    let store = PgStore::new(engine::db::connect(&url, 4).await.expect("connect"));
    let notion = FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("fake");
    let page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&page);
    let mut task = NewTask::new(
        "video",
        ChannelId::parse("restart").expect("channel"),
        json!({"topic": "restart"}),
    );
    task.notion_page_id = Some(page.clone());
    let task = store.create_task(task).await.expect("submit").task_id();

    let client = notion.client(Duration::from_secs(2));
    let metrics = std::sync::Arc::new(Metrics::new());
    let projector = Projector::new(
        store.clone(),
        client,
        ProjectorOptions {
            poll_interval: Duration::from_millis(200),
            ..ProjectorOptions::default()
        },
        metrics.clone(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let stop = shutdown.clone();
        async move { projector.run(stop).await }
    });
    let shows = |value: &'static str| {
        let notion = &notion;
        let page = &page;
        move || notion.page_value(page).as_deref() == Some(value)
    };
    assert!(wait(Duration::from_secs(5), shows("Queued")).await);

    cluster.ctl("restart").expect("restart PostgreSQL");
    let store = PgStore::new(engine::db::connect(&url, 2).await.expect("reconnect"));
    store
        .append(
            task,
            1,
            engine::Fence::Unleased,
            &[engine::NewEvent::new(Event::status_changed(
                TaskStatus::QUEUED,
                TaskStatus::from_static("generating_assets"),
            ))],
        )
        .await
        .expect("append after the restart");
    assert!(
        wait(Duration::from_secs(20), shows("Generating Assets")).await,
        "the projector mirrors changes after the restart"
    );
    assert!(metrics.is_healthy());
    shutdown.cancel();
    running.await.expect("the projector stops");
}

async fn wait(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
