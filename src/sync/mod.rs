//! One sync pass: page through Klarify from the cursor (a large pass split into ranges of
//! `updated_at` read in parallel, `read`) and commit batches of pages with the cursor they
//! reach. The algorithm, and why it cannot skip a record, is in docs/sync.md.
//!
//! A pass is a plain async function returning a report, so `--once`, `--backfill`, the daemon
//! and the tests all call the same thing; the scheduler only decides when.

mod cursor;
mod read;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::klarify::{KlarifyClient, KlarifyError, Procedure, Rejected};
use crate::store::{
    LockGuard, LockKind, PageWrite, RunId, RunRecord, Store, StoreError, WriteStats,
};
use cursor::Frontier;
use read::{Event, Reader};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the stored watermark (less the overlap).
    Incremental,
    /// Everything, then deletion detection.
    Backfill,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Incremental => "incremental",
            Mode::Backfill => "backfill",
        }
    }
}

/// The `sync` config section, typed.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub overlap: Duration,
    pub max_delete_share: f64,
    pub tie_group_attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Klarify(#[from] KlarifyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "Klarify broke its paging promise: {0}; nothing past the last good page was committed"
    )]
    Unordered(String),
    #[error("the {size} procedures sharing updated_at {at} kept changing while being read ({attempts} attempts); the watermark stays before them and the next pass reads them again")]
    UnstableTieGroup {
        at: OffsetDateTime,
        size: u64,
        attempts: u32,
    },
    #[error("Klarify served a full page of items that cannot be understood (kept in rejected_items); the sync cannot move past them")]
    Stuck,
    #[error("stopped by a shutdown request; committed pages are kept and the next pass resumes from them")]
    Interrupted,
}

/// What a finished pass did.
#[derive(Debug, Clone)]
pub struct PassReport {
    pub run: RunId,
    pub mode: Mode,
    pub pages: u64,
    pub fetched: u64,
    pub stats: WriteStats,
    pub rejected: u64,
    pub deleted: u64,
    pub watermark_before: Option<OffsetDateTime>,
    pub watermark_after: Option<OffsetDateTime>,
    pub duration: Duration,
    /// Into an empty mirror, whose indexes were built once at the end.
    pub bulk_load: bool,
}

/// Runs one pass and records it in `sync_runs`.
pub async fn run_pass(
    client: &KlarifyClient,
    store: &Store,
    mode: Mode,
    options: &SyncOptions,
    shutdown: &CancellationToken,
) -> Result<PassReport, SyncError> {
    let progress = Progress::default();
    run_pass_observed(client, store, mode, options, shutdown, &progress).await
}

/// How far a pass has got, for a progress bar; updated as pages arrive.
#[derive(Debug, Default)]
pub struct Progress {
    /// `totalCount` of the pass's first page: for a backfill, every procedure.
    pub total: AtomicU64,
    /// Items fetched so far, re-reads included.
    pub fetched: AtomicU64,
}

/// [`run_pass`], reporting progress as it goes.
#[tracing::instrument(skip_all, fields(mode = mode.as_str(), run))]
pub async fn run_pass_observed(
    client: &KlarifyClient,
    store: &Store,
    mode: Mode,
    options: &SyncOptions,
    shutdown: &CancellationToken,
    progress: &Progress,
) -> Result<PassReport, SyncError> {
    let started = Instant::now();
    let lock = pass_lock(store, shutdown).await?;
    let result = locked_pass(client, store, mode, options, shutdown, progress, started).await;
    lock.release().await;
    result
}

/// Waits until no other process is in a pass on this database.
async fn pass_lock(store: &Store, shutdown: &CancellationToken) -> Result<LockGuard, SyncError> {
    let mut told = false;
    loop {
        if let Some(guard) = store.try_lock(LockKind::Pass).await? {
            return Ok(guard);
        }
        if !told {
            tracing::info!(
                "another klarify-sync is in a pass on this database; waiting for it to finish"
            );
            told = true;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.cancelled() => return Err(SyncError::Interrupted),
        }
    }
}

