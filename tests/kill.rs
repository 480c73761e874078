//! Killed at any moment, stopped at any moment: the real binary under SIGKILL and SIGTERM.
//!
//! Each scenario runs `klarify-sync` as a subprocess against an in-process fake Klarify (with
//! latency, so a pass takes a while), kills it at seeded random points, checks the database
//! the dead process left behind, and finally lets a run complete and compares the mirror with
//! the source. Kill points are chosen by events, not by the clock: "after the N-th request the
//! fake answered", plus a random fraction of one request's latency so the kill lands anywhere
//! between two requests (parsing, writing, committing). N = 0 kills during start-up.
//!
//! `KLARIFY_SYNC_LONG_TESTS=1` multiplies the kill points; `KLARIFY_SYNC_TEST_SEED` replays a
//! failure (every assertion message carries the seed).

mod common;

use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::binary::{fake, Daemon, Vars};
use common::{assert_same, assert_watermark_not_ahead, long_tests, seed, source_of, Backend};
use klarify_fake::{Churn, FakeKlarify};
use klarify_sync::klarify::format_instant;
use klarify_sync::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

const PAGE_SIZE: usize = 20;

on_both_backends!(
    backfill_killed_at_random_points,
    incremental_killed_at_random_points,
    sigterm_mid_pass_exits_zero_and_the_next_start_resumes,
);

struct Scale {
    items: usize,
    kills: usize,
    latency: Duration,
}

fn scale() -> Scale {
    if long_tests() {
        Scale {
            items: 1200,
            kills: 150,
            latency: Duration::from_millis(10),
        }
    } else {
        Scale {
            items: 300,
            kills: 22,
            latency: Duration::from_millis(15),
        }
    }
}

/// The mirror database of one scenario, and the directory the binary runs in.
struct Mirror {
    backend: Backend,
    url: SecretString,
    _db_dir: Option<tempfile::TempDir>,
    cwd: tempfile::TempDir,
}

impl Mirror {
    async fn new(backend: Backend) -> Self {
        let (url, db_dir) = common::database(backend).await;
        Self {
            backend,
            url,
            _db_dir: db_dir,
            cwd: tempfile::tempdir().unwrap(),
        }
    }

    /// The binary with a clean environment, pointed at `fake` and this mirror. Its log, which
    /// nobody reads, goes nowhere; its stderr is kept for a failure's message.
    fn command(&self, fake: &FakeKlarify, args: &[&str]) -> Command {
        let mut vars = Vars::new(fake, self.url.expose_secret());
        vars.set("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", &PAGE_SIZE.to_string())
            .set("KLARIFY_SYNC__LOG__FORMAT", "json")
            .set("RUST_LOG", "info");
        let mut cmd = vars.command(self.cwd.path(), args);
        cmd.stdout(Stdio::null());
        cmd
    }

    /// Runs the binary until it exits on its own; panics unless it succeeds.
    async fn complete(&self, fake: &FakeKlarify, args: &[&str], context: &str) {
        let out = common::binary::run(self.command(fake, args)).await;
        assert!(
            out.ok,
            "{context}: klarify-sync {args:?} failed: {}",
            out.stderr
        );
    }

    /// Opens the mirror as a reader would, or None when the killed process had not yet created
    /// the schema (opening it through `Store` would migrate it, doing the binary's job for it).
    async fn open_if_migrated(&self) -> Option<Store> {
        let migrated = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";
        match common::try_scalar(&self.url, migrated).await {
            Ok(n) if n > 0 => Some(Store::open(&self.url, 2).await.unwrap()),
            _ => None,
        }
    }

