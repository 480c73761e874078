//! The HTTP side: `/healthz`, `/readyz` and `/metrics`.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use time::OffsetDateTime;

use crate::klarify::{format_instant, KlarifyError};
use crate::store::{Store, StoreError};
use crate::sync::SyncError;

/// What the sync loop last reported; `/readyz` judges it.
#[derive(Debug, Default)]
struct SyncHealth {
    last_success: Option<OffsetDateTime>,
    /// The reason code and message of the last pass, when it failed.
    failure: Option<(&'static str, String)>,
    /// When passes started failing, for "API unreachable since T".
    failing_since: Option<OffsetDateTime>,
}

/// Shared between the sync loop (writer) and the HTTP handlers (readers).
#[derive(Clone)]
pub struct Readiness {
    health: Arc<Mutex<SyncHealth>>,
    /// Set once the daemon has opened the database.
    store: Arc<OnceLock<Store>>,
    max_staleness: Duration,
    max_unproven: Duration,
}

impl Readiness {
    pub fn new(max_staleness: Duration, max_unproven: Duration) -> Self {
        Self {
            health: Arc::default(),
            store: Arc::default(),
            max_staleness,
            max_unproven,
        }
    }

    pub fn connected(&self, store: Store) {
        let _ = self.store.set(store);
    }

    pub fn pass_succeeded(&self) {
        let mut h = self.health.lock().expect("health lock poisoned");
        h.last_success = Some(OffsetDateTime::now_utc());
        h.failure = None;
        h.failing_since = None;
    }

    pub fn pass_failed(&self, error: &SyncError) {
        self.not_ready(reason_code(error), error.to_string());
    }

    /// Another instance holds the leader lock: this one waits to take over.
    pub fn standby(&self) {
        let detail =
            "another klarify-sync instance leads on this database; this one takes over if it stops";
        self.not_ready("standby", detail.to_owned());
    }

    fn not_ready(&self, reason: &'static str, detail: String) {
        let mut h = self.health.lock().expect("health lock poisoned");
        h.failure = Some((reason, detail));
        h.failing_since.get_or_insert_with(OffsetDateTime::now_utc);
    }

    async fn check(&self) -> Result<serde_json::Value, serde_json::Value> {
        let Some(store) = self.store.get() else {
            let detail = self
                .health
                .lock()
                .expect("health lock poisoned")
                .failure
                .clone();
            let detail =
                detail.map_or_else(|| "the database is not open yet".to_owned(), |(_, d)| d);
            return Err(json!({"reason": "database_down", "detail": detail}));
        };
        let ping = tokio::time::timeout(Duration::from_secs(2), async {
            store.ping().await?;
            store.unproven_groups().await
        })
        .await;
        let unproven = match ping {
            Ok(Ok(unproven)) => unproven,
            Ok(Err(e @ StoreError::Schema { .. })) => {
                return Err(json!({"reason": "schema_mismatch", "detail": e.to_string()}))
            }
            Ok(Err(e)) => return Err(json!({"reason": "database_down", "detail": e.to_string()})),
            Err(_) => {
                return Err(
                    json!({"reason": "database_down", "detail": "the database did not answer within 2s"}),
                )
            }
        };
        // Read under changes, a group is proven by a later pass; one that stays unproven this
        // long means members may be missing from the mirror while passes succeed.
        let oldest = unproven.iter().map(|g| &g.recorded_at).min().cloned();
        let overdue = unproven.iter().any(|g| {
            crate::klarify::parse_instant(&g.recorded_at)
                .is_ok_and(|at| OffsetDateTime::now_utc() - at > self.max_unproven)
        });
        if overdue {
            return Err(json!({
                "reason": "unproven_tie_group",
                "detail": format!("a group of procedures sharing one updated_at has not been proven read completely for longer than health.max_unproven_secs ({}s): members may be missing from the mirror; see `klarify-sync status`", self.max_unproven.as_secs()),
                "unproven_tie_groups": unproven.len(),
                "oldest_unproven_since": oldest,
            }));
        }
        let h = self.health.lock().expect("health lock poisoned");
        let last_success = h.last_success.map(format_instant);
        if let Some((reason, detail)) = &h.failure {
            return Err(json!({
                "reason": reason,
                "detail": detail,
                "since": h.failing_since.map(format_instant),
                "last_success": last_success,
            }));
        }
        let Some(at) = h.last_success else {
            return Err(
                json!({"reason": "never_synced", "detail": "no sync pass has succeeded yet"}),
            );
        };
        if OffsetDateTime::now_utc() - at > self.max_staleness {
            return Err(json!({
                "reason": "stale",
                "detail": format!("the last successful pass is older than health.max_staleness_secs ({}s)", self.max_staleness.as_secs()),
                "last_success": last_success,
            }));
        }
        Ok(json!({
            "status": "ready",
            "last_success": last_success,
            "unproven_tie_groups": unproven.len(),
        }))
    }
}

/// A stable, machine-readable name for why the last pass failed.
fn reason_code(error: &SyncError) -> &'static str {
    match error {
        SyncError::Klarify(KlarifyError::KeyRejected) => "key_rejected",
        SyncError::Klarify(_) => "api_unreachable",
        SyncError::Store(StoreError::Connect { .. }) => "database_down",
        SyncError::Store(_) => "database_error",
        SyncError::Unordered(_) | SyncError::Stuck | SyncError::TooManyRequests => {
            "api_inconsistent"
        }
        SyncError::WriteAborted(_) => "database_error",
        SyncError::Interrupted => "shutting_down",
    }
}

pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn readyz(State(r): State<Readiness>) -> Response {
    match r.check().await {
        Ok(body) => (StatusCode::OK, Json(body)).into_response(),
        Err(mut body) => {
            body["status"] = "unavailable".into();
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}
