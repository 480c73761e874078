//! `klarify-sync status` and the daemon's status page: the watermark, the table sizes and the
//! last passes, for people (text, HTML) and for scripts (JSON).

use std::fmt::Write;

use time::OffsetDateTime;

use crate::http::{Reason, Role};
use crate::klarify::format_instant;
use crate::schedule::Cron;
use crate::store::{RunOutcome, RunSummary, Status};

pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let watermark = s
        .watermark
        .map_or_else(|| "none (never synced)".to_owned(), format_instant);
    let _ = writeln!(out, "backend     {}", s.backend);
    let _ = writeln!(out, "watermark   {watermark}");
    let _ = writeln!(
        out,
        "procedures  {} live, {} deleted; {} lanes, {} calls; {} rejected items",
        s.counts.live_procedures,
        s.counts.deleted_procedures,
        s.counts.lanes,
        s.counts.calls,
        s.counts.rejected_items
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
            format_instant(g.at),
            g.size_bound,
            g.size_counted,
            format_instant(g.recorded_at),
            g.checks
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
            format_instant(r.started_at),
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

/// What the daemon's status page (`GET /`) shows besides the mirror: read from the sync loop
/// and the settings, never a secret.
#[derive(Debug)]
pub struct Live<'a> {
    /// `Ok`: ready; `Err`: the reason and its explanation, as `/readyz` gives them.
    pub readiness: Result<(), (Reason, String)>,
    pub role: Role,
    /// When the pass running now started.
    pub syncing_since: Option<OffsetDateTime>,
    pub cron: &'a Cron,
    pub backfill_cron: Option<&'a Cron>,
    pub now: OffsetDateTime,
}

/// The status page: one self-contained document (inline style and chart, no script, nothing
/// fetched), every value from the database or the API HTML-escaped.
pub fn render_html(mirror: Result<&Status, &str>, live: &Live<'_>) -> String {
    let mut out = String::from(concat!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<meta http-equiv=\"refresh\" content=\"30\"><title>klarify-sync</title><style>",
        "body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}",
        "h1{font-size:1.5em;margin:0 0 .4em}h2{font-size:1.15em;margin:1.6em 0 .5em}",
        ".state{padding:.6em .9em;border-radius:6px;font-weight:600}",
        ".ok{background:#e6f4ea;color:#14532d}.bad{background:#fdecea;color:#7f1d1d}",
        "dl{display:grid;grid-template-columns:max-content auto;gap:.25em 1.2em}dt{color:#555}dd{margin:0}",
        "table{border-collapse:collapse;font-size:.92em}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left}",
        "td.n{text-align:right;font-variant-numeric:tabular-nums}code{background:#f3f3f3;padding:0 .25em}",
        ".err{color:#7f1d1d}svg text{font:11px sans-serif}</style></head><body>\n<h1>klarify-sync</h1>\n",
    ));
    match &live.readiness {
        Ok(()) => {
            out.push_str("<p class=\"state ok\">Ready: the mirror is in step with Klarify.</p>\n")
        }
        Err((reason, detail)) => {
            let _ = writeln!(
                out,
                "<p class=\"state bad\">Not ready ({}): {}</p>",
                esc(reason.as_str()),
                esc(detail)
            );
        }
    }
    out.push_str("<dl>\n");
    let role = match live.role {
        Role::Starting => "starting",
        Role::Leader => "leader: this instance runs the schedule",
        Role::Standby => {
            "standby: another instance leads on this database; this one takes over if it stops"
        }
    };
    dd(&mut out, "Role", role);
    let syncing = match live.syncing_since {
        Some(at) => format!("a pass is running, for {}", age(live.now - at)),
        None => "no pass is running".to_owned(),
    };
    dd(&mut out, "Syncing", &syncing);
    let backfill = live.backfill_cron.map_or_else(
        || "never".to_owned(),
        |c| format!("<code>{}</code>", esc(c.as_str())),
    );
    dd(
        &mut out,
        "Schedule",
        &format!(
            "incremental <code>{}</code>; full reconciliation {backfill}",
            esc(live.cron.as_str())
        ),
    );
    let s = match mirror {
        Ok(s) => s,
        Err(why) => {
            let _ = writeln!(
                out,
                "</dl>\n<p class=\"err\">The mirror cannot be read: {}</p>\n</body></html>",
                esc(why)
            );
            return out;
        }
    };
    let watermark = match s.watermark {
        Some(at) => format!("{} ({} ago)", format_instant(at), age(live.now - at)),
        None => "none: never synced".to_owned(),
    };
    dd(&mut out, "Watermark", &watermark);
    dd(&mut out, "Database", &esc(s.backend));
    dd(
        &mut out,
        "Procedures",
        &format!(
            "{} live, {} deleted; {} lanes, {} calls",
            s.counts.live_procedures, s.counts.deleted_procedures, s.counts.lanes, s.counts.calls
        ),
    );
    dd(
        &mut out,
        "Rejected items",
        &format!(
            "{} (unreadable items the API served; the table <code>rejected_items</code> holds them)",
            s.counts.rejected_items
        ),
    );
    if s.future_dated > 0 {
        dd(
            &mut out,
            "Future-dated",
            &format!(
                "{} procedure(s) dated after now + sync.max_future_skew_secs: read again every pass",
                s.future_dated
            ),
        );
    }
    out.push_str("</dl>\n<h2>Unproven tie groups</h2>\n");
    if s.unproven_tie_groups.is_empty() {
        out.push_str(
            "<p>None: every group of procedures sharing one instant was read completely.</p>\n",
        );
    } else {
        out.push_str("<p>Groups of procedures sharing one <code>updated_at</code> that changed while read; members may be missing until a pass proves them.</p>\n<table><tr><th>instant</th><th>at most</th><th>served since</th><th>since</th><th>passes tried</th></tr>\n");
        for g in &s.unproven_tie_groups {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=n>{}</td><td class=n>{}</td><td>{}</td><td class=n>{}</td></tr>",
                format_instant(g.at),
                g.size_bound,
                g.size_counted,
                format_instant(g.recorded_at),
                g.checks
            );
        }
        out.push_str("</table>\n");
    }
    out.push_str("<h2>Last passes</h2>\n");
    if s.recent_runs.is_empty() {
        out.push_str("<p>None yet.</p>\n");
    } else {
        out.push_str(&chart(&s.recent_runs));
        out.push_str("<table><tr><th>#</th><th>started</th><th>mode</th><th>outcome</th><th>duration</th><th>fetched</th><th>inserted</th><th>updated</th><th>deleted</th><th>rejected</th><th>error</th></tr>\n");
        for r in &s.recent_runs {
            let _ = writeln!(
                out,
                "<tr><td class=n>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=err>{}</td></tr>",
                r.id,
                format_instant(r.started_at),
                esc(&r.mode),
                r.outcome,
                duration(r).map(age).unwrap_or_default(),
                r.fetched,
                r.inserted,
                r.updated,
                r.deleted,
                r.rejected,
                esc(r.error.as_deref().unwrap_or_default())
            );
        }
        out.push_str("</table>\n");
    }
    out.push_str(concat!(
        "<h2>Call graph</h2>\n<form action=\"/graph.svg\" method=\"get\">",
        "<label>Procedure name <input name=\"around\" required size=\"40\"></label> ",
        "<label>calls away <select name=\"depth\"><option>1</option><option selected>2</option>",
        "<option>3</option><option>4</option></select></label> ",
        "<button>Draw (SVG)</button></form>\n",
        "<p>Drawn by Graphviz where klarify-sync runs (<code>apt-get install graphviz</code>); ",
        "the whole graph: <code>klarify-sync graph | dot -Tsvg &gt; procedures.svg</code>.</p>\n",
        "</body></html>\n",
    ));
    out
}