    /// What a process killed at any moment must leave: a readable database, a watermark that
    /// does not run ahead of the data, no orphaned or duplicated child rows.
    async fn check_after_kill(&self, fake: &FakeKlarify, context: &str) {
        let Some(store) = self.open_if_migrated().await else {
            return;
        };
        let committed = common::committed(&store).await;
        let mirror = store.live_procedures().await.unwrap();
        store.close().await;
        assert_watermark_not_ahead(&committed, &mirror, &source_of(fake), context);
        if matches!(self.backend, Backend::Sqlite) {
            let pool = common::any_pool(self.url.expose_secret()).await.unwrap();
            let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check")
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            assert_eq!(check, "ok", "{context}: the SQLite file is damaged");
        }
        for sql in [
            "SELECT COUNT(*) FROM procedure_lanes l WHERE NOT EXISTS \
             (SELECT 1 FROM procedures p WHERE p.id = l.procedure_id)",
            "SELECT COUNT(*) FROM procedure_calls c WHERE NOT EXISTS \
             (SELECT 1 FROM procedures p WHERE p.id = c.procedure_id)",
            "SELECT COUNT(*) FROM (SELECT id FROM procedures GROUP BY id HAVING COUNT(*) > 1) d",
        ] {
            assert_eq!(common::scalar(&self.url, sql).await, 0, "{context}: {sql}");
        }
    }

    /// After the last, complete run: the mirror is the source, and the child tables hold
    /// exactly the source's lanes and calls, no row twice.
    async fn assert_equals_source(&self, fake: &FakeKlarify, context: &str) {
        let mirror = common::mirror_at(self.url.expose_secret()).await;
        let source = source_of(fake);
        assert_same(&mirror, &source);
        let lanes: usize = source.iter().map(|p| p.lanes.len()).sum();
        let calls: usize = source
            .iter()
            .map(|p| p.called_within.len() + p.called_from.len())
            .sum();
        let live_lanes = common::scalar(
            &self.url,
            "SELECT COUNT(*) FROM procedure_lanes l JOIN procedures p \
             ON p.id = l.procedure_id WHERE p.deleted_at IS NULL",
        )
        .await;
        let live_calls = common::scalar(
            &self.url,
            "SELECT COUNT(*) FROM procedure_calls c JOIN procedures p \
             ON p.id = c.procedure_id WHERE p.deleted_at IS NULL",
        )
        .await;
        assert_eq!(live_lanes as usize, lanes, "{context}: lane rows");
        assert_eq!(live_calls as usize, calls, "{context}: call rows");
        let live = common::scalar(
            &self.url,
            "SELECT COUNT(*) FROM procedures WHERE deleted_at IS NULL",
        )
        .await;
        assert_eq!(live as usize, source.len(), "{context}: live procedures");
        // A bulk load killed before its end dropped indexes; a completed pass builds them.
        let deferred = common::scalar(&self.url, "SELECT COUNT(*) FROM deferred_schema").await;
        assert_eq!(deferred, 0, "{context}: indexes still deferred");
    }
}

enum Kill {
    /// SIGKILLed while running.
    Killed,
    /// Finished before the kill point, after this many requests.
    Finished(u64),
}

