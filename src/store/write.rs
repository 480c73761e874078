//! Writing a page: what changed, which versions go to the history, and the order of the
//! statements, decided once here; each backend's [`WriteTx`] only executes.

use std::collections::HashMap;
use std::time::Instant;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::model::{PageWrite, ProcRow, RejectRow, RunId, UnprovenGroup, WriteStats};
use super::StoreError;
use crate::klarify::{untrusted, Procedure};

/// The stored state of one procedure, enough to decide whether a served item changes it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Stored {
    pub key: i64,
    pub updated_at: OffsetDateTime,
    pub content_hash: String,
    pub deleted: bool,
}

/// The version a stored procedure takes: its current row and lanes go to the history first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Version<'a> {
    pub id: &'a str,
    pub updated_at: OffsetDateTime,
}

/// The statements of a page write, on one transaction of a backend's writer. Every slice is
/// non-empty; ids are distinct within a call.
pub(crate) trait WriteTx: super::Tx {
    /// The key the next new procedure takes: past every stored one, so that new procedures'
    /// lanes and calls go to the end of their trees.
    async fn next_key(&mut self) -> Result<i64, StoreError>;
    /// The stored state of those of `ids` the mirror holds.
    async fn existing(&mut self, ids: &[&str]) -> Result<HashMap<String, Stored>, StoreError>;
    /// Moves the current row and lanes of each procedure into the history, dropping any history
    /// rows of the versions they take (a procedure may come back at a version it had).
    async fn archive(&mut self, versions: &[Version<'_>]) -> Result<(), StoreError>;
    /// Removes the lanes and calls of procedures about to be rewritten, by their keys.
    async fn delete_children(&mut self, keys: &[i64]) -> Result<(), StoreError>;
    /// Inserts `procedures` rows the mirror does not hold (the lookup before, in the same
    /// transaction, found none); a backend may write them faster than an upsert.
    async fn insert_procedures(
        &mut self,
        rows: &[ProcRow<'_>],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.upsert_procedures(rows, now).await
    }
    /// Upserts `procedures` rows, never over a newer stored version, reviving deleted ones.
    async fn upsert_procedures(
        &mut self,
        rows: &[ProcRow<'_>],
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// The lanes of `rows` ([`lanes`]; there may be none).
    async fn insert_lanes(&mut self, rows: &[ProcRow<'_>]) -> Result<(), StoreError>;
    /// The calls of `rows` ([`calls`]; there may be none).
    async fn insert_calls(&mut self, rows: &[ProcRow<'_>]) -> Result<(), StoreError>;
    async fn insert_seen(&mut self, run: RunId, ids: &[&str]) -> Result<(), StoreError>;
    /// Upserts rejected items; returns the hashes of those not stored before.
    async fn upsert_rejected(
        &mut self,
        rows: &[RejectRow<'_>],
        now: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError>;
    async fn record_unproven(
        &mut self,
        group: &UnprovenGroup,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;
    async fn delete_unproven(&mut self, at: OffsetDateTime) -> Result<(), StoreError>;
    async fn set_watermark(&mut self, watermark: OffsetDateTime) -> Result<(), StoreError>;
}

/// Writes one page in `tx`: procedures that are new or changed, their lanes and calls, the
/// rejected items, the tie-group records and the cursor. All or nothing.
pub(crate) async fn write_page(
    mut tx: impl WriteTx,
    page: &PageWrite<'_>,
    batch_items: usize,
) -> Result<WriteStats, StoreError> {
    let started = Instant::now();
    let now = OffsetDateTime::now_utc();
    let items = latest_per_id(page.items);
    let mut stats = WriteStats::default();
    for chunk in items.chunks(batch_items) {
        let ids: Vec<&str> = chunk.iter().map(|p| p.id.as_str()).collect();
        stats += write_procedures(&mut tx, chunk, &ids, now).await?;
        if page.track_seen {
            timed("insert_seen", tx.insert_seen(page.run, &ids)).await?;
        }
    }
    if !page.rejected.is_empty() {
        // One batch may hold an item twice (re-read pages), and PostgreSQL's upsert refuses
        // to touch one row twice in a statement: that failed the batch on every pass.
        let mut distinct = std::collections::HashSet::new();
        let rejected: Vec<RejectRow> = page
            .rejected
            .iter()
            .map(|r| RejectRow {
                raw_hash: content_hash(&r.raw),
                rejected: r,
            })
            .filter(|r| distinct.insert(r.raw_hash.clone()))
            .collect();
        let fresh = timed("upsert_rejected", tx.upsert_rejected(&rejected, now)).await?;
        for r in rejected.iter().filter(|r| fresh.contains(&r.raw_hash)) {
            tracing::warn!(
                reason = r.rejected.reason,
                raw = %untrusted(&r.rejected.raw),
                "Klarify served an item that cannot be understood; kept in rejected_items"
            );
            stats.new_rejected += 1;
        }
    }
    for g in page.unproven {
        tx.record_unproven(g, now).await?;
    }
    for &at in page.proven {
        tx.delete_unproven(at).await?;
    }
    if let Some(w) = page.watermark {
        timed("set_watermark", tx.set_watermark(w)).await?;
    }
    timed("commit", tx.commit()).await?;
    metrics::histogram!("klarify_sync_db_write_duration_seconds").record(started.elapsed());
    Ok(stats)
}

/// Writes the procedures among `items` that are new or changed, with their lanes and calls;
/// the versions they replace go to the history.
async fn write_procedures(
    tx: &mut impl WriteTx,
    items: &[&Procedure],
    ids: &[&str],
    now: OffsetDateTime,
) -> Result<WriteStats, StoreError> {
    let stored = timed("existing", tx.existing(ids)).await?;
    // Only new procedures take keys; a batch of stored ones asks for none.
    let next_key = if items.iter().any(|p| !stored.contains_key(&p.id)) {
        tx.next_key().await?
    } else {
        0
    };
    let plan = Plan::new(items, &stored, next_key);
    if plan.rows.is_empty() {
        return Ok(plan.stats);
    }
    // New procedures have nothing to archive or replace (foreign keys guarantee it), so a
    // backfill into an empty mirror skips these statements altogether.
    if !plan.new_versions.is_empty() {
        timed("archive_versions", tx.archive(&plan.new_versions)).await?;
    }
    if !plan.replaced.is_empty() {
        timed("delete_replaced", tx.delete_children(&plan.replaced)).await?;
    }
    let (new, stored) = plan.rows.split_at(plan.new);
    // One metrics step for both statements: `upsert_procedures` times every procedure written.
    let write = async {
        if !new.is_empty() {
            tx.insert_procedures(new, now).await?;
        }
        if !stored.is_empty() {
            tx.upsert_procedures(stored, now).await?;
        }
        Ok(())
    };
    timed("upsert_procedures", write).await?;
    timed("insert_lanes", tx.insert_lanes(&plan.rows)).await?;
    timed("insert_calls", tx.insert_calls(&plan.rows)).await?;
    Ok(plan.stats)
}

/// What a batch changes, from what is stored of it.
#[derive(Debug)]
struct Plan<'a> {
    stats: WriteStats,
    /// New or changed: written, the new ones first.
    rows: Vec<ProcRow<'a>>,
    /// How many of `rows` are new.
    new: usize,
    /// Stored and rewritten: their lanes and calls go first.
    replaced: Vec<i64>,
    /// Stored at another version: the stored one goes to the history.
    new_versions: Vec<Version<'a>>,
}

impl<'a> Plan<'a> {
    fn new(items: &[&'a Procedure], stored: &HashMap<String, Stored>, mut next_key: i64) -> Self {
        let mut plan = Plan {
            stats: WriteStats::default(),
            rows: Vec::new(),
            new: 0,
            replaced: Vec::new(),
            new_versions: Vec::new(),
        };
        let mut changed = Vec::new();
        for &p in items {
            let hash = content_hash(&p.raw);
            match stored.get(&p.id) {
                None => plan.stats.inserted += 1,
                // An older copy (re-reads arrive out of order) or the same content: leave the row
                // be. A row marked deleted takes whatever is served: the API says it exists.
                Some(s)
                    if !s.deleted && (s.updated_at > p.updated_at || s.content_hash == hash) =>
                {
                    plan.stats.unchanged += 1;
                    continue;
                }
                Some(s) => {
                    // The same version rewritten (or revived) stays one version.
                    if s.updated_at != p.updated_at {
                        plan.new_versions.push(Version {
                            id: &p.id,
                            updated_at: p.updated_at,
                        });
                    }
                    plan.replaced.push(s.key);
                    plan.stats.updated += 1;
                }
            }
            match stored.get(&p.id) {
                Some(s) => changed.push(ProcRow {
                    procedure: p,
                    content_hash: hash,
                    key: s.key,
                }),
                None => {
                    plan.rows.push(ProcRow {
                        procedure: p,
                        content_hash: hash,
                        key: next_key,
                    });
                    next_key += 1;
                }
            }
        }
        plan.new = plan.rows.len();
        plan.rows.extend(changed);
        plan
    }
}

/// A procedure's key and id, with which its lanes and calls are stored.
pub(crate) type Owner<'a> = (i64, &'a str);

/// The lanes of `rows`: owner, position, lane.
pub(crate) fn lanes<'a>(
    rows: &'a [ProcRow<'a>],
) -> impl Iterator<Item = (Owner<'a>, i32, &'a str)> {
    rows.iter().flat_map(|r| {
        let p = r.procedure;
        (0..)
            .zip(&p.lanes)
            .map(move |(i, l)| ((r.key, p.id.as_str()), i, l.as_str()))
    })
}

/// The calls of `rows`: owner, relation, position, related name.
pub(crate) fn calls<'a>(
    rows: &'a [ProcRow<'a>],
) -> impl Iterator<Item = (Owner<'a>, &'static str, i32, &'a str)> {
    rows.iter().flat_map(|r| {
        let p = r.procedure;
        [
            ("called_within", &p.called_within),
            ("called_from", &p.called_from),
        ]
        .into_iter()
        .flat_map(move |(relation, names)| {
            (0..)
                .zip(names)
                .map(move |(i, n)| ((r.key, p.id.as_str()), relation, i, n.as_str()))
        })
    })
}

/// Runs one part of a batch write and records its time by name: where the writer's time goes
/// (docs/performance.md) is what bounds a backfill.
pub(crate) async fn timed<T>(
    statement: &'static str,
    run: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = run.await;
    metrics::histogram!("klarify_sync_db_statement_duration_seconds", "statement" => statement)
        .record(started.elapsed());
    result
}

/// A page may serve one id twice (the vendor promises nothing); the newest copy wins, and for
/// equal timestamps the later one, as it is the last the server said.
fn latest_per_id(items: &[Procedure]) -> Vec<&Procedure> {
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    let mut out: Vec<&Procedure> = Vec::with_capacity(items.len());
    for p in items {
        match position.get(p.id.as_str()) {
            Some(&i) if out[i].updated_at > p.updated_at => {}
            Some(&i) => out[i] = p,
            None => {
                position.insert(&p.id, out.len());
                out.push(p);
            }
        }
    }
    out
}

/// Lowercase hex SHA-256, formatted in one pass (a `format!` per byte cost more than hashing).
pub(crate) fn content_hash(raw: &str) -> String {
    format!("{:x}", Sha256::digest(raw.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, ts: &str, name: &str) -> Procedure {
        crate::klarify::parse_item(&format!(
            r#"{{"id":"{id}","updated_at":"{ts}","name":"{name}","lanes":["x","y"],"called_within":["n"]}}"#
        ))
        .unwrap()
    }

    /// Stored hashes must keep their form, or every row would look changed after an upgrade.
    #[test]
    fn content_hashes_are_lowercase_hex_sha256() {
        assert_eq!(
            content_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_newest_copy_of_a_duplicated_id_wins() {
        let page = [
            item("a", "2024-01-01T00:00:02Z", "a-new"),
            item("b", "2024-01-01T00:00:00Z", "b-first"),
            item("a", "2024-01-01T00:00:01Z", "a-old"),
            item("b", "2024-01-01T00:00:00Z", "b-last"),
        ];
        let names: Vec<_> = latest_per_id(&page)
            .iter()
            .map(|p| p.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a-new", "b-last"]);
    }

    /// The decisions of a write, without a database: what is new, unchanged, older, revived
    /// or another version.
    #[test]
    fn a_plan_writes_only_what_changed_and_archives_only_other_versions() {
        let new = item("new", "2024-01-01T00:00:05Z", "n");
        let same = item("same", "2024-01-01T00:00:05Z", "s");
        let older = item("older", "2024-01-01T00:00:01Z", "o");
        let edited = item("edited", "2024-01-01T00:00:05Z", "e2");
        let rewritten = item("rewritten", "2024-01-01T00:00:05Z", "r2");
        let revived = item("revived", "2024-01-01T00:00:05Z", "v");
        let stored_as = |p: &Procedure, ts: &str, deleted: bool, hash: Option<&str>| {
            let s = Stored {
                key: p.id.len() as i64,
                updated_at: crate::klarify::parse_instant(ts).unwrap(),
                content_hash: hash.map_or_else(|| content_hash(&p.raw), str::to_owned),
                deleted,
            };
            (p.id.clone(), s)
        };
        let stored: HashMap<String, Stored> = [
            stored_as(&same, "2024-01-01T00:00:05Z", false, None),
            stored_as(&older, "2024-01-01T00:00:09Z", false, Some("other")),
            stored_as(&edited, "2024-01-01T00:00:02Z", false, Some("other")),
            stored_as(&rewritten, "2024-01-01T00:00:05Z", false, Some("other")),
            stored_as(&revived, "2024-01-01T00:00:05Z", true, None),
        ]
        .into_iter()
        .collect();
        let items = [&new, &same, &older, &edited, &rewritten, &revived];
        let plan = Plan::new(&items, &stored, 40);
        let written: Vec<&str> = plan.rows.iter().map(|r| r.procedure.id.as_str()).collect();
        assert_eq!(written, ["new", "edited", "rewritten", "revived"]);
        assert_eq!(plan.new, 1);
        let keys = |ids: &[&str]| ids.iter().map(|id| id.len() as i64).collect::<Vec<_>>();
        assert_eq!(plan.replaced, keys(&["edited", "rewritten", "revived"]));
        assert_eq!(
            plan.rows[0].key, 40,
            "a new procedure takes the next free key"
        );
        let versions: Vec<&str> = plan.new_versions.iter().map(|v| v.id).collect();
        assert_eq!(versions, ["edited"]);
        assert_eq!(
            plan.stats,
            WriteStats {
                inserted: 1,
                updated: 3,
                unchanged: 2,
                new_rejected: 0
            }
        );
        assert_eq!(
            lanes(&plan.rows).take(2).collect::<Vec<_>>(),
            [((40, "new"), 0, "x"), ((40, "new"), 1, "y")]
        );
        assert_eq!(
            calls(&plan.rows).next(),
            Some(((40, "new"), "called_within", 0, "n"))
        );
    }
}
