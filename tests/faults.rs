//! A hostile API: servers that hang, stall, drop connections, send truncated, non-JSON or
//! endless bodies, rate-limit, fail in bursts, lie in `hasNext` and `totalCount`, and serve
//! items no schema foresaw. On both backends, after every fault: the stored watermark never
//! runs ahead of the data written, and once the fault is over a pass converges to the source.
//!
//! The fake's own faults (`Fault`) are used where they exist; everything else goes through
//! [`Saboteur`], an HTTP proxy in front of the fake that misbehaves on request.

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::{self, Daemon, Vars};
use common::{assert_same, Backend, Env};
use klarify_fake::{Churn, FakeKlarify, FakeOptions, Fault, Organisation};
use klarify_sync::klarify::{
    format_instant, parse_item, ClientSettings, KlarifyClient, KlarifyError, PageQuery, Procedure,
};
use klarify_sync::sync::{Mode, SyncError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Attempts per page in these tests: a burst of this many failures fails the pass.
const ATTEMPTS: usize = 3;

on_both_backends!(
    a_server_that_never_answers_times_out,
    a_body_that_stalls_times_out,
    dropped_connections_are_retried_then_fail_cleanly,
    truncated_and_non_json_bodies_fail_cleanly,
    a_huge_body_is_refused_at_once,
    a_429_storm_is_waited_out_within_the_cap_then_fails_cleanly,
    a_5xx_burst_inside_a_tie_group_keeps_the_cursor_before_it,
    has_next_always_false_converges,
    has_next_always_true_converges,
    has_next_at_random_converges,
    a_total_count_that_disagrees_converges,
    an_understated_total_count_cannot_pass_off_an_incomplete_tie_group,
    a_total_count_near_u64_max_neither_panics_nor_loses_items,
    a_server_ignoring_page_leaves_a_tie_group_unproven_in_bounded_time,
    duplicate_ids_within_a_page_newest_wins,
    very_long_strings_do_not_stop_the_sync,
    a_very_long_id_does_not_stop_the_sync,
    odd_unicode_does_not_stop_the_sync,
    nul_characters_do_not_stop_the_sync,
    sql_metacharacters_are_only_data,
    wrong_types_and_null_arrays_do_not_stop_the_sync,
);

/// A client with fast retries and `ATTEMPTS` attempts, to `base_url` (the fake or a saboteur).
/// Faults queued for "the next N requests" land on one request's attempts only when requests
/// are made one at a time, so tests of a single request's fate read with one reader.
fn settings(base_url: &str, page_size: u32) -> ClientSettings {
    ClientSettings {
        base_url: base_url.parse().unwrap(),
        access_key: FakeOptions::default().access_key.into(),
        page_size,
        request_timeout: Duration::from_secs(3),
        max_attempts: ATTEMPTS,
        retry_base_delay: Duration::from_millis(1),
        retry_max_delay: Duration::from_millis(20),
        max_body_bytes: 4 << 20,
        concurrency: 8,
        max_requests_per_second: 10_000,
    }
}

fn use_client(env: &mut Env, settings: ClientSettings) {
    env.client = KlarifyClient::new(settings).unwrap();
}

fn passthrough(env: &Env, requests: usize) {
    // A zero-length hang answers normally: a way to let the next requests through.
    env.fake.inject(Fault::Hang(Duration::ZERO), requests);
}

fn status(status: u16, retry_after_secs: Option<u64>) -> Fault {
    Fault::Status {
        status,
        retry_after_secs,
    }
}

async fn assert_watermark_not_ahead(env: &Env, context: &str) {
    let committed = common::committed(&env.store).await;
    common::assert_watermark_not_ahead(&committed, &env.mirror().await, &env.source(), context);
}

/// The fault is over: one incremental pass brings the mirror to the source, watermark included.
async fn converges(env: &Env, context: &str) {
    env.pass(Mode::Incremental)
        .await
        .unwrap_or_else(|e| panic!("{context}: the pass after the fault failed: {e}"));
    env.assert_mirror_equals_source().await;
    let newest = env.source().iter().map(|p| p.updated_at).max();
    assert_eq!(
        env.store.watermark().await.unwrap(),
        newest,
        "{context}: the watermark catches up with the source"
    );
}

async fn a_server_that_never_answers_times_out(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(41, 300), 25).await;
    let mut s = settings(&env.fake.base_url(), 25);
    s.request_timeout = Duration::from_millis(300);
    s.concurrency = 1;
    use_client(&mut env, s);
    passthrough(&env, 4);
    env.fake
        .inject(Fault::Hang(Duration::from_secs(3600)), ATTEMPTS);
    let started = Instant::now();
    let err = env.pass(Mode::Incremental).await.unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Klarify(KlarifyError::Timeout {
                attempts: ATTEMPTS,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a silent server costs attempts x timeout, not forever: {:?}",
        started.elapsed()
    );
    assert!(env.store.watermark().await.unwrap().is_some());
    assert_watermark_not_ahead(&env, "after a server that never answers").await;
    converges(&env, "after a server that never answers").await;
}

async fn a_body_that_stalls_times_out(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(42, 300), 25).await;
    let saboteur = Saboteur::start(&env.fake).await;
    let mut s = settings(&saboteur.base_url(), 25);
    s.request_timeout = Duration::from_millis(300);
    s.concurrency = 1;
    use_client(&mut env, s);
    saboteur.queue(Sabotage::Pass, 4);
    saboteur.queue(Sabotage::StallBody, ATTEMPTS);
    let started = Instant::now();
    let err = env.pass(Mode::Incremental).await.unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Klarify(KlarifyError::Timeout {
                attempts: ATTEMPTS,
                ..
            })
        ),
        "headers then silence is a timeout: {err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_watermark_not_ahead(&env, "after a stalled body").await;
    converges(&env, "after a stalled body").await;
}

