//! One sync pass: page through Klarify from the cursor (a large pass split into ranges of
//! `updated_at` read in parallel, `read`) and commit batches of pages with the cursor they
//! reach. The algorithm, and why it cannot skip a record, is in docs/sync.md.
//!
//! A pass is a plain async function returning a report, so `--once`, `--backfill`, the daemon
//! and the tests all call the same thing; the scheduler only decides when.

mod cursor;
mod pacing;
mod ranges;
mod read;
mod tie;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::klarify::{KlarifyClient, KlarifyError, Procedure, Rejected};
use crate::store::{
    LockGuard, LockKind, PageWrite, RunId, RunOutcome, RunRecord, Store, StoreError, UnprovenGroup,
    WriteStats,
};
use cursor::Frontier;
use pacing::EarlyBuild;
use read::{Event, Reader};

pub use crate::store::Mode;

/// The `sync` config section, typed.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub overlap: Duration,
    pub max_delete_share: f64,
    /// Rounds of reading a tie group (each: find its end, then read every page before it)
    /// before it is recorded as unproven and the pass moves on.
    pub tie_group_rounds: u32,
    /// The largest page asked for to read a tie group in one response (at most what
    /// `klarify.page_size` asks for turns it off).
    pub tie_group_page_size: u32,
    /// How far past the start of a pass the watermark may move: items dated later are stored,
    /// and read again by every pass until their time comes. At most `overlap`.
    pub max_future_skew: Duration,
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
    #[error("Klarify served more items that cannot be understood in a row than the largest page asked for holds (sync.tie_group_page_size); they are kept in rejected_items, and the sync cannot move past them")]
    Stuck,
    #[error("Klarify kept serving pages, more than its first totalCount can explain; what was read is committed and the next pass goes on from it")]
    TooManyRequests,
    #[error("a batch write stopped unexpectedly ({0}); nothing of it was committed, and the next pass reads it again")]
    WriteAborted(String),
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
    /// Into an empty mirror, whose indexes were built once, at the end.
    pub bulk_load: bool,
    /// A bulk load that Klarify kept waiting, which built the indexes its backend keeps cheaply
    /// as soon as that showed, while its readers waited (pacing.rs), rather than at its end.
    pub early_index_build: bool,
    /// Indexes and constraints the bulk load built at its end: all it deferred, or after an
    /// early build what that left (the foreign keys; on SQLite also the name- and id-keyed
    /// indexes).
    pub built_at_end: usize,
    /// Ranges split off while the pass read, for readers that had run out of ranges
    /// (ranges.rs).
    pub ranges_split: u64,
    /// Tie groups not proven read completely when the pass ended, earlier passes' included.
    pub unproven_groups: u64,
    /// Live procedures dated after the pass's start plus `sync.max_future_skew`.
    pub future_dated: u64,
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
        tracing::info!("the mirror is empty: its indexes are built once, when this pass ends (sooner when Klarify is the slower side)");
    }
    let watermark = store.watermark().await?;
    let unproven: Vec<OffsetDateTime> = store
        .unproven_groups()
        .await?
        .iter()
        .map(|g| g.at)
        .collect();
    let run = store.begin_run(mode, watermark).await?;
    tracing::Span::current().record("run", run);
    // The watermark never follows an item dated in the future (a vendor clock gone wrong, a
    // placeholder date): past this instant, edits made after the pass would hide below it.
    let ceiling = OffsetDateTime::now_utc() + options.max_future_skew;
    // One stored by an earlier version that did follow such an item is not trusted: the pass
    // reads everything once, writing only what changed, and stores a watermark it may.
    let trusted = watermark.filter(|w| *w <= ceiling);
    if trusted != watermark {
        tracing::warn!(
            watermark = watermark.map(crate::klarify::format_instant),
            "the stored watermark lies in the future; this pass reads every procedure again"
        );
    }
    let start = match mode {
        Mode::Backfill => None,
        Mode::Incremental => trusted.and_then(|w| w.checked_sub(options.overlap.try_into().ok()?)),
    };
    let reader = Reader::new(client, options, progress, shutdown);
    let mut pass = Pass {
        store,
        run,
        // Deletions are what was stored before the pass and not served in it; after a bulk
        // load there is no such procedure.
        track_seen: mode == Mode::Backfill && !bulk,
        stored: trusted,
        ceiling,
        newest_below_ceiling: None,
        stats: WriteStats::default(),
        frontier: Frontier::new(&[start]),
        pending: Pending::default(),
        writing: None,
        early_build: bulk.then(EarlyBuild::default),
        flushed_at: Instant::now(),
        early_index_build: false,
    };
    let outcome = pass.run(&reader, start, &unproven).await;
    // Also after a failure: BI users query what was committed, and the next pass is no bulk load.
    let (outcome, built_at_end) = if bulk {
        match store.restore_deferred().await {
            Ok(built) => (outcome, built),
            Err(e) => (outcome.and(Err(e.into())), 0),
        }
    } else {
        (outcome, 0)
    };
    let doubts = match &outcome {
        Ok(()) => Doubts::measure(store, ceiling).await,
        Err(_) => Ok(Doubts::default()),
    };
    let outcome = outcome.and_then(|()| doubts.map_err(SyncError::from));
    let deleted = match (&outcome, pass.track_seen) {
        // A member of a group not proven read may be missing from what the pass saw: marking
        // the unseen deleted waits for a backfill that proves every group.
        (Ok(doubts), true) if doubts.unproven_groups > 0 => {
            tracing::warn!(
                groups = doubts.unproven_groups,
                "deletions are not marked: a tie group was not proven read completely (docs/sync.md, \"Unproven groups\")"
            );
            Ok(0)
        }
        (Ok(_), true) => {
            store
                .mark_unseen_deleted(run, options.max_delete_share)
                .await
        }
        _ => Ok(0),
    };
    let outcome = outcome.and_then(|doubts| deleted.map(|n| (doubts, n)).map_err(SyncError::from));
    let record = RunRecord {
        outcome: match &outcome {
            Ok(_) => RunOutcome::Succeeded,
            Err(SyncError::Interrupted) => RunOutcome::Interrupted,
            Err(_) => RunOutcome::Failed,
        },
        pages: reader.pages.into_inner(),
        fetched: reader.fetched.into_inner(),
        stats: pass.stats,
        rejected: reader.rejected.into_inner(),
        deleted: outcome.as_ref().map_or(0, |(_, n)| *n),
        watermark_after: pass.stored,
        error: outcome.as_ref().err().map(ToString::to_string),
    };
    if let Err(e) = store.finish_run(run, &record).await {
        tracing::warn!(error = %e, "could not record the end of the pass in sync_runs");
    }
    crate::metrics::record_pass(mode, &record, started.elapsed());
    let (doubts, deleted) = outcome?;
    crate::metrics::record_doubts(doubts.unproven_groups, doubts.future_dated);
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
        early_index_build: pass.early_index_build,
        built_at_end,
        ranges_split: reader.splits.into_inner(),
        unproven_groups: doubts.unproven_groups,
        future_dated: doubts.future_dated,
    })
}

