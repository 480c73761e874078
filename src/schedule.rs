//! Cron expressions: parsed once, where the configuration is read, into a [`Cron`] that the
//! daemon and the status page take as it is.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// A valid cron expression, in the 6-field form (seconds first) tokio-cron-scheduler requires
/// and the status page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron(String);

/// Why a cron expression was refused; says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("{0:?} is not a cron expression: expected 5 fields (minute hour day month weekday) or 6 (with seconds first), e.g. \"*/5 * * * *\"")]
    Fields(String),
    #[error("{expr:?} is not a valid cron expression: {reason}")]
    Invalid { expr: String, reason: String },
}

impl Cron {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Accepts the common 5-field form (minute first) as well as the 6-field form (second first).
impl FromStr for Cron {
    type Err = CronError;

    fn from_str(expr: &str) -> Result<Self, CronError> {
        let six = match expr.split_whitespace().count() {
            5 => format!("0 {expr}"),
            6 | 7 => expr.to_owned(),
            _ => return Err(CronError::Fields(expr.to_owned())),
        };
        croner::Cron::new(&six)
            .with_seconds_required()
            .parse()
            .map_err(|e| CronError::Invalid {
                expr: expr.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self(six))
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cron {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An optional schedule, as the configuration writes it: the empty string is none.
pub fn optional<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Cron>, D::Error> {
    let expr = String::deserialize(deserializer)?;
    if expr.is_empty() {
        return Ok(None);
    }
    expr.parse().map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::Cron;

    #[test]
    fn five_and_six_field_forms() {
        let parse = |expr: &str| expr.parse::<Cron>().map(|c| c.to_string());
        assert_eq!(parse("*/5 * * * *").unwrap(), "0 */5 * * * *");
        assert_eq!(parse("0 */5 * * * *").unwrap(), "0 */5 * * * *");
        assert!(parse("every five minutes").is_err());
        assert!(parse("61 * * * *").is_err());
    }
}
