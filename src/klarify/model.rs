//! The API's items, parsed once at the edge.
//!
//! The vendor promises little about item shape (see "Unknowns" in klarify-api.md), so a page is
//! first split into raw JSON items and each item is parsed on its own: one malformed item becomes a
//! [`Rejected`] with its raw text and a reason, and never takes the rest of the page down with it.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use time::{OffsetDateTime, UtcOffset};

use super::storable;

/// One procedure as served, with the fields klarify-sync stores in columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Procedure {
    pub id: String,
    pub name: Option<String>,
    pub status: Option<String>,
    pub owner: Option<String>,
    pub performer: Option<String>,
    /// Normalised to UTC and truncated to microseconds, the precision both backends store, so
    /// that comparisons in Rust and in SQL agree.
    pub updated_at: OffsetDateTime,
    pub url: Option<String>,
    pub lanes: Vec<String>,
    pub called_within: Vec<String>,
    pub called_from: Vec<String>,
    /// The item exactly as received, unknown fields included.
    pub raw: String,
}

/// An item that could not be understood; kept verbatim so nothing the API served is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub raw: String,
    pub reason: String,
    /// Where on its page it was served.
    pub position: usize,
}

/// One page of `/api/procedures`, items already parsed.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Procedure>,
    /// Where on the page each of `items` was served, for reasoning about positions when
    /// rejected items are interleaved.
    pub positions: Vec<usize>,
    pub rejected: Vec<Rejected>,
    pub has_next: bool,
    pub total_count: u64,
}

impl Page {
    /// How many entries the page held, readable or not.
    pub fn served(&self) -> usize {
        self.items.len() + self.rejected.len()
    }
}

/// The envelope; items stay raw until [`parse_item`] looks at each one.
#[derive(Deserialize)]
struct RawPage<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
    #[serde(rename = "hasNext")]
    has_next: bool,
    #[serde(rename = "totalCount", default)]
    total_count: u64,
}

/// Parses a response body. Only a broken envelope is an error; each item that cannot be
/// understood or stored becomes a [`Rejected`].
pub fn parse_page(body: &[u8]) -> Result<Page, serde_json::Error> {
    // serde_json refuses a whole body for one byte that is not UTF-8: one such item would fail
    // every pass at the same page. Each invalid sequence is read as U+FFFD instead, and the
    // items holding one are rejected, kept as read.
    let mut replaced = Vec::new();
    let text = match std::str::from_utf8(body) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => {
            let mut text = String::with_capacity(body.len());
            for chunk in body.utf8_chunks() {
                text.push_str(chunk.valid());
                if !chunk.invalid().is_empty() {
                    replaced.push(text.len());
                    text.push(char::REPLACEMENT_CHARACTER);
                }
            }
            Cow::Owned(text)
        }
    };
    let page: RawPage = serde_json::from_str(&text)?;
    Ok(page.into_page(|raw| {
        let start = raw.as_ptr() as usize - text.as_ptr() as usize;
        replaced
            .iter()
            .any(|at| (start..start + raw.len()).contains(at))
    }))
}

impl RawPage<'_> {
    /// `not_utf8` says whether an item's text stands where the body was not UTF-8.
    fn into_page(self, not_utf8: impl Fn(&str) -> bool) -> Page {
        let mut items = Vec::with_capacity(self.data.len());
        let mut positions = Vec::with_capacity(self.data.len());
        let mut rejected = Vec::new();
        for (position, raw) in self.data.into_iter().enumerate() {
            let raw = raw.get();
            let parsed = if not_utf8(raw) {
                Err("holds bytes that are not UTF-8 (kept here as U+FFFD)".to_owned())
            } else {
                parse_item(raw)
            };
            match parsed {
                Ok(item) => {
                    items.push(item);
                    positions.push(position);
                }
                Err(reason) => rejected.push(Rejected {
                    raw: raw.to_owned(),
                    reason,
                    position,
                }),
            }
        }
        Page {
            items,
            positions,
            rejected,
            has_next: self.has_next,
            total_count: self.total_count,
        }
    }
}

/// The item's fields as the API documents them. `null` and missing mean the same thing, and
/// unknown fields are ignored here (they survive in `raw`).
#[derive(Deserialize)]
struct Item {
    id: Option<Id>,
    name: Option<String>,
    status: Option<String>,
    owner: Option<String>,
    performer: Option<String>,
    updated_at: Option<String>,
    url: Option<String>,
    lanes: Option<Vec<String>>,
    called_within: Option<Vec<String>>,
    called_from: Option<Vec<String>>,
}

/// The documented type of `id` is string; a number is accepted too because it identifies the
/// procedure just as well and rejecting it would hide a whole procedure over a quoting detail.
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Text(String),
    Number(serde_json::Number),
}

