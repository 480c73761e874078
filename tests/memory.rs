//! Bounded memory: a backfill of large items, run as the real binary, peaks under the bound
//! docs/performance.md ("Memory") gives for its settings, however much the source holds.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::binary::{self, Vars};
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// 300 MB of items in all: far more than the bound, so a pass that holds what it reads for
/// longer than the bound allows shows.
const ITEMS: usize = 2000;
const ITEM_BYTES: usize = 150_000;

/// The settings the bound is computed for (docs/performance.md, "Memory").
const CONCURRENCY: usize = 2;
const PAGE_SIZE: usize = 20;
const MAX_BODY_BYTES: usize = 4 << 20;

const MIB: usize = 1 << 20;
/// What a response in flight takes at its peak, in multiples of `klarify.max_body_bytes`: the
/// body as read (a Vec grown by doubling, so up to twice its length) and each item's text copied
/// out of it.
const PARSE_FACTOR: usize = 3;
/// Items read and not yet committed (`BUFFERED_BYTES`, src/sync/read.rs).
const BUFFERED_BYTES: usize = 32 * MIB;
/// The batch being written once more, as the one JSON parameter of its statement: at most
/// `EVENT_BYTES` (src/sync/read.rs) of items.
const WRITE_BYTES: usize = 8 * MIB;
/// The process itself: 37.3 MiB for the same settings and 2,000 items of 1 kB (a debug build),
/// whose 5 MB database could not fill SQLite's page cache to its 16 MiB heap limit.
const BASE_BYTES: usize = 48 * MIB;

fn bound() -> usize {
    BASE_BYTES + CONCURRENCY * MAX_BODY_BYTES * PARSE_FACTOR + BUFFERED_BYTES + WRITE_BYTES
}

/// The largest resident set of any child waited for so far, in bytes.
fn peak_rss_of_children() -> usize {
    // SAFETY: getrusage only writes into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage), 0);
        usage
    };
    // Linux reports it in KiB.
    usize::try_from(usage.ru_maxrss).unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_of_large_items_peaks_under_the_documented_bound() {
    let fake = binary::fake(1, 0, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let url = common::sqlite_url(dir.path());
    let mut vars = Vars::new(&fake, &url);
    vars.set(
        "KLARIFY_SYNC__KLARIFY__CONCURRENCY",
        &CONCURRENCY.to_string(),
    )
    .set("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", &PAGE_SIZE.to_string())
    .set(
        "KLARIFY_SYNC__KLARIFY__MAX_BODY_BYTES",
        &MAX_BODY_BYTES.to_string(),
    )
    .set("KLARIFY_SYNC__KLARIFY__MAX_REQUESTS_PER_SECOND", "10000");
    // A child's peak RSS includes its parent's at the instant it was started (Linux keeps the
    // high-water mark of the memory an exec replaces). So the child starts now, while this
    // process is small, as a shell that waits for a line before it becomes the binary.
    let shell = r#"read -r _ && exec "$0" --backfill"#;
    let mut child = vars
        .command_of(
            Path::new("/bin/sh"),
            dir.path(),
            &["-c", shell, binary::PROGRAM],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let text = "x".repeat(ITEM_BYTES);
    for i in 0..ITEMS {
        let at = time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(i as i64 * 60);
        fake.insert_raw(json!({
            "id": format!("p{i}"),
            "name": format!("procedure {i}"),
            "updated_at": klarify_sync::klarify::format_instant(at),
            "description": text,
        }));
    }
    let mut go = child.stdin.take().unwrap();
    go.write_all(b"go\n").await.unwrap();
    drop(go);
    let out = child.wait_with_output().await.unwrap();
    let peak = peak_rss_of_children();
    println!(
        "peak RSS {:.1} MiB, bound {:.1} MiB",
        peak as f64 / MIB as f64,
        bound() as f64 / MIB as f64
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mirrored = common::scalar(&url.into(), "SELECT COUNT(*) FROM procedures").await;
    assert_eq!(mirrored, ITEMS as i64);
    assert!(
        peak < bound(),
        "peak RSS {} MiB, over the bound of {} MiB",
        peak / MIB,
        bound() / MIB
    );
}
