//! One error type for both backends, in words true for the backend that raised it.

use sqlx::postgres::PgDatabaseError;
use sqlx::sqlite::SqliteError;

use crate::config::url_parameter_is_shown;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("there is no klarify-sync mirror at {url}: run `klarify-sync --once` first, or point DATABASE_URL at the mirror")]
    NoMirror { url: String },
    #[error("cannot apply the database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{}", explain(.0))]
    Query(#[from] sqlx::Error),
    #[error("the database schema is at migration {applied:?} but this klarify-sync expects {expected:?}; run the matching version")]
    Schema {
        applied: Option<i64>,
        expected: Option<i64>,
    },
    #[error("cannot take the sync lock: {0}")]
    Lock(String),
    #[error("the database holds a value klarify-sync cannot read: {0}")]
    Corrupt(String),
    #[error("refusing to mark {unseen} of {live} live procedures deleted (more than sync.max_delete_share = {max_share}): so many disappearing at once looks like an API fault. Nothing was marked; check Klarify, then rerun --backfill or raise sync.max_delete_share")]
    DeletionGuard {
        unseen: u64,
        live: u64,
        max_share: f64,
    },
}

/// A database error in words that say what to do: each backend names the causes its codes tell
/// apart; anything else is most often an unreachable server.
pub(crate) fn explain(e: &sqlx::Error) -> String {
    let specific = e.as_database_error().and_then(|d| {
        d.try_downcast_ref::<SqliteError>()
            .and_then(super::sqlite::explain)
            .or_else(|| {
                d.try_downcast_ref::<PgDatabaseError>()
                    .and_then(super::postgres::explain)
            })
    });
    match (specific, e) {
        (Some(words), _) => words,
        (
            None,
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed,
        ) => {
            format!("{e}; check database.url (DATABASE_URL) and that the database server is running and reachable")
        }
        _ => format!("database error: {e}"),
    }
}

/// The URL with every credential replaced, for messages and logs: the userinfo password, and
/// the value of every query parameter not known to be harmless (`password=` and anything sqlx
/// does not understand, however its name is percent-encoded). A fragment is dropped.
pub fn redact_url(url: &str) -> String {
    const HIDDEN: &str = "***";
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "(unparsable URL)".to_owned();
    };
    if parsed.password().is_none() && parsed.query().is_none() && parsed.fragment().is_none() {
        return url.to_owned();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(HIDDEN));
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(key, value)| {
            let value = if url_parameter_is_shown(&key) {
                value.into_owned()
            } else {
                HIDDEN.to_owned()
            };
            (key.into_owned(), value)
        })
        .collect();
    if pairs.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.set_fragment(None);
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact_url("sqlite://klarify.db"), "sqlite://klarify.db");
    }

    /// Every place sqlx's PostgreSQL URL parser takes a password from, however it is spelled.
    #[test]
    fn passwords_in_query_parameters_are_redacted() {
        for (url, shown) in [
            (
                "postgres://u@h/db?password=hunter2",
                "postgres://u@h/db?password=***",
            ),
            (
                "postgres://u@h/db?sslmode=verify-full&pass%77ord=hunter2",
                "postgres://u@h/db?sslmode=verify-full&password=***",
            ),
            (
                "postgres://u:x@h/db?sslpassword=hunter2&application_name=k",
                "postgres://u:***@h/db?sslpassword=***&application_name=k",
            ),
            ("postgres://u@h/db#hunter2", "postgres://u@h/db"),
            (
                "sqlite:///data/m.db?mode=rwc&password=hunter2",
                "sqlite:///data/m.db?mode=rwc&password=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
