//! The reading side of a pass: plans ranges of `updated_at`, pages through each with its own
//! cursor, and sends what it reads, in order per range, to the writing side (docs/sync.md).

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryFutureExt, TryStreamExt};
use time::OffsetDateTime;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::cursor::{check_order, range_starts, step, Step, TICK};
use super::ranges::{Next, Ranges, Task};
use super::tie::GroupRead;
use super::{Progress, SyncError, SyncOptions};
use crate::klarify::{KlarifyClient, KlarifyError, Page, PageQuery, Procedure, Rejected};
use crate::store::UnprovenGroup;

/// What the reader tells the writer, in the order it happened within each range.
#[derive(Debug)]
pub(super) enum Event {
    /// Items read (those of other ranges left out) and items that cannot be understood, with
    /// their share of [`BUFFERED_BYTES`], released once they are committed.
    Items {
        items: Vec<Procedure>,
        rejected: Vec<Rejected>,
        held: OwnedSemaphorePermit,
    },
    /// Every item of the range `(range, end]` up to `at` has been sent; all of them when
    /// `finished`. A range's end moves back when it is split (ranges.rs).
    Reached {
        range: Option<OffsetDateTime>,
        end: Option<OffsetDateTime>,
        at: Option<OffsetDateTime>,
        finished: bool,
    },
    /// A tie group whose reading could not be proven complete; everything read of it was sent
    /// before this, and the next pass reads it again.
    Unproven(UnprovenGroup),
    /// An unproven group of an earlier pass has now been read completely.
    Proven(OffsetDateTime),
}

/// Bytes of items read but not yet committed, over the whole pass: queued for the writer, gathered
/// into the next batch, and in the batch being written. Responses still being read come on top
/// (at most `klarify.concurrency` of `klarify.max_body_bytes` each; docs/performance.md).
pub(super) const BUFFERED_BYTES: usize = 32 << 20;

/// One event holds at most this share of the budget however large its page, so that the writer,
/// which commits a batch once it holds this much, always leaves room for the next page.
pub(super) const EVENT_BYTES: usize = BUFFERED_BYTES / 4;

/// A range is worth splitting off only when it holds this many pages: each range costs an
/// offset request to find and, on average, half a page read twice at its end.
const MIN_PAGES_PER_RANGE: u64 = 4;

/// Ranges per concurrent reader: more, smaller ranges even out readers that are slowed down by
/// tie groups or retries.
const RANGES_PER_READER: u64 = 2;

/// Requests a pass may make: this many, plus [`REQUESTS_PER_PAGE`] for each page the first
/// `totalCount` announces. Far more than any honest reading needs (tie groups in a new order per
/// request included), and still an end to a server that never stops serving pages.
const REQUESTS_BASE: u64 = 10_000;
const REQUESTS_PER_PAGE: u64 = 20;

