//! The schema BI users read, on both backends: the views, the history, the indexes, the
//! PostgreSQL comments, and every example question of docs/schema.md, asked with the `sqlite3`
//! and `psql` command-line clients as an analyst would, against a known data set.

mod common;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;

use common::{scalar, tools, Backend, Env};
use klarify_fake::{Churn, Organisation};
use klarify_sync::store::Store;
use klarify_sync::sync::Mode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

on_both_backends!(
    example_questions_answer_as_documented,
    history_keeps_each_version_once,
    deletion_ends_a_version_and_revival_continues,
    a_deleted_procedure_may_come_back_at_a_version_it_had,
    call_edges_resolve_names_among_live_procedures,
    an_existing_mirror_starts_its_history_with_what_it_holds,
    a_mirror_keeps_its_versions_when_the_history_moves_to_past_ones,
    indexes_cover_the_usual_filters,
);

// ---------------------------------------------------------------------------------------------
// The known data set of the example questions.

/// A small organisation with every trap: a shared name, references to names nobody has or that
/// will be deleted, a procedure without owner or lanes, timestamps with a fraction or an offset.
/// All first versions are from before 2025-01-16.
fn first_versions() -> Vec<Value> {
    let url = |id: &str| format!("https://acme.klarify.biz/process/{id}");
    vec![
        json!({
            "id": "101",
            "name": "Customer Onboarding Process",
            "status": "published",
            "owner": "John Smith",
            "performer": "Customer Service Team",
            "updated_at": "2024-10-05T09:00:00Z",
            "url": url("101"),
            "lanes": ["Customer Service", "Account Management"],
            "called_within": [],
            "called_from": ["Sales Pipeline Process"],
        }),
        json!({
            "id": "102",
            "name": "Sales Pipeline Process",
            "status": "draft",
            "owner": "Maria Garcia",
            "performer": "Sales Team",
            "updated_at": "2024-11-12T10:00:00Z",
            "url": url("102"),
            "lanes": ["Sales", "Account Management"],
            "called_within": [],
            "called_from": [],
        }),
        json!({
            "id": "103",
            "name": "Invoice Approval",
            "status": "draft",
            "owner": "Ahmed Khan",
            "performer": "Finance Team",
            "updated_at": "2024-12-01T08:30:00Z",
            "url": url("103"),
            "lanes": ["Finance", "Procurement"],
            "called_within": ["Purchase Order Process"],
            "called_from": ["Legacy Approval Workflow", "Manual Invoice Entry Task"],
        }),
        json!({
            "id": "104",
            "name": "Purchase Order Process",
            "status": "published",
            "owner": "Ahmed Khan",
            "performer": "Procurement Team",
            "updated_at": "2024-12-15T14:00:00Z",
            "url": url("104"),
            "lanes": ["Procurement", "Finance", "Legal"],
            "called_within": [],
            "called_from": ["Vendor Evaluation"],
        }),
        json!({
            "id": "105",
            "name": "Vendor Evaluation",
            "status": "published",
            "owner": "Sofia Rossi",
            "performer": "Procurement Team",
            "updated_at": "2024-11-20T11:00:00Z",
            "url": url("105"),
            "lanes": ["Procurement"],
            "called_within": ["Purchase Order Process"],
            "called_from": [],
        }),
        json!({
            "id": "106",
            "name": "Vendor Evaluation",
            "status": "archived",
            "owner": "Liam Murphy",
            "performer": "Legal Team",
            "updated_at": "2024-10-30T16:45:00.5Z",
            "url": url("106"),
            "lanes": ["Legal"],
            "called_within": [],
            "called_from": [],
        }),
        json!({
            "id": "107",
            "name": "Employee Offboarding",
            "status": "published",
            "owner": "Grace Okafor",
            "performer": "Human Resources Team",
            "updated_at": "2024-12-20T10:30:00+01:00",
            "url": url("107"),
            "lanes": ["Human Resources", "IT Operations"],
            "called_within": [],
            "called_from": [],
        }),
        json!({
            "id": "108",
            "name": "Laptop Provisioning Task",
            "status": "draft",
            "owner": "Yuki Tanaka",
            "performer": "IT Operations Team",
            "updated_at": "2025-01-10T13:00:00Z",
            "url": url("108"),
            "lanes": ["IT Operations"],
            "called_within": ["Employee Offboarding"],
            "called_from": [],
        }),
        json!({
            "id": "109",
            "name": "Expense Reimbursement",
            "status": "published",
            "owner": null,
            "performer": "Finance Team",
            "updated_at": "2025-01-15T10:00:00Z",
            "url": url("109"),
            "called_within": [],
            "called_from": ["Expense Policy Review"],
        }),
        json!({
            "id": "110",
            "name": "Manual Invoice Entry Task",
            "status": "archived",
            "owner": "Tomasz Nowak",
            "performer": "Finance Team",
            "updated_at": "2024-09-01T08:00:00Z",
            "url": url("110"),
            "lanes": ["Finance"],
            "called_within": ["Invoice Approval"],
            "called_from": [],
        }),
    ]
}

