//! `etag-gateway --check`: validates the configuration and exits, without binding a socket.
//!
//! Run against the real binary, as CI or an operator would: the shipped example passes, and a
//! bad file fails with a message that names the file and the key.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_etag-gateway");

fn example_config() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/conf/gateway.toml").to_owned()
}

/// A config file in the temp dir, removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(name: &str, text: &str) -> TempConfig {
        let path = std::env::temp_dir().join(format!(
            "etag-gateway-check-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("write temp config");
        TempConfig(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn gateway(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run etag-gateway")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts a failed check whose stderr contains every one of `expected`.
fn assert_rejected(output: &Output, expected: &[&str]) {
    let err = stderr(output);
    assert!(
        !output.status.success(),
        "expected a failure, got {:?}; stderr: {err}",
        output.status
    );
    for part in expected {
        assert!(err.contains(part), "stderr lacks {part:?}: {err}");
    }
}

#[test]
fn the_example_config_passes() {
    let config = example_config();
    let output = gateway(&["--config", &config, "--check"]);
    assert!(
        output.status.success(),
        "{:?}; stderr: {}",
        output.status,
        stderr(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ok"), "stdout: {stdout}");
}

#[test]
fn a_disallowed_value_names_the_file_and_the_key() {
    let file = TempConfig::new(
        "conflict-410",
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[policy]\nconflict_status = 410\n",
    );
    let output = gateway(&["--config", file.path(), "--check"]);
    assert_rejected(
        &output,
        &[file.path(), "policy.conflict_status", "410", "409, 412"],
    );
}

#[test]
fn an_unknown_key_names_the_file_and_the_key() {
    let file = TempConfig::new(
        "unknown-key",
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[polcy]\nconflict_status = 409\n",
    );
    let output = gateway(&["--config", file.path(), "--check"]);
    assert_rejected(&output, &[file.path(), "polcy", "line 4", "`policy`"]);
}

#[test]
fn a_value_of_the_wrong_type_names_the_key() {
    let file = TempConfig::new(
        "wrong-type",
        "[server]\nthreads = \"two\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n",
    );
    let output = gateway(&["--config", file.path(), "--check"]);
    assert_rejected(&output, &[file.path(), "server.threads", "an integer"]);
}

#[test]
fn an_upstream_is_required() {
    let file = TempConfig::new("no-upstream", "[server]\nthreads = 1\n");
    let output = gateway(&["--config", file.path(), "--check"]);
    assert_rejected(&output, &["no upstream", "--upstream"]);

    let output = gateway(&[
        "--config",
        file.path(),
        "--upstream",
        "http://x:1",
        "--check",
    ]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
}

#[test]
fn a_bad_flag_is_named() {
    let config = example_config();
    let output = gateway(&["--config", &config, "--upstream", "ftp://x", "--check"]);
    assert_rejected(&output, &["--upstream", "ftp://x", "only http://"]);
}

#[test]
fn a_missing_file_is_named() {
    let missing = std::env::temp_dir().join("etag-gateway-check-no-such-file.toml");
    let missing = missing.to_str().expect("utf-8 temp path");
    let output = gateway(&["--config", missing, "--check"]);
    assert_rejected(&output, &[missing]);
}
