//! Throwaway PostgreSQL databases for the tests.
//!
//! Tests run in parallel, as threads of one test binary and as several test processes
//! at once, so each test gets its own empty database from [`fresh_database`] instead of
//! sharing one and cleaning up. The server comes from, in order:
//!
//! 1. `TEST_DATABASE_URL`, an admin URL to a server of your own;
//! 2. a local cluster that this file starts from the PostgreSQL binaries (Debian's
//!    `postgresql-15`), shared by every test process and left running for the next run;
//! 3. a `postgres:15` container, when a Docker engine is around and no PostgreSQL is installed;
//! 4. a local cluster as in 2, from Debian's `postgresql-15` got by tools.rs.
//!
//! The local cluster lives in `$TMPDIR/klarify-sync-test-pg-<uid>`, with its `server.log`
//! and `port`. Stop it with `pg_ctl -D /tmp/klarify-sync-test-pg-$(id -u)/data stop` (as root:
//! `runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D /tmp/klarify-sync-test-pg-0/data stop`),
//! or just delete the directory. Each test process drops the databases that ended test
//! processes left on it; on a `TEST_DATABASE_URL` server they stay (named `kst_<pid>_...`).

// Every test binary compiles tests/common, and not every one of them uses PostgreSQL.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};
use tokio::process::Command;
use tokio::sync::OnceCell;

use super::tools::{self, Programs};

/// The server's admin URL, found once per process. Only the URL is kept: each test has its
/// own tokio runtime, and a pool made on one runtime breaks when that runtime ends.
static ADMIN_URL: OnceCell<String> = OnceCell::const_new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A brand-new, empty PostgreSQL database for one test, as a `postgres://` URL.
/// Databases are never shared between tests.
pub async fn fresh_database() -> String {
    let admin = ADMIN_URL.get_or_init(admin_url).await;
    // The pid lets a later run drop the databases of processes that have ended.
    let name = format!(
        "kst_{}_{}_{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    );
    create_database(admin, &name).await;
    with_database(admin, &name)
}

/// Creates the empty database `name` on the server that `admin` (a superuser's URL) reaches.
async fn create_database(admin: &str, name: &str) {
    let mut conn = PgConnection::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL server {admin}: {e}"));
    conn.execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    let _ = conn.close().await;
}

async fn admin_url() -> String {
    if let Some(url) = std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        return url;
    }
    let docker =
        std::env::var_os("DOCKER_HOST").is_some() || Path::new("/var/run/docker.sock").exists();
    if docker && tools::installed_postgres().is_none() {
        return docker_server().await;
    }
    local_cluster(tools::postgres().await).await
}

