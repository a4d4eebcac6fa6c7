//! Configuration: the TOML file users write, the command-line flags that override it, and the
//! validated [`Config`] the gateway runs with.
//!
//! Two layers, kept apart on purpose:
//!
//! * `FileConfig` mirrors the file format: plain strings and integers, every key optional
//!   (`#[serde(default)]`), unknown keys rejected (`#[serde(deny_unknown_fields)]`). It never
//!   leaves this module.
//! * [`Config`] is what the rest of the crate sees: socket addresses, durations, status codes and
//!   methods, all already checked.
//!
//! The invariant: every [`Config`] this module returns has passed `FileConfig::validate`, so the
//! proxy never re-checks a setting. When something is wrong the [`ConfigError`] names where it
//! came from (the file and the dotted key, or the flag), the offending value and what is allowed.
//!
//! Precedence: command-line flags (`--listen`, `--upstream`) replace the file's value, which
//! replaces the built-in `DEFAULT_*`.

use std::fmt;
use std::marker::PhantomData;
use std::net::{Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, StatusCode};
use serde::de::IntoDeserializer;
use serde::{Deserialize, Deserializer};

// ---------------------------------------------------------------------------------------------
// Defaults and limits
// ---------------------------------------------------------------------------------------------

/// `server.listen`
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// `server.threads`
pub const DEFAULT_THREADS: usize = 2;
/// `server.grace_period_seconds`: short, unlike pingora's 300 s, so a restart doesn't hang.
pub const DEFAULT_GRACE_PERIOD_SECONDS: u64 = 5;
/// `upstream.connect_timeout_ms`
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// `upstream.read_timeout_ms`
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 30_000;
/// `policy.conflict_status`: 409 like RavenDB; 412 is what RFC 9110 prescribes.
pub const DEFAULT_CONFLICT_STATUS: StatusCode = StatusCode::CONFLICT;
/// `policy.require_if_match`
pub const DEFAULT_REQUIRE_IF_MATCH: bool = false;
/// `policy.guarded_methods`
pub const DEFAULT_GUARDED_METHODS: &[&str] = &["PUT", "PATCH", "DELETE"];
/// `store.kind`
pub const DEFAULT_STORE_KIND: StoreKind = StoreKind::Memory;
/// `store.capacity`
pub const DEFAULT_STORE_CAPACITY: usize = 1_000_000;
/// `limits.max_header_bytes`: a request head larger than this is answered 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// `limits.max_etags`: entity tags allowed in one If-Match or If-None-Match (more: 400).
pub const DEFAULT_MAX_ETAGS: usize = 16;
/// `limits.max_etag_length`: bytes of one entity tag as sent, quotes and `W/` included (more: 400).
pub const DEFAULT_MAX_ETAG_LENGTH: usize = 256;
/// `limits.max_body_bytes`: 0 = no limit. Applies to guarded methods only (more: 413).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 0;
/// `limits.header_read_timeout_ms`: the whole request head must arrive within this.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;

/// Upper bound of `server.threads`.
pub const MAX_THREADS: usize = 1024;
/// Upper bound of `server.grace_period_seconds` (one hour).
pub const MAX_GRACE_PERIOD_SECONDS: u64 = 3_600;
/// Upper bound of `upstream.connect_timeout_ms` and `upstream.read_timeout_ms` (one hour).
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// `store.idle_ttl_seconds`: a day.
pub const DEFAULT_STORE_IDLE_TTL_SECONDS: u64 = 86_400;
/// Upper bound of `store.idle_ttl_seconds` (a year).
pub const MAX_STORE_IDLE_TTL_SECONDS: u64 = 31_536_000;
/// Upper bound of `store.capacity`.
pub const MAX_STORE_CAPACITY: usize = 1_000_000_000;
/// Upper bound of `limits.max_header_bytes`: Pingora itself refuses a head above 1 MiB - 1 with 400.
pub const MAX_HEADER_BYTES: usize = 1_048_575;
/// Lower bound of `limits.max_header_bytes`: room for a request line and a few ordinary headers.
pub const MIN_HEADER_BYTES: usize = 1_024;
/// Upper bound of `limits.max_etags`.
pub const MAX_ETAGS: usize = 1_024;
/// Lower bound of `limits.max_etag_length`: the gateway's own etags (`W/"<uuid>"`, 41 bytes) must fit.
pub const MIN_ETAG_LENGTH: usize = 64;
/// Upper bound of `limits.max_etag_length`.
pub const MAX_ETAG_LENGTH: usize = 65_536;
/// Upper bound of `limits.max_body_bytes` (1 TiB).
pub const MAX_BODY_BYTES: u64 = 1 << 40;

/// `upstream.health_check_interval_ms`: how often every upstream is probed with a TCP connect.
pub const DEFAULT_HEALTH_CHECK_INTERVAL_MS: u64 = 1_000;

/// `upstream.resolve_interval_ms`: how often upstream host names are looked up again.
pub const DEFAULT_RESOLVE_INTERVAL_MS: u64 = 5_000;

/// Port of an http:// upstream URL that doesn't give one.
const DEFAULT_HTTP_PORT: u16 = 80;
/// Port of an https:// upstream URL that doesn't give one.
const DEFAULT_HTTPS_PORT: u16 = 443;
/// Shown in errors about upstream URLs.
const UPSTREAM_EXAMPLE: &str = "http://127.0.0.1:3000";
/// Where the settings come from when no `--config` is given.
const NO_FILE: &str = "(built-in defaults)";

// ---------------------------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------------------------

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: ServerConfig,
    /// The default route: every request no `[[route]]` claims.
    pub upstream: UpstreamConfig,
    /// `[[route]]` tables, in file order.
    pub routes: Vec<RouteConfig>,
    pub policy: PolicyConfig,
    pub store: StoreConfig,
    pub limits: LimitsConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
}

/// `[admin]`: the admin listener (metrics, health, etag lookup). Off unless `listen` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// Bearer token for `/etags`; without it that API is off.
    pub token: Option<String>,
}

/// `[log]`
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogConfig {
    /// One line per request at target `etag_gateway::access`.
    pub access: bool,
    pub json: bool,
}

/// Shortest admin token accepted: anything shorter is guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// `[server]`: where the gateway listens and how it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Never empty.
    pub listen: Vec<SocketAddr>,
    /// `1..=MAX_THREADS`
    pub threads: usize,
    /// How long in-flight requests may finish after SIGTERM.
    pub grace_period_seconds: u64,
    /// `tls_listen`, `tls_cert`, `tls_key`: HTTPS listeners, off unless set.
    pub tls: Option<TlsListenerConfig>,
    /// The Unix socket through which a running gateway hands its listening sockets to its
    /// successor (`--upgrade`). Old and new process must agree on it, so it is derived from the
    /// first listen address unless `server.upgrade_sock` names it. Absolute.
    pub upgrade_sock: PathBuf,
    /// Where `--daemon` writes the daemon's process id (`server.pid_file`; by default next to the
    /// upgrade socket, `….pid`). Absolute.
    pub pid_file: PathBuf,
}

/// HTTPS listeners (rustls). The certificate and key were read and found to be a pair at validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListenerConfig {
    /// Never empty.
    pub listen: Vec<SocketAddr>,
    /// PEM: the server certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM: PKCS#8, PKCS#1 or SEC1 private key.
    pub key: PathBuf,
}

/// `[upstream]`: the REST backend the gateway forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Never empty; several servers are used round robin.
    pub servers: Vec<Upstream>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// How long a write that timed out keeps its resource locked before it is settled as unknown
    /// (the backend may still apply it late). `upstream.timeout_hold_ms`, default: the read timeout.
    pub timeout_hold: Duration,
    /// PEM file of the CAs trusted for https:// upstreams instead of the system's
    /// (`upstream.ca_file`; routes inherit it). Checked to hold at least one certificate.
    pub ca_file: Option<PathBuf>,
    /// How often each route's upstreams get a health check; `None`: never (all are used).
    pub health_check_interval: Option<Duration>,
    /// `upstream.health_check_path`: the check is `GET <path>` answered 2xx or 3xx (with the
    /// server's host as `Host`, over TLS for https://) instead of a TCP connect. Every route's.
    pub health_check_path: Option<String>,
    /// How often upstream host names are resolved again (a backend container restarted on another
    /// address); `None`: only at start. IP addresses are never looked up.
    pub resolve_interval: Option<Duration>,
}

/// `[[route]]`: requests under a path prefix (and optionally for one host) go to their own upstreams,
/// under their own policy. The etag table is shared: routes never split a resource's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Canonical (as [`crate::resource_key::ResourceKey`] writes it): `/` or `/a/b`, no trailing slash.
    /// Matches whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    pub prefix: String,
    /// Lower case, without port: compared with the request's Host (or `:authority`) without port.
    pub host: Option<String>,
    /// Never empty; round robin.
    pub servers: Vec<Upstream>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Inherited from `upstream.ca_file` unless the route sets its own.
    pub ca_file: Option<PathBuf>,
    /// `[policy]`'s values unless the route overrides them.
    pub policy: PolicyConfig,
}

/// One upstream server, reached over HTTP/1, in clear or over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// A DNS name or an IP address; an IPv6 address is kept without its brackets. Over TLS it is also
    /// the SNI and the name the certificate must be valid for.
    pub host: String,
    pub port: u16,
    /// `https://`: TLS with certificate verification (always on).
    pub tls: bool,
}

/// `[policy]`: how the optimistic-concurrency rules are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Status of a write whose If-Match doesn't match: 409 or 412.
    pub conflict_status: StatusCode,
    /// Reject a guarded write that carries no If-Match (with 428).
    pub require_if_match: bool,
    /// Never empty, no duplicates, no read-only method.
    pub guarded_methods: Vec<Method>,
}

/// Which store keeps the etag table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// An in-process LRU table: lost on restart, not shared between gateways.
    Memory,
    /// Redis or Valkey, shared by every replica.
    Redis,
}

/// `[store]`: where the etags are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Entries kept before the least recently used one is evicted (memory store).
    pub capacity: NonZeroUsize,
    /// `redis://[user:password@]host[:port][/db]` (redis store; required there).
    pub url: Option<String>,
    /// How long an untouched entry lives in Redis (an expired entry is unknown: `If-Match` on it is
    /// a conflict, never a match).
    pub idle_ttl: Duration,
    /// Memory store: where the table is written at a clean stop and read (then removed) at start.
    pub snapshot: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a socket address")],
            threads: DEFAULT_THREADS,
            grace_period_seconds: DEFAULT_GRACE_PERIOD_SECONDS,
            tls: None,
            upgrade_sock: default_upgrade_sock(
                &DEFAULT_LISTEN
                    .parse()
                    .expect("DEFAULT_LISTEN is a socket address"),
            ),
            pid_file: default_pid_file(&default_upgrade_sock(
                &DEFAULT_LISTEN
                    .parse()
                    .expect("DEFAULT_LISTEN is a socket address"),
            )),
        }
    }
}

/// Where the upgrade socket is unless configured: one per listen address (two gateways on one host
/// cannot share a listen address, so they never share the socket; old and new process of one
/// gateway always do).
pub fn default_upgrade_sock(first_listen: &SocketAddr) -> PathBuf {
    let name: String = first_listen
        .to_string()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    std::env::temp_dir().join(format!("etag-gateway-{name}.upgrade.sock"))
}

/// Where the daemon's pid goes unless configured: beside the upgrade socket.
pub fn default_pid_file(upgrade_sock: &Path) -> PathBuf {
    let name = upgrade_sock.to_string_lossy();
    PathBuf::from(match name.strip_suffix(".upgrade.sock") {
        Some(base) => format!("{base}.pid"),
        None => format!("{name}.pid"),
    })
}

