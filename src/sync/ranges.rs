//! The ranges of a pass as its readers share them (docs/sync.md, "Parallel ranges"). Each range
//! is read by one reader. A reader left with no range to start offers to split the one with the
//! most left to read, at an instant it sampled, and that range's reader takes the offer between
//! two pages: the end of a pass is then not one reader paging alone through a large range while
//! the others wait. Only a range's own reader moves its end; it reports the shorter end with its
//! progress, which holds the watermark before the part split off (cursor.rs, `Frontier`).

use std::sync::Mutex;

use time::OffsetDateTime;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use super::cursor::range_bounds;

/// A range handed to a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    pub slot: usize,
    /// The range's start: how the writer knows it ([`super::cursor::Frontier`]).
    pub key: Option<OffsetDateTime>,
    /// Where reading starts: the range's start, or where an earlier reading of it ended.
    pub from: Option<OffsetDateTime>,
    /// The range's end when it was handed out; `None` for the open range, the newest.
    pub end: Option<OffsetDateTime>,
}

/// What a reader should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Read(Task),
    /// Sample the instant `offset` items above `after`, and offer it to `slot`'s reader.
    Split {
        slot: usize,
        after: Option<OffsetDateTime>,
        offset: u64,
    },
    /// Nothing to do until something changes ([`Ranges::changed`]).
    Wait,
    /// Every range has been read.
    Done,
}

#[derive(Debug)]
pub struct Ranges {
    slots: Mutex<Vec<Slot>>,
    /// Notified when a range is queued or finishes, or an offer is answered.
    changed: Notify,
    /// A range is split only when this many items are left in it: each part must be worth a
    /// sample request and, on average, half a page read twice where the parts meet.
    min_split: u64,
}

#[derive(Debug)]
struct Slot {
    start: Option<OffsetDateTime>,
    end: Option<OffsetDateTime>,
    /// Items the range was expected to hold, from the plan's evenly spaced samples.
    expected: u64,
    /// Items sent from the range so far, and the cursor they reached.
    sent: u64,
    cursor: Option<OffsetDateTime>,
    state: State,
    offer: Offer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Reading,
    Done { ended: Option<OffsetDateTime> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    None,
    /// A reader is sampling where to split it.
    Sampling,
    At(OffsetDateTime),
    /// A sample found nothing to split it at, or its reader turned an offer down: not offered
    /// for again, so that a source that lies about its size costs a request per range at most.
    Never,
}

impl Ranges {
    /// Ranges starting at `starts` (in time order, the last one open), each expected to hold
    /// `expected` items.
    pub fn new(starts: &[Option<OffsetDateTime>], expected: u64, min_split: u64) -> Self {
        let slots = range_bounds(starts)
            .map(|(start, end)| Slot {
                start,
                end,
                expected,
                sent: 0,
                cursor: start,
                state: State::Queued,
                offer: Offer::None,
            })
            .collect();
        Self {
            slots: Mutex::new(slots),
            changed: Notify::new(),
            min_split,
        }
    }