/// Pages probed for a tie group's end in one round before the round gives up: a server that
/// ignores `page` would otherwise be probed forever.
const PROBES_PER_ROUND: u64 = 64;

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
    /// Ranges split off while the pass read (ranges.rs).
    pub splits: AtomicU64,
    /// Items per page as the server serves them: `klarify.page_size`, or fewer once a first page
    /// showed that the server caps its pages silently.
    page_size: AtomicU32,
    /// The largest page asked for to read a tie group in one response; lowered to what the
    /// server serves when it caps pages, 0 once it refused one.
    whole_group_size: AtomicU32,
    /// Requests this pass may still make.
    requests_left: AtomicU64,
    buffered: Arc<Semaphore>,
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
            splits: AtomicU64::new(0),
            page_size: AtomicU32::new(client.page_size().max(1)),
            whole_group_size: AtomicU32::new(options.tie_group_page_size),
            requests_left: AtomicU64::new(REQUESTS_BASE),
            buffered: Arc::new(Semaphore::new(BUFFERED_BYTES)),
        }
    }

    /// Reads the first page from `start`; when its `totalCount` says many pages follow, samples
    /// the `updated_at` at evenly spaced offsets to split what follows into ranges of about equal
    /// size. An idle pass costs its one request.
    pub async fn plan(&self, start: Option<OffsetDateTime>) -> Result<Plan, SyncError> {
        let first = self.fetch(0, start).await?;
        let total = first.total_count;
        self.progress.total.store(total, Ordering::Relaxed);
        let pages = total / u64::from(self.page_size());
        self.requests_left
            .fetch_add(pages.saturating_mul(REQUESTS_PER_PAGE), Ordering::Relaxed);
        let readers = self.client.concurrency() as u64;
        let ranges = (readers * RANGES_PER_READER).min(pages / MIN_PAGES_PER_RANGE);
        if readers == 1 || ranges <= 1 || !more(&first) {
            return Ok(Plan {
                first,
                starts: vec![start],
            });
        }
        // In u128: a `totalCount` near u64::MAX (a server's lie) must not wrap.
        let offsets = (1..ranges).map(|k| {
            let offset = u128::from(total) * u128::from(k) / u128::from(ranges);
            u32::try_from(offset).unwrap_or(u32::MAX)
        });
        let samples: Vec<Option<OffsetDateTime>> = futures::stream::iter(offsets)
            .map(|offset| self.sample(start, offset))
            .buffered(readers as usize)
            .try_collect()
            .await?;
        let starts = range_starts(start, samples.into_iter().flatten().collect());
        tracing::debug!(ranges = starts.len(), total, "reading in parallel ranges");
        Ok(Plan { first, starts })
    }

    /// Reads the tie groups earlier passes could not prove complete, then every range, up to
    /// `concurrency` at once, earliest ranges first (the watermark follows the front), and stops
    /// all of them at the first failure. Then reads on from where the last range ended, alone:
    /// what changed while the ranges were read moved past it, and a pass ends, as a sequential
    /// one would, with a request that finds nothing newer.
    pub async fn read(
        &self,
        plan: Plan,
        unproven: &[OffsetDateTime],
        events: mpsc::Sender<Event>,
    ) -> Result<(), SyncError> {
        for &at in unproven {
            self.reverify(at, &events).await?;
        }
        let Plan { first, starts } = plan;
        let expected = self.progress.total.load(Ordering::Relaxed) / starts.len() as u64;
        let min_split = MIN_PAGES_PER_RANGE * u64::from(self.page_size());
        let ranges = Ranges::new(&starts, expected, min_split);
        let first = Mutex::new(Some(first));
        let reader = || async {
            while let Some(task) = self.next_range(&ranges).await? {
                let first = if task.slot == 0 {
                    first.lock().expect("not poisoned").take()
                } else {
                    None
                };
                let started = std::time::Instant::now();
                let result = self.read_range(&ranges, task, first, &events).await;
                // How evenly the ranges split the reading (docs/performance.md).
                tracing::debug!(
                    range = task.slot,
                    ok = result.is_ok(),
                    duration_ms = started.elapsed().as_millis() as u64,
                    "range read"
                );
                match result {
                    Ok(ended) => ranges.finish(task.slot, ended),
                    Err(e) => {
                        self.stop.cancel();
                        return Err(e);
                    }
                }
            }
            Ok(())
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
        if starts.len() > 1 {
            self.read_range(&ranges, ranges.read_on(), None, &events)
                .await?;
        }
        Ok(())
    }

    /// The next range to read: a queued one, or one split off for this reader from the range
    /// with the most left to read; `None` once every range has been read.
    async fn next_range(&self, ranges: &Ranges) -> Result<Option<Task>, SyncError> {
        loop {
            let changed = ranges.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match ranges.next() {
                Next::Read(task) => return Ok(Some(task)),
                Next::Done => return Ok(None),
                Next::Split {
                    slot,
                    after,
                    offset,
                } => {
                    let offset = u32::try_from(offset).unwrap_or(u32::MAX);
                    ranges.offer(slot, self.sample(after, offset).await?);
                }
                Next::Wait => {}
            }
            tokio::select! {
                () = changed => {}
                () = self.stop.cancelled() => return Err(SyncError::Interrupted),
            }
        }
    }

    /// Pages through the task's range with its own cursor (docs/sync.md, "The cursor"), taking
    /// offers to split it between pages; returns where it ended.
    async fn read_range(
        &self,
        ranges: &Ranges,
        task: Task,
        mut first: Option<Page>,
        events: &mpsc::Sender<Event>,
    ) -> Result<Option<OffsetDateTime>, SyncError> {
        let Task {
            slot,
            key: range,
            from: mut cursor,
            mut end,
        } = task;
        loop {
            if let Some(at) = ranges.take_offer(slot, cursor) {
                self.splits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(range = slot, %at, "range split");
                end = Some(at);
            }
            let page = match first.take() {
                Some(page) => page,
                None => self.fetch(0, cursor).await?,
            };
            check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
            let reached = move |at, finished| Event::Reached {
                range,
                end,
                at,
                finished,
            };
            // Page 0 holds the smallest items above the cursor: one reaching past the end holds
            // all the range has left.
            if end.is_some() && page.items.last().map(|p| p.updated_at) > end {
                self.send_items(events, page, end).await?;
                send(events, reached(end, true)).await?;
                return Ok(end);
            }
            match step(&page.items, more(&page)) {
                Step::Done(newest) => {
                    let ended = end.or(newest.max(cursor));
                    self.send_items(events, page, end).await?;
                    send(events, reached(ended, true)).await?;
                    return Ok(ended);
                }
                Step::Advance(next) => {
                    let items = page.items.len() as u64;
                    self.send_items(events, page, end).await?;
                    send(events, reached(Some(next), false)).await?;
                    cursor = Some(next);
                    ranges.progress(slot, cursor, items);
                }
                Step::TieGroup(at) => {
                    if let Some(group) = self.read_tie_group(cursor, at, end, page, events).await? {
                        send(events, Event::Unproven(group)).await?;
                    }
                    send(events, reached(Some(at), false)).await?;
                    cursor = Some(at);
                    ranges.progress(slot, cursor, 0);
                }
                Step::Stuck => {
                    self.send_items(events, page, end).await?;
                    first = Some(self.read_past_unreadable(cursor).await?);
                }
            }
        }
    }

    /// Page 0 above `cursor` in pages larger than the pass's (up to `sync.tie_group_page_size`),
    /// after a full page of items that cannot be understood (kept aside already): the first one
    /// that shows a readable item, or the end, moves the cursor on as any page 0 does.
    async fn read_past_unreadable(
        &self,
        cursor: Option<OffsetDateTime>,
    ) -> Result<Page, SyncError> {
        let limit = u64::from(self.whole_group_size.load(Ordering::Relaxed));
        let mut size = u64::from(self.page_size());
        loop {
            let larger = size.saturating_mul(4).min(limit);
            if larger <= size {
                return Err(SyncError::Stuck);
            }
            size = larger;
            let page = match self.fetch_sized(0, size, cursor).await {
                Err(SyncError::Klarify(e)) if e.is_refusal() => return Err(SyncError::Stuck),
                page => page?,
            };
            check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
            if !page.items.is_empty() || (page.served() as u64) < size {
                return Ok(page);
            }
        }
    }

    /// Reads the group at `at` that an earlier pass could not prove complete, from just below it,
    /// and tells the writer whether it is proven now.
    async fn reverify(
        &self,
        at: OffsetDateTime,
        events: &mpsc::Sender<Event>,
    ) -> Result<(), SyncError> {
        let cursor = at.checked_sub(TICK);
        let first = self.fetch(0, cursor).await?;
        check_order(&first.items, cursor).map_err(SyncError::Unordered)?;
        let outcome = self
            .read_tie_group(cursor, at, Some(at), first, events)
            .await?;
        let event = match outcome {
            None => {
                tracing::info!(%at, "a tie group earlier passes could not prove complete has now been read completely");
                Event::Proven(at)
            }
            Some(group) => Event::Unproven(group),
        };
        send(events, event).await
    }

    /// Reads every item whose `updated_at` is `at`, starting from `first` (page 0 above
    /// `cursor`), and proves the reading complete (docs/sync.md, "Tie groups"). Returns `None`
    /// when proven, else the group as it stands: everything read of it has been sent anyway.
    async fn read_tie_group(
        &self,
        cursor: Option<OffsetDateTime>,
        at: OffsetDateTime,
        end: Option<OffsetDateTime>,
        first: Page,
        events: &mpsc::Sender<Event>,
    ) -> Result<Option<UnprovenGroup>, SyncError> {
        let size = self.page_size();
        let mut group = GroupRead::new(at);
        let round = group.next_round();
        group.record(round, 0, size.into(), true, &first);
        let total = first.total_count;
        self.send_items(events, first, end).await?;
        if group.proven() {
            return Ok(None);
        }
        // Where the group ends is only guessed from two counts taken at different instants; the
        // guess decides which pages to ask for, never whether the reading is complete.
        let estimate = total
            .saturating_sub(self.count(Some(at)).await?)
            .max(size.into());
        self.read_whole_group(cursor, &mut group, estimate, end, events)
            .await?;
        let mut guess = estimate;
        for attempt in 1..=self.options.tie_group_rounds {
            if group.proven() {
                return Ok(None);
            }
            let size = u64::from(self.page_size());
            // Measure: the page the tightest bound (or the guess) puts the group's end on, then
            // nearer pages while a page starts past the end, or further ones while it does not
            // reach it.
            let mut number = group.bound().unwrap_or(guess) / size;
            let mut measured = None;
            let mut forward = false;
            for _ in 0..PROBES_PER_ROUND {
                let round = group.next_round();
                let page = self.fetch_sized(number, size, cursor).await?;
                check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
                let bound = group.record(round, number * size, size, true, &page);
                self.send_items(events, page, end).await?;
                match bound {
                    // A page that starts past the end may follow it by pages; after a page that
                    // did not reach it, it follows it directly.
                    Some(b) if b == number * size && number > 0 && !forward => number -= 1,
                    Some(_) => {
                        measured = Some(number);
                        break;
                    }
                    None => {
                        number += 1;
                        forward = true;
                    }
                }
            }
            let Some(measured) = measured else {
                guess = number * size;
                continue;
            };
            if group.proven() {
                return Ok(None);
            }
            // Collect: every page before the measured one, each sent after the measurement
            // arrived, in any order.
            let round = group.next_round();
            let mut pages = futures::stream::iter(0..measured)
                .map(|n| {
                    self.fetch_sized(n, size, cursor)
                        .map_ok(move |page| (n, page))
                })
                .buffered(self.client.concurrency());
            while let Some((n, page)) = pages.try_next().await? {
                check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
                group.record(round, n * size, size, true, &page);
                self.send_items(events, page, end).await?;
            }
            if !group.proven() {
                tracing::debug!(%at, attempt, bound = group.bound(), "a tie group is not proven complete yet; reading it again");
            }
        }
        if group.proven() {
            return Ok(None);
        }
        let (size_bound, size_counted) = group.shortfall().unwrap_or((guess, 0));
        tracing::warn!(
            %at,
            size_bound,
            size_counted,
            rounds = self.options.tie_group_rounds,
            "the procedures sharing one updated_at kept changing while being read; what was read is kept, and later passes read the group again until it is proven complete"
        );
        Ok(Some(UnprovenGroup {
            at,
            size_bound,
            size_counted,
        }))
    }

    /// Asks for the whole group in one response, when the server allows pages that large: a
    /// page that shows the group's end holds every member it had at that instant.
    async fn read_whole_group(
        &self,
        cursor: Option<OffsetDateTime>,
        group: &mut GroupRead,
        estimate: u64,
        end: Option<OffsetDateTime>,
        events: &mpsc::Sender<Event>,
    ) -> Result<(), SyncError> {
        let limit = u64::from(self.whole_group_size.load(Ordering::Relaxed));
        // Room for the end (the first newer item) and for an estimate a few members short.
        let size = estimate.saturating_add(estimate / 16 + 2);
        if size > limit || size <= u64::from(self.page_size()) {
            return Ok(());
        }
        let round = group.next_round();
        let page = match self.fetch_sized(0, size, cursor).await {
            Ok(page) => page,
            Err(SyncError::Klarify(e)) if e.is_refusal() => {
                tracing::warn!(size, error = %e, "Klarify refused a page large enough for a whole tie group; groups are read a page at a time for the rest of this pass");
                self.whole_group_size.store(0, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        check_order(&page.items, cursor).map_err(SyncError::Unordered)?;
        let served = page.served() as u64;
        if group.record(round, 0, size, false, &page).is_none() && served < size {
            tracing::info!(
                asked = size,
                served,
                "Klarify serves fewer items per page than asked for; tie groups are read in pages of at most that many"
            );
            let capped = u32::try_from(served).unwrap_or(u32::MAX);
            self.whole_group_size.store(capped, Ordering::Relaxed);
        }
        self.send_items(events, page, end).await
    }

    /// Sends a page's items up to the range's end (later ones belong to the next range, which
    /// reads them itself) and its unreadable items, which belong to no range, once the bytes
    /// they take fit into what the pass may buffer.
    async fn send_items(
        &self,
        events: &mpsc::Sender<Event>,
        page: Page,
        end: Option<OffsetDateTime>,
    ) -> Result<(), SyncError> {
        let mut items = page.items;
        if let Some(end) = end {
            items.retain(|p| p.updated_at <= end);
        }
        let mut rejected = page.rejected;
        // A page of large items goes as several events, so that what each holds of the budget
        // is what it takes (only a single item larger than an event's share is counted short).
        let mut items = items.into_iter().peekable();
        loop {
            let mut bytes: usize = rejected.iter().map(|r| r.raw.len() + r.reason.len()).sum();
            let mut part = Vec::new();
            while let Some(item) =
                items.next_if(|p| part.is_empty() || bytes + item_bytes(p) <= EVENT_BYTES)
            {
                bytes += item_bytes(&item);
                part.push(item);
            }
            let share =
                u32::try_from(bytes.clamp(1, EVENT_BYTES)).expect("EVENT_BYTES fits in u32");
            let held = tokio::select! {
                held = self.buffered.clone().acquire_many_owned(share) => held.expect("the budget is never closed"),
                () = self.stop.cancelled() => return Err(SyncError::Interrupted),
            };
            let event = Event::Items {
                items: part,
                rejected: std::mem::take(&mut rejected),
                held,
            };
            send(events, event).await?;
            if items.peek().is_none() {
                return Ok(());
            }
        }
    }

    fn page_size(&self) -> u32 {
        self.page_size.load(Ordering::Relaxed)
    }

    /// Page `page` above `after`, in the pass's page size. A first page of fewer items than asked
    /// for that says more follow shows a server capping its pages silently: the pass goes on in
    /// pages of that size, so that page numbers count what the server serves.
    async fn fetch(&self, page: u32, after: Option<OffsetDateTime>) -> Result<Page, SyncError> {
        let size = self.page_size();
        let served = self.fetch_sized(page.into(), size.into(), after).await?;
        let n = served.served() as u64;
        if page == 0 && n > 0 && n < u64::from(size) && served.has_next && served.total_count > n {
            let n = u32::try_from(n).expect("fewer than a u32 page size");
            if self.page_size.fetch_min(n, Ordering::Relaxed) > n {
                tracing::warn!(
                    asked = size,
                    served = n,
                    "Klarify serves fewer items per page than klarify.page_size; reading in pages of that many"
                );
            }
        }
        Ok(served)
    }

    async fn fetch_sized(
        &self,
        page: u64,
        page_size: u64,
        after: Option<OffsetDateTime>,
    ) -> Result<Page, SyncError> {
        self.spend_request()?;
        let query = PageQuery {
            page: u32::try_from(page).unwrap_or(u32::MAX),
            page_size: u32::try_from(page_size).unwrap_or(u32::MAX),
            after,
        };
        let page = self.unless_stopped(self.client.fetch_page(query)).await?;
        let served = page.items.len() as u64;
        self.progress.fetched.fetch_add(served, Ordering::Relaxed);
        self.pages.fetch_add(1, Ordering::Relaxed);
        self.fetched.fetch_add(served, Ordering::Relaxed);
        self.rejected
            .fetch_add(page.rejected.len() as u64, Ordering::Relaxed);
        Ok(page)
    }

    async fn count(&self, after: Option<OffsetDateTime>) -> Result<u64, SyncError> {
        self.spend_request()?;
        self.unless_stopped(self.client.count(after)).await
    }

    async fn sample(
        &self,
        after: Option<OffsetDateTime>,
        offset: u32,
    ) -> Result<Option<OffsetDateTime>, SyncError> {
        self.spend_request()?;
        self.unless_stopped(self.client.item_at(after, offset))
            .await
    }

    fn spend_request(&self) -> Result<(), SyncError> {
        self.requests_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .map(drop)
            .map_err(|_| SyncError::TooManyRequests)
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

/// What an item takes in memory until it is committed: its text, and about as much again parsed.
fn item_bytes(p: &Procedure) -> usize {
    2 * p.raw.len() + 256
}

/// The writer hangs up only when it failed; its error is the pass's.
async fn send(events: &mpsc::Sender<Event>, event: Event) -> Result<(), SyncError> {
    events.send(event).await.map_err(|_| SyncError::Interrupted)
}
