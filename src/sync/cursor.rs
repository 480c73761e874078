//! The pure part of the paging algorithm (docs/sync.md): where the cursor may move after a page,
//! how a pass splits into ranges of `updated_at`, and how far the stored watermark may follow
//! ranges that finish out of order.

use std::collections::BTreeMap;

use time::{Duration, OffsetDateTime};

use crate::klarify::{untrusted, Procedure};

/// The smallest step the cursor takes below a timestamp: the precision everything is stored at.
pub const TICK: Duration = Duration::microseconds(1);

/// What page 0 of `updated_at > cursor` allows.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The page is the last one: the cursor may move to its newest item.
    Done(Option<OffsetDateTime>),
    /// Everything strictly older than the page's newest item has been read: the cursor moves to
    /// just below that item, so items sharing its timestamp are read again on the next page.
    Advance(OffsetDateTime),
    /// Every item on the page shares one instant: paging from page 0 cannot move past it, so
    /// the whole group must be read by page number.
    TieGroup(OffsetDateTime),
    /// A full page with nothing readable on it.
    Stuck,
}

/// Checks the server kept its promise: ascending `updated_at`, all strictly after the cursor.
/// Returns a description of the first violation.
pub fn check_order(items: &[Procedure], cursor: Option<OffsetDateTime>) -> Result<(), String> {
    if let (Some(c), Some(first)) = (cursor, items.first()) {
        if first.updated_at <= c {
            return Err(format!(
                "item {} has updated_at {} which is not after the requested last_updated_at {}",
                untrusted(&first.id),
                first.updated_at,
                c
            ));
        }
    }
    match items.windows(2).find(|w| w[0].updated_at > w[1].updated_at) {
        Some(w) => Err(format!(
            "items are not sorted by updated_at: {} ({}) comes before {} ({})",
            untrusted(&w[0].id),
            w[0].updated_at,
            untrusted(&w[1].id),
            w[1].updated_at
        )),
        None => Ok(()),
    }
}

/// Decides the next step from page 0. `more` says whether anything follows this page.
pub fn step(items: &[Procedure], more: bool) -> Step {
    let newest = items.last().map(|p| p.updated_at);
    match (newest, items.first()) {
        (newest, _) if !more => Step::Done(newest),
        (Some(newest), Some(oldest)) if oldest.updated_at < newest => Step::Advance(newest - TICK),
        (Some(newest), _) => Step::TieGroup(newest),
        (None, _) => Step::Stuck,
    }
}

/// The starts of the ranges a pass is split into: `start`, then each sampled `updated_at` above
/// it, in order and once each. Range `i` is `(starts[i], starts[i + 1]]`, the last one open.
/// Any set of samples partitions the time line, so samples skewed by changes during sampling
/// only make ranges uneven, never lose an item.
pub fn range_starts(
    start: Option<OffsetDateTime>,
    mut samples: Vec<OffsetDateTime>,
) -> Vec<Option<OffsetDateTime>> {
    samples.retain(|s| start.is_none_or(|c| *s > c));
    samples.sort();
    samples.dedup();
    std::iter::once(start)
        .chain(samples.into_iter().map(Some))
        .collect()
}

/// Each range of [`range_starts`] as `(start, end)`: it ends where the next starts, the last
/// one open (`None`).
pub fn range_bounds(
    starts: &[Option<OffsetDateTime>],
) -> impl Iterator<Item = (Option<OffsetDateTime>, Option<OffsetDateTime>)> + '_ {
    let ends = starts.iter().skip(1).copied().chain([None]);
    starts.iter().copied().zip(ends)
}

/// How far each range has been read. Ranges are read in parallel and finish in any order; the
/// stored watermark may only cover what is read without a gap from the pass's start. A range is
/// known by its start and says where it ends, so that the part split off a range while it is
/// read (ranges.rs) holds the watermark from the moment its old range reports the shorter end,
/// whichever of the two the writer hears from first.
#[derive(Debug)]
pub struct Frontier {
    ranges: BTreeMap<Option<OffsetDateTime>, RangeProgress>,
}

#[derive(Debug, Clone, Copy)]
struct RangeProgress {
    /// Where the range ends; `None` for the open one, the newest.
    end: Option<OffsetDateTime>,
    /// Every item of the range up to here has been read.
    reached: Option<OffsetDateTime>,
    finished: bool,
}

impl Frontier {
    /// Ranges starting at `starts`, in time order, each ending where the next starts.
    pub fn new(starts: &[Option<OffsetDateTime>]) -> Self {
        let ranges = range_bounds(starts)
            .map(|(start, end)| {
                let progress = RangeProgress {
                    end,
                    reached: start,
                    finished: false,
                };
                (start, progress)
            })
            .collect();
        Self { ranges }
    }

    /// The range `(start, end]` has been read up to `at`, and completely when `finished`.
    pub fn reach(
        &mut self,
        start: Option<OffsetDateTime>,
        end: Option<OffsetDateTime>,
        at: Option<OffsetDateTime>,
        finished: bool,
    ) {
        let r = self.ranges.entry(start).or_insert(RangeProgress {
            end,
            reached: start,
            finished: false,
        });
        r.end = end;
        r.reached = r.reached.max(at);
        r.finished |= finished;
    }

