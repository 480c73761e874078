//! What the store takes and gives: pages to write, passes to record, and what `status`, the
//! status page and `graph` read back. The same for both backends.

use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use crate::klarify::{format_instant, Procedure, Rejected};

/// Identifies one row of `sync_runs`.
pub type RunId = i64;

/// What a pass reads, as `sync_runs.mode` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the stored watermark (less the overlap).
    Incremental,
    /// Everything, then deletion detection.
    Backfill,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Incremental => "incremental",
            Mode::Backfill => "backfill",
        }
    }
}

/// A page ready to be committed, with the cursor it moves to.
#[derive(Debug)]
pub struct PageWrite<'a> {
    pub run: RunId,
    pub items: &'a [Procedure],
    pub rejected: &'a [Rejected],
    /// The new stored watermark, committed with the items or not at all.
    pub watermark: Option<OffsetDateTime>,
    /// Record the ids for deletion detection (backfills).
    pub track_seen: bool,
    /// Tie groups read without proof that every member was served; recorded with the items
    /// read of them, so that no watermark past them is committed without the record.
    pub unproven: &'a [UnprovenGroup],
    /// Unproven groups of earlier passes now read completely; their records go with the items.
    pub proven: &'a [OffsetDateTime],
}

/// A tie group a pass read while it changed and could not prove it read completely
/// (docs/sync.md, "Unproven groups").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnprovenGroup {
    /// The `updated_at` its members share.
    pub at: OffsetDateTime,
    /// At most this many procedures shared it at the instant it was last measured.
    pub size_bound: u64,
    /// How many of them were served after that measurement.
    pub size_counted: u64,
}

/// An unproven group as stored, for the next pass, `status` and `/readyz`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StoredUnproven {
    #[serde(serialize_with = "instant")]
    pub at: OffsetDateTime,
    pub size_bound: i64,
    pub size_counted: i64,
    #[serde(serialize_with = "instant")]
    pub recorded_at: OffsetDateTime,
    #[serde(serialize_with = "instant")]
    pub checked_at: OffsetDateTime,
    pub checks: i64,
}

/// What a page write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Rejected items not seen before (already known ones are only re-stamped).
    pub new_rejected: u64,
}

impl std::ops::AddAssign for WriteStats {
    fn add_assign(&mut self, o: Self) {
        self.inserted += o.inserted;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
        self.new_rejected += o.new_rejected;
    }
}

/// How a pass ended, as `sync_runs.outcome` and the metrics' `outcome` label spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunOutcome {
    Running,
    Succeeded,
    Failed,
    Interrupted,
    /// Its process died mid-pass; set by the next pass.
    Abandoned,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
            Self::Abandoned => "abandoned",
        }
    }

    /// `None` for a word this version does not write (a later version's, or a hand edit).
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Interrupted,
            Self::Abandoned,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The end of a pass, as recorded in `sync_runs`.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub outcome: RunOutcome,
    pub pages: u64,
    pub fetched: u64,
    pub stats: WriteStats,
    pub rejected: u64,
    pub deleted: u64,
    pub watermark_after: Option<OffsetDateTime>,
    pub error: Option<String>,
}

impl RunRecord {
    /// The counts as `sync_runs` stores them, in its column order from `pages` to `rejected`.
    pub(crate) fn counts(&self) -> [i64; 7] {
        let c = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        [
            c(self.pages),
            c(self.fetched),
            c(self.stats.inserted),
            c(self.stats.updated),
            c(self.stats.unchanged),
            c(self.deleted),
            c(self.rejected),
        ]
    }
}

impl TryFrom<String> for RunOutcome {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("unknown pass outcome {s:?}"))
    }
}

/// One row of `sync_runs`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunSummary {
    pub id: i64,
    #[serde(serialize_with = "instant")]
    pub started_at: OffsetDateTime,
    #[serde(serialize_with = "optional_instant")]
    pub finished_at: Option<OffsetDateTime>,
    pub mode: String,
    #[sqlx(try_from = "String")]
    pub outcome: RunOutcome,
    pub pages: i64,
    pub fetched: i64,
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub rejected: i64,
    #[serde(serialize_with = "optional_instant")]
    pub watermark_after: Option<OffsetDateTime>,
    pub error: Option<String>,
}

/// The table sizes `status` shows.
#[derive(Debug, Default, Clone, Copy, Serialize, sqlx::FromRow)]
pub struct Counts {
    pub live_procedures: i64,
    pub deleted_procedures: i64,
    pub lanes: i64,
    pub calls: i64,
    pub rejected_items: i64,
}

/// What `klarify-sync status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub backend: &'static str,
    #[serde(serialize_with = "optional_instant")]
    pub watermark: Option<OffsetDateTime>,
    #[serde(flatten)]
    pub counts: Counts,
    /// Live procedures dated after now plus `sync.max_future_skew_secs`: stored, and read again
    /// by every pass, because the watermark never follows them.
    pub future_dated: i64,
    pub unproven_tie_groups: Vec<StoredUnproven>,
    pub recent_runs: Vec<RunSummary>,
}

/// A live procedure as a node of the call graph.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GraphNode {
    pub id: String,
    pub name: Option<String>,
    pub status: Option<String>,
    pub owner: Option<String>,
}

/// One row of the `procedure_call_edges` view (docs/schema.md).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallEdge {
    pub procedure_id: String,
    pub relation: String,
    pub related_name: String,
    pub related_procedure_id: Option<String>,
    pub resolution: String,
    pub candidates: i64,
}

/// Instants leave klarify-sync in one form, the one SQLite stores and the API sends.
fn instant<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_instant(*t))
}

fn optional_instant<S: Serializer>(t: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => instant(t, s),
        None => s.serialize_none(),
    }
}

/// The procedures, lanes and calls a page writes, and the rejected items; planned once
/// ([`super::write`]), executed by each backend.
#[derive(Debug)]
pub(crate) struct ProcRow<'a> {
    pub procedure: &'a Procedure,
    pub content_hash: String,
    /// `procedures.key`: the stored one, or the next free one for a new procedure.
    pub key: i64,
}

#[derive(Debug)]
pub(crate) struct RejectRow<'a> {
    pub raw_hash: String,
    pub rejected: &'a Rejected,
}
