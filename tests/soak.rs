//! Long random churn: a seeded generator interleaves edits, inserts, deletes, bulk edits (ties
//! larger than a page), changes while a pass is paging, and API faults, over many passes on
//! both backends. After every pass the watermark must not run ahead of the data; after every
//! successful pass the mirror must contain the source (a backfill with no deletes while it ran:
//! equal it). At the end, with the faults drained, the mirror equals the source.
//!
//! The source serves ties in a new order on every request, and with an odd seed also caps its
//! pages at the client's page size (so no tie group is read in one response). Tie groups read
//! under churn may stay unproven for a pass: their members are exempt from the checks until a
//! later pass proves them, and the soak reports how many passes that took.
//!
//! The default run does 30 passes per backend; `KLARIFY_SYNC_LONG_TESTS=1` does 400 on a
//! larger organisation. `KLARIFY_SYNC_TEST_SEED` replays a failure (messages carry the seed).

mod common;

use std::time::Duration;

use std::collections::HashMap;

use common::{
    assert_same, assert_source_contained, assert_watermark_not_ahead, long_tests, seed, Backend,
    Env,
};
use klarify_fake::{Churn, FakeOptions, Fault, Organisation};
use klarify_sync::klarify::{KlarifyClient, KlarifyError};
use klarify_sync::sync::{Mode, SyncError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ATTEMPTS: usize = 3;

on_both_backends!(random_churn_and_faults_never_lose_a_record);

fn random_fault(rng: &mut StdRng) -> Fault {
    let status = |status, retry_after_secs| Fault::Status {
        status,
        retry_after_secs,
    };
    match rng.gen_range(0..20) {
        0 | 1 => status(500, None),
        2 | 3 => status(502, None),
        4 | 5 => status(503, None),
        6 => status(504, None),
        7 | 8 => status(429, Some(0)),
        9 | 10 => Fault::Truncated,
        11 | 12 => Fault::NotJson,
        13..=16 => Fault::LyingHasNext,
        // Longer than the client's timeout.
        17 | 18 => Fault::Hang(Duration::from_millis(700)),
        // Not retried: fails the pass at once.
        _ => Fault::Huge { bytes: 2 << 20 },
    }
}

/// What a pass may fail with here: the API's faults, and a tie group that kept changing.
fn allowed(e: &SyncError) -> bool {
    matches!(
        e,
        SyncError::Klarify(
            KlarifyError::Status { .. }
                | KlarifyError::Timeout { .. }
                | KlarifyError::Malformed { .. }
                | KlarifyError::Unreachable { .. }
                | KlarifyError::TooLarge { .. }
        )
    )
}

async fn random_churn_and_faults_never_lose_a_record(backend: Backend) {
    let (passes, items, page) = if long_tests() {
        (400, 800, 40)
    } else {
        (30, 250, 25)
    };
    let seed = seed(0x50_a4);
    let salt = match backend {
        Backend::Sqlite => 0,
        Backend::Postgres => 0x51_7e,
    };
    let mut rng = StdRng::seed_from_u64(seed ^ salt);
    let opts = FakeOptions {
        unstable_ties: true,
        max_page_size: (seed % 2 == 1).then_some(page as u64),
        seed,
        ..FakeOptions::default()
    };
    let mut env = Env::with_options(
        backend,
        Organisation::generate(seed, items),
        opts,
        page as u32,
    )
    .await;
    let mut settings = common::client_settings(&env.fake, page as u32);
    settings.request_timeout = Duration::from_millis(400);
    settings.max_attempts = ATTEMPTS;
    settings.max_body_bytes = 1 << 20;
    env.client = KlarifyClient::new(settings).unwrap();
    env.pass(Mode::Backfill).await.unwrap();
    env.assert_mirror_equals_source().await;

    let mut succeeded = 0;
    let mut failures: Vec<String> = Vec::new();
    // Each unproven group, with the pass it was first seen unproven in; and how many passes
    // each took to be proven.
    let mut unproven_since: HashMap<time::OffsetDateTime, usize> = HashMap::new();
    let mut proven_after: Vec<usize> = Vec::new();
    let mut history = Vec::new();
    for i in 1..=passes {
        let bulk = rng.gen_bool(0.25);
        let between = Churn {
            edits: rng.gen_range(0..if bulk { 3 * page } else { 30 }),
            inserts: rng.gen_range(0..8),
            deletes: rng.gen_range(0..3),
            bulk,
        };
        env.fake.apply(&between);
        let during = rng.gen_bool(0.4).then(|| Churn {
            edits: rng.gen_range(0..3),
            inserts: rng.gen_range(0..2),
            deletes: rng.gen_range(0..2),
            bulk: rng.gen_bool(0.2),
        });
        if let Some(churn) = &during {
            env.fake.churn_every(rng.gen_range(1..4), churn.clone());
        }
        let mut faults = Vec::new();
        let groups = if rng.gen_bool(0.5) {
            0
        } else {
            rng.gen_range(1..3)
        };
        for _ in 0..groups {
            let through = rng.gen_range(0..8);
            let fault = random_fault(&mut rng);
            // Usually fewer failures in a row than attempts (survived), sometimes a full burst.
            let times = if rng.gen_bool(0.2) {
                ATTEMPTS
            } else {
                rng.gen_range(1..ATTEMPTS)
            };
            env.fake.inject(Fault::Hang(Duration::ZERO), through);
            env.fake.inject(fault.clone(), times);
            faults.push(format!("{through} ok, {times} x {fault:?}"));
        }
        let mode = if i % 10 == 0 || rng.gen_bool(0.05) {
            Mode::Backfill
        } else {
            Mode::Incremental
        };
        let context = format!("seed {seed}, {backend:?}, pass {i} ({mode:?})");
        history.push(format!(
            "{context}: between {between:?}, during {during:?}, faults {faults:?}"
        ));
        let result = tokio::time::timeout(Duration::from_secs(120), env.pass(mode))
            .await
            .unwrap_or_else(|_| panic!("{context}: the pass hung"));
        env.fake.churn_every(0, Churn::default());
        let (mirror, source) = (env.mirror().await, env.source());
        let committed = common::committed(&env.store).await;
        for at in &committed.unproven {
            unproven_since.entry(*at).or_insert(i);
        }
        unproven_since.retain(|at, since| {
            let open = committed.unproven.contains(at);
            if !open {
                proven_after.push(i - *since);
            }
            open
        });
        let trail = || history[history.len().saturating_sub(5)..].join("\n");
        assert_watermark_not_ahead(
            &committed,
            &mirror,
            &source,
            &format!("{context}\n{}", trail()),
        );
        // Members of an unproven group may be missing until a later pass proves it.
        let source: Vec<_> = source
            .into_iter()
            .filter(|s| !committed.unproven.contains(&s.updated_at))
            .collect();
        let mirror: Vec<_> = mirror
            .into_iter()
            .filter(|m| !committed.unproven.contains(&m.updated_at))
            .collect();
        match result {
            Ok(_) => {
                succeeded += 1;
                let no_deletes_during = during.as_ref().is_none_or(|c| c.deletes == 0);
                if mode == Mode::Backfill && no_deletes_during {
                    assert_same(&mirror, &source);
                } else {
                    assert_source_contained(&mirror, &source);
                }
            }
            Err(e) => {
                assert!(
                    allowed(&e),
                    "{context}: a pass failed for a reason no injected fault explains: {e:?}\n{}",
                    trail()
                );
                failures.push(format!("pass {i}: {e}"));
            }
        }
    }
    eprintln!(
        "seed {seed}, {backend:?}: {succeeded} of {passes} passes succeeded; tie groups left \
         unproven by a pass: {}, proven again after {:?} pass(es), {} still open; failures: \
         {failures:#?}",
        proven_after.len() + unproven_since.len(),
        proven_after,
        unproven_since.len()
    );
    assert!(
        succeeded * 10 >= passes * 4,
        "seed {seed}, {backend:?}: only {succeeded} of {passes} passes succeeded; the soak \
         no longer checks much"
    );

    // Wind down: queued faults run out within a few passes, then both modes converge.
    for mode in [Mode::Incremental, Mode::Backfill] {
        let mut tries = 0;
        while let Err(e) = env.pass(mode).await {
            tries += 1;
            assert!(
                allowed(&e) && tries < 30,
                "seed {seed}, {backend:?}: no clean {mode:?} pass after the soak: {e:?}"
            );
        }
    }
    env.assert_mirror_equals_source().await;
    assert!(
        common::committed(&env.store).await.unproven.is_empty(),
        "seed {seed}, {backend:?}: a tie group is still unproven after the source went quiet"
    );
}
