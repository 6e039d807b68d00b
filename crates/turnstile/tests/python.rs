//! The Python package's test suite (`python/tests`, pytest), run by `cargo test` so that the
//! README's one test command covers it too.
//!
//! It makes a virtual environment under cargo's target/tmp (reused while it is complete: a
//! marker file names what was installed), installs maturin, pytest and distributed (Dask) from
//! PyPI, builds and installs the package with `pip install ./python` (an abi3 wheel, built by
//! maturin in the dev profile in a target directory of its own: the outer `cargo test` holds
//! the lock of the workspace's), and runs pytest against this workspace's `turnstile` binary.
//! It fails unless pytest passes with at least one test; a missing tool (python3, venv, pip,
//! network to PyPI) fails it loudly, never skips it.
//!
//! pytest's output is copied to this process's stderr as it comes (written to the file
//! descriptor, which the test harness does not capture), so its summary line always shows.
//!
//! Knobs: `TURNSTILE_PYTHON` (the interpreter to make the venv with, default `python3`);
//! `TURNSTILE_PYTEST_ARGS` (extra pytest arguments, split on spaces, e.g. `-k pool`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the venv gets from PyPI. Changing this list rebuilds the venv.
const REQUIREMENTS: &[&str] = &["maturin>=1.7,<2", "pytest>=7", "distributed>=2023.1"];

/// Upper bound for one step (a cold install or build on a loaded machine takes minutes).
const STEP_LIMIT: Duration = Duration::from_secs(20 * 60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("invariant: the crate lives two levels under the repository root")
}

/// Runs `cmd` to completion, copying its stdout and stderr to our stderr line by line;
/// returns its success and its stdout. Panics naming `what` if it cannot start or runs past
/// [`STEP_LIMIT`].
fn run(what: &str, cmd: &mut Command) -> (bool, String) {
    eprintln!("python tests: {what}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python tests: cannot start {what} ({cmd:?}): {e}"));
    fn copy(from: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut all = String::new();
            let mut err = std::io::stderr();
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(err, "{line}");
                all.push_str(&line);
                all.push('\n');
            }
            all
        })
    }
    let out = copy(child.stdout.take().expect("invariant: stdout is piped"));
    let err = copy(child.stderr.take().expect("invariant: stderr is piped"));
    let deadline = Instant::now() + STEP_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("python tests: {what} ran for more than {STEP_LIMIT:?}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("python tests: waiting for {what}: {e}"),
        }
    };
    let _ = err.join();
    (status.success(), out.join().unwrap_or_default())
}

fn must(what: &str, cmd: &mut Command) -> String {
    let (ok, out) = run(what, cmd);
    assert!(ok, "python tests: {what} failed (its output is above)");
    out
}

/// The venv, made and filled if it is missing or incomplete.
fn venv(dir: &Path) -> PathBuf {
    let python = dir.join("bin/python");
    let marker = dir.join(".turnstile-complete");
    let want = REQUIREMENTS.join("\n");
    if python.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        eprintln!(
            "python tests: reusing the virtual environment {}",
            dir.display()
        );
        return python;
    }
    let _ = std::fs::remove_dir_all(dir);
    let base = std::env::var("TURNSTILE_PYTHON").unwrap_or_else(|_| "python3".into());
    must(
        &format!("creating a virtual environment with {base}"),
        Command::new(&base).args(["-m", "venv"]).arg(dir),
    );
    must(
        "installing the test tools from PyPI",
        Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .args(REQUIREMENTS),
    );
    std::fs::write(&marker, want).expect("write the venv's marker file");
    python
}

#[test]
fn python_package_tests() {
    let repo = repo();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let python = venv(&tmp.join("python-venv"));
    let bin_dir = python
        .parent()
        .expect("invariant: bin/python has a parent")
        .to_owned();
    // maturin's build backend runs `maturin` from PATH: the venv's.
    let path = match std::env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![bin_dir.clone()];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs).expect("PATH entries without ':'")
        }
        None => bin_dir.clone().into_os_string(),
    };
    must(
        "building and installing the package (pip install ./python)",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-build-isolation",
                "--no-deps",
                "--force-reinstall",
                "-q",
            ])
            .arg(repo.join("python"))
            .current_dir(&repo)
            .env("PATH", &path)
            .env_remove("VIRTUAL_ENV")
            .env("CARGO_TARGET_DIR", tmp.join("python-build"))
            .env("MATURIN_PEP517_ARGS", "--profile dev --locked"),
    );
    let extra = std::env::var("TURNSTILE_PYTEST_ARGS").unwrap_or_default();
    let (ok, out) = run(
        "pytest python/tests",
        Command::new(bin_dir.join("pytest"))
            .args(["-q", "-rfEs", "-p", "no:cacheprovider"])
            .args(extra.split_whitespace())
            .arg(repo.join("python/tests"))
            // Not the repository's python/ directory: `import turnstile` must find the
            // installed package, not its sources without the native module.
            .current_dir(&tmp)
            .env("PATH", &path)
            .env("TURNSTILE_BIN", env!("CARGO_BIN_EXE_turnstile"))
            .env("TURNSTILE_REQUIRE_DASK", "1")
            .env_remove("TURNSTILE_URL")
            .env_remove("TURNSTILE_SESSION"),
    );
    let summary = out
        .lines()
        .rev()
        .find(|l| l.contains(" in ") && (l.contains("passed") || l.contains("failed")))
        .unwrap_or("");
    let passed: u64 = summary
        .split(|c: char| !c.is_ascii_alphanumeric())
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == "passed")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0);
    assert!(ok, "pytest failed: {summary}");
    assert!(passed > 0, "pytest ran no test: {summary:?}");
}
