//! The HTTP side: `/healthz`, `/readyz`, `/metrics` and the status page (`/`, with the call
//! graph's neighbourhoods at `/graph.svg`), served within limits that keep any number of
//! clients, idle or slow, from taking what the sync needs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{FromRef, Query, State};
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
use crate::schedule::Cron;
use crate::store::{Store, StoreError};
use crate::sync::SyncError;

/// Why `/readyz` answers 503: its `reason`, a stable name for scripts and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(into = "&'static str")]
pub enum Reason {
    KeyRejected,
    ApiUnreachable,
    ApiInconsistent,
    DatabaseDown,
    DatabaseError,
    SchemaMismatch,
    ShuttingDown,
    /// A pass panicked: a bug.
    InternalError,
    /// Another instance leads.
    Standby,
    NeverSynced,
    Stale,
    UnprovenTieGroup,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyRejected => "key_rejected",
            Self::ApiUnreachable => "api_unreachable",
            Self::ApiInconsistent => "api_inconsistent",
            Self::DatabaseDown => "database_down",
            Self::DatabaseError => "database_error",
            Self::SchemaMismatch => "schema_mismatch",
            Self::ShuttingDown => "shutting_down",
            Self::InternalError => "internal_error",
            Self::Standby => "standby",
            Self::NeverSynced => "never_synced",
            Self::Stale => "stale",
            Self::UnprovenTieGroup => "unproven_tie_group",
        }
    }
}

impl From<Reason> for &'static str {
    fn from(reason: Reason) -> Self {
        reason.as_str()
    }
}

/// What this instance does about the leader lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// It has not tried to take the lock yet.
    #[default]
    Starting,
    /// It holds the lock: it runs the schedule.
    Leader,
    /// Another instance holds it; this one takes over if that one stops.
    Standby,
}

/// A 503 from `/readyz`: why, and the body that says so.
struct NotReady {
    reason: Reason,
    body: serde_json::Value,
}

impl NotReady {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        let body = json!({ "reason": reason, "detail": detail.into() });
        Self { reason, body }
    }

    /// The body with one more field.
    fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.body[key] = json!(value);
        self
    }
}

/// What the sync loop last reported; `/readyz` judges it.
#[derive(Debug, Default)]
struct SyncHealth {
    last_success: Option<OffsetDateTime>,
    /// Why the last pass failed, and its message.
    failure: Option<(Reason, String)>,
    /// When passes started failing, for "API unreachable since T".
    failing_since: Option<OffsetDateTime>,
    /// When the pass running now started.
    running_since: Option<OffsetDateTime>,
    role: Role,
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

    /// A pass starts: this instance leads.
    pub fn pass_started(&self) {
        let mut h = self.health.lock().expect("health lock poisoned");
        h.running_since = Some(OffsetDateTime::now_utc());
        h.role = Role::Leader;
    }

    pub fn pass_succeeded(&self) {
        let mut h = self.health.lock().expect("health lock poisoned");
        h.running_since = None;
        h.last_success = Some(OffsetDateTime::now_utc());
        h.failure = None;
        h.failing_since = None;
    }

    pub fn pass_failed(&self, error: &SyncError) {
        self.not_ready(reason_code(error), error.to_string());
    }

    pub fn pass_panicked(&self, message: &str) {
        self.not_ready(Reason::InternalError, message.to_owned());
    }

    /// Another instance holds the leader lock: this one waits to take over.
    pub fn standby(&self) {
        let detail =
            "another klarify-sync instance leads on this database; this one takes over if it stops";
        self.not_ready(Reason::Standby, detail.to_owned());
        self.health.lock().expect("health lock poisoned").role = Role::Standby;
    }

    fn not_ready(&self, reason: Reason, detail: String) {
        let mut h = self.health.lock().expect("health lock poisoned");
        h.running_since = None;
        h.failure = Some((reason, detail));
        h.failing_since.get_or_insert_with(OffsetDateTime::now_utc);
    }

