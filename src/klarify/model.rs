//! The API's items, parsed once at the edge.
//!
//! The vendor promises little about item shape (see "Unknowns" in klarify-api.md), so a page is
//! first split into raw JSON items and each item is parsed on its own: one malformed item becomes a
//! [`Rejected`] with its raw text and a reason, and never takes the rest of the page down with it.

use serde::Deserialize;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

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
pub(crate) struct RawPage<'a> {
    #[serde(borrow)]
    pub data: Vec<&'a RawValue>,
    #[serde(rename = "hasNext")]
    pub has_next: bool,
    #[serde(rename = "totalCount", default)]
    pub total_count: u64,
}

impl RawPage<'_> {
    pub(crate) fn into_page(self) -> Page {
        let mut items = Vec::with_capacity(self.data.len());
        let mut positions = Vec::with_capacity(self.data.len());
        let mut rejected = Vec::new();
        for (position, raw) in self.data.into_iter().enumerate() {
            match parse_item(raw.get()) {
                Ok(item) => {
                    items.push(item);
                    positions.push(position);
                }
                Err(reason) => rejected.push(Rejected {
                    raw: raw.get().to_owned(),
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

/// Parses one raw item; the error is a reason a person can act on.
pub fn parse_item(raw: &str) -> Result<Procedure, String> {
    let item: Item = serde_json::from_str(raw).map_err(|e| format!("not a valid item: {e}"))?;
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
    // PostgreSQL cannot store NUL in text or jsonb; refusing the item on both backends keeps
    // them alike and keeps the item intact in rejected_items.
    if has_nul_escape(raw) {
        return Err("contains a NUL character (\\u0000), which PostgreSQL cannot store".to_owned());
    }
    let updated_at = item
        .updated_at
        .ok_or_else(|| "missing `updated_at`".to_owned())
        .and_then(|s| {
            parse_instant(&s).map_err(|e| format!("unparsable `updated_at` {s:?}: {e}"))
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

/// Whether the JSON text holds an escaped NUL (`\u0000`), anywhere, unknown fields included.
/// A backslash escaped itself (`\\u0000`) is text, not NUL.
fn has_nul_escape(raw: &str) -> bool {
    raw.match_indices("u0000").any(|(at, _)| {
        let backslashes = raw[..at].bytes().rev().take_while(|&b| b == b'\\').count();
        backslashes % 2 == 1
    })
}

/// Any RFC 3339 instant, normalised to UTC at microsecond precision.
pub fn parse_instant(s: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(s, &Rfc3339).map(normalise)
}

/// UTC, truncated to whole microseconds.
pub fn normalise(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    let micros = t.microsecond();
    t.replace_microsecond(micros)
        .expect("a microsecond taken from a valid instant is valid")
}

/// The one text form of an instant used in SQLite columns, the cursor and the API query:
/// RFC 3339, UTC, always six fractional digits, so that text order is time order.
pub fn format_instant(t: OffsetDateTime) -> String {
    let t = normalise(t);
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

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

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
                "unparsable `updated_at`",
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
    fn only_a_real_nul_escape_counts() {
        assert!(has_nul_escape(r#"{"a":"x\u0000"}"#));
        assert!(has_nul_escape(r#"{"a":"\\\u0000"}"#));
        assert!(!has_nul_escape(r#"{"a":"\\u0000"}"#));
        assert!(!has_nul_escape(r#"{"a":"u0000"}"#));
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
        let page = serde_json::from_str::<RawPage>(body).unwrap().into_page();
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.items[1].id, "2");
        assert_eq!(page.rejected.len(), 1);
        assert_eq!(page.rejected[0].raw, r#"{"nope":true}"#);
    }
}