/// The longest path a Unix socket address can hold on Linux (`sun_path` is 108 bytes with its NUL).
const MAX_UNIX_SOCKET_PATH: usize = 107;

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            conflict_status: DEFAULT_CONFLICT_STATUS,
            require_if_match: DEFAULT_REQUIRE_IF_MATCH,
            guarded_methods: DEFAULT_GUARDED_METHODS
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).expect("default methods are valid"))
                .collect(),
        }
    }
}

/// `[limits]`: what a request may look like before the gateway refuses it unread (see
/// [`crate::request_guard`]), and how long its head may take to arrive (see
/// [`crate::header_deadline`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Request line plus every header line (name, value and 4 bytes of `: ` and CRLF); above: 431.
    pub max_header_bytes: usize,
    /// Entity tags in one If-Match / If-None-Match (all lines of the header together); above: 400.
    pub max_etags: usize,
    /// Bytes of one entity tag as sent (quotes and `W/` included); above: 400.
    pub max_etag_length: usize,
    /// Largest `Content-Length` of a guarded write; `None`: no limit. Above: 413.
    pub max_body_bytes: Option<u64>,
    /// The whole request head must arrive within this, keep-alive idle time included.
    pub header_read_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_etags: DEFAULT_MAX_ETAGS,
            max_etag_length: DEFAULT_MAX_ETAG_LENGTH,
            // DEFAULT_MAX_BODY_BYTES is 0: no limit
            max_body_bytes: None,
            header_read_timeout: Duration::from_millis(DEFAULT_HEADER_READ_TIMEOUT_MS),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: DEFAULT_STORE_KIND,
            capacity: NonZeroUsize::new(DEFAULT_STORE_CAPACITY).expect("capacity is not zero"),
            url: None,
            idle_ttl: Duration::from_secs(DEFAULT_STORE_IDLE_TTL_SECONDS),
            snapshot: None,
        }
    }
}

impl Upstream {
    /// `host:port`, as a connector wants it (`[::1]:3000` for an IPv6 address).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.address())
    }
}

impl StoreKind {
    /// The name used in the file (`store.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
        }
    }

    /// Parses `store.kind`; the error is the reason shown to the user.
    fn parse(name: &str) -> Result<StoreKind, String> {
        match name {
            "memory" => Ok(StoreKind::Memory),
            "redis" => Ok(StoreKind::Redis),
            _ => Err("allowed: \"memory\", \"redis\"".to_owned()),
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// Optimistic concurrency (If-Match / ETag) in front of a plain REST backend.
///
/// Command-line flags win over the configuration file.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "etag-gateway", version)]
pub struct Cli {
    /// TOML configuration file (example: conf/gateway.toml); without it the built-in defaults apply
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Upstream server, http://host[:port] or https://host[:port] (port 80/443 if left out); repeat for round robin; replaces upstream.url
    #[arg(long = "upstream", value_name = "URL")]
    pub upstream: Vec<String>,

    /// Address to listen on, IP:port; repeat to listen on several; replaces server.listen
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Validate the configuration, print a summary and exit
    #[arg(long)]
    pub check: bool,

    /// Take over from the running gateway with the same configuration (zero-downtime upgrade):
    /// receive its listening sockets through server.upgrade_sock, which it sends on SIGQUIT; start
    /// this first, then send SIGQUIT to the old process within 5 seconds
    #[arg(short = 'u', long)]
    pub upgrade: bool,

    /// Run in the background: fork, write the daemon's pid to server.pid_file and return once
    /// started (for systemd's Type=forking and its ExecReload upgrade; see conf/etag-gateway.service)
    #[arg(short = 'd', long)]
    pub daemon: bool,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a configuration was refused. The message names the file or flag, the key and what is
/// allowed, so the user can fix it without reading the source.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    /// The `--config` file couldn't be read.
    #[error("{}: cannot read the configuration file: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Not TOML, an unknown key, or a value of the wrong type. `key` is the dotted key the
    /// error points at, when it could be found.
    #[error("{origin}: {}{}", KeyPrefix(.key.as_deref()), .source.to_string().trim_end())]
    Parse {
        origin: String,
        key: Option<String>,
        #[source]
        source: Box<toml::de::Error>,
    },

    /// A value in the file that parsed but isn't allowed.
    #[error("{origin}: {key} = {value} is not allowed ({reason})")]
    InvalidValue {
        origin: String,
        /// Dotted key, e.g. `policy.conflict_status` or `route[2].prefix`.
        key: String,
        /// The value as written in TOML, e.g. `410` or `"ftp://x"`.
        value: String,
        /// What is allowed instead, e.g. `allowed: 409, 412`.
        reason: String,
    },

    /// A command-line value that isn't allowed.
    #[error("{flag}: {value} is not allowed ({reason})")]
    InvalidFlag {
        /// e.g. `--upstream`.
        flag: &'static str,
        value: String,
        reason: String,
    },

    /// Neither the file nor the command line names an upstream.
    #[error("no upstream: give --upstream URL or [upstream] url in the config file{}", InFile(.origin.as_deref()))]
    NoUpstream { origin: Option<String> },
}

/// Formats `in `key`: ` before a TOML error, or nothing.
struct KeyPrefix<'a>(Option<&'a str>);

impl fmt::Display for KeyPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(key) => write!(f, "in `{key}`: "),
            None => Ok(()),
        }
    }
}

/// Formats ` (FILE has none)`, or nothing.
struct InFile<'a>(Option<&'a str>);

impl fmt::Display for InFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(file) => write!(f, " ({file} has none)"),
            None => Ok(()),
        }
    }
}

/// Where a value came from, to build the error that names it.
#[derive(Clone, Copy)]
enum Setting<'a> {
    Key { origin: &'a str, key: &'a str },
    Flag(&'static str),
}

impl Setting<'_> {
    fn reject(self, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        let (value, reason) = (value.into(), reason.into());
        match self {
            Setting::Key { origin, key } => ConfigError::InvalidValue {
                origin: origin.to_owned(),
                key: key.to_owned(),
                value,
                reason,
            },
            Setting::Flag(flag) => ConfigError::InvalidFlag {
                flag,
                value,
                reason,
            },
        }
    }
}

/// A string as TOML would write it (close enough: TOML basic strings escape like Rust).
fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// A list of strings as TOML would write it.
fn quoted_list(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", items.join(", "))
}

// ---------------------------------------------------------------------------------------------
// The file format
// ---------------------------------------------------------------------------------------------

/// `"a"` or `["a", "b"]`.
///
/// Deserialized by hand rather than with `#[serde(untagged)]`, whose error for a wrong type
/// ("data did not match any variant") doesn't say what was found.
#[derive(Debug, Clone, PartialEq)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = OneOrMany<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut many = Vec::new();
                while let Some(one) = seq.next_element()? {
                    many.push(one);
                }
                Ok(OneOrMany::Many(many))
            }
        }

        deserializer.deserialize_any(Visitor(PhantomData))
    }
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    server: FileServer,
    upstream: FileUpstream,
    policy: FilePolicy,
    store: FileStore,
    limits: FileLimits,
    admin: FileAdmin,
    log: FileLog,
    /// `[[route]]` tables.
    route: Vec<FileRoute>,
}

