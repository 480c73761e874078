//! An in-process stand-in for the Klarify Integration API (`GET /api/procedures`).
//!
//! Integration tests, benchmarks and `--demo` need a server that behaves like the vendor's
//! documented one, including the parts the docs only warn about: data changing between
//! pages, ties in `updated_at`, unstable tie order, malformed items and flaky responses.
//! The handle is the control panel: tests change the data and queue faults through it
//! while a client talks HTTP to the same server.

mod org;
mod server;
mod state;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use org::Organisation;
use state::Dataset;

/// How the fake behaves from the start; faults and churn are set later on the handle.
#[derive(Clone)]
pub struct FakeOptions {
    pub access_key: String,
    /// Added to every response, to make paging cost something in benchmarks.
    pub latency: Duration,
    /// Seeds the choice of items that churn edits and deletes.
    pub seed: u64,
    /// When true, items with equal sort keys come back in a new order on every request.
    pub unstable_ties: bool,
    /// Serves at most this many items per page, whatever `pageSize` asks for, and counts pages
    /// in that size, as a server that silently caps its page size would.
    pub max_page_size: Option<u64>,
}

/// Written out so that the key never reaches a log line, even a test key.
impl std::fmt::Debug for FakeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeOptions")
            .field("access_key", &"<redacted>")
            .field("latency", &self.latency)
            .field("seed", &self.seed)
            .field("unstable_ties", &self.unstable_ties)
            .field("max_page_size", &self.max_page_size)
            .finish()
    }
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            access_key: "test-key".to_string(),
            latency: Duration::ZERO,
            seed: 1,
            unstable_ties: false,
            max_page_size: None,
        }
    }
}

/// A way for one request to go wrong; see `FakeKlarify::inject`.
#[derive(Clone, Debug)]
pub enum Fault {
    /// This status with a small JSON body; `Retry-After` is sent when given.
    Status {
        status: u16,
        retry_after_secs: Option<u64>,
    },
    /// Answers normally, but only after this long (or at shutdown).
    Hang(Duration),
    /// A 200 whose JSON body is cut in half.
    Truncated,
    /// A 200 with an HTML body, as from a misconfigured proxy.
    NotJson,
    /// A 200 of exactly `bytes` bytes that starts like a page and never ends.
    Huge { bytes: usize },
    /// The normal page with `hasNext` inverted.
    LyingHasNext,
}

/// One round of changes to the data set.
#[derive(Clone, Debug, Default)]
pub struct Churn {
    /// Existing items that get a new `updated_at` and a changed status or name.
    pub edits: usize,
    /// New items.
    pub inserts: usize,
    /// Items removed without trace, as the API has no deletion feed.
    pub deletes: usize,
    /// All mutations of one application share one timestamp, like a bulk edit.
    pub bulk: bool,
}

/// A running fake server on `127.0.0.1`; clones control the same server.
#[derive(Clone)]
pub struct FakeKlarify {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

/// State shared by the handle and the request handler.
struct Inner {
    control: Mutex<Control>,
    access_key: String,
    unstable_ties: bool,
    max_page_size: Option<u64>,
    latency_nanos: AtomicU64,
    answered: AtomicU64,
    in_flight: AtomicU64,
    /// The most requests ever in flight at once: how parallel a client really was.
    max_in_flight: AtomicU64,
    /// Flips to true once to stop the server, hanging requests and background churn.
    stop: watch::Sender<bool>,
    server: Mutex<Option<JoinHandle<()>>>,
}

/// Everything a request may change, under one lock so that a churn is never half-seen.
struct Control {
    data: Dataset,
    faults: VecDeque<Fault>,
    scheduled: Option<ScheduledChurn>,
}

struct ScheduledChurn {
    every: u64,
    churn: Churn,
    /// Requests counted since the schedule was set, so tests need not know earlier traffic.
    arrived: u64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Control> {
        // A test that panicked while holding the lock must not take every other test down.
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bookkeeping at the moment a request arrives: its fault, and any scheduled churn,
    /// which is applied before the request reads the data.
    fn arrive(&self) -> Option<Fault> {
        let mut control = self.lock();
        let Control {
            data,
            faults,
            scheduled,
        } = &mut *control;
        let fault = faults.pop_front();
        if let Some(s) = scheduled {
            s.arrived += 1;
            if s.arrived % s.every == 0 {
                tracing::debug!(churn = ?s.churn, "fake Klarify: scheduled churn");
                data.apply(&s.churn);
            }
        }
        fault
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }
}

impl FakeKlarify {
    /// Binds an ephemeral loopback port and serves `org` from a background task.
    pub async fn start(org: Organisation, opts: FakeOptions) -> std::io::Result<FakeKlarify> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let inner = Arc::new(Inner {
            control: Mutex::new(Control {
                data: Dataset::new(org, opts.seed),
                faults: VecDeque::new(),
                scheduled: None,
            }),
            access_key: opts.access_key,
            unstable_ties: opts.unstable_ties,
            max_page_size: opts.max_page_size,
            latency_nanos: AtomicU64::new(nanos(opts.latency)),
            answered: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            stop,
            server: Mutex::new(None),
        });
        let task = tokio::spawn(server::run(listener, inner.clone(), stopped));
        *inner.server.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(FakeKlarify { inner, addr })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn access_key(&self) -> String {
        self.inner.access_key.clone()
    }

