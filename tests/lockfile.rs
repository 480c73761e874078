//! Cargo.lock lists only crates this project can build. Audits of the lock file (cargo audit,
//! Dependabot, a distribution's scanner) read every entry, compiled or not, so a crate that is
//! never built but carries an advisory fails them all the same.

const LOCK: &str = include_str!("../Cargo.lock");

/// The names of the lock file's packages that come from a registry.
fn registry_packages() -> Vec<&'static str> {
    LOCK.split("[[package]]")
        .filter(|entry| entry.contains("\nsource = \"registry+"))
        .filter_map(|entry| {
            let name = entry.lines().find_map(|l| l.strip_prefix("name = "))?;
            Some(name.trim_matches('"'))
        })
        .collect()
}

#[test]
fn no_mysql_driver_rsa_or_unmaintained_number_prefix_in_the_lock_file() {
    let packages = registry_packages();
    assert!(packages.contains(&"sqlx-core"), "the lock file was read");
    for absent in ["sqlx-mysql", "rsa", "number_prefix"] {
        assert!(!packages.contains(&absent), "{absent} is in Cargo.lock");
    }
}