    async fn check(&self) -> Result<serde_json::Value, NotReady> {
        let Some(store) = self.store.get() else {
            let detail = self
                .health
                .lock()
                .expect("health lock poisoned")
                .failure
                .clone();
            let detail =
                detail.map_or_else(|| "the database is not open yet".to_owned(), |(_, d)| d);
            return Err(NotReady::new(Reason::DatabaseDown, detail));
        };
        let ping = tokio::time::timeout(Duration::from_secs(2), async {
            store.ping().await?;
            store.unproven_groups().await
        })
        .await;
        let unproven = match ping {
            Ok(Ok(unproven)) => unproven,
            Ok(Err(e @ StoreError::Schema { .. })) => {
                return Err(NotReady::new(Reason::SchemaMismatch, e.to_string()))
            }
            Ok(Err(e)) => return Err(NotReady::new(Reason::DatabaseDown, e.to_string())),
            Err(_) => {
                let detail = "the database did not answer within 2s";
                return Err(NotReady::new(Reason::DatabaseDown, detail));
            }
        };
        // Read under changes, a group is proven by a later pass; one that stays unproven this
        // long means members may be missing from the mirror while passes succeed.
        let oldest = unproven.iter().map(|g| g.recorded_at).min();
        let overdue = oldest.is_some_and(|at| OffsetDateTime::now_utc() - at > self.max_unproven);
        if overdue {
            let detail = format!("a group of procedures sharing one updated_at has not been proven read completely for longer than health.max_unproven_secs ({}s): members may be missing from the mirror; see `klarify-sync status`", self.max_unproven.as_secs());
            return Err(NotReady::new(Reason::UnprovenTieGroup, detail)
                .with("unproven_tie_groups", unproven.len())
                .with("oldest_unproven_since", oldest.map(format_instant)));
        }
        let h = self.health.lock().expect("health lock poisoned");
        let last_success = h.last_success.map(format_instant);
        if let Some((reason, detail)) = &h.failure {
            return Err(NotReady::new(*reason, detail.as_str())
                .with("since", h.failing_since.map(format_instant))
                .with("last_success", last_success));
        }
        let Some(at) = h.last_success else {
            let detail = "no sync pass has succeeded yet";
            return Err(NotReady::new(Reason::NeverSynced, detail));
        };
        if OffsetDateTime::now_utc() - at > self.max_staleness {
            let detail = format!(
                "the last successful pass is older than health.max_staleness_secs ({}s)",
                self.max_staleness.as_secs()
            );
            return Err(NotReady::new(Reason::Stale, detail).with("last_success", last_success));
        }
        Ok(json!({
            "status": "ready",
            "last_success": last_success,
            "unproven_tie_groups": unproven.len(),
        }))
    }
}

/// Why the last pass failed, for `/readyz`.
fn reason_code(error: &SyncError) -> Reason {
    match error {
        SyncError::Klarify(KlarifyError::KeyRejected) => Reason::KeyRejected,
        SyncError::Klarify(_) => Reason::ApiUnreachable,
        SyncError::Store(StoreError::Connect { .. }) => Reason::DatabaseDown,
        SyncError::Store(_) => Reason::DatabaseError,
        SyncError::Unordered(_) | SyncError::Stuck | SyncError::TooManyRequests => {
            Reason::ApiInconsistent
        }
        SyncError::WriteAborted(_) => Reason::DatabaseError,
        SyncError::Interrupted => Reason::ShuttingDown,
    }
}

pub fn router(readiness: Readiness, page: PageSettings) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .route("/graph.svg", get(graph_svg))
        .with_state(AppState {
            readiness,
            page: Arc::new(page),
        })
}

/// What the status page shows of the settings, and how it draws graphs.
#[derive(Debug, Clone)]
pub struct PageSettings {
    /// The schedule as the daemon runs it.
    pub cron: Cron,
    pub backfill_cron: Option<Cron>,
    /// `sync.max_future_skew_secs`, for the count of future-dated procedures `status` shows.
    pub max_future_skew: Duration,
    /// Graphviz's `dot`, looked up on PATH unless a path is given.
    pub dot: std::path::PathBuf,
    /// A `dot` that runs longer is stopped: a picture is not worth a stuck request.
    pub dot_timeout: Duration,
}

