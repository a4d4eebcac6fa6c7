//! Fuzz target: `If-Match` / `If-None-Match` parsing. The properties are in `src/precondition.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| etag_gateway_fuzz::precondition::check(data));
