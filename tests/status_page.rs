//! The daemon's status page (`GET /`) and its graph neighbourhoods (`/graph.svg`) over HTTP:
//! the facts a person needs, escaped, without a secret, and bounded work for Graphviz.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Backend, Env, HOSTILE_NAME};
use klarify_fake::Organisation;
use klarify_sync::app::sync_pass;
use klarify_sync::http::{router, serve, HttpLimits, PageSettings, Readiness};
use klarify_sync::klarify::format_instant;
use klarify_sync::store::{RunOutcome, RunRecord, WriteStats};
use klarify_sync::sync::Mode;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

on_both_backends!(
    the_daemons_page_shows_the_facts_escaped_and_no_secret,
    standby_and_a_running_pass_show,
    graph_svg_runs_dot_within_bounds_and_explains_when_missing,
);

/// Never within a test: the first pass runs at start, and no other.
const CRON: &str = "0 0 0 1 1 *";

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (status, kind, response.text().await.unwrap())
}

/// A failed pass whose error quotes the API: the way text the API chose reaches the page.
async fn record_hostile_failure(env: &Env) {
    let run = env.store.begin_run(Mode::Incremental, None).await.unwrap();
    let record = RunRecord {
        outcome: RunOutcome::Failed,
        pages: 0,
        fetched: 0,
        stats: WriteStats::default(),
        rejected: 0,
        deleted: 0,
        watermark_after: None,
        error: Some(format!("the API answered 500: {HOSTILE_NAME}")),
    };
    env.store.finish_run(run, &record).await.unwrap();
}

