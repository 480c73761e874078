//! Poison items: whatever an item holds, it is either stored or kept in `rejected_items`, on
//! both backends alike, and the rest of its batch is stored. An item that parses but that
//! PostgreSQL refuses would otherwise fail its whole batch, on every pass, at the same place.
//!
//! Pages go through the parser (`parse_page`) and `Store::write_page`, as a pass writes them; a
//! property test generates the hostile items.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::Backend;
use klarify_sync::klarify::{
    format_instant, parse_item, parse_page, untrusted, ClientSettings, KlarifyClient, KlarifyError,
    Page, PageQuery, Procedure, EARLIEST, LATEST, MAX_DEPTH, MAX_ITEM_BYTES, MAX_NUMBER_DIGITS,
    SHOWN_BYTES,
};
use klarify_sync::store::{Mode, PageWrite, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use secrecy::{ExposeSecret, SecretString};
use sqlx::AnyPool;

/// The longest reason or error text any input can produce.
const MAX_REASON: usize = SHOWN_BYTES + 200;

/// A store and a connection of the test's own, to look at what the store wrote.
struct Mirror {
    backend: Backend,
    store: Store,
    sql: AnyPool,
    _dir: Option<tempfile::TempDir>,
}

impl Mirror {
    async fn new(backend: Backend) -> Self {
        let (url, dir) = common::database(backend).await;
        let store = Store::open(&url, 2).await.unwrap();
        Self {
            backend,
            store,
            sql: pool(&url).await,
            _dir: dir,
        }
    }

    /// Writes one page served as `items` (raw JSON texts), as a pass does: the parser first,
    /// then one transaction with the watermark at its newest item.
    async fn write(&self, items: &[String]) -> Result<Page, String> {
        let body = format!(
            r#"{{"data":[{}],"hasNext":false,"totalCount":{}}}"#,
            items.join(","),
            items.len()
        );
        self.write_body(body.as_bytes()).await
    }

    async fn write_body(&self, body: &[u8]) -> Result<Page, String> {
        let page = parse_page(body).map_err(|e| e.to_string())?;
        let run = self.store.begin_run(Mode::Backfill, None).await.unwrap();
        self.store
            .write_page(&PageWrite {
                run,
                items: &page.items,
                rejected: &page.rejected,
                watermark: page.items.iter().map(|p| p.updated_at).max(),
                track_seen: false,
                unproven: &[],
                proven: &[],
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(page)
    }

    /// The page's items are stored as served (the newest copy of an id), its rejected items
    /// are in `rejected_items` with bounded reasons, and nothing else is.
    async fn assert_holds_exactly(&self, page: &Page) {
        let mut expected: HashMap<&str, &Procedure> = HashMap::new();
        for p in &page.items {
            if expected
                .get(p.id.as_str())
                .is_none_or(|e| e.updated_at <= p.updated_at)
            {
                expected.insert(&p.id, p);
            }
        }
        let mirror = self.store.live_procedures().await.unwrap();
        assert_eq!(mirror.len(), expected.len(), "procedures stored");
        for m in &mirror {
            let e = expected[m.id.as_str()];
            let blank = |p: &Procedure| Procedure {
                raw: String::new(),
                ..p.clone()
            };
            assert_eq!(blank(m), blank(e), "{}", untrusted(&m.id));
            // PostgreSQL's jsonb rewrites the text (spacing, key order, numbers in full).
            let same_raw = match self.backend {
                Backend::Sqlite => "SELECT COUNT(*) FROM procedures WHERE id = $1 AND raw = $2",
                Backend::Postgres => {
                    "SELECT COUNT(*) FROM procedures WHERE id = $1 AND raw = $2::jsonb"
                }
            };
            let (n,): (i64,) = sqlx::query_as(same_raw)
                .bind(&m.id)
                .bind(&e.raw)
                .fetch_one(&self.sql)
                .await
                .unwrap();
            assert_eq!(n, 1, "raw of {}", untrusted(&m.id));
        }
        let watermark = page.items.iter().map(|p| p.updated_at).max();
        assert_eq!(self.store.watermark().await.unwrap(), watermark);

        let stored: Vec<(String, String)> =
            sqlx::query_as("SELECT raw, reason FROM rejected_items")
                .fetch_all(&self.sql)
                .await
                .unwrap();
        let mut served: Vec<&str> = page.rejected.iter().map(|r| r.raw.as_str()).collect();
        served.sort();
        served.dedup();
        let mut kept: Vec<&str> = stored.iter().map(|(raw, _)| raw.as_str()).collect();
        kept.sort();
        assert_eq!(kept, served, "rejected items kept");
        for (_, reason) in &stored {
            assert!(reason.len() <= MAX_REASON, "{}", reason.len());
        }
    }

    async fn clear(&self) {
        for sql in [
            "DELETE FROM procedures",
            "DELETE FROM rejected_items",
            "DELETE FROM sync_state",
        ] {
            sqlx::query(sql).execute(&self.sql).await.unwrap();
        }
    }
}

async fn pool(url: &SecretString) -> AnyPool {
    common::any_pool(url.expose_secret()).await.unwrap()
}

fn item(id: &str, updated_at: &str, extra: &str) -> String {
    format!(r#"{{"id":"{id}","updated_at":"{updated_at}","name":"n-{id}"{extra}}}"#)
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// The items of issue 13 that parsed and then failed their batch on PostgreSQL (or, on SQLite,
/// were stored in a form read back as corrupt), between two good ones.
async fn what_postgresql_refused_is_rejected_alone(backend: Backend) {
    let mirror = Mirror::new(backend).await;
    let at = "2025-03-01T00:00:00Z";
    let hostile = [
        item("surrogate", at, r#","x":"\ud800""#),
        item("low-surrogate", at, r#","x":{"k":["\udc00\ud83d"]}"#),
        item("huge-number", at, r#","x":1e1000000"#),
        item("tiny-number", at, r#","x":1e-1000000"#),
        item("deep", at, &format!(r#","x":{}"#, nested(100_000))),
        item("year-0", "0000-06-01T00:00:00Z", ""),
        item("year-minus-1", "0000-01-01T00:00:00+01:00", ""),
        item("nul", at, r#","x":{"a\u0000":1}"#),
        item(
            "expanding",
            at,
            &format!(r#","x":[{}0]"#, "1e999,".repeat(17_000)),
        ),
    ];
    for bad in &hostile {
        mirror.clear().await;
        let page = [item("before", at, ""), bad.clone(), item("after", at, "")];
        let page = mirror
            .write(&page)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: {} failed the batch: {e}", &bad[..40]));
        assert_eq!(page.rejected.len(), 1, "{backend:?}: {}", &bad[..40]);
        mirror.assert_holds_exactly(&page).await;
    }
}

/// serde_json refused a whole body for one byte that is not UTF-8, so every pass failed there.
async fn an_item_that_is_not_utf8_is_rejected_alone(backend: Backend) {
    let mirror = Mirror::new(backend).await;
    let at = "2025-03-01T00:00:00Z";
    let mut body = format!(r#"{{"data":[{},"#, item("before", at, "")).into_bytes();
    // `café` in Latin-1.
    let latin1 = item("latin-1", at, r#","x":"caf@""#);
    body.extend(latin1.bytes().map(|b| if b == b'@' { 0xE9 } else { b }));
    let end = format!(
        r#",{}],"hasNext":false,"totalCount":3}}"#,
        item("after", at, "")
    );
    body.extend_from_slice(end.as_bytes());
    let page = mirror.write_body(&body).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert_eq!(page.rejected.len(), 1);
    mirror.assert_holds_exactly(&page).await;
}

/// `9999-12-31T23:59:59-00:01` is year 10000 in UTC: converting it panicked, which killed the
/// daemon's sync task.
async fn an_instant_past_year_9999_in_utc_is_rejected_not_a_panic(backend: Backend) {
    let mirror = Mirror::new(backend).await;
    let at = "2025-03-01T00:00:00Z";
    let page = [
        item("before", at, ""),
        item("year-10000", "9999-12-31T23:59:59-00:01", ""),
        item("after", at, ""),
    ];
    let page = mirror.write(&page).await.unwrap();
    assert_eq!(page.rejected.len(), 1);
    mirror.assert_holds_exactly(&page).await;
}

/// A batch can hold the same unreadable item twice (a page read again in a tie group, or served
/// twice): PostgreSQL's upsert refuses to update one row twice in a statement.
async fn the_same_rejected_item_twice_in_a_batch(backend: Backend) {
    let mirror = Mirror::new(backend).await;
    let page = [
        "{}".to_owned(),
        item("good", "2025-03-01T00:00:00Z", ""),
        "{}".to_owned(),
    ];
    let page = mirror.write(&page).await.unwrap();
    assert_eq!(page.rejected.len(), 2);
    mirror.assert_holds_exactly(&page).await;
}

/// The ends of what is accepted are stored, and read back, exactly: the first and last instants
/// (served at offsets), the deepest nesting, the longest numbers, surrogate pairs.
async fn the_limits_themselves_are_stored_exactly(backend: Backend) {
    let mirror = Mirror::new(backend).await;
    let digits = "7".repeat(MAX_NUMBER_DIGITS);
    let page = [
        item("first", "0000-12-31T23:00:00.0000001-01:00", ""),
        item("last", "9999-12-31T23:59:59.999999999Z", ""),
        item(
            "deep",
            "2025-01-01T00:00:00Z",
            &format!(r#","x":{}"#, nested(MAX_DEPTH - 1)),
        ),
        item(
            "numbers",
            "2025-01-01T00:00:00Z",
            &format!(r#","x":[{digits},0.{digits},-1e999,1e-999,0.5e-998]"#),
        ),
        item(
            "pair",
            "2025-01-01T00:00:00Z",
            r#","x":"\ud83d\ude00\uDBFF\uDFFF""#,
        ),
    ];
    let page = mirror.write(&page).await.unwrap();
    assert!(page.rejected.is_empty(), "{:?}", page.rejected);
    assert_eq!(page.items[0].updated_at, EARLIEST);
    assert_eq!(page.items[1].updated_at, LATEST);
    mirror.assert_holds_exactly(&page).await;
    assert_eq!(
        mirror.store.watermark().await.unwrap().map(format_instant),
        Some("9999-12-31T23:59:59.999999Z".to_owned())
    );
}

/// The largest item accepted is stored; one a byte larger is not accepted. (Of PostgreSQL's jsonb
/// limit of 255 MiB it takes little: `[0,0,…]`, the worst form measured, is six times its text,
/// and in a debug build too slow to scan here.)
async fn the_largest_item_allowed_is_stored(backend: Backend) {
    let mirror = Mirror::new(backend).await;
    let at = "2025-01-01T00:00:00Z";
    let zeros = |n: usize| format!(r#","x":"{}""#, "0".repeat(n));
    let n = MAX_ITEM_BYTES - item("largest", at, &zeros(0)).len();
    let largest = item("largest", at, &zeros(n));
    assert_eq!(largest.len(), MAX_ITEM_BYTES);
    let too_big = item("too-big", at, &zeros(n + 1));
    assert!(parse_item(&too_big).unwrap_err().contains("bytes long"));
    let page = mirror.write(&[largest]).await.unwrap();
    assert_eq!(page.items.len(), 1);
    mirror.assert_holds_exactly(&page).await;
}

/// Log lines, as the text format writes them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A rejected item is logged with its raw text, bounded: logged whole, a megabyte-long item
/// would make a megabyte-long line, on every pass that served it.
async fn a_rejected_item_is_logged_on_one_bounded_line(backend: Backend) {
    let mirror = Mirror::new(backend).await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let hostile = format!(
        r#"{{"id":"x\n2025-01-01T00:00:00Z ERROR forged","updated_at":"never","name":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let page = mirror.write(&[hostile]).await.unwrap();
    assert_eq!(page.rejected.len(), 1);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 1, "{logs}");
    assert!(lines[0].contains("cannot be understood"), "{logs}");
    assert!(lines[0].len() < 2 * MAX_REASON, "{} bytes", lines[0].len());
}

/// A raw item's text, parts of it chosen to be hostile.
fn hostile_item() -> impl Strategy<Value = String> {
    let text = prop_oneof![
        4 => any::<String>(),
        1 => "[a\n\r\t\"\\\\\u{0}\u{202e}\u{fffd}]{0,100000}",
    ]
    .prop_map(|s| serde_json::to_string(&s).unwrap());
    let escapes = prop::collection::vec(
        prop_oneof![
            Just(r"\ud800".to_owned()),
            Just(r"\udfff".to_owned()),
            Just(r"\ud83d\ude00".to_owned()),
            Just(r"\u0000".to_owned()),
            Just(r"\\u0000".to_owned()),
            Just(r"\u0041".to_owned()),
            "[a-z ]{0,5}",
        ],
        0..6,
    )
    .prop_map(|parts| format!("\"{}\"", parts.concat()));
    let number = (
        prop_oneof![Just("".to_owned()), Just("-".to_owned())],
        prop_oneof!["[1-9][0-9]{0,5}", Just("0".to_owned()), "[1-9]{990,1010}"],
        prop_oneof![Just("".to_owned()), "\\.[0-9]{1,4}", "\\.[0-9]{990,1010}"],
        prop_oneof![
            Just("".to_owned()),
            (-1_200_000i64..1_200_000).prop_map(|e| format!("e{e}")),
            (-1010i64..1010).prop_map(|e| format!("E{e:+}")),
            Just("e99999999999999999999999".to_owned()),
        ],
    )
        .prop_map(|(sign, int, frac, exp)| format!("{sign}{int}{frac}{exp}"));
    let depth = prop_oneof![1usize..8, 95usize..105, Just(1000), Just(100_000)];
    let value = prop_oneof![
        3 => text.clone(),
        3 => escapes,
        3 => number,
        2 => depth.prop_map(nested),
        1 => (1usize..20_000).prop_map(|n| format!("[{}0]", "1e999,".repeat(n))),
        1 => Just("null".to_owned()),
        1 => Just("{}".to_owned()),
    ];
    let id = prop_oneof![
        4 => "[a-z0-9]{1,6}".prop_map(|s| format!("\"{s}\"")),
        1 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => Just(r#""line\nbreak""#.to_owned()),
        1 => (0u64..1000).prop_map(|n| n.to_string()),
        1 => Just(format!("\"{}\"", "x".repeat(1025))),
        1 => Just(r#""\ud800""#.to_owned()),
        1 => Just(r#""a\u0000""#.to_owned()),
        1 => Just(r#""""#.to_owned()),
    ];
    let updated_at = prop_oneof![
        6 => (0u32..3).prop_map(|s| format!("\"2025-01-01T00:00:0{s}Z\"")),
        1 => Just("\"0000-01-01T00:00:00Z\"".to_owned()),
        1 => Just("\"0000-12-31T23:00:00-01:00\"".to_owned()),
        1 => Just("\"0001-01-01T00:00:00+00:01\"".to_owned()),
        1 => Just("\"9999-12-31T23:59:59-00:01\"".to_owned()),
        1 => Just("\"9999-12-31T23:59:59.999999999Z\"".to_owned()),
        1 => Just("\"9999-12-31T23:59:59.999999-23:59\"".to_owned()),
        1 => text,
        1 => Just("1700000000".to_owned()),
    ];
    let lanes = prop::collection::vec(any::<String>(), 0..3)
        .prop_map(|l| serde_json::to_string(&l).unwrap());
    (id, updated_at, lanes, prop::collection::vec(value, 0..3)).prop_map(
        |(id, updated_at, lanes, extra)| {
            let extra: String = extra
                .iter()
                .enumerate()
                .map(|(i, v)| format!(r#","x{i}":{v}"#))
                .collect();
            format!(r#"{{"id":{id},"updated_at":{updated_at},"lanes":{lanes}{extra}}}"#)
        },
    )
}

/// Pages of hostile items, some served twice.
fn hostile_page() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(hostile_item(), 1..6).prop_flat_map(|items| {
        let n = items.len();
        (Just(items), prop::collection::vec(0..n, 0..3)).prop_map(|(mut items, again)| {
            let again: Vec<String> = again.into_iter().map(|i| items[i].clone()).collect();
            items.extend(again);
            items
        })
    })
}

/// Generated hostile pages, each through the parser and the store: never a panic, never a
/// failed batch, every item stored or rejected, nothing else stored.
async fn hostile_pages_never_block_a_batch(backend: Backend) {
    let mirror = Mirror::new(backend).await;
    let cases = if common::long_tests() { 1000 } else { 48 };
    let handle = tokio::runtime::Handle::current();
    let runs = AtomicU64::new(0);
    tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&hostile_page(), |served| {
            handle.block_on(async {
                runs.fetch_add(1, Ordering::Relaxed);
                mirror.clear().await;
                let page = mirror
                    .write(&served)
                    .await
                    .unwrap_or_else(|e| panic!("{backend:?}: the batch failed: {}", untrusted(&e)));
                assert_eq!(page.served(), served.len(), "every item parsed or rejected");
                mirror.assert_holds_exactly(&page).await;
            });
            Ok(())
        });
        if let Err(e) = result {
            panic!("{backend:?}: {e}");
        }
        assert!(runs.load(Ordering::Relaxed) >= u64::from(cases));
    })
    .await
    .unwrap();
}

/// A malformed response quoted the offending string whole: a megabyte-long `hasNext` gave a
/// megabyte-long error, in every log line, `sync_runs.error`, `/readyz` and `status`.
#[tokio::test]
async fn a_malformed_response_gives_a_bounded_error() {
    let body = format!(
        r#"{{"data":[],"hasNext":"{}\nERROR forged line","totalCount":0}}"#,
        "x".repeat(1 << 20)
    );
    let app = axum::Router::new().route(
        "/api/procedures",
        axum::routing::get(move || std::future::ready(body.clone())),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = KlarifyClient::new(ClientSettings {
        base_url: format!("http://{addr}").parse().unwrap(),
        access_key: "key".into(),
        page_size: 10,
        request_timeout: std::time::Duration::from_secs(10),
        max_attempts: 1,
        retry_base_delay: std::time::Duration::from_millis(1),
        retry_max_delay: std::time::Duration::from_millis(1),
        max_body_bytes: 4 << 20,
        concurrency: 1,
        max_requests_per_second: 100,
    })
    .unwrap();
    let first = PageQuery {
        page: 0,
        page_size: 100,
        after: None,
    };
    let err = client.fetch_page(first).await.unwrap_err();
    assert!(matches!(err, KlarifyError::Malformed { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(shown.len() <= MAX_REASON + 100, "{} bytes", shown.len());
    assert!(!shown.contains('\n'), "{shown}");
    assert!(shown.contains("bytes cut]"), "{shown}");
    assert!(shown.contains("expected a boolean"), "{shown}");
}

on_both_backends!(
    what_postgresql_refused_is_rejected_alone,
    an_instant_past_year_9999_in_utc_is_rejected_not_a_panic,
    an_item_that_is_not_utf8_is_rejected_alone,
    the_same_rejected_item_twice_in_a_batch,
    the_limits_themselves_are_stored_exactly,
    the_largest_item_allowed_is_stored,
    a_rejected_item_is_logged_on_one_bounded_line,
    hostile_pages_never_block_a_batch,
);
