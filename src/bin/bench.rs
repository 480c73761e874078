//! The benchmark: klarify-sync as users run it, against `fake-klarify`, both as separate
//! processes, so wall time and peak memory are the whole process's and the fake's own memory
//! does not count.
//!
//!     cargo build --release --bins
//!     target/release/bench --procedures 10000,100000 --latency-ms 0 [--postgres postgres://…/postgres]
//!
//! For each size and backend it prints a row per scenario: a backfill into an empty database,
//! an incremental pass with nothing changed, and one after 1,000 edits.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

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
    /// klarify.concurrency for klarify-sync.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// An admin URL of a PostgreSQL server where the bench may create databases; without it
    /// only SQLite is measured.
    #[arg(long, env = "BENCH_DATABASE_URL")]
    postgres: Option<String>,
}

/// `fake-klarify` as a child, steered through its stdin.
struct Fake {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    url: String,
}

impl Fake {
    fn start(procedures: usize, latency_ms: u64) -> Self {
        let mut child = Command::new(sibling("fake-klarify"))
            .args([
                "--procedures",
                &procedures.to_string(),
                "--latency-ms",
                &latency_ms.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("fake-klarify starts (cargo build --release --bins)");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut url = String::new();
        stdout.read_line(&mut url).unwrap();
        Fake {
            child,
            stdin,
            stdout,
            url: url.trim().to_owned(),
        }
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        answer.trim().to_owned()
    }

    fn requests(&mut self) -> u64 {
        let answer = self.ask("requests");
        answer.trim_start_matches("requests ").parse().unwrap()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sibling binary in the same target directory.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe().unwrap().with_file_name(name)
}

struct Measured {
    wall: Duration,
    peak_rss_mib: f64,
}

/// Runs klarify-sync to completion and measures it with `wait4`, which reports the child's own
/// peak resident set size. (`wait4` reaps the child, so `Child::wait` is never called.)
#[allow(clippy::zombie_processes)]
fn sync(fake: &Fake, database_url: &str, settings: &Args, args: &[&str]) -> Measured {
    let started = Instant::now();
    let child = Command::new(sibling("klarify-sync"))
        .args(args)
        .env("KLARIFY_SYNC__KLARIFY__BASE_URL", &fake.url)
        .env("KLARIFY_ACCESS_KEY", "test-key")
        .env(
            "KLARIFY_SYNC__KLARIFY__PAGE_SIZE",
            settings.page_size.to_string(),
        )
        .env(
            "KLARIFY_SYNC__KLARIFY__CONCURRENCY",
            settings.concurrency.to_string(),
        )
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers to live locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert!(
        pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "klarify-sync {args:?} failed"
    );
    Measured {
        wall: started.elapsed(),
        peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

/// Rows written by the newest pass, from `sync_runs`.
fn written(database_url: &str) -> (u64, u64) {
    let out = Command::new(sibling("klarify-sync"))
        .args(["status", "--json", "--passes", "1"])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &status["recent_runs"][0];
    (
        run["inserted"].as_u64().unwrap(),
        run["updated"].as_u64().unwrap(),
    )
}

async fn fresh_postgres(admin: &str, name: &str) -> String {
    let pool = sqlx::PgPool::connect(admin).await.unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut url = url::Url::parse(admin).unwrap();
    url.set_path(name);
    url.to_string()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile_dir();
    println!("| backend | procedures | latency | scenario | wall s | procedures/s | requests | wall ÷ round-trip floor | rows written | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &n in &args.procedures {
        let mut backends = vec![("sqlite", format!("sqlite://{}/bench-{n}.db", dir.display()))];
        if let Some(admin) = &args.postgres {
            backends.push((
                "postgres",
                fresh_postgres(admin, &format!("klarify_bench_{n}")).await,
            ));
        }
        for (backend, url) in backends {
            let mut fake = Fake::start(n, args.latency_ms);
            let row = |scenario: &str, fake: &mut Fake, run_args: &[&str]| {
                let before = fake.requests();
                let m = sync(fake, &url, &args, run_args);
                let requests = fake.requests() - before;
                let (inserted, updated) = written(&url);
                let (rate, versus_floor) = match scenario {
                    "backfill" => {
                        // What the round trips allow: every page once, `concurrency` at a time.
                        let pages = n.div_ceil(args.page_size as usize) as f64;
                        let floor =
                            pages * args.latency_ms as f64 / 1000.0 / args.concurrency as f64;
                        (
                            format!("{:.0}", n as f64 / m.wall.as_secs_f64()),
                            if floor > 0.0 {
                                format!("{:.2} ({floor:.2} s)", m.wall.as_secs_f64() / floor)
                            } else {
                                "-".to_owned()
                            },
                        )
                    }
                    _ => ("-".to_owned(), "-".to_owned()),
                };
                println!(
                    "| {backend} | {n} | {} ms | {scenario} | {:.2} | {rate} | {requests} | {versus_floor} | {} | {:.1} |",
                    args.latency_ms,
                    m.wall.as_secs_f64(),
                    inserted + updated,
                    m.peak_rss_mib
                );
            };
            row("backfill", &mut fake, &["--backfill"]);
            row("incremental, nothing changed", &mut fake, &["--once"]);
            fake.ask("edit 1000");
            row("incremental, 1000 edits", &mut fake, &["--once"]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("klarify-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
