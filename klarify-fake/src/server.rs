//! The HTTP face of the fake: the vendor's parameter rules, error statuses and injected faults.
//!
//! Every request, whatever its path, goes through one handler so that it is counted, can
//! carry a queued fault and pays the configured latency, as requests to a real server would.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::state::{PageRequest, Sort};
use super::{Fault, Inner};

/// The vendor advises 100 at most; the fake accepts up to 1000, which benchmarks use.
const MAX_PAGE_SIZE: u64 = 1000;
const DEFAULT_PAGE_SIZE: u64 = 100;

pub(super) async fn run(listener: TcpListener, inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let app = Router::new().fallback(handle).with_state(inner);
    let stopped = async move {
        // An error means the handle is gone, which is as good as a stop.
        let _ = stop.wait_for(|stop| *stop).await;
    };
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::warn!(%error, "fake Klarify: server stopped with an error");
    }
}

async fn handle(State(inner): State<Arc<Inner>>, method: Method, uri: Uri) -> Response {
    let _in_flight = InFlight::enter(&inner);
    let fault = inner.arrive();
    let latency = inner.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = answer(&inner, &method, &uri, fault).await;
    // Counted before the client can see the response, so tests can read it right after.
    inner.answered.fetch_add(1, Ordering::SeqCst);
    response
}

/// Counts a request as in flight until its handler ends, also when a client that gave up
/// drops it half-way.
struct InFlight<'a>(&'a Inner);

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Inner) -> Self {
        let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(inner)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(inner: &Inner, method: &Method, uri: &Uri, fault: Option<Fault>) -> Response {
    match fault {
        Some(Fault::Status {
            status,
            retry_after_secs,
        }) => return injected_status(status, retry_after_secs),
        Some(Fault::NotJson) => {
            let html = HeaderValue::from_static("text/html");
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, html)],
                "<html>oops</html>",
            )
                .into_response();
        }
        Some(Fault::Huge { bytes }) => return json_bytes(StatusCode::OK, huge_body(bytes)),
        Some(Fault::Hang(duration)) => {
            let mut stop = inner.stop.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(duration) => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
        }
        Some(Fault::Truncated | Fault::LyingHasNext) | None => {}
    }
    if method != Method::GET || uri.path() != "/api/procedures" {
        return error(StatusCode::NOT_FOUND, "no such endpoint");
    }
    let request = match parse(uri, &inner.access_key) {
        Ok(mut request) => {
            if let Some(cap) = inner.max_page_size {
                request.page_size = request.page_size.min(cap);
            }
            request
        }
        Err((status, message)) => return error(status, &message),
    };
    let mut page = inner.lock().data.page(&request, inner.unstable_ties);
    if matches!(fault, Some(Fault::LyingHasNext)) {
        page.has_next = !page.has_next;
    }
    let mut body = serde_json::to_vec(&page).expect("JSON values always serialise");
    if matches!(fault, Some(Fault::Truncated)) {
        body.truncate(body.len() / 2);
    }
    json_bytes(StatusCode::OK, body)
}

/// Why a request gets no page: the status and the message of the JSON error body.
type Rejection = (StatusCode, String);

/// Checks the query as the vendor documents it: key first (500 missing, 404 wrong), then
/// the paging, sorting and filtering parameters (400 when unusable).
fn parse(uri: &Uri, access_key: &str) -> Result<PageRequest, Rejection> {
    let bad = |message: String| (StatusCode::BAD_REQUEST, message);
    let Ok(Query(params)) = Query::<HashMap<String, String>>::try_from_uri(uri) else {
        return Err(bad("malformed query string".to_string()));
    };
    match params.get("access_key") {
        None => {
            let missing = "access_key is required".to_string();
            return Err((StatusCode::INTERNAL_SERVER_ERROR, missing));
        }
        Some(key) if key != access_key => {
            let wrong = "access key not recognised".to_string();
            return Err((StatusCode::NOT_FOUND, wrong));
        }
        Some(_) => {}
    }
    let number = |name: &str, default: u64| -> Result<u64, Rejection> {
        params.get(name).map_or(Ok(default), |text| {
            text.parse()
                .map_err(|_| bad(format!("{name} must be a non-negative integer")))
        })
    };
    let page = number("page", 0)?;
    let page_size = number("pageSize", DEFAULT_PAGE_SIZE)?;
    if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(bad(format!("pageSize must be 1 to {MAX_PAGE_SIZE}")));
    }
    let sort = match params.get("sort") {
        None => Sort::by_id(),
        Some(text) => parse_sort(text).ok_or_else(|| bad(format!("invalid sort {text:?}")))?,
    };
    let since = match params.get("last_updated_at") {
        None => None,
        Some(text) => Some(
            OffsetDateTime::parse(text, &Rfc3339)
                .map_err(|_| bad("last_updated_at must be an RFC 3339 instant".to_string()))?,
        ),
    };
    Ok(PageRequest {
        page,
        page_size,
        sort,
        since,
    })
}

/// `field` or `field,asc|desc`; any field name made of letters, digits and `_` is accepted,
/// since the items may grow fields the docs do not list.
fn parse_sort(text: &str) -> Option<Sort> {
    let (field, direction) = text.split_once(',').unwrap_or((text, "asc"));
    let plausible = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if field.is_empty() || !field.chars().all(plausible) {
        return None;
    }
    let desc = match direction.to_ascii_lowercase().as_str() {
        "asc" => false,
        "desc" => true,
        _ => return None,
    };
    Some(Sort {
        field: field.to_string(),
        desc,
    })
}

fn injected_status(status: u16, retry_after_secs: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = error(status, "injected fault");
    if let Some(secs) = retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Starts like a real page, so a client only notices by size, never by a parse error early on.
fn huge_body(bytes: usize) -> Vec<u8> {
    let prefix = br#"{"data":[{"id":"huge","name":""#;
    let mut body = Vec::with_capacity(bytes);
    body.extend_from_slice(&prefix[..prefix.len().min(bytes)]);
    body.resize(bytes, b'x');
    body
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "status": status.as_u16(), "error": message });
    json_bytes(status, body.to_string().into_bytes())
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let json = HeaderValue::from_static("application/json");
    (status, [(header::CONTENT_TYPE, json)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_accepts_field_and_direction_only() {
        assert_eq!(parse_sort("name").unwrap().field, "name");
        assert!(parse_sort("updated_at,DESC").unwrap().desc);
        for bad in ["", ",asc", "name,up", "name,asc,x", "na me,asc", "name,"] {
            assert!(parse_sort(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn huge_body_has_the_exact_size_and_a_json_prefix() {
        assert_eq!(huge_body(5), b"{\"dat");
        let body = huge_body(1000);
        assert_eq!(body.len(), 1000);
        assert!(body.starts_with(b"{\"data\":[{"));
    }
}
