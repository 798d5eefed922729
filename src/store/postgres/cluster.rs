//! A throwaway PostgreSQL server for the tests and the benchmark, started from the
//! installed server binaries (Debian's `postgresql` package): `initdb` in a temporary
//! directory, its own port and socket directory, `fsync=off`, run as the `postgres` user
//! when this process is root (the server refuses to run as root). Nothing is downloaded.
//!
//! The server is stopped, and its directory removed, by a small reaper process that waits
//! for this process's end of a pipe to close: that happens however this process ends
//! (a finished test binary, a panic, `kill -9`), so no server outlives its tests.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The superuser's password of every throwaway cluster (it listens on loopback only, and
/// password authentication is on so that a wrong one can be tested).
pub const SUPERUSER_PASSWORD: &str = "scratch-superuser-password";

/// Why a throwaway cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No `initdb` was found (install Debian's `postgresql` package).
    #[error(
        "no PostgreSQL server binaries: initdb is not in /usr/lib/postgresql/*/bin nor in \
         $INVOICE_WORKER_PG_BIN (install Debian's postgresql package)"
    )]
    NoBinaries,
    /// A server program failed.
    #[error("{program} failed: {detail}")]
    Command {
        /// The program and its purpose.
        program: String,
        /// Its exit status and output.
        detail: String,
    },
    /// A file could not be written.
    #[error("throwaway cluster: {0}")]
    Io(#[from] std::io::Error),
}

/// A running throwaway server.
pub struct ScratchCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    as_postgres: bool,
    reaper: Option<(Child, ChildStdin)>,
    databases: AtomicU64,
}

impl std::fmt::Debug for ScratchCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchCluster")
            .field("data", &self.data)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `$INVOICE_WORKER_PG_BIN`, or
/// the newest `/usr/lib/postgresql/N/bin`.
pub fn server_binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("INVOICE_WORKER_PG_BIN") {
        let dir = PathBuf::from(dir);
        return dir.join("initdb").is_file().then_some(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// The process-wide throwaway cluster, started on first use; `None` (after one loud line
/// on stderr) when no server binaries are installed, except under `CI=true`, where a
/// missing server is a failure (CI installs it, so a skip would hide a broken setup).
pub fn shared() -> Option<&'static ScratchCluster> {
    static SHARED: OnceLock<Option<ScratchCluster>> = OnceLock::new();
    SHARED
        .get_or_init(|| match ScratchCluster::start() {
            Ok(cluster) => Some(cluster),
            Err(ClusterError::NoBinaries) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!(
                    "!!! SKIPPING the PostgreSQL tests: {} !!!",
                    ClusterError::NoBinaries
                );
                None
            }
            Err(e) => panic!("cannot start the throwaway PostgreSQL cluster: {e}"),
        })
        .as_ref()
}

fn running_as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

impl ScratchCluster {
    /// Initialises and starts a new cluster (blocking: a second or two).
    pub fn start() -> Result<ScratchCluster, ClusterError> {
        let bin = server_binaries().ok_or(ClusterError::NoBinaries)?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("invoice-worker-pg-")
            .tempdir()?
            .keep();
        let data = dir.join("data");
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        if as_postgres {
            chown_to_postgres(&dir)?;
            chown_to_postgres(&pwfile)?;
        }
        // The reaper first, so that whatever fails below still leaves nothing behind.
        let reaper = spawn_reaper(&bin, &dir, &data, as_postgres)?;
        let mut cluster = ScratchCluster {
            bin,
            data,
            port: 0,
            as_postgres,
            reaper: Some(reaper),
            databases: AtomicU64::new(0),
        };
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                cluster.data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--pwfile".as_ref(),
                pwfile.as_os_str(),
                "--auth-local=trust".as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        // A port found free may be taken by the time the server binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClusterError::NoBinaries))
    }