async fn dropped_connections_are_retried_then_fail_cleanly(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(43, 300), 25).await;
    let saboteur = Saboteur::start(&env.fake).await;
    use_client(&mut env, settings(&saboteur.base_url(), 25));
    // Fewer drops than attempts: survived.
    saboteur.queue(Sabotage::Pass, 3);
    saboteur.queue(Sabotage::Drop, ATTEMPTS - 1);
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;

    env.fake.apply(&Churn {
        edits: 80,
        inserts: 10,
        ..Churn::default()
    });
    saboteur.queue(Sabotage::Pass, 2);
    saboteur.queue(Sabotage::Drop, ATTEMPTS);
    let err = env.pass(Mode::Incremental).await.unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Klarify(
                KlarifyError::Unreachable {
                    attempts: ATTEMPTS,
                    ..
                } | KlarifyError::Malformed {
                    attempts: ATTEMPTS,
                    ..
                }
            )
        ),
        "{err:?}"
    );
    assert_watermark_not_ahead(&env, "after dropped connections").await;
    converges(&env, "after dropped connections").await;
}

async fn truncated_and_non_json_bodies_fail_cleanly(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(44, 300), 25).await;
    let mut s = settings(&env.fake.base_url(), 25);
    s.concurrency = 1;
    use_client(&mut env, s);
    for (fault, what) in [(Fault::Truncated, "truncated"), (Fault::NotJson, "HTML")] {
        passthrough(&env, 3);
        env.fake.inject(fault, ATTEMPTS);
        let err = env.pass(Mode::Incremental).await.unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::Klarify(KlarifyError::Malformed {
                    attempts: ATTEMPTS,
                    ..
                })
            ),
            "{what}: {err:?}"
        );
        assert_eq!(err.to_string().lines().count(), 1, "{what}: {err}");
        assert_watermark_not_ahead(&env, what).await;
    }
    converges(&env, "after bad bodies").await;
}

async fn a_huge_body_is_refused_at_once(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(45, 300), 25).await;
    let mut s = settings(&env.fake.base_url(), 25);
    s.max_body_bytes = 1 << 20;
    use_client(&mut env, s);
    env.pass(Mode::Incremental).await.unwrap();
    let watermark = env.store.watermark().await.unwrap();
    env.fake.apply(&Churn {
        edits: 60,
        ..Churn::default()
    });
    env.fake.inject(Fault::Huge { bytes: 64 << 20 }, ATTEMPTS);
    let before = env.fake.requests();
    let err = env.pass(Mode::Incremental).await.unwrap_err();
    assert!(
        matches!(err, SyncError::Klarify(KlarifyError::TooLarge { limit }) if limit == 1 << 20),
        "{err:?}"
    );
    assert_eq!(
        env.fake.requests() - before,
        1,
        "a body over the cap is not asked for again"
    );
    assert_eq!(env.store.watermark().await.unwrap(), watermark);
    assert_watermark_not_ahead(&env, "after a huge body").await;
    // The queued huge bodies are still there: two more refusals, then the real pages.
    for _ in 1..ATTEMPTS {
        assert!(env.pass(Mode::Incremental).await.is_err());
    }
    converges(&env, "after a huge body").await;
}

/// A body without Content-Length that never ends: the client stops reading at the cap, and
/// the server could send only what fits in the socket buffers before the client hung up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_body_is_cut_off_at_the_cap() {
    let fake = FakeKlarify::start(Organisation::generate(46, 10), FakeOptions::default())
        .await
        .unwrap();
    let saboteur = Saboteur::start(&fake).await;
    saboteur.queue(Sabotage::Endless, 1);
    let mut s = settings(&saboteur.base_url(), 25);
    s.max_body_bytes = 1 << 20;
    let client = KlarifyClient::new(s).unwrap();
    let started = Instant::now();
    let err = client
        .fetch_page(PageQuery {
            page: 0,
            page_size: 25,
            after: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, KlarifyError::TooLarge { limit } if limit == 1 << 20),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(saboteur.connections(), 1, "not asked for again");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !saboteur.endless_done() {
        assert!(
            Instant::now() < deadline,
            "the client never hung up on the endless body ({} bytes sent)",
            saboteur.endless_sent()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = saboteur.endless_sent();
    assert!(
        sent < 64 << 20,
        "the client read far past its 1 MiB cap: the server got {sent} bytes out"
    );
}

async fn a_429_storm_is_waited_out_within_the_cap_then_fails_cleanly(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(47, 200), 25).await;
    // Retry-After is honoured (the client's own backoff would wait ~1 ms)...
    let mut s = settings(&env.fake.base_url(), 25);
    s.retry_max_delay = Duration::from_secs(5);
    use_client(&mut env, s);
    passthrough(&env, 2);
    env.fake.inject(status(429, Some(1)), 1);
    let started = Instant::now();
    env.pass(Mode::Incremental).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After: 1 was not honoured ({:?})",
        started.elapsed()
    );
    env.assert_mirror_equals_source().await;

    // ...but never beyond klarify.retry_max_delay: a server asking for an hour gets 200 ms.
    let mut s = settings(&env.fake.base_url(), 25);
    s.retry_max_delay = Duration::from_millis(200);
    use_client(&mut env, s);
    env.fake.apply(&Churn {
        edits: 40,
        ..Churn::default()
    });
    env.fake.inject(status(429, Some(3600)), ATTEMPTS - 1);
    let started = Instant::now();
    env.pass(Mode::Incremental).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "Retry-After: 3600 was obeyed past the cap ({:?})",
        started.elapsed()
    );

    // A storm longer than the attempts fails the pass, not the data.
    env.fake.apply(&Churn {
        edits: 80,
        inserts: 5,
        ..Churn::default()
    });
    passthrough(&env, 2);
    env.fake.inject(status(429, Some(0)), ATTEMPTS);
    let err = env.pass(Mode::Incremental).await.unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Klarify(KlarifyError::Status {
                status: 429,
                attempts: ATTEMPTS
            })
        ),
        "{err:?}"
    );
    assert_watermark_not_ahead(&env, "after a 429 storm").await;
    converges(&env, "after a 429 storm").await;
}

