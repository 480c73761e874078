//! Bounded memory: a backfill of large items, run as the real binary, peaks under the bound
//! docs/performance.md ("Memory") gives for its settings, however much the source holds.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use klarify_fake::{FakeKlarify, FakeOptions, Organisation};
use serde_json::json;

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
    let fake = FakeKlarify::start(Organisation::generate(1, 0), FakeOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let env = [
        ("KLARIFY_SYNC__KLARIFY__BASE_URL", fake.base_url()),
        ("KLARIFY_ACCESS_KEY", fake.access_key()),
        ("DATABASE_URL", url.clone()),
        (
            "KLARIFY_SYNC__KLARIFY__CONCURRENCY",
            CONCURRENCY.to_string(),
        ),
        ("KLARIFY_SYNC__KLARIFY__PAGE_SIZE", PAGE_SIZE.to_string()),
        (
            "KLARIFY_SYNC__KLARIFY__MAX_BODY_BYTES",
            MAX_BODY_BYTES.to_string(),
        ),
        (
            "KLARIFY_SYNC__KLARIFY__MAX_REQUESTS_PER_SECOND",
            "10000".into(),
        ),
    ];
    // A child's peak RSS includes its parent's at the instant it was started (Linux keeps the
    // high-water mark of the memory an exec replaces). So the child starts now, while this
    // process is small, as a shell that waits for a line before it becomes the binary.
    let mut child = Command::new("/bin/sh")
        .args(["-c", r#"read -r _ && exec "$0" --backfill"#])
        .arg(env!("CARGO_BIN_EXE_klarify-sync"))
        .env_clear()
        .envs(env)
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
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
    writeln!(child.stdin.take().unwrap(), "go").unwrap();
    // Off the runtime, so the fake keeps serving while the child runs.
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
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
