//! The oracle: the floor the API allows for a backfill, measured in the same run. It knows the
//! page boundaries in advance (the bench made the organisation), so it needs no count, no
//! samples and no cursor; it asks for the same pages klarify-sync reads (page size, sort, no
//! `last_updated_at`), `concurrency` at a time, and reads every body to its end without parsing
//! it or writing anything. What a backfill takes beyond this is klarify-sync's own.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures::{StreamExt, TryStreamExt};

/// How long reading all `procedures` of the source at `base_url` takes, in pages of
/// `page_size`, `concurrency` requests at a time.
pub async fn read_all(
    base_url: &str,
    access_key: &str,
    procedures: usize,
    page_size: u32,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let endpoint = format!("{}/api/procedures", base_url.trim_end_matches('/'));
    // As klarify-sync's client: plain http goes to loopback only, never through a proxy.
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("cannot build the oracle's HTTP client")?;
    let pages = procedures.div_ceil(page_size as usize) as u64;
    let started = Instant::now();
    futures::stream::iter(0..pages)
        .map(|page| read_page(&http, &endpoint, access_key, page, page_size))
        .buffer_unordered(concurrency.max(1))
        .try_collect::<()>()
        .await?;
    Ok(started.elapsed())
}

/// Reads one page's body chunk by chunk, keeping nothing: a body that stops before its JSON
/// object ends would make the floor look lower than it is, so its last byte is checked.
async fn read_page(
    http: &reqwest::Client,
    endpoint: &str,
    access_key: &str,
    page: u64,
    page_size: u32,
) -> anyhow::Result<()> {
    let failed = || format!("the oracle's request for page {page} failed");
    let mut response = http
        .get(endpoint)
        .query(&[
            ("access_key", access_key),
            ("page", &page.to_string()),
            ("pageSize", &page_size.to_string()),
            ("sort", "updated_at,asc"),
        ])
        .send()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(failed)?;
    if !response.status().is_success() {
        bail!("{}: HTTP {}", failed(), response.status());
    }
    let mut last = None;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(failed)?
    {
        last = chunk.last().copied().or(last);
    }
    ensure!(
        last == Some(b'}'),
        "the oracle's page {page} ended before its JSON did"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use klarify_fake::{FakeKlarify, FakeOptions, Fault, Organisation};

    async fn fake(procedures: usize, latency: Duration) -> FakeKlarify {
        let options = FakeOptions {
            latency,
            ..FakeOptions::default()
        };
        FakeKlarify::start(Organisation::generate(7, procedures), options)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_every_page_once_concurrency_at_a_time() {
        // 16 pages, each answered after 200 ms: the first 8 requests are all in flight at once
        // long before any is answered, so a reader that kept fewer in flight would show.
        let fake = fake(310, Duration::from_millis(200)).await;
        read_all(&fake.base_url(), &fake.access_key(), 310, 20, 8)
            .await
            .unwrap();
        assert_eq!(fake.requests(), 16, "one request per page, nothing else");
        assert_eq!(fake.max_in_flight(), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_cut_short_is_an_error() {
        let fake = fake(30, Duration::ZERO).await;
        fake.inject(Fault::Truncated, 1);
        let error = read_all(&fake.base_url(), &fake.access_key(), 30, 20, 1)
            .await
            .expect_err("the cut page is noticed");
        assert_eq!(
            format!("{error:#}"),
            "the oracle's page 0 ended before its JSON did"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_request_is_an_error_naming_the_page_and_status() {
        let fake = fake(30, Duration::ZERO).await;
        let error = read_all(&fake.base_url(), "wrong-key", 30, 20, 8)
            .await
            .expect_err("the wrong key is refused");
        let message = format!("{error:#}");
        assert!(
            message.contains("request for page") && message.contains("HTTP 404"),
            "{message}"
        );
    }
}
