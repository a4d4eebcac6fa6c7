//! Fuzz target: canonical resource keys. The properties are in `src/resource_key.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| etag_gateway_fuzz::resource_key::check(path));