/// `base` with a new `updated_at` and the fields in `changes`.
fn revised(base: &Value, updated_at: &str, changes: Value) -> Value {
    let mut item = base.clone();
    item["updated_at"] = json!(updated_at);
    for (k, v) in changes.as_object().unwrap() {
        item[k] = v.clone();
    }
    item
}

/// The source serves a new version of `base` instead of `base`; returns it.
fn serve_revision(env: &Env, base: &Value, updated_at: &str, changes: Value) -> Value {
    let item = revised(base, updated_at, changes);
    assert!(env.fake.delete(item["id"].as_str().unwrap()));
    env.fake.insert_raw(item.clone());
    item
}

/// Builds the example data set through real sync passes: a backfill of the first versions, an
/// incremental pass after three Q1 2025 edits, and two backfills after two Q2 edits and a
/// deletion (the second one changes nothing).
async fn example_mirror(backend: Backend) -> Env {
    let env = Env::new(backend, Organisation::generate(0, 0), 100).await;
    let first = first_versions();
    let by_id: HashMap<&str, &Value> = first
        .iter()
        .map(|i| (i["id"].as_str().unwrap(), i))
        .collect();
    for item in &first {
        env.fake.insert_raw(item.clone());
    }
    let report = env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(report.stats.inserted, 10);
    // Before 110 is deleted, 103's reference to it resolves.
    assert_eq!(
        ask(
            &env,
            "SELECT related_procedure_id, resolution, candidates FROM procedure_call_edges \
             WHERE procedure_id = '103' AND related_name = 'Manual Invoice Entry Task';"
        )
        .await,
        ["110|resolved|1"]
    );

    // Q1 2025: Invoice Approval is published; two procedures change owner, and their lanes.
    let v1 = |id: &str| by_id[id];
    serve_revision(
        &env,
        v1("103"),
        "2025-02-10T12:00:00Z",
        json!({"status": "published"}),
    );
    let onboarding = serve_revision(
        &env,
        v1("101"),
        "2025-02-20T15:00:00Z",
        json!({"owner": "Pierre Dubois", "lanes": ["Account Management"]}),
    );
    let lanes = ["Human Resources", "IT Operations", "Facilities"];
    let changes = json!({"owner": "Olga Ivanova", "lanes": lanes});
    serve_revision(&env, v1("107"), "2025-03-03T09:15:00Z", changes);
    let report = env.pass(Mode::Incremental).await.unwrap();
    assert_eq!((report.stats.inserted, report.stats.updated), (0, 3));

    // Q2 2025: another publication and owner change; one procedure is deleted.
    serve_revision(
        &env,
        v1("108"),
        "2025-04-07T08:00:00Z",
        json!({"status": "published"}),
    );
    let changes = json!({"owner": "Grace Okafor"});
    serve_revision(&env, &onboarding, "2025-05-02T10:00:00Z", changes);
    assert!(env.fake.delete("110"));
    let report = env.pass(Mode::Backfill).await.unwrap();
    assert_eq!((report.stats.updated, report.deleted), (2, 1));
    let report = env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(
        (report.stats.inserted, report.stats.updated, report.deleted),
        (0, 0, 0)
    );
    env.assert_mirror_equals_source().await;
    env
}

