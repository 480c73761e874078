//! The `klarify-sync` binary: parses the command line, loads the configuration, sets up
//! logging and signals, and hands over to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use klarify_sync::config::Settings;
use klarify_sync::daemon::{panic_message, Daemon, SyncPass};
#[cfg(feature = "demo")]
use klarify_sync::demo;
use klarify_sync::http::HttpLimits;
use klarify_sync::klarify::KlarifyClient;
use klarify_sync::progress_bar::Bar;
use klarify_sync::store::Store;
use klarify_sync::sync::{run_pass_observed, Mode, Progress, SyncOptions};
use klarify_sync::{graph, schedule, telemetry};
#[cfg(feature = "demo")]
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

/// Keeps a SQL database in step with an organisation's Klarify procedures.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Run one incremental sync from the stored watermark, then exit.
    #[arg(long, conflicts_with_all = ["backfill", "demo"])]
    once: bool,
    /// Re-read every procedure, mark the ones Klarify no longer serves as deleted, then exit.
    #[arg(long, conflicts_with = "demo")]
    backfill: bool,
    /// Mirror a built-in sample organisation (served in-process, no key, no network) into
    /// klarify-demo.db and keep syncing it.
    // Without the `demo` feature the flag stays, unlisted, so that asking for it says why it
    // cannot run instead of calling it an unknown argument.
    #[arg(long)]
    #[cfg_attr(not(feature = "demo"), arg(hide = true))]
    demo: bool,
    /// An extra TOML file layered over the defaults (the environment still wins).
    #[arg(long, value_name = "FILE", env = "KLARIFY_SYNC_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 when the daemon's /healthz answers (for container health checks).
    Healthcheck,
    /// Print the watermark, the table sizes and the last passes.
    Status {
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// How many passes to show.
        #[arg(long, default_value_t = 5)]
        passes: i64,
    },
    /// Print the live procedures' call graph from the mirror (Graphviz DOT by default).
    Graph {
        #[arg(long, value_enum, default_value_t)]
        format: graph::Format,
        /// Box the procedures by owner or by status.
        #[arg(long, value_enum)]
        group_by: Option<graph::GroupBy>,
        /// Only the procedures of this name and their neighbourhood (see --depth).
        #[arg(long, value_name = "NAME")]
        around: Option<String>,
        /// How many calls away from --around, either way.
        #[arg(long, value_name = "N", default_value_t = 2, requires = "around")]
        depth: usize,
        /// Write it to FILE instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    std::panic::set_hook(Box::new(log_panic));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(async {
            // On a task of its own, so that a panic anywhere in it ends the process like any
            // other failure: one line and exit code 1, not 101 and a backtrace.
            match tokio::spawn(async_main()).await {
                Ok(code) => code,
                Err(e) => {
                    let cause = match e.try_into_panic() {
                        Ok(payload) => panic_message(&*payload),
                        Err(e) => e.to_string(),
                    };
                    eprintln!("klarify-sync: stopped by a bug, please report it: {cause}");
                    ExitCode::FAILURE
                }
            }
        })
}

/// A panic is logged where everything else is (with where it happened), not printed on stderr:
/// the daemon carries on after a panicking pass, and the command line prints one line for it.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let location = info.location().map(ToString::to_string);
    tracing::error!(location, "panic: {}", panic_message(info.payload()));
}

