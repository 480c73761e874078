//! The reading side of a pass: plans ranges of `updated_at`, pages through each with its own
//! cursor, and sends what it reads, in order per range, to the writing side (docs/sync.md).

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use futures::{StreamExt, TryStreamExt};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::cursor::{check_order, range_starts, step, Step};
use super::{Progress, SyncError, SyncOptions};
use crate::klarify::{KlarifyClient, KlarifyError, Page, PageQuery, Procedure, Rejected};

/// What the reader tells the writer, in the order it happened within each range.
#[derive(Debug)]
pub(super) enum Event {
    /// Items read (those of other ranges left out) and items that cannot be understood.
    Items {
        items: Vec<Procedure>,
        rejected: Vec<Rejected>,
    },
    /// Every item of range `range` up to `at` has been sent; all of them when `finished`.
    Reached {
        range: usize,
        at: Option<OffsetDateTime>,
        finished: bool,
    },
}

/// A range is worth splitting off only when it holds this many pages: each range costs an
/// offset request to find and, on average, half a page read twice at its end.
const MIN_PAGES_PER_RANGE: u64 = 4;

/// Ranges per concurrent reader: more, smaller ranges even out readers that are slowed down by
/// tie groups or retries.
const RANGES_PER_READER: u64 = 2;

pub(super) struct Reader<'a> {
    client: &'a KlarifyClient,
    options: &'a SyncOptions,
    progress: &'a Progress,
    /// Cancelled on shutdown, or when one range fails and the others need not go on.
    stop: CancellationToken,
    /// Pages fetched (the one-item count and sample requests are not pages).
    pub pages: AtomicU64,
    pub fetched: AtomicU64,
    pub rejected: AtomicU64,
}

/// The pass's first page and the ranges it is split into.
pub(super) struct Plan {
    first: Page,
    pub starts: Vec<Option<OffsetDateTime>>,
}