async fn locked_pass(
    client: &KlarifyClient,
    store: &Store,
    mode: Mode,
    options: &SyncOptions,
    shutdown: &CancellationToken,
    progress: &Progress,
    started: Instant,
) -> Result<PassReport, SyncError> {
    // What a bulk load killed before its end left out comes first: the pass may not be one.
    store.restore_deferred().await?;
    let bulk = store.defer_for_bulk_load().await?;
    if bulk {
        tracing::info!("the mirror is empty: its indexes are built once, when this pass ends");
    }
    let watermark = store.watermark().await?;
    let run = store.begin_run(mode.as_str(), watermark).await?;
    tracing::Span::current().record("run", run);
    let start = match mode {
        Mode::Backfill => None,
        Mode::Incremental => watermark.map(|w| w - options.overlap),
    };
    let reader = Reader::new(client, options, progress, shutdown);
    let mut pass = Pass {
        store,
        run,
        // Deletions are what was stored before the pass and not served in it; after a bulk
        // load there is no such procedure.
        track_seen: mode == Mode::Backfill && !bulk,
        stored: watermark,
        stats: WriteStats::default(),
        frontier: Frontier::new(&[start]),
        pending: Pending::default(),
        writing: None,
    };
    let outcome = pass.run(&reader, start).await;
    // Also after a failure: BI users query what was committed, and the next pass is no bulk load.
    let outcome = if bulk {
        let restored = store.restore_deferred().await;
        outcome.and(restored.map(|_| ()).map_err(SyncError::from))
    } else {
        outcome
    };
    let deleted = match (&outcome, pass.track_seen) {
        (Ok(()), true) => {
            store
                .mark_unseen_deleted(run, options.max_delete_share)
                .await
        }
        _ => Ok(0),
    };
    let outcome = outcome.and_then(|()| deleted.map_err(SyncError::from));
    let record = RunRecord {
        outcome: match &outcome {
            Ok(_) => "succeeded",
            Err(SyncError::Interrupted) => "interrupted",
            Err(_) => "failed",
        },
        pages: reader.pages.into_inner(),
        fetched: reader.fetched.into_inner(),
        stats: pass.stats,
        rejected: reader.rejected.into_inner(),
        deleted: *outcome.as_ref().unwrap_or(&0),
        watermark_after: pass.stored,
        error: outcome.as_ref().err().map(ToString::to_string),
    };
    if let Err(e) = store.finish_run(run, &record).await {
        tracing::warn!(error = %e, "could not record the end of the pass in sync_runs");
    }
    crate::metrics::record_pass(mode, &record, started.elapsed());
    let deleted = outcome?;
    Ok(PassReport {
        run,
        mode,
        pages: record.pages,
        fetched: record.fetched,
        stats: record.stats,
        rejected: record.rejected,
        deleted,
        watermark_before: watermark,
        watermark_after: record.watermark_after,
        duration: started.elapsed(),
        bulk_load: bulk,
    })
}

/// The writing side of a pass in flight: gathers what the reader sends into batches and
/// commits each with the watermark the ranges read so far allow.
struct Pass<'a> {
    store: &'a Store,
    run: RunId,
    /// Record the ids served, for deletion detection.
    track_seen: bool,
    /// The watermark as committed; it only ever moves forward.
    stored: Option<OffsetDateTime>,
    stats: WriteStats,
    /// How far each range has been read, as far as received.
    frontier: Frontier,
    /// Items received but not yet committed.
    pending: Pending,
    /// The write of earlier items, running while more are received.
    writing: Option<Writing>,
}

/// A batch being written: what it did, and the watermark it committed.
type Writing = tokio::task::JoinHandle<Result<(WriteStats, Option<OffsetDateTime>), StoreError>>;

/// How many items gather before they are committed together. A batch touches the same B-tree
/// pages (random ids) for all its items, so bigger batches write fewer pages per item: 3,000
/// backfills about a third faster than 1,000 (docs/performance.md); the price is memory, two
/// batches of items in flight, and on SQLite the pages a batch dirties.
const COMMIT_ITEMS: usize = 3000;

