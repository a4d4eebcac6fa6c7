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
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::health_check::{HealthCheck, TcpHealthCheck};
use pingora::lb::{selection::RoundRobin, Backend, Backends, LoadBalancer};
use pingora::prelude::*;
use pingora::protocols::tls::CaType;
use pingora::services::background::{background_service, GenBackgroundService};
use pingora::utils::tls::{parse_x509, WrappedX509};
use pingora::ErrorType;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
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

/// The background services of the routes' server lists (health checks, lookups), to be added to
/// the Pingora server.
pub type UpstreamServices = Vec<GenBackgroundService<LoadBalancer<RoundRobin>>>;

/// One route: where its requests go and under which policy.
pub struct Route {
    prefix: String,
    host: Option<String>,
    /// Each backend carries its peer (timeouts, TLS), built once per address: a request clones its
    /// server's (building one costs a string round trip of the address and the option setting).
    servers: Arc<LoadBalancer<RoundRobin>>,
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

/// Looks a host name up (blocking): `host:port` to its addresses.
type Lookup = dyn Fn(&str) -> std::io::Result<Vec<SocketAddr>> + Send + Sync;

/// Builds the configured peer of a server at one of its addresses.
type MakePeer = dyn Fn(SocketAddr, &Upstream) -> HttpPeer + Send + Sync;

fn system_lookup(address: &str) -> std::io::Result<Vec<SocketAddr>> {
    address.to_socket_addrs().map(Iterator::collect)
}

/// A route's servers as the load balancer's service discovery: each server's addresses, looked up
/// again at every refresh, each address carrying its configured peer. A lookup that fails or finds
/// nothing keeps the addresses found before (a DNS hiccup must not empty the route).
struct Resolver {
    servers: Vec<Upstream>,
    /// The peer of a server at an address (the route's timeouts and TLS).
    peer: Box<MakePeer>,
    lookup: Arc<Lookup>,
    /// The addresses last found for each server.
    last: std::sync::Mutex<Vec<Vec<SocketAddr>>>,
}

impl Resolver {
    /// Resolves every server now; an error names the first that resolves to nothing.
    fn new(
        servers: &[Upstream],
        peer: Box<MakePeer>,
        lookup: Arc<Lookup>,
    ) -> anyhow::Result<Resolver> {
        let mut last = Vec::with_capacity(servers.len());
        for server in servers {
            let addrs = lookup(&server.address())
                .with_context(|| format!("cannot resolve the upstream {server}"))?;
            if addrs.is_empty() {
                anyhow::bail!("the upstream {server} resolves to no address");
            }
            last.push(addrs);
        }
        Ok(Resolver {
            servers: servers.to_vec(),
            peer,
            lookup,
            last: std::sync::Mutex::new(last),
        })
    }

    /// Whether any server is a name (IP addresses never change).
    fn has_names(&self) -> bool {
        self.servers
            .iter()
            .any(|s| s.host.parse::<std::net::IpAddr>().is_err())
    }

    /// Looks the names up again (keeping what a failed lookup had), then the backends.
    fn refresh(&self) -> BTreeSet<Backend> {
        let found: Vec<Option<Vec<SocketAddr>>> = self
            .servers
            .iter()
            .map(|server| {
                if server.host.parse::<std::net::IpAddr>().is_ok() {
                    return None;
                }
                match (self.lookup)(&server.address()) {
                    Ok(addrs) if !addrs.is_empty() => Some(addrs),
                    Ok(_) => {
                        tracing::warn!(%server, "upstream resolves to no address now: keeping the last ones");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(%server, error = %e, "upstream lookup failed: keeping the last addresses");
                        None
                    }
                }
            })
            .collect();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for (i, addrs) in found.into_iter().enumerate() {
            if let Some(addrs) = addrs {
                if addrs != last[i] {
                    tracing::info!(server = %self.servers[i], from = ?last[i], to = ?addrs, "upstream addresses changed");
                    last[i] = addrs;
                }
            }
        }
        self.backends(&last)
    }

