//! The programs the tests run besides klarify-sync: PostgreSQL 15's server programs and `psql`
//! (the clusters of pg.rs, the schema tests) and the `sqlite3` shell (the schema tests ask
//! docs/schema.md's questions with the clients an analyst uses).
//!
//! Each is taken from the system when it is installed. Otherwise the first test that needs it
//! gets it from Debian's packages, so that `cargo test` on a fresh Debian machine needs nothing
//! but a Rust toolchain:
//!
//! - as root, with `apt-get install` (`postgresql-15` also makes the `postgres` user, which the
//!   server runs as: PostgreSQL refuses to run as root);
//! - as anyone else, who may not install packages, with `apt-get download` of the package and
//!   of what it needs that is not installed, unpacked under `target/tmp/test-tools`, with
//!   apt's lists kept there too: nothing outside it changes, and `cargo clean` removes it.
//!
//! Where there is no apt-get the test fails saying what to install.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// A directory of programs, and where their libraries are when they were unpacked.
pub struct Programs {
    dir: PathBuf,
    /// `LD_LIBRARY_PATH` for unpacked programs, whose libraries were unpacked beside them.
    library_path: Option<OsString>,
}

impl Programs {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn command(&self, name: &str) -> Command {
        let mut command = Command::new(self.path(name));
        if let Some(path) = &self.library_path {
            command.env("LD_LIBRARY_PATH", path);
        }
        command
    }

    pub fn async_command(&self, name: &str) -> tokio::process::Command {
        self.command(name).into()
    }
}

/// PostgreSQL 15's `initdb`, `pg_ctl`, `postgres` and `psql`, got as the module says when they
/// are not installed.
pub async fn postgres() -> &'static Programs {
    static POSTGRES: OnceLock<Programs> = OnceLock::new();
    once(&POSTGRES, || {
        installed_postgres()
            .unwrap_or_else(|| provide("postgresql-15", "usr/lib/postgresql/15/bin", "initdb"))
    })
    .await
}

/// PostgreSQL's server programs if installed. Debian keeps them off PATH; other systems
/// (Homebrew, Fedora) put them on it.
pub fn installed_postgres() -> Option<Programs> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/lib/postgresql/15/bin"))
        .chain(std::env::split_paths(&path))
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .map(|dir| Programs {
            dir,
            library_path: None,
        })
}

/// The `sqlite3` shell, got as the module says when it is not installed.
pub async fn sqlite3() -> &'static Programs {
    static SQLITE3: OnceLock<Programs> = OnceLock::new();
    once(&SQLITE3, || {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .find(|dir| dir.join("sqlite3").is_file())
            .map(|dir| Programs {
                dir,
                library_path: None,
            })
            .unwrap_or_else(|| provide("sqlite3", "usr/bin", "sqlite3"))
    })
    .await
}