/// The answers to docs/schema.md's questions on the data set above, rows as `a|b|c`, NULL as
/// `NULL`, timestamps as SQLite stores them.
fn expected_answers() -> HashMap<u32, Vec<&'static str>> {
    HashMap::from([
        (1, vec!["published|7", "archived|1", "draft|1"]),
        (
            2,
            vec![
                "Procurement|3",
                "Account Management|2",
                "Finance|2",
                "IT Operations|2",
                "Legal|2",
                "Facilities|1",
                "Human Resources|1",
                "Sales|1",
            ],
        ),
        (3, vec!["Ahmed Khan|2", "Grace Okafor|1", "Liam Murphy|1"]),
        (4, vec!["109|Expense Reimbursement"]),
        (
            5,
            vec![
                "Customer Onboarding Process|called_from|Sales Pipeline Process",
                "Invoice Approval|called_within|Purchase Order Process",
                "Laptop Provisioning Task|called_within|Employee Offboarding",
                "Vendor Evaluation|called_within|Purchase Order Process",
            ],
        ),
        (
            6,
            vec![
                "ambiguous|Vendor Evaluation|2|Purchase Order Process",
                "unresolved|Expense Policy Review|0|Expense Reimbursement",
                "unresolved|Legacy Approval Workflow|0|Invoice Approval",
                "unresolved|Manual Invoice Entry Task|0|Invoice Approval",
            ],
        ),
        (
            7,
            vec![
                "Vendor Evaluation|105|published|Sofia Rossi",
                "Vendor Evaluation|106|archived|Liam Murphy",
            ],
        ),
        (
            8,
            vec![
                "Purchase Order Process|2",
                "Employee Offboarding|1",
                "Sales Pipeline Process|1",
            ],
        ),
        (
            9,
            vec![
                "Finance|Procurement|2",
                "Account Management|Sales|1",
                "Facilities|Human Resources|1",
                "Facilities|IT Operations|1",
                "Finance|Legal|1",
                "Human Resources|IT Operations|1",
                "Legal|Procurement|1",
            ],
        ),
        (10, vec!["103|2025-02-10T12:00:00.000000Z"]),
        (11, vec!["2"]),
        (12, vec!["Pierre Dubois|Account Management"]),
        (
            13,
            vec![
                "Finance|3",
                "Procurement|3",
                "Account Management|2",
                "Legal|2",
                "Customer Service|1",
                "Human Resources|1",
                "IT Operations|1",
                "Sales|1",
            ],
        ),
        (
            14,
            vec!["110|Manual Invoice Entry Task|archived|Tomasz Nowak"],
        ),
        (15, vec!["2025-02|2", "2025-03|1", "2025-04|1", "2025-05|1"]),
        (16, vec!["backfill|succeeded|9|0|0|0"]),
    ])
}