async fn a_5xx_burst_inside_a_tie_group_keeps_the_cursor_before_it(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(48, 200), 25).await;
    let s = settings(&env.fake.base_url(), 25);
    use_client(&mut env, s);
    env.pass(Mode::Incremental).await.unwrap();
    // A bulk edit of 80 at one instant T: page 0, page 0 above T-1us (the group's first page)
    // and a count pass; the request for the whole group meets a burst of server errors.
    env.fake.apply(&Churn {
        edits: 80,
        bulk: true,
        ..Churn::default()
    });
    let tie = env.source().iter().map(|p| p.updated_at).max().unwrap();
    passthrough(&env, 3);
    for s in [500, 502, 503, 504].into_iter().cycle().take(ATTEMPTS) {
        env.fake.inject(status(s, None), 1);
    }
    let err = env.pass(Mode::Incremental).await.unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Klarify(KlarifyError::Status {
                attempts: ATTEMPTS,
                ..
            })
        ),
        "{err:?}"
    );
    let watermark = env.store.watermark().await.unwrap().unwrap();
    assert!(
        watermark < tie,
        "the cursor moved to the tie group's instant {} before reading all of it: {}",
        format_instant(tie),
        format_instant(watermark)
    );
    assert_watermark_not_ahead(&env, "after a 5xx burst in a tie group").await;
    converges(&env, "after a 5xx burst in a tie group").await;
}

/// A bulk edit larger than a page (a tie group) plus scattered edits and inserts.
fn bulk_and_scattered(env: &Env) {
    env.fake.apply(&Churn {
        edits: 60,
        bulk: true,
        ..Churn::default()
    });
    env.fake.apply(&Churn {
        edits: 20,
        inserts: 10,
        ..Churn::default()
    });
}

/// Every page through the saboteur carries `lie`; `totalCount` stays true, so the pass can
/// tell where the data ends, tie groups included.
async fn converges_despite(backend: Backend, lie: Rewrite, what: &str) {
    let mut env = Env::new(backend, Organisation::generate(49, 300), 25).await;
    let saboteur = Saboteur::start(&env.fake).await;
    use_client(&mut env, settings(&saboteur.base_url(), 25));
    saboteur.rewrite(lie);
    for mode in [Mode::Backfill, Mode::Incremental] {
        bulk_and_scattered(&env);
        let result = env.pass(mode).await;
        assert_watermark_not_ahead(&env, what).await;
        result.unwrap_or_else(|e| panic!("{what}, {mode:?}: totalCount tells the truth: {e}"));
        env.assert_mirror_equals_source().await;
    }
    saboteur.rewrite(Rewrite::None);
    converges(&env, what).await;
}

async fn has_next_always_false_converges(backend: Backend) {
    converges_despite(backend, Rewrite::HasNext(false), "hasNext always false").await;
}

async fn has_next_always_true_converges(backend: Backend) {
    converges_despite(backend, Rewrite::HasNext(true), "hasNext always true").await;
}

async fn has_next_at_random_converges(backend: Backend) {
    converges_despite(backend, Rewrite::HasNextRandom, "hasNext at random").await;
}

async fn a_total_count_that_disagrees_converges(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(50, 300), 25).await;
    let saboteur = Saboteur::start(&env.fake).await;
    use_client(&mut env, settings(&saboteur.base_url(), 25));
    let bulk = bulk_and_scattered;
    // Counts that are off by a constant, or always zero, cannot hurt: hasNext tells the truth
    // and the tie group's size is a difference of two counts.
    for (lie, what) in [
        (Rewrite::TotalPlus(1000), "totalCount + 1000"),
        (Rewrite::TotalZero, "totalCount 0"),
    ] {
        saboteur.rewrite(lie);
        bulk(&env);
        let result = env.pass(Mode::Incremental).await;
        assert_watermark_not_ahead(&env, what).await;
        result.unwrap_or_else(|e| panic!("{what}: {e}"));
        env.assert_mirror_equals_source().await;
    }
    // Counts at random: a tie group's size cannot be proved, so the pass may fail, but it
    // must not move the cursor past what it did not read.
    saboteur.rewrite(Rewrite::TotalRandom);
    bulk(&env);
    let result = env.pass(Mode::Incremental).await;
    assert_watermark_not_ahead(&env, "totalCount at random").await;
    match result {
        Ok(_) => {}
        Err(e) => panic!("totalCount at random: unexpected error {e:?}"),
    }
    saboteur.rewrite(Rewrite::None);
    converges(&env, "after totalCount lies").await;
}