/// Longer ids are refused: an id is a key in every table, and PostgreSQL cannot index keys of
/// more than about 2.7 kB.
pub const MAX_ID_BYTES: usize = 1024;

/// Parses one raw item; the error is a reason a person can act on, of bounded length.
pub fn parse_item(raw: &str) -> Result<Procedure, String> {
    let item: Item = serde_json::from_str(raw)
        .map_err(|e| format!("not a valid item: {}", capped(&e.to_string())))?;
    let id = match item.id {
        Some(Id::Text(id)) if !id.trim().is_empty() => id,
        Some(Id::Number(n)) => n.to_string(),
        _ => return Err("missing or empty `id`".to_owned()),
    };
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "`id` is {} bytes long, more than {MAX_ID_BYTES}",
            id.len()
        ));
    }
    // serde looked past the unknown fields; PostgreSQL's jsonb will not. Refusing such an item
    // on both backends keeps them alike and keeps the item intact in rejected_items.
    storable::check(raw)?;
    let updated_at = item
        .updated_at
        .ok_or_else(|| "missing `updated_at`".to_owned())
        .and_then(|s| {
            parse_instant(&s).map_err(|e| format!("unusable `updated_at` {}: {e}", untrusted(&s)))
        })?;
    Ok(Procedure {
        id,
        name: item.name,
        status: item.status,
        owner: item.owner,
        performer: item.performer,
        updated_at,
        url: item.url,
        lanes: item.lanes.unwrap_or_default(),
        called_within: item.called_within.unwrap_or_default(),
        called_from: item.called_from.unwrap_or_default(),
        raw: raw.to_owned(),
    })
}

/// The first instant stored: PostgreSQL's `timestamptz` has no year 0.
pub const EARLIEST: OffsetDateTime = datetime!(0001-01-01 00:00:00 UTC);
/// The last instant stored: RFC 3339 has four-digit years, and the text form below sorts as
/// time only while they stay four digits.
pub const LATEST: OffsetDateTime = datetime!(9999-12-31 23:59:59.999999 UTC);

