//! `reel console` over HTTP (issue 30): the real binary against a real database, driven
//! with reqwest. Security first: a read-only console acts for nobody, a wrong token is a
//! 401 and a forged form a 403 with nothing written, a channel outside the console's is a
//! 404, text users typed is escaped, and a console reachable from other machines needs a
//! token. Then what the pages show: the task list with its counts and pages, a task's
//! timeline with what a resume skipped, time travel, and the live stream.

#[path = "common/console.rs"]
mod console;

use std::time::{Duration, Instant};

use console::{TOKEN, event_count, reel, run_until_idle, start_console, submit};
use engine::testing::TestDatabase;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Signs in (name, token) and returns the session cookie.
async fn sign_in(url: &str, name: &str) -> String {
    let response = client()
        .post(format!("{url}/login"))
        .header(ORIGIN, url)
        .form(&[("name", name), ("token", TOKEN)])
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie")
        .to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(!cookie.contains(TOKEN), "the cookie never holds the token");
    cookie.split(';').next().expect("pair").to_owned()
}

/// The CSRF value in a page's forms.
fn csrf(page: &str) -> String {
    let at = page
        .find(r#"name="csrf" value=""#)
        .expect("a form with its CSRF value");
    let rest = &page[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').expect("end")].to_owned()
}

async fn get(url: &str, cookie: Option<&str>) -> (StatusCode, String) {
    let mut request = client().get(url);
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = request.send().await.expect("get");
    (response.status(), response.text().await.expect("body"))
}

/// One finished review-gated task (clip 7 failed once, resumed): `final_review`.
async fn reviewed_task(db: &TestDatabase, topic: &str) -> engine::TaskId {
    let artifacts = tempfile::tempdir().expect("tempdir");
    let task = submit(
        db,
        &["--channel", "main", "--topic", topic, "--fail", "video:7"],
    );
    run_until_idle(db, artifacts.path());
    task
}

#[tokio::test]
async fn a_read_only_console_acts_for_nobody_and_tokens_are_checked() {
    let db = TestDatabase::create().await;
    let task = reviewed_task(&db, "<script>alert('x')</script> & co").await;
    let before = event_count(&db, task).await;

    let read_only = start_console(&db, &[]);
    let (status, page) = get(&format!("{}/tasks/{task}", read_only.url), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !page.contains("id=\"approve\""),
        "no Approve without a token"
    );
    // The topic is text, never markup.
    assert!(page.contains("&lt;script&gt;alert('x')&lt;/script&gt; &amp; co"));
    assert!(!page.contains("<script>alert"));
    for action in ["approve", "retry", "cancel", "reject"] {
        let response = client()
            .post(format!("{}/tasks/{task}/{action}", read_only.url))
            .header(ORIGIN, &read_only.url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .form(&[("redo_from", "video")])
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{action}");
    }
    drop(read_only);

    let console = start_console(&db, &["--token", TOKEN]);
    let url = format!("{}/tasks/{task}/approve", console.url);
    // A wrong token: 401 at sign-in and as a bearer.
    let login = client()
        .post(format!("{}/login", console.url))
        .header(ORIGIN, &console.url)
        .form(&[("name", "mallory"), ("token", "not-the-token-at-all")])
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), StatusCode::UNAUTHORIZED);
    assert!(login.headers().get(SET_COOKIE).is_none());
    let bearer = client()
        .post(&url)
        .header("authorization", "Bearer not-the-token-at-all")
        .send()
        .await
        .expect("post");
    assert_eq!(bearer.status(), StatusCode::UNAUTHORIZED);
    // Signed in, but the form comes from another site, or without its CSRF value.
    let cookie = sign_in(&console.url, "Ann").await;
    let (_, page) = get(&format!("{}/tasks/{task}", console.url), Some(&cookie)).await;
    assert!(page.contains("id=\"approve\""));
    let csrf = csrf(&page);
    for (origin, value) in [
        ("http://evil.example", csrf.as_str()),
        (console.url.as_str(), ""),
        (console.url.as_str(), "0000"),
    ] {
        let response = client()
            .post(&url)
            .header(COOKIE, &cookie)
            .header(ORIGIN, origin)
            .form(&[("csrf", value)])
            .send()
            .await
            .expect("post");
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "{origin} {value:?}"
        );
    }
    assert_eq!(event_count(&db, task).await, before, "nothing was written");

    // The real thing: approved, and the log names who did it.
    let response = client()
        .post(&url)
        .header(COOKIE, &cookie)
        .header(ORIGIN, &console.url)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let actors: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_type, metadata->>'actor' FROM events WHERE stream_id = $1 AND stream_version > $2 \
         ORDER BY stream_version",
    )
    .bind(task.as_uuid())
    .bind(i32::try_from(before).expect("small"))
    .fetch_all(db.pool())
    .await
    .expect("events");
    assert_eq!(
        actors,
        vec![
            ("review_approved".into(), Some("console:Ann".into())),
            ("status_changed".into(), Some("console:Ann".into())),
            ("task_completed".into(), Some("console:Ann".into())),
        ]
    );
    let replay = reel(&db, &["replay", &task.to_string()]);
    assert!(String::from_utf8_lossy(&replay.stdout).contains("completed"));
    // An action that no longer applies is refused, writing nothing.
    let again = client()
        .post(format!("{}/tasks/{task}/retry", console.url))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("post");
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(event_count(&db, task).await, before + 3);
}