impl<'a> Reader<'a> {
    pub fn new(
        client: &'a KlarifyClient,
        options: &'a SyncOptions,
        progress: &'a Progress,
        shutdown: &CancellationToken,
    ) -> Self {
        Self {
            client,
            options,
            progress,
            stop: shutdown.child_token(),
            pages: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Reads the first page from `start`; when its `totalCount` says many pages follow, samples
    /// the `updated_at` at evenly spaced offsets to split what follows into ranges of about equal
    /// size. An idle pass costs its one request.
    pub async fn plan(&self, start: Option<OffsetDateTime>) -> Result<Plan, SyncError> {
        let first = self.fetch(0, start).await?;
        let total = first.total_count;
        self.progress.total.store(total, Ordering::Relaxed);
        let pages = total / u64::from(self.client.page_size());
        let readers = self.client.concurrency() as u64;
        let ranges = (readers * RANGES_PER_READER).min(pages / MIN_PAGES_PER_RANGE);
        if readers == 1 || ranges <= 1 || !more(&first) {
            return Ok(Plan {
                first,
                starts: vec![start],
            });
        }
        let offsets = (1..ranges).map(|k| u32::try_from(total * k / ranges).unwrap_or(u32::MAX));
        let samples: Vec<Option<OffsetDateTime>> = futures::stream::iter(offsets)
            .map(|offset| self.sample(start, offset))
            .buffered(readers as usize)
            .try_collect()
            .await?;
        let starts = range_starts(start, samples.into_iter().flatten().collect());
        tracing::debug!(ranges = starts.len(), total, "reading in parallel ranges");
        Ok(Plan { first, starts })
    }

    /// Reads every range, up to `concurrency` at once, earliest ranges first (the watermark
    /// follows the front), and stops all of them at the first failure. Then reads on from where
    /// the last range ended, alone: what changed while the ranges were read moved past it, and
    /// a pass ends, as a sequential one would, with a request that finds nothing newer.
    pub async fn read(&self, plan: Plan, events: mpsc::Sender<Event>) -> Result<(), SyncError> {
        let Plan { first, starts } = plan;
        let last = starts.len() - 1;
        let first = Mutex::new(Some(first));
        let last_end = Mutex::new(None);
        let next = AtomicUsize::new(0);
        let reader = || async {
            loop {
                let range = next.fetch_add(1, Ordering::Relaxed);
                let Some(&start) = starts.get(range) else {
                    return Ok(());
                };
                let end = starts.get(range + 1).copied().flatten();
                let first = if range == 0 {
                    first.lock().expect("not poisoned").take()
                } else {
                    None
                };
                match self.read_range(range, start, end, first, &events).await {
                    Ok(ended) if range == last => *last_end.lock().expect("not poisoned") = ended,
                    Ok(_) => {}
                    Err(e) => {
                        self.stop.cancel();
                        return Err(e);
                    }
                }
            }
        };
        let readers = self.client.concurrency().min(starts.len());
        let results = futures::future::join_all((0..readers).map(|_| reader())).await;
        // The cause, not the cancellations it caused in the other readers.
        let mut outcome = Ok(());
        for result in results {
            match (&outcome, result) {
                (_, Ok(())) => {}
                (Ok(()) | Err(SyncError::Interrupted), Err(e)) => outcome = Err(e),
                (Err(_), Err(_)) => {}
            }
        }
        outcome?;
        if last > 0 {
            let ended = last_end.into_inner().expect("not poisoned");
            self.read_range(last, ended, None, None, &events).await?;
        }
        Ok(())
    }

    /// Pages through `(start, end]` with its own cursor (docs/sync.md, "The cursor"); returns
    /// where it ended.
    async fn read_range(
        &self,
        range: usize,
        start: Option<OffsetDateTime>,
        end: Option<OffsetDateTime>,
        mut first: Option<Page>,
        events: &mpsc::Sender<Event>,
    ) -> Result<Option<OffsetDateTime>, SyncError> {
        let mut cursor = start;
        loop {
            let page = match first.take() {
                Some(page) => page,
                None => self.fetch(0, cursor).await?,
            };
            check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
            let reached = |at, finished| Event::Reached {
                range,
                at,
                finished,
            };
            // Page 0 holds the smallest items above the cursor: one reaching past the end holds
            // all the range has left.
            if end.is_some() && page.items.last().map(|p| p.updated_at) > end {
                send(events, items(page, end)).await?;
                send(events, reached(end, true)).await?;
                return Ok(end);
            }
            match step(&page.items, more(&page)) {
                Step::Done(newest) => {
                    let ended = end.or(newest.max(cursor));
                    send(events, items(page, end)).await?;
                    send(events, reached(ended, true)).await?;
                    return Ok(ended);
                }
                Step::Advance(next) => {
                    send(events, items(page, end)).await?;
                    send(events, reached(Some(next), false)).await?;
                    cursor = Some(next);
                }
                Step::TieGroup(at) => {
                    send(events, items(page, end)).await?;
                    self.read_tie_group(cursor, at, end, events).await?;
                    send(events, reached(Some(at), false)).await?;
                    cursor = Some(at);
                }
                Step::Stuck => {
                    send(events, items(page, end)).await?;
                    return Err(SyncError::Stuck);
                }
            }
        }
    }

    /// Reads every item whose `updated_at` is `at`, by page number under a fixed cursor, and
    /// proves the reading complete by count (docs/sync.md, "Tie groups").
    async fn read_tie_group(
        &self,
        cursor: Option<OffsetDateTime>,
        at: OffsetDateTime,
        end: Option<OffsetDateTime>,
        events: &mpsc::Sender<Event>,
    ) -> Result<(), SyncError> {
        let page_size = u64::from(self.client.page_size());
        let mut size = 0;
        for attempt in 1..=self.options.tie_group_attempts {
            // Newer first: an item leaving the group between the two counts is then counted
            // twice, never missed, so `size` overestimates the group (the one exception, a
            // newer item deleted in between, is in docs/sync.md).
            let newer = self.count(Some(at)).await?;
            size = self.count(cursor).await?.saturating_sub(newer);
            let mut seen = HashSet::new();
            let mut unreadable = HashSet::new();
            for number in 0.. {
                let page = self.fetch(number, cursor).await?;
                check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
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
                send(events, items(page, end)).await?;
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

    async fn fetch(&self, page: u32, after: Option<OffsetDateTime>) -> Result<Page, SyncError> {
        let page = self
            .unless_stopped(self.client.fetch_page(PageQuery { page, after }))
            .await?;
        let served = page.items.len() as u64;
        self.progress.fetched.fetch_add(served, Ordering::Relaxed);
        self.pages.fetch_add(1, Ordering::Relaxed);
        self.fetched.fetch_add(served, Ordering::Relaxed);
        self.rejected
            .fetch_add(page.rejected.len() as u64, Ordering::Relaxed);
        Ok(page)
    }

    async fn count(&self, after: Option<OffsetDateTime>) -> Result<u64, SyncError> {
        self.unless_stopped(self.client.count(after)).await
    }

    async fn sample(
        &self,
        after: Option<OffsetDateTime>,
        offset: u32,
    ) -> Result<Option<OffsetDateTime>, SyncError> {
        self.unless_stopped(self.client.item_at(after, offset))
            .await
    }

    /// A request, abandoned on shutdown or when another range has failed.
    async fn unless_stopped<T>(
        &self,
        request: impl Future<Output = Result<T, KlarifyError>>,
    ) -> Result<T, SyncError> {
        tokio::select! {
            answer = request => Ok(answer?),
            () = self.stop.cancelled() => Err(SyncError::Interrupted),
        }
    }
}

/// Whether anything follows this page 0. A server whose `hasNext` lies on the last page is
/// caught by its own `totalCount`.
fn more(page: &Page) -> bool {
    page.served() > 0 && (page.has_next || page.total_count > page.served() as u64)
}

/// The page's items up to the range's end (later ones belong to the next range, which reads
/// them itself), and its unreadable items, which belong to no range.
fn items(page: Page, end: Option<OffsetDateTime>) -> Event {
    let mut items = page.items;
    if let Some(end) = end {
        items.retain(|p| p.updated_at <= end);
    }
    Event::Items {
        items,
        rejected: page.rejected,
    }
}

/// The writer hangs up only when it failed; its error is the pass's.
async fn send(events: &mpsc::Sender<Event>, event: Event) -> Result<(), SyncError> {
    events.send(event).await.map_err(|_| SyncError::Interrupted)
}