/// The tie-group proof compares the ids seen with a size taken from `totalCount`. A server
/// whose order of equal keys is unstable *and* whose counts are too small (here: half) makes
/// an incomplete read look complete, unless the client notices that the counts contradict the
/// pages it was served (a page with `hasNext` beyond `totalCount`).
async fn an_understated_total_count_cannot_pass_off_an_incomplete_tie_group(backend: Backend) {
    let opts = FakeOptions {
        unstable_ties: true,
        seed: 51,
        ..FakeOptions::default()
    };
    let mut env = Env::with_options(backend, Organisation::generate(51, 100), opts, 25).await;
    let saboteur = Saboteur::start(&env.fake).await;
    use_client(&mut env, settings(&saboteur.base_url(), 25));
    env.pass(Mode::Incremental).await.unwrap();
    env.fake.apply(&Churn {
        edits: 90,
        bulk: true,
        ..Churn::default()
    });
    saboteur.rewrite(Rewrite::TotalHalf);
    let result = env.pass(Mode::Incremental).await;
    assert_watermark_not_ahead(&env, "totalCount halved, unstable tie order").await;
    match result {
        Ok(_)
        | Err(SyncError::Unordered(_))
        | Err(SyncError::Klarify(KlarifyError::Malformed { .. })) => {}
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

/// Planning ranges multiplies `totalCount` by the range number: near u64::MAX that wrapped (a
/// panic in a debug build).
async fn a_total_count_near_u64_max_neither_panics_nor_loses_items(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(56, 300), 25).await;
    let saboteur = Saboteur::start(&env.fake).await;
    use_client(&mut env, settings(&saboteur.base_url(), 25));
    saboteur.rewrite(Rewrite::Total(u64::MAX - 1));
    for mode in [Mode::Backfill, Mode::Incremental] {
        bulk_and_scattered(&env);
        let result = env.pass(mode).await;
        assert_watermark_not_ahead(&env, "totalCount near u64::MAX").await;
        result.unwrap_or_else(|e| panic!("totalCount near u64::MAX, {mode:?}: {e}"));
        env.assert_mirror_equals_source().await;
    }
}

/// Page numbers are how a tie group's end is found: a server that serves page 0 whatever is
/// asked for never shows it, and unbounded probing for it would go on for ever.
async fn a_server_ignoring_page_leaves_a_tie_group_unproven_in_bounded_time(backend: Backend) {
    let org = Organisation::generate_grouped(57, 100, &[60]);
    let mut env = Env::new(backend, org, 25).await;
    // Read page by page: one response holding the whole group would prove it at once.
    env.options.tie_group_page_size = 25;
    env.options.tie_group_rounds = 4;
    let saboteur = Saboteur::start(&env.fake).await;
    use_client(&mut env, settings(&saboteur.base_url(), 25));
    saboteur.rewrite(Rewrite::IgnorePage);
    let report = tokio::time::timeout(Duration::from_secs(120), env.pass(Mode::Backfill))
        .await
        .expect("the pass ends")
        .unwrap();
    assert_eq!(report.unproven_groups, 1);
    assert_watermark_not_ahead(&env, "page ignored").await;
    // Each round probes at most 64 pages, and collects none when no probe found the end.
    assert!(
        saboteur.connections() < 4 * 64 + 20,
        "{} requests",
        saboteur.connections()
    );
    saboteur.rewrite(Rewrite::None);
    converges(&env, "page honoured again").await;
}

// ---------------------------------------------------------------------------------------
// Hostile items

/// `rejected_items` as `(raw, reason)`.
async fn rejected(env: &Env) -> Vec<(String, String)> {
    use secrecy::ExposeSecret;
    let pool = common::any_pool(env.database_url.expose_secret())
        .await
        .unwrap();
    let rows = sqlx::query_as("SELECT raw, reason FROM rejected_items")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

/// Each odd item is either mirrored exactly as the client parses it, or kept in
/// `rejected_items` with its raw JSON (as served) and a reason; everything else is mirrored.
/// `odd` holds each odd item's id and its text as the client receives it.
async fn assert_mirrored_or_kept_aside(env: &Env, odd: &[(String, String)], context: &str) {
    let mirror = env.mirror().await;
    let rejected = rejected(env).await;
    let odd_ids: Vec<&str> = odd.iter().map(|(id, _)| id.as_str()).collect();
    let normal: Vec<Procedure> = env
        .source()
        .into_iter()
        .filter(|p| !odd_ids.contains(&p.id.as_str()))
        .collect();
    let kept: Vec<Procedure> = mirror
        .iter()
        .filter(|m| !odd_ids.contains(&m.id.as_str()))
        .cloned()
        .collect();
    assert_same(&kept, &normal);
    let json_eq = |a: &str, b: &str| {
        a == b
            || matches!(
                (serde_json::from_str::<Value>(a), serde_json::from_str::<Value>(b)),
                (Ok(x), Ok(y)) if x == y
            )
    };
    for (id, served) in odd {
        let in_mirror = mirror.iter().find(|m| &m.id == id);
        let in_rejected = rejected.iter().find(|(raw, _)| json_eq(raw, served));
        match (in_mirror, in_rejected) {
            (Some(m), None) => {
                let expected = parse_item(served).unwrap_or_else(|e| {
                    panic!("{context}: {id:.60} is mirrored although it does not parse: {e}")
                });
                assert_same(std::slice::from_ref(m), std::slice::from_ref(&expected));
                eprintln!(
                    "{context}: {:?} mirrored exactly",
                    id.chars().take(40).collect::<String>()
                );
            }
            (None, Some((_, reason))) => {
                eprintln!("{context}: {id:?} kept aside: {reason}");
                assert!(!reason.trim().is_empty(), "{context}: {id:.60}: no reason")
            }
            (Some(_), Some(_)) => panic!("{context}: {id:.60} is both mirrored and rejected"),
            (None, None) => {
                panic!("{context}: item {id:.60} is neither mirrored nor in rejected_items (lost)")
            }
        }
    }
}

fn served(items: &[Value]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|v| (v["id"].as_str().unwrap().to_owned(), v.to_string()))
        .collect()
}

async fn duplicate_ids_within_a_page_newest_wins(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(52, 60), 50).await;
    let item = |id: &str, at: &str, name: &str, lanes: &[&str]| {
        json!({"id": id, "updated_at": at, "name": name, "status": "published", "lanes": lanes,
               "called_within": [], "called_from": [name]})
    };
    let copies = [
        // Older copy first, as the sort serves it: the newer one wins.
        item("dup-a", "2025-07-01T00:00:00Z", "A old", &["X", "Y", "Z"]),
        item("dup-a", "2025-07-02T00:00:00Z", "A new", &["X"]),
        // Same instant, different content: the later one as served wins.
        item("dup-b", "2025-07-03T00:00:00Z", "B first", &["P"]),
        item("dup-b", "2025-07-03T00:00:00Z", "B second", &["Q", "R"]),
        // Identical copies.
        item("dup-c", "2025-07-04T00:00:00Z", "C", &["S"]),
        item("dup-c", "2025-07-04T00:00:00Z", "C", &["S"]),
    ];
    for c in &copies {
        env.fake.insert_raw(c.clone());
    }
    let winners: HashMap<&str, &Value> = [
        ("dup-a", &copies[1]),
        ("dup-b", &copies[3]),
        ("dup-c", &copies[5]),
    ]
    .into();
    for mode in [Mode::Backfill, Mode::Incremental, Mode::Backfill] {
        env.pass(mode)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let mirror = env.mirror().await;
        let mut expected: Vec<Procedure> = env
            .source()
            .into_iter()
            .filter(|p| !winners.contains_key(p.id.as_str()))
            .chain(
                winners
                    .values()
                    .map(|v| parse_item(&v.to_string()).unwrap()),
            )
            .collect();
        expected.sort_by(|a, b| a.id.cmp(&b.id));
        assert_same(&mirror, &expected);
        assert!(
            rejected(&env).await.is_empty(),
            "{mode:?}: duplicates are not errors"
        );
    }
}

