//! The backends: choosing one for a request, and asking one whether a resource exists.

use pingora::connectors::http::Connector;
use pingora::lb::{selection::RoundRobin, LoadBalancer};
use pingora::prelude::*;
use pingora::ErrorType;
use std::time::Duration;

/// Idle upstream connections are dropped before common backend keep-alive timeouts (Node: 5 s) close
/// them: a write sent on a connection the backend is closing has an unknown outcome.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub struct Upstreams {
    servers: LoadBalancer<RoundRobin>,
    connect_timeout: Duration,
    read_timeout: Duration,
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

impl Upstreams {
    pub fn new(
        servers: LoadBalancer<RoundRobin>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Upstreams {
        Upstreams {
            servers,
            connect_timeout,
            read_timeout,
            connector: Connector::new(None),
        }
    }

    /// The next backend, round robin, with the configured timeouts.
    pub fn peer(&self) -> Result<HttpPeer> {
        let backend = self
            .servers
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no upstream available"))?;
        let mut peer = HttpPeer::new(backend.addr.to_string(), false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        Ok(peer)
    }

    /// `HEAD path` on a backend: does the resource exist? Used for `If-None-Match: *` on a resource the
    /// gateway has never seen, while the write's reservation keeps other writes out.
    pub async fn probe(&self, path_and_query: &str, host: Option<&[u8]>) -> Existence {
        match self.head_status(path_and_query, host).await {
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

    async fn head_status(&self, path_and_query: &str, host: Option<&[u8]>) -> Result<u16> {
        let peer = self.peer()?;
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
