//! A typed client for `GET /api/procedures` that survives a misbehaving server.
//!
//! The access key travels in the query string, so any URL that reaches a log, an error or a
//! metric would leak it: reqwest errors are stripped of their URL, redirects are refused (a
//! redirect would carry the key to another host) and nothing here ever formats the request URL.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::{header::RETRY_AFTER, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use url::Url;

use super::model::{capped, format_instant, parse_page, Page};

/// How the client talks to Klarify; built from the `klarify` config section.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub base_url: Url,
    pub access_key: SecretString,
    pub page_size: u32,
    /// For one request, from connect to the last byte of the body.
    pub request_timeout: Duration,
    /// Attempts per page, the first included; transient failures only.
    pub max_attempts: usize,
    /// First retry delay; doubled per attempt, with jitter.
    pub retry_base_delay: Duration,
    /// Cap on any single wait, including one asked for by `Retry-After`.
    pub retry_max_delay: Duration,
    /// A page bigger than this is refused: a broken server must not exhaust our memory.
    pub max_body_bytes: usize,
    /// Requests in flight at once, across the whole process (at least 1).
    pub concurrency: usize,
    /// Requests started per second, across the whole process, retries included (at least 1).
    pub max_requests_per_second: u32,
}

/// Which page to ask for. The sort is always `updated_at,asc`: the sync engine's cursor relies on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageQuery {
    pub page: u32,
    /// Items per page; pages are counted in this size.
    pub page_size: u32,
    /// Only items modified strictly after this instant.
    pub after: Option<OffsetDateTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum KlarifyError {
    #[error("Klarify rejected the access key (HTTP 404): set a valid key in KLARIFY_ACCESS_KEY (or klarify.access_key); an administrator generates one under Settings -> Integrations")]
    KeyRejected,
    #[error("Klarify answered HTTP {status} {attempts} time(s){hint}", hint = status_hint(*.status))]
    Status { status: u16, attempts: usize },
    #[error("Klarify did not answer within {timeout:?} ({attempts} attempt(s)); check klarify.base_url and the network")]
    Timeout { timeout: Duration, attempts: usize },
    #[error("cannot reach Klarify at {host} ({attempts} attempt(s)): {reason}; check klarify.base_url and the network")]
    Unreachable {
        host: String,
        reason: String,
        attempts: usize,
    },
    #[error("Klarify sent a response that is not a page of procedures ({attempts} attempt(s)): {reason}")]
    Malformed { reason: String, attempts: usize },
    #[error("Klarify sent more than {limit} bytes for one page; refusing to read it (klarify.max_body_bytes)")]
    TooLarge { limit: usize },
}

fn status_hint(status: u16) -> &'static str {
    match status {
        500 => " (Klarify also answers 500 when the access_key parameter is missing)",
        429 => ": Klarify is rate limiting; lower klarify.page_size or the schedule",
        _ => "",
    }
}

impl KlarifyError {
    /// The server refused the request itself (a 4xx other than the key's 404, a timeout or rate
    /// limiting): asking the same again cannot help, asking differently may.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Status { status, .. } if (400..500).contains(status) && !matches!(status, 408 | 429))
    }

    /// Worth another attempt: the server or the network may do better in a moment.
    fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            Self::Timeout { .. } | Self::Unreachable { .. } | Self::Malformed { .. } => true,
            Self::KeyRejected | Self::TooLarge { .. } => false,
        }
    }

    fn set_attempts(&mut self, n: usize) {
        match self {
            Self::Status { attempts, .. }
            | Self::Timeout { attempts, .. }
            | Self::Unreachable { attempts, .. }
            | Self::Malformed { attempts, .. } => *attempts = n,
            Self::KeyRejected | Self::TooLarge { .. } => {}
        }
    }
}

/// A failed attempt, with the server's `Retry-After` when it gave one.
struct Failure {
    error: KlarifyError,
    retry_after: Option<Duration>,
}

impl From<KlarifyError> for Failure {
    fn from(error: KlarifyError) -> Self {
        Self {
            error,
            retry_after: None,
        }
    }
}