/// Why a text is not an instant klarify-sync stores.
#[derive(Debug, thiserror::Error)]
pub enum InstantError {
    #[error("not an RFC 3339 instant: {0}")]
    Syntax(#[from] time::error::Parse),
    #[error("outside 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999Z, the instants both stores hold")]
    OutOfRange,
}

/// Any RFC 3339 instant between [`EARLIEST`] and [`LATEST`] in UTC, normalised to UTC at
/// microsecond precision.
pub fn parse_instant(s: &str) -> Result<OffsetDateTime, InstantError> {
    let t = OffsetDateTime::parse(s, &Rfc3339)?;
    normalise(t)
        .filter(|t| (EARLIEST..=LATEST).contains(t))
        .ok_or(InstantError::OutOfRange)
}

/// UTC, truncated to whole microseconds; `None` when UTC cannot name the instant (the end of
/// year 9999 at a negative offset is year 10000 in UTC, past what `time` represents).
pub fn normalise(t: OffsetDateTime) -> Option<OffsetDateTime> {
    let t = t.checked_to_offset(UtcOffset::UTC)?;
    t.replace_microsecond(t.microsecond()).ok()
}

/// The one text form of an instant used in SQLite columns, the cursor and the API query:
/// RFC 3339, UTC, always six fractional digits, so that text order is time order. Every
/// instant formatted here is in UTC already (parsed items, the clock, the cursor).
pub fn format_instant(t: OffsetDateTime) -> String {
    debug_assert!(t.offset().is_utc(), "{t} is not in UTC");
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// How much of an untrusted text a message or a log line shows, in bytes, escapes included,
/// before the marker saying what was cut.
pub const SHOWN_BYTES: usize = 200;

/// An untrusted string (an id, a served value) as messages and logs show it: quoted and escaped
/// like `{:?}`, so that a newline in it cannot forge a log line, and cut in the middle to
/// [`SHOWN_BYTES`] with a marker of how many bytes were cut, so that a megabyte-long value
/// cannot flood logs, `sync_runs.error` or `rejected_items.reason`.
pub fn untrusted(s: &str) -> String {
    format!(
        "\"{}\"",
        shorten(s, |c| c != '\'' && c.escape_debug().len() > 1)
    )
}

/// A message built from untrusted text (a parser's error quoting what it was served), cut
/// like [`untrusted`]. Only control characters are escaped: its quotes are its own.
pub fn capped(message: &str) -> String {
    shorten(message, char::is_control)
}

/// `s` with the characters `escaped` picks written as by `{:?}`, cut in the middle to
/// [`SHOWN_BYTES`].
fn shorten(s: &str, escaped: impl Fn(char) -> bool) -> String {
    let width = |c: char| {
        if escaped(c) {
            c.escape_debug().len()
        } else {
            c.len_utf8()
        }
    };
    let write = |out: &mut String, part: &str| {
        for c in part.chars() {
            if escaped(c) {
                out.extend(c.escape_debug());
            } else {
                out.push(c);
            }
        }
    };
    let mut out = String::new();
    if s.chars().map(width).sum::<usize>() <= SHOWN_BYTES {
        write(&mut out, s);
        return out;
    }
    // Half the budget for each end; `take_while` stops at the first character past it.
    let half = SHOWN_BYTES / 2;
    let mut used = 0;
    let head_end = s
        .char_indices()
        .take_while(|&(_, c)| {
            used += width(c);
            used <= half
        })
        .last()
        .map_or(0, |(i, c)| i + c.len_utf8());
    let mut used = 0;
    let tail_start = s[head_end..]
        .char_indices()
        .rev()
        .take_while(|&(_, c)| {
            used += width(c);
            used <= half
        })
        .last()
        .map_or(s.len(), |(i, _)| head_end + i);
    write(&mut out, &s[..head_end]);
    out.push_str(&format!("…[{} bytes cut]…", tail_start - head_end));
    write(&mut out, &s[tail_start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let raw = r#"{"id":"12345","name":"Customer Onboarding Process","status":"published",
            "owner":"John Smith","performer":"Customer Service Team","updated_at":"2024-01-15T14:30:00Z",
            "url":"https://yourorg.klarify.biz/process/12345","lanes":["Customer Service","Account Management"],
            "called_within":[],"called_from":["Sales Pipeline Process"],"extra":{"x":1}}"#;
        let p = parse_item(raw).unwrap();
        assert_eq!(p.id, "12345");
        assert_eq!(p.updated_at, datetime!(2024-01-15 14:30:00 UTC));
        assert_eq!(p.lanes, ["Customer Service", "Account Management"]);
        assert_eq!(p.called_from, ["Sales Pipeline Process"]);
        assert!(p.raw.contains("\"extra\""), "unknown fields survive in raw");
    }

    #[test]
    fn accepts_any_rfc3339_form_and_normalises_it() {
        let a = parse_instant("2024-01-15T16:30:00.123456789+02:00").unwrap();
        assert_eq!(a, datetime!(2024-01-15 14:30:00.123456 UTC));
        assert_eq!(format_instant(a), "2024-01-15T14:30:00.123456Z");
        assert_eq!(
            format_instant(parse_instant("2024-01-15T14:30:00Z").unwrap()),
            "2024-01-15T14:30:00.000000Z"
        );
    }

    #[test]
    fn nulls_and_missing_fields_are_empty_not_errors() {
        let p =
            parse_item(r#"{"id":"1","updated_at":"2024-01-15T14:30:00Z","lanes":null}"#).unwrap();
        assert_eq!(p.name, None);
        assert!(p.lanes.is_empty() && p.called_within.is_empty() && p.called_from.is_empty());
    }

    #[test]
    fn malformed_items_are_rejected_with_a_reason() {
        for (raw, reason) in [
            (
                r#"{"updated_at":"2024-01-15T14:30:00Z"}"#,
                "missing or empty `id`",
            ),
            (r#"{"id":"1"}"#, "missing `updated_at`"),
            (
                r#"{"id":"1","updated_at":"yesterday"}"#,
                "unusable `updated_at`",
            ),
            (
                r#"{"id":"1","updated_at":"2024-01-15T14:30:00Z","lanes":"HR"}"#,
                "not a valid item",
            ),
            (
                r#"{"id":"1","updated_at":"2024-01-15T14:30:00Z","lanes":[null]}"#,
                "not a valid item",
            ),
            (r#"[1,2]"#, "not a valid item"),
            (
                r#"{"id":"1","updated_at":"2024-01-15T14:30:00Z","name":"a\u0000b"}"#,
                "contains a NUL",
            ),
        ] {
            let err = parse_item(raw).unwrap_err();
            assert!(err.starts_with(reason), "{raw}: {err}");
        }
    }

    #[test]
    fn overlong_ids_are_rejected() {
        let id = "x".repeat(MAX_ID_BYTES + 1);
        let err = parse_item(&format!(
            r#"{{"id":"{id}","updated_at":"2024-01-15T14:30:00Z"}}"#
        ))
        .unwrap_err();
        assert!(err.contains("more than 1024"), "{err}");
    }

    #[test]
    fn a_bad_item_does_not_spoil_its_page() {
        let body = r#"{"data":[{"id":"1","updated_at":"2024-01-15T14:30:00Z"},{"id":2,"updated_at":"2024-01-15T14:30:00Z"},{"nope":true}],"hasNext":false,"totalCount":3}"#;
        let page = parse_page(body.as_bytes()).unwrap();
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.items[1].id, "2");
        assert_eq!(page.rejected.len(), 1);
        assert_eq!(page.rejected[0].raw, r#"{"nope":true}"#);
    }

    /// Both ends of the range both stores hold, whatever the offset they were written at.
    #[test]
    fn instants_within_the_stored_range_are_accepted_at_any_offset() {
        for (s, utc) in [
            ("0001-01-01T00:00:00Z", EARLIEST),
            ("0000-12-31T23:00:00-01:00", EARLIEST),
            ("9999-12-31T23:59:59.999999999Z", LATEST),
            ("9999-12-31T23:59:59.999999+00:00", LATEST),
        ] {
            let t = parse_instant(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(t, utc, "{s}");
            assert_eq!(parse_instant(&format_instant(t)).unwrap(), t, "{s}");
        }
    }

    /// Year 0 does not exist in PostgreSQL, and at a negative offset the end of year 9999 is
    /// past `time`'s range in UTC: converting it panicked.
    #[test]
    fn instants_outside_the_stored_range_are_refused_not_panicked_on() {
        for s in [
            "0000-01-01T00:00:00Z",
            "0000-12-31T23:59:59.999999Z",
            "0001-01-01T00:00:00+00:01",
            "9999-12-31T23:59:59-00:01",
            "9999-12-31T23:59:59.999999-23:59",
        ] {
            let err = parse_item(&format!(r#"{{"id":"1","updated_at":"{s}"}}"#)).unwrap_err();
            assert!(err.contains("outside 0001-01-01"), "{s}: {err}");
        }
    }

    #[test]
    fn untrusted_text_is_escaped_and_cut_in_the_middle() {
        assert_eq!(untrusted("id\nINFO forged"), r#""id\nINFO forged""#);
        assert_eq!(untrusted("a\"b'c\u{202e}"), r#""a\"b'c\u{202e}""#);
        let long = format!("{}{}", "é".repeat(300_000), "end");
        let shown = untrusted(&long);
        assert!(
            shown.starts_with("\"éé") && shown.ends_with("éend\""),
            "{shown}"
        );
        assert!(shown.len() <= SHOWN_BYTES + 40, "{}", shown.len());
        let cut: usize = shown
            .split("…[")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        let kept = shown.len() - "\"\"".len() - format!("…[{cut} bytes cut]…").len();
        assert_eq!(kept + cut, long.len(), "the marker says how much was cut");
        // Escapes count towards the budget, so they cannot inflate the result.
        assert!(untrusted(&"\u{1}".repeat(100_000)).len() <= SHOWN_BYTES + 40);
    }

    /// serde quotes what it was served, escaped; what it says about it stays.
    #[test]
    fn a_malformed_item_gives_a_bounded_reason() {
        let raw = format!(
            r#"{{"id":"1","updated_at":"2024-01-15T14:30:00Z","lanes":"{}"}}"#,
            "x".repeat(1 << 20)
        );
        let err = parse_item(&raw).unwrap_err();
        assert!(err.len() < SHOWN_BYTES + 100, "{}", err.len());
        assert!(
            err.starts_with("not a valid item: invalid type: string \"xxx"),
            "{err}"
        );
        assert!(err.contains("bytes cut]"), "{err}");
        assert!(
            err.ends_with("expected a sequence at line 1 column 1048632"),
            "{err}"
        );
        let err = parse_item(&format!(
            r#"{{"id":"1","updated_at":"{}\nERROR forged"}}"#,
            "9".repeat(1 << 20)
        ))
        .unwrap_err();
        assert!(err.len() < SHOWN_BYTES + 200, "{}", err.len());
        assert!(
            !err.contains('\n') && err.contains("\\nERROR forged"),
            "{err}"
        );
    }

    /// One item with a byte that is not UTF-8 made the whole body unreadable, on every pass.
    #[test]
    fn an_item_that_is_not_utf8_is_rejected_alone() {
        let body = b"{\"data\":[{\"id\":\"1\",\"updated_at\":\"2024-01-15T14:30:00Z\"},\
            {\"id\":\"2\",\"updated_at\":\"2024-01-15T14:30:00Z\",\"x\":\"a\xff\xfeb\"},\
            {\"id\":\"3\",\"updated_at\":\"2024-01-15T14:30:00Z\",\"x\":\"\xef\xbf\xbd\"}],\
            \"hasNext\":false,\"totalCount\":3}";
        let page = parse_page(body).unwrap();
        let ids: Vec<&str> = page.items.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(
            ids,
            ["1", "3"],
            "a U+FFFD that was served is text like any other"
        );
        assert_eq!(page.rejected.len(), 1);
        assert_eq!(page.rejected[0].position, 1);
        assert!(
            page.rejected[0].raw.contains("a\u{fffd}\u{fffd}b"),
            "{:?}",
            page.rejected[0]
        );
        assert!(page.rejected[0].reason.contains("not UTF-8"));
    }
}
