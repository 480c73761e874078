//! `--demo`: a sample organisation served in-process on loopback, changing as a real one does,
//! so that a newcomer sees a whole sync work with no key and no network.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use crate::schedule::Cron;
use crate::store::redact_url;
use klarify_fake::{Churn, FakeKlarify, FakeOptions, Organisation};

/// Every 10 seconds, so edits made by the demo's churn show up quickly.
pub static CRON: LazyLock<Cron> = LazyLock::new(|| cron("*/10 * * * * *"));
/// Every minute, so deletions show up too.
pub static BACKFILL_CRON: LazyLock<Cron> = LazyLock::new(|| cron("0 * * * * *"));

fn cron(expr: &str) -> Cron {
    expr.parse()
        .expect("the demo's schedule is a valid cron expression")
}

const PROCEDURES: usize = 250;

/// Starts the demo organisation, which edits, adds and removes a few procedures every few seconds.
pub async fn start() -> std::io::Result<FakeKlarify> {
    let source = FakeKlarify::start(
        Organisation::generate(2024, PROCEDURES),
        FakeOptions::default(),
    )
    .await?;
    let churn = Churn {
        edits: 3,
        inserts: 1,
        deletes: 1,
        bulk: false,
    };
    source.spawn_background_churn(Duration::from_secs(7), churn);
    Ok(source)
}

/// What to look at, printed once the daemon listens.
pub fn banner(source: &FakeKlarify, database_url: &str, mut http: SocketAddr) {
    if http.ip().is_unspecified() {
        http.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let query = "SELECT status, COUNT(*) FROM live_procedures GROUP BY status";
    let look = match database_url.strip_prefix("sqlite:") {
        Some(file) => format!("sqlite3 {} \"{query}\"", file.trim_start_matches("//")),
        None => format!("psql \"$DATABASE_URL\" -c \"{query}\""),
    };
    println!(
        "\nklarify-sync demo: mirroring a sample organisation of {PROCEDURES} procedures from {} into {}\n\
         \x20 status:    http://{http}/ (in a browser)\n\
         \x20 readiness: curl http://{http}/readyz\n\
         \x20 metrics:   curl http://{http}/metrics\n\
         \x20 the data:  {look}\n\
         \x20 Ctrl-C stops it.\n",
        source.base_url(),
        redact_url(database_url),
    );
}