/// glibc gives each thread that allocates concurrently its own arena (up to 8 per core) and
/// keeps what is freed there for reuse by that arena only. sqlx runs every SQLite connection on
/// its own worker thread, so each pool connection's page cache and 1 MB batch parameters
/// fragment an arena of their own, and the process's RSS ends up about twice its live heap.
/// One arena lets freed memory be reused by every thread. Must run before any thread starts;
/// an explicit `MALLOC_ARENA_MAX` in the environment wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc tunable; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Some(Command::Healthcheck) => healthcheck(cli.config).await,
        Some(Command::Status { json, passes }) => status(cli.config, json, passes).await,
        Some(Command::Graph {
            format,
            group_by,
            around,
            depth,
            output,
        }) => {
            let options = graph::Options {
                format,
                group_by,
                around: around.map(|name| (name, depth)),
                max_nodes: None,
            };
            draw_graph(cli.config, &options, output).await
        }
        None => run(cli).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each error already says its cause; the chain would repeat it.
            eprintln!("klarify-sync: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    #[cfg(not(feature = "demo"))]
    anyhow::ensure!(
        !cli.demo,
        "--demo: this klarify-sync was built without its default feature `demo`"
    );
    let env = std::env::vars().collect();
    #[cfg_attr(not(feature = "demo"), allow(unused_mut))] // only the demo changes them
    let mut settings = Settings::load(cli.config.as_deref(), &env)?;
    // The demo's source exists only once we start it; its address and key replace the real ones.
    #[cfg(feature = "demo")]
    let demo_source = if cli.demo {
        let source = demo::start().await?;
        settings.klarify.base_url = source.base_url().parse()?;
        settings.klarify.access_key = Some(source.access_key().into());
        settings.schedule.cron = demo::CRON.to_owned();
        settings.schedule.backfill_cron = demo::BACKFILL_CRON.to_owned();
        Some(source)
    } else {
        None
    };
    settings.validate(!cli.demo)?;
    telemetry::init(&settings.log);

    let database_url = settings.database_url(cli.demo);
    let client = KlarifyClient::new(settings.client_settings())?;
    let options = SyncOptions {
        overlap: Duration::from_secs(settings.sync.overlap_secs),
        max_delete_share: settings.sync.max_delete_share,
        tie_group_rounds: settings.sync.tie_group_rounds,
        tie_group_page_size: settings.sync.tie_group_page_size,
        max_future_skew: Duration::from_secs(settings.sync.max_future_skew_secs),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    if cli.once || cli.backfill {
        let mode = if cli.backfill {
            Mode::Backfill
        } else {
            Mode::Incremental
        };
        let store = Store::open(&database_url, settings.database.max_connections).await?;
        let progress = Arc::new(Progress::default());
        let bar =
            (cli.backfill && std::io::stdout().is_terminal()).then(|| Bar::spawn(progress.clone()));
        let report = run_pass_observed(&client, &store, mode, &options, &shutdown, &progress).await;
        if let Some(bar) = bar {
            bar.finish();
        }
        report?.log();
        store.close().await;
        return Ok(());
    }

    let daemon = Daemon {
        pass: SyncPass {
            client,
            options: options.clone(),
        },
        database_url: database_url.clone(),
        max_connections: settings.database.max_connections,
        cron: schedule::parse_cron(&settings.schedule.cron).map_err(anyhow::Error::msg)?,
        backfill_cron: Some(settings.schedule.backfill_cron.as_str())
            .filter(|c| !c.is_empty())
            .map(schedule::parse_cron)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        max_staleness: Duration::from_secs(settings.health.max_staleness_secs),
        max_unproven: Duration::from_secs(settings.health.max_unproven_secs),
        max_future_skew: options.max_future_skew,
        retry_delays: (Duration::from_secs(5), Duration::from_secs(300)),
        http: HttpLimits::default(),
    }
    .bind(settings.http.listen)
    .await?;
    #[cfg(feature = "demo")]
    if let Some(source) = &demo_source {
        demo::banner(source, database_url.expose_secret(), daemon.local_addr());
    }
    daemon.run_until_stopped(shutdown.cancelled_owned()).await?;
    Ok(())
}

/// SIGTERM (container stop) and SIGINT (Ctrl-C) both ask for a graceful stop.
async fn cancel_on_signal(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    token.cancel();
}

/// Asks the daemon configured by the same layers for `/healthz`; a wildcard listen address is
/// reached on loopback.
async fn healthcheck(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = Settings::load(config.as_deref(), &std::env::vars().collect())?;
    let mut addr = settings.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "/healthz answered {}",
        response.status()
    );
    Ok(())
}

async fn status(config: Option<PathBuf>, json: bool, passes: i64) -> anyhow::Result<()> {
    let settings = Settings::load(config.as_deref(), &std::env::vars().collect())?;
    settings.validate(false)?;
    // Reads only: a mistyped DATABASE_URL must not leave an empty mirror behind.
    let store = Store::open_existing(&settings.database_url(false)).await?;
    let future_after =
        time::OffsetDateTime::now_utc() + Duration::from_secs(settings.sync.max_future_skew_secs);
    let status = store.status(passes, future_after).await?;
    store.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", klarify_sync::status::render_text(&status));
    }
    Ok(())
}

async fn draw_graph(
    config: Option<PathBuf>,
    options: &graph::Options,
    output: Option<PathBuf>,
) -> anyhow::Result<()> {
    let settings = Settings::load(config.as_deref(), &std::env::vars().collect())?;
    settings.validate(false)?;
    let store = Store::open_existing(&settings.database_url(false)).await?;
    let drawn = graph::draw(&store, options).await;
    store.close().await;
    let drawn = drawn?;
    match output {
        Some(path) => std::fs::write(&path, drawn)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
        None => {
            use std::io::Write;
            std::io::stdout()
                .lock()
                .write_all(drawn.as_bytes())
                .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))?
        }
    }
    Ok(())
}
