//! The backends: which route a request takes, choosing one of that route's servers, and asking one
//! whether a resource exists.
//!
//! A route is a path prefix (matched on whole segments of the canonical resource key), optionally a
//! host, its servers (round robin, skipping those the TCP health check found refusing connections),
//! its timeouts and TLS trust, and its policy. The default route (`[upstream]` and `[policy]`)
//! takes every request no `[[route]]` claims. Routes only choose where a request goes and how it is
//! judged: the etag table is one, keyed by the canonical path, whatever the route.
//!
//! TLS to a backend (`https://`) always verifies its certificate against the name in the URL (also
//! sent as SNI), with the system's CAs or the route's `ca_file`. There is no way to turn it off.

use crate::config::{Config, PolicyConfig, RouteConfig, Upstream};
use crate::resource_key::ResourceKey;
use anyhow::Context;
use pingora::connectors::http::Connector;
use pingora::lb::health_check::TcpHealthCheck;
use pingora::lb::{selection::RoundRobin, Backend, LoadBalancer};
use pingora::prelude::*;
use pingora::protocols::tls::CaType;
use pingora::services::background::{background_service, GenBackgroundService};
use pingora::utils::tls::{parse_x509, WrappedX509};
use pingora::ErrorType;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Idle upstream connections are dropped before common backend keep-alive timeouts (Node: 5 s) close
/// them: a write sent on a connection the backend is closing has an unknown outcome.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The index of a route in [`Upstreams`]; `RouteId::default()` is the default route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteId(usize);

/// The health-check services of the routes' server lists, to be added to the Pingora server.
pub type HealthChecks = Vec<GenBackgroundService<LoadBalancer<RoundRobin>>>;

/// One route: where its requests go and under which policy.
pub struct Route {
    prefix: String,
    host: Option<String>,
    servers: Arc<LoadBalancer<RoundRobin>>,
    /// Each resolved server address with its timeouts and TLS, built once: a request clones its
    /// server's (building one costs a string round trip of the address and the option setting).
    peers: HashMap<SocketAddr, HttpPeer>,
    connect_timeout: Duration,
    read_timeout: Duration,
    pub policy: PolicyConfig,
}

pub struct Upstreams {
    /// `routes[0]` is the default route.
    routes: Vec<Route>,
    /// The other routes, in the order they are tried: longest prefix first, with a host before
    /// without.
    order: Vec<usize>,
    /// Connections for the gateway's own requests (existence probes).
    connector: Connector,
}

/// What a backend said about a resource's existence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existence {
    Exists,
    Absent,
    /// Any other answer, or none: the gateway cannot tell.
    Unknown,
}

/// The certificates of a PEM CA file, each checked to be usable as a trust anchor. The error is the
/// reason shown to the user.
pub fn load_ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it (PEM, \"-----BEGIN CERTIFICATE-----\")".to_owned());
    }
    let mut store = pingora::tls::RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|e| format!("a certificate in it is not usable as a CA: {e}"))?;
    }
    Ok(certs)
}

