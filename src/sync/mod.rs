//! One sync pass: page through Klarify from the cursor and commit each page with the cursor it
//! reaches. The algorithm, and why it cannot skip a record, is in docs/sync.md.
//!
//! A pass is a plain async function returning a report, so `--once`, `--backfill`, the daemon
//! and the tests all call the same thing; the scheduler only decides when.

mod cursor;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::klarify::{KlarifyClient, KlarifyError, Page, PageQuery, Procedure, Rejected};
use crate::store::{
    LockGuard, LockKind, PageWrite, RunId, RunRecord, Store, StoreError, WriteStats,
};
use cursor::{check_order, step, Step};

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
    let watermark = store.watermark().await?;
    let run = store.begin_run(mode.as_str(), watermark).await?;
    tracing::Span::current().record("run", run);
    let mut pass = Pass {
        client,
        store,
        options,
        shutdown,
        progress,
        run,
        mode,
        stored: watermark,
        pages: 0,
        fetched: 0,
        rejected: 0,
        stats: WriteStats::default(),
        pending: Pending::default(),
        writing: None,
    };
    let outcome = pass.run().await;
    let deleted = match (&outcome, mode) {
        (Ok(()), Mode::Backfill) => {
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
        pages: pass.pages,
        fetched: pass.fetched,
        stats: pass.stats,
        rejected: pass.rejected,
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
    })
}

/// The state of one pass in flight.
struct Pass<'a> {
    client: &'a KlarifyClient,
    store: &'a Store,
    options: &'a SyncOptions,
    shutdown: &'a CancellationToken,
    progress: &'a Progress,
    run: RunId,
    mode: Mode,
    /// The watermark as committed; it only ever moves forward.
    stored: Option<OffsetDateTime>,
    pages: u64,
    fetched: u64,
    rejected: u64,
    stats: WriteStats,
    /// Pages read but not yet committed.
    pending: Pending,
    /// The write of earlier pages, running while the pass fetches on.
    writing: Option<Writing>,
}

/// A batch being written: what it did, and the watermark it committed.
type Writing = tokio::task::JoinHandle<Result<(WriteStats, Option<OffsetDateTime>), StoreError>>;

/// How many items gather before they are committed together.
const COMMIT_ITEMS: usize = 1000;

#[derive(Default)]
struct Pending {
    items: Vec<Procedure>,
    rejected: Vec<Rejected>,
    watermark: Option<OffsetDateTime>,
}

