//! The application as validated [`Settings`] describe it, assembled here once for `main` and
//! the tests alike: the daemon ([`Application`]), one pass (`--once`, `--backfill`), and the
//! commands that only read (`status`, `graph`, `healthcheck`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::daemon::{BoundDaemon, Daemon, DaemonError, Pass, SyncPass};
use crate::graph::{self, GraphError};
use crate::http::HttpLimits;
use crate::klarify::{KlarifyClient, KlarifyError};
use crate::progress_bar::Bar;
use crate::store::{Status, Store, StoreError};
use crate::sync::{run_pass_observed, Mode, Progress, SyncError};

/// First and longest wait before the daemon retries a failed pass.
const RETRY_DELAYS: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(300));

/// What can end a command; each says its cause, and most what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Klarify(#[from] KlarifyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Unreachable(#[from] reqwest::Error),
    #[error("/healthz answered {0}")]
    Unhealthy(reqwest::StatusCode),
}

/// The daemon, its port bound: [`Application::local_addr`] is known before it runs.
pub struct Application<P = SyncPass>(BoundDaemon<P>);

impl Application {
    /// The daemon `settings` describe, listening on `http.listen` (port 0 picks a free one).
    pub async fn build(settings: &Settings) -> Result<Self, AppError> {
        Builder::new(settings, sync_pass(settings)?).build().await
    }
}

impl<P: Pass> Application<P> {
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Serves and syncs until `shutdown` completes (see [`BoundDaemon::run_until_stopped`]).
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), DaemonError> {
        self.0.run_until_stopped(shutdown).await
    }
}

/// [`Application::build`] with what the settings do not say: tests shorten the retry delays and
/// drive the daemon with passes that misbehave.
pub struct Builder<P = SyncPass> {
    daemon: Daemon<P>,
    listen: SocketAddr,
}

impl<P: Pass> Builder<P> {
    /// The daemon `settings` describe, running `pass` (production's is [`sync_pass`]).
    pub fn new(settings: &Settings, pass: P) -> Self {
        let daemon = Daemon {
            pass,
            database_url: database_url(settings),
            max_connections: settings.database.max_connections,
            cron: settings.schedule.cron.clone(),
            backfill_cron: settings.schedule.backfill_cron.clone(),
            max_staleness: Duration::from_secs(settings.health.max_staleness_secs),
            max_unproven: Duration::from_secs(settings.health.max_unproven_secs),
            max_future_skew: Duration::from_secs(settings.sync.max_future_skew_secs),
            retry_delays: RETRY_DELAYS,
            http: HttpLimits::default(),
        };
        Self {
            daemon,
            listen: settings.http.listen,
        }
    }

    /// First and longest wait before a failed pass is retried.
    pub fn retry_delays(mut self, first: Duration, longest: Duration) -> Self {
        self.daemon.retry_delays = (first, longest);
        self
    }

    pub async fn build(self) -> Result<Application<P>, AppError> {
        Ok(Application(self.daemon.bind(self.listen).await?))
    }
}

/// One sync pass against the Klarify `settings` name, with their options.
pub fn sync_pass(settings: &Settings) -> Result<SyncPass, AppError> {
    Ok(SyncPass {
        client: KlarifyClient::new(settings.client_settings())?,
        options: settings.sync_options(),
    })
}

/// `--once` and `--backfill`: one pass, logged; a backfill shows its progress on a terminal.
pub async fn run_once(
    settings: &Settings,
    mode: Mode,
    shutdown: &CancellationToken,
) -> Result<(), AppError> {
    let pass = sync_pass(settings)?;
    let store = Store::open(&database_url(settings), settings.database.max_connections).await?;
    let progress = Arc::new(Progress::default());
    let bar = (mode == Mode::Backfill && std::io::stdout().is_terminal())
        .then(|| Bar::spawn(progress.clone()));
    let report = run_pass_observed(
        &pass.client,
        &store,
        mode,
        &pass.options,
        shutdown,
        &progress,
    )
    .await;
    if let Some(bar) = bar {
        bar.finish();
    }
    report?.log();
    store.close().await;
    Ok(())
}

/// `klarify-sync status`: the mirror's state, read only, so that a mistyped `DATABASE_URL`
/// does not leave an empty mirror behind.
pub async fn status(settings: &Settings, passes: i64) -> Result<Status, AppError> {
    let store = Store::open_existing(&database_url(settings)).await?;
    let future_after =
        OffsetDateTime::now_utc() + Duration::from_secs(settings.sync.max_future_skew_secs);
    let status = store.status(passes, future_after).await?;
    store.close().await;
    Ok(status)
}

/// `klarify-sync graph`: the live procedures' call graph, read only like [`status`].
pub async fn draw_graph(settings: &Settings, options: &graph::Options) -> Result<String, AppError> {
    let store = Store::open_existing(&database_url(settings)).await?;
    let drawn = graph::draw(&store, options).await;
    store.close().await;
    Ok(drawn?)
}

/// `klarify-sync healthcheck`: asks the daemon the same settings configure for `/healthz`; a
/// wildcard listen address is reached on loopback.
pub async fn healthcheck(settings: &Settings) -> Result<(), AppError> {
    let mut addr = settings.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(AppError::Unhealthy(response.status()));
    }
    Ok(())
}

/// `--demo` has put its own database in the settings by the time they get here.
fn database_url(settings: &Settings) -> SecretString {
    settings.database_url(false)
}
