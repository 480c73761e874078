//! A pass into an empty mirror is a bulk load: the secondary indexes of the mirrored tables
//! (PostgreSQL: and the lanes' and calls' foreign keys) are dropped when it starts and built once,
//! sorted, at its end, which costs a fraction of keeping them row by row (docs/performance.md).
//! Each is recorded in `deferred_schema` with the statement that builds it, in the transaction
//! that drops it, so that a load killed before its end is finished by the next pass. A load
//! Klarify keeps waiting builds the indexes early ([`Restore::Indexes`]), never the foreign keys:
//! checked row by row they cost more than the indexes, and once at the end they are one join.

use std::time::Instant;

use super::{StoreError, Tx};

/// An index or constraint a bulk load builds at its end, never one behind a primary key or a
/// unique constraint (the writes rely on those).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Deferrable {
    pub name: String,
    pub kind: Kind,
    pub drop: String,
    pub restore: String,
}

/// What a deferred object is, as `deferred_schema.kind` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub(crate) enum Kind {
    Index,
    /// A foreign key.
    Constraint,
}

/// What a [`restore`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Restore {
    /// Everything deferred: at the end of a load, and before a pass.
    All,
    /// The indexes only, while the readers wait on Klarify.
    Indexes,
}

/// Whether a drop went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    Yes,
    /// A reader holds the table (a BI session left in a transaction?).
    Blocked,
}

pub(crate) trait SchemaTx: Tx {
    async fn any_procedure(&mut self) -> Result<bool, StoreError>;
    /// What may be dropped; also bounds how long the drops below wait for a reader's lock.
    async fn deferrable(&mut self) -> Result<Vec<Deferrable>, StoreError>;
    async fn drop_deferrable(&mut self, d: &Deferrable) -> Result<Dropped, StoreError>;
    async fn record_deferred(&mut self, d: &Deferrable) -> Result<(), StoreError>;
    /// The restore statements of what was dropped and not yet built again, of `what`.
    async fn deferred(&mut self, what: Restore) -> Result<Vec<String>, StoreError>;
    async fn restore(&mut self, statement: &str) -> Result<(), StoreError>;
    async fn clear_deferred(&mut self, what: Restore) -> Result<(), StoreError>;
}

/// Before a pass: when the mirror holds no procedure at all, drops what may be deferred.
/// Returns whether the mirror was empty. Call it holding the pass lock.
pub(crate) async fn defer(mut tx: impl SchemaTx) -> Result<bool, StoreError> {
    if tx.any_procedure().await? {
        return Ok(false);
    }
    for d in tx.deferrable().await? {
        tx.record_deferred(&d).await?;
        if tx.drop_deferrable(&d).await? == Dropped::Blocked {
            // Waiting would make every query after it queue behind the drop; the load keeps the
            // indexes, and the transaction's rollback keeps what was dropped before.
            tracing::info!(
                index = d.name,
                "a reader holds the mirrored tables: this bulk load writes its indexes row by row"
            );
            return Ok(false);
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// Builds `what` of what [`defer`] dropped, in one transaction; also what a pass killed before
/// its end left out. Returns how many indexes and constraints it built.
pub(crate) async fn restore(mut tx: impl SchemaTx, what: Restore) -> Result<usize, StoreError> {
    let started = Instant::now();
    let deferred = tx.deferred(what).await?;
    if deferred.is_empty() {
        return Ok(0);
    }
    for statement in &deferred {
        tx.restore(statement).await?;
    }
    tx.clear_deferred(what).await?;
    tx.commit().await?;
    tracing::info!(
        built = deferred.len(),
        ?what,
        duration_ms = started.elapsed().as_millis() as u64,
        "built the indexes and constraints of the bulk load"
    );
    Ok(deferred.len())
}