async fn example_questions_answer_as_documented(backend: Backend) {
    let env = example_mirror(backend).await;
    let questions = documented_questions();
    let mut expected = expected_answers();
    assert!(
        questions.len() >= 12,
        "docs/schema.md has {} questions",
        questions.len()
    );
    for q in &questions {
        let sql = match backend {
            Backend::Sqlite => &q.sqlite,
            Backend::Postgres => &q.postgres,
        };
        let sql = sql
            .as_deref()
            .unwrap_or_else(|| panic!("question {} has no SQL", q.number));
        let want = expected
            .remove(&q.number)
            .unwrap_or_else(|| panic!("no expected answer for question {}: {}", q.number, q.title));
        assert_eq!(
            ask(&env, sql).await,
            want,
            "question {}: {}\n{sql}",
            q.number,
            q.title
        );
    }
    assert!(
        expected.is_empty(),
        "questions missing from docs/schema.md: {:?}",
        expected.keys()
    );
    // Timestamps given with an offset or a fraction are stored as the same instants.
    assert_eq!(
        ask(
            &env,
            "SELECT procedure_id, valid_from FROM procedure_versions \
             WHERE procedure_id IN ('106', '107') AND version = 1 ORDER BY procedure_id;"
        )
        .await,
        [
            "106|2024-10-30T16:45:00.500000Z",
            "107|2024-12-20T09:30:00.000000Z"
        ]
    );
    // The history of one procedure, whole.
    assert_eq!(
        ask(
            &env,
            "SELECT version, valid_from, valid_to, owner FROM procedure_versions \
             WHERE procedure_id = '101' ORDER BY version;"
        )
        .await,
        [
            "1|2024-10-05T09:00:00.000000Z|2025-02-20T15:00:00.000000Z|John Smith",
            "2|2025-02-20T15:00:00.000000Z|2025-05-02T10:00:00.000000Z|Pierre Dubois",
            "3|2025-05-02T10:00:00.000000Z|NULL|Grace Okafor",
        ]
    );
    assert_eq!(
        ask(&env, "SELECT COUNT(*) FROM procedure_versions;").await,
        ["15"],
        "10 first versions and 5 changes; the backfills added nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// History and call resolution at scale, checked against the source.

async fn history_keeps_each_version_once(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(21, 120), 25).await;
    env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(
        scalar(&env.database_url, "SELECT COUNT(*) FROM procedure_versions").await,
        120
    );
    // Re-reads of unchanged procedures add nothing, incremental or full.
    env.pass(Mode::Incremental).await.unwrap();
    env.pass(Mode::Backfill).await.unwrap();
    assert_eq!(
        scalar(&env.database_url, "SELECT COUNT(*) FROM procedure_versions").await,
        120
    );

    // Each edit is one version, also when a bulk edit gives many the same instant.
    env.fake.apply(&Churn {
        edits: 30,
        inserts: 5,
        deletes: 0,
        bulk: false,
    });
    env.pass(Mode::Incremental).await.unwrap();
    env.fake.apply(&Churn {
        edits: 20,
        inserts: 0,
        deletes: 0,
        bulk: true,
    });
    env.pass(Mode::Incremental).await.unwrap();
    env.pass(Mode::Backfill).await.unwrap();
    env.pass(Mode::Incremental).await.unwrap();
    env.assert_mirror_equals_source().await;
    assert_eq!(
        scalar(&env.database_url, "SELECT COUNT(*) FROM procedure_versions").await,
        175
    );
    assert_eq!(
        scalar(
            &env.database_url,
            "SELECT COUNT(*) FROM procedure_versions WHERE version > 1"
        )
        .await,
        50
    );

    // Exactly one current version per live procedure, equal to the procedures row.
    assert_eq!(
        scalar(
            &env.database_url,
            "SELECT COUNT(*) FROM procedure_versions WHERE valid_to IS NULL"
        )
        .await,
        125
    );
    let current_equal = "SELECT COUNT(*) FROM procedure_versions v JOIN live_procedures p \
        ON p.id = v.procedure_id AND p.updated_at = v.updated_at \
        WHERE v.valid_to IS NULL AND v.name = p.name AND v.status = p.status \
        AND v.owner = p.owner AND v.performer = p.performer AND v.url = p.url AND v.raw = p.raw";
    assert_eq!(scalar(&env.database_url, current_equal).await, 125);
    // Versions follow each other without gaps or overlaps.
    let chained = "SELECT COUNT(*) FROM procedure_versions v JOIN procedure_versions n \
        ON n.procedure_id = v.procedure_id AND n.version = v.version + 1 \
        WHERE v.valid_to = n.valid_from AND v.valid_from < n.valid_from";
    assert_eq!(scalar(&env.database_url, chained).await, 50);
    // The lanes of each current version are the procedure's lanes.
    let lanes = scalar(
        &env.database_url,
        "SELECT COUNT(*) FROM live_procedure_lanes",
    )
    .await;
    let current_lanes = "SELECT COUNT(*) FROM procedure_version_lanes vl \
        JOIN procedure_versions v ON v.procedure_id = vl.procedure_id AND v.updated_at = vl.updated_at \
        JOIN live_procedure_lanes l ON l.procedure_id = vl.procedure_id \
             AND l.position = vl.position AND l.lane = vl.lane \
        WHERE v.valid_to IS NULL";
    assert!(lanes > 100);
    assert_eq!(scalar(&env.database_url, current_lanes).await, lanes);
    let all_current_lanes = "SELECT COUNT(*) FROM procedure_version_lanes vl \
        JOIN procedure_versions v ON v.procedure_id = vl.procedure_id AND v.updated_at = vl.updated_at \
        WHERE v.valid_to IS NULL";
    assert_eq!(scalar(&env.database_url, all_current_lanes).await, lanes);
}

async fn deletion_ends_a_version_and_revival_continues(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(22, 10), 50).await;
    env.pass(Mode::Backfill).await.unwrap();
    let snapshot = env.fake.snapshot();
    let (same, changed) = (&snapshot[2], &snapshot[5]);
    let (same_id, changed_id) = (
        same["id"].as_str().unwrap(),
        changed["id"].as_str().unwrap(),
    );
    assert!(env.fake.delete(same_id) && env.fake.delete(changed_id));
    assert_eq!(env.pass(Mode::Backfill).await.unwrap().deleted, 2);

    let ended = |id: &str| {
        format!(
            "SELECT COUNT(*) FROM procedure_versions v JOIN procedures p ON p.id = v.procedure_id \
             WHERE v.procedure_id = '{id}' AND p.deleted_at IS NOT NULL \
             AND v.valid_to = p.deleted_at AND v.deleted_at = p.deleted_at"
        )
    };
    assert_eq!(scalar(&env.database_url, &ended(same_id)).await, 1);
    assert_eq!(scalar(&env.database_url, &ended(changed_id)).await, 1);
    assert_eq!(
        scalar(&env.database_url, "SELECT COUNT(*) FROM procedure_versions").await,
        10
    );
    assert_eq!(
        scalar(
            &env.database_url,
            "SELECT COUNT(*) FROM procedure_versions WHERE valid_to IS NULL"
        )
        .await,
        8
    );
    // When the changed one was found gone.
    let gone_at = text(
        &env,
        &format!(
            "SELECT {} FROM procedures WHERE id = '{changed_id}'",
            match backend {
                Backend::Sqlite => "deleted_at",
                Backend::Postgres => "deleted_at::text",
            }
        ),
    )
    .await;

    // Served again unchanged: the same version continues.
    env.fake.insert_raw(same.clone());
    // Served again changed, after it was found gone: a new version; the old one stays ended.
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let later = later
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    env.fake
        .insert_raw(revised(changed, &later, json!({"name": "Back again"})));
    let report = env.pass(Mode::Backfill).await.unwrap();
    assert_eq!((report.stats.updated, report.deleted), (2, 0));
    env.assert_mirror_equals_source().await;

    let versions =
        |id: &str| format!("SELECT COUNT(*) FROM procedure_versions WHERE procedure_id = '{id}'");
    assert_eq!(scalar(&env.database_url, &versions(same_id)).await, 1);
    let continued = format!(
        "SELECT COUNT(*) FROM procedure_versions WHERE procedure_id = '{same_id}' \
         AND valid_to IS NULL AND deleted_at IS NULL"
    );
    assert_eq!(scalar(&env.database_url, &continued).await, 1);
    assert_eq!(scalar(&env.database_url, &versions(changed_id)).await, 2);
    let old_ended_when_found_gone = format!(
        "SELECT COUNT(*) FROM procedure_versions WHERE procedure_id = '{changed_id}' \
         AND version = 1 AND valid_to = '{gone_at}' AND deleted_at = '{gone_at}'"
    );
    assert_eq!(
        scalar(&env.database_url, &old_ended_when_found_gone).await,
        1
    );
    let new_current = format!(
        "SELECT COUNT(*) FROM procedure_versions WHERE procedure_id = '{changed_id}' \
         AND version = 2 AND valid_to IS NULL AND name = 'Back again'"
    );
    assert_eq!(scalar(&env.database_url, &new_current).await, 1);
    assert_eq!(
        scalar(
            &env.database_url,
            "SELECT COUNT(*) FROM procedure_versions WHERE valid_to IS NULL"
        )
        .await,
        10
    );
}

