//! A total deadline on receiving each request head.
//!
//! Pingora 0.9 bounds each *read* of a request head, not the head as a whole (pingora #447): the
//! first request of a connection gets 60 s per read (its keep-alive timeout), and a reused HTTP/1.1
//! connection waits for the next head with no timeout at all (`KeepaliveStatus::Infinite`). A client
//! that sends one byte every few seconds, or nothing after its first request, holds its connection
//! and task for ever. Nothing in `HttpServerOptions`, `ServerConf` or the `ProxyHttp` hooks can
//! change that: the head is read in `HttpProxy::process_new_http` before the first hook runs, and
//! `Session::set_read_timeout` only applies afterwards (and per read).
//!
//! So the bound sits under Pingora, on the accepted stream. [`HeaderDeadline`] is the service's
//! application: it wraps Pingora's `HttpProxy` and runs the same HTTP/1 keep-alive loop as Pingora's
//! own `ServerApp` implementation, with each connection's stream wrapped in a [`DeadlineStream`].
//! Before each request the loop arms the stream; from then on its reads fail with `TimedOut` once
//! the limit has passed, until the bytes read so far contain the empty line that ends a head. After
//! that, reads pass through untouched: bodies keep Pingora's per-read timeout.
//!
//! Invariant: no request head takes longer than the limit to arrive, counted from when the gateway
//! starts waiting for it (keep-alive idle time included). When the limit passes after part of a head
//! arrived, the client gets `408` and the connection is closed; an idle connection is just closed.
//! The expired read fails inside Pingora's `read_request`, so no hook runs and nothing is forwarded.
//!
//! HTTP/2 (h2c or ALPN h2) and custom protocols are handed to Pingora unwrapped; the gateway uses
//! neither.

use crate::lifecycle::{AwaitingFirstHead, Connections};
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::{http_proxy, HttpProxy, ProxyHttp};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The gateway's proxy service with a head deadline: use it in place of
/// `pingora::proxy::http_proxy_service(conf, proxy)`.
pub fn proxy_service<SV>(
    conf: &Arc<ServerConf>,
    proxy: SV,
    limit: Duration,
    connections: Arc<Connections>,
) -> Service<HeaderDeadline<HttpProxy<SV>>>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    Service::new(
        "etag-gateway".to_string(),
        HeaderDeadline::new(http_proxy(conf, proxy), limit, connections),
    )
}

/// An HTTP application (Pingora's `HttpProxy`) whose HTTP/1 request heads must each arrive within
/// `limit`.
///
/// It also counts its connections (see [`Connections`]): a stopping process waits for them.
pub struct HeaderDeadline<A> {
    app: Arc<A>,
    limit: Duration,
    connections: Arc<Connections>,
}

impl<A> HeaderDeadline<A> {
    pub fn new(app: A, limit: Duration, connections: Arc<Connections>) -> HeaderDeadline<A> {
        HeaderDeadline {
            app: Arc::new(app),
            limit,
            connections,
        }
    }
}

#[async_trait]
impl<A> ServerApp for HeaderDeadline<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let options = self.app.server_options();
        let other_protocol = options.is_some_and(|o| o.h2c || o.force_custom)
            || matches!(
                stream.selected_alpn_proto(),
                Some(ALPN::H2 | ALPN::Custom(_))
            );
        let _open = self.connections.open();
        if other_protocol {
            return ServerApp::process_new(&self.app, stream, shutdown).await;
        }

        // The HTTP/1 branch of Pingora's `impl<T: HttpServerApp> ServerApp for T`, with the stream
        // wrapped and re-armed before each request.
        let mut stream = DeadlineStream::new(stream, self.limit);
        stream.first_head = Some(self.connections.awaiting_first_head());
        let mut session = ServerSession::new_http1(Box::new(stream));
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(60));
        }
        session.set_keepalive_reuses_remaining(options.and_then(|o| o.keepalive_request_limit));
        loop {
            let reused = self.app.process_new_http(session, shutdown).await?;
            let (stream, settings) = reused.consume();
            let stream = match stream.into_any().downcast::<DeadlineStream>() {
                Ok(mut stream) => {
                    stream.arm();
                    stream
                }
                Err(_) => {
                    // Pingora hands back the stream it was given; anything else is not bounded.
                    tracing::error!("a reused connection lost its head deadline; closing it");
                    return None;
                }
            };
            session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
        }
    }

    /// Runs once the listeners have stopped accepting. Pingora's cleanup makes every connection
    /// waiting for a request head give up at once; a client whose connection was accepted just
    /// before the stop has not had the chance to send its first request yet, and would see the
    /// connection closed unanswered (during an upgrade, while the successor is ready). So those
    /// first heads are awaited (bounded by the head deadline). Idle kept-alive connections are
    /// closed afterwards, as HTTP/1.1 allows at any time (clients retry on a fresh connection).
    async fn cleanup(&self) {
        self.connections.first_heads_arrived(self.limit).await;
        self.app.http_cleanup().await;
    }
}

