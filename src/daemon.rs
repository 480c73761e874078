//! The daemon: the HTTP endpoints plus a sync loop that runs at start and then on the cron
//! schedule, until the shutdown future completes.
//!
//! One loop task runs every pass, so two passes never overlap; cron ticks only wake it, and
//! ticks that arrive during a pass coalesce into one follow-up pass. A pass that panics is a
//! failed pass; should the loop or the HTTP server stop all the same, the daemon ends with an
//! error, so that whatever supervises the process restarts it.

use std::any::Any;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::FutureExt;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinError;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;

use crate::http::{router, serve, HttpLimits, PageSettings, Readiness};
use crate::klarify::KlarifyClient;
use crate::schedule::Cron;
use crate::store::{LockGuard, LockKind, Store, StoreError};
use crate::sync::{run_pass, Mode, PassReport, SyncError, SyncOptions};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}; change http.listen (KLARIFY_SYNC__HTTP__LISTEN)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the scheduler failed: {0}")]
    Scheduler(#[from] JobSchedulerError),
    #[error("the HTTP server stopped: {0}; restart klarify-sync")]
    Http(String),
    #[error("the sync loop stopped: {0}; restart klarify-sync")]
    SyncLoop(String),
}

/// One sync pass as the daemon's loop runs it: [`SyncPass`] in production, while tests drive
/// the loop with passes that misbehave.
pub trait Pass: Send + Sync + 'static {
    fn run(
        &self,
        store: &Store,
        mode: Mode,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<PassReport, SyncError>> + Send;
}

/// [`run_pass`] against Klarify.
pub struct SyncPass {
    pub client: KlarifyClient,
    pub options: SyncOptions,
}

impl Pass for SyncPass {
    fn run(
        &self,
        store: &Store,
        mode: Mode,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<PassReport, SyncError>> + Send {
        run_pass(&self.client, store, mode, &self.options, shutdown)
    }
}

/// Everything the daemon needs, built from the settings by [`crate::app`].
pub struct Daemon<P = SyncPass> {
    pub pass: P,
    /// Opened (and migrated) by the daemon itself, retried until the database answers, so that
    /// a database that is down at start is reported by `/readyz` instead of ending the process.
    pub database_url: SecretString,
    pub max_connections: u32,
    pub cron: Cron,
    /// When to run a full reconciliation (a backfill, deletions included); `None`: never.
    pub backfill_cron: Option<Cron>,
    pub max_staleness: Duration,
    /// How long a tie group may stay unproven before `/readyz` says so.
    pub max_unproven: Duration,
    /// `sync.max_future_skew_secs`, for the status page's count of future-dated procedures.
    pub max_future_skew: Duration,
    /// First and longest wait before a failed pass is retried (the next cron tick may come first).
    pub retry_delays: (Duration, Duration),
    pub http: HttpLimits,
}

/// A daemon whose port is bound, so tests can ask for port 0 and learn the real one.
pub struct BoundDaemon<P = SyncPass> {
    daemon: Daemon<P>,
    listener: TcpListener,
}

impl<P: Pass> Daemon<P> {
    pub async fn bind(self, addr: SocketAddr) -> Result<BoundDaemon<P>, DaemonError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Bind { addr, source })?;
        Ok(BoundDaemon {
            daemon: self,
            listener,
        })
    }
}