/// Found gone in its second version, a procedure is served again in its first: that version is
/// current once more, and stays one version (not a history row and a current one).
async fn a_deleted_procedure_may_come_back_at_a_version_it_had(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(24, 10), 50).await;
    env.pass(Mode::Backfill).await.unwrap();
    // One with lanes, so that lanes left behind by its history row would show.
    let first = env
        .fake
        .snapshot()
        .into_iter()
        .find(|p| p["lanes"].as_array().is_some_and(|l| !l.is_empty()))
        .unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let later = later
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    serve_revision(&env, &first, &later, json!({"lanes": ["Second", "Lanes"]}));
    env.pass(Mode::Incremental).await.unwrap();
    assert!(env.fake.delete(&id));
    assert_eq!(env.pass(Mode::Backfill).await.unwrap().deleted, 1);

    env.fake.insert_raw(first.clone());
    let report = env.pass(Mode::Backfill).await.unwrap();
    assert_eq!((report.stats.updated, report.deleted), (1, 0));
    env.assert_mirror_equals_source().await;
    let versions = format!("SELECT COUNT(*) FROM procedure_versions WHERE procedure_id = '{id}'");
    assert_eq!(scalar(&env.database_url, &versions).await, 2);
    let lanes = format!("SELECT COUNT(*) FROM procedure_version_lanes WHERE procedure_id = '{id}'");
    let first_lanes = first["lanes"].as_array().unwrap().len() as i64;
    assert_eq!(scalar(&env.database_url, &lanes).await, first_lanes + 2);
    // The second version, ended when it was found gone, is the one in the history.
    let ended = format!(
        "SELECT COUNT(*) FROM procedure_versions WHERE procedure_id = '{id}' \
         AND updated_at <> (SELECT updated_at FROM procedures WHERE id = '{id}') \
         AND deleted_at IS NOT NULL"
    );
    assert_eq!(scalar(&env.database_url, &ended).await, 1);
}

