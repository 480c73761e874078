//! Mutual exclusion between klarify-sync processes that share one database.
//!
//! Two locks: the *leader* lock, held by one daemon for as long as it lives, decides which of
//! several replicas runs the schedule; the *pass* lock, held for one pass by whoever syncs
//! (daemon, `--once`, `--backfill`), keeps two passes from writing at once. On PostgreSQL they
//! are session advisory locks on a connection kept out of the pool, so a process that dies
//! releases them with its session; on SQLite they are OS file locks beside the database file,
//! which the kernel releases when the process dies.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, Connection};

use super::{Store, StoreError};

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

/// How a backend locks.
#[derive(Debug, Clone)]
pub(crate) enum Locking {
    Advisory,
    /// Lock files are named after the database file; `None` for an in-memory database, which
    /// no other process can share.
    Files(Option<PathBuf>),
}

/// A held lock; dropping it releases it.
pub struct LockGuard {
    held: Held,
}

enum Held {
    Advisory(AnyConnection),
    File(#[allow(dead_code)] File), // held for its OS lock, which closing releases
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

impl Store {
    /// Takes the lock when nobody holds it; `None` when another process does.
    pub async fn try_lock(&self, kind: LockKind) -> Result<Option<LockGuard>, StoreError> {
        let held = match &self.locking {
            Locking::Advisory => {
                let mut conn: PoolConnection<Any> = self.pool.acquire().await?;
                let (locked,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                    .bind(kind.advisory_key())
                    .fetch_one(&mut *conn)
                    .await?;
                if !locked {
                    return Ok(None);
                }
                // Out of the pool, so that no one else's queries ever run in the locking session.
                Held::Advisory(conn.detach())
            }
            Locking::Files(None) => Held::Nothing,
            Locking::Files(Some(db)) => {
                let mut path = db.clone().into_os_string();
                path.push(".");
                path.push(kind.file_suffix());
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|e| {
                        StoreError::Lock(format!(
                            "cannot open {}: {e}",
                            PathBuf::from(&path).display()
                        ))
                    })?;
                match file.try_lock() {
                    Ok(()) => Held::File(file),
                    Err(TryLockError::WouldBlock) => return Ok(None),
                    Err(TryLockError::Error(e)) => {
                        return Err(StoreError::Lock(format!(
                            "cannot lock {}: {e}",
                            PathBuf::from(&path).display()
                        )))
                    }
                }
            }
        };
        Ok(Some(LockGuard { held }))
    }
}