async fn the_daemons_page_shows_the_facts_escaped_and_no_secret(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(5, 80), 50).await;
    record_hostile_failure(&env).await;
    let mut settings = env.settings();
    settings.database.max_connections = 2;
    settings.schedule.cron = CRON.parse().unwrap();
    settings.schedule.backfill_cron = Some("0 30 2 * * Sun".parse().unwrap());
    let daemon = common::app::daemon(&settings, sync_pass(&settings).unwrap())
        .build()
        .await
        .unwrap();
    let addr = daemon.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(daemon.run_until_stopped(stop.clone().cancelled_owned()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        let (status, kind, page) = get(addr, "/").await;
        assert_eq!(status, 200);
        assert_eq!(kind, "text/html; charset=utf-8");
        if page.contains("Ready:") {
            break page;
        }
        assert!(Instant::now() < deadline, "never ready:\n{page}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let status = env
        .store
        .status(5, time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    for fact in [
        "<dt>Role</dt><dd>leader: this instance runs the schedule</dd>".to_owned(),
        "<dt>Syncing</dt><dd>no pass is running</dd>".to_owned(),
        format!("incremental <code>{CRON}</code>; full reconciliation <code>0 30 2 * * Sun</code>"),
        format!(
            "<dt>Watermark</dt><dd>{} (",
            format_instant(status.watermark.unwrap())
        ),
        format!(
            "<dt>Procedures</dt><dd>{} live, 0 deleted",
            status.counts.live_procedures
        ),
        "<dt>Rejected items</dt><dd>0 ".to_owned(),
        "None: every group of procedures sharing one instant was read completely.".to_owned(),
        "<td>incremental</td><td>succeeded</td>".to_owned(),
        "<svg role=\"img\"".to_owned(),
        "<form action=\"/graph.svg\" method=\"get\">".to_owned(),
    ] {
        assert!(page.contains(&fact), "{fact} is not on the page:\n{page}");
    }
    assert!(
        page.contains("the API answered 500: Evil &quot;quoted&quot; \\ back\nslash &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; #1;"),
        "{page}"
    );
    assert!(!page.contains("<script") && !page.contains("src=") && !page.contains("://"));
    let url = env.database_url.expose_secret();
    assert!(!page.contains(&env.fake.access_key()));
    assert!(!page.contains(url));
    if let Some(password) = url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
    {
        assert!(!page.contains(&password));
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// The router alone over `env`'s store, with `readiness` as the test sets it.
async fn serve_page(env: &Env, readiness: &Readiness, page: PageSettings) -> SocketAddr {
    readiness.connected(env.store.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(readiness.clone(), page);
    tokio::spawn(serve(
        listener,
        app,
        HttpLimits::default(),
        CancellationToken::new(),
    ));
    addr
}

fn page_settings(dot: &Path, timeout: Duration) -> PageSettings {
    PageSettings {
        dot: dot.to_owned(),
        dot_timeout: timeout,
        ..PageSettings::new(CRON.parse().unwrap(), None, Duration::from_secs(60))
    }
}

async fn standby_and_a_running_pass_show(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(6, 10), 50).await;
    let readiness = Readiness::new(Duration::from_secs(600), Duration::from_secs(3600));
    let addr = serve_page(
        &env,
        &readiness,
        page_settings(Path::new("dot"), Duration::from_secs(5)),
    )
    .await;
    let (_, _, page) = get(addr, "/").await;
    assert!(page.contains("<dt>Role</dt><dd>starting</dd>"), "{page}");
    assert!(page.contains("Not ready (never_synced)"), "{page}");
    assert!(
        page.contains("<dt>Watermark</dt><dd>none: never synced</dd>"),
        "{page}"
    );
    assert!(page.contains("<p>None yet.</p>"), "{page}");
    assert!(page.contains("full reconciliation never"), "{page}");

    readiness.standby();
    let (_, _, page) = get(addr, "/").await;
    assert!(
        page.contains("<dt>Role</dt><dd>standby: another instance leads"),
        "{page}"
    );
    assert!(page.contains("Not ready (standby)"), "{page}");

    readiness.pass_started();
    let (_, _, page) = get(addr, "/").await;
    assert!(page.contains("<dt>Role</dt><dd>leader"), "{page}");
    assert!(
        page.contains("<dt>Syncing</dt><dd>a pass is running, for "),
        "{page}"
    );
    readiness.pass_succeeded();
    let (_, _, page) = get(addr, "/").await;
    assert!(
        page.contains("<dt>Syncing</dt><dd>no pass is running</dd>"),
        "{page}"
    );
    assert!(page.contains("Ready:"), "{page}");
}

/// A stand-in for Graphviz: `script` is the body of a shell script.
fn fake_dot(dir: &Path, name: &str, script: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

async fn graph_svg_runs_dot_within_bounds_and_explains_when_missing(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(7, 150), 50).await;
    common::insert_hostile(&env.fake);
    env.pass(Mode::Backfill).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.dot");
    let recording = fake_dot(
        dir.path(),
        "dot",
        &format!(
            "[ \"$1\" = -Tsvg ] || exit 2\ncat > '{}'\necho '<svg/>'",
            input.display()
        ),
    );
    let readiness = Readiness::new(Duration::from_secs(600), Duration::from_secs(3600));
    let addr = serve_page(
        &env,
        &readiness,
        page_settings(&recording, Duration::from_secs(5)),
    )
    .await;
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("around", HOSTILE_NAME)
        .append_pair("depth", "99")
        .finish();
    let (status, kind, body) = get(addr, &format!("/graph.svg?{query}")).await;
    assert_eq!(
        (status, kind.as_str(), body.as_str()),
        (200, "image/svg+xml", "<svg/>\n")
    );
    let dot = std::fs::read_to_string(&input).unwrap();
    assert!(
        dot.contains(r#"[label="Evil \"quoted\" \\ back\nslash"#),
        "{dot}"
    );
    assert!(
        dot.contains(": 4 call(s) around"),
        "the depth is capped: {dot}"
    );

    // The whole mirror as one neighbourhood is cut at the node cap.
    let hub = env.mirror().await[0].name.clone().unwrap();
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("around", &hub)
        .append_pair("depth", "4")
        .finish();
    assert_eq!(get(addr, &format!("/graph.svg?{query}")).await.0, 200);
    let dot = std::fs::read_to_string(&input).unwrap();
    assert!(dot.lines().filter(|l| l.contains(" [label=")).count() <= 300);

    let (status, _, body) = get(addr, "/graph.svg?around=%3Cb%3Enobody").await;
    assert_eq!(status, 404);
    assert!(
        body.contains("no live procedure is named &quot;&lt;b&gt;nobody&quot;"),
        "{body}"
    );

    let missing = page_settings(&dir.path().join("not-installed"), Duration::from_secs(5));
    let addr = serve_page(&env, &readiness, missing).await;
    let (status, kind, body) = get(addr, &format!("/graph.svg?{query}")).await;
    assert_eq!((status, kind.as_str()), (501, "text/html; charset=utf-8"));
    assert!(body.contains("apt-get install graphviz"), "{body}");

    let hanging = fake_dot(dir.path(), "hanging-dot", "exec sleep 30");
    let addr = serve_page(
        &env,
        &readiness,
        page_settings(&hanging, Duration::from_millis(300)),
    )
    .await;
    let started = Instant::now();
    let (status, _, body) = get(addr, &format!("/graph.svg?{query}")).await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