    fn backends(&self, last: &[Vec<SocketAddr>]) -> BTreeSet<Backend> {
        let mut backends = BTreeSet::new();
        for (server, addrs) in self.servers.iter().zip(last) {
            for &addr in addrs {
                let mut ext = http::Extensions::new();
                ext.insert((self.peer)(addr, server));
                ext.insert(HostHeader(host_header(server)));
                backends.insert(Backend {
                    addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                    weight: 1,
                    ext,
                });
            }
        }
        backends
    }
}

impl Route {
    /// Builds a route and, when health checks or lookups are to be repeated, the background
    /// service that does them.
    fn build(
        config: &RouteConfig,
        health_check: Option<Duration>,
        health_check_path: Option<&str>,
        resolve: Option<Duration>,
        lookup: Arc<Lookup>,
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
        let peer = {
            let (route, ca) = (config.clone(), ca.clone());
            Box::new(move |addr, server: &Upstream| {
                configured_peer(addr, server, &route, ca.as_ref())
            })
        };
        let resolver = Arc::new(Resolver::new(&config.servers, peer, lookup)?);
        let resolve = resolve.filter(|_| resolver.has_names());
        let initial = {
            let last = resolver.last.lock().unwrap_or_else(|p| p.into_inner());
            resolver.backends(&last)
        };
        let mut servers = LoadBalancer::<RoundRobin>::from_backends(Backends::new(Box::new(
            StaticThenResolver {
                initial: std::sync::Mutex::new(Some(initial)),
                resolver,
            },
        )));
        // The first discovery hands over the addresses resolved above: it never waits, so one poll
        // completes it (no runtime needed, inside one or not).
        {
            let update = std::pin::pin!(servers.update());
            match update.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
                std::task::Poll::Ready(done) => done.context("cannot build the upstream list")?,
                std::task::Poll::Pending => {
                    anyhow::bail!("building the upstream list did not complete")
                }
            }
        }
        servers.update_frequency = resolve;
        if let Some(every) = health_check {
            match health_check_path {
                Some(path) => servers.set_health_check(Box::new(HttpCheck {
                    path: path.to_owned(),
                    connector: Connector::new(None),
                })),
                None => {
                    // A plain TCP connect, also for https:// servers: the question is only whether
                    // the server accepts connections (certificate problems show up as 502 on
                    // requests).
                    let mut check = TcpHealthCheck::new();
                    check.peer_template.options.connection_timeout = Some(config.connect_timeout);
                    servers.set_health_check(check);
                }
            }
            servers.health_check_frequency = Some(every);
        }
        let (servers, service) = if health_check.is_some() || resolve.is_some() {
            let name = match &config.host {
                Some(host) => format!("upstreams {host}{}", config.prefix),
                None => format!("upstreams {}", config.prefix),
            };
            let service = background_service(&name, servers);
            (service.task(), Some(service))
        } else {
            (Arc::new(servers), None)
        };
        let route = Route {
            prefix: config.prefix.clone(),
            host: config.host.clone(),
            servers,
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
        backend.ext.get::<HttpPeer>().cloned().ok_or_else(|| {
            // Every backend is made with its peer (Resolver::backends).
            Error::explain(
                ErrorType::ConnectNoRoute,
                format!("no peer for upstream {}", backend.addr),
            )
        })
    }
}

/// The `Host` a request of the gateway's own (a health check) sends to a server: as in its URL.
#[derive(Clone)]
struct HostHeader(String);

fn host_header(server: &Upstream) -> String {
    let default_port = if server.tls { 443 } else { 80 };
    let host = if server.host.contains(':') {
        format!("[{}]", server.host)
    } else {
        server.host.clone()
    };
    if server.port == default_port {
        host
    } else {
        format!("{host}:{}", server.port)
    }
}

/// The HTTP health check (`upstream.health_check_path`): `GET path` on each server, with its own
/// peer (TLS, SNI, CAs, the route's timeouts); a 2xx or 3xx answer is healthy. The connection is
/// not reused (the body is not read), so each check also proves that new connections work.
struct HttpCheck {
    path: String,
    connector: Connector,
}

#[async_trait::async_trait]
impl HealthCheck for HttpCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        let (Some(peer), Some(HostHeader(host))) =
            (target.ext.get::<HttpPeer>(), target.ext.get::<HostHeader>())
        else {
            return Error::e_explain(ErrorType::InternalError, "a backend without its peer");
        };
        let (status, session) = request_status(
            &self.connector,
            peer,
            "GET",
            &self.path,
            Some(host.as_bytes()),
        )
        .await?;
        drop(session);
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Error::e_explain(
                ErrorType::HTTPStatus(status),
                format!("health check: GET {} answered {status}", self.path),
            )
        }
    }

    fn health_threshold(&self, _success: bool) -> usize {
        1
    }
}

/// Sends `METHOD path` (no body) on a connection to `peer` and reads the answer's head: its status,
/// and the session (whose body, if any, is unread).
async fn request_status(
    connector: &Connector,
    peer: &HttpPeer,
    method: &str,
    path_and_query: &str,
    host: Option<&[u8]>,
) -> Result<(u16, pingora::protocols::http::client::HttpSession)> {
    let (mut session, _reused) = connector.get_http_session(peer).await?;
    let mut req = RequestHeader::build(method, path_and_query.as_bytes(), None)?;
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
    Ok((status, session))
}

/// The resolver's discovery, answering the first call with the addresses found at start (so that
/// the route is complete before the server runs, without a lookup in an executor that has no
/// blocking pool), and looking up from then on.
struct StaticThenResolver {
    initial: std::sync::Mutex<Option<BTreeSet<Backend>>>,
    resolver: Arc<Resolver>,
}

