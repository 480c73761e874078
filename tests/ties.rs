//! Tie groups (procedures sharing one `updated_at`) served in a new order on every request, by a
//! server that may cap its pages, with and without changes while they are read; items dated in
//! the far future. docs/sync.md, "Tie groups" and "Unproven groups".

mod common;

use common::{assert_source_contained, assert_watermark_not_ahead, committed, Backend, Env};
use klarify_fake::{Churn, FakeOptions, Organisation};
use klarify_sync::klarify::{format_instant, parse_instant, KlarifyClient};
use klarify_sync::store::PageWrite;
use klarify_sync::sync::Mode;
use time::OffsetDateTime;

on_both_backends!(
    unstable_groups_of_one_to_ten_pages_are_read_completely,
    groups_read_while_they_change_are_exact_after_one_quiet_pass,
    three_large_groups_in_a_new_order_per_request_mirror_exactly,
    three_large_groups_under_churn_are_exact_once_it_stops,
    a_backfill_marks_nothing_deleted_while_a_group_is_unproven,
    an_item_dated_in_the_far_future_does_not_hold_back_later_edits,
    a_watermark_stored_in_the_future_is_repaired,
    a_page_of_unreadable_items_does_not_stop_the_sync,
);

const PAGE: u32 = 25;

/// A source serving ties in a new order on every request, capping pages at `cap` if given.
async fn env(backend: Backend, org: Organisation, seed: u64, cap: Option<u64>, page: u32) -> Env {
    let opts = FakeOptions {
        unstable_ties: true,
        max_page_size: cap,
        seed,
        ..FakeOptions::default()
    };
    Env::with_options(backend, org, opts, page).await
}

async fn unstable_groups_of_one_to_ten_pages_are_read_completely(backend: Backend) {
    let page = u64::from(PAGE);
    for pages in [1, 2, 3, 10] {
        // Ending on a page's edge, and a few members past it.
        for size in [pages * page, pages * page + 7] {
            // Whole groups in one response, and a server that caps its pages at the client's.
            for cap in [None, Some(page)] {
                let context = format!("{size} members, cap {cap:?}");
                let org =
                    Organisation::generate_grouped(size, size as usize + 40, &[size as usize]);
                let env = env(backend, org, size, cap, PAGE).await;
                let report = env.pass(Mode::Backfill).await.unwrap();
                assert_eq!(report.unproven_groups, 0, "{context}");
                env.assert_mirror_equals_source().await;
                // The same group bulk-edited again, read by an incremental pass.
                env.fake.apply(&Churn {
                    edits: size as usize,
                    bulk: true,
                    ..Churn::default()
                });
                let report = env.pass(Mode::Incremental).await.unwrap();
                assert_eq!(report.unproven_groups, 0, "{context}");
                env.assert_mirror_equals_source().await;
            }
        }
    }
}

async fn groups_read_while_they_change_are_exact_after_one_quiet_pass(backend: Backend) {
    let page = u64::from(PAGE);
    for pages in [1, 2, 3, 10] {
        for cap in [None, Some(page)] {
            let size = pages * page + 3;
            let context = format!("{size} members, cap {cap:?}");
            let org = Organisation::generate(size, 60);
            let env = env(backend, org, size, cap, PAGE).await;
            env.pass(Mode::Backfill).await.unwrap();
            env.fake.apply(&Churn {
                inserts: size as usize,
                bulk: true,
                ..Churn::default()
            });
            // Members leave the group, and procedures appear and go, while it is read.
            env.fake.churn_every(
                2,
                Churn {
                    edits: 1,
                    inserts: 1,
                    deletes: 1,
                    bulk: false,
                },
            );
            let during = env.pass(Mode::Incremental).await;
            env.fake.churn_every(0, Churn::default());
            let c = committed(&env.store).await;
            let (mirror, source) = (env.mirror().await, env.source());
            assert_watermark_not_ahead(&c, &mirror, &source, &context);
            during.unwrap_or_else(|e| panic!("{context}: {e}"));
            let report = env.pass(Mode::Incremental).await.unwrap();
            assert_eq!(report.unproven_groups, 0, "{context}");
            assert_source_contained(&env.mirror().await, &env.source());
            env.pass(Mode::Backfill).await.unwrap();
            env.assert_mirror_equals_source().await;
        }
    }
}

/// 450, 330 and 260 procedures on one second each, among others: the organisation.
fn three_groups() -> Organisation {
    Organisation::generate_grouped(12, 1400, &[450, 330, 260])
}

async fn three_large_groups_in_a_new_order_per_request_mirror_exactly(backend: Backend) {
    for cap in [None, Some(100)] {
        let env = env(backend, three_groups(), 12, cap, 100).await;
        let report = env.pass(Mode::Backfill).await.unwrap();
        assert_eq!(report.unproven_groups, 0, "cap {cap:?}");
        env.assert_mirror_equals_source().await;
        env.fake.apply(&Churn {
            edits: 400,
            bulk: true,
            ..Churn::default()
        });
        env.fake.apply(&Churn {
            edits: 300,
            bulk: true,
            ..Churn::default()
        });
        env.pass(Mode::Incremental).await.unwrap();
        env.assert_mirror_equals_source().await;
        env.pass(Mode::Backfill).await.unwrap();
        env.assert_mirror_equals_source().await;
    }
}

