//! SQLite's WAL is copied into the database by a read connection after each commit, so that a
//! checkpoint's writes and fsyncs are off the writer's path (docs/performance.md).

mod common;

use common::{Backend, Env};
use klarify_fake::Organisation;
use klarify_sync::store::{Mode, PageWrite};
use secrecy::ExposeSecret;

/// `mxFrame` (frames in the WAL) and `nBackfill` (frames copied into the database) from the
/// WAL index: two 48-byte copies of its header, then the checkpoint info (walformat.html).
fn wal_frames(shm: &[u8]) -> (u32, u32) {
    let word = |at: usize| u32::from_ne_bytes(shm[at..at + 4].try_into().unwrap());
    (word(16), word(96))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_checkpointed_beside_the_writer() {
    let env = Env::new(Backend::Sqlite, Organisation::generate(91, 200), 20).await;
    // Held open, so that closing the store does not checkpoint and remove the WAL itself.
    let witness = common::any_pool(env.database_url.expose_secret())
        .await
        .unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM procedures")
        .fetch_one(&witness)
        .await
        .unwrap();
    assert_eq!(n, 0);

    let items = env.source();
    let run = env.store.begin_run(Mode::Backfill, None).await.unwrap();
    let batch = PageWrite {
        run,
        items: &items,
        rejected: &[],
        watermark: items.iter().map(|p| p.updated_at).max(),
        track_seen: false,
        unproven: &[],
        proven: &[],
    };
    env.store.write_page(&batch).await.unwrap();
    // Far below the writer's own threshold (20,000 pages): only the background checkpoint
    // copies these frames. Closing waits for it.
    env.store.close().await;

    let file = env
        .database_url
        .expose_secret()
        .trim_start_matches("sqlite://")
        .to_owned();
    let (frames, copied) = wal_frames(&std::fs::read(format!("{file}-shm")).unwrap());
    assert!(frames > 0, "the batch is in the WAL");
    assert_eq!(copied, frames, "every frame was checkpointed");
    witness.close().await;
}
