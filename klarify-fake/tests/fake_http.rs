//! The fake seen from a client: real HTTP requests against a running `FakeKlarify`.

use std::time::{Duration, Instant};

use klarify_fake::{Churn, FakeKlarify, FakeOptions, Fault, Organisation};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

async fn start(org: Organisation) -> FakeKlarify {
    FakeKlarify::start(org, FakeOptions::default())
        .await
        .unwrap()
}

/// A request with the right key plus `params`.
async fn get(fake: &FakeKlarify, params: &[(&str, &str)]) -> reqwest::Response {
    let key = fake.access_key();
    let mut query = vec![("access_key", key.as_str())];
    query.extend_from_slice(params);
    reqwest::Client::new()
        .get(format!("{}/api/procedures", fake.base_url()))
        .query(&query)
        .send()
        .await
        .unwrap()
}

async fn page(fake: &FakeKlarify, params: &[(&str, &str)]) -> Value {
    let response = get(fake, params).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn everything(fake: &FakeKlarify, params: &[(&str, &str)]) -> Vec<Value> {
    let mut all = params.to_vec();
    all.push(("pageSize", "1000"));
    let body = page(fake, &all).await;
    assert_eq!(body["hasNext"], false);
    body["data"].as_array().unwrap().clone()
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

fn instant(item: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(item["updated_at"].as_str().unwrap(), &Rfc3339).unwrap()
}

#[tokio::test]
async fn pages_report_has_next_and_total_count() {
    let fake = start(Organisation::generate(1, 250)).await;
    let mut seen = Vec::new();
    for (number, expected_len, expected_next) in
        [("0", 100, true), ("1", 100, true), ("2", 50, false)]
    {
        let body = page(&fake, &[("page", number), ("pageSize", "100")]).await;
        assert_eq!(body["data"].as_array().unwrap().len(), expected_len);
        assert_eq!(body["hasNext"], expected_next);
        assert_eq!(body["totalCount"], 250);
        seen.extend(body["data"].as_array().unwrap().clone());
    }
    assert_eq!(seen, fake.snapshot(), "pages without sort come in id order");
    let defaults = page(&fake, &[]).await;
    assert_eq!(defaults["data"].as_array().unwrap()[..], seen[..100]);
    let beyond = page(&fake, &[("page", "9")]).await;
    assert_eq!(beyond["data"], Value::Array(vec![]));
    assert_eq!(beyond["hasNext"], false);
    assert_eq!(fake.requests(), 5);
}

#[tokio::test]
async fn sorts_both_ways_with_ties_by_ascending_id() {
    let fake = start(Organisation::generate(11, 300)).await;
    let mut saw_tie = false;
    for sort in [
        "updated_at,asc",
        "updated_at,desc",
        "updated_at",
        "name,asc",
        "name,desc",
    ] {
        let items = everything(&fake, &[("sort", sort)]).await;
        assert_eq!(items.len(), 300);
        let desc = sort.ends_with("desc");
        for pair in items.windows(2) {
            let key = if sort.starts_with("name") {
                pair[0]["name"].as_str().cmp(&pair[1]["name"].as_str())
            } else {
                instant(&pair[0]).cmp(&instant(&pair[1]))
            };
            let key = if desc { key.reverse() } else { key };
            assert!(key.is_le(), "{sort}: {pair:?}");
            if key.is_eq() {
                saw_tie = true;
                assert!(pair[0]["id"].as_str() < pair[1]["id"].as_str(), "{sort}");
            }
        }
    }
    assert!(saw_tie, "the sample has bulk-edit ties");
}

#[tokio::test]
async fn last_updated_at_is_strict_and_takes_any_rfc3339_instant() {
    let fake = start(Organisation::generate(2, 200)).await;
    let all = fake.snapshot();
    let pivot = instant(&all[77]);
    let newer = all.iter().filter(|i| instant(i) > pivot).count();
    let at_pivot = all.iter().filter(|i| instant(i) == pivot).count();

    let exact = all[77]["updated_at"].as_str().unwrap();
    let body = page(&fake, &[("last_updated_at", exact), ("pageSize", "1000")]).await;
    assert_eq!(body["totalCount"], newer);
    let served = body["data"].as_array().unwrap();
    assert!(served.iter().all(|i| instant(i) > pivot));
    assert!(!ids(served).contains(&all[77]["id"].as_str().unwrap().to_string()));

    // Half a second earlier, spelled with an offset and a fraction: the pivot is back in.
    let earlier = (pivot - time::Duration::milliseconds(500))
        .to_offset(time::macros::offset!(+2))
        .format(&Rfc3339)
        .unwrap();
    assert!(
        earlier.ends_with("+02:00") && earlier.contains('.'),
        "{earlier}"
    );
    let body = page(&fake, &[("last_updated_at", &earlier)]).await;
    assert_eq!(body["totalCount"], newer + at_pivot);

    let nanos = format!("{}.999999999999Z", &exact[..19]);
    let body = page(&fake, &[("last_updated_at", &nanos)]).await;
    assert_eq!(body["totalCount"], newer);
}

#[tokio::test]
async fn key_and_parameter_errors() {
    let fake = start(Organisation::generate(1, 10)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/procedures", fake.base_url());

    let missing = client.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 500);
    assert!(missing.json::<Value>().await.unwrap()["error"].is_string());
    let wrong = client
        .get(&url)
        .query(&[("access_key", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 404);
    assert!(wrong.json::<Value>().await.unwrap()["error"].is_string());

    for bad in [
        ("pageSize", "0"),
        ("pageSize", "1001"),
        ("pageSize", "ten"),
        ("page", "-1"),
        ("sort", "name,up"),
        ("sort", ",asc"),
        ("last_updated_at", "yesterday"),
        ("last_updated_at", "2024-01-15"),
    ] {
        assert_eq!(get(&fake, &[bad]).await.status(), 400, "{bad:?}");
    }
    assert_eq!(get(&fake, &[("sort", "owner,DESC")]).await.status(), 200);

    let elsewhere = client
        .get(format!("{}/api/other", fake.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 404);
    let post = client.post(&url).send().await.unwrap();
    assert_eq!(post.status(), 404);
    assert_eq!(fake.requests(), 13);
}

#[tokio::test]
async fn faults_come_in_fifo_order_then_normal_service_resumes() {
    let fake = start(Organisation::generate(1, 30)).await;
    let retry = |status, retry_after_secs| Fault::Status {
        status,
        retry_after_secs,
    };
    fake.inject(retry(429, Some(7)), 1);
    fake.inject(retry(503, None), 1);
    fake.inject(Fault::Truncated, 2);
    fake.inject(Fault::NotJson, 1);
    fake.inject(Fault::Huge { bytes: 1 << 20 }, 1);
    fake.inject(Fault::LyingHasNext, 1);

    let limited = get(&fake, &[]).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");
    let unavailable = get(&fake, &[]).await;
    assert_eq!(unavailable.status(), 503);
    assert!(unavailable.headers().get("retry-after").is_none());
    for _ in 0..2 {
        let truncated = get(&fake, &[]).await;
        assert_eq!(truncated.status(), 200);
        let text = truncated.text().await.unwrap();
        assert!(text.starts_with("{\"data\":["));
        assert!(serde_json::from_str::<Value>(&text).is_err());
    }
    let html = get(&fake, &[]).await;
    assert_eq!(html.status(), 200);
    assert_eq!(html.text().await.unwrap(), "<html>oops</html>");
    let huge = get(&fake, &[]).await.bytes().await.unwrap();
    assert_eq!(huge.len(), 1 << 20);
    assert!(huge.starts_with(b"{\"data\":[{"));
    assert!(serde_json::from_slice::<Value>(&huge).is_err());
    let lying = page(&fake, &[]).await;
    assert_eq!(lying["hasNext"], true, "30 items fit one page");
    assert_eq!(page(&fake, &[]).await["hasNext"], false);
    assert_eq!(fake.requests(), 8);
}

#[tokio::test]
async fn hang_outlasts_a_client_timeout_then_answers() {
    let fake = start(Organisation::generate(1, 5)).await;
    fake.inject(Fault::Hang(Duration::from_millis(300)), 1);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let url = format!("{}/api/procedures?access_key=test-key", fake.base_url());
    assert!(impatient.get(&url).send().await.unwrap_err().is_timeout());
    assert_eq!(impatient.get(&url).send().await.unwrap().status(), 200);

    fake.inject(Fault::Hang(Duration::from_millis(100)), 1);
    let started = Instant::now();
    assert_eq!(get(&fake, &[]).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn latency_is_added_to_every_response() {
    let fake = start(Organisation::generate(1, 5)).await;
    fake.set_latency(Duration::from_millis(80));
    let started = Instant::now();
    assert_eq!(get(&fake, &[("pageSize", "0")]).await.status(), 400);
    assert!(started.elapsed() >= Duration::from_millis(80));
}

#[tokio::test]
async fn churn_every_mutates_between_requests() {
    let fake = start(Organisation::generate(4, 50)).await;
    let before = fake.snapshot();
    let newest_before = before.iter().map(instant).max().unwrap();
    fake.churn_every(
        2,
        Churn {
            edits: 2,
            inserts: 1,
            deletes: 1,
            bulk: false,
        },
    );
    assert_eq!(
        everything(&fake, &[]).await,
        before,
        "first request untouched"
    );
    assert_eq!(fake.snapshot(), before);
    let second = everything(&fake, &[]).await;
    assert_ne!(second, before);
    assert_eq!(
        second,
        fake.snapshot(),
        "the churn happened before it was served"
    );
    assert_eq!(second.len(), 50);
    let fresh: Vec<_> = second
        .iter()
        .filter(|i| instant(i) > newest_before)
        .collect();
    assert_eq!(
        fresh.len(),
        3,
        "two edits and one insert, each a new second"
    );

    fake.churn_every(0, Churn::default());
    for _ in 0..3 {
        assert_eq!(everything(&fake, &[]).await, second);
    }
}

#[tokio::test]
async fn snapshot_and_pages_reflect_edits_deletes_and_inserts() {
    let fake = start(Organisation::generate(6, 40)).await;
    let before = fake.snapshot();
    let newest = before.iter().map(instant).max().unwrap();
    let watermark = newest.format(&Rfc3339).unwrap();
    let target = before[3]["id"].as_str().unwrap().to_string();

    fake.edit(&target);
    let edited = fake
        .snapshot()
        .into_iter()
        .find(|i| i["id"] == target)
        .unwrap();
    assert_eq!(instant(&edited), newest + time::Duration::SECOND);
    assert_ne!(edited, before[3]);

    let doomed = before[5]["id"].as_str().unwrap();
    assert!(fake.delete(doomed));
    assert!(!fake.delete(doomed));
    fake.apply(&Churn {
        inserts: 2,
        bulk: true,
        ..Churn::default()
    });
    let raw = serde_json::json!({"id": "raw-1", "name": null, "lanes": "oops", "extra": 1});
    fake.insert_raw(raw.clone());

    let after = fake.snapshot();
    assert_eq!(after.len(), 40 - 1 + 2 + 1);
    assert!(!ids(&after).contains(&doomed.to_string()));
    let served = everything(&fake, &[]).await;
    assert_eq!(served, after);
    assert!(served.contains(&raw), "malformed items are served as-is");

    // An incremental read from the old watermark sees exactly what changed.
    let changed = everything(&fake, &[("last_updated_at", &watermark)]).await;
    assert_eq!(changed.len(), 1 + 2 + 1);
    assert!(changed.contains(&raw) && changed.contains(&edited));
}

#[tokio::test]
async fn tied_timestamps_page_in_id_order_unless_ties_are_unstable() {
    let org = || Organisation::generate_tied(3, 120);
    let fake = start(org()).await;
    let all = fake.snapshot();
    assert!(all.iter().all(|i| i["updated_at"] == all[0]["updated_at"]));
    let mut paged = Vec::new();
    for number in ["0", "1", "2"] {
        let params = [
            ("sort", "updated_at,asc"),
            ("pageSize", "50"),
            ("page", number),
        ];
        paged.extend(
            page(&fake, &params).await["data"]
                .as_array()
                .unwrap()
                .clone(),
        );
    }
    assert_eq!(paged, all);

    let options = FakeOptions {
        unstable_ties: true,
        ..FakeOptions::default()
    };
    let unstable = FakeKlarify::start(org(), options).await.unwrap();
    let first = ids(&everything(&unstable, &[("sort", "updated_at,desc")]).await);
    let second = ids(&everything(&unstable, &[("sort", "updated_at,desc")]).await);
    assert_ne!(first, second);
    assert_ne!(first, ids(&all));
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, ids(&all), "shuffled, never lost or duplicated");
}

#[tokio::test]
async fn same_seed_serves_the_same_bytes() {
    let churn = Churn {
        edits: 5,
        inserts: 5,
        deletes: 5,
        bulk: false,
    };
    let mut bodies = Vec::new();
    for seed in [8, 8, 9] {
        let fake = start(Organisation::generate(seed, 100)).await;
        fake.apply(&churn);
        let body = get(&fake, &[("sort", "updated_at,desc")])
            .await
            .bytes()
            .await
            .unwrap();
        bodies.push(body);
    }
    assert_eq!(bodies[0], bodies[1]);
    assert_ne!(bodies[0], bodies[2]);
}

#[tokio::test]
async fn background_churn_runs_until_shutdown_and_shutdown_does_not_hang() {
    let fake = start(Organisation::generate(1, 20)).await;
    let clone = fake.clone();
    let churn = Churn {
        inserts: 1,
        ..Churn::default()
    };
    let background = fake.spawn_background_churn(Duration::from_millis(1), churn);
    tokio::time::timeout(Duration::from_secs(5), async {
        while clone.snapshot().len() == 20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("background churn inserts");

    // A request hanging at shutdown is cut short rather than holding the server open.
    fake.inject(Fault::Hang(Duration::from_secs(60)), 1);
    let hanging = tokio::spawn({
        let url = format!("{}/api/procedures?access_key=test-key", fake.base_url());
        async move { reqwest::get(url).await.map(|r| r.status()) }
    });
    let started = Instant::now();
    fake.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    tokio::time::timeout(Duration::from_secs(3), background)
        .await
        .expect("background churn stops at shutdown")
        .unwrap();
    if let Ok(status) = hanging.await.unwrap() {
        assert_eq!(status, 200);
    }
    let url = format!("{}/api/procedures?access_key=test-key", clone.base_url());
    assert!(reqwest::get(url).await.is_err(), "no longer serving");
    clone.shutdown().await; // a second shutdown through a clone is harmless
}

#[tokio::test]
async fn max_page_size_caps_pages_silently_and_counts_them_in_the_cap() {
    let options = FakeOptions {
        max_page_size: Some(30),
        ..FakeOptions::default()
    };
    let fake = FakeKlarify::start(Organisation::generate(5, 100), options)
        .await
        .unwrap();
    let all = fake.snapshot();
    let mut seen = Vec::new();
    for (number, len, next) in [
        ("0", 30, true),
        ("1", 30, true),
        ("2", 30, true),
        ("3", 10, false),
    ] {
        let body = page(&fake, &[("page", number), ("pageSize", "50")]).await;
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), len, "page {number}");
        assert_eq!(body["hasNext"], next, "page {number}");
        assert_eq!(body["totalCount"], 100);
        seen.extend(data.clone());
    }
    assert_eq!(
        seen, all,
        "page n starts at n times the cap: nothing skipped or repeated"
    );
    let small = page(&fake, &[("page", "1"), ("pageSize", "10")]).await;
    assert_eq!(
        small["data"].as_array().unwrap()[..],
        all[10..20],
        "smaller pages as asked"
    );
}

/// Every page of `base_url`, in `updated_at` order, by requests for 100 items each.
async fn sweep(http: &reqwest::Client, base_url: &str) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    loop {
        let number = pages.len().to_string();
        let query = [
            ("access_key", "test-key"),
            ("sort", "updated_at,asc"),
            ("pageSize", "100"),
            ("page", number.as_str()),
        ];
        let url = format!("{base_url}/api/procedures");
        let body: Value = http
            .get(url)
            .query(&query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pages.push(body["data"].as_array().unwrap().clone());
        if body["hasNext"] == false {
            return pages;
        }
    }
}

#[tokio::test]
async fn the_fake_binary_caps_pages_and_shuffles_ties_on_request() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-klarify"))
        .args([
            "--procedures",
            "300",
            "--max-page-size",
            "7",
            "--unstable-ties",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let base_url = lines.next_line().await.unwrap().unwrap();
    let http = reqwest::Client::new();
    let first = sweep(&http, &base_url).await;
    assert_eq!(
        first.len(),
        300_usize.div_ceil(7),
        "pages of 7 whatever is asked for"
    );
    assert!(first.iter().all(|p| p.len() <= 7));
    let second = sweep(&http, &base_url).await;
    assert_ne!(
        ids(&first.concat()),
        ids(&second.concat()),
        "ties in a new order per request"
    );
    child.kill().await.unwrap();
}