fn dd(out: &mut String, term: &str, html: &str) {
    let _ = writeln!(out, "<dt>{term}</dt><dd>{html}</dd>");
}

/// How long a finished pass took.
fn duration(r: &RunSummary) -> Option<time::Duration> {
    Some(r.finished_at? - r.started_at)
}

/// Two rows of bars, oldest pass first: how long each pass took, and how many procedures it
/// changed (inserted, updated or deleted), each scaled to its largest.
fn chart(runs: &[RunSummary]) -> String {
    const BAR: usize = 18;
    const HEIGHT: f64 = 60.0;
    let runs: Vec<&RunSummary> = runs.iter().rev().collect();
    let secs: Vec<f64> = runs
        .iter()
        .map(|r| duration(r).map_or(0.0, |d| d.as_seconds_f64().max(0.0)))
        .collect();
    let changes: Vec<i64> = runs
        .iter()
        .map(|r| r.inserted + r.updated + r.deleted)
        .collect();
    let max_secs = secs.iter().copied().fold(0.001, f64::max);
    let max_changes = changes.iter().copied().max().unwrap_or(0).max(1) as f64;
    let width = 90 + runs.len() * BAR;
    let mut svg = format!(
        "<svg role=\"img\" aria-label=\"durations and changes of the last passes\" width=\"{width}\" height=\"160\" viewBox=\"0 0 {width} 160\">\
         <text x=\"0\" y=\"40\">duration</text><text x=\"0\" y=\"54\" fill=\"#777\">max {}</text>\
         <text x=\"0\" y=\"120\">changes</text><text x=\"0\" y=\"134\" fill=\"#777\">max {max_changes}</text>",
        age(time::Duration::seconds_f64(max_secs))
    );
    for (i, r) in runs.iter().enumerate() {
        let x = 90 + i * BAR;
        let h = (secs[i] / max_secs * HEIGHT).max(1.0);
        let colour = if r.outcome == RunOutcome::Succeeded {
            "#3b82f6"
        } else {
            "#dc2626"
        };
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"{}\" height=\"{h:.1}\" fill=\"{colour}\"><title>#{} {} {}: {:.1}s</title></rect>",
            70.0 - h,
            BAR - 4,
            r.id,
            esc(&r.mode),
            r.outcome,
            secs[i]
        );
        let h = (changes[i] as f64 / max_changes * HEIGHT).max(1.0);
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"{}\" height=\"{h:.1}\" fill=\"#16a34a\"><title>#{}: {} changed</title></rect>",
            150.0 - h,
            BAR - 4,
            r.id,
            changes[i]
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// "3h 2m", "4m 10s", "12.3s".
fn age(d: time::Duration) -> String {
    let secs = d.whole_seconds().max(0);
    match secs {
        0..60 => format!("{:.1}s", d.as_seconds_f64().max(0.0)),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// Text made safe inside HTML elements and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
