//! An embedded PostgreSQL for `dispatch dev` and the tests: a private cluster
//! started from the installed server binaries when `DATABASE_URL` is unset.
//!
//! PostgreSQL refuses to run as root, so when we are root (CI is) `initdb` and
//! `postgres` run as the unprivileged `postgres` system user via `setpriv`, on
//! a data folder that user owns. The server listens on a free loopback port and
//! a private socket folder, so parallel runs never collide, and it dies with
//! the process that started it (parent-death signal from a thread that lives
//! as long as the process).

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting the embedded server.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No server binaries found.
    #[error("PostgreSQL server binaries not found (looked in PG_BIN, /usr/lib/postgresql/*/bin and PATH); install postgresql or set DATABASE_URL")]
    NoBinaries,
    /// A command failed.
    #[error("{0}")]
    Failed(String),
    /// I/O.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A running embedded server.
#[derive(Debug)]
pub struct EmbeddedPg {
    /// Connection URL of the `postgres` database.
    pub url: String,
    /// Port.
    pub port: u16,
    /// Server pid.
    pub pid: u32,
}

/// Find the folder holding `initdb` and `postgres`.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some(dir) = versions.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").exists() && p.join("postgres").exists())
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

const PG_USER: &str = "postgres";

/// Run a server binary, as the `postgres` user when we are root.
fn server_cmd(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            PG_USER,
            "--regid",
            PG_USER,
            "--clear-groups",
            "--pdeathsig",
            "TERM",
            "--",
        ])
        .arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn chown_to_pg(path: &Path) -> Result<(), PgError> {
    if is_root() {
        let ok = Command::new("chown")
            .arg("-R")
            .arg(format!("{PG_USER}:{PG_USER}"))
            .arg(path)
            .status()?
            .success();
        if !ok {
            return Err(PgError::Failed(format!(
                "chown of {} to {PG_USER} failed",
                path.display()
            )));
        }
    }
    Ok(())
}

/// How the embedded server treats the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// PostgreSQL's own defaults (`fsync`, `synchronous_commit`,
    /// `full_page_writes` on): an acknowledged commit survives an OS crash or
    /// power cut. What `dispatch dev` runs.
    #[default]
    Durable,
    /// `fsync=off`, `synchronous_commit=off`, `full_page_writes=off`: fast, and
    /// a power cut can lose commits or corrupt the cluster. For throwaway
    /// clusters only: the tests, and `dispatch bench --fast-pg`.
    Fast,
}

impl Durability {
    /// The server settings this choice adds to the command line.
    fn settings(self) -> &'static [&'static str] {
        // Durable is PostgreSQL's defaults throughout, `max_connections`
        // (100) included: measured with `dispatch bench`, a server allowed
        // 400 connections ran the same workload a third slower with the
        // same connections open. Throwaway clusters serve whole test suites
        // (a database and a pool per test) and need the room.
        match self {
            Durability::Durable => &[],
            Durability::Fast => &[
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=400",
            ],
        }
    }
}

/// The file in a data folder saying how its cluster last ran.
const DURABILITY_MARK: &str = "durability";