/// Starts `cmd`, waits for the kill point (the `target`-th answered request, then up to one
/// latency more; `target` 0: up to 80 ms after spawning), and SIGKILLs it.
async fn kill_at(
    cmd: &mut Command,
    fake: &FakeKlarify,
    target: u64,
    jitter: Duration,
    context: &str,
) -> Kill {
    let base = fake.requests();
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    if target == 0 {
        tokio::time::sleep(jitter).await;
    } else {
        loop {
            if fake.requests() >= base + target {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                return finished(child, status, fake.requests() - base, context).await;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{context}: no progress towards request {target} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(jitter).await;
    }
    if let Some(status) = child.try_wait().unwrap() {
        return finished(child, status, fake.requests() - base, context).await;
    }
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "{context}: exited 0 although killed");
    Kill::Killed
}

async fn finished(mut child: Child, status: ExitStatus, requests: u64, context: &str) -> Kill {
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    assert!(status.success(), "{context}: the run failed: {stderr}");
    Kill::Finished(requests)
}

fn salt(backend: Backend) -> u64 {
    match backend {
        Backend::Sqlite => 0,
        Backend::Postgres => 0x9e37_79b9,
    }
}

/// `--backfill` killed again and again while the source changes (edits, inserts, deletes,
/// bulk edits larger than a page), then run to completion.
async fn backfill_killed_at_random_points(backend: Backend) {
    let scale = scale();
    let seed = seed(0x0b_ac_f1);
    let mut rng = StdRng::seed_from_u64(seed ^ salt(backend));
    let fake = fake(seed, scale.items, scale.latency).await;
    // A bulk edit three pages long, so that tie-group reads get killed too.
    fake.apply(&Churn {
        edits: 3 * PAGE_SIZE,
        bulk: true,
        ..Churn::default()
    });
    let mirror = Mirror::new(backend).await;
    // Requests of one backfill: pages advance by PAGE_SIZE - 1, plus the tie group's reads.
    let mut estimate = (scale.items / (PAGE_SIZE - 1) + 8) as u64;
    let mut killed = 0;
    for k in 0..scale.kills {
        let context = format!("seed {seed}, {backend:?}, backfill kill {k}");
        if k > 0 && rng.gen_bool(0.4) {
            fake.apply(&Churn {
                edits: rng.gen_range(0..2 * PAGE_SIZE),
                inserts: rng.gen_range(0..5),
                deletes: rng.gen_range(0..3),
                bulk: rng.gen_bool(0.3),
            });
        }
        let target = rng.gen_range(0..=estimate);
        let jitter = jitter(&mut rng, target, scale.latency);
        let mut cmd = mirror.command(&fake, &["--backfill"]);
        match kill_at(&mut cmd, &fake, target, jitter, &context).await {
            Kill::Killed => killed += 1,
            Kill::Finished(requests) => estimate = requests.max(2),
        }
        mirror.check_after_kill(&fake, &context).await;
    }
    let context = format!("seed {seed}, {backend:?}, backfill after {killed} kills");
    eprintln!("{context} ({} kill points)", scale.kills);
    mirror.complete(&fake, &["--backfill"], &context).await;
    mirror.assert_equals_source(&fake, &context).await;
    assert!(
        killed * 2 >= scale.kills,
        "{context}: only {killed} of {} kill points landed in a run; the scenario no longer \
         exercises kills (a pass got faster: raise the latency or the size)",
        scale.kills
    );
}

/// `--once` after a complete backfill, killed again and again while edits and bulk edits
/// arrive, then run to completion.
async fn incremental_killed_at_random_points(backend: Backend) {
    let scale = scale();
    let seed = seed(0x1c_4e_11);
    let mut rng = StdRng::seed_from_u64(seed ^ salt(backend));
    let fake = fake(seed, scale.items, scale.latency).await;
    let mirror = Mirror::new(backend).await;
    let context = format!("seed {seed}, {backend:?}, first backfill");
    mirror.complete(&fake, &["--backfill"], &context).await;
    let mut estimate = 6;
    let mut killed = 0;
    for k in 0..scale.kills {
        let context = format!("seed {seed}, {backend:?}, incremental kill {k}");
        // No deletes: an incremental pass cannot see them, and the final check is equality.
        fake.apply(&Churn {
            edits: rng.gen_range(PAGE_SIZE / 2..3 * PAGE_SIZE),
            inserts: rng.gen_range(0..8),
            deletes: 0,
            bulk: rng.gen_bool(0.35),
        });
        let target = rng.gen_range(0..=estimate);
        let jitter = jitter(&mut rng, target, scale.latency);
        let mut cmd = mirror.command(&fake, &["--once"]);
        match kill_at(&mut cmd, &fake, target, jitter, &context).await {
            Kill::Killed => killed += 1,
            Kill::Finished(requests) => estimate = requests.max(2),
        }
        mirror.check_after_kill(&fake, &context).await;
    }
    let context = format!("seed {seed}, {backend:?}, --once after {killed} kills");
    eprintln!("{context} ({} kill points)", scale.kills);
    mirror.complete(&fake, &["--once"], &context).await;
    mirror.assert_equals_source(&fake, &context).await;
    assert!(
        killed * 3 >= scale.kills,
        "{context}: only {killed} of {} kill points landed in a run",
        scale.kills
    );
}

/// How long after the kill point's event to wait: for point 0, anywhere in start-up; else
/// half the time within the first 3 ms (the page just answered is being parsed and
/// committed), half the time anywhere within one request's latency plus a few ms.
fn jitter(rng: &mut StdRng, target: u64, latency: Duration) -> Duration {
    let max = if target == 0 {
        80_000
    } else if rng.gen_bool(0.5) {
        3_000
    } else {
        latency.as_micros() as u64 + 5_000
    };
    Duration::from_micros(rng.gen_range(0..=max))
}

/// SIGTERM while the daemon's first pass is paging: the process exits 0 within a few seconds,
/// the pass is recorded as interrupted with its committed pages kept, and the next start
/// resumes from the watermark instead of starting over.
async fn sigterm_mid_pass_exits_zero_and_the_next_start_resumes(backend: Backend) {
    const ITEMS: usize = 400;
    let fake = fake(31, ITEMS, Duration::from_millis(50)).await;
    let mirror = Mirror::new(backend).await;
    let what = format!("{backend:?}: SIGTERM mid-pass");
    let mut daemon = Daemon::start(mirror.command(&fake, &[]), &what).await;
    daemon
        .wait_for_requests(&fake, 6, Duration::from_secs(60))
        .await;
    let stopping = Instant::now();
    daemon.terminate(Duration::from_secs(5)).await;
    let took = stopping.elapsed();

    let store = Store::open(&mirror.url, 2).await.unwrap();
    let committed = common::committed(&store).await;
    assert!(
        committed.watermark.is_some(),
        "{backend:?}: no page was committed before SIGTERM"
    );
    let kept = store.live_procedures().await.unwrap();
    store.close().await;
    assert_watermark_not_ahead(
        &committed,
        &kept,
        &source_of(&fake),
        &format!("{backend:?} after SIGTERM"),
    );
    assert!(
        !kept.is_empty() && kept.len() < ITEMS,
        "{backend:?}: SIGTERM was meant to land mid-pass, but {} of {ITEMS} were mirrored",
        kept.len()
    );
    let stopped = runs(&mirror).await;
    assert_eq!(
        stopped.last().map(|r| r.0.as_str()),
        Some("interrupted"),
        "{backend:?}: the stopped pass is recorded as interrupted: {stopped:?}"
    );

    mirror
        .complete(&fake, &["--once"], &format!("{backend:?} after SIGTERM"))
        .await;
    mirror
        .assert_equals_source(&fake, &format!("{backend:?} resumed"))
        .await;
    let runs = runs(&mirror).await;
    let (outcome, before, inserted) = runs.last().unwrap().clone();
    assert_eq!(outcome, "succeeded");
    assert_eq!(
        before.as_deref(),
        committed.watermark.map(format_instant).as_deref(),
        "{backend:?}: the next pass starts from the watermark the stopped one committed"
    );
    assert_eq!(
        inserted as usize,
        ITEMS - kept.len(),
        "{backend:?}: the next pass inserts only what the stopped one had not (stopped in {took:?})"
    );
}

/// `(outcome, watermark_before, inserted)` of every pass, oldest first.
async fn runs(mirror: &Mirror) -> Vec<(String, Option<String>, i64)> {
    let pool = common::any_pool(mirror.url.expose_secret()).await.unwrap();
    let rows =
        sqlx::query_as("SELECT outcome, watermark_before, inserted FROM sync_runs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows
}