/// `url` with its database replaced by `db`, keeping any `?` parameters.
fn with_database(url: &str, db: &str) -> String {
    let (base, params) = url
        .split_once('?')
        .map_or((url, None), |(b, p)| (b, Some(p)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    match params {
        Some(params) => format!("{}/{db}?{params}", &base[..path]),
        None => format!("{}/{db}", &base[..path]),
    }
}

/// Durability is worthless for test data, parallel tests open many connections, and the
/// default unix socket directory may not be writable by us.
const SETTINGS: &str = "
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
log_checkpoints = off
";

/// The tests' own cluster, shared by all test processes of this user.
struct Cluster {
    programs: &'static Programs,
    dir: PathBuf,
    /// Who runs the server when we are root, which PostgreSQL refuses to be.
    owner: Option<(libc::uid_t, libc::gid_t)>,
}

async fn local_cluster(programs: &'static Programs) -> String {
    let euid = unsafe { libc::geteuid() };
    let cluster = Cluster {
        programs,
        dir: std::env::temp_dir().join(format!("klarify-sync-test-pg-{euid}")),
        owner: (euid == 0).then(postgres_user),
    };
    cluster.prepare_dir();
    let dir = cluster.dir.clone();
    // Held until the end of this function, so that one process at a time checks, starts,
    // or cleans up the cluster.
    let _lock = tokio::task::spawn_blocking(move || lock(&dir))
        .await
        .expect("lock task");
    let url = match cluster.running().await {
        Some(url) => url,
        None => cluster.restart().await,
    };
    drop_leftover_databases(&url).await;
    url
}

fn postgres_user() -> (libc::uid_t, libc::gid_t) {
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    assert!(
        !pw.is_null(),
        "running the tests as root needs the `postgres` system user (it comes with the \
         postgresql-15 package), as PostgreSQL refuses to run as root"
    );
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// flock rather than a lock file: the kernel releases it if a test process dies mid-start.
pub(super) fn lock(dir: &Path) -> File {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let err = std::io::Error::last_os_error();
        assert!(
            err.kind() == std::io::ErrorKind::Interrupted,
            "cannot lock {}: {err}",
            path.display()
        );
    }
    file
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn prepare_dir(&self) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.dir.display()));
        self.give_to_owner(&self.dir);
        let Some((uid, _)) = self.owner else { return };
        if let Some(closed) = self
            .dir
            .ancestors()
            .skip(1)
            .find(|a| fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 == 0 && m.uid() != uid))
        {
            panic!(
                "user postgres cannot enter {}: set TMPDIR to a directory it can reach, e.g. /tmp",
                closed.display()
            );
        }
    }

    fn give_to_owner(&self, path: &Path) {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("cannot chown {} to postgres: {e}", path.display()));
        }
    }

    /// The admin URL of the cluster if it is up and answering; the port file alone proves
    /// nothing after a reboot or a kill -9.
    async fn running(&self) -> Option<String> {
        let port: u16 = fs::read_to_string(self.dir.join("port"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
        let connecting = PgConnection::connect(&url);
        let mut conn = match tokio::time::timeout(Duration::from_secs(30), connecting).await {
            Ok(Ok(conn)) => conn,
            // Too many clients, or still starting: up, so no reason to start it over and
            // destroy the databases of tests running now.
            Ok(Err(sqlx::Error::Database(e)))
                if matches!(e.code().as_deref(), Some("53300" | "57P03")) =>
            {
                return Some(url)
            }
            _ => return None,
        };
        // The port may have gone to another server since.
        let served: String = sqlx::query_scalar("SHOW data_directory")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        let _ = conn.close().await;
        (fs::canonicalize(served).ok()? == fs::canonicalize(self.data()).ok()?).then_some(url)
    }

    async fn restart(&self) -> String {
        // One server lifetime per log, so the log stays small and its tail is about this start.
        File::create(self.log())
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.log().display()));
        self.give_to_owner(&self.log());
        if self.data().join("PG_VERSION").exists() {
            if let Some(url) = self.start().await {
                return url;
            }
        }
        // Unusable: half-initialised, another PostgreSQL version, or a postmaster that no
        // longer answers (it shuts itself down within a minute once its postmaster.pid is gone).
        let _ = fs::remove_dir_all(self.data());
        if self.initdb().await {
            if let Some(url) = self.start().await {
                return url;
            }
        }
        let log = String::from_utf8_lossy(&fs::read(self.log()).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "could not start the PostgreSQL test cluster in {}; last lines of {}:\n{}",
            self.dir.display(),
            self.log().display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }

    async fn initdb(&self) -> bool {
        let mut initdb = self.command("initdb");
        initdb.args(["-U", "postgres", "-A", "trust", "-E", "UTF8"]);
        initdb.args(["--no-locale", "--no-sync"]);
        succeeded(initdb).await && self.configure(SETTINGS).is_ok()
    }

    /// Appends to `postgresql.conf`: later lines win, so settings may be overridden.
    fn configure(&self, settings: &str) -> std::io::Result<()> {
        OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .and_then(|mut conf| conf.write_all(settings.as_bytes()))
    }

    /// Starts the server on a free port and records the port.
    async fn start(&self) -> Option<String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .args(["start", "-w", "-t", "120", "-l"])
            .arg(self.log());
        pg_ctl.args(["-o", &format!("-p {port}")]);
        if !succeeded(pg_ctl).await {
            return None;
        }
        fs::write(self.dir.join("port"), port.to_string()).ok()?;
        self.running().await
    }

    /// A PostgreSQL program on this cluster, run as its owner, its output going to the log
    /// (never to our stdout: a server holding that open would keep `cargo test | tee` waiting).
    fn command(&self, program: &str) -> Command {
        let log = OpenOptions::new()
            .append(true)
            .open(self.log())
            .expect("server log");
        let mut cmd = self.programs.async_command(program);
        cmd.arg("-D")
            .arg(self.data())
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd.stdout(log.try_clone().expect("server log")).stderr(log);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

async fn succeeded(mut cmd: Command) -> bool {
    cmd.status().await.is_ok_and(|status| status.success())
}

/// The cluster outlives test runs, so each process drops the databases of processes that
/// have ended; otherwise every run would leave some 8 MB per test behind.
async fn drop_leftover_databases(admin: &str) {
    let Ok(mut conn) = PgConnection::connect(admin).await else {
        return;
    };
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE 'kst%'")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    for name in names {
        let Some(pid) = name
            .split('_')
            .nth(1)
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // EPERM: the process is alive but someone else's.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let drop = format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#);
            let _ = conn.execute(drop.as_str()).await;
        }
    }
    let _ = conn.close().await;
}