    /// The URL of database `name` as the superuser, with its password.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{name}",
            self.port
        )
    }

    /// The port the server listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a new empty database and returns its URL (each test gets its own).
    pub async fn create_database(&self) -> Result<String, sqlx::Error> {
        use sqlx::Connection as _;
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("scratch_{}_{n}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(self.url(&name))
    }

    /// A migrated store on a new database of this cluster.
    pub async fn scratch_store(&self) -> Result<super::PgStore, crate::store::StoreError> {
        let url = self.create_database().await?;
        super::PgStore::connect_and_migrate(&super::PgConnect::new(url)).await
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the server is back when this
    /// returns (the fault tests' restarted database).
    pub fn restart(&self) -> Result<(), ClusterError> {
        // The log file again: without one the new server would inherit this call's output
        // pipes, and waiting for their end would wait for the server's.
        let log = self.log_file();
        let log = log.to_string_lossy();
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60", "-l", &log])
    }

    fn log_file(&self) -> PathBuf {
        self.data.with_file_name("server.log")
    }

    /// `pg_ctl stop -m fast`: the server is down until [`ScratchCluster::start_again`].
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
    }

    /// Turns TLS on with this certificate chain and key (PEM) and restarts the server:
    /// for the tests of `sslmode`. Clients may then connect with or without TLS.
    pub fn enable_tls(&self, cert_chain_pem: &str, key_pem: &str) -> Result<(), ClusterError> {
        use std::io::Write as _;
        use std::os::unix::fs::PermissionsExt as _;
        let cert = self.data.join("server.crt");
        let key = self.data.join("server.key");
        std::fs::write(&cert, cert_chain_pem)?;
        std::fs::write(&key, key_pem)?;
        // The server refuses a key file others can read.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        if self.as_postgres {
            chown_to_postgres(&cert)?;
            chown_to_postgres(&key)?;
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))?;
        writeln!(
            conf,
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
        )?;
        self.restart()
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let socket_dir = self.data.parent().unwrap_or(Path::new("/tmp"));
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={sock} \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c max_connections=300 -c shared_buffers=64MB",
            port = self.port,
            sock = socket_dir.display()
        );
        let log = self.log_file();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )
        .map_err(|e| match e {
            ClusterError::Command { program, detail } => ClusterError::Command {
                program,
                detail: format!(
                    "{detail}\nserver log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            },
            other => other,
        })
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), ClusterError> {
        let mut all: Vec<&std::ffi::OsStr> = vec!["-D".as_ref(), self.data.as_os_str()];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        self.run("pg_ctl", &all)
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<(), ClusterError> {
        let output = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if output.status.success() {
            return Ok(());
        }
        Err(ClusterError::Command {
            program: program.to_string(),
            detail: format!(
                "{}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }

    fn command(&self, program: &str) -> Command {
        server_command(&self.bin.join(program), self.as_postgres)
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        // Closing the pipe tells the reaper to stop the server and remove the directory;
        // waiting for it makes the cluster gone when the drop returns.
        if let Some((mut child, stdin)) = self.reaper.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// `program` run directly, or as the `postgres` user through `runuser` when root.
fn server_command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn spawn_reaper(
    bin: &Path,
    dir: &Path,
    data: &Path,
    as_postgres: bool,
) -> Result<(Child, ChildStdin), ClusterError> {
    let stop = if as_postgres {
        "runuser -u postgres -- \"$1/pg_ctl\""
    } else {
        "\"$1/pg_ctl\""
    };
    // Its own process group, and deaf to the signals a terminal or `timeout` sends to a
    // whole group: a test run stopped that way must still have its server stopped.
    let script = format!(
        "trap '' INT TERM HUP; cat >/dev/null; [ -f \"$2/postmaster.pid\" ] && {stop} -D \"$2\" stop -m immediate -w >/dev/null 2>&1; rm -rf \"$3\""
    );
    let mut child = Command::new("sh")
        .process_group(0)
        .arg("-c")
        .arg(script)
        .arg("reaper")
        .arg(bin)
        .arg(data)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("the reaper has no stdin"))?;
    // Nothing to say; writing nothing just proves the pipe is open.
    stdin.write_all(b"")?;
    Ok((child, stdin))
}

fn chown_to_postgres(path: &Path) -> Result<(), ClusterError> {
    let user = nix::unistd::User::from_name("postgres")
        .map_err(std::io::Error::from)?
        .ok_or_else(|| std::io::Error::other("running as root, but there is no postgres user"))?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(std::io::Error::from)?;
    Ok(())
}

fn free_port() -> Result<u16, ClusterError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
