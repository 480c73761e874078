//! The HTTP side: `/healthz`, `/readyz` and `/metrics`, served within limits that keep any
//! number of clients, idle or slow, from taking what the sync needs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutLayer;

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
    /// Set once the daemon has opened the database: a store of its own, not the sync's.
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

    pub fn pass_panicked(&self, message: &str) {
        self.not_ready("internal_error", message.to_owned());
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

/// What the HTTP server allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A client must send a request's headers within this long of connecting or of its previous
    /// response, or it is disconnected.
    pub header_read_timeout: Duration,
    /// A request not answered within this long is answered 408.
    pub request_timeout: Duration,
    /// Connections served at once. A new one beyond this closes the oldest: the clients of these
    /// endpoints (health checks, scrapes) ask and leave, so the oldest is the likeliest to be
    /// idle, and new clients are never kept waiting behind idle ones.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_connections: 128,
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets the requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let app = app.layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        limits.request_timeout,
    ));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // Each open connection's way to be closed, by age.
    let open = Arc::new(Mutex::new(BTreeMap::<u64, CancellationToken>::new()));
    let connections = TaskTracker::new();
    for id in 0_u64.. {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to be freed.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        let evicted = CancellationToken::new();
        {
            let mut open = open
                .lock()
                .expect("no panics while the connections are listed");
            if open.len() >= limits.max_connections {
                if let Some((_, oldest)) = open.pop_first() {
                    oldest.cancel();
                }
            }
            open.insert(id, evicted.clone());
        }
        let connection =
            http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let (open, shutdown) = (open.clone(), shutdown.clone());
        connections.spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                // Dropping the connection closes it.
                () = evicted.cancelled() => {}
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            open.lock()
                .expect("no panics while the connections are listed")
                .remove(&id);
        });
    }
    connections.close();
    connections.wait().await;
}