/// Whether `key` is `prefix` or below it, on whole segments (`/api` covers `/api/x`, not `/apix`).
fn covers(prefix: &str, key: &str) -> bool {
    prefix == "/"
        || key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The request's host, lower case, without port and trailing dot: the URI's authority (HTTP/2
/// `:authority`, or an absolute-form target), else the `Host` header.
pub fn request_host(req: &RequestHeader) -> Option<String> {
    let raw = match req.uri.authority() {
        Some(authority) => authority.as_str(),
        None => req.headers.get(http::header::HOST)?.to_str().ok()?,
    };
    // user@ cannot appear in Host; in an authority it is not part of the host.
    let raw = raw.rsplit('@').next().unwrap_or(raw).trim();
    let host = if raw.starts_with('[') {
        // [v6] or [v6]:port
        &raw[..=raw.find(']')?]
    } else {
        raw.split(':').next().unwrap_or(raw)
    };
    let host = host.trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

impl Route {
    /// Builds a route and, when `health_check` is set, the background service that checks its servers.
    fn build(
        config: &RouteConfig,
        health_check: Option<Duration>,
    ) -> anyhow::Result<(
        Route,
        Option<GenBackgroundService<LoadBalancer<RoundRobin>>>,
    )> {
        let ca = match &config.ca_file {
            Some(path) => {
                let certs = load_ca_certificates(path)
                    .map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?;
                let wrapped: Vec<WrappedX509> = certs
                    .iter()
                    .map(|cert| WrappedX509::new(cert.to_vec(), parse_x509))
                    .collect();
                Some(Arc::from(wrapped))
            }
            None => None,
        };
        let mut peers = HashMap::new();
        for server in &config.servers {
            let resolved = server
                .address()
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve the upstream {server}"))?;
            for addr in resolved {
                peers.insert(addr, configured_peer(addr, server, config, ca.as_ref()));
            }
        }
        if peers.is_empty() {
            anyhow::bail!(
                "the upstreams of route {} resolve to no address",
                config.prefix
            );
        }
        let mut servers = LoadBalancer::<RoundRobin>::try_from_iter(peers.keys().copied())
            .context("cannot build the upstream list")?;
        let (servers, service) = match health_check {
            Some(every) => {
                // A plain TCP connect, also for https:// servers: the question is only whether the
                // server accepts connections (certificate problems show up as 502 on requests).
                let mut check = TcpHealthCheck::new();
                check.peer_template.options.connection_timeout = Some(config.connect_timeout);
                servers.set_health_check(check);
                servers.health_check_frequency = Some(every);
                let name = match &config.host {
                    Some(host) => format!("health check {host}{}", config.prefix),
                    None => format!("health check {}", config.prefix),
                };
                let service = background_service(&name, servers);
                (service.task(), Some(service))
            }
            None => (Arc::new(servers), None),
        };
        let route = Route {
            prefix: config.prefix.clone(),
            host: config.host.clone(),
            servers,
            peers,
            connect_timeout: config.connect_timeout,
            read_timeout: config.read_timeout,
            policy: config.policy.clone(),
        };
        Ok((route, service))
    }

    /// The next server, round robin among the healthy ones, with the route's timeouts and TLS.
    fn peer(&self) -> Result<HttpPeer> {
        let backend = self
            .servers
            .select(b"", 256)
            // None healthy: try them anyway rather than refuse (the check may be wrong, or the
            // servers back before it noticed). A dead one answers 502 as it would without checks.
            .or_else(|| self.servers.select_with(b"", 256, |_, _| true))
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no upstream available"))?;
        self.peer_for(&backend)
    }

    fn peer_for(&self, backend: &Backend) -> Result<HttpPeer> {
        backend
            .addr
            .as_inet()
            .and_then(|addr| self.peers.get(addr))
            .cloned()
            // The balancer only holds the addresses the peers were built for.
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("no upstream configured for {}", backend.addr),
                )
            })
    }
}

/// The peer for one resolved address of a server: the route's timeouts, and for https:// the
/// certificate verified against the URL's host (also the SNI), with the route's CAs if it has them.
fn configured_peer(
    addr: SocketAddr,
    server: &Upstream,
    route: &RouteConfig,
    ca: Option<&Arc<CaType>>,
) -> HttpPeer {
    let sni = if server.tls {
        server.host.clone()
    } else {
        String::new()
    };
    let mut peer = HttpPeer::new(addr, server.tls, sni);
    peer.options.connection_timeout = Some(route.connect_timeout);
    peer.options.read_timeout = Some(route.read_timeout);
    peer.options.write_timeout = Some(route.read_timeout);
    peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
    if server.tls {
        // Pingora's defaults, stated: the certificate and its name are always verified.
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        peer.options.ca = ca.cloned();
    }
    peer
}

impl Upstreams {
    /// The default route (`[upstream]`, `[policy]`) and every `[[route]]`, with the health-check
    /// services to run (none when `upstream.health_check_interval_ms = 0`). Resolves host names
    /// once, now (blocking).
    pub fn new(config: &Config) -> anyhow::Result<(Upstreams, HealthChecks)> {
        let default = RouteConfig {
            prefix: "/".to_owned(),
            host: None,
            servers: config.upstream.servers.clone(),
            connect_timeout: config.upstream.connect_timeout,
            read_timeout: config.upstream.read_timeout,
            ca_file: config.upstream.ca_file.clone(),
            policy: config.policy.clone(),
        };
        let every = config.upstream.health_check_interval;
        let mut routes = Vec::with_capacity(config.routes.len() + 1);
        let mut checks = Vec::new();
        for route in std::iter::once(&default).chain(&config.routes) {
            let (route, check) = Route::build(route, every)?;
            routes.push(route);
            checks.extend(check);
        }
        let mut order: Vec<usize> = (1..routes.len()).collect();
        // Longest prefix first (more segments, then more bytes); for the same prefix, a route with
        // a host before one without. The sort is stable: otherwise file order.
        order.sort_by_key(|&i| {
            let r: &Route = &routes[i];
            let segments = r.prefix.split('/').filter(|s| !s.is_empty()).count();
            (
                std::cmp::Reverse(segments),
                std::cmp::Reverse(r.prefix.len()),
                r.host.is_none(),
            )
        });
        let upstreams = Upstreams {
            routes,
            order,
            connector: Connector::new(None),
        };
        Ok((upstreams, checks))
    }

