//! Prometheus metrics: one process-wide recorder, rendered by `GET /metrics`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::{RunOutcome, RunRecord};
use crate::sync::Mode;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder on first use; later calls (tests start many daemons in one process)
/// share it. A program that embeds the library may have installed a recorder of its own: ours
/// then records nothing and `/metrics` shows nothing, rather than the daemon failing to start.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let seconds = [
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => describe(),
            Err(_) => tracing::warn!(
                "another metrics recorder is installed in this process; /metrics stays empty"
            ),
        }
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "klarify_sync_passes_total",
        "Sync passes by mode and outcome."
    );
    describe_histogram!(
        "klarify_sync_pass_duration_seconds",
        Unit::Seconds,
        "Duration of sync passes."
    );
    describe_counter!(
        "klarify_sync_procedures_total",
        "Procedures per page write by change: inserted, updated, unchanged, deleted."
    );
    describe_counter!(
        "klarify_sync_rejected_items_total",
        "Items Klarify served that could not be understood, first sightings."
    );
    describe_gauge!(
        "klarify_sync_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last successful pass."
    );
    describe_gauge!(
        "klarify_sync_watermark_timestamp_seconds",
        Unit::Seconds,
        "The stored watermark as Unix time."
    );
    describe_gauge!(
        "klarify_sync_watermark_age_seconds",
        Unit::Seconds,
        "How far the stored watermark lags behind now."
    );
    describe_histogram!(
        "klarify_sync_db_write_duration_seconds",
        Unit::Seconds,
        "Time to commit one page to the database."
    );
    describe_histogram!(
        "klarify_sync_db_statement_duration_seconds",
        Unit::Seconds,
        "Time of each part of a batch write (its statements and the commit), by statement."
    );
    describe_counter!(
        "klarify_api_requests_total",
        "Requests to the Klarify API by HTTP status (or timeout, unreachable, bad_body)."
    );
    describe_histogram!(
        "klarify_api_request_duration_seconds",
        Unit::Seconds,
        "Latency of Klarify API requests."
    );
    describe_gauge!(
        "klarify_sync_unproven_tie_groups",
        "Groups of procedures sharing one updated_at not yet proven read completely (members may be missing until a later pass proves them)."
    );
    describe_gauge!(
        "klarify_sync_future_dated_procedures",
        "Live procedures dated past now plus sync.max_future_skew_secs: stored, read again every pass, never followed by the watermark."
    );
    describe_counter!(
        "klarify_api_retries_total",
        "Klarify API requests retried after a transient failure."
    );
}

/// The stored watermark as last seen, so its age can be computed at scrape time.
static WATERMARK: AtomicI64 = AtomicI64::new(i64::MIN);

pub fn render() -> String {
    let handle = handle();
    let watermark = WATERMARK.load(Ordering::Relaxed);
    if watermark != i64::MIN {
        let age = time::OffsetDateTime::now_utc().unix_timestamp() - watermark;
        metrics::gauge!("klarify_sync_watermark_age_seconds").set(age as f64);
    }
    handle.run_upkeep();
    handle.render()
}

/// How a pass ended, as the `outcome` label of `klarify_sync_passes_total` spells it.
#[derive(Debug, Clone, Copy)]
enum PassEnd {
    /// As recorded in `sync_runs`.
    Recorded(RunOutcome),
    /// A panic, which records nothing.
    Panicked,
}

impl PassEnd {
    fn as_str(self) -> &'static str {
        match self {
            Self::Recorded(outcome) => outcome.as_str(),
            Self::Panicked => "panicked",
        }
    }
}

fn count_pass(mode: Mode, end: PassEnd) {
    metrics::counter!("klarify_sync_passes_total", "mode" => mode.as_str(), "outcome" => end.as_str())
        .increment(1);
}

/// A pass that panicked records nothing itself.
pub fn record_panicked_pass(mode: Mode) {
    count_pass(mode, PassEnd::Panicked);
}

/// Records the end of a pass, whatever its outcome.
pub fn record_pass(mode: Mode, r: &RunRecord, duration: Duration) {
    let outcome = r.outcome;
    metrics::histogram!("klarify_sync_pass_duration_seconds", "mode" => mode.as_str())
        .record(duration);
    count_pass(mode, PassEnd::Recorded(outcome));
    for (change, n) in [
        ("inserted", r.stats.inserted),
        ("updated", r.stats.updated),
        ("unchanged", r.stats.unchanged),
        ("deleted", r.deleted),
    ] {
        metrics::counter!("klarify_sync_procedures_total", "change" => change).increment(n);
    }
    metrics::counter!("klarify_sync_rejected_items_total").increment(r.stats.new_rejected);
    if outcome == RunOutcome::Succeeded {
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
        metrics::gauge!("klarify_sync_last_success_timestamp_seconds").set(now);
    }
    if let Some(w) = r.watermark_after {
        metrics::gauge!("klarify_sync_watermark_timestamp_seconds").set(w.unix_timestamp() as f64);
        WATERMARK.store(w.unix_timestamp(), Ordering::Relaxed);
    }
}

/// Records what a successful pass left unsure.
pub fn record_doubts(unproven_groups: u64, future_dated: u64) {
    metrics::gauge!("klarify_sync_unproven_tie_groups").set(unproven_groups as f64);
    metrics::gauge!("klarify_sync_future_dated_procedures").set(future_dated as f64);
}
