//! What both stores can hold of an item's raw JSON.
//!
//! serde skips the fields it does not know without looking inside them, so an item can parse
//! and still be refused by PostgreSQL's `jsonb`: one such item would fail its whole batch, on
//! every pass. These checks find such items first, so that they are rejected alone, on both
//! backends alike. The limits were measured against PostgreSQL 15 (docs/reliability.md).

use super::model::untrusted;

/// Deeper nesting is refused. PostgreSQL's parser recurses until its stack limit (100,000
/// levels failed with the default 2 MB), SQLite's JSON functions stop at 1,000 (2,000 before
/// 3.45) and serde_json's default recursion limit is 128; well within all three, `raw` stays
/// readable by each.
pub const MAX_DEPTH: usize = 100;

/// PostgreSQL stores JSON numbers as `numeric` and writes them out in full (`1e3` is `1000`):
/// `numeric` refuses more than 131,072 digits before the point or 16,383 after it, and a
/// ten-character `1e100000` would be read back as 100 kB. Numbers written out with more digits
/// than this on either side are refused.
pub const MAX_NUMBER_DIGITS: usize = 1000;

/// Larger items are refused, counting numbers as PostgreSQL writes them out. `jsonb` holds at
/// most 255 MiB, and its binary form measured up to six times the text (`[0,0,…]`).
pub const MAX_ITEM_BYTES: usize = 16 << 20;

/// Why `raw`, valid JSON text, cannot be stored alike by both backends, if it cannot.
pub(super) fn check(raw: &str) -> Result<(), String> {
    let bytes = raw.as_bytes();
    let mut written = raw.len();
    let mut depth = 0;
    let mut at = 0;
    while at < bytes.len() {
        at = match bytes[at] {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("nested more than {MAX_DEPTH} levels deep"));
                }
                at + 1
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                at + 1
            }
            b'"' => string_end(raw, at + 1)?,
            b'-' | b'0'..=b'9' => {
                let end = raw[at..]
                    .find(|c: char| !matches!(c, '-' | '+' | '.' | 'e' | 'E' | '0'..='9'))
                    .map_or(raw.len(), |n| at + n);
                let token = &raw[at..end];
                written += number_width(token)?.saturating_sub(token.len());
                end
            }
            _ => at + 1,
        };
    }
    if written > MAX_ITEM_BYTES {
        return Err(format!(
            "{written} bytes long (numbers written out in full, as PostgreSQL stores them), more than {MAX_ITEM_BYTES}"
        ));
    }
    Ok(())
}

/// Where the string whose content starts at `from` ends (past its closing quote), if its
/// escapes are text both stores hold: PostgreSQL refuses NUL and UTF-16 surrogates that do not
/// pair up.
fn string_end(raw: &str, from: usize) -> Result<usize, String> {
    let bytes = raw.as_bytes();
    let unit = |at: usize| {
        let hex = raw.get(at..at + 6)?.strip_prefix("\\u")?;
        u16::from_str_radix(hex, 16).ok()
    };
    let mut at = from;
    while at < bytes.len() {
        at = match (bytes[at], unit(at)) {
            (b'"', _) => return Ok(at + 1),
            (_, Some(0)) => {
                return Err(
                    "contains a NUL character (\\u0000), which PostgreSQL cannot store".to_owned(),
                )
            }
            (_, Some(0xD800..=0xDBFF)) if matches!(unit(at + 6), Some(0xDC00..=0xDFFF)) => at + 12,
            (_, Some(0xD800..=0xDFFF)) => {
                return Err(format!(
                    "contains an unpaired UTF-16 surrogate ({}), which is no Unicode text",
                    &raw[at..at + 6]
                ))
            }
            (b'\\', _) => at + 2,
            _ => at + 1,
        };
    }
    Ok(at)
}

