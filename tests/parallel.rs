//! A large pass is split into ranges of `updated_at` read in parallel (docs/sync.md, "Parallel
//! ranges"): it must stay exactly as lossless as one reader, keep the watermark behind any gap,
//! and keep to the configured concurrency and request rate.

mod common;

use std::time::{Duration, Instant};

use common::{assert_watermark_not_ahead, Backend, Env};
use klarify_fake::{Churn, Fault, Organisation};
use klarify_sync::klarify::KlarifyClient;
use klarify_sync::sync::Mode;

on_both_backends!(
    ranges_are_read_in_parallel_up_to_the_concurrency,
    churn_and_bulk_edits_during_a_parallel_pass_lose_nothing,
    a_failing_range_keeps_the_watermark_before_it,
    readers_out_of_ranges_split_the_one_left_behind_and_lose_nothing,
    the_request_rate_is_capped,
);

/// 2,000 procedures in pages of 20: 100 pages, enough for every reader to get ranges.
async fn large_env(backend: Backend, seed: u64, concurrency: usize) -> Env {
    let mut env = Env::new(backend, Organisation::generate(seed, 2000), 20).await;
    let mut settings = common::client_settings(&env.fake, 20);
    settings.concurrency = concurrency;
    env.client = KlarifyClient::new(settings).unwrap();
    // Requests that take a moment overlap whenever the client lets them.
    env.fake.set_latency(Duration::from_millis(5));
    env
}

async fn ranges_are_read_in_parallel_up_to_the_concurrency(backend: Backend) {
    for concurrency in [1, 3, 8] {
        let env = large_env(backend, 60, concurrency).await;
        env.pass(Mode::Backfill).await.unwrap();
        env.assert_mirror_equals_source().await;
        let in_flight = env.fake.max_in_flight();
        match concurrency {
            1 => assert_eq!(in_flight, 1, "one reader, one request at a time"),
            n => assert!(
                (2..=n as u64).contains(&in_flight),
                "{in_flight} requests were in flight at once with concurrency {n}"
            ),
        }
    }
}

async fn churn_and_bulk_edits_during_a_parallel_pass_lose_nothing(backend: Backend) {
    let env = large_env(backend, 61, 8).await;
    for (mode, deletes) in [
        (Mode::Backfill, 0),
        (Mode::Incremental, 0),
        (Mode::Backfill, 1),
    ] {
        let context = format!("{mode:?} with {deletes} deletion(s) per change");
        // A bulk edit bigger than two pages (the organisation has three more), then changes
        // while the ranges are read: edited items leave ranges still to be read for the newest.
        // Changes come with time, not with requests, as they would at a real source (any change
        // between a tie group's two counts makes it read again, docs/sync.md).
        env.fake.apply(&Churn {
            edits: 50,
            bulk: true,
            ..Churn::default()
        });
        let churn = env.fake.spawn_background_churn(
            Duration::from_millis(40),
            Churn {
                edits: 1,
                inserts: 1,
                deletes,
                bulk: false,
            },
        );
        // A tie group changed while it is read may stay unproven for a pass (docs/sync.md);
        // the pass goes on, and the next one reads the group again.
        let outcome = env.pass(mode).await;
        let (mirror, source) = (env.mirror().await, env.source());
        let committed = common::committed(&env.store).await;
        assert_watermark_not_ahead(&committed, &mirror, &source, &context);
        outcome.unwrap_or_else(|e| panic!("{context}: {e}"));
        churn.abort();
        // Once the source is quiet, one more pass catches up exactly (a backfill also finds
        // the procedures deleted while the last one ran) and proves any unproven group.
        env.pass(mode).await.unwrap();
        assert!(
            common::committed(&env.store).await.unproven.is_empty(),
            "{context}"
        );
        env.assert_mirror_equals_source().await;
        let newest = env.source().iter().map(|p| p.updated_at).max();
        assert_eq!(env.store.watermark().await.unwrap(), newest, "{context}");
    }
}

/// One reader held up at the start of its range while the other runs out of ranges: the idle
/// one splits what is left of the held-up range and reads the far part, while the source
/// changes, and the pass still loses nothing and keeps its watermark behind what it has not read.
async fn readers_out_of_ranges_split_the_one_left_behind_and_lose_nothing(backend: Backend) {
    let env = large_env(backend, 62, 2).await;
    // Two readers, four ranges of 500: the plan takes the first page and three samples, then
    // each reader asks for a page of its first range; the second of those hangs, for longer
    // than the other reader takes to read the three other ranges.
    env.fake.inject(Fault::Hang(Duration::ZERO), 5);
    env.fake.inject(Fault::Hang(Duration::from_secs(2)), 1);
    env.fake.churn_every(
        7,
        Churn {
            edits: 2,
            inserts: 1,
            ..Churn::default()
        },
    );
    let outcome = env.pass(Mode::Backfill).await;
    let (mirror, source) = (env.mirror().await, env.source());
    let committed = common::committed(&env.store).await;
    assert_watermark_not_ahead(&committed, &mirror, &source, "after a pass with splits");
    let report = outcome.unwrap();
    assert!(
        report.ranges_split > 0,
        "no range was split while a reader waited: {report:?}"
    );
    env.fake.churn_every(0, Churn::default());
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
}

async fn a_failing_range_keeps_the_watermark_before_it(backend: Backend) {
    let env = large_env(backend, 62, 8).await;
    common::fail_one_range_mid_pass(&env.fake);
    env.pass(Mode::Backfill).await.unwrap_err();
    env.fake.clear_faults();
    let (mirror, source) = (env.mirror().await, env.source());
    let committed = common::committed(&env.store).await;
    let watermark = committed.watermark;
    assert_watermark_not_ahead(&committed, &mirror, &source, "after a failed range");
    let beyond = mirror
        .iter()
        .filter(|p| watermark.is_none_or(|w| p.updated_at > w))
        .count();
    assert!(
        beyond > 0,
        "later ranges were committed while the watermark stayed before the failed one"
    );
    // The next pass resumes from the watermark and converges.
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
}

async fn the_request_rate_is_capped(backend: Backend) {
    const PER_SECOND: u32 = 20;
    let mut env = Env::new(backend, Organisation::generate(63, 1200), 20).await;
    let mut settings = common::client_settings(&env.fake, 20);
    settings.max_requests_per_second = PER_SECOND;
    env.client = KlarifyClient::new(settings).unwrap();
    let started = Instant::now();
    env.pass(Mode::Backfill).await.unwrap();
    let elapsed = started.elapsed();
    env.assert_mirror_equals_source().await;
    // A burst of one second's worth, then one request every 1/PER_SECOND s: a lower bound that
    // a slow machine only makes easier to meet.
    let requests = env.fake.requests() as f64;
    let floor = (requests - f64::from(PER_SECOND)) / f64::from(PER_SECOND);
    assert!(
        requests > f64::from(2 * PER_SECOND) && elapsed.as_secs_f64() >= floor * 0.95,
        "{requests} requests in {elapsed:?}: more than {PER_SECOND} a second"
    );
}
