//! Installing the peers from their registries, at pinned versions, on the machine the harness
//! runs on: Debian packages with `apt-get install -y`, npm packages into their own folder under
//! `target/bench/peers/` with `npm install --prefix`. A failed install is not an error: the
//! caller skips that peer's figures and says why.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `target/bench/peers/` of this workspace.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/peers")
}

/// The files shipped with the harness for the peers (Node scripts): `bench/peers/`.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The installed version of Debian package `package`, if any.
fn dpkg_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", package])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.strip_prefix("install ok installed ")?;
    Some(version.trim().to_owned())
}

/// Installs Debian package `package` at `version` (`apt-get install -y package=version`) unless
/// that version is installed; returns the installed version, or why it is not there.
pub fn apt(package: &str, version: &str) -> Result<String, String> {
    if dpkg_version(package).as_deref() == Some(version) {
        return Ok(version.to_owned());
    }
    eprintln!("# installing {package}={version} with apt-get");
    let spec = format!("{package}={version}");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--allow-downgrades", &spec])
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Keeps the package's scripts from starting the system service; the bench runs its own.
            .env("RUNLEVEL", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        // Package lists missing or stale on a fresh machine: refresh them once and retry.
        let _ = Command::new("apt-get")
            .args(["update", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !install() {
            return Err(format!("apt-get install -y {spec} failed"));
        }
    }
    dpkg_version(package).ok_or_else(|| format!("{package} not installed after apt-get"))
}

/// Installs npm packages `specs` (`name@version`) into `target/bench/peers/npm-<folder>` unless
/// they are there; returns that folder's `node_modules`, or why not.
pub fn npm(folder: &str, specs: &[&str]) -> Result<PathBuf, String> {
    let prefix = peers_dir().join(format!("npm-{folder}"));
    let modules = prefix.join("node_modules");
    let installed = |spec: &str| {
        let name = spec.rsplit_once('@').map_or(spec, |(n, _)| n);
        modules.join(name).join("package.json").exists()
    };
    if specs.iter().all(|s| installed(s)) {
        return Ok(modules);
    }
    std::fs::create_dir_all(&prefix).map_err(|e| format!("create {}: {e}", prefix.display()))?;
    eprintln!("# installing {} with npm", specs.join(" "));
    let ok = Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--save-exact",
            "--prefix",
        ])
        .arg(&prefix)
        .args(specs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !specs.iter().all(|s| installed(s)) {
        return Err(format!("npm install {} failed", specs.join(" ")));
    }
    Ok(modules)
}

/// Runs `node bench/peers/<script> args...` with `NODE_PATH` = `node_modules`; returns the
/// JSON object it printed last on stdout.
pub async fn node<T: serde::de::DeserializeOwned>(
    script: &str,
    node_modules: &Path,
    args: &[String],
) -> anyhow::Result<T> {
    let mut command = tokio::process::Command::new("node");
    command
        .arg(scripts_dir().join(script))
        .args(args)
        .env("NODE_PATH", node_modules)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let out = command.output().await?;
    anyhow::ensure!(out.status.success(), "{script}: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{script} printed {line:?}: {e}"))
}