async fn call_edges_resolve_names_among_live_procedures(backend: Backend) {
    let env = Env::new(backend, Organisation::generate(3, 300), 100).await;
    env.pass(Mode::Backfill).await.unwrap();
    // Deleting procedures turns references to their names into loose ends (or unique ones).
    for p in env.source().iter().step_by(15) {
        assert!(env.fake.delete(&p.id));
    }
    env.pass(Mode::Backfill).await.unwrap();
    let source = env.source();

    let mut ids_by_name: HashMap<&str, Vec<&str>> = HashMap::new();
    for p in &source {
        if let Some(name) = &p.name {
            ids_by_name.entry(name).or_default().push(&p.id);
        }
    }
    let mut expected = Vec::new();
    for p in &source {
        for (relation, names) in [
            ("called_within", &p.called_within),
            ("called_from", &p.called_from),
        ] {
            for (position, name) in names.iter().enumerate() {
                let ids = ids_by_name
                    .get(name.as_str())
                    .map_or(&[][..], Vec::as_slice);
                let (related, resolution) = match ids {
                    [] => ("NULL", "unresolved"),
                    [id] => (*id, "resolved"),
                    _ => ("NULL", "ambiguous"),
                };
                expected.push(format!(
                    "{}|{relation}|{position}|{name}|{related}|{resolution}|{}",
                    p.id,
                    ids.len()
                ));
            }
        }
    }
    expected.sort();
    let pool = any_pool(&env.database_url).await;
    type Edge = (String, String, i64, String, Option<String>, String, i64);
    let rows: Vec<Edge> = sqlx::query_as(
        "SELECT procedure_id, relation, CAST(position AS BIGINT), related_name, \
         related_procedure_id, resolution, CAST(candidates AS BIGINT) FROM procedure_call_edges",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let mut actual: Vec<String> = rows
        .into_iter()
        .map(|(id, rel, pos, name, related, resolution, n)| {
            format!(
                "{id}|{rel}|{pos}|{name}|{}|{resolution}|{n}",
                related.as_deref().unwrap_or("NULL")
            )
        })
        .collect();
    actual.sort();
    assert_eq!(actual, expected);
    for kind in ["resolved", "ambiguous", "unresolved"] {
        assert!(
            expected.iter().any(|e| e.contains(&format!("|{kind}|"))),
            "no {kind} edge"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Migrations.

/// A database that ran only the first migration, as users' mirrors did before history existed,
/// keeps its rows and gets them as the first versions.
async fn an_existing_mirror_starts_its_history_with_what_it_holds(backend: Backend) {
    let (url, _dir) = common::database(backend).await;
    let pool = migrated_before(backend, &url, 2).await;
    let now = "'2025-06-01T00:00:00.000000Z'";
    for statement in [
        format!("INSERT INTO procedures (id, name, status, owner, performer, updated_at, url, raw, \
                 content_hash, first_seen_at, synced_at, deleted_at) VALUES \
                 ('1', 'Alive', 'published', 'Ann', 'Team', '2025-01-01T00:00:00.000000Z', NULL, \
                  '{{\"id\":\"1\",\"lanes\":[\"A\",\"B\"]}}', 'h1', {now}, {now}, NULL), \
                 ('2', 'Gone', 'draft', NULL, NULL, '2025-02-01T00:00:00.000000Z', NULL, \
                  '{{\"id\":\"2\",\"lanes\":[\"C\"]}}', 'h2', {now}, {now}, '2025-05-01T00:00:00.000000Z')"),
        "INSERT INTO procedure_lanes (procedure_id, position, lane) VALUES ('1', 0, 'A'), ('1', 1, 'B'), ('2', 0, 'C')".into(),
    ] {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    pool.close().await;

    let store = Store::open(&url, 2).await.unwrap();
    store.close().await;
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM procedure_versions").await,
        2
    );
    assert_eq!(
        scalar(
            &url,
            "SELECT COUNT(*) FROM procedure_versions WHERE procedure_id = '1' AND valid_to IS NULL"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(
            &url,
            "SELECT COUNT(*) FROM procedure_versions v JOIN procedures p ON p.id = v.procedure_id \
                         WHERE v.procedure_id = '2' AND v.valid_to = p.deleted_at"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM procedure_version_lanes").await,
        3
    );
    assert_eq!(scalar(&url, "SELECT COUNT(*) FROM procedure_version_lanes l JOIN procedures p \
                         ON p.id = l.procedure_id AND p.updated_at = l.updated_at WHERE l.lane = 'B' AND l.position = 1").await, 1);
}

/// A mirror whose history held every version, the current ones too (before sqlite 0004 and
/// postgres 0006), keeps the same versions and lanes in the views, each version once.
async fn a_mirror_keeps_its_versions_when_the_history_moves_to_past_ones(backend: Backend) {
    let (url, _dir) = common::database(backend).await;
    let past_only = match backend {
        Backend::Sqlite => 4,
        Backend::Postgres => 6,
    };
    let pool = migrated_before(backend, &url, past_only).await;
    let (then, now) = (
        "'2025-01-01T00:00:00.000000Z'",
        "'2025-03-01T00:00:00.000000Z'",
    );
    for statement in [
        format!("INSERT INTO procedures (id, name, status, owner, performer, updated_at, url, raw, \
                 content_hash, first_seen_at, synced_at, deleted_at) VALUES \
                 ('1', 'Now', NULL, NULL, NULL, {now}, NULL, '{{\"id\":\"1\",\"lanes\":[\"B\"]}}', 'h2', \
                  {then}, {now}, NULL)"),
        "INSERT INTO procedure_lanes (procedure_id, position, lane) VALUES ('1', 0, 'B')".into(),
        format!("INSERT INTO procedure_history (procedure_id, updated_at, name, status, owner, \
                 performer, url, raw, recorded_at, deleted_at) VALUES \
                 ('1', {then}, 'Then', NULL, NULL, NULL, NULL, '{{\"id\":\"1\",\"lanes\":[\"A\"]}}', {then}, NULL), \
                 ('1', {now}, 'Now', NULL, NULL, NULL, NULL, '{{\"id\":\"1\",\"lanes\":[\"B\"]}}', {now}, NULL)"),
        format!("INSERT INTO procedure_version_lanes (procedure_id, updated_at, position, lane) \
                 VALUES ('1', {then}, 0, 'A'), ('1', {now}, 0, 'B')"),
    ] {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    pool.close().await;

    Store::open(&url, 2).await.unwrap().close().await;
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM procedure_history").await,
        1
    );
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM procedure_versions").await,
        2
    );
    let version = |n: u32, name: &str, valid_to: &str| {
        format!(
            "SELECT COUNT(*) FROM procedure_versions WHERE procedure_id = '1' AND version = {n} \
             AND name = '{name}' AND valid_to {valid_to}"
        )
    };
    assert_eq!(
        scalar(&url, &version(1, "Then", &format!("= {now}"))).await,
        1
    );
    assert_eq!(scalar(&url, &version(2, "Now", "IS NULL")).await, 1);
    assert_eq!(
        scalar(&url, "SELECT COUNT(*) FROM procedure_version_lanes").await,
        2
    );
    let lane = |at: &str, lane: &str| {
        format!(
            "SELECT COUNT(*) FROM procedure_version_lanes WHERE procedure_id = '1' \
             AND updated_at = {at} AND position = 0 AND lane = '{lane}'"
        )
    };
    assert_eq!(scalar(&url, &lane(then, "A")).await, 1);
    assert_eq!(scalar(&url, &lane(now, "B")).await, 1);
}

/// A pool on `url` with the backend's migrations older than `version` applied.
async fn migrated_before(backend: Backend, url: &SecretString, version: i64) -> sqlx::AnyPool {
    let (dir, create) = match backend {
        Backend::Sqlite => ("migrations/sqlite", "?mode=rwc"),
        Backend::Postgres => ("migrations/postgres", ""),
    };
    let mut older = sqlx::migrate::Migrator::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
        .await
        .unwrap();
    older.migrations = Cow::Owned(
        older
            .migrations
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect(),
    );
    let pool = any_pool(&format!("{}{create}", url.expose_secret()).into()).await;
    older.run(&pool).await.unwrap();
    pool
}

async fn indexes_cover_the_usual_filters(backend: Backend) {
    let (url, _dir) = common::database(backend).await;
    Store::open(&url, 2).await.unwrap().close().await;
    let sql = match backend {
        Backend::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'index'",
        Backend::Postgres => {
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = current_schema()"
        }
    };
    let pool = any_pool(&url).await;
    let names: Vec<(String,)> = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
    pool.close().await;
    let names: Vec<String> = names.into_iter().map(|(n,)| n).collect();
    let few_values = [
        "procedures_status",
        "procedures_owner",
        "procedure_lanes_lane",
        "procedure_history_lanes_lane",
    ];
    for wanted in [
        "procedures_updated_at",
        "procedures_live_name",
        "procedure_calls_related_name",
        "procedure_history_updated_at",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "no index {wanted} in {names:?}"
        );
    }
    // SQLite's B-trees take any value and append cheaply where values repeat; PostgreSQL's
    // hash indexes (the only ones without a size limit) do not (migration 0005).
    for index in few_values {
        let present = names.iter().any(|n| n == index);
        match backend {
            Backend::Sqlite => assert!(present, "no index {index} in {names:?}"),
            Backend::Postgres => assert!(!present, "{index} is back: {names:?}"),
        }
    }
}

/// The backfill's bookkeeping of served ids writes no WAL (nor anything to replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_the_served_ids_unlogged() {
    let url: SecretString = common::pg::fresh_database().await.into();
    Store::open(&url, 2).await.unwrap().close().await;
    let pool = any_pool(&url).await;
    let (persistence,): (String,) =
        sqlx::query_as("SELECT relpersistence::text FROM pg_class WHERE relname = 'sync_seen'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(persistence, "u");
}

/// Every table, view and column carries its documentation, for BI tools that show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_comments_every_table_view_and_column() {
    let url: SecretString = common::pg::fresh_database().await.into();
    Store::open(&url, 2).await.unwrap().close().await;
    let pool = any_pool(&url).await;
    let relations: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT c.relname::text, obj_description(c.oid, 'pg_class') FROM pg_class c \
         WHERE c.relnamespace = current_schema()::text::regnamespace AND c.relkind IN ('r', 'v') \
         AND c.relname <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let uncommented_columns: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname || '.' || a.attname FROM pg_class c \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE c.relnamespace = current_schema()::text::regnamespace AND c.relkind IN ('r', 'v') \
         AND c.relname <> '_sqlx_migrations' AND col_description(c.oid, a.attnum) IS NULL",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let names: Vec<&str> = relations.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "procedures",
        "live_procedures",
        "live_procedure_lanes",
        "procedure_call_edges",
        "procedure_versions",
        "procedure_version_lanes",
    ] {
        assert!(names.contains(&wanted), "no relation {wanted} in {names:?}");
    }
    let uncommented: Vec<&str> = relations
        .iter()
        .filter(|(_, c)| c.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        uncommented.is_empty(),
        "tables and views without a comment: {uncommented:?}"
    );
    assert!(
        uncommented_columns.is_empty(),
        "columns without a comment: {uncommented_columns:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The example questions of docs/schema.md.

struct Question {
    number: u32,
    title: String,
    sqlite: Option<String>,
    postgres: Option<String>,
}

/// The `### N. title` sections under `## Example questions`, with their ```sql blocks. A block
/// whose first line is `-- SQLite` or `-- PostgreSQL` is for that backend only.
fn documented_questions() -> Vec<Question> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schema.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (_, examples) = doc
        .split_once("\n## Example questions")
        .expect("an Example questions section");
    let examples = examples.split("\n## ").next().unwrap();
    let mut questions: Vec<Question> = Vec::new();
    let mut lines = examples.lines();
    while let Some(line) = lines.next() {
        if let Some(heading) = line.strip_prefix("### ") {
            let (number, title) = heading.split_once(". ").expect("### N. question");
            questions.push(Question {
                number: number.parse().expect("a question number"),
                title: title.to_owned(),
                sqlite: None,
                postgres: None,
            });
        } else if line.trim_end() == "```sql" {
            let block: Vec<&str> = lines
                .by_ref()
                .take_while(|l| l.trim_end() != "```")
                .collect();
            let sql = block.join("\n") + "\n";
            let q = questions.last_mut().expect("SQL under a question");
            let (sqlite, postgres) = match block.first().map(|l| l.trim()) {
                Some("-- SQLite") => (true, false),
                Some("-- PostgreSQL") => (false, true),
                _ => (true, true),
            };
            for (wanted, slot) in [(sqlite, &mut q.sqlite), (postgres, &mut q.postgres)] {
                if wanted {
                    assert!(
                        slot.is_none(),
                        "question {} has two queries for one backend",
                        q.number
                    );
                    *slot = Some(sql.clone());
                }
            }
        }
    }
    questions
}

// ---------------------------------------------------------------------------------------------
// Asking the mirror.

/// Runs `sql` with the backend's own command-line client (`sqlite3` or `psql`), as an analyst
/// would, and returns the rows as `a|b|c` with NULL as `NULL` and timestamps in SQLite's form.
async fn ask(env: &Env, sql: &str) -> Vec<String> {
    let url = env.database_url.expose_secret();
    let mut command = if let Some(path) = url.strip_prefix("sqlite://") {
        let mut c = tools::sqlite3().await.async_command("sqlite3");
        c.args([
            "-batch",
            "-bail",
            "-noheader",
            "-list",
            "-separator",
            "|",
            "-nullvalue",
            "NULL",
        ])
        .arg(path);
        c
    } else {
        let mut c = tools::postgres().await.async_command("psql");
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-F",
            "|",
            "-P",
            "null=NULL",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
        ])
        .arg(url)
        .env("PGTZ", "UTC")
        .env("PGDATESTYLE", "ISO");
        c
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(sql.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{sql}\nfailed: {stderr}"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|row| {
            row.split('|')
                .map(sqlite_timestamp)
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// psql prints a `timestamptz` as `2025-02-10 12:00:00+00` (with PGTZ=UTC); SQLite stores
/// `2025-02-10T12:00:00.000000Z`. Anything else is returned as is.
fn sqlite_timestamp(cell: &str) -> String {
    let Some(local) = cell.strip_suffix("+00") else {
        return cell.to_owned();
    };
    let b = local.as_bytes();
    let shape = b.len() >= 19
        && b[10] == b' '
        && b[..19].iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => true,
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        });
    if !shape {
        return cell.to_owned();
    }
    let fraction = local[19..].strip_prefix('.').unwrap_or("");
    format!("{}T{}.{fraction:0<6}Z", &local[..10], &local[11..19])
}

// ---------------------------------------------------------------------------------------------
// sqlx helpers.

async fn any_pool(url: &SecretString) -> sqlx::AnyPool {
    common::any_pool(url.expose_secret()).await.unwrap()
}

async fn text(env: &Env, sql: &str) -> String {
    let pool = any_pool(&env.database_url).await;
    let (value,): (String,) = sqlx::query_as(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    value
}