    /// The route of a request for `key` with the given host (see [`request_host`]).
    pub fn route_for(&self, host: Option<&str>, key: &ResourceKey) -> RouteId {
        self.order
            .iter()
            .copied()
            .find(|&i| {
                let route = &self.routes[i];
                covers(&route.prefix, key.as_str())
                    && route.host.as_deref().is_none_or(|h| Some(h) == host)
            })
            .map_or(RouteId::default(), RouteId)
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id.0]
    }

    /// The policy requests on the route are judged by.
    pub fn policy(&self, id: RouteId) -> &PolicyConfig {
        &self.route(id).policy
    }

    /// The route's next backend, round robin among the healthy ones, with its timeouts and TLS.
    pub fn peer(&self, id: RouteId) -> Result<HttpPeer> {
        self.route(id).peer()
    }

    /// The longest connect and read timeouts of any route: bounds of how long a write can take.
    pub fn longest_timeouts(&self) -> (Duration, Duration) {
        self.routes
            .iter()
            .fold((Duration::ZERO, Duration::ZERO), |(c, r), route| {
                (c.max(route.connect_timeout), r.max(route.read_timeout))
            })
    }

    /// `HEAD path` on one of the route's backends: does the resource exist? Used for
    /// `If-None-Match: *` on a resource the gateway has never seen, while the write's reservation
    /// keeps other writes out.
    pub async fn probe(&self, id: RouteId, path_and_query: &str, host: Option<&[u8]>) -> Existence {
        match self.head_status(id, path_and_query, host).await {
            Ok(status) if (200..300).contains(&status) => Existence::Exists,
            Ok(404 | 410) => Existence::Absent,
            Ok(status) => {
                tracing::warn!(
                    status,
                    path = path_and_query,
                    "existence probe: unexpected answer"
                );
                Existence::Unknown
            }
            Err(e) => {
                tracing::warn!(error = %e, path = path_and_query, "existence probe failed");
                Existence::Unknown
            }
        }
    }

    async fn head_status(
        &self,
        id: RouteId,
        path_and_query: &str,
        host: Option<&[u8]>,
    ) -> Result<u16> {
        let peer = self.peer(id)?;
        let (mut session, _reused) = self.connector.get_http_session(&peer).await?;
        let mut req = RequestHeader::build("HEAD", path_and_query.as_bytes(), None)?;
        if let Some(host) = host {
            req.insert_header("Host", host)?;
        }
        session.write_request_header(Box::new(req)).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let status = session
            .response_header()
            .map(|h| h.status.as_u16())
            .unwrap_or(0);
        // HEAD has no body: the connection can go back to the pool.
        self.connector
            .release_http_session(session, &peer, Some(UPSTREAM_IDLE_TIMEOUT))
            .await;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;

    #[test]
    fn prefixes_cover_whole_segments() {
        assert!(covers("/api", "/api"));
        assert!(covers("/api", "/api/x"));
        assert!(covers("/api", "/api/x/y"));
        assert!(!covers("/api", "/apix"));
        assert!(!covers("/api", "/ap"));
        assert!(!covers("/api/v1", "/api"));
        assert!(covers("/", "/"));
        assert!(covers("/", "/anything"));
    }

    fn header(host: Option<&str>, target: &str) -> RequestHeader {
        let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
        if let Some(host) = host {
            req.insert_header("Host", host).unwrap();
        }
        req
    }

    #[test]
    fn the_request_host_loses_its_port_and_case() {
        let host = |h: &str| request_host(&header(Some(h), "/x"));
        assert_eq!(host("API.Example.com").as_deref(), Some("api.example.com"));
        assert_eq!(
            host("api.example.com:8080").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(host("api.example.com.").as_deref(), Some("api.example.com"));
        assert_eq!(host("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(host("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        assert_eq!(request_host(&header(None, "/x")), None);
        // An absolute-form target (or HTTP/2's :authority) wins over Host.
        let mut absolute = header(Some("other"), "/x");
        absolute.set_uri("http://API.example.com:81/x".parse().unwrap());
        assert_eq!(request_host(&absolute).as_deref(), Some("api.example.com"));
    }

    fn config(routes: &str) -> Config {
        let text = format!(
            "[upstream]\nurl = \"http://127.0.0.1:3000\"\nhealth_check_interval_ms = 0\n{routes}"
        );
        Config::from_toml(&text, "t.toml").unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_a_host_beats_none() {
        let config = config(
            "[[route]]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:3001\"\n\
             [[route]]\nprefix = \"/a/b\"\nupstream = \"http://127.0.0.1:3002\"\n\
             [[route]]\nprefix = \"/a\"\nhost = \"api.example.com\"\nupstream = \"http://127.0.0.1:3003\"\n\
             [[route]]\nprefix = \"/\"\nhost = \"api.example.com\"\nupstream = \"http://127.0.0.1:3004\"\n",
        );
        let (upstreams, checks) = Upstreams::new(&config).unwrap();
        assert!(checks.is_empty(), "health_check_interval_ms = 0: no checks");
        let port = |host: Option<&str>, path: &str| {
            let id = upstreams.route_for(host, &ResourceKey::from_path(path));
            upstreams
                .peer(id)
                .unwrap()
                .address()
                .as_inet()
                .unwrap()
                .port()
        };
        assert_eq!(port(None, "/other"), 3000);
        assert_eq!(port(None, "/a"), 3001);
        assert_eq!(port(None, "/a/x"), 3001);
        assert_eq!(port(None, "/ab"), 3000);
        assert_eq!(port(None, "/a/b/c"), 3002);
        assert_eq!(port(Some("api.example.com"), "/a/x"), 3003);
        assert_eq!(
            port(Some("api.example.com"), "/a/b"),
            3002,
            "longer prefix first"
        );
        assert_eq!(port(Some("api.example.com"), "/z"), 3004);
        assert_eq!(port(Some("other.example.com"), "/z"), 3000);
        // Canonical keys: `//a/./x/` is `/a/x`.
        assert_eq!(port(None, "//a/./x/"), 3001);
    }

    #[test]
    fn routes_carry_their_own_policy_and_timeouts() {
        let config = config(
            "[policy]\nconflict_status = 409\n\
             [[route]]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:3001\"\n\
             conflict_status = 412\nrequire_if_match = true\nread_timeout_ms = 50\n",
        );
        let (upstreams, _) = Upstreams::new(&config).unwrap();
        let a = upstreams.route_for(None, &ResourceKey::from_path("/a/1"));
        assert_eq!(upstreams.policy(a).conflict_status.as_u16(), 412);
        assert!(upstreams.policy(a).require_if_match);
        let peer = upstreams.peer(a).unwrap();
        assert_eq!(peer.options.read_timeout, Some(Duration::from_millis(50)));
        let default = upstreams.route_for(None, &ResourceKey::from_path("/b"));
        assert_eq!(upstreams.policy(default).conflict_status.as_u16(), 409);
        assert!(!upstreams.policy(default).require_if_match);
        assert_eq!(
            upstreams.longest_timeouts(),
            (Duration::from_millis(1000), Duration::from_millis(30_000))
        );
    }

    #[test]
    fn https_upstreams_verify_with_the_url_host_as_sni() {
        let config = config("[[route]]\nprefix = \"/s\"\nupstream = \"https://localhost:3443\"\n");
        let (upstreams, checks) = Upstreams::new(&config).unwrap();
        assert!(checks.is_empty());
        let id = upstreams.route_for(None, &ResourceKey::from_path("/s"));
        let peer = upstreams.peer(id).unwrap();
        assert_eq!(peer.sni, "localhost");
        assert!(peer.options.verify_cert && peer.options.verify_hostname);
        assert!(peer.options.ca.is_none(), "no ca_file: the system's CAs");
        let plain = upstreams.peer(RouteId::default()).unwrap();
        assert!(plain.sni.is_empty());
    }

    #[test]
    fn health_checks_are_one_service_per_route() {
        let text = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\
                    [[route]]\nprefix = \"/a\"\nupstream = [\"http://127.0.0.1:3001\", \"http://127.0.0.1:3002\"]\n";
        let config = Config::from_toml(text, "t.toml").unwrap();
        let (_, checks) = Upstreams::new(&config).unwrap();
        assert_eq!(checks.len(), 2);
    }
}