/// How many characters PostgreSQL writes the JSON number `token` as, if it takes at most
/// [`MAX_NUMBER_DIGITS`] on either side of the point.
fn number_width(token: &str) -> Result<usize, String> {
    let unsigned = token.strip_prefix('-').unwrap_or(token);
    let (mantissa, exponent) = unsigned.split_once(['e', 'E']).unwrap_or((unsigned, "0"));
    let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // An exponent too long for an i64 is past any limit; its sign decides which.
    let exponent = exponent
        .parse::<i64>()
        .unwrap_or(if exponent.starts_with('-') {
            i64::MIN
        } else {
            i64::MAX
        });
    // Upper bounds: JSON allows a leading zero only as `0.…`, which only lowers the weight.
    let before = (integer.len() as i64).saturating_add(exponent).max(1);
    let after = (fraction.len() as i64).saturating_sub(exponent).max(0);
    let limit = MAX_NUMBER_DIGITS as i64;
    if before > limit || after > limit {
        return Err(format!(
            "the number {} is more than {MAX_NUMBER_DIGITS} digits long before or after the point written out in full, as PostgreSQL stores it",
            untrusted(token)
        ));
    }
    let point = if after > 0 { 1 + after } else { 0 };
    Ok(token.len() - unsigned.len() + (before + point) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn what_jsonb_refuses_is_found() {
        for (raw, reason) in [
            (r#"{"a":"\ud800"}"#.to_owned(), "unpaired UTF-16 surrogate"),
            (r#"{"a":"\udc00\ud800"}"#.to_owned(), "unpaired"),
            (r#"{"a":"x\ud83d"}"#.to_owned(), "unpaired"),
            (r#"{"\uDBFF\u0041":1}"#.to_owned(), "unpaired"),
            (r#"{"a":"x\u0000"}"#.to_owned(), "NUL"),
            (r#"{"a":"\\\u0000"}"#.to_owned(), "NUL"),
            (r#"{"a":1e1000000}"#.to_owned(), "more than 1000 digits"),
            (r#"{"a":-1e-1000000}"#.to_owned(), "more than 1000 digits"),
            (
                r#"{"a":0e99999999999999999999}"#.to_owned(),
                "more than 1000",
            ),
            (r#"{"a":1E+1000}"#.to_owned(), "more than 1000 digits"),
            (format!(r#"{{"a":{}}}"#, "7".repeat(1001)), "more than 1000"),
            (
                format!(r#"{{"a":0.{}}}"#, "7".repeat(1001)),
                "more than 1000",
            ),
            (
                format!(r#"{{"a":{}}}"#, nested(100)),
                "nested more than 100",
            ),
            (
                format!(r#"{{"a":{}}}"#, nested(100_000)),
                "nested more than 100",
            ),
            // Ten bytes each, a megabyte each written out.
            (format!("[{}0]", "1e999,".repeat(17_000)), "bytes long"),
            (
                format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_ITEM_BYTES)),
                "bytes long",
            ),
        ] {
            let err = check(&raw).unwrap_err();
            assert!(err.contains(reason), "{}: {err}", &raw[..raw.len().min(40)]);
            assert!(err.len() < 400, "{err}");
        }
    }

    #[test]
    fn what_both_stores_hold_passes() {
        for raw in [
            r#"{"a":"\ud83d\ude00 \uD83D\uDE00 \uffff \u0001 \\ud800 \\u0000 u0000"}"#.to_owned(),
            r#"{"a":[1e999,-1e-999,1.5e-998,0e999,12.5e-3,-0,0.000001E+2]}"#.to_owned(),
            format!(r#"{{"a":{}}}"#, "7".repeat(1000)),
            format!(r#"{{"a":0.{}}}"#, "7".repeat(1000)),
            format!(r#"{{"a":{}}}"#, nested(MAX_DEPTH - 1)),
            r#"{"a":"[[[[{{{{","b":"1e999999"}"#.to_owned(),
        ] {
            check(&raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
        }
    }

    /// Whatever passes can be read back by serde_json, as a consumer of `raw` might.
    #[test]
    fn the_deepest_item_allowed_is_readable_by_serde_json() {
        let raw = format!(r#"{{"a":{}}}"#, nested(MAX_DEPTH - 1));
        check(&raw).unwrap();
        serde_json::from_str::<serde_json::Value>(&raw).unwrap();
    }

    /// The texts are what PostgreSQL 15 printed for `'<token>'::jsonb::text`; the estimate is
    /// exact but for a sign or leading zeros PostgreSQL drops.
    #[test]
    fn numbers_are_as_wide_as_postgresql_writes_them_or_a_little_wider() {
        for (token, postgres, estimate) in [
            ("0", "0", 1),
            ("-0", "0", 2),
            ("1.50", "1.50", 4),
            ("1E+2", "100", 3),
            ("12.5e-3", "0.0125", 6),
            ("0.00100e2", "0.100", 7),
            ("1e-5", "0.00001", 7),
            ("-1e999", &format!("-1{}", "0".repeat(999)), 1001),
        ] {
            assert_eq!(number_width(token).unwrap(), estimate, "{token}");
            assert!(estimate >= postgres.len(), "{token}");
        }
    }
}