    /// Completes at the next change that may give a waiting reader something to do: a range
    /// queued or finished, an offer answered. Enabled before [`Self::next`] is asked, so that a
    /// change in between is not missed.
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// The earliest queued range, or else a range worth splitting, or else whether all is read.
    pub fn next(&self) -> Next {
        let mut slots = self.slots.lock().expect("not poisoned");
        let queued = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == State::Queued)
            .min_by_key(|(_, s)| s.start)
            .map(|(i, _)| i);
        if let Some(i) = queued {
            let slot = &mut slots[i];
            slot.state = State::Reading;
            return Next::Read(Task {
                slot: i,
                key: slot.start,
                from: slot.cursor,
                end: slot.end,
            });
        }
        if slots.iter().all(|s| matches!(s.state, State::Done { .. })) {
            return Next::Done;
        }
        let largest = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == State::Reading && s.offer == Offer::None)
            .map(|(i, s)| (i, s.expected.saturating_sub(s.sent)))
            .filter(|&(_, left)| left >= self.min_split)
            .max_by_key(|&(_, left)| left);
        match largest {
            Some((i, left)) => {
                slots[i].offer = Offer::Sampling;
                Next::Split {
                    slot: i,
                    after: slots[i].cursor,
                    offset: left / 2,
                }
            }
            None => Next::Wait,
        }
    }

    /// The instant sampled for a split of `slot`; `None` when the sample found nothing there.
    pub fn offer(&self, slot: usize, at: Option<OffsetDateTime>) {
        let mut slots = self.slots.lock().expect("not poisoned");
        let s = &mut slots[slot];
        s.offer = match (s.state, at) {
            (State::Reading, Some(at)) => Offer::At(at),
            (State::Reading, None) => Offer::Never,
            _ => Offer::None,
        };
        drop(slots);
        self.changed.notify_waiters();
    }

    /// Called by `slot`'s reader between pages, everything up to `cursor` read: an offer that
    /// lies ahead of the cursor and before the range's end is taken, and the range's new end
    /// returned; what it held past that is queued as a range of its own.
    pub fn take_offer(
        &self,
        slot: usize,
        cursor: Option<OffsetDateTime>,
    ) -> Option<OffsetDateTime> {
        let mut slots = self.slots.lock().expect("not poisoned");
        let s = &mut slots[slot];
        let Offer::At(at) = s.offer else {
            return None;
        };
        let ahead = cursor.is_none_or(|c| at > c) && s.end.is_none_or(|e| at < e);
        s.offer = if ahead { Offer::None } else { Offer::Never };
        if ahead {
            let left = s.expected.saturating_sub(s.sent);
            let rest = Slot {
                start: Some(at),
                end: s.end,
                expected: left - left / 2,
                sent: 0,
                cursor: Some(at),
                state: State::Queued,
                offer: Offer::None,
            };
            s.end = Some(at);
            s.expected = s.sent + left / 2;
            slots.push(rest);
        }
        drop(slots);
        self.changed.notify_waiters();
        ahead.then_some(at)
    }

    /// `slot`'s reader has read up to `cursor`, `items` more of it.
    pub fn progress(&self, slot: usize, cursor: Option<OffsetDateTime>, items: u64) {
        let mut slots = self.slots.lock().expect("not poisoned");
        let s = &mut slots[slot];
        s.cursor = s.cursor.max(cursor);
        s.sent += items;
    }

    /// `slot` has been read completely, up to `ended`.
    pub fn finish(&self, slot: usize, ended: Option<OffsetDateTime>) {
        let mut slots = self.slots.lock().expect("not poisoned");
        let s = &mut slots[slot];
        s.state = State::Done { ended };
        s.offer = Offer::None;
        drop(slots);
        self.changed.notify_waiters();
    }

    /// Once all is read: the open range, to read on from where it ended.
    pub fn read_on(&self) -> Task {
        let slots = self.slots.lock().expect("not poisoned");
        let (slot, s) = slots
            .iter()
            .enumerate()
            .find(|(_, s)| s.end.is_none())
            .expect("one range is open");
        let State::Done { ended } = s.state else {
            panic!("read on before the open range was read");
        };
        Task {
            slot,
            key: s.start,
            from: ended,
            end: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use time::Duration;

    fn t(s: i64) -> Option<OffsetDateTime> {
        Some(datetime!(2024-01-01 00:00:00 UTC) + Duration::seconds(s))
    }

    fn read(next: Next) -> Task {
        match next {
            Next::Read(task) => task,
            other => panic!("expected a range, got {other:?}"),
        }
    }

    #[test]
    fn ranges_are_handed_out_earliest_first_then_the_largest_is_split() {
        let ranges = Ranges::new(&[None, t(10), t(20)], 1000, 400);
        assert_eq!(read(ranges.next()).key, None);
        assert_eq!(read(ranges.next()).end, t(20));
        let last = read(ranges.next());
        assert_eq!((last.key, last.end), (t(20), None));
        ranges.progress(0, t(5), 300);
        ranges.progress(1, t(12), 100);
        ranges.progress(2, t(25), 900);
        // Range 1 has the most left: 900 items, of which the offer takes half.
        assert_eq!(
            ranges.next(),
            Next::Split {
                slot: 1,
                after: t(12),
                offset: 450
            }
        );
        // Range 0 is next; range 2 has too little left; range 1 is being sampled already.
        assert!(matches!(ranges.next(), Next::Split { slot: 0, .. }));
        assert_eq!(ranges.next(), Next::Wait);
    }

    #[test]
    fn an_accepted_offer_shortens_the_range_and_queues_the_rest() {
        let ranges = Ranges::new(&[t(0), t(100)], 1000, 400);
        let first = read(ranges.next());
        read(ranges.next());
        ranges.progress(1, t(120), 900);
        assert!(matches!(ranges.next(), Next::Split { slot: 0, .. }));
        ranges.offer(first.slot, t(50));
        // Its reader is at 10 and reads up to 100: the offer lies between.
        assert_eq!(ranges.take_offer(first.slot, t(10)), t(50));
        let rest = read(ranges.next());
        assert_eq!((rest.key, rest.from, rest.end), (t(50), t(50), t(100)));
        ranges.finish(rest.slot, t(100));
        ranges.finish(first.slot, t(50));
        assert_eq!(ranges.next(), Next::Wait);
        ranges.finish(1, t(130));
        assert_eq!(ranges.next(), Next::Done);
        assert_eq!(ranges.read_on().from, t(130));
    }

    #[test]
    fn an_offer_the_reader_has_passed_is_turned_down() {
        let ranges = Ranges::new(&[t(0)], 1000, 400);
        let only = read(ranges.next());
        assert!(matches!(ranges.next(), Next::Split { .. }));
        ranges.offer(only.slot, t(50));
        assert_eq!(ranges.take_offer(only.slot, t(50)), None);
        // Turned down, the range is not offered for again.
        assert_eq!(ranges.next(), Next::Wait);
        // A sample that found nothing is no offer either.
        let ranges = Ranges::new(&[t(0)], 1000, 400);
        let only = read(ranges.next());
        assert!(matches!(ranges.next(), Next::Split { .. }));
        ranges.offer(only.slot, None);
        assert_eq!(ranges.take_offer(only.slot, t(10)), None);
        assert_eq!(ranges.next(), Next::Wait);
    }

    #[test]
    fn an_offer_past_the_end_is_turned_down() {
        let ranges = Ranges::new(&[t(0), t(100)], 1000, 400);
        let first = read(ranges.next());
        assert!(matches!(ranges.next(), Next::Read(_)));
        ranges.progress(1, t(120), 900);
        assert!(matches!(ranges.next(), Next::Split { slot: 0, .. }));
        ranges.offer(first.slot, t(100));
        assert_eq!(ranges.take_offer(first.slot, t(10)), None);
    }

    #[test]
    fn the_open_range_split_leaves_its_new_part_open() {
        let ranges = Ranges::new(&[t(0)], 1000, 400);
        let only = read(ranges.next());
        assert!(matches!(ranges.next(), Next::Split { .. }));
        ranges.offer(only.slot, t(50));
        assert_eq!(ranges.take_offer(only.slot, None), t(50));
        let rest = read(ranges.next());
        assert_eq!(rest.end, None);
        ranges.finish(only.slot, t(50));
        ranges.finish(rest.slot, t(70));
        let on = ranges.read_on();
        assert_eq!((on.slot, on.key, on.from), (rest.slot, t(50), t(70)));
    }
}
