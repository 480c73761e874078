//! The shipped container files keep the trust boundaries the code relies on: the image reads
//! its configuration only from a directory the service cannot write, and the compose file runs
//! the service without capabilities and without a guessable database password.
//! (.ci/container-smoke builds and runs the image itself.)

const DOCKERFILE: &str = include_str!("../Dockerfile");
const COMPOSE: &str = include_str!("../docker-compose.yml");

/// The Dockerfile's last (runtime) stage.
fn runtime_stage() -> &'static str {
    &DOCKERFILE[DOCKERFILE.rfind("\nFROM ").expect("a FROM line")..]
}

/// The values of `instruction` (e.g. `WORKDIR`) in the runtime stage.
fn runtime(instruction: &str) -> Vec<&'static str> {
    runtime_stage()
        .lines()
        .filter_map(|line| line.strip_prefix(instruction)?.strip_prefix(' '))
        .map(str::trim)
        .collect()
}

/// `./config/default.toml` is read from the working directory: were that the data volume,
/// whoever can write the volume could point `klarify.base_url` at their own host and receive
/// the access key.
#[test]
fn the_image_reads_its_config_from_a_directory_that_is_not_the_data_volume() {
    let workdir = *runtime("WORKDIR")
        .last()
        .expect("the runtime stage sets WORKDIR");
    let volumes: Vec<String> = runtime("VOLUME")
        .iter()
        .flat_map(|v| v.trim_matches(['[', ']']).split(','))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .collect();
    assert!(!volumes.is_empty(), "the image declares its data volume");
    for volume in &volumes {
        assert!(
            workdir != volume && !workdir.starts_with(&format!("{volume}/")),
            "WORKDIR {workdir} is on the volume {volume}"
        );
    }
    let chowned = runtime_stage()
        .lines()
        .any(|line| line.contains("chown") && line.contains(workdir));
    assert!(!chowned, "the service user must not own {workdir}");
    let config = format!("config/default.toml {workdir}/config/default.toml");
    assert!(
        runtime("COPY").iter().any(|c| c.ends_with(&config)),
        "the image ships its own {workdir}/config/default.toml"
    );
}

/// The lines of the compose file's service `name`, up to the next service or section.
fn service(name: &str) -> Vec<&'static str> {
    let header = format!("  {name}:");
    COMPOSE
        .lines()
        .skip_while(|line| *line != header)
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("   ") || line.starts_with('#'))
        .map(str::trim)
        .collect()
}

#[test]
fn the_compose_service_drops_every_capability_and_cannot_gain_privileges() {
    let lines = service("klarify-sync");
    assert!(
        !lines.is_empty(),
        "the compose file has a klarify-sync service"
    );
    let cap_drop = lines.iter().position(|l| *l == "cap_drop:");
    assert_eq!(
        cap_drop.and_then(|i| lines.get(i + 1)),
        Some(&"- ALL"),
        "cap_drop: [ALL]"
    );
    assert!(lines.contains(&"- no-new-privileges:true"));
    assert!(lines.contains(&"read_only: true"));
}

/// A default password in the compose file would be the same on every installation.
#[test]
fn the_compose_file_has_no_default_database_password() {
    let uses: Vec<&str> = COMPOSE
        .match_indices("${POSTGRES_PASSWORD")
        .map(|(at, _)| &COMPOSE[at..at + COMPOSE[at..].find('}').unwrap()])
        .collect();
    assert!(!uses.is_empty());
    for used in uses {
        assert!(
            used.starts_with("${POSTGRES_PASSWORD:?"),
            "{used}}} must be required, not defaulted"
        );
    }
}