/// Owns one connection pool for the process's lifetime. Clones share it, and share the limits
/// on requests in flight and per second: the API sees one polite client however many tasks
/// page through it.
#[derive(Clone)]
pub struct KlarifyClient {
    http: reqwest::Client,
    endpoint: Url,
    settings: ClientSettings,
    in_flight: Arc<Semaphore>,
    rate: Arc<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for KlarifyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KlarifyClient")
            .field("endpoint", &self.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

impl KlarifyClient {
    pub fn new(settings: ClientSettings) -> Result<Self, KlarifyError> {
        let mut http = reqwest::Client::builder();
        // Plain http is allowed only to loopback (tests, --demo). A proxy from HTTP_PROXY or
        // ALL_PROXY would receive such a request, access key included, in clear text, so it
        // goes direct. Over https a proxy only tunnels (CONNECT): the key stays inside TLS.
        if settings.base_url.scheme() == "http" {
            http = http.no_proxy();
        }
        let http = http
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("klarify-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| KlarifyError::Unreachable {
                host: settings.base_url.host_str().unwrap_or_default().to_owned(),
                reason: e.without_url().to_string(),
                attempts: 0,
            })?;
        let mut endpoint = settings.base_url.clone();
        endpoint
            .path_segments_mut()
            .map_err(|()| KlarifyError::Malformed {
                reason: "klarify.base_url cannot have a path".into(),
                attempts: 0,
            })?
            .pop_if_empty()
            .extend(["api", "procedures"]);
        let per_second =
            NonZeroU32::new(settings.max_requests_per_second).unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            http,
            endpoint,
            in_flight: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            rate: Arc::new(RateLimiter::direct(Quota::per_second(per_second))),
            settings,
        })
    }

    pub fn page_size(&self) -> u32 {
        self.settings.page_size
    }

    /// How many requests may be in flight at once.
    pub fn concurrency(&self) -> usize {
        self.settings.concurrency.max(1)
    }

    /// Fetches one page, retrying transient failures with capped, jittered exponential backoff.
    pub async fn fetch_page(&self, query: PageQuery) -> Result<Page, KlarifyError> {
        self.fetch(query).await
    }

    /// How many items were modified after `after`, from `totalCount`, at the cost of one item.
    pub async fn count(&self, after: Option<OffsetDateTime>) -> Result<u64, KlarifyError> {
        let query = PageQuery {
            page: 0,
            page_size: 1,
            after,
        };
        let page = self.fetch(query).await?;
        Ok(page.total_count)
    }

    /// The item at `offset` (counted from 0) of those modified after `after`, in `updated_at`
    /// order: one item's worth of a request. `None` past the end, or when that item cannot be
    /// understood.
    pub async fn item_at(
        &self,
        after: Option<OffsetDateTime>,
        offset: u32,
    ) -> Result<Option<OffsetDateTime>, KlarifyError> {
        let query = PageQuery {
            page: offset,
            page_size: 1,
            after,
        };
        let page = self.fetch(query).await?;
        Ok(page.items.first().map(|p| p.updated_at))
    }

    async fn fetch(&self, query: PageQuery) -> Result<Page, KlarifyError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.settings.retry_base_delay)
            .with_max_delay(self.settings.retry_max_delay)
            .with_max_times(self.settings.max_attempts.saturating_sub(1))
            .with_jitter();
        let max_delay = self.settings.retry_max_delay;
        let mut attempts = 0;
        let result = (|| {
            attempts += 1;
            self.fetch_once(query)
        })
        .retry(backoff)
        .when(|f: &Failure| f.error.is_transient())
        .adjust(move |f: &Failure, planned| {
            // Honour the server's wish, but never wait longer than we would for anything else.
            planned.map(|d| f.retry_after.map_or(d, |ra| ra.min(max_delay)))
        })
        .notify(|f: &Failure, wait| {
            metrics::counter!("klarify_api_retries_total").increment(1);
            tracing::warn!(error = %f.error, ?wait, page = query.page, "Klarify request failed; retrying");
        })
        .await;
        result.map_err(|mut f| {
            f.error.set_attempts(attempts);
            f.error
        })
    }

    async fn fetch_once(&self, query: PageQuery) -> Result<Page, Failure> {
        // Held for the request only, not across a retry's wait.
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        self.rate.until_ready().await;
        let started = std::time::Instant::now();
        let outcome = self.request(query).await;
        let status = match &outcome {
            Ok(_) => "200".to_owned(),
            Err(f) => match &f.error {
                KlarifyError::Status { status, .. } => status.to_string(),
                KlarifyError::KeyRejected => "404".to_owned(),
                KlarifyError::Timeout { .. } => "timeout".to_owned(),
                KlarifyError::Unreachable { .. } => "unreachable".to_owned(),
                KlarifyError::Malformed { .. } | KlarifyError::TooLarge { .. } => {
                    "bad_body".to_owned()
                }
            },
        };
        metrics::counter!("klarify_api_requests_total", "status" => status).increment(1);
        metrics::histogram!("klarify_api_request_duration_seconds").record(started.elapsed());
        outcome
    }

    async fn request(&self, query: PageQuery) -> Result<Page, Failure> {
        let mut params = vec![
            (
                "access_key",
                self.settings.access_key.expose_secret().to_owned(),
            ),
            ("page", query.page.to_string()),
            ("pageSize", query.page_size.to_string()),
            ("sort", "updated_at,asc".to_owned()),
        ];
        if let Some(after) = query.after {
            params.push(("last_updated_at", format_instant(after)));
        }
        let response = self
            .http
            .get(self.endpoint.clone())
            .query(&params)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;

        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Err(KlarifyError::KeyRejected.into());
        }
        if !status.is_success() {
            return Err(Failure {
                retry_after: retry_after(&response),
                error: KlarifyError::Status {
                    status: status.as_u16(),
                    attempts: 1,
                },
            });
        }
        let body = self.read_capped(response).await?;
        // serde quotes what it was served: a megabyte-long string would be a megabyte-long
        // error, in every log line, `sync_runs.error` and `/readyz`.
        parse_page(&body).map_err(|e| {
            KlarifyError::Malformed {
                reason: capped(&e.to_string()),
                attempts: 1,
            }
            .into()
        })
    }

    /// Reads the body, refusing to buffer more than `max_body_bytes`.
    async fn read_capped(&self, mut response: reqwest::Response) -> Result<Vec<u8>, KlarifyError> {
        let limit = self.settings.max_body_bytes;
        let too_large = KlarifyError::TooLarge { limit };
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(e))?
        {
            if body.len() + chunk.len() > limit {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Maps a reqwest error without its URL, which holds the key.
    fn transport_error(&self, e: reqwest::Error) -> KlarifyError {
        if e.is_timeout() {
            return KlarifyError::Timeout {
                timeout: self.settings.request_timeout,
                attempts: 1,
            };
        }
        let e = e.without_url();
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason = format!("{reason}: {s}");
            source = s.source();
        }
        if e.is_body() || e.is_decode() {
            return KlarifyError::Malformed {
                reason,
                attempts: 1,
            };
        }
        KlarifyError::Unreachable {
            host: self.endpoint.host_str().unwrap_or_default().to_owned(),
            reason,
            attempts: 1,
        }
    }
}

/// `Retry-After` in its delay-seconds form; the HTTP-date form is rare for APIs and ignored.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic or a log line can only show what `Debug` and `Display` print.
    #[test]
    fn neither_the_client_nor_its_settings_nor_its_errors_print_the_key() {
        let settings = ClientSettings {
            base_url: "https://integration.klarify.biz".parse().unwrap(),
            access_key: "the-secret-key".into(),
            page_size: 100,
            request_timeout: Duration::from_secs(1),
            max_attempts: 1,
            retry_base_delay: Duration::from_millis(1),
            retry_max_delay: Duration::from_millis(1),
            max_body_bytes: 1024,
            concurrency: 1,
            max_requests_per_second: 1,
        };
        let client = KlarifyClient::new(settings.clone()).unwrap();
        let shown = format!("{settings:?} {client:?} {}", KlarifyError::KeyRejected);
        assert!(!shown.contains("the-secret-key"), "{shown}");
        assert!(
            shown.contains("integration.klarify.biz/api/procedures"),
            "{shown}"
        );
    }
}