/// Finds the end of a request head in the bytes as they arrive: the first empty line (CRLF or bare
/// LF, as `httparse` accepts) after the request line. Empty lines before the request line are
/// skipped, as parsers skip them.
#[derive(Debug, Default, Clone, Copy)]
struct HeadEnd {
    started: bool,
    at_line_start: bool,
}

impl HeadEnd {
    /// `Some(n)`: the head ends after the first `n` bytes of `bytes`.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            if !self.started {
                self.started = !matches!(b, b'\r' | b'\n');
                continue;
            }
            match b {
                b'\n' if self.at_line_start => return Some(i + 1),
                b'\n' => self.at_line_start = true,
                b'\r' => {}
                _ => self.at_line_start = false,
            }
        }
        None
    }
}

#[derive(Debug)]
enum Phase {
    /// Waiting for a request head: the deadline runs.
    Head { received: usize, end: HeadEnd },
    /// The head has arrived: reads pass through.
    Body,
    /// The deadline passed before the head was complete: every read fails.
    Expired,
}

/// An accepted stream whose request heads must arrive within a limit (see the module doc). Armed
/// when created and again by [`DeadlineStream::arm`] before each further request.
pub struct DeadlineStream {
    inner: Stream,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
    phase: Phase,
    /// Counted until the connection's first head has arrived (or it failed).
    first_head: Option<AwaitingFirstHead>,
}

impl std::fmt::Debug for DeadlineStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineStream")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .field("phase", &self.phase)
            .finish()
    }
}

impl DeadlineStream {
    /// Wraps `inner`, armed: the first head must arrive within `limit` from now. Needs a Tokio
    /// runtime with timers (Pingora's runtimes have them).
    pub fn new(inner: Stream, limit: Duration) -> DeadlineStream {
        DeadlineStream {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            phase: Phase::Head {
                received: 0,
                end: HeadEnd::default(),
            },
            first_head: None,
        }
    }