/// One `[[route]]`. Every key but `prefix` and `upstream` is optional and inherits from `[policy]`
/// or `[upstream]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileRoute {
    prefix: Option<String>,
    host: Option<String>,
    upstream: Option<OneOrMany<String>>,
    #[serde(deserialize_with = "optional_integer")]
    conflict_status: Option<i64>,
    require_if_match: Option<bool>,
    guarded_methods: Option<OneOrMany<String>>,
    #[serde(deserialize_with = "optional_integer")]
    connect_timeout_ms: Option<i64>,
    #[serde(deserialize_with = "optional_integer")]
    read_timeout_ms: Option<i64>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileAdmin {
    listen: Option<String>,
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileLog {
    access: bool,
    format: String,
}

impl Default for FileLog {
    fn default() -> Self {
        FileLog {
            access: false,
            format: "text".to_owned(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileServer {
    listen: OneOrMany<String>,
    #[serde(deserialize_with = "integer")]
    threads: i64,
    #[serde(deserialize_with = "integer")]
    grace_period_seconds: i64,
    tls_listen: Option<OneOrMany<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    upgrade_sock: Option<PathBuf>,
    pid_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileUpstream {
    /// No default: the gateway can't guess where the backend is.
    url: Option<OneOrMany<String>>,
    #[serde(deserialize_with = "integer")]
    connect_timeout_ms: i64,
    #[serde(deserialize_with = "integer")]
    read_timeout_ms: i64,
    /// Defaults to `read_timeout_ms`.
    #[serde(deserialize_with = "optional_integer")]
    timeout_hold_ms: Option<i64>,
    ca_file: Option<PathBuf>,
    #[serde(deserialize_with = "integer")]
    health_check_interval_ms: i64,
    health_check_path: Option<String>,
    #[serde(deserialize_with = "integer")]
    resolve_interval_ms: i64,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FilePolicy {
    #[serde(deserialize_with = "integer")]
    conflict_status: i64,
    require_if_match: bool,
    guarded_methods: OneOrMany<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileStore {
    kind: String,
    #[serde(deserialize_with = "integer")]
    capacity: i64,
    url: Option<String>,
    #[serde(deserialize_with = "integer")]
    idle_ttl_seconds: i64,
    snapshot: Option<PathBuf>,
}

impl Default for FileServer {
    fn default() -> Self {
        FileServer {
            listen: OneOrMany::One(DEFAULT_LISTEN.to_owned()),
            threads: DEFAULT_THREADS as i64,
            grace_period_seconds: DEFAULT_GRACE_PERIOD_SECONDS as i64,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            upgrade_sock: None,
            pid_file: None,
        }
    }
}

impl Default for FileUpstream {
    fn default() -> Self {
        FileUpstream {
            url: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS as i64,
            read_timeout_ms: DEFAULT_READ_TIMEOUT_MS as i64,
            timeout_hold_ms: None,
            ca_file: None,
            health_check_interval_ms: DEFAULT_HEALTH_CHECK_INTERVAL_MS as i64,
            health_check_path: None,
            resolve_interval_ms: DEFAULT_RESOLVE_INTERVAL_MS as i64,
        }
    }
}

impl Default for FilePolicy {
    fn default() -> Self {
        FilePolicy {
            conflict_status: i64::from(DEFAULT_CONFLICT_STATUS.as_u16()),
            require_if_match: DEFAULT_REQUIRE_IF_MATCH,
            guarded_methods: OneOrMany::Many(
                DEFAULT_GUARDED_METHODS
                    .iter()
                    .map(|m| (*m).to_owned())
                    .collect(),
            ),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileLimits {
    #[serde(deserialize_with = "integer")]
    max_header_bytes: i64,
    #[serde(deserialize_with = "integer")]
    max_etags: i64,
    #[serde(deserialize_with = "integer")]
    max_etag_length: i64,
    #[serde(deserialize_with = "integer")]
    max_body_bytes: i64,
    #[serde(deserialize_with = "integer")]
    header_read_timeout_ms: i64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES as i64,
            max_etags: DEFAULT_MAX_ETAGS as i64,
            max_etag_length: DEFAULT_MAX_ETAG_LENGTH as i64,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES as i64,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS as i64,
        }
    }
}

impl Default for FileStore {
    fn default() -> Self {
        FileStore {
            kind: DEFAULT_STORE_KIND.as_str().to_owned(),
            capacity: DEFAULT_STORE_CAPACITY as i64,
            url: None,
            idle_ttl_seconds: DEFAULT_STORE_IDLE_TTL_SECONDS as i64,
            snapshot: None,
        }
    }
}

/// Integers are read as i64 (what TOML has) and range-checked in `validate`, so a negative or
/// huge number gets the same "allowed: ..." message as any other bad value. The visitor only
/// exists to say "expected an integer" rather than serde's "expected i64".
fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Integer;

    impl serde::de::Visitor<'_> for Integer {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
    }

    deserializer.deserialize_i64(Integer)
}

/// Like [`integer`], for a key whose default depends on another key.
fn optional_integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    integer(deserializer).map(Some)
}

/// Command-line values that replace the file's.
#[derive(Default)]
struct Overrides<'a> {
    listen: &'a [String],
    upstream: &'a [String],
}

impl FileConfig {
    fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|source: toml::de::Error| ConfigError::Parse {
            origin: origin.to_owned(),
            key: source.span().and_then(|span| key_at(text, span.start)),
            source: Box::new(source),
        })
    }

    /// Checks every setting and converts it to its runtime type. `origin` names the file in
    /// errors; `has_file` tells whether there is a file at all (for the "no upstream" message).
    fn validate(
        self,
        origin: &str,
        has_file: bool,
        overrides: &Overrides<'_>,
    ) -> Result<Config, ConfigError> {
        let key = |key: &'static str| Setting::Key { origin, key };

        // [server]
        let listen = if overrides.listen.is_empty() {
            parse_listen(self.server.listen.into_vec(), key("server.listen"))?
        } else {
            parse_listen(overrides.listen.to_vec(), Setting::Flag("--listen"))?
        };
        let threads = in_range(
            self.server.threads,
            1,
            MAX_THREADS as i64,
            key("server.threads"),
        )?;
        let grace_period_seconds = in_range(
            self.server.grace_period_seconds,
            0,
            MAX_GRACE_PERIOD_SECONDS as i64,
            key("server.grace_period_seconds"),
        )?;
        let upgrade_sock = match self.server.upgrade_sock {
            Some(path) => {
                let shown = quoted(&path.display().to_string());
                if !path.is_absolute() {
                    // Old and new process may run from different directories.
                    return Err(key("server.upgrade_sock").reject(shown, "give an absolute path"));
                }
                if path.as_os_str().len() > MAX_UNIX_SOCKET_PATH {
                    return Err(key("server.upgrade_sock").reject(
                        shown,
                        format!("a Unix socket path has at most {MAX_UNIX_SOCKET_PATH} bytes"),
                    ));
                }
                path
            }
            None => {
                let path = default_upgrade_sock(&listen[0]);
                if path.as_os_str().len() > MAX_UNIX_SOCKET_PATH {
                    return Err(key("server.upgrade_sock").reject(
                        "(not set)",
                        format!(
                            "the default {} is longer than a Unix socket path may be \
                             ({MAX_UNIX_SOCKET_PATH} bytes; TMPDIR is long): set it",
                            path.display()
                        ),
                    ));
                }
                path
            }
        };
        let pid_file = match self.server.pid_file {
            Some(path) if !path.is_absolute() => {
                return Err(key("server.pid_file")
                    .reject(quoted(&path.display().to_string()), "give an absolute path"));
            }
            Some(path) => path,
            None => default_pid_file(&upgrade_sock),
        };
        let tls = match (
            self.server.tls_listen,
            self.server.tls_cert,
            self.server.tls_key,
        ) {
            (None, None, None) => None,
            (None, cert, tls_key) => {
                let (name, path) = match (cert, tls_key) {
                    (Some(cert), _) => ("server.tls_cert", cert),
                    (None, Some(tls_key)) => ("server.tls_key", tls_key),
                    (None, None) => unreachable!("matched above"),
                };
                return Err(key(name).reject(
                    quoted(&path.display().to_string()),
                    "only used with server.tls_listen",
                ));
            }
            (Some(addresses), cert, tls_key) => {
                let tls_listen = parse_listen(addresses.into_vec(), key("server.tls_listen"))?;
                if let Some(both) = tls_listen.iter().find(|a| listen.contains(a)) {
                    return Err(key("server.tls_listen").reject(
                        quoted(&both.to_string()),
                        "must differ from server.listen: one port speaks either HTTP or HTTPS",
                    ));
                }
                let required = |name: &'static str, what: &str| {
                    key(name).reject(
                        "(missing)",
                        format!("required with server.tls_listen: {what}"),
                    )
                };
                let cert = cert.ok_or_else(|| {
                    required(
                        "server.tls_cert",
                        "a PEM certificate chain, e.g. \"/etc/etag-gateway/cert.pem\"",
                    )
                })?;
                let tls_key = tls_key.ok_or_else(|| {
                    required(
                        "server.tls_key",
                        "a PEM private key, e.g. \"/etc/etag-gateway/key.pem\"",
                    )
                })?;
                check_tls_pair(&cert, &tls_key).map_err(|(name, path, reason)| {
                    key(name).reject(quoted(&path.display().to_string()), reason)
                })?;
                Some(TlsListenerConfig {
                    listen: tls_listen,
                    cert,
                    key: tls_key,
                })
            }
        };

        // [upstream]
        let servers = if !overrides.upstream.is_empty() {
            parse_upstreams(overrides.upstream.to_vec(), Setting::Flag("--upstream"))?
        } else if let Some(url) = self.upstream.url {
            parse_upstreams(url.into_vec(), key("upstream.url"))?
        } else {
            return Err(ConfigError::NoUpstream {
                origin: has_file.then(|| origin.to_owned()),
            });
        };
        let connect_timeout_ms = in_range(
            self.upstream.connect_timeout_ms,
            1,
            MAX_TIMEOUT_MS as i64,
            key("upstream.connect_timeout_ms"),
        )?;
        let read_timeout_ms = in_range(
            self.upstream.read_timeout_ms,
            1,
            MAX_TIMEOUT_MS as i64,
            key("upstream.read_timeout_ms"),
        )?;
        let timeout_hold_ms = match self.upstream.timeout_hold_ms {
            None => read_timeout_ms,
            Some(ms) => in_range(
                ms,
                0,
                MAX_TIMEOUT_MS as i64,
                key("upstream.timeout_hold_ms"),
            )?,
        };
        let ca_file = match self.upstream.ca_file {
            None => None,
            Some(path) => Some(check_ca_file(path, key("upstream.ca_file"))?),
        };
        let health_check_interval_ms = in_range(
            self.upstream.health_check_interval_ms,
            0,
            MAX_TIMEOUT_MS as i64,
            key("upstream.health_check_interval_ms"),
        )?;
        let health_check_path = match self.upstream.health_check_path {
            None => None,
            Some(path) => {
                let fits = path.starts_with('/')
                    && path.len() <= 1024
                    && path.bytes().all(|b| b.is_ascii_graphic())
                    && http::uri::PathAndQuery::try_from(path.as_str()).is_ok();
                if !fits {
                    return Err(key("upstream.health_check_path").reject(
                        quoted(&path),
                        "an absolute path such as \"/health\", optionally with a query: visible ASCII, at most 1024 bytes",
                    ));
                }
                if health_check_interval_ms == 0 {
                    return Err(key("upstream.health_check_path").reject(
                        quoted(&path),
                        "health checks are off (upstream.health_check_interval_ms = 0)",
                    ));
                }
                Some(path)
            }
        };
        let resolve_interval_ms = in_range(
            self.upstream.resolve_interval_ms,
            0,
            MAX_TIMEOUT_MS as i64,
            key("upstream.resolve_interval_ms"),
        )?;

        // [policy]
        let policy = PolicyConfig {
            conflict_status: parse_conflict_status(
                self.policy.conflict_status,
                key("policy.conflict_status"),
            )?,
            require_if_match: self.policy.require_if_match,
            guarded_methods: parse_methods(
                self.policy.guarded_methods.into_vec(),
                key("policy.guarded_methods"),
            )?,
        };

        // [[route]]
        let inherited = RouteConfig {
            prefix: "/".to_owned(),
            host: None,
            servers: Vec::new(),
            connect_timeout: Duration::from_millis(connect_timeout_ms as u64),
            read_timeout: Duration::from_millis(read_timeout_ms as u64),
            ca_file: ca_file.clone(),
            policy: policy.clone(),
        };
        let mut routes: Vec<RouteConfig> = Vec::with_capacity(self.route.len());
        for (index, file_route) in self.route.into_iter().enumerate() {
            let n = index + 1;
            let route = file_route.validate(origin, n, &inherited)?;
            if let Some(m) = routes
                .iter()
                .position(|r| r.prefix == route.prefix && r.host == route.host)
            {
                let prefix_key = format!("route[{n}].prefix");
                return Err(Setting::Key {
                    origin,
                    key: &prefix_key,
                }
                .reject(
                    quoted(&route.prefix),
                    format!(
                        "route[{}] has the same prefix and host: one of them would never be used",
                        m + 1
                    ),
                ));
            }
            routes.push(route);
        }
        let any_tls =
            servers.iter().any(|u| u.tls) || routes.iter().any(|r| r.servers.iter().any(|u| u.tls));
        if let (Some(path), false) = (&ca_file, any_tls) {
            return Err(key("upstream.ca_file").reject(
                quoted(&path.display().to_string()),
                "only used with https:// upstreams",
            ));
        }

        // [store]
        let kind = StoreKind::parse(&self.store.kind)
            .map_err(|reason| key("store.kind").reject(quoted(&self.store.kind), reason))?;
        let capacity = in_range(
            self.store.capacity,
            1,
            MAX_STORE_CAPACITY as i64,
            key("store.capacity"),
        )?;
        let url = match (kind, self.store.url) {
            (StoreKind::Redis, None) => {
                return Err(key("store.url").reject(
                    "(missing)",
                    "required with kind = \"redis\", e.g. url = \"redis://127.0.0.1:6379\"",
                ))
            }
            (StoreKind::Redis, Some(url)) => Some(
                check_redis_url(&url)
                    .map_err(|reason| key("store.url").reject(quoted(&url), reason))?,
            ),
            (StoreKind::Memory, Some(url)) => {
                return Err(key("store.url").reject(quoted(&url), "only used with kind = \"redis\""))
            }
            (StoreKind::Memory, None) => None,
        };
        let idle_ttl_seconds = in_range(
            self.store.idle_ttl_seconds,
            1,
            MAX_STORE_IDLE_TTL_SECONDS as i64,
            key("store.idle_ttl_seconds"),
        )?;

        let snapshot = match (kind, self.store.snapshot) {
            (StoreKind::Redis, Some(path)) => {
                return Err(key("store.snapshot").reject(
                    quoted(&path.display().to_string()),
                    "only used with kind = \"memory\" (Redis keeps the table itself)",
                ))
            }
            (_, Some(path)) if path.as_os_str().is_empty() || path.is_dir() => {
                return Err(key("store.snapshot").reject(
                    quoted(&path.display().to_string()),
                    "a file path, e.g. \"/var/lib/etag-gateway/etags\"",
                ))
            }
            (_, snapshot) => snapshot,
        };

        // [limits]
        let limits = self.limits.validate(&key)?;

        // [admin]
        let admin_listen = match &self.admin.listen {
            None => None,
            Some(text) => {
                let addr: SocketAddr = text.parse().map_err(|_| {
                    key("admin.listen").reject(quoted(text), "an IP:port, e.g. \"127.0.0.1:9091\"")
                })?;
                let on_tls = tls.as_ref().is_some_and(|t| t.listen.contains(&addr));
                if listen.contains(&addr) || on_tls {
                    return Err(key("admin.listen").reject(
                        quoted(text),
                        "must differ from server.listen: the admin API is never on the public listener",
                    ));
                }
                Some(addr)
            }
        };
        if let Some(token) = &self.admin.token {
            if token.len() < MIN_ADMIN_TOKEN_LEN
                || token.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(key("admin.token").reject(
                    "(hidden)",
                    format!("at least {MIN_ADMIN_TOKEN_LEN} characters, no spaces"),
                ));
            }
            if admin_listen.is_none() {
                return Err(key("admin.token").reject("(hidden)", "needs admin.listen"));
            }
        }

        // [log]
        let json = match self.log.format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(key("log.format").reject(quoted(other), "allowed: \"text\", \"json\""))
            }
        };

        Ok(Config {
            limits,
            admin: AdminConfig {
                listen: admin_listen,
                token: self.admin.token,
            },
            log: LogConfig {
                access: self.log.access,
                json,
            },
            server: ServerConfig {
                listen,
                threads: threads as usize,
                grace_period_seconds: grace_period_seconds as u64,
                tls,
                upgrade_sock,
                pid_file,
            },
            upstream: UpstreamConfig {
                servers,
                connect_timeout: Duration::from_millis(connect_timeout_ms as u64),
                read_timeout: Duration::from_millis(read_timeout_ms as u64),
                timeout_hold: Duration::from_millis(timeout_hold_ms as u64),
                ca_file,
                health_check_interval: (health_check_interval_ms > 0)
                    .then(|| Duration::from_millis(health_check_interval_ms as u64)),
                health_check_path,
                resolve_interval: (resolve_interval_ms > 0)
                    .then(|| Duration::from_millis(resolve_interval_ms as u64)),
            },
            routes,
            policy,
            store: StoreConfig {
                kind,
                capacity: NonZeroUsize::new(capacity as usize).expect("checked to be >= 1"),
                url,
                idle_ttl: Duration::from_secs(idle_ttl_seconds as u64),
                snapshot,
            },
        })
    }
}

