//! Mutual exclusion between klarify-sync processes that share one database.
//!
//! Two locks: the *leader* lock, held by one daemon for as long as it lives, decides which of
//! several replicas runs the schedule; the *pass* lock, held for one pass by whoever syncs
//! (daemon, `--once`, `--backfill`), keeps two passes from writing at once. On PostgreSQL they
//! are session advisory locks on a connection kept out of the pool, so a process that dies
//! releases them with its session; on SQLite they are OS file locks beside the database file,
//! which the kernel releases when the process dies.

use std::fs::{OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Connection;

use super::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Leader,
    Pass,
}

impl LockKind {
    /// Arbitrary but fixed advisory lock keys ("klarify" in ASCII, then the kind).
    fn advisory_key(self) -> i64 {
        match self {
            LockKind::Leader => 0x6b6c_6172_6966_7901,
            LockKind::Pass => 0x6b6c_6172_6966_7902,
        }
    }

    fn file_suffix(self) -> &'static str {
        match self {
            LockKind::Leader => "leader.lock",
            LockKind::Pass => "pass.lock",
        }
    }
}

/// A held lock; dropping it releases it.
pub struct LockGuard {
    held: Held,
}

enum Held {
    Advisory(PgConnection),
    File(#[allow(dead_code)] std::fs::File), // held for its OS lock, which closing releases
    Nothing,
}

impl LockGuard {
    /// Whether the lock is still ours: a PostgreSQL session that was cut took its lock with it.
    pub async fn is_held(&mut self) -> bool {
        match &mut self.held {
            Held::Advisory(conn) => conn.ping().await.is_ok(),
            Held::File(_) | Held::Nothing => true,
        }
    }

    pub async fn release(self) {
        if let Held::Advisory(conn) = self.held {
            // Ending the session releases the lock; an error means it is gone already.
            let _ = conn.close().await;
        }
    }
}

impl LockGuard {
    /// For an in-memory SQLite database, which no other process can share.
    pub(super) fn nothing() -> Self {
        Self {
            held: Held::Nothing,
        }
    }
}

/// A session advisory lock on a connection taken out of the pool, so that no one else's
/// queries ever run in the locking session; `None` when another session holds it.
pub(super) async fn advisory_lock(
    pool: &PgPool,
    kind: LockKind,
) -> Result<Option<LockGuard>, StoreError> {
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(kind.advisory_key())
        .fetch_one(&mut *conn)
        .await?;
    Ok(locked.then(|| LockGuard {
        held: Held::Advisory(conn.detach()),
    }))
}

/// An OS lock on a file named after the database file; `None` when another process holds it.
pub(super) fn file_lock(db: &Path, kind: LockKind) -> Result<Option<LockGuard>, StoreError> {
    let mut path = db.as_os_str().to_owned();
    path.push(".");
    path.push(kind.file_suffix());
    let path = PathBuf::from(path);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Lock(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(LockGuard {
            held: Held::File(file),
        })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(StoreError::Lock(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}