fn random_text(rng: &mut StdRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Inserts `odd` into the source, runs a backfill and an incremental pass, and checks each
/// odd item is mirrored exactly or kept aside, the rest mirrored, and the sync not stopped.
async fn survives_odd_items(env: &Env, inserted: &[Value], odd: &[(String, String)], what: &str) {
    for item in inserted {
        env.fake.insert_raw(item.clone());
    }
    for mode in [Mode::Backfill, Mode::Incremental] {
        let result = env.pass(mode).await.map_err(|e| e.to_string());
        assert!(
            result.is_ok(),
            "{what}, {mode:?}: one odd item stopped the whole sync: {result:?}"
        );
        assert_mirrored_or_kept_aside(env, odd, what).await;
    }
}

async fn very_long_strings_do_not_stop_the_sync(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(53, 80), 50).await;
    let mut rng = StdRng::seed_from_u64(53);
    let at = "2025-07-01T00:00:00Z";
    let odd = [
        json!({"id": "long-name", "updated_at": at, "name": random_text(&mut rng, 1 << 20)}),
        json!({"id": "long-lane", "updated_at": at, "lanes": [random_text(&mut rng, 1 << 20)]}),
        json!({"id": "long-call", "updated_at": at,
               "called_from": [random_text(&mut rng, 200_000)],
               "url": format!("https://x.klarify.biz/{}", random_text(&mut rng, 100_000))}),
    ];
    survives_odd_items(
        &env,
        &odd,
        &served(&odd),
        &format!("{backend:?}, 1 MB strings"),
    )
    .await;
}

/// An id is a primary key, and on PostgreSQL a B-tree entry cannot exceed ~2.7 kB.
async fn a_very_long_id_does_not_stop_the_sync(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(57, 80), 50).await;
    let mut rng = StdRng::seed_from_u64(57);
    let odd = [
        json!({"id": format!("long-id-{}", random_text(&mut rng, 10_000)),
                      "updated_at": "2025-07-01T00:00:00Z", "name": "long id"}),
    ];
    survives_odd_items(&env, &odd, &served(&odd), &format!("{backend:?}, 10 kB id")).await;
}

