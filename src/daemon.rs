//! The daemon: the HTTP endpoints plus a sync loop that runs at start and then on the cron
//! schedule, until the shutdown future completes.
//!
//! One loop task runs every pass, so two passes never overlap; cron ticks only wake it, and
//! ticks that arrive during a pass coalesce into one follow-up pass.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;

use crate::http::{router, Readiness};
use crate::klarify::KlarifyClient;
use crate::store::{LockGuard, LockKind, Store, StoreError};
use crate::sync::{run_pass, Mode, SyncError, SyncOptions};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}; change http.listen (KLARIFY_SYNC__HTTP__LISTEN)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the scheduler failed: {0}")]
    Scheduler(#[from] JobSchedulerError),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// Everything the daemon needs, built by `main` (or a test) from the settings.
pub struct Daemon {
    pub client: KlarifyClient,
    /// Opened (and migrated) by the daemon itself, retried until the database answers, so that
    /// a database that is down at start is reported by `/readyz` instead of ending the process.
    pub database_url: SecretString,
    pub max_connections: u32,
    pub options: SyncOptions,
    /// 6-field cron, as returned by [`crate::schedule::parse_cron`].
    pub cron: String,
    /// When to run a full reconciliation (a backfill, deletions included); `None`: never.
    pub backfill_cron: Option<String>,
    pub max_staleness: Duration,
    /// How long a tie group may stay unproven before `/readyz` says so.
    pub max_unproven: Duration,
    /// First and longest wait before a failed pass is retried (the next cron tick may come first).
    pub retry_delays: (Duration, Duration),
}

/// A daemon whose port is bound, so tests can ask for port 0 and learn the real one.
pub struct BoundDaemon {
    daemon: Daemon,
    listener: TcpListener,
}

impl Daemon {
    pub async fn bind(self, addr: SocketAddr) -> Result<BoundDaemon, DaemonError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Bind { addr, source })?;
        Ok(BoundDaemon {
            daemon: self,
            listener,
        })
    }
}

impl BoundDaemon {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves and syncs until `shutdown` completes; then lets the page in flight finish (or
    /// drops an unfinished request) and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DaemonError> {
        tracing::info!(addr = %self.local_addr(), "serving /healthz, /readyz and /metrics");
        let Daemon {
            client,
            database_url,
            max_connections,
            options,
            cron,
            backfill_cron,
            max_staleness,
            max_unproven,
            retry_delays,
        } = self.daemon;
        // Installed before the first pass so its counters are not lost.
        crate::metrics::handle();
        let token = CancellationToken::new();
        let readiness = Readiness::new(max_staleness, max_unproven);

        let http = {
            let token = token.clone();
            let app = router(readiness.clone());
            tokio::spawn(async move {
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(token.cancelled_owned())
                    .await
            })
        };

        let ticks = Arc::new(Notify::new());
        let backfill_due = Arc::new(AtomicBool::new(false));
        let mut scheduler = JobScheduler::new().await?;
        add_job(&mut scheduler, &cron, &ticks, None).await?;
        if let Some(backfill_cron) = &backfill_cron {
            add_job(
                &mut scheduler,
                backfill_cron,
                &ticks,
                Some(backfill_due.clone()),
            )
            .await?;
        }
        scheduler.start().await?;

        let sync = tokio::spawn({
            let token = token.clone();
            async move {
                let mut backoff = backoff(retry_delays);
                let store = loop {
                    match Store::open(&database_url, max_connections).await {
                        Ok(store) => break store,
                        Err(e) => {
                            let wait = backoff.next().unwrap_or(retry_delays.1);
                            tracing::error!(error = %e, retry_in = ?wait, "cannot open the database");
                            readiness.pass_failed(&SyncError::Store(e));
                            tokio::select! {
                                () = tokio::time::sleep(wait) => {}
                                () = token.cancelled() => return,
                            }
                        }
                    }
                };
                readiness.connected(store.clone());
                let looped = SyncLoop {
                    client,
                    store: store.clone(),
                    options,
                    readiness,
                    ticks,
                    backfill_due,
                    token,
                    retry_delays,
                };
                looped.run().await;
                store.close().await;
            }
        });

        shutdown.await;
        tracing::info!("shutting down");
        token.cancel();
        let _ = sync.await;
        scheduler.shutdown().await?;
        match http.await {
            Ok(result) => result.map_err(DaemonError::Http),
            Err(join) => Err(DaemonError::Http(std::io::Error::other(join))),
        }
    }
}