/// One container per test process. It is never dropped, so it outlives the process:
/// `docker rm -f $(docker ps -q --filter label=org.testcontainers.managed-by=testcontainers)`.
async fn docker_server() -> String {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, GenericImage, ImageExt};

    static CONTAINER: OnceCell<ContainerAsync<GenericImage>> = OnceCell::const_new();
    const READY: &str = "database system is ready to accept connections";
    let container = GenericImage::new("postgres", "15")
        .with_exposed_port(5432.tcp())
        // The image's setup runs a temporary server logging to stdout; the real one logs to stderr.
        .with_wait_for(WaitFor::message_on_stdout(READY))
        .with_wait_for(WaitFor::message_on_stderr(READY))
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
        .start()
        .await
        .unwrap_or_else(|e| panic!("cannot start a postgres:15 container: {e}"));
    let host = container.get_host().await.expect("container host");
    let port = container
        .get_host_port_ipv4(5432)
        .await
        .expect("container port");
    let _ = CONTAINER.set(container);
    format!("postgres://postgres@{host}:{port}/postgres")
}

/// A PostgreSQL server of one test's own, for tests that stop and start the database under a
/// running klarify-sync. Never use the shared cluster for that: every other test runs on it.
///
/// The cluster lives in a temporary directory (owned by `postgres` when we are root, as the
/// shared cluster is) and always listens on the same port, so a URL taken before a stop works
/// again after the next start. Dropping it stops the server and deletes its files.
pub struct PrivateCluster {
    cluster: Cluster,
    port: u16,
    _dir: tempfile::TempDir,
}

/// Creates, starts and returns a private cluster, from PostgreSQL's server binaries even when
/// `TEST_DATABASE_URL` is set (these tests stop and start the server).
pub async fn private_cluster() -> PrivateCluster {
    let programs = tools::postgres().await;
    let euid = unsafe { libc::geteuid() };
    let dir = tempfile::Builder::new()
        .prefix("klarify-sync-private-pg-")
        .tempdir_in(std::env::temp_dir())
        .expect("a temporary directory for a private PostgreSQL cluster");
    let cluster = Cluster {
        programs,
        dir: dir.path().to_owned(),
        owner: (euid == 0).then(postgres_user),
    };
    cluster.prepare_dir();
    File::create(cluster.log())
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", cluster.log().display()));
    cluster.give_to_owner(&cluster.log());
    let private = PrivateCluster {
        port: free_port(),
        cluster,
        _dir: dir,
    };
    assert!(
        private.cluster.initdb().await,
        "initdb failed for a private cluster; last lines of its log:\n{}",
        private.log_tail()
    );
    // These tests kill the server (`stop -m immediate`) as a host that dies. Commits must
    // survive that, as on a real server: with asynchronous commit the last ones (a migration,
    // say) were lost with the outage.
    private
        .cluster
        .configure("synchronous_commit = on\n")
        .expect("the private cluster's postgresql.conf is writable");
    private.start().await;
    private
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl PrivateCluster {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's URL for `db` on this cluster (the database need not exist).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Creates an empty database and returns its URL; the cluster must be running.
    pub async fn create_database(&self, db: &str) -> String {
        create_database(&self.url("postgres"), db).await;
        self.url(db)
    }

    /// Starts the server on its port and waits until it accepts connections.
    pub async fn start(&self) {
        let mut pg_ctl = self.cluster.command("pg_ctl");
        pg_ctl
            .args(["start", "-w", "-t", "60", "-l"])
            .arg(self.cluster.log());
        pg_ctl.args(["-o", &format!("-p {}", self.port)]);
        assert!(
            succeeded(pg_ctl).await,
            "cannot start the private PostgreSQL cluster on port {}; last lines of its log:\n{}",
            self.port,
            self.log_tail()
        );
        // pg_ctl -w returns once the postmaster says it is ready; make sure it answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match PgConnection::connect(&self.url("postgres")).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return;
                }
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("the private cluster started but does not answer: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Stops the server the hard way (`pg_ctl stop -m immediate`): every connection is cut at
    /// once, as when the database host dies.
    pub async fn stop(&self) {
        let mut pg_ctl = self.cluster.command("pg_ctl");
        pg_ctl.args(["stop", "-w", "-t", "60", "-m", "immediate"]);
        assert!(
            succeeded(pg_ctl).await,
            "cannot stop the private PostgreSQL cluster; last lines of its log:\n{}",
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        let log =
            String::from_utf8_lossy(&fs::read(self.cluster.log()).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if !self.cluster.data().join("postmaster.pid").exists() {
            return;
        }
        let mut pg_ctl = self.cluster.programs.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.cluster.data())
            .args(["stop", "-w", "-t", "30", "-m", "immediate"])
            .current_dir(&self.cluster.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.cluster.owner {
            use std::os::unix::process::CommandExt;
            pg_ctl.uid(uid).gid(gid);
        }
        let _ = pg_ctl.status();
    }
}