/// Emoji, right-to-left text, combining marks, zero-width and control characters come back
/// exactly; an escaped lone surrogate (`\ud800`: valid JSON text, but no Unicode string) is
/// kept aside without taking its page down.
async fn odd_unicode_does_not_stop_the_sync(backend: Backend) {
    let mut env = Env::new(backend, Organisation::generate(54, 80), 50).await;
    let saboteur = Saboteur::start(&env.fake).await;
    use_client(&mut env, settings(&saboteur.base_url(), 50));
    // The fake holds Rust strings, which cannot be a lone surrogate: the saboteur writes it.
    saboteur.substitute("@@LONE-SURROGATE@@", r"\ud800");
    saboteur.substitute("@@SURROGATE-PAIR@@", r"\ud83d\ude00");
    let at = |s: u32| format!("2025-07-01T00:00:{s:02}Z");
    let items = [
        json!({"id": "emoji", "updated_at": at(1), "name": "Onboarding 🚀👩🏽‍💻 ✅", "lanes": ["🏢", "HR 👥"]}),
        json!({"id": "rtl", "updated_at": at(2), "name": "עיבוד הזמנה \u{200f}(RTL)\u{200e} طلب شراء", "owner": "أحمد"}),
        json!({"id": "combining", "updated_at": at(3), "name": "Cafe\u{301} Z\u{351}\u{36b}\u{343}", "performer": "\u{feff}BOM"}),
        json!({"id": "zero-width", "updated_at": at(4), "name": "a\u{200b}b\u{200d}c\u{2028}d\u{2029}e", "called_from": ["\u{fffd}", "\u{10ffff}"]}),
        json!({"id": "controls", "updated_at": at(5), "name": "tab\there\nnew line\r\u{1}\u{1f}\u{7f}", "status": "\u{85}"}),
        json!({"id": "ключ-😀", "updated_at": at(6), "name": "non-ASCII id"}),
        json!({"id": "pair", "updated_at": at(7), "name": "@@SURROGATE-PAIR@@"}),
        json!({"id": "lone", "updated_at": at(8), "name": "@@LONE-SURROGATE@@"}),
    ];
    // What the client receives for the substituted ones.
    let odd: Vec<(String, String)> = [
        ("pair", "@@SURROGATE-PAIR@@", r"\ud83d\ude00"),
        ("lone", "@@LONE-SURROGATE@@", r"\ud800"),
    ]
    .iter()
    .map(|(id, marker, escape)| {
        let item = items.iter().find(|v| v["id"] == *id).unwrap();
        (id.to_string(), item.to_string().replace(marker, escape))
    })
    .collect();
    let what = format!("{backend:?}, odd Unicode");
    survives_odd_items(&env, &items, &odd, &what).await;
    let mirror = env.mirror().await;
    assert!(
        mirror
            .iter()
            .any(|m| m.id == "pair" && m.name.as_deref() == Some("😀")),
        "{what}: an escaped surrogate pair is one character"
    );
    assert!(
        mirror.iter().all(|m| m.id != "lone"),
        "{what}: a lone surrogate cannot be mirrored as text"
    );
}

/// NUL is valid in JSON strings (`\u0000`) and in SQLite text, but PostgreSQL's `text` and
/// `jsonb` refuse it. Whatever a backend can store, the item must not stop the sync.
async fn nul_characters_do_not_stop_the_sync(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(58, 80), 50).await;
    let at = |s: u32| format!("2025-07-01T00:00:{s:02}Z");
    let odd = [
        json!({"id": "nul-name", "updated_at": at(1), "name": "before\u{0}after"}),
        json!({"id": "nul-lane", "updated_at": at(2), "lanes": ["HR\u{0}"]}),
        json!({"id": "nul\u{0}id", "updated_at": at(3), "name": "NUL in the id"}),
        json!({"id": "nul-key", "updated_at": at(4), "x\u{0}y": 1}),
    ];
    survives_odd_items(&env, &odd, &served(&odd), &format!("{backend:?}, NUL")).await;
}

/// Quotes, comment markers, placeholders and wildcards in every field come back as text and
/// change nothing else: evidence (not proof) that every value reaches SQL as a bound parameter.
async fn sql_metacharacters_are_only_data(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(59, 40), 50).await;
    let at = |s: u32| format!("2025-07-01T00:00:{s:02}Z");
    let items = [
        json!({"id": "x'); DROP TABLE procedures; --", "updated_at": at(1),
               "name": "Robert'); DELETE FROM procedure_lanes; --", "status": "' OR '1'='1",
               "lanes": ["$1", "?", "%", "_", "\\", "\"\""], "called_from": ["'; --", "/* */"]}),
        json!({"id": "$1", "updated_at": at(2), "owner": "E'\\x00'", "performer": "$$ $tag$ $$",
               "called_within": ["x'); DROP TABLE procedures; --"]}),
        json!({"id": "%", "updated_at": at(3), "url": "https://x/?a=1&b='2'--", "lanes": ["; VACUUM;"]}),
    ];
    for item in &items {
        env.fake.insert_raw(item.clone());
    }
    env.pass(Mode::Backfill).await.unwrap();
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
    assert!(rejected(&env).await.is_empty());
}

