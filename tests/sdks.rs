//! The Python and TypeScript SDKs (`sdks/`) run their own test suites against this build
//! of Durin. Each suite starts a real `durin serve`, serves its handlers from real
//! processes in its language, and drives every primitive of the plain contract through
//! them (steps, egress calls, timers, signals, `first`, awakeables, state, children,
//! heartbeats, updates, cancellation, continue-as-new, the signature), including a kill -9
//! of a handler between two calls and a replay of the Python order example's completed
//! runs (`POST /v1/replays`, nothing run again): the conformance test of
//! `openapi/plain-http.md` from handlers that are not Rust.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{require, require_all};

fn sdk_dir(language: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sdks")
        .join(language)
}

/// Runs `command` to its end, failing the test with its output when it fails. The suite
/// gets `DURIN_REQUIRE_ALL` as this test has it (`1` or `0`): with `1`, a test the suite
/// would skip for a missing dependency (Python's `cryptography`) fails instead.
fn run(mut command: Command, what: &str) {
    let output = command
        .env("DURIN_BIN", env!("CARGO_BIN_EXE_durin"))
        .env("DURIN_REQUIRE_ALL", if require_all() { "1" } else { "0" })
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // The runner's summary, for whoever reads the test's output.
    for line in stdout.lines().chain(stderr.lines()).rev().take(12) {
        println!("{what}: {line}");
    }
}

#[test]
fn the_typescript_sdk_passes_its_tests() {
    if !(require("node") && require("npm")) {
        return;
    }
    let dir = sdk_dir("typescript");
    let mut install = Command::new("npm");
    install
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir);
    run(install, "npm ci");
    let mut test = Command::new("npm");
    test.args(["test", "--silent"]).current_dir(&dir);
    run(test, "npm test");
}

#[test]
fn the_python_sdk_passes_its_tests() {
    if !require("python3") {
        return;
    }
    let mut test = Command::new("python3");
    test.args(["-m", "unittest", "discover", "-s", "sdks/python/tests"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    run(test, "python3 -m unittest");
}
