//! The mirror equals the source after every kind of pass, on both backends.

mod common;

use std::time::Duration;

use common::{assert_source_contained, Backend, Env};
use klarify_fake::{Churn, FakeOptions, Fault, Organisation};
use klarify_sync::klarify::KlarifyError;
use klarify_sync::store::StoreError;
use klarify_sync::sync::{Mode, SyncError};

on_both_backends!(
    backfill_mirrors_the_source,
    incremental_pass_writes_only_what_changed,
    an_idle_pass_writes_nothing,
    churn_while_paging_loses_nothing,
    a_bulk_edit_larger_than_a_page_is_read_whole,
    an_unstable_tie_order_is_read_completely,
    backfill_marks_deletions_and_revivals,
    backfill_refuses_to_delete_too_much,
    transient_api_faults_are_survived,
    a_rejected_key_fails_at_once,
    a_failed_pass_resumes_without_loss,
    malformed_items_are_kept_aside,
    a_lying_has_next_is_caught_by_total_count,
);

async fn backfill_mirrors_the_source(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(1, 730), 50).await;
    let report = env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(report.stats.inserted, 730);
    assert_eq!(report.deleted, 0);
    env.assert_mirror_equals_source().await;
    let newest = env.source().iter().map(|p| p.updated_at).max();
    assert_eq!(env.store.watermark().await.unwrap(), newest);
}

async fn incremental_pass_writes_only_what_changed(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(2, 400), 50).await;
    env.pass(Mode::Incremental).await.unwrap();
    env.fake.apply(&Churn {
        edits: 25,
        inserts: 10,
        deletes: 0,
        bulk: false,
    });
    let report = env.pass(Mode::Incremental).await.unwrap();
    assert_eq!((report.stats.inserted, report.stats.updated), (10, 25));
    env.assert_mirror_equals_source().await;
}

async fn an_idle_pass_writes_nothing(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(3, 300), 100).await;
    env.pass(Mode::Incremental).await.unwrap();
    let watermark = env.store.watermark().await.unwrap();
    let before = env.fake.requests();
    let report = env.pass(Mode::Incremental).await.unwrap();
    assert_eq!(
        env.fake.requests() - before,
        1,
        "one request when nothing changed"
    );
    assert_eq!((report.stats.inserted, report.stats.updated), (0, 0));
    assert_eq!(env.store.watermark().await.unwrap(), watermark);
}

async fn churn_while_paging_loses_nothing(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(4, 600), 40).await;
    // Before every request: edits move items to the end, deletes shift offsets left.
    env.fake.churn_every(
        1,
        Churn {
            edits: 3,
            inserts: 2,
            deletes: 2,
            bulk: false,
        },
    );
    env.pass(Mode::Backfill).await.unwrap();
    env.fake.churn_every(0, Churn::default());
    assert_source_contained(&env.mirror().await, &env.source());

    env.fake.churn_every(
        2,
        Churn {
            edits: 5,
            inserts: 1,
            deletes: 1,
            bulk: true,
        },
    );
    env.fake.apply(&Churn {
        edits: 120,
        inserts: 0,
        deletes: 0,
        bulk: false,
    });
    env.pass(Mode::Incremental).await.unwrap();
    env.fake.churn_every(0, Churn::default());
    assert_source_contained(&env.mirror().await, &env.source());

    env.pass(Mode::Backfill).await.unwrap();
    env.assert_mirror_equals_source().await;
}

async fn a_bulk_edit_larger_than_a_page_is_read_whole(backend: Backend) {
    let env = Env::new(backend, Organisation::generate_tied(5, 450), 100).await;
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
    // A later bulk edit of 250 items, with single edits landing while the group is paged.
    env.fake.apply(&Churn {
        edits: 250,
        inserts: 0,
        deletes: 0,
        bulk: true,
    });
    env.fake.churn_every(
        3,
        Churn {
            edits: 2,
            inserts: 0,
            deletes: 1,
            bulk: false,
        },
    );
    env.pass(Mode::Incremental).await.unwrap();
    env.fake.churn_every(0, Churn::default());
    assert_source_contained(&env.mirror().await, &env.source());
}

async fn an_unstable_tie_order_is_read_completely(backend: Backend) {
    let opts = FakeOptions {
        unstable_ties: true,
        seed: 9,
        ..FakeOptions::default()
    };
    let env = Env::with_options(backend, Organisation::generate_tied(6, 1000), opts, 100).await;
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
}

async fn backfill_marks_deletions_and_revivals(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(7, 200), 50).await;
    env.pass(Mode::Backfill).await.unwrap();
    let victims: Vec<String> = env.source().iter().take(7).map(|p| p.id.clone()).collect();
    for id in &victims {
        assert!(env.fake.delete(id));
    }
    let report = env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(report.deleted, 7);
    env.assert_mirror_equals_source().await;

    // The same item served again comes back to life.
    let gone = env.store.live_procedures().await.unwrap().len();
    let item =
        serde_json::json!({"id": victims[0], "updated_at": "2025-01-01T00:00:00Z", "name": "Back"});
    env.fake.insert_raw(item);
    env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(env.store.live_procedures().await.unwrap().len(), gone + 1);
    env.assert_mirror_equals_source().await;
}

