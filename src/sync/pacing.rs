//! When a bulk load builds its deferred indexes. Deferring them pays while the database is what
//! the pass waits for; built at the end, they cost about a second of wall time at 100k
//! procedures (docs/performance.md). When Klarify is the slower side (latency, a rate limit), the
//! writer idles between batches: then the indexes the backend keeps cheaply row by row are built
//! (`bulk_load::EarlyIndexes`: all of them on PostgreSQL, those over few distinct values on
//! SQLite), while the readers wait on Klarify, and what is left is written with them in place.
//! The foreign keys, and SQLite's name- and id-keyed indexes, stay for the end.

use std::time::Duration;

/// Batches in a row that must each have been written in at most half the time it took to
/// receive them. One could be luck (a pause of the reader for a retry); a writer that is the
/// bound is never this idle three times running.
const IDLE_BATCHES: u32 = 3;

#[derive(Debug, Default)]
pub(super) struct EarlyBuild {
    idle_in_a_row: u32,
}

impl EarlyBuild {
    /// Takes note of one batch: how long its write took, and how long it took to receive the
    /// next one. Returns whether the indexes should be built now.
    pub fn observe(&mut self, write: Duration, receive: Duration) -> bool {
        if write.saturating_mul(2) <= receive {
            self.idle_in_a_row += 1;
        } else {
            self.idle_in_a_row = 0;
        }
        self.idle_in_a_row >= IDLE_BATCHES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_writer_idle_three_batches_running_builds_the_indexes() {
        let mut pacing = EarlyBuild::default();
        assert!(!pacing.observe(40 * MS, 200 * MS));
        assert!(!pacing.observe(100 * MS, 200 * MS));
        assert!(pacing.observe(10 * MS, 200 * MS));
    }

    #[test]
    fn a_busy_batch_starts_the_count_again() {
        let mut pacing = EarlyBuild::default();
        assert!(!pacing.observe(40 * MS, 200 * MS));
        assert!(!pacing.observe(40 * MS, 200 * MS));
        assert!(!pacing.observe(101 * MS, 200 * MS));
        assert!(!pacing.observe(40 * MS, 200 * MS));
        assert!(!pacing.observe(40 * MS, 200 * MS));
        assert!(pacing.observe(40 * MS, 200 * MS));
    }

    #[test]
    fn a_writer_that_is_the_bound_keeps_deferring() {
        let mut pacing = EarlyBuild::default();
        for _ in 0..100 {
            // The write takes longer than receiving: the batch waited for it.
            assert!(!pacing.observe(150 * MS, 120 * MS));
        }
    }
}
