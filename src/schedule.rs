//! Cron expressions: validated once, in the 6-field form tokio-cron-scheduler requires.

/// Accepts the common 5-field form (minute first) as well as the 6-field form (second first)
/// and returns the 6-field one; the error says what is wrong.
pub fn parse_cron(expr: &str) -> Result<String, String> {
    let fields = expr.split_whitespace().count();
    let six = match fields {
        5 => format!("0 {expr}"),
        6 | 7 => expr.to_owned(),
        _ => {
            return Err(format!(
                "{expr:?} is not a cron expression: expected 5 fields (minute hour day month weekday) or 6 (with seconds first), e.g. \"*/5 * * * *\""
            ))
        }
    };
    croner::Cron::new(&six)
        .with_seconds_required()
        .parse()
        .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))?;
    Ok(six)
}

#[cfg(test)]
mod tests {
    use super::parse_cron;

    #[test]
    fn five_and_six_field_forms() {
        assert_eq!(parse_cron("*/5 * * * *").unwrap(), "0 */5 * * * *");
        assert_eq!(parse_cron("0 */5 * * * *").unwrap(), "0 */5 * * * *");
        assert!(parse_cron("every five minutes").is_err());
        assert!(parse_cron("61 * * * *").is_err());
    }
}