#[tokio::test]
async fn unknown_malformed_and_out_of_scope_tasks_and_a_console_open_to_the_network() {
    let db = TestDatabase::create().await;
    let mine = submit(&db, &["--channel", "history", "--topic", "Rome"]);
    let theirs = submit(&db, &["--channel", "secret", "--topic", "Plans"]);
    let console = start_console(&db, &["--channel", "history", "--token", TOKEN]);
    let (status, _) = get(&format!("{}/tasks/{mine}", console.url), None).await;
    assert_eq!(status, StatusCode::OK);
    // Outside the console's channels: the same 404 as a task that does not exist.
    let (outside, outside_page) = get(&format!("{}/tasks/{theirs}", console.url), None).await;
    let (unknown, unknown_page) = get(
        &format!("{}/tasks/{}", console.url, engine::TaskId::new()),
        None,
    )
    .await;
    assert_eq!(outside, StatusCode::NOT_FOUND);
    assert_eq!(unknown, StatusCode::NOT_FOUND);
    assert_eq!(outside_page, unknown_page);
    let cancel = client()
        .post(format!("{}/tasks/{theirs}/cancel", console.url))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .expect("post");
    assert_eq!(cancel.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        reel(&db, &["tasks", "--channel", "secret"]).status.code(),
        Some(0)
    );
    let (malformed, _) = get(&format!("{}/tasks/not-a-task", console.url), None).await;
    assert_eq!(malformed, StatusCode::BAD_REQUEST);
    let (_, list) = get(&format!("{}/", console.url), None).await;
    assert!(list.contains(&mine.to_string()));
    assert!(!list.contains(&theirs.to_string()));
    let (_, list) = get(&format!("{}/?channel=secret", console.url), None).await;
    assert!(!list.contains(&theirs.to_string()));
    assert_eq!(
        get(&format!("{}/?status=no%20such", console.url), None)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&format!("{}/?after=garbage", console.url), None)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );

    // Reachable from other machines without a token: refused at start, exit 2.
    let out = reel(&db, &["console", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
    let out = reel(&db, &["console", "--token", "short"]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn the_list_pages_and_counts_and_a_task_page_shows_what_a_resume_skipped() {
    let db = TestDatabase::create().await;
    let task = reviewed_task(&db, "Rome").await;
    for n in 0..55 {
        submit(
            &db,
            &["--channel", "bulk", "--topic", &format!("topic {n}")],
        );
    }
    let console = start_console(&db, &[]);
    let (_, first) = get(&format!("{}/?channel=bulk", console.url), None).await;
    assert_eq!(first.matches("<tr data-task=").count(), 50);
    assert!(
        first.contains("queued <span class=\"n\">55</span>"),
        "{first}"
    );
    let next = first
        .split("class=\"next\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a next page")
        .replace("&amp;", "&");
    let (_, second) = get(&format!("{}{next}", console.url), None).await;
    assert_eq!(second.matches("<tr data-task=").count(), 5);
    assert!(!second.contains("class=\"next\""));
    let (_, search) = get(
        &format!("{}/?q={}", console.url, &task.to_string()[..13]),
        None,
    )
    .await;
    assert_eq!(search.matches("<tr data-task=").count(), 1);

    let (_, page) = get(&format!("{}/tasks/{task}", console.url), None).await;
    // Clip 7 failed on attempt 1, and attempt 2 skipped what attempt 1 had done.
    assert!(page.contains("video 7 failed"), "a failed mark for clip 7");
    for clip in 1..=6 {
        assert!(
            page.contains(&format!("video {clip}: skipped, done in attempt 1")),
            "clip {clip} skipped"
        );
    }
    assert!(!page.contains("video 7: skipped"));
    assert!(page.contains("class=\"saved\">$"));
    assert!(
        page.contains("<span class=\"ok\">clean</span>"),
        "the audit verdict"
    );
    // Time travel: at version 3 the task had only just started; nothing had failed yet.
    let (status, early) = get(&format!("{}/tasks/{task}?at=3", console.url), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(early.contains("As it was at version <strong>3</strong>"));
    assert!(!early.contains("video 7 failed"));
}

#[tokio::test]
async fn the_live_stream_carries_new_tasks_and_status_changes() {
    let db = TestDatabase::create().await;
    let console = start_console(&db, &["--channel", "live"]);
    let response = client()
        .get(format!("{}/live", console.url))
        .send()
        .await
        .expect("live");
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response;
    // Give the subscription a moment to be listening before the submits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hidden = submit(&db, &["--channel", "other", "--topic", "x"]);
    let shown = submit(&db, &["--channel", "live", "--topic", "y"]);
    let started = Instant::now();
    let mut seen = String::new();
    while !seen.contains(&shown.to_string()) {
        assert!(started.elapsed() < Duration::from_secs(5), "{seen}");
        if let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await
        {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(seen.contains("event: change"));
    assert!(seen.contains("\"status\":\"queued\""));
    assert!(
        !seen.contains(&hidden.to_string()),
        "another channel's task"
    );
}

#[tokio::test]
async fn hostile_requests_are_refused_and_sigterm_ends_open_live_streams() {
    let db = TestDatabase::create().await;
    let task = submit(&db, &["--channel", "main", "--topic", "Rome"]);
    let mut console = start_console(&db, &[]);
    let port = console.url.rsplit(':').next().expect("port").to_owned();
    // Another site's page reaching the loopback console by DNS rebinding.
    let rebound = client()
        .get(format!("{}/tasks/{task}", console.url))
        .header(reqwest::header::HOST, format!("attacker.example:{port}"))
        .send()
        .await
        .expect("get");
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);
    let by_name = client()
        .get(format!("http://localhost:{port}/tasks/{task}"))
        .send()
        .await
        .expect("get");
    assert_eq!(by_name.status(), StatusCode::OK);
    for bad in [
        "/?q=a%00b",
        "/?workflow=%00",
        "/?after=-8000000000000000000.0",
        &format!("/tasks/{task}?at=0"),
        &format!("/tasks/{task}?at=x"),
    ] {
        let (status, _) = get(&format!("{}{bad}", console.url), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (status, _) = get(&format!("{}/tasks/{task}?at=", console.url), None).await;
    assert_eq!(status, StatusCode::OK, "an empty version is now");

    // A browser on the live stream does not hold a shutdown up.
    let mut live = client()
        .get(format!("{}/live", console.url))
        .send()
        .await
        .expect("live");
    let pid = console.child.id().to_string();
    let signalled = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    loop {
        if let Some(status) = console.child.try_wait().expect("poll") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "the console still runs 5 s after SIGTERM with a browser on /live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stream ended with it.
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = live.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the live stream is closed");
}

/// The CLI's decisions name who made them too (`--by`, else `$USER`), and the console
/// shows them.
#[tokio::test]
async fn the_cli_records_its_actor_and_the_console_shows_it() {
    let db = TestDatabase::create().await;
    let task = reviewed_task(&db, "Rome").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["approve", &task.to_string(), "--by", "Dana"])
        .env("DATABASE_URL", db.url())
        .env("REEL_LOG", "warn")
        .output()
        .expect("approve");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recorded: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT metadata->>'actor', payload->>'reviewer' FROM events \
         WHERE stream_id = $1 AND event_type = 'review_approved'",
    )
    .bind(task.as_uuid())
    .fetch_one(db.pool())
    .await
    .expect("approved");
    assert_eq!(
        recorded,
        (Some("cli:Dana".to_owned()), Some("Dana".to_owned()))
    );
    let console = start_console(&db, &[]);
    let (_, page) = get(&format!("{}/tasks/{task}", console.url), None).await;
    assert!(page.contains("by <strong>cli:Dana</strong>"));
}

/// The stats page shows what `reel stats --channel C` reports, per channel the console
/// may show, and no other.
#[tokio::test]
async fn the_stats_page_is_reel_stats_per_visible_channel() {
    let db = TestDatabase::create().await;
    reviewed_task(&db, "Rome").await;
    reviewed_task(&db, "Paris").await;
    let artifacts = tempfile::tempdir().expect("tempdir");
    submit(&db, &["--channel", "hidden", "--topic", "Oslo"]);
    run_until_idle(&db, artifacts.path());
    let out = reel(&db, &["stats", "--channel", "main", "--json"]);
    assert!(out.status.success());
    let expected: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
    let spent = expected["spent_micros"].as_i64().expect("spent");
    let saved = expected["saved_micros"].as_i64().expect("saved");
    assert!(spent > 0 && saved > 0, "{expected}");

    let console = start_console(&db, &["--channel", "main"]);
    let (status, page) = get(&format!("{}/stats", console.url), None).await;
    assert_eq!(status, StatusCode::OK);
    let row = page
        .split("<tr data-channel=\"main\">")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .expect("a row for main");
    assert!(row.contains("<td class=\"tasks\">2</td>"), "{row}");
    let money = |micros: i64| {
        format!(
            "${}.{:02}",
            micros / 1_000_000,
            (micros % 1_000_000) / 10_000
        )
    };
    assert!(
        row.contains(&format!("<td class=\"spent\">{}", money(spent))),
        "{row} vs {expected}"
    );
    assert!(
        row.contains(&format!("<td class=\"saved\">{}", money(saved))),
        "{row} vs {expected}"
    );
    assert!(
        !page.contains("hidden"),
        "a channel outside the console's is not shown"
    );

    // A database too slow for the stats (the events table locked, as a migration or a
    // VACUUM FULL would) holds neither the other pages nor the viewer: the stats page says
    // it is computing, and shows the figures once they are ready.
    let console = start_console(&db, &[]);
    let mut lock = db.pool().begin().await.expect("begin");
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let started = Instant::now();
    let (status, page) = get(&format!("{}/stats", console.url), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"computing\""), "{page}");
    assert!(started.elapsed() < Duration::from_secs(6));
    for _ in 0..3 {
        let _ = get(&format!("{}/stats", console.url), None).await;
    }
    let started = Instant::now();
    let (status, _) = get(&format!("{}/", console.url), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get(&format!("{}/providers", console.url), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "other pages answer while the stats wait: {:?}",
        started.elapsed()
    );
    lock.rollback().await.expect("unlock");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, page) = get(&format!("{}/stats", console.url), None).await;
        if page.contains("<tr data-channel=\"main\">") && !page.contains("id=\"computing\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stats came once the lock went: {page}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The providers page: each key's slots in flight against the cap the live workers apply
/// (a real worker process publishes its own, `--max-in-flight` included), the waiting
/// queue in grant order, a pause, and workers that disagree.
#[tokio::test]
async fn the_providers_page_shows_slots_caps_queues_and_pauses() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let first = submit(&db, &["--channel", "main", "--topic", "first"]);
    let hidden = submit(&db, &["--channel", "hidden", "--topic", "hidden"]);
    let second = submit(&db, &["--channel", "main", "--topic", "second"]);
    // Two items of the first task hold `video`'s two slots; the second task and the hidden
    // one wait behind them.
    let owner = |task| engine::SlotOwner {
        task,
        step: "video",
        holder: "test",
    };
    let ttl = Duration::from_secs(300);
    let granted = store
        .acquire_slots("video", 2, owner(first), &[1, 2], ttl)
        .await
        .expect("slots");
    assert_eq!(granted, vec![1, 2]);
    for task in [hidden, second] {
        let granted = store
            .acquire_slots("video", 2, owner(task), &[1, 2, 3], ttl)
            .await
            .expect("slots");
        assert!(granted.is_empty());
    }
    store
        .pause_provider("narration", Duration::from_secs(120))
        .await
        .expect("pause");

    let artifacts = tempfile::tempdir().expect("tempdir");
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "worker",
            "--artifacts",
            artifacts.path().to_str().expect("path"),
            "--max-in-flight",
            "video=2",
            "--worker-id",
            "w-published",
        ])
        .env("DATABASE_URL", db.url())
        .env("REEL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start a worker");
    let console = start_console(&db, &["--channel", "main"]);
    let row_of = |page: &str, key: &str| -> String {
        page.split(&format!("<tr data-key=\"{key}\">"))
            .nth(1)
            .and_then(|rest| rest.split("</tr>").next())
            .unwrap_or_default()
            .to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let (status, page) = get(&format!("{}/providers", console.url), None).await;
        assert_eq!(status, StatusCode::OK);
        if row_of(&page, "video").contains("2 / 2") || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = worker.kill();
    let _ = worker.wait();
    let video = row_of(&page, "video");
    assert!(
        video.contains("<td class=\"in-flight\">2 / 2</td>"),
        "{video}"
    );
    assert!(
        video.contains("<td class=\"waiting\">6</td>"),
        "fleet-wide: {video}"
    );
    // The simulated assets provider's default cap, as the worker applies it (the worker
    // is running the two tasks meanwhile).
    assert!(row_of(&page, "assets").contains(" / 10</td>"), "{page}");
    assert!(
        row_of(&page, "narration").contains("class=\"bad\""),
        "paused: {page}"
    );
    // The queue lists the waiting task the console may show, not the hidden one.
    let queue = page
        .split("<table class=\"queue\" data-key=\"video\">")
        .nth(1)
        .expect("video's queue");
    assert!(queue.contains(&second.to_string()));
    // Its place counts the older waiter the console may not show.
    assert!(
        queue.contains("<tr><td>2</td>"),
        "second in the whole queue: {queue}"
    );
    assert!(!page.contains(&hidden.to_string()));

    // A second worker applying another cap: the page says the workers disagree.
    store
        .worker_beat(
            "w-other",
            &[],
            &[engine::ProviderLimits::new("video").max_in_flight(4)],
            Duration::from_secs(60),
        )
        .await
        .expect("beat");
    let (_, page) = get(&format!("{}/providers", console.url), None).await;
    assert!(
        row_of(&page, "video").contains("title=\"workers apply different caps\""),
        "{page}"
    );
}

/// `--artifacts DIR`: a task's media are shown and served from its own directory (ranges
/// answered), and nothing else is: not another channel's, not a path that climbs out, not a
/// symlink leading out, not a file type a browser would run.
#[tokio::test]
async fn artifacts_are_served_from_the_tasks_directory_only() {
    let db = TestDatabase::create().await;
    let artifacts = tempfile::tempdir().expect("tempdir");
    let task = submit(&db, &["--channel", "main", "--topic", "Rome"]);
    let hidden = submit(&db, &["--channel", "hidden", "--topic", "Oslo"]);
    run_until_idle(&db, artifacts.path());
    let dir = artifacts.path().join("main").join(task.to_string());
    std::os::unix::fs::symlink("/etc/hostname", dir.join("assets").join("escape.png"))
        .expect("symlink");
    std::fs::write(
        dir.join("assets").join("page.html"),
        "<script>alert(1)</script>",
    )
    .expect("html");
    let root = artifacts.path().to_str().expect("path");
    let console = start_console(&db, &["--channel", "main", "--artifacts", root]);

    let (_, page) = get(&format!("{}/tasks/{task}", console.url), None).await;
    let image = format!("/tasks/{task}/files/assets/01.png");
    assert!(page.contains(&format!("<img src=\"{image}\"")), "{page}");
    assert!(page.contains(&format!(
        "<video controls preload=\"metadata\" src=\"/tasks/{task}/files/video/07.mp4\""
    )));
    assert!(page.contains(&format!(
        "<audio controls preload=\"none\" src=\"/tasks/{task}/files/narration/07.mp3\""
    )));

    let on_disk = std::fs::read(dir.join("assets").join("01.png")).expect("the file");
    let response = client()
        .get(format!("{}{image}", console.url))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .expect("csp")
            .starts_with("sandbox")
    );
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        on_disk.as_slice()
    );
    let ranged = client()
        .get(format!("{}{image}", console.url))
        .header("range", "bytes=0-3")
        .send()
        .await
        .expect("range");
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.bytes().await.expect("body").as_ref(), &on_disk[..4]);

    assert!(std::fs::metadata(artifacts.path().join("hidden").join(hidden.to_string())).is_ok());
    for refused in [
        format!("/tasks/{hidden}/files/assets/01.png"),
        format!("/tasks/{task}/files/assets/escape.png"),
        format!("/tasks/{task}/files/assets/page.html"),
        format!("/tasks/{task}/files/..%2F..%2Fhidden/01.png"),
        format!("/tasks/{task}/files/assets/..%2F..%2F..%2Fhidden%2F{hidden}%2Fassets%2F01.png"),
        format!("/tasks/{task}/files/assets/%2Fetc%2Fhostname"),
        format!("/tasks/{task}/files/assets/99.png"),
    ] {
        let (status, body) = get(&format!("{}{refused}", console.url), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{refused}: {body}");
    }
    // A symlink inside the task's directory to a file of another type is served as the
    // type asked for (and sandboxed), never as a page.
    std::os::unix::fs::symlink("page.html", dir.join("assets").join("html.png")).expect("symlink");
    let response = client()
        .get(format!(
            "{}/tasks/{task}/files/assets/html.png",
            console.url
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(response.headers()["content-type"], "image/png");

    // A file swapped for a symlink out of the directory between checks and opens: what is
    // checked is what was opened, so the secret is never served.
    let secret = artifacts.path().join("secret.txt");
    std::fs::write(&secret, "SECRET-OUTSIDE-TASK-DIR").expect("secret");
    let racing = dir.join("assets").join("race.png");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, racing, secret) = (stop.clone(), racing.clone(), secret.clone());
        std::thread::spawn(move || {
            let (plain, link) = (
                racing.with_extension("plain"),
                racing.with_extension("link"),
            );
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::write(&plain, "real");
                let _ = std::fs::rename(&plain, &racing);
                let _ = std::fs::remove_file(&link);
                let _ = std::os::unix::fs::symlink(&secret, &link);
                let _ = std::fs::rename(&link, &racing);
            }
        })
    };
    let mut served = 0;
    for _ in 0..300 {
        let (status, body) = get(
            &format!("{}/tasks/{task}/files/assets/race.png", console.url),
            None,
        )
        .await;
        assert!(
            !body.contains("SECRET"),
            "a file outside the task was served"
        );
        served += usize::from(status == StatusCode::OK);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().expect("swapper");
    assert!(served > 0, "the real file was served meanwhile");

    // A task directory that is itself a symlink leads elsewhere: nothing under it is served.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(elsewhere.path().join("assets")).expect("dir");
    std::fs::write(elsewhere.path().join("assets").join("01.png"), "elsewhere").expect("file");
    let moved = artifacts.path().join("main").join("moved");
    std::fs::rename(&dir, &moved).expect("move the task's directory");
    std::os::unix::fs::symlink(elsewhere.path(), &dir).expect("symlink the task's directory");
    let (status, _) = get(&format!("{}{image}", console.url), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Without --artifacts, no media and no files.
    let plain = start_console(&db, &[]);
    let (_, page) = get(&format!("{}/tasks/{task}", plain.url), None).await;
    assert!(!page.contains("<img"));
    let (status, _) = get(&format!("{}{image}", plain.url), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// docs/console.md's flag table names only flags `reel console` has, with the env
/// variables it reads.
#[test]
fn the_documented_flags_are_the_consoles() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/console.md"))
        .expect("docs/console.md");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["console", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = docs.lines().filter(|l| l.starts_with("| `--")).collect();
    assert!(rows.len() >= 4, "the flag table");
    for row in rows {
        let flag = row[3..].split([' ', '`']).next().expect("a flag");
        assert!(
            help.contains(flag),
            "{flag} is not a flag of reel console:\n{help}"
        );
        if let Some(env) = row
            .split('|')
            .nth(2)
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let env = env.trim_matches('`');
            assert!(
                help.contains(&format!("env: {env}")),
                "{env} for {flag}:\n{help}"
            );
        }
    }
}