/// What the sync loop waits for after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The next cron tick.
    Tick,
    /// The next tick, or this long, whichever comes first: a failure is retried.
    RetryIn(Duration),
    /// Nothing: the daemon is shutting down.
    Stop,
}

struct SyncLoop {
    client: KlarifyClient,
    store: Store,
    options: SyncOptions,
    readiness: Readiness,
    ticks: Arc<Notify>,
    /// Set by the reconciliation schedule; the next pass is then a backfill.
    backfill_due: Arc<AtomicBool>,
    token: CancellationToken,
    retry_delays: (Duration, Duration),
}

impl SyncLoop {
    async fn run(self) {
        let mut backoff = self.backoff();
        let mut leader: Option<LockGuard> = None;
        loop {
            let next = match self.lead(&mut leader).await {
                Ok(true) => self.pass(&mut backoff).await,
                Ok(false) => Next::Tick,
                Err(SyncError::Interrupted) => Next::Stop,
                Err(e) => self.failed(&e, &mut backoff),
            };
            if next == Next::Stop {
                break;
            }
            let retry = async {
                match next {
                    Next::RetryIn(wait) => tokio::time::sleep(wait).await,
                    Next::Tick | Next::Stop => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.ticks.notified() => {}
                () = retry => {}
                () = self.token.cancelled() => break,
            }
        }
        if let Some(guard) = leader {
            guard.release().await;
        }
    }

    /// Makes sure this instance holds the leader lock; `false` while another one does.
    async fn lead(&self, leader: &mut Option<LockGuard>) -> Result<bool, SyncError> {
        if let Some(guard) = leader {
            if guard.is_held().await {
                return Ok(true);
            }
            tracing::warn!("lost the leader lock (database connection cut); taking it again");
            *leader = None;
        }
        match self.store.try_lock(LockKind::Leader).await? {
            Some(guard) => {
                tracing::info!("this instance leads: it runs the schedule");
                *leader = Some(guard);
                Ok(true)
            }
            None => {
                self.readiness.standby();
                Ok(false)
            }
        }
    }

    /// Runs one pass; says what to wait for before the next.
    async fn pass(&self, backoff: &mut ExponentialBackoff) -> Next {
        let mode = if self.backfill_due.swap(false, Ordering::SeqCst) {
            Mode::Backfill
        } else {
            Mode::Incremental
        };
        match run_pass(&self.client, &self.store, mode, &self.options, &self.token).await {
            Ok(report) => {
                // Ready before the log line says so: whoever reads the log may ask at once.
                self.readiness.pass_succeeded();
                report.log();
                *backoff = self.backoff();
                Next::Tick
            }
            Err(SyncError::Interrupted) => Next::Stop,
            Err(e) => {
                // A failed reconciliation is retried as one, except when it refused to delete:
                // that needs a person, and the next scheduled one will look again.
                let refused = matches!(e, SyncError::Store(StoreError::DeletionGuard { .. }));
                if mode == Mode::Backfill && !refused {
                    self.backfill_due.store(true, Ordering::SeqCst);
                }
                self.failed(&e, backoff)
            }
        }
    }

    fn failed(&self, e: &SyncError, backoff: &mut ExponentialBackoff) -> Next {
        self.readiness.pass_failed(e);
        let wait = backoff.next().unwrap_or(self.retry_delays.1);
        tracing::error!(error = %e, retry_in = ?wait, "sync pass failed");
        Next::RetryIn(wait)
    }

    fn backoff(&self) -> ExponentialBackoff {
        backoff(self.retry_delays)
    }
}

/// Retry delays after a failure: exponential from the first to the longest, with jitter.
fn backoff((first, longest): (Duration, Duration)) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(longest)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Adds a cron job that wakes the sync loop, first marking a backfill due when `due` is given.
async fn add_job(
    scheduler: &mut JobScheduler,
    cron: &str,
    ticks: &Arc<Notify>,
    due: Option<Arc<AtomicBool>>,
) -> Result<(), DaemonError> {
    let job = {
        let ticks = ticks.clone();
        Job::new_async(cron, move |_, _| {
            let (ticks, due) = (ticks.clone(), due.clone());
            Box::pin(async move {
                if let Some(due) = due {
                    due.store(true, Ordering::SeqCst);
                }
                ticks.notify_one();
            })
        })?
    };
    let id = scheduler.add(job).await?;
    if let Ok(Some(next)) = scheduler.next_tick_for_job(id).await {
        tracing::info!(%cron, next = %next, "scheduled");
    }
    Ok(())
}
