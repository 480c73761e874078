//! Shared by the integration tests: a fake Klarify, a real database per test, and a way to
//! compare the mirror with the source.

#![allow(dead_code)] // each test binary uses its own part of this module

pub mod app;
pub mod binary;
pub mod pg;
pub mod tools;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use klarify_fake::{FakeKlarify, FakeOptions, Fault, Organisation};
use klarify_sync::klarify::{format_instant, parse_item, ClientSettings, KlarifyClient, Procedure};
use klarify_sync::store::Store;
use klarify_sync::sync::{run_pass, Mode, PassReport, SyncError, SyncOptions};
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async test body once per backend, as `mod name { sqlite, postgres }`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
        }
    )*};
}

/// A database URL nobody else uses; the SQLite file lives as long as the returned guard.
pub async fn database(backend: Backend) -> (SecretString, Option<tempfile::TempDir>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (sqlite_url(dir.path()).into(), Some(dir))
        }
        Backend::Postgres => (pg::fresh_database().await.into(), None),
    }
}

/// The URL of a SQLite mirror in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("mirror.db").display())
}

/// The live procedures of the mirror at `url`, read through a store of their own.
pub async fn mirror_at(url: &str) -> Vec<Procedure> {
    let store = Store::open(&url.to_owned().into(), 2).await.unwrap();
    let mirror = store.live_procedures().await.unwrap();
    store.close().await;
    mirror
}

/// A source, a mirror and a client wired together, with retries fast enough for tests.
pub struct Env {
    pub fake: FakeKlarify,
    pub store: Store,
    pub client: KlarifyClient,
    pub options: SyncOptions,
    pub database_url: SecretString,
    _dir: Option<tempfile::TempDir>,
}

pub fn client_settings(fake: &FakeKlarify, page_size: u32) -> ClientSettings {
    ClientSettings {
        base_url: fake.base_url().parse().unwrap(),
        access_key: fake.access_key().into(),
        page_size,
        request_timeout: Duration::from_secs(5),
        max_attempts: 4,
        retry_base_delay: Duration::from_millis(1),
        retry_max_delay: Duration::from_millis(20),
        max_body_bytes: 8 << 20,
        concurrency: 8,
        max_requests_per_second: 10_000,
    }
}

impl Env {
    pub async fn new(backend: Backend, org: Organisation, page_size: u32) -> Self {
        Self::with_options(backend, org, FakeOptions::default(), page_size).await
    }

    pub async fn with_options(
        backend: Backend,
        org: Organisation,
        opts: FakeOptions,
        page_size: u32,
    ) -> Self {
        let fake = FakeKlarify::start(org, opts).await.unwrap();
        let (database_url, dir) = database(backend).await;
        let store = Store::open(&database_url, 4).await.unwrap();
        let client = KlarifyClient::new(client_settings(&fake, page_size)).unwrap();
        let options = SyncOptions {
            overlap: Duration::from_secs(60),
            max_delete_share: 0.5,
            tie_group_rounds: 16,
            tie_group_page_size: 1000,
            max_future_skew: Duration::from_secs(60),
        };
        Self {
            fake,
            store,
            client,
            options,
            database_url,
            _dir: dir,
        }
    }

    pub async fn pass(&self, mode: Mode) -> Result<PassReport, SyncError> {
        run_pass(
            &self.client,
            &self.store,
            mode,
            &self.options,
            &CancellationToken::new(),
        )
        .await
    }

    /// The source's current data set, parsed as the client parses it, sorted by id.
    pub fn source(&self) -> Vec<Procedure> {
        source_of(&self.fake)
    }

    pub async fn mirror(&self) -> Vec<Procedure> {
        self.store.live_procedures().await.unwrap()
    }

    /// The mirror's live rows equal the source, field by field, lanes and calls in order.
    pub async fn assert_mirror_equals_source(&self) {
        assert_same(&self.mirror().await, &self.source());
    }

    /// The same comparison as a condition, for polling a daemon.
    pub async fn mirror_equals_source(&self) -> bool {
        let normalise = |v: Vec<Procedure>| -> Vec<(Procedure, serde_json::Value)> {
            v.into_iter()
                .map(|p| {
                    let raw = serde_json::from_str(&p.raw).unwrap();
                    (
                        Procedure {
                            raw: String::new(),
                            ..p
                        },
                        raw,
                    )
                })
                .collect()
        };
        normalise(self.mirror().await) == normalise(self.source())
    }
}

pub fn source_of(fake: &FakeKlarify) -> Vec<Procedure> {
    let mut items: Vec<Procedure> = fake
        .snapshot()
        .iter()
        .filter_map(|v| parse_item(&v.to_string()).ok())
        .collect();
    items.sort_by(|a, b| a.id.cmp(&b.id));
    items
}

/// Equal as a BI user would see them: every column, lanes and calls in order, raw as JSON.
pub fn assert_same(mirror: &[Procedure], source: &[Procedure]) {
    let ids = |v: &[Procedure]| v.iter().map(|p| p.id.clone()).collect::<Vec<_>>();
    let (m, s) = (ids(mirror), ids(source));
    if m != s {
        let missing: Vec<_> = s.iter().filter(|id| !m.contains(id)).collect();
        let extra: Vec<_> = m.iter().filter(|id| !s.contains(id)).collect();
        panic!("mirror and source differ: missing {missing:?}, extra {extra:?}");
    }
    for (a, b) in mirror.iter().zip(source) {
        assert_eq!(strip_raw(a), strip_raw(b), "procedure {} differs", a.id);
        let (ra, rb): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&a.raw).unwrap(),
            serde_json::from_str(&b.raw).unwrap(),
        );
        assert_eq!(ra, rb, "raw of procedure {} differs", a.id);
    }
}