#[async_trait::async_trait]
impl ServiceDiscovery for StaticThenResolver {
    async fn discover(&self) -> Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let initial = self
            .initial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match initial {
            Some(backends) => Ok((backends, HashMap::new())),
            None => {
                // getaddrinfo blocks: off the runtime's workers.
                let resolver = self.resolver.clone();
                let backends = tokio::task::spawn_blocking(move || resolver.refresh())
                    .await
                    .map_err(|e| {
                        Error::explain(ErrorType::InternalError, format!("lookup task: {e}"))
                    })?;
                Ok((backends, HashMap::new()))
            }
        }
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
    /// The default route (`[upstream]`, `[policy]`) and every `[[route]]`, with the background
    /// services that health-check them and look their host names up again (none when neither is
    /// configured). Resolves host names now (blocking): a name that does not resolve is an error.
    pub fn new(config: &Config) -> anyhow::Result<(Upstreams, UpstreamServices)> {
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
        let resolve = config.upstream.resolve_interval;
        let lookup: Arc<Lookup> = Arc::new(system_lookup);
        let mut routes = Vec::with_capacity(config.routes.len() + 1);
        let mut checks = Vec::new();
        for route in std::iter::once(&default).chain(&config.routes) {
            let (route, check) = Route::build(
                route,
                every,
                config.upstream.health_check_path.as_deref(),
                resolve,
                lookup.clone(),
            )?;
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
        let (status, session) =
            request_status(&self.connector, &peer, "HEAD", path_and_query, host).await?;
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
        let (upstreams, services) = Upstreams::new(&config).unwrap();
        assert_eq!(services.len(), 1, "the name localhost is looked up again");
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

#[cfg(test)]
mod resolve_tests {
    use super::*;
    use pingora::upstreams::peer::Peer;
    use std::sync::Mutex;

    /// A lookup whose answers the test sets, counting its calls.
    struct FakeDns {
        answer: Mutex<std::io::Result<Vec<SocketAddr>>>,
        calls: Mutex<usize>,
    }

    impl FakeDns {
        fn set(&self, answer: std::io::Result<Vec<SocketAddr>>) {
            *self.answer.lock().unwrap() = answer;
        }

        fn lookup(self: &Arc<Self>) -> Arc<Lookup> {
            let dns = self.clone();
            Arc::new(move |_: &str| {
                *dns.calls.lock().unwrap() += 1;
                match &*dns.answer.lock().unwrap() {
                    Ok(addrs) => Ok(addrs.clone()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                }
            })
        }
    }

    impl Default for FakeDns {
        fn default() -> Self {
            FakeDns {
                answer: Mutex::new(Ok(vec![])),
                calls: Mutex::new(0),
            }
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn route(host: &str) -> RouteConfig {
        RouteConfig {
            prefix: "/".into(),
            host: None,
            servers: vec![Upstream {
                host: host.into(),
                port: 3000,
                tls: false,
            }],
            connect_timeout: Duration::from_millis(100),
            read_timeout: Duration::from_millis(100),
            ca_file: None,
            policy: PolicyConfig::default(),
        }
    }

    fn peer_addr(route: &Route) -> String {
        route.peer().unwrap().address().to_string()
    }

    #[tokio::test]
    async fn a_name_is_looked_up_again_and_a_failed_lookup_keeps_the_last_addresses() {
        let dns = Arc::new(FakeDns::default());
        dns.set(Ok(vec![addr("10.0.0.1:3000")]));
        let (route, service) = Route::build(
            &route("backend.test"),
            None,
            None,
            Some(Duration::from_secs(5)),
            dns.lookup(),
        )
        .unwrap();
        assert!(service.is_some(), "a name gets a refresh service");
        assert_eq!(peer_addr(&route), "10.0.0.1:3000");

        // The backend came back elsewhere: the next refresh (what the service runs) moves there.
        dns.set(Ok(vec![addr("10.0.0.2:3000")]));
        route.servers.update().await.unwrap();
        assert_eq!(peer_addr(&route), "10.0.0.2:3000");

        // A failed or empty lookup keeps the addresses found before.
        dns.set(Err(std::io::Error::other("SERVFAIL")));
        route.servers.update().await.unwrap();
        assert_eq!(peer_addr(&route), "10.0.0.2:3000");
        dns.set(Ok(vec![]));
        route.servers.update().await.unwrap();
        assert_eq!(peer_addr(&route), "10.0.0.2:3000");
    }

    #[test]
    fn an_ip_address_is_never_looked_up_again_and_a_name_that_does_not_resolve_is_an_error() {
        let dns = Arc::new(FakeDns::default());
        dns.set(Ok(vec![addr("127.0.0.1:3000")]));
        let (_, service) = Route::build(
            &route("127.0.0.1"),
            None,
            None,
            Some(Duration::from_secs(5)),
            dns.lookup(),
        )
        .unwrap();
        assert!(service.is_none(), "nothing to refresh");
        assert_eq!(*dns.calls.lock().unwrap(), 1, "looked up once, at start");

        dns.set(Err(std::io::Error::other("NXDOMAIN")));
        let e = Route::build(&route("missing.test"), None, None, None, dns.lookup())
            .err()
            .expect("an error");
        assert!(format!("{e:#}").contains("missing.test:3000"), "{e:#}");
    }
}