impl FileRoute {
    /// Checks the `n`th `[[route]]` (counted from 1, as errors name it: `route[2].prefix`); keys it
    /// leaves out come from `inherited` (`[upstream]` and `[policy]`).
    fn validate(
        self,
        origin: &str,
        n: usize,
        inherited: &RouteConfig,
    ) -> Result<RouteConfig, ConfigError> {
        let names: Vec<String> = [
            "prefix",
            "host",
            "upstream",
            "conflict_status",
            "guarded_methods",
            "connect_timeout_ms",
            "read_timeout_ms",
            "ca_file",
        ]
        .iter()
        .map(|k| format!("route[{n}].{k}"))
        .collect();
        let key = |k: &str| -> Setting<'_> {
            let key = names
                .iter()
                .find(|name| name.ends_with(&format!(".{k}")))
                .expect("every route key is listed");
            Setting::Key { origin, key }
        };

        let prefix = self.prefix.ok_or_else(|| {
            key("prefix").reject("(missing)", "required: a path prefix, e.g. \"/api\"")
        })?;
        let prefix = parse_prefix(&prefix)
            .map_err(|reason| key("prefix").reject(quoted(&prefix), reason))?;
        let host = match self.host {
            None => None,
            Some(host) => Some(
                parse_route_host(&host)
                    .map_err(|reason| key("host").reject(quoted(&host), reason))?,
            ),
        };
        let urls = self.upstream.ok_or_else(|| {
            key("upstream").reject(
                "(missing)",
                format!(
                    "required: the URL or URLs this route forwards to, e.g. {}",
                    quoted(UPSTREAM_EXAMPLE)
                ),
            )
        })?;
        let servers = parse_upstreams(urls.into_vec(), key("upstream"))?;
        let timeout = |value: Option<i64>, name: &str, inherited: Duration| match value {
            None => Ok(inherited),
            Some(ms) => in_range(ms, 1, MAX_TIMEOUT_MS as i64, key(name))
                .map(|ms| Duration::from_millis(ms as u64)),
        };
        let connect_timeout = timeout(
            self.connect_timeout_ms,
            "connect_timeout_ms",
            inherited.connect_timeout,
        )?;
        let read_timeout = timeout(
            self.read_timeout_ms,
            "read_timeout_ms",
            inherited.read_timeout,
        )?;
        let ca_file = match self.ca_file {
            None => inherited.ca_file.clone(),
            Some(path) => {
                if !servers.iter().any(|u| u.tls) {
                    return Err(key("ca_file").reject(
                        quoted(&path.display().to_string()),
                        "only used with https:// upstreams",
                    ));
                }
                Some(check_ca_file(path, key("ca_file"))?)
            }
        };
        let policy = PolicyConfig {
            conflict_status: match self.conflict_status {
                None => inherited.policy.conflict_status,
                Some(code) => parse_conflict_status(code, key("conflict_status"))?,
            },
            require_if_match: self
                .require_if_match
                .unwrap_or(inherited.policy.require_if_match),
            guarded_methods: match self.guarded_methods {
                None => inherited.policy.guarded_methods.clone(),
                Some(names) => parse_methods(names.into_vec(), key("guarded_methods"))?,
            },
        };
        Ok(RouteConfig {
            prefix,
            host,
            servers,
            connect_timeout,
            read_timeout,
            ca_file,
            policy,
        })
    }
}

/// `409` or `412`.
fn parse_conflict_status(code: i64, setting: Setting<'_>) -> Result<StatusCode, ConfigError> {
    match code {
        409 => Ok(StatusCode::CONFLICT),
        412 => Ok(StatusCode::PRECONDITION_FAILED),
        other => Err(setting.reject(other.to_string(), "allowed: 409, 412")),
    }
}

/// A route prefix as written must already be a canonical resource key (a trailing slash aside): the
/// prefix is compared with canonical keys, so a spelling that canonicalises to something else
/// would silently match other paths than the ones written.
fn parse_prefix(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err("a path starting with `/`, e.g. \"/api\"".to_owned());
    }
    if text.contains(['?', '#']) || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            "a path only: no query, fragment, spaces or control characters, e.g. \"/api\""
                .to_owned(),
        );
    }
    let canonical = crate::resource_key::ResourceKey::from_path(text);
    let written = match text.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    };
    if canonical.as_str() != written {
        return Err(format!(
            "not in canonical form (dot segments, repeated slashes or needlessly encoded characters): write {}",
            quoted(canonical.as_str())
        ));
    }
    Ok(canonical.as_str().to_owned())
}

/// A route's `host`: a DNS name or IP address, without port; stored lower case.
fn parse_route_host(text: &str) -> Result<String, String> {
    let host = text.trim().trim_end_matches('.').to_ascii_lowercase();
    if let Some(inner) = host.strip_prefix('[') {
        let ok = inner
            .strip_suffix(']')
            .is_some_and(|address| address.parse::<Ipv6Addr>().is_ok());
        return if ok {
            Ok(host)
        } else {
            Err("an IPv6 address in brackets, without port, e.g. \"[::1]\"".to_owned())
        };
    }
    if host.contains(':') {
        return Err(
            "a host name without port (the request's Host is compared without its port), e.g. \"api.example.com\""
                .to_owned(),
        );
    }
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    {
        return Err("a host name, e.g. \"api.example.com\"".to_owned());
    }
    Ok(host)
}

/// A CA file must hold at least one certificate rustls accepts as a trust anchor.
fn check_ca_file(path: PathBuf, setting: Setting<'_>) -> Result<PathBuf, ConfigError> {
    match crate::upstream::load_ca_certificates(&path) {
        Ok(_) => Ok(path),
        Err(reason) => Err(setting.reject(quoted(&path.display().to_string()), reason)),
    }
}

/// The TLS listener's certificate chain and key: readable, PEM, and a pair. Checked here so that
/// `--check` catches them, and because Pingora panics on them when the listener starts.
fn check_tls_pair(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(), (&'static str, PathBuf, String)> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let cert_error = |reason: String| ("server.tls_cert", cert.to_path_buf(), reason);
    let key_error = |reason: String| ("server.tls_key", key.to_path_buf(), reason);
    let text = std::fs::read(cert).map_err(|e| cert_error(format!("cannot read it: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert_error(
            "no certificate in it (PEM, \"-----BEGIN CERTIFICATE-----\")".to_owned(),
        ));
    }
    let text = std::fs::read(key).map_err(|e| key_error(format!("cannot read it: {e}")))?;
    let private = PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        key_error(format!(
            "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}"
        ))
    })?;
    pingora::tls::install_default_crypto_provider();
    pingora::tls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| key_error(format!("not usable with server.tls_cert: {e}")))?;
    Ok(())
}

/// A URL fit for logs: credentials replaced by `***`.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// `redis://…` only; the reason shown to the user otherwise.
fn check_redis_url(url: &str) -> Result<String, String> {
    let rest = if let Some(rest) = url.strip_prefix("redis://") {
        rest
    } else if url.starts_with("rediss://") {
        return Err(
            "TLS to Redis is not supported yet; use redis:// (e.g. through a local TLS tunnel)"
                .into(),
        );
    } else {
        return Err("allowed: redis://[user:password@]host[:port][/db]".into());
    };
    let host = rest
        .rsplit('@')
        .next()
        .unwrap_or("")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    if host.is_empty() {
        return Err("no host: redis://host[:port]".into());
    }
    Ok(url.to_owned())
}

impl FileLimits {
    fn validate<'a>(
        self,
        key: &impl Fn(&'static str) -> Setting<'a>,
    ) -> Result<LimitsConfig, ConfigError> {
        let max_header_bytes = in_range(
            self.max_header_bytes,
            MIN_HEADER_BYTES as i64,
            MAX_HEADER_BYTES as i64,
            key("limits.max_header_bytes"),
        )?;
        let max_etags = in_range(self.max_etags, 1, MAX_ETAGS as i64, key("limits.max_etags"))?;
        let max_etag_length = in_range(
            self.max_etag_length,
            MIN_ETAG_LENGTH as i64,
            MAX_ETAG_LENGTH as i64,
            key("limits.max_etag_length"),
        )?;
        let max_body_bytes = in_range(
            self.max_body_bytes,
            0,
            MAX_BODY_BYTES as i64,
            key("limits.max_body_bytes"),
        )?;
        let header_read_timeout_ms = in_range(
            self.header_read_timeout_ms,
            1,
            MAX_TIMEOUT_MS as i64,
            key("limits.header_read_timeout_ms"),
        )?;
        Ok(LimitsConfig {
            max_header_bytes: max_header_bytes as usize,
            max_etags: max_etags as usize,
            max_etag_length: max_etag_length as usize,
            max_body_bytes: (max_body_bytes > 0).then_some(max_body_bytes as u64),
            header_read_timeout: Duration::from_millis(header_read_timeout_ms as u64),
        })
    }
}