/// Finds or gets the programs once per process, off the async runtime: getting them takes
/// minutes, and the test's fake API must go on serving meanwhile.
async fn once(cell: &'static OnceLock<Programs>, find: fn() -> Programs) -> &'static Programs {
    if let Some(programs) = cell.get() {
        return programs;
    }
    tokio::task::spawn_blocking(move || cell.get_or_init(find))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Installs or unpacks `package`, whose programs, `program` among them, are in `bin` (relative
/// to `/`).
fn provide(package: &str, bin: &str, program: &str) -> Programs {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-tools");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    // One process at a time, and the ones that waited find the work done.
    let _lock = super::pg::lock(&dir);
    let log = dir.join(format!("{package}.log"));
    if unsafe { libc::geteuid() } == 0 {
        let programs = Programs {
            dir: Path::new("/").join(bin),
            library_path: None,
        };
        if !programs.path(program).is_file() {
            announce(package, "installing it with apt-get install", &log);
            let apt = Apt::new(&log, Vec::new());
            apt.run(["update"]);
            apt.run(["install", "-y", "--no-install-recommends", package]);
        }
        return programs;
    }
    let root = dir.join(package);
    if !root.join(".complete").exists() {
        announce(
            package,
            "unpacking it and what it needs under target/tmp",
            &log,
        );
        unpack(package, &dir, &root, &log);
    }
    Programs {
        dir: root.join(bin),
        library_path: Some(library_path(&root)),
    }
}

/// Says on the terminal (not in a test's captured output) why the first run takes a while.
fn announce(package: &str, how: &str, log: &Path) {
    let line = format!(
        "klarify-sync tests: {package} is not installed; {how} (once, log: {})\n",
        log.display()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Downloads `package` and the packages it needs that are not installed, as an ordinary user
/// may (apt's lists and cache in `dir/apt`), and unpacks them all into `root`.
fn unpack(package: &str, dir: &Path, root: &Path, log: &Path) {
    let state = dir.join("apt");
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(state.join(sub))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", state.display()));
    }
    let options = [
        format!("Dir::State::Lists={}", state.join("lists").display()),
        format!("Dir::Cache={}", state.join("cache").display()),
        // apt's locks are root's; these lists and this cache are ours alone.
        "Debug::NoLocking=true".to_owned(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect();
    let apt = Apt::new(log, options);
    apt.run(["update"]);
    // What `apt-get install` would install here is what the programs need besides the system.
    let plan = apt.output(["-s", "install", "--no-install-recommends", package]);
    let needed: Vec<&str> = plan
        .lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let debs = dir.join(format!("{package}.debs"));
    let _ = fs::remove_dir_all(&debs);
    let _ = fs::remove_dir_all(root);
    fs::create_dir_all(&debs).unwrap_or_else(|e| panic!("cannot create {}: {e}", debs.display()));
    let mut download = apt.command();
    download.arg("download").args(&needed).current_dir(&debs);
    apt.check(download);
    for deb in fs::read_dir(&debs).expect("the downloaded packages") {
        let mut extract = Command::new("dpkg-deb");
        extract
            .arg("-x")
            .arg(deb.expect("a package").path())
            .arg(root);
        apt.check(extract);
    }
    let _ = fs::remove_dir_all(&debs);
    File::create(root.join(".complete")).expect("a mark of the unpacked packages");
}

/// The unpacked library directories, e.g. `usr/lib/x86_64-linux-gnu`.
fn library_path(root: &Path) -> OsString {
    let dirs = ["usr/lib", "lib"]
        .iter()
        .filter_map(|d| fs::read_dir(root.join(d)).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("-linux-"))
        .map(|e| e.path());
    std::env::join_paths(dirs).expect("library directories without ':'")
}

/// apt-get with `options`, its output appended to `log`.
struct Apt<'a> {
    log: &'a Path,
    options: Vec<String>,
}

impl<'a> Apt<'a> {
    fn new(log: &'a Path, options: Vec<String>) -> Self {
        Self { log, options }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("apt-get");
        command
            .arg("-q")
            .args(&self.options)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        command
    }

    fn run<const N: usize>(&self, args: [&str; N]) {
        let mut command = self.command();
        command.args(args);
        self.check(command);
    }

    fn output<const N: usize>(&self, args: [&str; N]) -> String {
        let mut command = self.command();
        command.args(args).stderr(self.append());
        let out = command
            .output()
            .unwrap_or_else(|e| self.give_up(&command, e));
        if !out.status.success() {
            self.give_up(&command, out.status);
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn check(&self, mut command: Command) {
        command.stdout(self.append()).stderr(self.append());
        match command.status() {
            Ok(status) if status.success() => {}
            Ok(status) => self.give_up(&command, status),
            Err(e) => self.give_up(&command, e),
        }
    }

    fn append(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()))
    }

    fn give_up(&self, command: &Command, why: impl std::fmt::Display) -> ! {
        let log = fs::read_to_string(self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "the tests need PostgreSQL 15 and the sqlite3 shell, and getting them failed \
             ({command:?}: {why}); install them (Debian: apt-get install postgresql-15 sqlite3) \
             or set TEST_DATABASE_URL for PostgreSQL. Last lines of {}:\n{}",
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}