impl<P: Pass> BoundDaemon<P> {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves and syncs until `shutdown` completes; then lets the page in flight finish (or
    /// drops an unfinished request) and returns. Ends early, with an error, should the sync loop
    /// or the HTTP server stop of their own accord.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DaemonError> {
        tracing::info!(addr = %self.local_addr(), "serving /healthz, /readyz and /metrics");
        let Daemon {
            pass,
            database_url,
            max_connections,
            cron,
            backfill_cron,
            max_staleness,
            max_unproven,
            max_future_skew,
            retry_delays,
            http: limits,
        } = self.daemon;
        // Installed before the first pass so its counters are not lost.
        crate::metrics::handle();
        let token = CancellationToken::new();
        let readiness = Readiness::new(max_staleness, max_unproven);

        let mut http = tokio::spawn(serve(
            self.listener,
            router(
                readiness.clone(),
                PageSettings::new(cron.clone(), backfill_cron.clone(), max_future_skew),
            ),
            limits,
            token.clone(),
        ));

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

        let mut sync = tokio::spawn({
            let token = token.clone();
            async move {
                let Some((store, probe)) = open_stores(
                    &database_url,
                    max_connections,
                    retry_delays,
                    &readiness,
                    &token,
                )
                .await
                else {
                    return;
                };
                readiness.connected(probe.clone());
                let looped = SyncLoop {
                    pass,
                    store: store.clone(),
                    readiness,
                    ticks,
                    backfill_due,
                    token,
                    retry_delays,
                };
                looped.run().await;
                store.close().await;
                probe.close().await;
            }
        });

        let failure = tokio::select! {
            () = shutdown => None,
            ended = &mut sync => Some(DaemonError::SyncLoop(ended_early(ended))),
            ended = &mut http => Some(DaemonError::Http(ended_early(ended))),
        };
        match &failure {
            None => tracing::info!("shutting down"),
            Some(e) => tracing::error!(error = %e, "shutting down"),
        }
        token.cancel();
        if !sync.is_finished() {
            let _ = sync.await;
        }
        scheduler.shutdown().await?;
        if !http.is_finished() {
            let _ = http.await;
        }
        failure.map_or(Ok(()), Err)
    }
}

/// Why a task that should have run until shutdown ended.
fn ended_early(joined: Result<(), JoinError>) -> String {
    match joined {
        Ok(()) => "it ended before shutdown".to_owned(),
        Err(e) => match e.try_into_panic() {
            Ok(payload) => format!("it panicked: {}", panic_message(&*payload)),
            Err(e) => e.to_string(),
        },
    }
}

/// The text a panic was raised with (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Opens the store the sync writes through and a second one of a single connection for
/// `/readyz`, so that no number of readiness probes, nor a probe stuck behind a lock, can take a
/// connection the sync needs. Retried with backoff; `None` when shut down first.
async fn open_stores(
    url: &SecretString,
    max_connections: u32,
    retry_delays: (Duration, Duration),
    readiness: &Readiness,
    token: &CancellationToken,
) -> Option<(Store, Store)> {
    let mut backoff = backoff(retry_delays);
    loop {
        let opened = match Store::open(url, max_connections).await {
            Ok(store) => Store::open(url, 1).await.map(|probe| (store, probe)),
            Err(e) => Err(e),
        };
        match opened {
            Ok(stores) => return Some(stores),
            Err(e) => {
                let wait = backoff.next().unwrap_or(retry_delays.1);
                tracing::error!(error = %e, retry_in = ?wait, "cannot open the database");
                readiness.pass_failed(&SyncError::Store(e));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = token.cancelled() => return None,
                }
            }
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

struct SyncLoop<P> {
    pass: P,
    store: Store,
    readiness: Readiness,
    ticks: Arc<Notify>,
    /// Set by the reconciliation schedule; the next pass is then a backfill.
    backfill_due: Arc<AtomicBool>,
    token: CancellationToken,
    retry_delays: (Duration, Duration),
}

impl<P: Pass> SyncLoop<P> {
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
        // The pass's state dies with it; what it committed is consistent by construction (the
        // watermark travels with each page), and the next pass marks its run `abandoned`.
        self.readiness.pass_started();
        let ran = AssertUnwindSafe(self.pass.run(&self.store, mode, &self.token))
            .catch_unwind()
            .await;
        let outcome = match ran {
            Ok(outcome) => outcome,
            Err(payload) => {
                let message = format!(
                    "the pass panicked, a bug in klarify-sync: {}",
                    panic_message(&*payload)
                );
                crate::metrics::record_panicked_pass(mode);
                self.readiness.pass_panicked(&message);
                if mode == Mode::Backfill {
                    self.backfill_due.store(true, Ordering::SeqCst);
                }
                return self.retry(backoff, &message);
            }
        };
        match outcome {
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
        self.retry(backoff, e)
    }

    fn retry(&self, backoff: &mut ExponentialBackoff, error: &dyn std::fmt::Display) -> Next {
        let wait = backoff.next().unwrap_or(self.retry_delays.1);
        tracing::error!(error = %error, retry_in = ?wait, "sync pass failed");
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
    cron: &Cron,
    ticks: &Arc<Notify>,
    due: Option<Arc<AtomicBool>>,
) -> Result<(), DaemonError> {
    let job = {
        let ticks = ticks.clone();
        Job::new_async(cron.as_str(), move |_, _| {
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
