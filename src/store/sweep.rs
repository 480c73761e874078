//! Deletion detection after a complete backfill: live procedures the run did not see are
//! marked deleted, unless so many would go at once that an API fault is likelier.

use time::OffsetDateTime;

use super::{RunId, StoreError, Tx};

pub(crate) trait SweepTx: Tx {
    async fn count_live(&mut self) -> Result<u64, StoreError>;
    /// Live procedures `run` did not record in `sync_seen`.
    async fn count_unseen(&mut self, run: RunId) -> Result<u64, StoreError>;
    async fn mark_unseen_deleted(
        &mut self,
        run: RunId,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// Drops the ids of `run` and of backfills killed before it finished.
    async fn clear_seen(&mut self, run: RunId) -> Result<(), StoreError>;
}

/// Marks the unseen deleted in one transaction; returns how many.
pub(crate) async fn mark_unseen_deleted(
    mut tx: impl SweepTx,
    run: RunId,
    max_share: f64,
) -> Result<u64, StoreError> {
    let live = tx.count_live().await?;
    let unseen = tx.count_unseen(run).await?;
    guard(unseen, live, max_share)?;
    if unseen > 0 {
        tx.mark_unseen_deleted(run, OffsetDateTime::now_utc())
            .await?;
    }
    tx.clear_seen(run).await?;
    tx.commit().await?;
    Ok(unseen)
}

fn guard(unseen: u64, live: u64, max_share: f64) -> Result<(), StoreError> {
    if unseen > 0 && unseen as f64 > max_share * live as f64 {
        return Err(StoreError::DeletionGuard {
            unseen,
            live,
            max_share,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::guard;

    #[test]
    fn the_guard_refuses_more_than_the_share_and_nothing_else() {
        assert!(guard(0, 0, 0.0).is_ok());
        assert!(guard(10, 100, 0.1).is_ok());
        assert!(guard(11, 100, 0.1).is_err());
        assert!(
            guard(1, 0, 1.0).is_err(),
            "unseen but none live: a count gone wrong"
        );
        assert!(guard(100, 100, 1.0).is_ok());
    }
}
