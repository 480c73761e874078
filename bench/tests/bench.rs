//! The bench as the engineers run it, through docs/experiments/compare.sh: two klarify-sync
//! binaries back to back per scenario on both backends, the oracle beside each backfill, and
//! nothing left behind.

mod common;

use std::path::Path;
use std::process::Stdio;

use sqlx::{Connection, PgConnection};
use tokio::process::Command;

const PROCEDURES: usize = 120;

/// One row of the printed table, by column name.
struct Row(Vec<(String, String)>);

impl Row {
    fn get(&self, column: &str) -> &str {
        let (_, value) = self.0.iter().find(|(c, _)| c == column).unwrap();
        value
    }

    fn number(&self, column: &str) -> f64 {
        let value = self.get(column);
        value
            .parse()
            .unwrap_or_else(|_| panic!("{column} is {value:?}"))
    }
}

fn cells(line: &str) -> Vec<String> {
    line.trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().to_owned())
        .collect()
}

fn table(stdout: &str) -> Vec<Row> {
    let mut lines = stdout.lines();
    let header = cells(lines.next().expect("a header"));
    assert!(lines.next().unwrap().starts_with("|---|"));
    lines
        .map(|line| Row(header.iter().cloned().zip(cells(line)).collect()))
        .collect()
}

/// The bench's directory, once the klarify-sync and fake-klarify it runs by default are seen
/// there: other packages' binaries, which the workspace's `cargo test` builds beside it.
fn build_dir() -> &'static Path {
    let dir = Path::new(env!("CARGO_BIN_EXE_bench")).parent().unwrap();
    for sibling in ["klarify-sync", "fake-klarify"] {
        assert!(
            dir.join(sibling).exists(),
            "no {sibling} beside the bench: run the workspace's `cargo test`, or first \
             `cargo build -p klarify-sync -p klarify-fake`"
        );
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_sh_measures_two_builds_back_to_back_per_scenario_beside_the_oracle() {
    let admin = common::pg::fresh_database().await;
    // Both "builds" are this one: the script and the bench are under test, not klarify-sync.
    let build = build_dir();
    let bench = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/experiments/compare.sh"
    ))
    .args([build, build])
    .args(["--procedures", &PROCEDURES.to_string()])
    .args(["--page-size", "25", "--latency-ms", "50"])
    .args(["--postgres", &admin])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // The script ends by exec-ing the bench, which so keeps its pid.
    let pid = bench.id().unwrap();
    let out = bench.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let rows = table(&stdout);
    let order: Vec<_> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r.get("backend"),
                r.get("scenario"),
                r.get("binary")
            )
        })
        .collect();
    let mut expected = Vec::new();
    for backend in ["sqlite", "postgres"] {
        for scenario in [
            "backfill",
            "incremental, nothing changed",
            "incremental, 1000 edits",
        ] {
            for binary in ["base", "new"] {
                expected.push(format!("{backend} {scenario} {binary}"));
            }
        }
    }
    assert_eq!(order, expected, "{stdout}");

    for row in &rows {
        assert_eq!(row.get("procedures"), PROCEDURES.to_string());
        assert!(row.number("load") >= 0.0, "{stdout}");
        match row.get("scenario") {
            "backfill" => {
                assert_eq!(row.number("rows written"), PROCEDURES as f64);
                // 5 pages, 8 at once, each answered after 50 ms: one round at least.
                assert!(row.number("oracle s") >= 0.05, "{stdout}");
                // klarify-sync's count, samples and ranges take more rounds than the oracle's.
                assert!(row.number("wall ÷ oracle") > 1.0, "{stdout}");
            }
            "incremental, nothing changed" => {
                assert_eq!(row.get("requests"), "1");
                assert_eq!(row.get("rows written"), "0");
                assert_eq!(row.get("oracle s"), "-");
            }
            // The fake edits all 120 of them.
            _ => assert_eq!(row.number("rows written"), PROCEDURES as f64),
        }
    }

    let mut conn = PgConnection::connect(&admin).await.unwrap();
    let databases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE $1")
            .bind(format!("klarify_bench_{pid}_%"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(databases, 0, "the bench's databases are dropped");
    let scratch = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy()
                .starts_with(&format!("klarify-bench-{pid}-"))
        })
        .count();
    assert_eq!(scratch, 0, "the bench's SQLite files are removed");
}

#[tokio::test]
async fn a_failing_binary_ends_the_bench_with_one_line() {
    let out = Command::new(build_dir().join("bench"))
        .args(["--procedures", "10", "--binary", "broken=/bin/false"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("bench: /bin/false --backfill failed"),
        "{stderr}"
    );
}
