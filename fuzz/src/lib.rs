//! The properties the fuzz targets check, one module per target. Each `check` takes the fuzzer's
//! input and panics when a property fails.
//!
//! The modules use only `etag_gateway`, `http`, `pingora` and `tokio`, so that the main crate's
//! `tests/fuzz_regressions.rs` includes the same files (`#[path]`) and replays `corpus/<target>/`
//! and `regressions/<target>/` with them on stable Rust, in the ordinary test run.

pub mod precondition;
pub mod request_guard;
pub mod resource_key;