async fn wrong_types_and_null_arrays_do_not_stop_the_sync(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(55, 80), 50).await;
    let at = |s: u32| format!("2025-07-01T00:00:{s:02}Z");
    let bad = [
        json!({"id": "t-name", "updated_at": at(1), "name": 42}),
        json!({"id": "t-lanes", "updated_at": at(2), "lanes": [1, 2]}),
        json!({"id": "t-calls", "updated_at": at(3), "called_from": {"a": 1}}),
        json!({"id": "t-status", "updated_at": at(4), "status": ["published"]}),
        json!({"id": "t-time", "updated_at": 1_719_792_000}),
        json!({"id": "t-time-empty", "updated_at": ""}),
        json!({"id": true, "updated_at": at(5)}),
        json!({"id": {"x": 1}, "updated_at": at(6)}),
        json!({"id": "  ", "updated_at": at(7)}),
        json!(null),
        json!(42),
        json!("a string where an item belongs"),
        json!([]),
        json!({}),
    ];
    let good = [
        json!({"id": "n-all", "updated_at": at(8), "name": null, "status": null, "owner": null,
               "performer": null, "url": null, "lanes": null, "called_within": null,
               "called_from": null}),
        json!({"id": "n-missing", "updated_at": at(9)}),
        json!({"id": 123_456, "updated_at": at(10), "name": "numeric id"}),
        json!({"id": "n-offset", "updated_at": "2025-07-01T05:30:11.123456789+05:30", "lanes": []}),
        json!({"id": "n-extra", "updated_at": at(12), "lanes": ["A"], "new": {"nested": [1, null]}}),
    ];
    for item in bad.iter().chain(&good) {
        env.fake.insert_raw(item.clone());
    }
    let report = env
        .pass(Mode::Backfill)
        .await
        .unwrap_or_else(|e| panic!("bad items stopped the sync: {e}"));
    assert_eq!(report.stats.new_rejected as usize, bad.len());
    // The good ones (nulls read as empty, numeric id as text) are mirrored like the rest.
    env.assert_mirror_equals_source().await;
    let rejected = rejected(&env).await;
    assert_eq!(rejected.len(), bad.len(), "{rejected:?}");
    for item in &bad {
        let (raw, reason) = rejected
            .iter()
            .find(|(raw, _)| serde_json::from_str::<Value>(raw).is_ok_and(|v| &v == item))
            .unwrap_or_else(|| panic!("{item} is not in rejected_items as served"));
        assert!(!reason.trim().is_empty(), "{raw}: no reason");
    }
    // Served again, nothing is added twice.
    env.pass(Mode::Incremental).await.unwrap();
    env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(rejected_count(&env).await, bad.len());
}

async fn rejected_count(env: &Env) -> usize {
    rejected(env).await.len()
}

/// Through the binary: each rejected item is logged once (not on every pass that sees it
/// again) and counted in `klarify_sync_rejected_items_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_items_are_logged_once_and_counted() {
    let fake = binary::fake(56, 60, Duration::ZERO).await;
    let bad = [
        json!({"id": "r1", "updated_at": "yesterday"}),
        json!({"id": "r2", "updated_at": "2025-07-01T00:00:00Z", "lanes": "HR"}),
        json!({"name": "no id", "updated_at": "2025-07-01T00:00:01Z"}),
    ];
    for item in &bad {
        fake.insert_raw(item.clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vars = Vars::new(&fake, &common::sqlite_url(dir.path()));
    vars.set("KLARIFY_SYNC__SCHEDULE__CRON", "* * * * * *")
        .set("RUST_LOG", "info");
    let mut daemon = Daemon::start(vars.command(dir.path(), &[]), "rejected items").await;
    for _ in 0..3 {
        daemon.wait_for("sync pass succeeded").await;
    }
    let logged = daemon.logged(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot be understood"))
    });
    assert_eq!(
        logged.len(),
        bad.len(),
        "each rejected item is logged once over three passes: {logged:#?}"
    );
    for v in &logged {
        assert_eq!(v["level"], "WARN", "{v}");
    }
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("klarify_sync_rejected_items_total {}", bad.len())),
        "{metrics}"
    );
    daemon.terminate(Duration::from_secs(10)).await;
}

// ---------------------------------------------------------------------------------------
// The saboteur

/// What the saboteur does with one connection (one request: it always closes after answering).
#[derive(Clone, Copy, Debug)]
enum Sabotage {
    /// Forward to the fake, applying the rewrite and substitutions.
    Pass,
    /// Read the request, then close without a word.
    Drop,
    /// Send the headers and the first bytes of a body, then nothing, for an hour.
    StallBody,
    /// A 200 with a chunked body that starts like a page and never ends (counted in bytes).
    Endless,
}

/// How the saboteur rewrites every page it forwards.
#[derive(Clone, Copy, Debug)]
enum Rewrite {
    None,
    HasNext(bool),
    HasNextRandom,
    TotalPlus(u64),
    TotalHalf,
    TotalZero,
    TotalRandom,
    /// `totalCount` is this, whatever the data.
    Total(u64),
    /// Every request is forwarded as one for page 0, as by a server that ignores `page`.
    IgnorePage,
}

/// An HTTP/1.1 proxy in front of a fake Klarify that misbehaves on request: per connection
/// (a queue of [`Sabotage`]) and on every page it forwards ([`Rewrite`], text substitutions).
struct Saboteur {
    addr: SocketAddr,
    inner: Arc<SaboteurInner>,
}

struct SaboteurInner {
    upstream: String,
    http: reqwest::Client,
    queue: Mutex<VecDeque<Sabotage>>,
    rewrite: Mutex<Rewrite>,
    substitutions: Mutex<Vec<(String, String)>>,
    rng: Mutex<StdRng>,
    connections: AtomicU64,
    endless_sent: AtomicU64,
    endless_done: AtomicBool,
}