/// What a finished pass leaves unsure: groups not proven read completely, and procedures dated
/// past the ceiling, which the watermark does not follow.
#[derive(Debug, Default, Clone, Copy)]
struct Doubts {
    unproven_groups: u64,
    future_dated: u64,
}

impl Doubts {
    async fn measure(store: &Store, ceiling: OffsetDateTime) -> Result<Self, StoreError> {
        Ok(Self {
            unproven_groups: store.unproven_groups().await?.len() as u64,
            future_dated: store.future_dated(ceiling).await?,
        })
    }
}

/// The writing side of a pass in flight: gathers what the reader sends into batches and
/// commits each with the watermark the ranges read so far allow.
struct Pass<'a> {
    store: &'a Store,
    run: RunId,
    /// Record the ids for deletion detection (backfills).
    track_seen: bool,
    /// The watermark as committed; it only ever moves forward.
    stored: Option<OffsetDateTime>,
    /// The watermark never moves past this, whatever the items are dated.
    ceiling: OffsetDateTime,
    /// The newest item received that is not dated past the ceiling.
    newest_below_ceiling: Option<OffsetDateTime>,
    stats: WriteStats,
    /// How far each range has been read, as far as received.
    frontier: Frontier,
    /// Items received but not yet committed.
    pending: Pending,
    /// The write of earlier items, running while more are received.
    writing: Option<Writing>,
    /// While a bulk load's indexes are deferred: whether to build them before the next batch.
    early_build: Option<EarlyBuild>,
    /// When the last batch was handed to the writer.
    flushed_at: Instant,
    early_index_build: bool,
}

/// A batch being written: what it did, the watermark it committed, and how long it took.
type Writing =
    tokio::task::JoinHandle<Result<(WriteStats, Option<OffsetDateTime>, Duration), StoreError>>;

/// How many items gather before they are committed together. A batch touches the same B-tree
/// pages (random ids and names) for all its items, so bigger batches write fewer pages per
/// item, up to about this size; larger ones gained nothing (docs/performance.md). The price is
/// memory, two batches of items in flight, and on SQLite the pages a batch dirties.
const COMMIT_ITEMS: usize = 3000;

/// Events (a page each, mostly) queued between the readers and the writer: enough to keep the
/// readers busy during a commit. What they hold is bounded in bytes ([`read::BUFFERED_BYTES`]).
const QUEUED_EVENTS: usize = 32;