/// Finds the dotted key whose name or value covers byte `pos` of `text`, to say which setting a
/// toml error is about (toml shows the line, but not the `[table]` it sits in).
fn key_at(text: &str, pos: usize) -> Option<String> {
    fn search(table: &toml::de::DeTable<'_>, pos: usize, path: &mut Vec<String>) -> Option<String> {
        for (name, value) in table {
            path.push(name.get_ref().to_string());
            // The innermost key wins: look inside a table before matching the table itself.
            if let toml::de::DeValue::Table(inner) = value.get_ref() {
                if let Some(found) = search(inner, pos, path) {
                    return Some(found);
                }
            }
            // `[[route]]`: the nth table is named `route[n]`, counted from 1 as validation does.
            if let toml::de::DeValue::Array(items) = value.get_ref() {
                for (index, item) in items.iter().enumerate() {
                    if let toml::de::DeValue::Table(inner) = item.get_ref() {
                        let name = path.pop().unwrap_or_default();
                        path.push(format!("{name}[{}]", index + 1));
                        if let Some(found) = search(inner, pos, path) {
                            return Some(found);
                        }
                        path.pop();
                        path.push(name);
                    }
                }
            }
            if name.span().contains(&pos) || value.span().contains(&pos) {
                return Some(path.join("."));
            }
            path.pop();
        }
        None
    }
    let document = toml::de::DeTable::parse(text).ok()?;
    search(document.get_ref(), pos, &mut Vec::new())
}

fn in_range(value: i64, min: i64, max: i64, setting: Setting<'_>) -> Result<i64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(setting.reject(value.to_string(), format!("allowed: {min} to {max}")))
    }
}

fn parse_listen(
    addresses: Vec<String>,
    setting: Setting<'_>,
) -> Result<Vec<SocketAddr>, ConfigError> {
    if addresses.is_empty() {
        return Err(setting.reject(
            "[]",
            format!("give at least one address, e.g. {}", quoted(DEFAULT_LISTEN)),
        ));
    }
    let mut listen = Vec::with_capacity(addresses.len());
    for text in addresses {
        let address: SocketAddr = text.trim().parse().map_err(|_| {
            setting.reject(
                quoted(&text),
                "expected IP:port, e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
            )
        })?;
        if listen.contains(&address) {
            return Err(setting.reject(quoted(&text), "the address is listed twice"));
        }
        listen.push(address);
    }
    Ok(listen)
}

fn parse_upstreams(urls: Vec<String>, setting: Setting<'_>) -> Result<Vec<Upstream>, ConfigError> {
    if urls.is_empty() {
        return Err(setting.reject(
            "[]",
            format!("give at least one URL, e.g. {}", quoted(UPSTREAM_EXAMPLE)),
        ));
    }
    urls.iter()
        .map(|url| parse_upstream(url).map_err(|reason| setting.reject(quoted(url), reason)))
        .collect()
}

/// Parses `http://host[:port][/]` or `https://host[:port][/]`; the error is the reason shown to the
/// user.
fn parse_upstream(url: &str) -> Result<Upstream, String> {
    let only_http = || format!("only http:// or https:// URLs, e.g. {UPSTREAM_EXAMPLE}");
    let (scheme, rest) = url.split_once("://").ok_or_else(only_http)?;
    let tls = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return Err(only_http());
    };

    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if tail.contains('?') {
        return Err("a query string is not allowed: give only http://host[:port]".to_owned());
    }
    if tail.contains('#') {
        return Err("a fragment is not allowed: give only http://host[:port]".to_owned());
    }
    if !tail.is_empty() && tail != "/" {
        return Err(
            "a path is not allowed (requests are forwarded with their own path): give only http://host[:port]"
                .to_owned(),
        );
    }
    if authority.contains('@') {
        return Err("user info (user@) is not allowed: give only http://host[:port]".to_owned());
    }

    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        // IPv6 literal: [addr] or [addr]:port
        let (address, after) = bracketed
            .split_once(']')
            .ok_or("an IPv6 address needs a closing `]`, e.g. http://[::1]:3000")?;
        address
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("`{address}` is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or("expected `:port` after `]`")?,
            ),
        };
        (address, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };

    if host.is_empty() {
        return Err(format!("the host is missing, e.g. {UPSTREAM_EXAMPLE}"));
    }
    if !authority.starts_with('[')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    {
        return Err(format!(
            "`{host}` is not a host name or IP address, e.g. {UPSTREAM_EXAMPLE}"
        ));
    }
    let port = match port {
        None if tls => DEFAULT_HTTPS_PORT,
        None => DEFAULT_HTTP_PORT,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(format!("the port must be 1 to 65535, not `{port}`")),
        },
    };

    Ok(Upstream {
        // DNS names are case-insensitive; lower case makes the SNI and the comparisons predictable.
        host: host.to_ascii_lowercase(),
        port,
        tls,
    })
}

