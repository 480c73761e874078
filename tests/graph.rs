//! `klarify-sync graph` through the binary, over a mirror filled by a real pass: every live
//! procedure and every resolved edge once, names escaped, and one line when there is no mirror.

mod common;

use std::collections::HashSet;

use common::binary::{Output, Vars};
use common::{Backend, Env, HOSTILE_NAME};
use klarify_fake::Organisation;
use klarify_sync::sync::Mode;
use secrecy::{ExposeSecret, SecretString};

on_both_backends!(
    dot_has_every_procedure_and_resolved_edge_once,
    mermaid_and_a_neighbourhood_to_a_file,
    no_mirror_is_one_line_and_creates_nothing,
);

/// Runs `klarify-sync graph ARGS` against `url`.
async fn graph(url: &SecretString, args: &[&str]) -> Output {
    let args: Vec<&str> = ["graph"].iter().chain(args).copied().collect();
    Vars::with_database(url.expose_secret()).run(&args).await
}

/// A mirror of 120 generated procedures (with names that resolve to none or to several) and
/// one of [`HOSTILE_NAME`], written by a backfill.
async fn mirrored(backend: Backend) -> Env {
    let env = Env::new(backend, Organisation::generate(16, 120), 50).await;
    common::insert_hostile(&env.fake);
    env.pass(Mode::Backfill).await.unwrap();
    env
}

async fn dot_has_every_procedure_and_resolved_edge_once(backend: Backend) {
    let env = mirrored(backend).await;
    let out = graph(&env.database_url, &[]).await;
    assert!(out.ok, "{}", out.stderr);
    let dot = out.stdout;
    assert!(dot.contains("digraph procedures {") && dot.ends_with("}\n"));

    let (procedures, calls) = env.store.call_graph().await.unwrap();
    // Node lines of procedures are the ones without a note on their name.
    let node_lines: Vec<&str> = dot
        .lines()
        .filter(|l| l.starts_with("  n") && l.contains(" [label="))
        .collect();
    let procedure_lines: Vec<&&str> = node_lines
        .iter()
        .filter(|l| !l.contains("this name"))
        .collect();
    assert_eq!(procedure_lines.len(), procedures.len());
    for p in procedures.iter().filter(|p| p.id != "hostile-1") {
        let line = format!(" [label=\"{}\"];", p.name.as_deref().unwrap());
        assert_eq!(
            procedure_lines
                .iter()
                .filter(|l| l.ends_with(&line))
                .count(),
            procedures.iter().filter(|q| q.name == p.name).count(),
            "{line}"
        );
    }
    assert_eq!(
        dot.matches(
            r#"[label="Evil \"quoted\" \\ back\nslash <script>alert('x')</script> & #1;"];"#
        )
        .count(),
        1,
        "the hostile name, escaped, once:\n{dot}"
    );
    assert!(!dot.contains(HOSTILE_NAME));

    // Edges between procedures: one per caller, called and relation.
    let resolved: HashSet<(String, String, String)> = calls
        .iter()
        .filter(|c| c.resolution == "resolved")
        .map(|c| {
            let from = c.related_procedure_id.clone().unwrap();
            (from, c.procedure_id.clone(), c.relation.clone())
        })
        .collect();
    assert!(resolved.len() > 50, "the sample has calls");
    let id_of_node = |n: &str| {
        let line = node_lines
            .iter()
            .find(|l| l.starts_with(&format!("  {n} [")))
            .unwrap();
        (!line.contains("this name")).then(|| {
            let label = line.split("[label=\"").nth(1).unwrap();
            label.split("\"]").next().unwrap().to_owned()
        })
    };
    let edge_lines: Vec<&str> = dot.lines().filter(|l| l.contains(" -> ")).collect();
    let unique: HashSet<&str> = edge_lines.iter().copied().collect();
    assert_eq!(unique.len(), edge_lines.len(), "an edge drawn twice");
    let between_procedures = edge_lines
        .iter()
        .filter(|l| {
            let from = l.trim().split(' ').next().unwrap();
            id_of_node(from).is_some()
        })
        .count();
    assert_eq!(between_procedures, resolved.len());
    let unresolved = calls.iter().any(|c| c.resolution == "unresolved");
    let ambiguous = calls.iter().any(|c| c.resolution == "ambiguous");
    assert!(unresolved && ambiguous, "the sample has both kinds of trap");
    assert!(dot.contains("(no live procedure has this name)\", style=\"rounded,dashed\""));
    assert!(dot.contains("procedures have this name)\", style=\"rounded,dotted\""));
}

async fn mermaid_and_a_neighbourhood_to_a_file(backend: Backend) {
    let env = mirrored(backend).await;
    let out = graph(
        &env.database_url,
        &["--format", "mermaid", "--group-by", "owner"],
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("flowchart LR\n"));
    assert!(out.stdout.contains(
        "[\"Evil #34;quoted#34; #92; back<br/>slash #60;script#62;alert('x')#60;/script#62; #38; #35;1#59;\"]"
    ));
    assert!(out.stdout.contains("  subgraph g"));

    let first = env.mirror().await[0].name.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("around.dot");
    let out = graph(
        &env.database_url,
        &[
            "--around",
            &first,
            "--depth",
            "1",
            "--output",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let dot = std::fs::read_to_string(&file).unwrap();
    assert!(
        dot.contains(&format!("label=\"{first}: 1 call(s) around\"")),
        "{dot}"
    );
    let nodes = dot.lines().filter(|l| l.contains(" [label=")).count();
    assert!(
        nodes > 1 && nodes < 40,
        "a neighbourhood, not the whole: {nodes}"
    );

    let out = graph(&env.database_url, &["--around", "nobody by this name"]).await;
    assert!(!out.ok);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out
        .stderr
        .contains("no live procedure is named \"nobody by this name\""));
}

async fn no_mirror_is_one_line_and_creates_nothing(backend: Backend) {
    common::binary::assert_refused_without_a_mirror(backend, &["graph"]).await;
}
