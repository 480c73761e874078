//! A pass into an empty mirror is a bulk load: the secondary indexes of the mirrored tables
//! (PostgreSQL: and the lanes' and calls' foreign keys) are dropped when it starts and built once,
//! sorted, at its end, which costs a fraction of keeping them row by row (docs/performance.md).
//! Each is recorded in `deferred_schema` with the statement that builds it, in the transaction
//! that drops it, so that a load killed before its end is finished by the next pass. A load
//! Klarify keeps waiting builds early the indexes its backend keeps cheaply row by row
//! ([`Restore::Early`]), never the foreign keys: checked row by row they cost more than the
//! indexes, and once at the end they are one join.

use std::time::Instant;

use super::{StoreError, Tx};

/// An index or constraint a bulk load builds at its end, never one behind a primary key or a
/// unique constraint (the writes rely on those).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Deferrable {
    /// What `deferred_schema` records of it.
    #[sqlx(flatten)]
    pub object: Deferred,
    pub drop: String,
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
    /// The indexes the backend keeps cheaply row by row ([`SchemaTx::EARLY_INDEXES`]), while
    /// the readers wait on Klarify.
    Early,
}

/// Which deferred indexes a load Klarify keeps waiting builds early: those its backend keeps
/// cheaply row by row for the rest of the load. Never the foreign keys.
#[derive(Debug, Clone, Copy)]
pub(crate) enum EarlyIndexes {
    All,
    /// These, by name; the others wait for the end of the load.
    Only(&'static [&'static str]),
}

/// One object `deferred_schema` records as dropped and not yet built again.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Deferred {
    pub name: String,
    pub kind: Kind,
    pub restore: String,
}

impl Restore {
    fn takes(self, d: &Deferred, early: EarlyIndexes) -> bool {
        match (self, early) {
            (Restore::All, _) => true,
            (Restore::Early, _) if d.kind != Kind::Index => false,
            (Restore::Early, EarlyIndexes::All) => true,
            (Restore::Early, EarlyIndexes::Only(names)) => names.contains(&d.name.as_str()),
        }
    }
}

/// Whether a drop went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    Yes,
    /// A reader holds the table (a BI session left in a transaction?).
    Blocked,
}

pub(crate) trait SchemaTx: Tx {
    const EARLY_INDEXES: EarlyIndexes;
    async fn any_procedure(&mut self) -> Result<bool, StoreError>;
    /// What may be dropped; also bounds how long the drops below wait for a reader's lock.
    async fn deferrable(&mut self) -> Result<Vec<Deferrable>, StoreError>;
    async fn drop_deferrable(&mut self, d: &Deferrable) -> Result<Dropped, StoreError>;
    async fn record_deferred(&mut self, d: &Deferred) -> Result<(), StoreError>;
    /// What was dropped and not yet built again.
    async fn deferred(&mut self) -> Result<Vec<Deferred>, StoreError>;
    async fn restore(&mut self, statement: &str) -> Result<(), StoreError>;
    async fn forget_deferred(&mut self, name: &str) -> Result<(), StoreError>;
}

/// Before a pass: when the mirror holds no procedure at all, drops what may be deferred.
/// Returns whether the mirror was empty. Call it holding the pass lock.
pub(crate) async fn defer(mut tx: impl SchemaTx) -> Result<bool, StoreError> {
    if tx.any_procedure().await? {
        return Ok(false);
    }
    for d in tx.deferrable().await? {
        tx.record_deferred(&d.object).await?;
        if tx.drop_deferrable(&d).await? == Dropped::Blocked {
            // Waiting would make every query after it queue behind the drop; the load keeps the
            // indexes, and the transaction's rollback keeps what was dropped before.
            tracing::info!(
                index = d.object.name,
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
pub(crate) async fn restore<T: SchemaTx>(mut tx: T, what: Restore) -> Result<usize, StoreError> {
    let started = Instant::now();
    let mut deferred = tx.deferred().await?;
    deferred.retain(|d| what.takes(d, T::EARLY_INDEXES));
    if deferred.is_empty() {
        return Ok(0);
    }
    for d in &deferred {
        tx.restore(&d.restore).await?;
        tx.forget_deferred(&d.name).await?;
    }
    tx.commit().await?;
    tracing::info!(
        built = deferred.len(),
        ?what,
        duration_ms = started.elapsed().as_millis() as u64,
        "built the indexes and constraints of the bulk load"
    );
    Ok(deferred.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deferred(name: &str, kind: Kind) -> Deferred {
        Deferred {
            name: name.to_owned(),
            kind,
            restore: String::new(),
        }
    }

    #[test]
    fn an_early_build_takes_the_cheap_indexes_and_never_a_constraint() {
        let cheap = EarlyIndexes::Only(&["status"]);
        let status = deferred("status", Kind::Index);
        let name = deferred("name", Kind::Index);
        let fk = deferred("status", Kind::Constraint);
        assert!(Restore::Early.takes(&status, cheap));
        assert!(!Restore::Early.takes(&name, cheap));
        assert!(Restore::Early.takes(&name, EarlyIndexes::All));
        assert!(!Restore::Early.takes(&fk, EarlyIndexes::All));
        for d in [&status, &name, &fk] {
            assert!(Restore::All.takes(d, cheap));
        }
    }
}