async fn three_large_groups_under_churn_are_exact_once_it_stops(backend: Backend) {
    for cap in [None, Some(100)] {
        let env = env(backend, three_groups(), 13, cap, 100).await;
        // Deletions only a backfill can see: the last round has them.
        for (mode, deletes) in [
            (Mode::Backfill, 0),
            (Mode::Incremental, 0),
            (Mode::Backfill, 1),
        ] {
            let context = format!("{mode:?} with {deletes} deletion(s), cap {cap:?}");
            let churn = Churn {
                edits: 2,
                inserts: 1,
                deletes,
                bulk: false,
            };
            env.fake.churn_every(3, churn);
            let during = env.pass(mode).await;
            env.fake.churn_every(0, Churn::default());
            let c = committed(&env.store).await;
            assert_watermark_not_ahead(&c, &env.mirror().await, &env.source(), &context);
            during.unwrap_or_else(|e| panic!("{context}: {e}"));
            // Once the source is quiet, one pass of the same mode proves what was left
            // unproven, and the mirror is exact.
            let report = env.pass(mode).await.unwrap();
            assert_eq!(report.unproven_groups, 0, "{context}");
            env.assert_mirror_equals_source().await;
        }
    }
}

/// A member of a tie group that a backfill did not read is not among the ids it saw: marking
/// deletions then would mark it deleted though it exists.
async fn a_backfill_marks_nothing_deleted_while_a_group_is_unproven(backend: Backend) {
    let mut env = env(backend, Organisation::generate(14, 300), 14, Some(25), 25).await;
    // One reader and one round per group: requests, and so the churn, in a fixed order.
    let mut settings = common::client_settings(&env.fake, 25);
    settings.concurrency = 1;
    env.client = KlarifyClient::new(settings).unwrap();
    env.options.tie_group_rounds = 1;
    env.pass(Mode::Backfill).await.unwrap();
    env.fake.apply(&Churn {
        edits: 200,
        bulk: true,
        ..Churn::default()
    });
    env.fake.churn_every(
        2,
        Churn {
            edits: 1,
            ..Churn::default()
        },
    );
    let report = env.pass(Mode::Backfill).await.unwrap();
    env.fake.churn_every(0, Churn::default());
    assert!(
        report.unproven_groups > 0,
        "the scenario needs a group left unproven"
    );
    assert_eq!(report.deleted, 0, "nothing may be marked deleted");
    let deleted = common::scalar(
        &env.database_url,
        "SELECT COUNT(*) FROM procedures WHERE deleted_at IS NOT NULL",
    )
    .await;
    assert_eq!(deleted, 0);
    // The next, quiet pass reads the group again and proves it.
    env.options.tie_group_rounds = 16;
    let report = env.pass(Mode::Incremental).await.unwrap();
    assert_eq!(report.unproven_groups, 0);
    env.assert_mirror_equals_source().await;
}

async fn an_item_dated_in_the_far_future_does_not_hold_back_later_edits(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(15, 120), 25).await;
    env.fake.insert_misdated(serde_json::json!({
        "id": "placeholder",
        "name": "Imported with a placeholder date",
        "updated_at": "9999-12-31T23:59:59Z",
    }));
    let report = env.pass(Mode::Backfill).await.unwrap();
    env.assert_mirror_equals_source().await;
    // It stops at the newest item not dated in the future.
    let watermark = env.store.watermark().await.unwrap().unwrap();
    let newest = env
        .source()
        .iter()
        .map(|p| p.updated_at)
        .filter(|at| at.year() < 9999)
        .max();
    assert_eq!(
        Some(watermark),
        newest,
        "the watermark followed the future item: {}",
        format_instant(watermark)
    );
    assert_eq!(report.future_dated, 1);
    let status = env
        .store
        .status(1, OffsetDateTime::now_utc())
        .await
        .unwrap();
    assert_eq!(status.future_dated, 1);
    // The next edit of any other procedure reaches the mirror in the next incremental pass, and
    // the future item, read again, is not rewritten.
    let other = env.source()[3].id.clone();
    env.fake.edit(&other);
    let report = env.pass(Mode::Incremental).await.unwrap();
    assert_eq!(report.stats.updated, 1, "{report:?}");
    assert_eq!(report.stats.inserted, 0, "{report:?}");
    env.assert_mirror_equals_source().await;
}

/// A watermark an earlier version let follow an item dated in the future would hide every
/// later edit: the pass reads everything once and stores one it may.
async fn a_watermark_stored_in_the_future_is_repaired(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(16, 80), 25).await;
    env.pass(Mode::Backfill).await.unwrap();
    let run = env.store.begin_run(Mode::Incremental, None).await.unwrap();
    let poisoned = parse_instant("9999-12-31T23:59:59Z").unwrap();
    env.store
        .write_page(&PageWrite {
            run,
            items: &[],
            rejected: &[],
            watermark: Some(poisoned),
            track_seen: false,
            unproven: &[],
            proven: &[],
        })
        .await
        .unwrap();
    let other = env.source()[5].id.clone();
    env.fake.edit(&other);
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
    let watermark = env.store.watermark().await.unwrap().unwrap();
    assert!(watermark < OffsetDateTime::now_utc() + env.options.max_future_skew);
}

async fn a_page_of_unreadable_items_does_not_stop_the_sync(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(17, 60), 25).await;
    env.pass(Mode::Backfill).await.unwrap();
    // A run of 40 items with no id, each dated after everything stored, then new procedures.
    for k in 0..40 {
        env.fake
            .insert_raw(serde_json::json!({ "name": format!("no id {k}") }));
    }
    env.fake.apply(&Churn {
        inserts: 10,
        ..Churn::default()
    });
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
    let kept = common::scalar(&env.database_url, "SELECT COUNT(*) FROM rejected_items").await;
    assert_eq!(kept, 40);
}