async fn backfill_refuses_to_delete_too_much(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(8, 100), 50).await;
    env.pass(Mode::Backfill).await.unwrap();
    for p in env.source().iter().take(60) {
        env.fake.delete(&p.id);
    }
    match env.pass(Mode::Backfill).await {
        Err(SyncError::Store(StoreError::DeletionGuard {
            unseen: 60,
            live: 100,
            ..
        })) => {}
        other => panic!("expected the deletion guard, got {other:?}"),
    }
    assert_eq!(env.mirror().await.len(), 100, "nothing was marked");
}

async fn transient_api_faults_are_survived(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(10, 300), 50).await;
    // Three failures in a row, then a success, then two more: within the client's 4 attempts.
    env.fake.inject(
        Fault::Status {
            status: 500,
            retry_after_secs: None,
        },
        1,
    );
    env.fake.inject(
        Fault::Status {
            status: 429,
            retry_after_secs: Some(0),
        },
        1,
    );
    env.fake.inject(
        Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        1,
    );
    env.fake.inject(Fault::Hang(Duration::ZERO), 1);
    env.fake.inject(Fault::Truncated, 1);
    env.fake.inject(Fault::NotJson, 1);
    env.pass(Mode::Backfill).await.unwrap();
    env.assert_mirror_equals_source().await;
}

async fn a_rejected_key_fails_at_once(backend: Backend) {
    let opts = FakeOptions {
        access_key: "another-key".into(),
        ..FakeOptions::default()
    };
    let mut env = Env::with_options(backend, Organisation::generate(11, 10), opts, 50).await;
    let mut settings = common::client_settings(&env.fake, 50);
    settings.access_key = "wrong-key".into();
    env.client = klarify_sync::klarify::KlarifyClient::new(settings).unwrap();
    let err = env.pass(Mode::Incremental).await.unwrap_err();
    assert!(
        matches!(err, SyncError::Klarify(KlarifyError::KeyRejected)),
        "{err:?}"
    );
    assert_eq!(env.fake.requests(), 1, "a 404 is not retried");
    let message = err.to_string();
    assert!(
        message.contains("KLARIFY_ACCESS_KEY") && !message.contains("wrong-key"),
        "{message}"
    );
}

async fn a_failed_pass_resumes_without_loss(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(12, 500), 50).await;
    // Let a few pages through, then fail more often than the client retries.
    env.fake.churn_every(
        1,
        Churn {
            edits: 1,
            inserts: 1,
            deletes: 0,
            bulk: false,
        },
    );
    env.fake.inject(Fault::Hang(Duration::ZERO), 4);
    // Enough failures that some request, among as many in flight as the client allows, fails
    // all its 4 attempts.
    env.fake.inject(
        Fault::Status {
            status: 502,
            retry_after_secs: None,
        },
        4 * env.client.concurrency(),
    );
    let err = env.pass(Mode::Incremental).await.unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Klarify(KlarifyError::Status {
                status: 502,
                attempts: 4
            })
        ),
        "{err:?}"
    );
    let watermark = env
        .store
        .watermark()
        .await
        .unwrap()
        .expect("pages before the fault were committed");
    // The watermark never runs ahead of the data written.
    let mirror = env.mirror().await;
    for p in env.source().iter().filter(|p| p.updated_at <= watermark) {
        assert!(
            mirror
                .iter()
                .any(|m| m == p || (m.id == p.id && m.updated_at >= p.updated_at)),
            "{} lost",
            p.id
        );
    }
    env.fake.clear_faults();
    env.pass(Mode::Incremental).await.unwrap();
    env.fake.churn_every(0, Churn::default());
    env.pass(Mode::Incremental).await.unwrap();
    assert_source_contained(&env.mirror().await, &env.source());
}

async fn malformed_items_are_kept_aside(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(13, 120), 50).await;
    env.fake
        .insert_raw(serde_json::json!({"name": "no id", "updated_at": "2025-02-01T00:00:00Z"}));
    env.fake
        .insert_raw(serde_json::json!({"id": "x1", "updated_at": "the other day"}));
    env.fake.insert_raw(
        serde_json::json!({"id": "x2", "updated_at": "2025-02-01T00:00:00Z", "lanes": "HR"}),
    );
    env.fake.insert_raw(serde_json::json!({"id": "ok", "updated_at": "2025-02-01T00:00:00+01:00", "lanes": null, "new_field": [1]}));
    let report = env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(report.stats.new_rejected, 3);
    env.assert_mirror_equals_source().await;
    // Served again, they are not duplicated.
    env.pass(Mode::Backfill).await.unwrap();
    let rejected = common::scalar(&env.database_url, "SELECT COUNT(*) FROM rejected_items").await;
    assert_eq!(rejected, 3);
}

async fn a_lying_has_next_is_caught_by_total_count(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(14, 90), 100).await;
    env.pass(Mode::Backfill).await.unwrap();
    env.fake.apply(&Churn {
        edits: 0,
        inserts: 150,
        deletes: 0,
        bulk: false,
    });
    env.fake.inject(Fault::LyingHasNext, 1);
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
}
