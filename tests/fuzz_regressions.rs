//! Replays the fuzz targets' seed corpora (`fuzz/corpus/<target>/`) and saved reproducers
//! (`fuzz/regressions/<target>/`) with the very properties the fuzz targets check
//! (`fuzz/src/<target>.rs`, included here), on stable Rust and without cargo-fuzz: a crash the
//! fuzzer once found stays fixed. Fuzzing itself: `fuzz/README.md`.

#[allow(dead_code)]
#[path = "../fuzz/src/precondition.rs"]
mod precondition;
#[allow(dead_code)]
#[path = "../fuzz/src/request_guard.rs"]
mod request_guard;
#[allow(dead_code)]
#[path = "../fuzz/src/resource_key.rs"]
mod resource_key;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs `check` on every input of `target`; fails naming each input whose check panicked.
fn replay(target: &str, check: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    let mut failures = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("read input");
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", file.display()));
        }
    }
    println!("{target}: {} inputs replayed", files.len());
    assert!(
        failures.is_empty(),
        "{target}: {} of {} inputs fail:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn precondition_inputs() {
    replay("precondition", precondition::check);
}

#[test]
fn resource_key_inputs() {
    // As libfuzzer-sys hands a `&str` to the target: the longest valid UTF-8 prefix.
    replay("resource_key", |data| {
        let text = match std::str::from_utf8(data) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&data[..e.valid_up_to()]).unwrap(),
        };
        resource_key::check(text)
    });
}

#[test]
fn request_guard_inputs() {
    replay("request_guard", request_guard::check);
}