impl Saboteur {
    async fn start(fake: &FakeKlarify) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(SaboteurInner {
            upstream: fake.base_url(),
            http: reqwest::Client::new(),
            queue: Mutex::default(),
            rewrite: Mutex::new(Rewrite::None),
            substitutions: Mutex::default(),
            rng: Mutex::new(StdRng::seed_from_u64(7)),
            connections: AtomicU64::new(0),
            endless_sent: AtomicU64::new(0),
            endless_done: AtomicBool::new(false),
        });
        let serving = inner.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let inner = serving.clone();
                tokio::spawn(async move {
                    let _ = inner.handle(socket).await;
                });
            }
        });
        Self { addr, inner }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn queue(&self, sabotage: Sabotage, times: usize) {
        let mut queue = self.inner.queue.lock().unwrap();
        queue.extend(std::iter::repeat_n(sabotage, times));
    }

    fn rewrite(&self, rewrite: Rewrite) {
        *self.inner.rewrite.lock().unwrap() = rewrite;
    }

    fn substitute(&self, from: &str, to: &str) {
        let mut subs = self.inner.substitutions.lock().unwrap();
        subs.push((from.to_owned(), to.to_owned()));
    }

    fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::SeqCst)
    }

    fn endless_sent(&self) -> u64 {
        self.inner.endless_sent.load(Ordering::SeqCst)
    }

    fn endless_done(&self) -> bool {
        self.inner.endless_done.load(Ordering::SeqCst)
    }
}

impl SaboteurInner {
    async fn handle(&self, mut socket: TcpStream) -> std::io::Result<()> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await?;
            if n == 0 || head.len() > 1 << 16 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let target = String::from_utf8_lossy(&head)
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_owned();
        let sabotage = self.queue.lock().unwrap().pop_front();
        match sabotage.unwrap_or(Sabotage::Pass) {
            Sabotage::Pass => self.forward(socket, &target).await,
            Sabotage::Drop => Ok(()),
            Sabotage::StallBody => {
                socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                          Content-Length: 100000\r\n\r\n{\"data\":[{\"id\":\"1\",",
                    )
                    .await?;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
            Sabotage::Endless => {
                let result = self.endless(&mut socket).await;
                self.endless_done.store(true, Ordering::SeqCst);
                result
            }
        }
    }

    async fn endless(&self, socket: &mut TcpStream) -> std::io::Result<()> {
        socket
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                  Transfer-Encoding: chunked\r\n\r\n",
            )
            .await?;
        let mut chunk = br#"{"data":[{"id":"endless","name":""#.to_vec();
        chunk.resize(64 << 10, b'x');
        let mut first = true;
        // Stops when the client hangs up, or at 1 GiB.
        while self.endless_sent.load(Ordering::SeqCst) < 1 << 30 {
            let body: &[u8] = if first { &chunk } else { &chunk[40..] };
            first = false;
            let mut framed = format!("{:x}\r\n", body.len()).into_bytes();
            framed.extend_from_slice(body);
            framed.extend_from_slice(b"\r\n");
            socket.write_all(&framed).await?;
            self.endless_sent
                .fetch_add(body.len() as u64, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn forward(&self, mut socket: TcpStream, target: &str) -> std::io::Result<()> {
        let target = match *self.rewrite.lock().unwrap() {
            Rewrite::IgnorePage => first_page(target),
            _ => target.to_owned(),
        };
        let Ok(response) = self
            .http
            .get(format!("{}{target}", self.upstream))
            .send()
            .await
        else {
            return Ok(());
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let Ok(body) = response.bytes().await else {
            return Ok(());
        };
        let body = if status.is_success() {
            self.rewritten(body.to_vec())
        } else {
            body.to_vec()
        };
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Whatever"),
            body.len()
        );
        if let Some(ra) = retry_after {
            head.push_str(&format!("Retry-After: {ra}\r\n"));
        }
        head.push_str("\r\n");
        socket.write_all(head.as_bytes()).await?;
        socket.write_all(&body).await?;
        socket.shutdown().await
    }

    fn rewritten(&self, body: Vec<u8>) -> Vec<u8> {
        let rewrite = *self.rewrite.lock().unwrap();
        let mut body = body;
        if !matches!(rewrite, Rewrite::None) {
            if let Ok(mut page) = serde_json::from_slice::<Value>(&body) {
                let total = page["totalCount"].as_u64().unwrap_or(0);
                let mut rng = self.rng.lock().unwrap();
                match rewrite {
                    Rewrite::None | Rewrite::IgnorePage => {}
                    Rewrite::HasNext(b) => page["hasNext"] = b.into(),
                    Rewrite::HasNextRandom => page["hasNext"] = rng.gen_bool(0.5).into(),
                    Rewrite::TotalPlus(n) => page["totalCount"] = (total + n).into(),
                    Rewrite::TotalHalf => page["totalCount"] = (total / 2).into(),
                    Rewrite::TotalZero => page["totalCount"] = 0.into(),
                    Rewrite::Total(n) => page["totalCount"] = n.into(),
                    Rewrite::TotalRandom => {
                        page["totalCount"] = rng.gen_range(0..=2 * total + 1).into()
                    }
                }
                body = serde_json::to_vec(&page).unwrap();
            }
        }
        let subs = self.substitutions.lock().unwrap();
        if subs.is_empty() {
            return body;
        }
        let mut text = String::from_utf8(body).unwrap();
        for (from, to) in subs.iter() {
            text = text.replace(from, to);
        }
        text.into_bytes()
    }
}

/// `target` asking for page 0 instead of the page it names.
fn first_page(target: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: Vec<&str> = query
        .split('&')
        .map(|p| if p.starts_with("page=") { "page=0" } else { p })
        .collect();
    format!("{path}?{}", params.join("&"))
}
