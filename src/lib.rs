//! etag-gateway: a reverse proxy that owns the e-tags of the resources it fronts and refuses a write
//! whose `If-Match` is stale before anything reaches the backend.
//!
//! The rules are plain Rust, tested without sockets: [`precondition`] (conditional headers),
//! [`resource_key`] (one key per resource), [`table`] (the etag state machine), [`answers`] (what the
//! gateway says itself). [`store`] puts the table behind one trait; [`proxy`] is the thin Pingora glue;
//! [`config`] reads the TOML file and the command line.

pub mod admin;
pub mod answers;
pub mod config;
pub mod etag;
pub mod header_deadline;
pub mod lifecycle;
pub mod metrics;
pub mod precondition;
pub mod proxy;
pub mod request_guard;
pub mod resource_key;
pub mod store;
pub mod table;
pub mod upstream;