impl Pass<'_> {
    /// Walks the pages, then commits whatever is still queued, also after a failure: what was
    /// read is good data, and its watermark is still behind anything unread.
    async fn run(&mut self) -> Result<(), SyncError> {
        let walked = self.walk().await;
        let flushed = self.flush().await;
        let settled = self.settle().await;
        walked.and(flushed).and(settled)
    }

    async fn walk(&mut self) -> Result<(), SyncError> {
        let mut cursor = match self.mode {
            Mode::Backfill => None,
            Mode::Incremental => self.stored.map(|w| w - self.options.overlap),
        };
        loop {
            let page = self.fetch(0, cursor).await?;
            check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
            // A server whose hasNext lies on the last page is caught by its own totalCount.
            let more =
                page.served() > 0 && (page.has_next || page.total_count > page.served() as u64);
            match step(&page.items, more) {
                Step::Done(newest) => {
                    let end = newest.max(cursor);
                    self.commit(&page, end).await?;
                    return Ok(());
                }
                Step::Advance(next) => {
                    self.commit(&page, Some(next)).await?;
                    cursor = Some(next);
                }
                Step::TieGroup(at) => {
                    self.commit(&page, None).await?;
                    self.read_tie_group(cursor, at).await?;
                    self.commit_watermark(at);
                    cursor = Some(at);
                }
                Step::Stuck => {
                    self.commit(&page, None).await?;
                    return Err(SyncError::Stuck);
                }
            }
        }
    }

    /// Reads every item whose `updated_at` is `at`, by page number under a fixed cursor, and
    /// proves the reading complete by count (docs/sync.md, "Tie groups").
    async fn read_tie_group(
        &mut self,
        cursor: Option<OffsetDateTime>,
        at: OffsetDateTime,
    ) -> Result<(), SyncError> {
        let page_size = u64::from(self.client.page_size());
        let mut size = 0;
        for attempt in 1..=self.options.tie_group_attempts {
            // Newer first: an item leaving the group between the two counts is then counted
            // twice, never missed, so `size` can only overestimate the group.
            let newer = self.count(Some(at)).await?;
            size = self.count(cursor).await?.saturating_sub(newer);
            let mut seen = HashSet::new();
            let mut unreadable = HashSet::new();
            for number in 0.. {
                let page = self.fetch(number, cursor).await?;
                check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
                self.commit(&page, None).await?;
                // The group ends where the first newer item stands; what comes before it,
                // readable or not, belongs to the group.
                let offset = u64::from(number) * page_size;
                let newer_at = page
                    .items
                    .iter()
                    .position(|p| p.updated_at > at)
                    .map(|k| page.positions[k]);
                let in_group = newer_at.unwrap_or(page.served());
                seen.extend(
                    page.items
                        .iter()
                        .filter(|p| p.updated_at == at)
                        .map(|p| p.id.clone()),
                );
                unreadable.extend(
                    page.rejected
                        .iter()
                        .filter(|r| r.position < in_group)
                        .map(|r| r.raw.clone()),
                );
                let served = offset + page.served() as u64;
                // A totalCount that understates the group must not pass off a partial reading:
                // the positions the pages show count too (an empty page shows none).
                if page.served() > 0 {
                    size = size.max(offset + in_group as u64);
                }
                let more = page.served() > 0 && (page.has_next || page.total_count > served);
                if newer_at.is_some() || !more {
                    break;
                }
            }
            if (seen.len() + unreadable.len()) as u64 >= size {
                return Ok(());
            }
            tracing::warn!(%at, size, seen = seen.len(), attempt, "a group of procedures sharing one updated_at changed while being read; reading it again");
        }
        Err(SyncError::UnstableTieGroup {
            at,
            size,
            attempts: self.options.tie_group_attempts,
        })
    }

    async fn fetch(&mut self, page: u32, after: Option<OffsetDateTime>) -> Result<Page, SyncError> {
        let query = PageQuery { page, after };
        let page = tokio::select! {
            page = self.client.fetch_page(query) => page?,
            () = self.shutdown.cancelled() => return Err(SyncError::Interrupted),
        };
        if self.pages == 0 {
            self.progress
                .total
                .store(page.total_count, Ordering::Relaxed);
        }
        self.progress
            .fetched
            .fetch_add(page.items.len() as u64, Ordering::Relaxed);
        self.pages += 1;
        self.fetched += page.items.len() as u64;
        self.rejected += page.rejected.len() as u64;
        Ok(page)
    }

    async fn count(&mut self, after: Option<OffsetDateTime>) -> Result<u64, SyncError> {
        tokio::select! {
            n = self.client.count(after) => Ok(n?),
            () = self.shutdown.cancelled() => Err(SyncError::Interrupted),
        }
    }

    /// Queues a page for the next commit, with the watermark it allows; commits once enough
    /// has gathered. Committing several pages at once costs the database far less than one
    /// transaction a page (fewer WAL writes of the same index pages); a kill loses at most
    /// the queued pages, which the watermark then still lies before.
    async fn commit(
        &mut self,
        page: &Page,
        watermark: Option<OffsetDateTime>,
    ) -> Result<(), SyncError> {
        self.pending.items.extend_from_slice(&page.items);
        self.pending.rejected.extend_from_slice(&page.rejected);
        self.pending.watermark = self.pending.watermark.max(watermark);
        if self.pending.items.len() + self.pending.rejected.len() >= COMMIT_ITEMS {
            self.flush().await?;
        }
        Ok(())
    }

    /// Starts writing the queued pages in one transaction, with the newest watermark among
    /// them when that moves the stored one forward. The write runs while the next pages are
    /// fetched; writes never overlap, so they commit in order.
    async fn flush(&mut self) -> Result<(), SyncError> {
        self.settle().await?;
        let pending = std::mem::take(&mut self.pending);
        let forward = pending
            .watermark
            .filter(|w| self.stored.is_none_or(|s| *w > s));
        if pending.items.is_empty() && pending.rejected.is_empty() && forward.is_none() {
            return Ok(());
        }
        let (store, run, track_seen) = (self.store.clone(), self.run, self.mode == Mode::Backfill);
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

    /// Lets the next commit move the watermark to `at`, with no pages of its own.
    fn commit_watermark(&mut self, at: OffsetDateTime) {
        self.pending.watermark = self.pending.watermark.max(Some(at));
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
            "sync pass succeeded"
        );
    }
}
