//! A stand-alone fake Klarify API on loopback, for trying klarify-sync by hand, the container
//! smoke test and the benchmark. Prints its base URL on the first line of stdout, then serves
//! until stopped. Lines on stdin steer it: `edit N` edits N procedures, `requests` prints how
//! many requests it has answered; each command is answered with one line.

use std::time::Duration;

use clap::Parser;
use klarify_fake::{Churn, FakeKlarify, FakeOptions, Organisation};

/// Serves a generated organisation through the Klarify Integration API.
#[derive(Debug, Parser)]
struct Args {
    /// How many procedures the organisation has.
    #[arg(long, default_value_t = 500)]
    procedures: usize,
    /// Seeds the generated data, so two runs serve the same organisation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The access key clients must send.
    #[arg(long, env = "FAKE_KLARIFY_KEY", default_value = "test-key")]
    key: String,
    /// Edit a few procedures this often (seconds; 0 = never).
    #[arg(long, default_value_t = 0)]
    churn_every_secs: u64,
    /// Added to every response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Serve procedures sharing one `updated_at` in a new order on every request.
    #[arg(long)]
    unstable_ties: bool,
    /// Serve at most this many items per page, whatever `pageSize` asks for, as a server that
    /// caps its pages silently.
    #[arg(long)]
    max_page_size: Option<u64>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let options = FakeOptions {
        access_key: args.key,
        latency: Duration::from_millis(args.latency_ms),
        unstable_ties: args.unstable_ties,
        max_page_size: args.max_page_size,
        ..FakeOptions::default()
    };
    let fake =
        FakeKlarify::start(Organisation::generate(args.seed, args.procedures), options).await?;
    if args.churn_every_secs > 0 {
        let churn = Churn {
            edits: 3,
            inserts: 1,
            deletes: 1,
            bulk: false,
        };
        fake.spawn_background_churn(Duration::from_secs(args.churn_every_secs), churn);
    }
    println!("{}", fake.base_url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // A thread, not tokio's stdin: a blocked read of tokio's would keep the process from
    // exiting after a signal, and this thread simply dies with the process.
    let (lines, mut commands) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            // Once stdin is closed this branch is disabled and only a signal ends the loop.
            Some(line) = commands.recv() => println!("{}", command(&fake, line.trim())),
        }
    }
    fake.shutdown().await;
    Ok(())
}

fn command(fake: &FakeKlarify, line: &str) -> String {
    match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["edit", n] => match n.parse() {
            Ok(edits) => {
                fake.apply(&Churn {
                    edits,
                    ..Churn::default()
                });
                format!("edited {edits}")
            }
            Err(_) => format!("error: not a number: {n}"),
        },
        ["requests"] => format!("requests {}", fake.requests()),
        _ => format!("error: unknown command {line:?} (edit N | requests)"),
    }
}