fn parse_methods(names: Vec<String>, setting: Setting<'_>) -> Result<Vec<Method>, ConfigError> {
    if names.is_empty() {
        return Err(setting.reject(
            "[]",
            format!(
                "give at least one method, e.g. {}",
                quoted_list(DEFAULT_GUARDED_METHODS)
            ),
        ));
    }
    let mut methods: Vec<Method> = Vec::with_capacity(names.len());
    for name in names {
        let method = Method::from_bytes(name.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| setting.reject(quoted(&name), "not an HTTP method, e.g. \"PUT\""))?;
        let read_only = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::CONNECT,
        ];
        if read_only.contains(&method) {
            return Err(setting.reject(
                quoted(&name),
                "a read-only method cannot be guarded; allowed: PUT, PATCH, DELETE, POST or another write method",
            ));
        }
        // A repeated method changes nothing, so it isn't worth an error.
        if !methods.contains(&method) {
            methods.push(method);
        }
    }
    Ok(methods)
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Parses and validates a TOML text; `origin` (the file path) is used in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        FileConfig::parse(text, origin)?.validate(origin, true, &Overrides::default())
    }

    /// Reads the `--config` file (if any), applies the command-line overrides and validates.
    /// The upstream is required, from the file or from `--upstream`.
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let overrides = Overrides {
            listen: &cli.listen,
            upstream: &cli.upstream,
        };
        match &cli.config {
            Some(path) => {
                let origin = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                FileConfig::parse(&text, &origin)?.validate(&origin, true, &overrides)
            }
            None => FileConfig::default().validate(NO_FILE, false, &overrides),
        }
    }

    /// A one-line human summary, for the startup log line and `--check`.
    pub fn summary(&self) -> String {
        let join = |items: Vec<String>| items.join(", ");
        let listen = join(self.server.listen.iter().map(|a| a.to_string()).collect());
        let upstreams = join(
            self.upstream
                .servers
                .iter()
                .map(|u| u.to_string())
                .collect(),
        );
        let methods = join(
            self.policy
                .guarded_methods
                .iter()
                .map(|m| m.to_string())
                .collect(),
        );
        let tls = match &self.server.tls {
            Some(tls) => format!(
                ", https {}",
                join(tls.listen.iter().map(|a| a.to_string()).collect())
            ),
            None => String::new(),
        };
        let routes = join(
            self.routes
                .iter()
                .map(|r| {
                    let servers = join(r.servers.iter().map(|u| u.to_string()).collect());
                    match &r.host {
                        Some(host) => format!("{host}{} -> {servers}", r.prefix),
                        None => format!("{} -> {servers}", r.prefix),
                    }
                })
                .collect(),
        );
        let routes = if routes.is_empty() {
            routes
        } else {
            format!("; routes {routes}")
        };
        let health = match self.upstream.health_check_interval {
            Some(every) => format!("health check every {}ms", every.as_millis()),
            None => "no health check".to_owned(),
        };
        format!(
            "listen {listen}{tls} ({threads} threads, {grace}s grace) -> upstream {upstreams}{rr} \
             (connect {connect}ms, read {read}ms, {health}){routes}; guarding {methods}, \
             If-Match {if_match}, conflict -> {status}; {store}",
            threads = self.server.threads,
            grace = self.server.grace_period_seconds,
            rr = if self.upstream.servers.len() > 1 {
                " round robin"
            } else {
                ""
            },
            connect = self.upstream.connect_timeout.as_millis(),
            read = self.upstream.read_timeout.as_millis(),
            if_match = if self.policy.require_if_match {
                "required"
            } else {
                "optional"
            },
            status = self.policy.conflict_status.as_u16(),
            store = match (self.store.kind, &self.store.url) {
                (StoreKind::Redis, Some(url)) => format!(
                    "redis store at {}, entries idle for {}s expire",
                    redacted(url),
                    self.store.idle_ttl.as_secs()
                ),
                _ => format!("memory store, {} entries", self.store.capacity),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const FILE: &str = "conf/test.toml";
    const UPSTREAM: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, FILE)
    }

    /// Parses `extra` after a valid [upstream] table.
    fn with_upstream(extra: &str) -> Result<Config, ConfigError> {
        parse(&format!("{UPSTREAM}{extra}"))
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("should be rejected").to_string()
    }

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("etag-gateway").chain(args.iter().copied()))
            .expect("valid command line")
    }

    /// A file in the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "etag-gateway-config-{}-{name}.toml",
                std::process::id()
            ));
            std::fs::write(&path, text).expect("write temp config");
            TempFile(path)
        }

        fn arg(&self) -> &str {
            self.0.to_str().expect("utf-8 temp path")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn defaults_apply_to_every_missing_key() {
        let config = parse(UPSTREAM).unwrap();
        assert_eq!(config.server, ServerConfig::default());
        assert_eq!(config.server.listen, vec![DEFAULT_LISTEN.parse().unwrap()]);
        assert_eq!(config.server.threads, DEFAULT_THREADS);
        assert_eq!(config.server.grace_period_seconds, 5);
        assert_eq!(
            config.upstream.servers,
            vec![Upstream {
                host: "127.0.0.1".into(),
                port: 3000,
                tls: false,
            }]
        );
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(1));
        assert_eq!(config.upstream.read_timeout, Duration::from_secs(30));
        assert_eq!(config.policy, PolicyConfig::default());
        assert_eq!(config.policy.conflict_status, StatusCode::CONFLICT);
        assert!(!config.policy.require_if_match);
        assert_eq!(
            config.policy.guarded_methods,
            vec![Method::PUT, Method::PATCH, Method::DELETE]
        );
        assert_eq!(config.store, StoreConfig::default());
        assert_eq!(config.store.kind, StoreKind::Memory);
        assert_eq!(config.store.capacity.get(), 1_000_000);
    }

    #[test]
    fn example_config_file_is_valid_and_spells_out_the_defaults() {
        let config = Config::from_toml(include_str!("../conf/gateway.toml"), "conf/gateway.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config, parse(UPSTREAM).unwrap());
    }

    #[test]
    fn every_key_is_read() {
        let config = parse(
            r#"
            [server]
            listen = "127.0.0.1:9000"
            threads = 8
            grace_period_seconds = 0
            [upstream]
            url = "http://backend.internal"
            connect_timeout_ms = 250
            read_timeout_ms = 60000
            [policy]
            conflict_status = 412
            require_if_match = true
            guarded_methods = ["post", "Put"]
            [store]
            kind = "memory"
            capacity = 10
            "#,
        )
        .unwrap();
        assert_eq!(
            config.server.listen,
            vec!["127.0.0.1:9000".parse().unwrap()]
        );
        assert_eq!(config.server.threads, 8);
        assert_eq!(config.server.grace_period_seconds, 0);
        assert_eq!(config.upstream.servers[0].address(), "backend.internal:80");
        assert_eq!(config.upstream.connect_timeout, Duration::from_millis(250));
        assert_eq!(config.upstream.read_timeout, Duration::from_secs(60));
        assert_eq!(
            config.policy.conflict_status,
            StatusCode::PRECONDITION_FAILED
        );
        assert!(config.policy.require_if_match);
        assert_eq!(
            config.policy.guarded_methods,
            vec![Method::POST, Method::PUT]
        );
        assert_eq!(config.store.capacity.get(), 10);
    }

    #[test]
    fn listen_and_url_take_one_value_or_a_list() {
        let one = with_upstream("[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(one.server.listen, vec!["127.0.0.1:1".parse().unwrap()]);

        let many = parse(
            r#"
            server.listen = ["127.0.0.1:1", "[::1]:2"]
            upstream.url = ["http://a:1", "http://[::1]:2/"]
            "#,
        )
        .unwrap();
        assert_eq!(
            many.server.listen,
            vec!["127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()]
        );
        let upstreams: Vec<String> = many
            .upstream
            .servers
            .iter()
            .map(|u| u.to_string())
            .collect();
        assert_eq!(upstreams, ["http://a:1", "http://[::1]:2"]);
        assert_eq!(many.upstream.servers[1].address(), "[::1]:2");
        assert_eq!(many.upstream.servers[1].host, "::1");

        let e = error(&format!("server.listen = 8080\n{UPSTREAM}"));
        assert!(e.contains("server.listen"), "{e}");
        assert!(
            e.contains("invalid type: integer `8080`, expected a string or an array of strings"),
            "{e}"
        );

        let one_method = with_upstream("[policy]\nguarded_methods = \"post\"\n").unwrap();
        assert_eq!(one_method.policy.guarded_methods, vec![Method::POST]);
    }

    #[test]
    fn conflict_status_412_is_accepted_and_410_rejected() {
        let config = with_upstream("[policy]\nconflict_status = 412\n").unwrap();
        assert_eq!(
            config.policy.conflict_status,
            StatusCode::PRECONDITION_FAILED
        );

        let e = with_upstream("[policy]\nconflict_status = 410\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "conf/test.toml: policy.conflict_status = 410 is not allowed (allowed: 409, 412)"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_allowed_ones() {
        let e = error(&format!("{UPSTREAM}[polcy]\nconflict_status = 409\n"));
        assert!(e.starts_with("conf/test.toml: "), "{e}");
        assert!(e.contains("polcy"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("`server`, `upstream`, `policy`, `store`"), "{e}");

        let e = error(&format!("{UPSTREAM}[store]\ncapacty = 5\n"));
        assert!(e.contains("`store.capacty`"), "{e}");
        assert!(e.contains("`kind`"), "{e}");
        assert!(e.contains("`capacity`"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key() {
        let e = error(&format!("{UPSTREAM}[server]\nthreads = \"two\"\n"));
        assert!(
            e.starts_with("conf/test.toml: in `server.threads`: "),
            "{e}"
        );
        assert!(e.contains("line 4"), "{e}");
        assert!(e.contains("expected an integer"), "{e}");

        let e = error(&format!("{UPSTREAM}[policy]\nrequire_if_match = \"yes\"\n"));
        assert!(e.contains("`policy.require_if_match`"), "{e}");

        let e = error("upstream = 3\n");
        assert!(e.contains("`upstream`"), "{e}");
    }

    #[test]
    fn invalid_toml_names_the_file_and_line() {
        let e = error("[server\n");
        assert!(e.starts_with("conf/test.toml: "), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    /// Every range and rule: the error names the file, the dotted key and what is allowed.
    #[test]
    fn each_bad_value_names_the_file_the_key_and_what_is_allowed() {
        let cases = [
            (
                "[server]\nlisten = \"localhost:80\"",
                "server.listen",
                "IP:port",
            ),
            ("[server]\nlisten = []", "server.listen", "at least one"),
            (
                "[server]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
                "server.listen",
                "twice",
            ),
            ("[server]\nthreads = 0", "server.threads", "1 to 1024"),
            ("[server]\nthreads = 1025", "server.threads", "1 to 1024"),
            (
                "[server]\ngrace_period_seconds = 3601",
                "server.grace_period_seconds",
                "0 to 3600",
            ),
            (
                "[server]\ngrace_period_seconds = -1",
                "server.grace_period_seconds",
                "0 to 3600",
            ),
            (
                "[upstream]\nconnect_timeout_ms = 0",
                "upstream.connect_timeout_ms",
                "1 to 3600000",
            ),
            (
                "[upstream]\nread_timeout_ms = 3600001",
                "upstream.read_timeout_ms",
                "1 to 3600000",
            ),
            (
                "[policy]\nguarded_methods = []",
                "policy.guarded_methods",
                "at least one",
            ),
            (
                "[policy]\nguarded_methods = [\"PUT\", \"get\"]",
                "policy.guarded_methods",
                "a read-only method cannot be guarded",
            ),
            (
                "[policy]\nguarded_methods = [\"CONNECT\"]",
                "policy.guarded_methods",
                "read-only",
            ),
            (
                "[policy]\nguarded_methods = [\"PU T\"]",
                "policy.guarded_methods",
                "not an HTTP method",
            ),
            (
                "[store]\nkind = \"disk\"",
                "store.kind",
                "allowed: \"memory\", \"redis\"",
            ),
            ("[store]\nkind = \"redis\"", "store.url", "required"),
            (
                "[store]\nkind = \"redis\"\nurl = \"rediss://h\"",
                "store.url",
                "not supported yet",
            ),
            (
                "[store]\nkind = \"redis\"\nurl = \"http://h\"",
                "store.url",
                "redis://",
            ),
            (
                "[store]\nurl = \"redis://h\"",
                "store.url",
                "only used with",
            ),
            (
                "[store]\nidle_ttl_seconds = 0",
                "store.idle_ttl_seconds",
                "1 to",
            ),
            ("[store]\ncapacity = 0", "store.capacity", "1 to 1000000000"),
            (
                "[store]\ncapacity = 1000000001",
                "store.capacity",
                "1 to 1000000000",
            ),
        ];
        for (text, key, allowed) in cases {
            // Keys of [upstream] are merged into the valid upstream table.
            let text = match text.strip_prefix("[upstream]\n") {
                Some(rest) => format!("{UPSTREAM}{rest}\n"),
                None => format!("{UPSTREAM}{text}\n"),
            };
            let e = error(&text);
            assert!(
                e.starts_with(&format!("{FILE}: {key} = ")),
                "{text:?} gave {e}"
            );
            assert!(e.contains("is not allowed"), "{text:?} gave {e}");
            assert!(e.contains(allowed), "{text:?} gave {e}");
        }
    }

    #[test]
    fn upstream_urls_must_be_http_or_https_host_and_port() {
        let ok = |url: &str| parse_upstream(url).map(|u| u.to_string());
        assert_eq!(
            ok("http://127.0.0.1:3000"),
            Ok("http://127.0.0.1:3000".into())
        );
        assert_eq!(
            ok("http://127.0.0.1:3000/"),
            Ok("http://127.0.0.1:3000".into())
        );
        assert_eq!(ok("HTTP://backend"), Ok("http://backend:80".into()));
        assert_eq!(ok("http://[::1]"), Ok("http://[::1]:80".into()));
        assert_eq!(ok("https://Backend"), Ok("https://backend:443".into()));
        assert_eq!(ok("HTTPS://x:8443/"), Ok("https://x:8443".into()));
        assert!(parse_upstream("https://x").unwrap().tls);
        assert!(!parse_upstream("http://x").unwrap().tls);

        let reason = |url: &str| parse_upstream(url).expect_err(url);
        assert!(reason("ftp://x").contains("only http:// or https:// URLs"));
        assert!(reason("127.0.0.1:3000").contains("only http:// or https:// URLs"));
        assert!(reason("https://x/api").contains("a path is not allowed"));
        assert!(reason("http://x/api").contains("a path is not allowed"));
        assert!(reason("http://x/?a=1").contains("query"));
        assert!(reason("http://x?a=1").contains("query"));
        assert!(reason("http://x#top").contains("fragment"));
        assert!(reason("http://user:pw@x").contains("user info"));
        assert!(reason("http://").contains("host is missing"));
        assert!(reason("http://:3000").contains("host is missing"));
        assert!(reason("http://x:0").contains("port"));
        assert!(reason("http://x:70000").contains("port"));
        assert!(reason("http://x:").contains("port"));
        assert!(reason("http://[::1").contains("closing"));
        assert!(reason("http://[nope]:1").contains("IPv6"));
        assert!(reason("http://a b").contains("not a host name"));

        let e = error("[upstream]\nurl = \"gopher://x\"\n");
        assert_eq!(
            e,
            "conf/test.toml: upstream.url = \"gopher://x\" is not allowed \
             (only http:// or https:// URLs, e.g. http://127.0.0.1:3000)"
        );
        let e = error("[upstream]\nurl = []\n");
        assert!(
            e.starts_with("conf/test.toml: upstream.url = [] is not allowed"),
            "{e}"
        );
    }

    #[test]
    fn an_upstream_is_required() {
        let e = error("[server]\nthreads = 1\n");
        assert!(
            e.starts_with("no upstream: give --upstream URL or [upstream] url in the config file"),
            "{e}"
        );
        assert!(e.contains(FILE), "{e}");

        let e = Config::from_cli(&cli(&[])).unwrap_err().to_string();
        assert_eq!(
            e,
            "no upstream: give --upstream URL or [upstream] url in the config file"
        );
    }

    #[test]
    fn flags_alone_are_enough() {
        let config = Config::from_cli(&cli(&[
            "--upstream",
            "http://10.0.0.1:3000",
            "--upstream",
            "http://10.0.0.2:3000",
            "--listen",
            "127.0.0.1:0",
        ]))
        .unwrap();
        assert_eq!(config.upstream.servers.len(), 2);
        assert_eq!(config.server.listen, vec!["127.0.0.1:0".parse().unwrap()]);
        assert_eq!(config.policy, PolicyConfig::default());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = TempFile::new(
            "override",
            "[server]\nlisten = \"0.0.0.0:1\"\nthreads = 3\n[upstream]\nurl = \"http://file:1\"\n",
        );
        let config = Config::from_cli(&cli(&[
            "--config",
            file.arg(),
            "--upstream",
            "http://flag:2",
            "--listen",
            "127.0.0.1:2",
            "--listen",
            "127.0.0.1:3",
        ]))
        .unwrap();
        assert_eq!(config.upstream.servers[0].to_string(), "http://flag:2");
        assert_eq!(config.upstream.servers.len(), 1);
        assert_eq!(
            config.server.listen,
            vec![
                "127.0.0.1:2".parse().unwrap(),
                "127.0.0.1:3".parse().unwrap()
            ]
        );
        // Keys without a flag still come from the file.
        assert_eq!(config.server.threads, 3);

        let from_file = Config::from_cli(&cli(&["--config", file.arg()])).unwrap();
        assert_eq!(from_file.upstream.servers[0].to_string(), "http://file:1");
    }

    #[test]
    fn an_upstream_flag_supplies_what_the_file_lacks() {
        let file = TempFile::new("no-upstream", "[server]\nthreads = 1\n");
        let config =
            Config::from_cli(&cli(&["--config", file.arg(), "--upstream", "http://x"])).unwrap();
        assert_eq!(config.upstream.servers[0].address(), "x:80");
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let e = Config::from_cli(&cli(&["--upstream", "ftp://x"]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--upstream: \"ftp://x\" is not allowed (only http:// or https:// URLs, e.g. http://127.0.0.1:3000)"
        );
        let e = Config::from_cli(&cli(&["--upstream", "http://x", "--listen", "nowhere"]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--listen: \"nowhere\" is not allowed"), "{e}");
    }

    #[test]
    fn file_errors_through_the_cli_name_the_file() {
        let file = TempFile::new("bad", "[policy]\nconflict_status = 410\n");
        let e = Config::from_cli(&cli(&["--config", file.arg(), "--upstream", "http://x"]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}: policy.conflict_status = 410 is not allowed (allowed: 409, 412)",
                file.arg()
            )
        );

        let missing = std::env::temp_dir().join("etag-gateway-no-such-config.toml");
        let e = Config::from_cli(&Cli {
            config: Some(missing.clone()),
            ..Cli::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!(
                "{}: cannot read the configuration file",
                missing.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let parsed = cli(&["--config", "x.toml", "--check"]);
        assert_eq!(parsed.config, Some(PathBuf::from("x.toml")));
        assert!(parsed.check);
    }

    #[test]
    fn summary_is_one_line_with_the_essentials() {
        let config = parse(include_str!("../conf/gateway.toml")).unwrap();
        let summary = config.summary();
        assert!(!summary.contains('\n'), "{summary}");
        for part in [
            "0.0.0.0:8080",
            "http://127.0.0.1:3000",
            "409",
            "PUT, PATCH, DELETE",
            "memory",
        ] {
            assert!(summary.contains(part), "{summary} lacks {part}");
        }
    }
}

#[cfg(test)]
mod health_check_path_tests {
    use super::*;

    const BASE: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

    #[test]
    fn an_http_check_path_is_taken_and_bad_ones_are_refused_by_name() {
        let c = Config::from_toml(
            &format!("{BASE}health_check_path = \"/health?deep=1\"\n"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c.upstream.health_check_path.as_deref(),
            Some("/health?deep=1")
        );
        for (bad, why) in [
            ("health", "absolute path"),
            ("/he alth", "absolute path"),
            ("http://x/health", "absolute path"),
        ] {
            let e = Config::from_toml(&format!("{BASE}health_check_path = \"{bad}\"\n"), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("upstream.health_check_path") && e.contains(why),
                "{bad}: {e}"
            );
        }
        let e = Config::from_toml(
            &format!("{BASE}health_check_interval_ms = 0\nhealth_check_path = \"/health\"\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("health checks are off"), "{e}");
    }
}

#[cfg(test)]
mod upgrade_sock_tests {
    use super::*;

    #[test]
    fn the_upgrade_socket_is_named_after_the_first_listen_address_unless_set() {
        let c = Config::from_toml("[server]\nlisten = [\"127.0.0.1:8080\", \"[::1]:8080\"]\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n", "t.toml").unwrap();
        assert_eq!(
            c.server.upgrade_sock,
            std::env::temp_dir().join("etag-gateway-127.0.0.1_8080.upgrade.sock")
        );
        let c = Config::from_toml("[server]\nupgrade_sock = \"/run/g/u.sock\"\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n", "t.toml").unwrap();
        assert_eq!(c.server.upgrade_sock, PathBuf::from("/run/g/u.sock"));
        assert_eq!(c.server.pid_file, PathBuf::from("/run/g/u.sock.pid"));
    }

    #[test]
    fn a_relative_or_too_long_upgrade_socket_is_refused_by_name() {
        let base = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[server]\n";
        let e = Config::from_toml(&format!("{base}upgrade_sock = \"run/u.sock\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml") && e.contains("server.upgrade_sock") && e.contains("absolute"),
            "{e}"
        );
        let long = format!("/{}", "d".repeat(120));
        let e = Config::from_toml(&format!("{base}upgrade_sock = \"{long}\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.upgrade_sock") && e.contains("107 bytes"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod timeout_hold_tests {
    use super::*;

    #[test]
    fn timeout_hold_defaults_to_the_read_timeout_and_can_be_set() {
        let base = "[upstream]\nurl = \"http://127.0.0.1:3000\"\nread_timeout_ms = 700\n";
        let c = Config::from_toml(base, "t.toml").unwrap();
        assert_eq!(c.upstream.timeout_hold, Duration::from_millis(700));
        let c = Config::from_toml(&format!("{base}timeout_hold_ms = 0\n"), "t.toml").unwrap();
        assert_eq!(c.upstream.timeout_hold, Duration::ZERO);
        let e = Config::from_toml(&format!("{base}timeout_hold_ms = -5\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml") && e.contains("upstream.timeout_hold_ms"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    const UPSTREAM: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

    #[test]
    fn redis_store_with_url_and_ttl() {
        let text = format!("{UPSTREAM}[store]\nkind = \"redis\"\nurl = \"redis://:secret@10.0.0.5:6380/2\"\nidle_ttl_seconds = 60\n");
        let c = Config::from_toml(&text, "r.toml").unwrap();
        assert_eq!(c.store.kind, StoreKind::Redis);
        assert_eq!(
            c.store.url.as_deref(),
            Some("redis://:secret@10.0.0.5:6380/2")
        );
        assert_eq!(c.store.idle_ttl, Duration::from_secs(60));
        let summary = c.summary();
        assert!(
            summary.contains("redis store at redis://***@10.0.0.5:6380/2"),
            "{summary}"
        );
        assert!(!summary.contains("secret"));
    }
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    const BASE: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

    fn limits(extra: &str) -> Result<LimitsConfig, String> {
        Config::from_toml(&format!("{BASE}[limits]\n{extra}"), "t.toml")
            .map(|c| c.limits)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn limits_have_defaults() {
        let l = Config::from_toml(BASE, "t.toml").unwrap().limits;
        assert_eq!(l, LimitsConfig::default());
        assert_eq!(l.max_header_bytes, 32_768);
        assert_eq!(l.max_etags, 16);
        assert_eq!(l.max_etag_length, 256);
        assert_eq!(l.max_body_bytes, None, "0 = off");
        assert_eq!(l.header_read_timeout, Duration::from_secs(10));
    }

    #[test]
    fn every_limit_is_read() {
        let l = limits(
            "max_header_bytes = 4096\nmax_etags = 2\nmax_etag_length = 100\n\
             max_body_bytes = 1000\nheader_read_timeout_ms = 1000\n",
        )
        .unwrap();
        assert_eq!(
            l,
            LimitsConfig {
                max_header_bytes: 4096,
                max_etags: 2,
                max_etag_length: 100,
                max_body_bytes: Some(1000),
                header_read_timeout: Duration::from_secs(1),
            }
        );
        assert_eq!(limits("max_body_bytes = 0\n").unwrap().max_body_bytes, None);
    }

    #[test]
    fn a_bad_limit_names_the_file_the_key_and_the_range() {
        for (line, key, allowed) in [
            (
                "max_header_bytes = 100",
                "limits.max_header_bytes",
                "1024 to 1048575",
            ),
            (
                "max_header_bytes = 2000000",
                "limits.max_header_bytes",
                "1024 to 1048575",
            ),
            ("max_etags = 0", "limits.max_etags", "1 to 1024"),
            (
                "max_etag_length = 10",
                "limits.max_etag_length",
                "64 to 65536",
            ),
            (
                "max_body_bytes = -1",
                "limits.max_body_bytes",
                "0 to 1099511627776",
            ),
            (
                "header_read_timeout_ms = 0",
                "limits.header_read_timeout_ms",
                "1 to 3600000",
            ),
        ] {
            let e = limits(&format!("{line}\n")).expect_err(line);
            assert!(e.starts_with(&format!("t.toml: {key} = ")), "{line}: {e}");
            assert!(e.contains(allowed), "{line}: {e}");
        }
        let e = limits("max_header_byte = 1\n").unwrap_err();
        assert!(
            e.contains("max_header_byte") && e.contains("`max_header_bytes`"),
            "{e}"
        );
        let e = limits("max_etags = \"many\"\n").unwrap_err();
        assert!(
            e.contains("`limits.max_etags`") && e.contains("an integer"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod admin_log_tests {
    use super::*;

    const UPSTREAM: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

    fn err(text: &str) -> String {
        Config::from_toml(&format!("{UPSTREAM}{text}"), "a.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn admin_and_log_sections() {
        let c = Config::from_toml(
            &format!("{UPSTREAM}[admin]\nlisten = \"127.0.0.1:9091\"\ntoken = \"0123456789abcdef\"\n[log]\naccess = true\nformat = \"json\"\n"),
            "a.toml",
        )
        .unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:9091".parse().unwrap()));
        assert_eq!(c.admin.token.as_deref(), Some("0123456789abcdef"));
        assert!(c.log.access && c.log.json);
        let c = Config::from_toml(UPSTREAM, "a.toml").unwrap();
        assert_eq!(c.admin, AdminConfig::default());
        assert!(!c.log.access);
    }

    #[test]
    fn admin_and_log_errors_name_the_key() {
        let e = err("[admin]\nlisten = \"nowhere\"\n");
        assert!(e.contains("a.toml") && e.contains("admin.listen"), "{e}");
        let e = err("[admin]\nlisten = \"0.0.0.0:8080\"\n");
        assert!(e.contains("must differ from server.listen"), "{e}");
        let e = err("[admin]\nlisten = \"127.0.0.1:9091\"\ntoken = \"short\"\n");
        assert!(e.contains("admin.token") && !e.contains("short\""), "{e}");
        let e = err("[admin]\ntoken = \"0123456789abcdef\"\n");
        assert!(e.contains("needs admin.listen"), "{e}");
        let e = err("[log]\nformat = \"xml\"\n");
        assert!(e.contains("log.format") && e.contains("json"), "{e}");
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    const BASE: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::from_toml(&format!("{BASE}{extra}"), "r.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn no_route_by_default_and_health_checks_every_second() {
        let c = parse("").unwrap();
        assert!(c.routes.is_empty());
        assert_eq!(
            c.upstream.health_check_interval,
            Some(Duration::from_secs(1))
        );
        let c = parse("[upstream]\n").unwrap_err();
        assert!(
            c.contains("upstream"),
            "a second [upstream] is a TOML error: {c}"
        );
        let c = Config::from_toml(
            "[upstream]\nurl = \"http://x\"\nhealth_check_interval_ms = 0\n",
            "r.toml",
        )
        .unwrap();
        assert_eq!(c.upstream.health_check_interval, None, "0 = off");
    }

    #[test]
    fn a_route_inherits_what_it_does_not_set() {
        let c = parse(
            "[policy]\nconflict_status = 412\nguarded_methods = [\"PUT\"]\n\
             [[route]]\nprefix = \"/a/\"\nhost = \"API.Example.com.\"\n\
             upstream = [\"http://10.0.0.1:1\", \"https://b.example:2\"]\n\
             [[route]]\nprefix = \"/b\"\nupstream = \"http://10.0.0.3\"\n\
             conflict_status = 409\nrequire_if_match = true\nguarded_methods = [\"post\", \"PUT\"]\n\
             connect_timeout_ms = 5\nread_timeout_ms = 6\n",
        )
        .unwrap();
        assert_eq!(c.routes.len(), 2);
        let a = &c.routes[0];
        assert_eq!(a.prefix, "/a", "trailing slash dropped");
        assert_eq!(a.host.as_deref(), Some("api.example.com"));
        assert_eq!(a.servers.len(), 2);
        assert!(a.servers[1].tls);
        assert_eq!(a.policy, c.policy, "[policy] inherited");
        assert_eq!(a.connect_timeout, c.upstream.connect_timeout);
        assert_eq!(a.read_timeout, c.upstream.read_timeout);
        let b = &c.routes[1];
        assert_eq!(b.policy.conflict_status, StatusCode::CONFLICT);
        assert!(b.policy.require_if_match);
        assert_eq!(b.policy.guarded_methods, vec![Method::POST, Method::PUT]);
        assert_eq!(b.connect_timeout, Duration::from_millis(5));
        assert_eq!(b.read_timeout, Duration::from_millis(6));
        let summary = c.summary();
        assert!(
            summary.contains("routes api.example.com/a -> http://10.0.0.1:1, https://b.example:2, /b -> http://10.0.0.3:80"),
            "{summary}"
        );
    }

    #[test]
    fn route_errors_name_the_route_and_the_key() {
        for (route, expected) in [
            (
                "prefix = \"/a\"\nupstream = \"http://x\"\nconflict_status = 410",
                "r.toml: route[2].conflict_status = 410 is not allowed (allowed: 409, 412)",
            ),
            (
                "prefix = \"/a\"\nupstream = \"http://x\"\nguarded_methods = [\"GET\"]",
                "r.toml: route[2].guarded_methods = \"GET\" is not allowed (a read-only method",
            ),
            (
                "prefix = \"/a\"\nupstream = \"http://x\"\nguarded_methods = []",
                "r.toml: route[2].guarded_methods = [] is not allowed (give at least one method",
            ),
            (
                "upstream = \"http://x\"",
                "r.toml: route[2].prefix = (missing) is not allowed (required",
            ),
            (
                "prefix = \"api\"\nupstream = \"http://x\"",
                "r.toml: route[2].prefix = \"api\" is not allowed (a path starting with `/`",
            ),
            (
                "prefix = \"/a/./b\"\nupstream = \"http://x\"",
                "r.toml: route[2].prefix = \"/a/./b\" is not allowed (not in canonical form",
            ),
            (
                "prefix = \"/a?x=1\"\nupstream = \"http://x\"",
                "r.toml: route[2].prefix = \"/a?x=1\" is not allowed (a path only",
            ),
            (
                "prefix = \"/a\"",
                "r.toml: route[2].upstream = (missing) is not allowed (required",
            ),
            (
                "prefix = \"/a\"\nupstream = \"ftp://x\"",
                "r.toml: route[2].upstream = \"ftp://x\" is not allowed (only http:// or https://",
            ),
            (
                "prefix = \"/a\"\nupstream = []",
                "r.toml: route[2].upstream = [] is not allowed",
            ),
            (
                "prefix = \"/a\"\nhost = \"a.example:80\"\nupstream = \"http://x\"",
                "r.toml: route[2].host = \"a.example:80\" is not allowed (a host name without port",
            ),
            (
                "prefix = \"/a\"\nhost = \"a b\"\nupstream = \"http://x\"",
                "r.toml: route[2].host = \"a b\" is not allowed",
            ),
            (
                "prefix = \"/a\"\nupstream = \"http://x\"\nread_timeout_ms = 0",
                "r.toml: route[2].read_timeout_ms = 0 is not allowed (allowed: 1 to 3600000)",
            ),
            (
                "prefix = \"/a\"\nupstream = \"http://x\"\nconnect_timeout_ms = -1",
                "r.toml: route[2].connect_timeout_ms = -1 is not allowed (allowed: 1 to 3600000)",
            ),
            (
                "prefix = \"/a\"\nupstream = \"http://x\"\nca_file = \"/nonexistent/ca.pem\"",
                "r.toml: route[2].ca_file = \"/nonexistent/ca.pem\" is not allowed (only used with https:// upstreams)",
            ),
            (
                "prefix = \"/a\"\nupstream = \"https://x\"\nca_file = \"/nonexistent/ca.pem\"",
                "r.toml: route[2].ca_file = \"/nonexistent/ca.pem\" is not allowed (cannot read it",
            ),
            (
                "prefix = \"/z\"\nupstream = \"http://x\"",
                "r.toml: route[2].prefix = \"/z\" is not allowed (route[1] has the same prefix and host",
            ),
        ] {
            let text = format!(
                "[[route]]\nprefix = \"/z\"\nupstream = \"http://y\"\n[[route]]\n{route}\n"
            );
            let e = parse(&text).expect_err(route);
            assert!(e.starts_with(expected), "{route:?}:\n  got {e}\n  not {expected}");
        }
    }

    #[test]
    fn an_unknown_route_key_names_the_route() {
        let e = parse(
            "[[route]]\nprefix = \"/a\"\nupstream = \"http://x\"\n[[route]]\nprefx = \"/b\"\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("r.toml: in `route[2].prefx`: ") && e.contains("unknown field"),
            "{e}"
        );
        let e = parse(
            "[[route]]\nprefix = \"/a\"\nupstream = \"http://x\"\nrequire_if_match = \"yes\"\n",
        )
        .unwrap_err();
        assert!(e.contains("`route[1].require_if_match`"), "{e}");
    }

    #[test]
    fn the_same_prefix_with_and_without_host_is_two_routes() {
        let c = parse(
            "[[route]]\nprefix = \"/a\"\nupstream = \"http://x\"\n\
             [[route]]\nprefix = \"/a\"\nhost = \"h\"\nupstream = \"http://y\"\n",
        )
        .unwrap();
        assert_eq!(c.routes.len(), 2);
    }

    #[test]
    fn prefixes_must_be_canonical() {
        assert_eq!(parse_prefix("/"), Ok("/".to_owned()));
        assert_eq!(parse_prefix("/api"), Ok("/api".to_owned()));
        assert_eq!(parse_prefix("/api/"), Ok("/api".to_owned()));
        assert_eq!(parse_prefix("/api/v1"), Ok("/api/v1".to_owned()));
        for bad in ["//api", "/api//v1", "/a/../b", "/%61pi", "/a b", "api", ""] {
            assert!(parse_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(parse_prefix("/a/../b")
            .unwrap_err()
            .contains("write \"/b\""));
    }

    #[test]
    fn route_hosts() {
        assert_eq!(
            parse_route_host("Api.Example.COM"),
            Ok("api.example.com".to_owned())
        );
        assert_eq!(parse_route_host("[::1]"), Ok("[::1]".to_owned()));
        assert_eq!(parse_route_host("10.0.0.1"), Ok("10.0.0.1".to_owned()));
        for bad in ["", "a:1", "::1", "[nope]", "a/b"] {
            assert!(parse_route_host(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    /// A directory with a self-signed certificate and its key (and an unrelated key), removed on drop.
    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(name: &str) -> Files {
            let dir = std::env::temp_dir().join(format!(
                "etag-gateway-tls-test-{name}-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let other = rcgen::KeyPair::generate().unwrap();
            std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
            std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
            std::fs::write(dir.join("other-key.pem"), other.serialize_pem()).unwrap();
            std::fs::write(dir.join("empty.pem"), "nothing here\n").unwrap();
            Files { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.join(name).display().to_string()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_toml(text, "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn tls_listener_with_cert_and_key() {
        let f = Files::new("listener");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\ntls_listen = [\"127.0.0.1:8443\"]\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n[upstream]\nurl = \"http://x\"\n",
            f.path("cert.pem"),
            f.path("key.pem")
        );
        let c = parse(&text).unwrap();
        let tls = c.server.tls.as_ref().unwrap();
        assert_eq!(tls.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(tls.cert, PathBuf::from(f.path("cert.pem")));
        assert!(
            c.summary().contains("https 127.0.0.1:8443"),
            "{}",
            c.summary()
        );
        assert_eq!(
            parse("[upstream]\nurl = \"http://x\"\n")
                .unwrap()
                .server
                .tls,
            None
        );
    }

    #[test]
    fn tls_listener_errors_name_the_key() {
        let f = Files::new("errors");
        let (cert, key) = (f.path("cert.pem"), f.path("key.pem"));
        let server = |lines: String| {
            format!(
                "[server]\nlisten = \"127.0.0.1:8080\"\n{lines}[upstream]\nurl = \"http://x\"\n"
            )
        };
        for (lines, expected) in [
            (
                format!("tls_listen = \"127.0.0.1:8443\"\ntls_key = \"{key}\"\n"),
                "t.toml: server.tls_cert = (missing) is not allowed (required with server.tls_listen".to_owned(),
            ),
            (
                format!("tls_listen = \"127.0.0.1:8443\"\ntls_cert = \"{cert}\"\n"),
                "t.toml: server.tls_key = (missing) is not allowed (required with server.tls_listen".to_owned(),
            ),
            (
                format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"),
                format!("t.toml: server.tls_cert = \"{cert}\" is not allowed (only used with server.tls_listen)"),
            ),
            (
                format!("tls_listen = \"127.0.0.1:8080\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"),
                "t.toml: server.tls_listen = \"127.0.0.1:8080\" is not allowed (must differ from server.listen".to_owned(),
            ),
            (
                format!("tls_listen = \"nowhere\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"),
                "t.toml: server.tls_listen = \"nowhere\" is not allowed".to_owned(),
            ),
            (
                format!("tls_listen = \"127.0.0.1:8443\"\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"{key}\"\n"),
                "t.toml: server.tls_cert = \"/nonexistent.pem\" is not allowed (cannot read it".to_owned(),
            ),
            (
                format!("tls_listen = \"127.0.0.1:8443\"\ntls_cert = \"{}\"\ntls_key = \"{key}\"\n", f.path("empty.pem")),
                format!("t.toml: server.tls_cert = \"{}\" is not allowed (no certificate in it", f.path("empty.pem")),
            ),
            (
                format!("tls_listen = \"127.0.0.1:8443\"\ntls_cert = \"{cert}\"\ntls_key = \"{cert}\"\n"),
                format!("t.toml: server.tls_key = \"{cert}\" is not allowed (no PEM private key"),
            ),
            (
                format!("tls_listen = \"127.0.0.1:8443\"\ntls_cert = \"{cert}\"\ntls_key = \"{}\"\n", f.path("other-key.pem")),
                format!("t.toml: server.tls_key = \"{}\" is not allowed (not usable with server.tls_cert", f.path("other-key.pem")),
            ),
        ] {
            let e = parse(&server(lines.clone())).expect_err(&lines);
            assert!(e.starts_with(&expected), "{lines:?}:\n  got {e}\n  not {expected}");
        }
        let e = parse(&format!(
            "[server]\ntls_listen = \"127.0.0.1:8443\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\
             [upstream]\nurl = \"http://x\"\n[admin]\nlisten = \"127.0.0.1:8443\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("admin.listen") && e.contains("must differ"),
            "{e}"
        );
    }

    #[test]
    fn ca_files_are_checked_and_inherited() {
        let f = Files::new("ca");
        let ca = f.path("cert.pem");
        let c = parse(&format!(
            "[upstream]\nurl = \"http://x\"\nca_file = \"{ca}\"\n\
             [[route]]\nprefix = \"/s\"\nupstream = \"https://localhost:8443\"\n"
        ))
        .unwrap();
        assert_eq!(c.upstream.ca_file, Some(PathBuf::from(&ca)));
        assert_eq!(c.routes[0].ca_file, Some(PathBuf::from(&ca)), "inherited");

        let e = parse(&format!(
            "[upstream]\nurl = \"http://x\"\nca_file = \"{ca}\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            e,
            format!("t.toml: upstream.ca_file = \"{ca}\" is not allowed (only used with https:// upstreams)")
        );
        let empty = f.path("empty.pem");
        let e = parse(&format!(
            "[upstream]\nurl = \"https://x\"\nca_file = \"{empty}\"\n"
        ))
        .unwrap_err();
        assert!(
            e.starts_with(&format!(
                "t.toml: upstream.ca_file = \"{empty}\" is not allowed (no certificate"
            )),
            "{e}"
        );
        let key = f.path("key.pem");
        let e = parse(&format!(
            "[upstream]\nurl = \"https://x\"\nca_file = \"{key}\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("upstream.ca_file") && e.contains("no certificate"),
            "{e}"
        );
    }

    #[test]
    fn health_check_interval_is_range_checked() {
        let e =
            parse("[upstream]\nurl = \"http://x\"\nhealth_check_interval_ms = -1\n").unwrap_err();
        assert_eq!(
            e,
            "t.toml: upstream.health_check_interval_ms = -1 is not allowed (allowed: 0 to 3600000)"
        );
    }
}
