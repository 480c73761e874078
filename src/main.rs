//! The `klarify-sync` binary: parses the command line, loads the configuration, sets up
//! logging and signals, and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use klarify_sync::app::{self, Application};
use klarify_sync::config::{ConfigError, Settings};
use klarify_sync::daemon::panic_message;
#[cfg(feature = "demo")]
use klarify_sync::demo;
use klarify_sync::sync::Mode;
use klarify_sync::{graph, telemetry};
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
        Some(Command::Healthcheck) => healthcheck(cli.config.as_deref()).await,
        Some(Command::Status { json, passes }) => status(cli.config.as_deref(), json, passes).await,
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
            draw_graph(cli.config.as_deref(), &options, output).await
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

/// Every layer of the configuration, the process environment last.
fn load(config: Option<&Path>) -> Result<Settings, ConfigError> {
    Settings::load(config, &std::env::vars().collect())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    #[cfg(not(feature = "demo"))]
    anyhow::ensure!(
        !cli.demo,
        "--demo: this klarify-sync was built without its default feature `demo`"
    );
    #[cfg_attr(not(feature = "demo"), allow(unused_mut))] // only the demo changes them
    let mut settings = load(cli.config.as_deref())?;
    // The demo's source exists only once we start it; its address and key replace the real ones.
    #[cfg(feature = "demo")]
    let demo_source = if cli.demo {
        let source = demo::start().await?;
        settings.klarify.base_url = source.base_url().parse()?;
        settings.klarify.access_key = Some(source.access_key().into());
        // Its own file, unless one is set.
        settings.database.url = Some(settings.database_url(true));
        settings.schedule.cron = demo::CRON.clone();
        settings.schedule.backfill_cron = Some(demo::BACKFILL_CRON.clone());
        Some(source)
    } else {
        None
    };
    settings.validate(!cli.demo)?;
    telemetry::init(&settings.log);
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    if cli.once || cli.backfill {
        let mode = if cli.backfill {
            Mode::Backfill
        } else {
            Mode::Incremental
        };
        app::run_once(&settings, mode, &shutdown).await?;
        return Ok(());
    }
    let application = Application::build(&settings).await?;
    #[cfg(feature = "demo")]
    if let Some(source) = &demo_source {
        let database_url = settings.database_url(true);
        demo::banner(
            source,
            database_url.expose_secret(),
            application.local_addr(),
        );
    }
    application
        .run_until_stopped(shutdown.cancelled_owned())
        .await?;
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

async fn healthcheck(config: Option<&Path>) -> anyhow::Result<()> {
    app::healthcheck(&load(config)?).await?;
    Ok(())
}

async fn status(config: Option<&Path>, json: bool, passes: i64) -> anyhow::Result<()> {
    let settings = load(config)?;
    settings.validate(false)?;
    let status = app::status(&settings, passes).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", klarify_sync::status::render_text(&status));
    }
    Ok(())
}

async fn draw_graph(
    config: Option<&Path>,
    options: &graph::Options,
    output: Option<PathBuf>,
) -> anyhow::Result<()> {
    let settings = load(config)?;
    settings.validate(false)?;
    let drawn = app::draw_graph(&settings, options).await?;
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