    /// The newest instant up to which everything has been read: the end of the finished
    /// ranges at the front, each starting where the one before ends, and as far as the first
    /// unfinished one has got.
    pub fn watermark(&self) -> Option<OffsetDateTime> {
        let mut watermark = None;
        let mut next = self.ranges.keys().next().copied().flatten();
        for (&start, r) in &self.ranges {
            if start != next {
                break;
            }
            watermark = watermark.max(r.reached);
            if !r.finished {
                break;
            }
            match r.end {
                Some(end) => next = Some(end),
                None => break,
            }
        }
        watermark
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::klarify::parse_item;
    use time::macros::datetime;

    fn at(ts: &[&str]) -> Vec<Procedure> {
        ts.iter()
            .enumerate()
            .map(|(i, t)| parse_item(&format!(r#"{{"id":"{i}","updated_at":"{t}"}}"#)).unwrap())
            .collect()
    }

    #[test]
    fn advances_to_just_below_the_newest_item() {
        let page = at(&[
            "2024-01-01T00:00:01Z",
            "2024-01-01T00:00:02Z",
            "2024-01-01T00:00:02Z",
        ]);
        assert_eq!(
            step(&page, true),
            Step::Advance(datetime!(2024-01-01 00:00:01.999999 UTC))
        );
    }

    #[test]
    fn a_page_of_one_instant_is_a_tie_group() {
        let page = at(&["2024-01-01T00:00:02Z", "2024-01-01T00:00:02Z"]);
        assert_eq!(
            step(&page, true),
            Step::TieGroup(datetime!(2024-01-01 00:00:02 UTC))
        );
    }

    #[test]
    fn the_last_page_ends_the_pass_at_its_newest_item() {
        let page = at(&["2024-01-01T00:00:01Z", "2024-01-01T00:00:03Z"]);
        assert_eq!(
            step(&page, false),
            Step::Done(Some(datetime!(2024-01-01 00:00:03 UTC)))
        );
        assert_eq!(step(&[], false), Step::Done(None));
        assert_eq!(step(&[], true), Step::Stuck);
    }

    #[test]
    fn ranges_start_at_the_cursor_then_at_each_distinct_sample_above_it() {
        let t = |s: u8| Some(datetime!(2024-01-01 00:00:00 UTC) + Duration::seconds(s.into()));
        let samples = [9, 3, 3, 1, 7].map(|s| t(s).unwrap()).to_vec();
        assert_eq!(
            range_starts(t(2), samples.clone()),
            [t(2), t(3), t(7), t(9)]
        );
        assert_eq!(range_starts(None, samples), [None, t(1), t(3), t(7), t(9)]);
        assert_eq!(range_starts(t(2), Vec::new()), [t(2)]);
    }

    #[test]
    fn the_watermark_waits_for_the_first_unfinished_range() {
        let t = |s: u8| Some(datetime!(2024-01-01 00:00:00 UTC) + Duration::seconds(s.into()));
        let mut frontier = Frontier::new(&[None, t(10), t(20)]);
        assert_eq!(frontier.watermark(), None);
        // Later ranges finishing first move nothing.
        frontier.reach(t(10), t(20), t(20), true);
        frontier.reach(t(20), None, t(25), false);
        assert_eq!(frontier.watermark(), None);
        frontier.reach(None, t(10), t(4), false);
        assert_eq!(frontier.watermark(), t(4));
        // Once the front range finishes, the watermark runs on to the first unfinished one.
        frontier.reach(None, t(10), t(10), true);
        assert_eq!(frontier.watermark(), t(25));
        frontier.reach(t(20), None, t(30), true);
        assert_eq!(frontier.watermark(), t(30));
        // A range never goes back.
        frontier.reach(t(20), None, t(1), false);
        assert_eq!(frontier.watermark(), t(30));
    }

    #[test]
    fn a_range_split_while_read_holds_the_watermark_until_both_parts_are_read() {
        let t = |s: u8| Some(datetime!(2024-01-01 00:00:00 UTC) + Duration::seconds(s.into()));
        let mut frontier = Frontier::new(&[t(0), t(10)]);
        frontier.reach(t(10), None, t(20), true);
        frontier.reach(t(0), t(10), t(2), false);
        // (0, 10] is split at 6: its reader now ends at 6 and finishes before the reader of
        // (6, 10] has said anything: nothing past 6 is read for sure.
        frontier.reach(t(0), t(6), t(6), true);
        assert_eq!(frontier.watermark(), t(6));
        frontier.reach(t(6), t(10), t(8), false);
        assert_eq!(frontier.watermark(), t(8));
        frontier.reach(t(6), t(10), t(10), true);
        assert_eq!(frontier.watermark(), t(20));
        // The part split off may report first, even finished: the watermark still waits for
        // the range it came from.
        let mut frontier = Frontier::new(&[t(0)]);
        frontier.reach(t(6), None, t(10), true);
        assert_eq!(frontier.watermark(), t(0));
        frontier.reach(t(0), t(6), t(6), true);
        assert_eq!(frontier.watermark(), t(10));
    }

    #[test]
    fn ids_in_order_violations_cannot_forge_log_lines() {
        let page: Vec<Procedure> = [
            ("b\nERROR forged", "2024-01-01T00:00:02Z"),
            ("a", "2024-01-01T00:00:01Z"),
        ]
        .iter()
        .map(|(id, t)| {
            let raw = serde_json::json!({"id": id, "updated_at": t}).to_string();
            parse_item(&raw).unwrap()
        })
        .collect();
        let err = check_order(&page, None).unwrap_err();
        assert!(
            !err.contains('\n') && err.contains(r#""b\nERROR forged""#),
            "{err}"
        );
    }

    #[test]
    fn order_violations_are_caught() {
        let page = at(&["2024-01-01T00:00:02Z", "2024-01-01T00:00:01Z"]);
        assert!(check_order(&page, None).unwrap_err().contains("not sorted"));
        let page = at(&["2024-01-01T00:00:01Z"]);
        let err = check_order(&page, Some(datetime!(2024-01-01 00:00:01 UTC))).unwrap_err();
        assert!(err.contains("not after"), "{err}");
        check_order(&page, Some(datetime!(2024-01-01 00:00:00.999999 UTC))).unwrap();
    }
}