    /// Every item exactly as the API would serve it, ordered by id.
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        self.inner.lock().data.snapshot()
    }

    /// Requests answered so far, whatever their status; counted before the response is sent.
    pub fn requests(&self) -> u64 {
        self.inner.answered.load(Ordering::SeqCst)
    }

    /// The most requests that were ever in flight at once.
    pub fn max_in_flight(&self) -> u64 {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn set_latency(&self, d: Duration) {
        self.inner.latency_nanos.store(nanos(d), Ordering::Relaxed);
    }

    /// The next `times` requests get `fault`, after any faults already queued.
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut control = self.inner.lock();
        control.faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Drops the faults still queued: with requests in parallel, a test cannot tell how many of
    /// them a failing pass used up.
    pub fn clear_faults(&self) {
        self.inner.lock().faults.clear();
    }

    /// Applies `churn` just before serving every `n_requests`-th request from now; 0 stops it.
    pub fn churn_every(&self, n_requests: u64, churn: Churn) {
        self.inner.lock().scheduled = (n_requests > 0).then_some(ScheduledChurn {
            every: n_requests,
            churn,
            arrived: 0,
        });
    }

    pub fn apply(&self, churn: &Churn) {
        self.inner.lock().data.apply(churn);
    }

    /// Gives the item a new `updated_at` and a changed status or name; unknown ids are ignored.
    pub fn edit(&self, id: &str) {
        if !self.inner.lock().data.edit(id) {
            tracing::debug!(id, "fake Klarify: no item to edit");
        }
    }

    pub fn delete(&self, id: &str) -> bool {
        self.inner.lock().data.delete(id)
    }

    /// Serves `item` as given, however malformed.
    pub fn insert_raw(&self, item: serde_json::Value) {
        self.inner.lock().data.insert_raw(item);
    }

    /// Serves `item` as given, dated by a clock that is not the server's (a placeholder date in
    /// the far future): the server's later edits are not dated after it.
    pub fn insert_misdated(&self, item: serde_json::Value) {
        self.inner.lock().data.insert_misdated(item);
    }

    /// Applies `churn` every `every` (first time after one period) until shutdown.
    pub fn spawn_background_churn(&self, every: Duration, churn: Churn) -> JoinHandle<()> {
        let inner = self.inner.clone();
        let mut stopped = inner.stop.subscribe();
        // A zero period would make the interval panic; a millisecond is as good as continuous.
        let every = every.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let start = tokio::time::Instant::now() + every;
            let mut ticks = tokio::time::interval_at(start, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = ticks.tick() => inner.lock().data.apply(&churn),
                    _ = stopped.wait_for(|stop| *stop) => break,
                }
            }
        })
    }

    /// Stops accepting, lets requests in flight finish (hangs are cut short), and returns.
    pub async fn shutdown(self) {
        self.inner.stop.send_replace(true);
        let task = self
            .inner
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut task) = task else {
            return; // another clone already shut it down
        };
        // A client that never reads a huge body could hold a connection open forever.
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            tracing::warn!("fake Klarify: connections still open after 5s, aborting");
            task.abort();
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