/// Events (a page each, mostly) queued between the readers and the writer: enough to keep the
/// readers busy during a commit, few enough to bound memory while the database is slow.
const QUEUED_EVENTS: usize = 32;

#[derive(Default)]
struct Pending {
    items: Vec<Procedure>,
    rejected: Vec<Rejected>,
}

impl Pass<'_> {
    /// Reads and writes at once until the reader is done, then commits whatever is still
    /// queued, also after a failure: what was read is good data, and the watermark that
    /// comes with it is still behind anything unread.
    async fn run(
        &mut self,
        reader: &Reader<'_>,
        start: Option<OffsetDateTime>,
    ) -> Result<(), SyncError> {
        let walked = async {
            let plan = reader.plan(start).await?;
            self.frontier = Frontier::new(&plan.starts);
            let (events, received) = mpsc::channel(QUEUED_EVENTS);
            let (read, written) = tokio::join!(reader.read(plan, events), self.receive(received));
            // A failed write hangs up on the reader: its error is the cause.
            written.and(read)
        }
        .await;
        let flushed = self.flush().await;
        let settled = self.settle().await;
        walked.and(flushed).and(settled)
    }

    async fn receive(&mut self, mut events: mpsc::Receiver<Event>) -> Result<(), SyncError> {
        while let Some(event) = events.recv().await {
            match event {
                Event::Items { items, rejected } => {
                    self.pending.items.extend(items);
                    self.pending.rejected.extend(rejected);
                    if self.pending.items.len() + self.pending.rejected.len() >= COMMIT_ITEMS {
                        self.flush().await?;
                    }
                }
                Event::Reached {
                    range,
                    at,
                    finished,
                } => self.frontier.reach(range, at, finished),
            }
        }
        Ok(())
    }

    /// Starts writing the queued items in one transaction, with the watermark everything
    /// received so far allows, when that moves the stored one forward. Committing many pages at
    /// once costs the database far less than one transaction a page (fewer WAL writes of the
    /// same index pages); a kill loses at most the queued items, which the watermark then
    /// still lies before. The write runs while more is received; writes never overlap, so they
    /// commit in order.
    async fn flush(&mut self) -> Result<(), SyncError> {
        self.settle().await?;
        let pending = std::mem::take(&mut self.pending);
        let forward = self
            .frontier
            .watermark()
            .filter(|w| self.stored.is_none_or(|s| *w > s));
        if pending.items.is_empty() && pending.rejected.is_empty() && forward.is_none() {
            return Ok(());
        }
        let (store, run, track_seen) = (self.store.clone(), self.run, self.track_seen);
        self.writing = Some(tokio::spawn(async move {
            let page = PageWrite {
                run,
                items: &pending.items,
                rejected: &pending.rejected,
                watermark: forward,
                track_seen,
            };
            store.write_page(&page).await.map(|stats| (stats, forward))
        }));
        Ok(())
    }

    /// Waits for the write in flight, if any, and takes note of what it committed.
    async fn settle(&mut self) -> Result<(), SyncError> {
        let Some(writing) = self.writing.take() else {
            return Ok(());
        };
        let (stats, forward) = writing.await.expect("a page write does not panic")?;
        self.stats += stats;
        if forward.is_some() {
            self.stored = forward;
        }
        Ok(())
    }
}

impl PassReport {
    /// The one line a pass leaves in the log.
    pub fn log(&self) {
        tracing::info!(
            run = self.run,
            mode = self.mode.as_str(),
            duration_ms = self.duration.as_millis() as u64,
            pages = self.pages,
            fetched = self.fetched,
            inserted = self.stats.inserted,
            updated = self.stats.updated,
            unchanged = self.stats.unchanged,
            deleted = self.deleted,
            rejected = self.rejected,
            watermark = self.watermark_after.map(crate::klarify::format_instant),
            bulk_load = self.bulk_load,
            "sync pass succeeded"
        );
    }
}
