//! Child processes the scenarios start (the relay, consumer and gateway binaries, nginx): where
//! the workspace's binaries are, free loopback ports, and memory read from `/proc`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The target directory of the running executable's profile: `target/release` for
/// `cargo run --release -p bench`, `target/debug` for the smoke tests (which run from `deps/`).
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("executable without a directory"))?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// A binary of this workspace next to the bench executable (`example` for a package's example),
/// built with the same profile (always asked for in a release run, so never stale).
pub fn workspace_binary(package: &str, name: &str, example: bool) -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?;
    let path = if example {
        dir.join("examples").join(name)
    } else {
        dir.join(name)
    };
    // A release run always asks cargo (a no-op when fresh): a binary left from before the last
    // change would be measured instead of the code checked out. The test suite's debug runs
    // build only what is missing, as `cargo test --workspace` built the rest with its own
    // feature set (a `cargo build -p` of one package can resolve features differently and
    // rebuild for minutes).
    if !path.exists() || dir.ends_with("release") {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", package]);
        if example {
            build.args(["--example", name]);
        } else {
            build.args(["--bin", name]);
        }
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status()?;
        anyhow::ensure!(status.success(), "cargo build -p {package} {name} failed");
        anyhow::ensure!(path.exists(), "{} missing after the build", path.display());
    }
    Ok(path)
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    /// Starts `command`.
    pub fn spawn(name: &str, mut command: Command) -> anyhow::Result<Self> {
        let child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("start {name}: {e}"))?;
        Ok(Process {
            child,
            name: name.to_owned(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if it has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }

    /// Peak resident memory (VmHWM) in MiB.
    pub fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        status_kib(self.pid(), "VmHWM:").map(|k| k / 1024.0)
    }

    /// Current resident memory (VmRSS) in MiB.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        status_kib(self.pid(), "VmRSS:").map(|k| k / 1024.0)
    }

    /// Sends `signal` (e.g. `TERM`, `QUIT`) and waits up to 10 s for the exit, then kills it.
    pub async fn stop_with(mut self, signal: &str) -> anyhow::Result<()> {
        self.signal(signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        anyhow::bail!("{} did not stop within 10 s of SIG{signal}", self.name)
    }

    /// SIGTERM, then waits (see [`Process::stop_with`]).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop_with("TERM").await
    }

    fn signal(&self, signal: &str) {
        // Through kill(1): the crate forbids unsafe code, so no direct libc call.
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // TERM first so nginx's master takes its workers down with it.
            self.signal("TERM");
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("bad {field} line"))?
        .parse()?)
}

/// The `outbox-relay` binary relaying `database_url`'s outbox, as it is deployed: its own
/// process beside the producers, with its default settings.
pub fn spawn_relay(database_url: &str) -> anyhow::Result<Process> {
    let mut command = Command::new(workspace_binary("outbox-relay", "outbox-relay", false)?);
    command
        .arg("run")
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", integration_tests::amqp_url())
        .env("RELAY_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    Process::spawn("relay", command)
}

/// A loopback port free at the moment of the call (the kernel picks it).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts connections on `127.0.0.1:port`.
pub async fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing listening on 127.0.0.1:{port} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh temporary directory.
pub fn temp_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(integration_tests::unique_name(prefix));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A child serving on a loopback port, with a temporary folder of its own (its config, its
/// files) that is removed when it stops.
pub struct Server {
    /// The child.
    pub process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
    dir: PathBuf,
    stop_signal: &'static str,
}

impl Server {
    /// Spawns `command` as `name` and waits up to `wait` for `port` to accept connections;
    /// [`Server::stop`] sends `stop_signal` and removes `dir`.
    pub async fn start(
        name: &str,
        command: Command,
        port: u16,
        dir: PathBuf,
        wait: Duration,
        stop_signal: &'static str,
    ) -> anyhow::Result<Server> {
        let mut process = Process::spawn(name, command)?;
        if let Err(e) = wait_port(port, wait).await {
            process.ensure_running()?;
            return Err(e);
        }
        Ok(Server {
            process,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            stop_signal,
        })
    }

    /// Stops it (see [`Process::stop_with`]) and removes its folder.
    pub async fn stop(self) -> anyhow::Result<()> {
        let result = self.process.stop_with(self.stop_signal).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        result
    }
}