impl PageSettings {
    pub fn new(cron: Cron, backfill_cron: Option<Cron>, max_future_skew: Duration) -> Self {
        Self {
            cron,
            backfill_cron,
            max_future_skew,
            dot: "dot".into(),
            dot_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
    page: Arc<PageSettings>,
}

impl FromRef<AppState> for Readiness {
    fn from_ref(state: &AppState) -> Self {
        state.readiness.clone()
    }
}

/// The page and the SVG show names the API served: nothing on them may run or load anything.
const PAGE_POLICY: (header::HeaderName, &str) = (
    header::CONTENT_SECURITY_POLICY,
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
);

async fn status_page(State(s): State<AppState>) -> Response {
    let now = OffsetDateTime::now_utc();
    let readiness = s.readiness.check().await.map(|_| ()).map_err(|not| {
        let detail = not.body["detail"].as_str().unwrap_or_default().to_owned();
        (not.reason, detail)
    });
    let mirror = match s.readiness.store.get() {
        None => Err("the database is not open yet".to_owned()),
        Some(store) => {
            let read = store.status(20, now + s.page.max_future_skew);
            match tokio::time::timeout(Duration::from_secs(2), read).await {
                Ok(Ok(status)) => Ok(status),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the database did not answer within 2s".to_owned()),
            }
        }
    };
    let (role, syncing_since) = {
        let h = s.readiness.health.lock().expect("health lock poisoned");
        (h.role, h.running_since)
    };
    let live = crate::status::Live {
        readiness,
        role,
        syncing_since,
        cron: &s.page.cron,
        backfill_cron: s.page.backfill_cron.as_ref(),
        now,
    };
    let html = crate::status::render_html(mirror.as_ref().map_err(String::as_str), &live);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            PAGE_POLICY,
        ],
        html,
    )
        .into_response()
}

#[derive(Debug, serde::Deserialize)]
struct GraphQuery {
    around: String,
    depth: Option<usize>,
}

/// Bounds on a neighbourhood drawn for the page: Graphviz's time grows fast with the nodes.
const MAX_DEPTH: usize = 4;
const MAX_NODES: usize = 300;

#[derive(Debug, thiserror::Error)]
enum PageError {
    #[error("the database is not open yet")]
    NotConnected,
    #[error(transparent)]
    Graph(#[from] crate::graph::GraphError),
    #[error("Graphviz is not installed where klarify-sync runs: apt-get install graphviz (or run `klarify-sync graph --around NAME | dot -Tsvg` where it is)")]
    NoDot,
    #[error("Graphviz's dot failed: {0}")]
    Dot(String),
    #[error("Graphviz's dot took longer than {0:?}: ask for fewer calls around")]
    DotTimeout(Duration),
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        use crate::graph::GraphError;
        let status = match &self {
            PageError::NotConnected | PageError::Graph(GraphError::Store(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            PageError::Graph(GraphError::NoSuchName(_)) => StatusCode::NOT_FOUND,
            PageError::NoDot => StatusCode::NOT_IMPLEMENTED,
            PageError::Dot(_) => StatusCode::INTERNAL_SERVER_ERROR,
            PageError::DotTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        let html = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>klarify-sync: call graph</title></head>\
             <body><p>{}</p><p><a href=\"/\">Back to the status page</a></p></body></html>\n",
            crate::status::esc(&self.to_string())
        );
        (
            status,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                PAGE_POLICY,
            ],
            html,
        )
            .into_response()
    }
}

async fn graph_svg(
    State(s): State<AppState>,
    Query(q): Query<GraphQuery>,
) -> Result<Response, PageError> {
    let store = s.readiness.store.get().ok_or(PageError::NotConnected)?;
    let options = crate::graph::Options {
        around: Some((q.around, q.depth.unwrap_or(2).clamp(1, MAX_DEPTH))),
        max_nodes: Some(MAX_NODES),
        ..crate::graph::Options::default()
    };
    let dot = crate::graph::draw(store, &options).await?;
    let svg = run_dot(&s.page, dot).await?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml"), PAGE_POLICY], svg).into_response())
}

/// `dot -Tsvg` over `source`, stopped after the page's timeout.
async fn run_dot(page: &PageSettings, source: String) -> Result<Vec<u8>, PageError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(&page.dot)
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => PageError::NoDot,
            _ => PageError::Dot(e.to_string()),
        })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let ran = tokio::time::timeout(page.dot_timeout, async move {
        // dot reads all of its input before it writes: no deadlock between the two pipes.
        stdin.write_all(source.as_bytes()).await?;
        drop(stdin);
        child.wait_with_output().await
    })
    .await
    .map_err(|_| PageError::DotTimeout(page.dot_timeout))?
    .map_err(|e| PageError::Dot(e.to_string()))?;
    if !ran.status.success() {
        let stderr = String::from_utf8_lossy(&ran.stderr);
        return Err(PageError::Dot(format!("{}: {}", ran.status, stderr.trim())));
    }
    Ok(ran.stdout)
}

async fn readyz(State(r): State<Readiness>) -> Response {
    match r.check().await {
        Ok(body) => (StatusCode::OK, Json(body)).into_response(),
        Err(NotReady { mut body, .. }) => {
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
