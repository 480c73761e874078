//! The benchmark: klarify-sync as users run it, against `fake-klarify`, both as separate
//! processes, so wall time and peak memory are the whole process's and the fake's own memory
//! does not count.
//!
//!     cargo build --release --bins
//!     target/release/bench --procedures 10000,100000 --latency-ms 0 [--postgres postgres://…/postgres]
//!     target/release/bench --binary base=BASE/klarify-sync --binary new=target/release/klarify-sync
//!
//! For each size and backend it prints a row per scenario and binary: a backfill into an empty
//! database, an incremental pass with nothing changed, and one after 1,000 edits. Several
//! binaries are measured one after the other within each scenario, against one fake and each
//! into a database of its own. Before each backfill the oracle reads the same pages as fast as
//! the API allows (oracle.rs); its wall time is the floor the backfill is compared with.

mod oracle;
mod processes;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use processes::{beside_bench, Binary, Fake, Settings, KEY};
use sqlx::{Connection, Executor, PgConnection};

#[derive(Debug, Parser)]
struct Args {
    /// Organisation sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    procedures: Vec<usize>,
    /// Added by the fake to every response.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// klarify.concurrency for klarify-sync, and the oracle's requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// klarify.max_requests_per_second for klarify-sync. The shipped 250/s, a courtesy to the
    /// vendor, would be the floor of a 0 ms backfill (4.2 s for 100k); the bench measures what
    /// the pipeline and the database allow, as the oracle does.
    #[arg(long, default_value_t = 100_000)]
    max_requests_per_second: u32,
    /// An admin URL of a PostgreSQL server where the bench may create databases; without it
    /// only SQLite is measured.
    #[arg(long, env = "BENCH_DATABASE_URL")]
    postgres: Option<String>,
    /// A klarify-sync binary to measure, labelled LABEL or by its directory's name; repeat it to
    /// compare binaries back to back. Without it: the klarify-sync beside the bench.
    #[arg(long = "binary", value_name = "[LABEL=]PATH", value_parser = Binary::parse)]
    binaries: Vec<Binary>,
    /// The fake-klarify to serve the organisation; without it: the one beside the bench.
    #[arg(long, value_name = "PATH")]
    fake: Option<PathBuf>,
}

const EDITS: usize = 1000;

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.binaries.is_empty() {
        let path = beside_bench("klarify-sync")?;
        args.binaries
            .push(Binary::parse(&path.to_string_lossy()).map_err(anyhow::Error::msg)?);
    }
    let fake = match &args.fake {
        Some(path) => path.clone(),
        None => beside_bench("fake-klarify")?,
    };
    println!("| binary | backend | procedures | latency | scenario | wall s | procedures/s | requests | oracle s | wall ÷ oracle | rows written | peak RSS MiB | load |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &args.procedures {
        let dir = ScratchDir::create(n)?;
        let sqlite = (0..args.binaries.len())
            .map(|i| format!("sqlite://{}/bench-{n}-{i}.db", dir.0.display()))
            .collect();
        compare(&args, &fake, "sqlite", n, sqlite).await?;
        drop(dir);
        if let Some(admin) = &args.postgres {
            let names: Vec<String> = (0..args.binaries.len())
                .map(|i| format!("klarify_bench_{}_{n}_{i}", std::process::id()))
                .collect();
            let mut urls = Vec::new();
            for name in &names {
                urls.push(create_database(admin, name).await?);
            }
            let measured = compare(&args, &fake, "postgres", n, urls).await;
            // What went wrong in the measurement comes first; a failed drop only after it.
            let mut dropped = Ok(());
            for name in &names {
                dropped = dropped.and(drop_database(admin, name).await);
            }
            measured.and(dropped)?;
        }
    }
    Ok(())
}

/// Every binary through the three scenarios of one size and backend, one binary after the
/// other within each scenario, each into the database of the same index in `urls`.
async fn compare(
    args: &Args,
    fake_path: &Path,
    backend: &str,
    n: usize,
    urls: Vec<String>,
) -> anyhow::Result<()> {
    let mut fake = Fake::start(fake_path, n, args.latency_ms)?;
    let row = |fake: &mut Fake, i: usize, scenario: &str, oracle: Option<Duration>| {
        let binary = &args.binaries[i];
        let load = load_average();
        let before = fake.requests()?;
        let settings = Settings {
            fake_url: &fake.url,
            database_url: &urls[i],
            page_size: args.page_size,
            concurrency: args.concurrency,
            max_requests_per_second: args.max_requests_per_second,
        };
        // The backfill is the scenario the oracle reads for.
        let mode = if oracle.is_some() {
            "--backfill"
        } else {
            "--once"
        };
        let m = processes::sync(binary, &settings, &[mode])?;
        let requests = fake.requests()? - before;
        let written = processes::written(binary, &urls[i])?;
        let wall = m.wall.as_secs_f64();
        let (rate, oracle_s, ratio) = match oracle {
            Some(o) => (
                format!("{:.0}", n as f64 / wall),
                format!("{:.2}", o.as_secs_f64()),
                format!("{:.2}", wall / o.as_secs_f64()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {backend} | {n} | {} ms | {scenario} | {wall:.2} | {rate} | {requests} | {oracle_s} | {ratio} | {written} | {:.1} | {load} |",
            binary.label, args.latency_ms, m.peak_rss_mib
        );
        anyhow::Ok(())
    };
    for (i, url) in urls.iter().enumerate() {
        let floor = oracle::read_all(&fake.url, KEY, n, args.page_size, args.concurrency).await?;
        row(&mut fake, i, "backfill", Some(floor))?;
        settle(backend, url).await?;
    }
    for i in 0..urls.len() {
        row(&mut fake, i, "incremental, nothing changed", None)?;
    }
    fake.ask(&format!("edit {EDITS}"))?;
    for (i, url) in urls.iter().enumerate() {
        row(&mut fake, i, &format!("incremental, {EDITS} edits"), None)?;
        settle(backend, url).await?;
    }
    Ok(())
}

/// After a run that wrote: PostgreSQL's autovacuum would otherwise vacuum and analyse what it
/// wrote, and its checkpointer flush it, during the next binary's run, which then measures less
/// well than the first. Done here, outside the measured time, the database is at rest again.
async fn settle(backend: &str, url: &str) -> anyhow::Result<()> {
    if backend != "postgres" {
        return Ok(());
    }
    let mut conn = PgConnection::connect(url)
        .await
        .context("cannot connect to settle the database")?;
    for statement in ["VACUUM (ANALYZE)", "CHECKPOINT"] {
        conn.execute(statement)
            .await
            .with_context(|| format!("{statement} after a run"))?;
    }
    Ok(())
}

/// The 1-minute load average: the machine is shared, and a row measured under load says so.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "-".into())
}

async fn admin_connection(admin: &str) -> anyhow::Result<PgConnection> {
    PgConnection::connect(admin)
        .await
        .context("cannot connect to the --postgres server")
}

async fn create_database(admin: &str, name: &str) -> anyhow::Result<String> {
    let mut conn = admin_connection(admin).await?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .with_context(|| format!("cannot create database {name}"))?;
    let mut url = url::Url::parse(admin).context("--postgres is not a URL")?;
    url.set_path(name);
    Ok(url.to_string())
}

async fn drop_database(admin: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = admin_connection(admin).await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
        .await
        .with_context(|| format!("cannot drop database {name}"))?;
    Ok(())
}

/// The SQLite files of one size, removed once it is measured, also when that fails.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(n: usize) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("klarify-bench-{pid}-{n}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
