//! `klarify-sync status`: the watermark, the table sizes and the last passes, for people
//! (text) and for scripts (JSON).

use std::fmt::Write;

use crate::store::Status;

pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let watermark = s.watermark.as_deref().unwrap_or("none (never synced)");
    let _ = writeln!(out, "backend     {}", s.backend);
    let _ = writeln!(out, "watermark   {watermark}");
    let _ = writeln!(
        out,
        "procedures  {} live, {} deleted; {} lanes, {} calls; {} rejected items",
        s.live_procedures, s.deleted_procedures, s.lanes, s.calls, s.rejected_items
    );
    if s.future_dated > 0 {
        let _ = writeln!(
            out,
            "future      {} procedure(s) dated after now + sync.max_future_skew_secs: stored, read again every pass",
            s.future_dated
        );
    }
    for (i, g) in s.unproven_tie_groups.iter().enumerate() {
        let label = if i == 0 { "unproven" } else { "" };
        let _ = writeln!(
            out,
            "{label:<11} tie group at {}: at most {} procedure(s), {} served since; since {}, {} pass(es) tried",
            g.at, g.size_bound, g.size_counted, g.recorded_at, g.checks
        );
    }
    if s.recent_runs.is_empty() {
        let _ = writeln!(out, "passes      none yet");
    }
    for (i, r) in s.recent_runs.iter().enumerate() {
        let label = if i == 0 { "passes" } else { "" };
        let _ = writeln!(
            out,
            "{label:<11} #{} {} {} {}: {} pages, {} fetched, {} inserted, {} updated, {} unchanged, {} deleted, {} rejected{}",
            r.id,
            r.started_at,
            r.mode,
            r.outcome,
            r.pages,
            r.fetched,
            r.inserted,
            r.updated,
            r.unchanged,
            r.deleted,
            r.rejected,
            r.error.as_deref().map(|e| format!(" — {e}")).unwrap_or_default()
        );
    }
    out
}
