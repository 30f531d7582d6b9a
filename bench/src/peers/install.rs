//! Installing the peers from their registries, at pinned versions, on the machine the harness
//! runs on: Debian packages with `apt-get install -y`, npm packages into their own folder under
//! `target/bench/peers/` with `npm install --prefix`, PyPI packages into a virtual environment
//! of their own there (`python3 -m venv`, then its pip). A failed install is not an error: the
//! caller skips that peer's figures and says why.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `target/bench/peers/` of this workspace.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/peers")
}

/// The files shipped with the harness for the peers (Node and Python scripts): `bench/peers/`.
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

/// Installs PyPI packages `specs` (`name==version`) into a virtual environment
/// `target/bench/peers/pip-<folder>` (made with `python3 -m venv`) with its own pip, unless
/// they are there; returns the environment's `python`, or why not.
pub fn pip(folder: &str, specs: &[&str]) -> Result<PathBuf, String> {
    let venv = peers_dir().join(format!("pip-{folder}"));
    let python = venv.join("bin/python");
    // `pip freeze` prints `name==version` lines; names compared case-insensitively.
    let installed = || {
        let Ok(out) = Command::new(&python)
            .args(["-m", "pip", "freeze", "--disable-pip-version-check"])
            .stderr(Stdio::null())
            .output()
        else {
            return false;
        };
        let frozen = String::from_utf8_lossy(&out.stdout).to_lowercase();
        specs
            .iter()
            .all(|s| frozen.lines().any(|l| l.trim() == s.to_lowercase()))
    };
    if python.exists() && installed() {
        return Ok(python);
    }
    std::fs::create_dir_all(peers_dir()).map_err(|e| format!("create peers dir: {e}"))?;
    if !python.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            return Err(format!("python3 -m venv {} failed", venv.display()));
        }
    }
    eprintln!("# installing {} with pip", specs.join(" "));
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(specs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !installed() {
        return Err(format!("pip install {} failed", specs.join(" ")));
    }
    Ok(python)
}

/// `python bench/peers/<script> args...` with the interpreter `python` (a venv's, from
/// [`pip`]): stdout piped for its results, stderr inherited, killed if dropped. For a script
/// the caller drives (its stdin, its lifetime); [`python`] runs one to completion.
pub fn python_command(python: &Path, script: &str, args: &[String]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(python);
    command
        .arg(scripts_dir().join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
}

/// Runs `python bench/peers/<script> args...` to completion; returns the JSON object it printed
/// last on stdout.
pub async fn python<T: serde::de::DeserializeOwned>(
    python: &Path,
    script: &str,
    args: &[String],
) -> anyhow::Result<T> {
    let out = python_command(python, script, args).output().await?;
    last_json(script, &out)
}

/// The JSON object `script` printed last on stdout, once it exited successfully.
pub fn last_json<T: serde::de::DeserializeOwned>(
    script: &str,
    out: &std::process::Output,
) -> anyhow::Result<T> {
    anyhow::ensure!(out.status.success(), "{script}: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{script} printed {line:?}: {e}"))
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
    last_json(script, &out)
}