    /// Starts the clock for the next request head.
    pub fn arm(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.limit);
        self.phase = Phase::Head {
            received: 0,
            end: HeadEnd::default(),
        };
    }

    /// Best effort: the connection is about to be closed, so a 408 that does not fit into the
    /// socket buffer at once is dropped.
    fn send_timeout_answer(&mut self, cx: &mut Context<'_>) {
        let body = serde_json::json!({
            "error": format!(
                "the request head did not arrive within {} ms (limits.header_read_timeout_ms)",
                self.limit.as_millis()
            ),
            "hint": "nothing was forwarded; send the whole request head at once",
        })
        .to_string();
        let answer = format!(
            "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut rest = answer.as_bytes();
        while !rest.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(n)) if n > 0 => rest = &rest[n..],
                _ => return,
            }
        }
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
    }

    fn expired(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "request head not complete within {} ms (limits.header_read_timeout_ms)",
                self.limit.as_millis()
            ),
        )
    }
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.phase {
            Phase::Body => return Pin::new(&mut this.inner).poll_read(cx, buf),
            Phase::Expired => return Poll::Ready(Err(this.expired())),
            Phase::Head { .. } => {}
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            let partial = matches!(this.phase, Phase::Head { received, .. } if received > 0);
            this.phase = Phase::Expired;
            this.first_head = None;
            if partial {
                this.send_timeout_answer(cx);
            }
            return Poll::Ready(Err(this.expired()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if let Phase::Head { received, end } = &mut this.phase {
            *received += new.len();
            if end.feed(new).is_some() {
                this.phase = Phase::Body;
                this.first_head = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// Everything else Pingora asks of a stream is the inner stream's.

#[async_trait]
impl Shutdown for DeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for DeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for DeadlineStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for DeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for DeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for DeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for DeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use pingora::apps::{HttpPersistentSettings, ReusedHttpStream};
    use pingora::http::ResponseHeader;
    use std::time::Instant as StdInstant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    #[test]
    fn the_head_ends_at_the_first_empty_line() {
        let end = |chunks: &[&[u8]]| {
            let mut e = HeadEnd::default();
            let mut offset = 0;
            for c in chunks {
                if let Some(n) = e.feed(c) {
                    return Some(offset + n);
                }
                offset += c.len();
            }
            None
        };
        assert_eq!(end(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY"]), Some(27));
        assert_eq!(end(&[b"GET / HTTP/1.1\nHost: x\n\nBODY"]), Some(24));
        assert_eq!(end(&[b"GET / HTTP/1.1\r\nHost: x\n\r\n"]), Some(26));
        assert_eq!(end(&[b"GET / HTTP/1.1\r", b"\n", b"\r", b"\n"]), Some(18));
        assert_eq!(end(&[b"GET / HTTP/1.1\r\nHost: x\r\n"]), None);
        // empty lines before the request line are not the end of a head
        assert_eq!(end(&[b"\r\n\r\n\n", b"GET / HTTP/1.1\r\n"]), None);
        assert_eq!(end(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), Some(22));
    }

    /// A stream over an in-memory pipe; the other end plays the client.
    fn pipe(limit: Duration) -> (DuplexStream, DeadlineStream) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        (client, DeadlineStream::new(Box::new(server), limit))
    }

    async fn read_some(s: &mut DeadlineStream) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; 1024];
        let n = s.read(&mut buf).await?;
        buf.truncate(n);
        Ok(buf)
    }

    #[tokio::test]
    async fn a_dripped_head_is_cut_at_the_deadline_with_408() {
        let (mut client, mut server) = pipe(Duration::from_millis(300));
        let started = StdInstant::now();
        let drip = tokio::spawn(async move {
            for b in b"PUT /docs/a HTTP/1.1\r\nHost: x\r\n" {
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut answer = String::new();
            let _ = client.read_to_string(&mut answer).await;
            answer
        });
        let err = loop {
            match read_some(&mut server).await {
                Ok(bytes) => assert!(!bytes.is_empty()),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(290) && elapsed < Duration::from_millis(900),
            "{elapsed:?}"
        );
        // every later read fails too
        assert_eq!(
            read_some(&mut server).await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        drop(server);
        let answer = drip.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer}"
        );
        assert!(answer.contains("Connection: close"), "{answer}");
        assert!(answer.contains("limits.header_read_timeout_ms"), "{answer}");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_without_an_answer() {
        let (mut client, mut server) = pipe(Duration::from_millis(100));
        let err = read_some(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert!(answer.is_empty());
    }

    #[tokio::test]
    async fn a_complete_head_disarms_until_the_next_arm() {
        let (mut client, mut server) = pipe(Duration::from_millis(200));
        client
            .write_all(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        read_some(&mut server).await.unwrap();
        assert!(matches!(server.phase, Phase::Body));
        // a slow body is not the head's business
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"ok").await.unwrap();
        assert_eq!(read_some(&mut server).await.unwrap(), b"ok");

        // the next request's head is bounded again, from the arm
        server.arm();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        read_some(&mut server).await.unwrap();
        let started = StdInstant::now();
        let err = read_some(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_millis(400));
    }

    #[tokio::test]
    async fn head_and_body_in_one_read_disarm() {
        let (mut client, mut server) = pipe(Duration::from_millis(100));
        client
            .write_all(b"PUT /a HTTP/1.1\r\nContent-Length: 4\r\n\r\nbo")
            .await
            .unwrap();
        read_some(&mut server).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(b"dy").await.unwrap();
        assert_eq!(read_some(&mut server).await.unwrap(), b"dy");
    }

    /// A minimal HTTP application: answers `200 ok` to every request, keeps connections alive.
    struct Hello;

    #[async_trait]
    impl HttpServerApp for Hello {
        async fn process_new_http(
            self: &Arc<Self>,
            mut session: ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            if !session.read_request().await.ok()? {
                return None;
            }
            while session.read_request_body().await.ok()?.is_some() {}
            let mut resp = ResponseHeader::build(200, None).unwrap();
            resp.insert_header("Content-Length", "2").unwrap();
            session.write_response_header(Box::new(resp)).await.ok()?;
            session
                .write_response_body(Bytes::from_static(b"ok"), true)
                .await
                .ok()?;
            let settings = HttpPersistentSettings::for_session(&session);
            let reusable = session.finish().await.ok()??;
            Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
        }
    }

    async fn read_answer(client: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nok") {
            let mut buf = [0; 256];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    #[tokio::test]
    async fn keep_alive_requests_each_get_the_full_limit_and_a_drip_is_cut() {
        let app = Arc::new(HeaderDeadline::new(
            Hello,
            Duration::from_millis(300),
            Connections::new(),
        ));
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let serving =
            tokio::spawn(
                async move { ServerApp::process_new(&app, Box::new(server), &shutdown).await },
            );
        // three requests on one connection, 200 ms apart: each within its own 300 ms
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client
                .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let answer = read_answer(&mut client).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        // then a drip: cut with 408 and closed
        let started = StdInstant::now();
        for b in b"GET /a HTTP/1.1\r\nHost: x\r\n" {
            if client.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > Duration::from_millis(500) {
                break;
            }
        }
        let mut rest = String::new();
        client.read_to_string(&mut rest).await.unwrap();
        assert!(rest.starts_with("HTTP/1.1 408"), "{rest}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(serving.await.unwrap().is_none());
    }
}