fn durability_mark(data_dir: &Path) -> Option<Durability> {
    match std::fs::read_to_string(data_dir.join(DURABILITY_MARK))
        .ok()?
        .trim()
    {
        "durable" => Some(Durability::Durable),
        "fast" => Some(Durability::Fast),
        _ => None,
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Start (initializing if needed) a cluster in `data_dir`, durable (see
/// [`Durability`]). The server stops when this process exits.
pub fn start(data_dir: &Path) -> Result<EmbeddedPg, PgError> {
    start_on(data_dir, None, Durability::Durable)
}

/// [`start`] with the fast, non-durable settings: for throwaway clusters.
pub fn start_fast(data_dir: &Path) -> Result<EmbeddedPg, PgError> {
    start_on(data_dir, None, Durability::Fast)
}

impl EmbeddedPg {
    /// Stop the server (fast shutdown: sessions are cut, nothing committed is
    /// lost) and wait until it is gone.
    pub fn stop(&self) -> Result<(), PgError> {
        // SAFETY: signalling the server we started.
        unsafe { libc::kill(self.pid as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(self.pid as i32, 0) } == 0 {
            if Instant::now() > deadline {
                return Err(PgError::Failed("postgres did not stop".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// How long a server still shutting down in the data folder is waited for.
const PREVIOUS_SERVER_GRACE: Duration = Duration::from_secs(15);

/// Wait while `postmaster.pid` names a live `postgres` process; after
/// [`PREVIOUS_SERVER_GRACE`] the folder is in use, and that is the error.
fn wait_for_previous_server(pgdata: &Path) -> Result<(), PgError> {
    let live = || -> Option<u32> {
        let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "postgres").then_some(pid)
    };
    let deadline = Instant::now() + PREVIOUS_SERVER_GRACE;
    while let Some(pid) = live() {
        if Instant::now() > deadline {
            return Err(PgError::Failed(format!(
                "the data folder {} is in use by postgres (pid {pid}): is another `dispatch` running on it?",
                pgdata.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// [`start`] on a given port (to restart a cluster where its clients expect it).
pub fn start_on(
    data_dir: &Path,
    fixed_port: Option<u16>,
    durability: Durability,
) -> Result<EmbeddedPg, PgError> {
    let bin = find_bin_dir().ok_or(PgError::NoBinaries)?;
    std::fs::create_dir_all(data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let pgdata = data_dir.join("data");
    let sockets = data_dir.join("run");
    std::fs::create_dir_all(&sockets)?;
    if !pgdata.join("PG_VERSION").exists() {
        std::fs::create_dir_all(&pgdata)?;
        chown_to_pg(&data_dir)?;
        let out = server_cmd(&bin.join("initdb"))
            .args(["-D"])
            .arg(&pgdata)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ])
            // A durable cluster is synced once created; a throwaway one need not be.
            .args((durability == Durability::Fast).then_some("--no-sync"))
            .stdout(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(PgError::Failed(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
    } else {
        chown_to_pg(&data_dir)?;
        // A server left by a killed run would hold the lock file: stale pid
        // files are cleared by postgres itself. One still shutting down (the
        // previous run of `dispatch` just exited, and its server stops on the
        // parent-death signal) is waited for.
        wait_for_previous_server(&pgdata)?;
        if durability == Durability::Durable
            && durability_mark(&data_dir) != Some(Durability::Durable)
        {
            // The cluster ran with fsync off (or predates this mark): what it
            // wrote may sit only in the OS cache. PostgreSQL's advice when
            // turning fsync back on: sync the data folder first.
            let out = server_cmd(&bin.join("initdb"))
                .args(["--sync-only", "-D"])
                .arg(&pgdata)
                .stdout(Stdio::null())
                .output()?;
            if !out.status.success() {
                return Err(PgError::Failed(format!(
                    "initdb --sync-only failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
    }
    std::fs::write(
        data_dir.join(DURABILITY_MARK),
        if durability == Durability::Durable {
            "durable"
        } else {
            "fast"
        },
    )?;
    let mut last_err = String::new();
    for _ in 0..5 {
        let port = match fixed_port {
            Some(p) => p,
            None => free_port()?,
        };
        let log = std::fs::File::create(data_dir.join("postgres.log"))?;
        chown_to_pg(&data_dir.join("postgres.log"))?;
        let bin_postgres = bin.join("postgres");
        let mut cmd = server_cmd(&bin_postgres);
        cmd.arg("-D")
            .arg(&pgdata)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
            ])
            .arg(format!("unix_socket_directories={}", sockets.display()))
            .args(durability.settings())
            .args(["-c", "shared_buffers=128MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Spawn from a thread that lives as long as the process: the
        // parent-death signal fires when the spawning *thread* exits.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("embedded-pg".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = tx.send(Ok(child.id()));
                    let _ = child.wait();
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })?;
        let pid = rx
            .recv()
            .map_err(|_| PgError::Failed("postgres spawn thread died".into()))??;
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        match wait_ready(&bin, port, pid, Duration::from_secs(30)) {
            Ok(()) => return Ok(EmbeddedPg { url, port, pid }),
            Err(e) => {
                last_err = format!(
                    "{e}; log: {}",
                    std::fs::read_to_string(data_dir.join("postgres.log")).unwrap_or_default()
                );
                // SAFETY: sending a signal to a pid we started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
    }
    Err(PgError::Failed(format!(
        "postgres did not start: {last_err}"
    )))
}

fn wait_ready(bin: &Path, port: u16, pid: u32, timeout: Duration) -> Result<(), PgError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid as i32, 0) } != 0 {
            return Err(PgError::Failed("postgres exited during start-up".into()));
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
            ])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(PgError::Failed("timed out waiting for postgres".into()))
}