fn strip_raw(p: &Procedure) -> Procedure {
    Procedure {
        raw: String::new(),
        ..p.clone()
    }
}

/// Every source item is in the mirror as served. Extra live rows are allowed: a procedure
/// deleted while a pass ran may have been read before it went, and only a backfill notices.
pub fn assert_source_contained(mirror: &[Procedure], source: &[Procedure]) {
    let kept: Vec<Procedure> = mirror
        .iter()
        .filter(|m| source.iter().any(|s| s.id == m.id))
        .cloned()
        .collect();
    assert_same(&kept, source);
}

/// What a mirror has committed about its reading: the watermark, and the instants of the tie
/// groups it has recorded as not proven read completely.
pub struct Committed {
    pub watermark: Option<OffsetDateTime>,
    pub unproven: Vec<OffsetDateTime>,
}

pub async fn committed(store: &Store) -> Committed {
    let unproven = store.unproven_groups().await.unwrap();
    Committed {
        watermark: store.watermark().await.unwrap(),
        unproven: unproven.iter().map(|g| g.at).collect(),
    }
}

/// The stored watermark never runs ahead of the data written: every source procedure modified
/// at or before it is in the mirror, in that version or a newer one, except members of groups
/// recorded as unproven (docs/sync.md), which later passes read again.
pub fn assert_watermark_not_ahead(
    committed: &Committed,
    mirror: &[Procedure],
    source: &[Procedure],
    context: &str,
) {
    let Some(w) = committed.watermark else {
        return;
    };
    let source: Vec<Procedure> = source
        .iter()
        .filter(|s| !committed.unproven.contains(&s.updated_at))
        .cloned()
        .collect();
    let source = &source[..];
    let mirrored: HashMap<&str, &Procedure> = mirror.iter().map(|p| (p.id.as_str(), p)).collect();
    let missing: Vec<String> = source
        .iter()
        .filter(|s| s.updated_at <= w)
        .filter(|s| {
            mirrored
                .get(s.id.as_str())
                .is_none_or(|m| m.updated_at < s.updated_at)
        })
        .map(|s| format!("{} ({})", s.id, format_instant(s.updated_at)))
        .collect();
    assert!(
        missing.is_empty(),
        "{context}: the watermark {} runs ahead of the data: {} procedure(s) at or before it are \
         missing or older in the mirror: {:?}",
        format_instant(w),
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    for s in source.iter().filter(|s| s.updated_at <= w) {
        let m = mirrored[s.id.as_str()];
        if m.updated_at == s.updated_at {
            assert_same(std::slice::from_ref(m), std::slice::from_ref(s));
        }
    }
}

/// `KLARIFY_SYNC_LONG_TESTS=1` turns the fast variants of the randomized tests into long ones.
pub fn long_tests() -> bool {
    matches!(
        std::env::var("KLARIFY_SYNC_LONG_TESTS").as_deref(),
        Ok("1" | "true" | "yes")
    )
}

/// The seed of a randomized test, replayable with `KLARIFY_SYNC_TEST_SEED`.
pub fn seed(default: u64) -> u64 {
    std::env::var("KLARIFY_SYNC_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A pool on either backend for raw SQL, as a BI tool reads the mirror.
pub async fn any_pool(url: &str) -> Result<sqlx::AnyPool, sqlx::Error> {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(url).await
}

/// The one integer `sql` returns, read through a connection of its own.
pub async fn scalar(url: &SecretString, sql: &str) -> i64 {
    try_scalar(url, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// [`scalar`], or why it could not be read: no database, or no such table yet.
pub async fn try_scalar(url: &SecretString, sql: &str) -> Result<i64, sqlx::Error> {
    let pool = any_pool(url.expose_secret()).await?;
    let result = sqlx::query_as(sql).fetch_one(&pool).await;
    pool.close().await;
    result.map(|(n,)| n)
}

/// Past the plan and the first pages of every range, one request fails all its attempts (of the
/// test client's 4, with 8 readers) while the others go on: a parallel pass then fails with later
/// ranges written and the front one not finished. Call `clear_faults` after the pass.
pub fn fail_one_range_mid_pass(fake: &FakeKlarify) {
    fake.inject(Fault::Hang(Duration::ZERO), 40);
    fake.inject(
        Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        4 * 8,
    );
}

/// A name as hostile as the API may serve: quotes, a backslash, a line break and markup.
pub const HOSTILE_NAME: &str = "Evil \"quoted\" \\ back\nslash <script>alert('x')</script> & #1;";

/// Serves a copy of the source's first item under a new id, named [`HOSTILE_NAME`] and called
/// within the first item, so that it is drawn with an edge.
pub fn insert_hostile(fake: &FakeKlarify) {
    let mut item = fake.snapshot()[0].clone();
    item["called_within"] = serde_json::json!([item["name"].clone()]);
    item["id"] = "hostile-1".into();
    item["name"] = HOSTILE_NAME.into();
    fake.insert_raw(item);
}