/// Items received and not yet committed, with what they hold of the pass's byte budget.
#[derive(Default)]
struct Pending {
    items: Vec<Procedure>,
    rejected: Vec<Rejected>,
    unproven: Vec<UnprovenGroup>,
    proven: Vec<OffsetDateTime>,
    held: Vec<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.items.is_empty()
            && self.rejected.is_empty()
            && self.unproven.is_empty()
            && self.proven.is_empty()
    }

    /// Big enough to commit: a batch's worth of items, or of the bytes a pass may buffer (large
    /// items), so that the reader always has room for its next page.
    fn is_full(&self) -> bool {
        self.items.len() + self.rejected.len() >= COMMIT_ITEMS || self.bytes >= read::EVENT_BYTES
    }
}

impl Pass<'_> {
    /// Reads and writes at once until the reader is done, then commits whatever is still
    /// queued, also after a failure: what was read is good data, and the watermark that
    /// comes with it is still behind anything unread.
    async fn run(
        &mut self,
        reader: &Reader<'_>,
        start: Option<OffsetDateTime>,
        unproven: &[OffsetDateTime],
    ) -> Result<(), SyncError> {
        let walked = async {
            let plan = reader.plan(start).await?;
            self.frontier = Frontier::new(&plan.starts);
            let (events, received) = mpsc::channel(QUEUED_EVENTS);
            let (read, written) =
                tokio::join!(reader.read(plan, unproven, events), self.receive(received));
            // A failed write hangs up on the reader: its error is the cause.
            written.and(read)
        }
        .await;
        let flushed = self.flush().await;
        let settled = self.settle().await.map(|_| ());
        walked.and(flushed).and(settled)
    }

    async fn receive(&mut self, mut events: mpsc::Receiver<Event>) -> Result<(), SyncError> {
        while let Some(event) = events.recv().await {
            match event {
                Event::Items {
                    items,
                    rejected,
                    held,
                } => {
                    let below = items
                        .iter()
                        .map(|p| p.updated_at)
                        .filter(|at| *at <= self.ceiling)
                        .max();
                    self.newest_below_ceiling = self.newest_below_ceiling.max(below);
                    self.pending.items.extend(items);
                    self.pending.rejected.extend(rejected);
                    self.pending.bytes += held.num_permits();
                    self.pending.held.push(held);
                    if self.pending.is_full() {
                        self.flush().await?;
                    }
                }
                Event::Reached {
                    range,
                    end,
                    at,
                    finished,
                } => self.frontier.reach(range, end, at, finished),
                Event::Unproven(group) => self.pending.unproven.push(group),
                Event::Proven(at) => self.pending.proven.push(at),
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
        let received = self.flushed_at.elapsed();
        let written = self.settle().await?;
        let pending = std::mem::take(&mut self.pending);
        // Past the ceiling, only items dated in the future were read: the watermark stops at
        // the newest item that is not, whatever clock the source's later edits are dated by.
        let forward = self
            .frontier
            .watermark()
            .and_then(|w| {
                if w > self.ceiling {
                    self.newest_below_ceiling
                } else {
                    Some(w)
                }
            })
            .filter(|w| self.stored.is_none_or(|s| *w > s));
        if pending.is_empty() && forward.is_none() {
            return Ok(());
        }
        let build_first = match (&mut self.early_build, written) {
            (Some(pacing), Some(write)) => pacing.observe(write, received),
            _ => false,
        };
        if build_first {
            tracing::info!("Klarify is slower than the database: the bulk load builds the indexes it keeps cheaply now, while the readers wait, and the rest at its end");
            self.early_build = None;
            self.early_index_build = true;
        }
        self.flushed_at = Instant::now();
        let (store, run, track_seen) = (self.store.clone(), self.run, self.track_seen);
        self.writing = Some(tokio::spawn(async move {
            if build_first {
                store.build_early_indexes().await?;
            }
            let started = Instant::now();
            let page = PageWrite {
                run,
                items: &pending.items,
                rejected: &pending.rejected,
                watermark: forward,
                track_seen,
                unproven: &pending.unproven,
                proven: &pending.proven,
            };
            // The buffered bytes are released when the batch is done with.
            let stats = store.write_page(&page).await?;
            Ok((stats, forward, started.elapsed()))
        }));
        Ok(())
    }

    /// Waits for the write in flight, if any, and takes note of what it committed. Returns how
    /// long that write took.
    async fn settle(&mut self) -> Result<Option<Duration>, SyncError> {
        let Some(writing) = self.writing.take() else {
            return Ok(None);
        };
        let (stats, forward, took) = writing
            .await
            .map_err(|e| SyncError::WriteAborted(e.to_string()))??;
        self.stats += stats;
        if forward.is_some() {
            self.stored = forward;
        }
        Ok(Some(took))
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
            early_index_build = self.early_index_build,
            built_at_end = self.built_at_end,
            ranges_split = self.ranges_split,
            "sync pass succeeded"
        );
    }
}
