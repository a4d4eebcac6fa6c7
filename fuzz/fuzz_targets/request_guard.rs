//! Fuzz target: request hardening on heads read by Pingora's parser. The properties are in
//! `src/request_guard.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| etag_gateway_fuzz::request_guard::check(data));
