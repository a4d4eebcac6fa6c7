//! End-to-end: hostile request shapes, written byte for byte on raw TCP connections to the real
//! `etag-gateway` in front of the real `demo-backend`. Each shape must be answered by the gateway
//! (status, and a closed connection where the framing cannot be trusted) while the backend's applied
//! log stays unchanged: a hostile write is sent as a PUT, which the backend would apply and log if
//! it got through.
//!
//! Some shapes are refused by Pingora's own parser before any hook runs (see `request_guard`'s
//! module doc); the others by `request_guard::check` in `request_filter`. The slow-client tests need
//! the head deadline (`header_deadline`) in the server.

mod common;

use common::{client, DemoBackend, Gateway};
use serde_json::Value;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

fn start(config: Option<&str>) -> (DemoBackend, Gateway) {
    let backend = DemoBackend::start(&[]);
    let gateway = Gateway::start(&backend.url(), config);
    (backend, gateway)
}

/// Every write the backend applied, all paths (read from the backend directly).
async fn applied(backend: &DemoBackend) -> Vec<Value> {
    let resp = client()
        .get(format!("{}/__demo/log", backend.url()))
        .send()
        .await
        .expect("GET /__demo/log");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("applied log is JSON")
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `ETag` without its quotes.
    fn etag(&self) -> Option<String> {
        self.header("etag")
            .map(|e| e.trim().trim_matches('"').to_string())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response from a connection that may stay open. `Ok(None)`: closed before any byte.
async fn read_reply(stream: &mut TcpStream, head_request: bool) -> io::Result<Option<Reply>> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "closed inside a response head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let (status, headers) = common::parse_head(&head);
    let mut reply = Reply {
        status,
        headers,
        body: buf[head_end + 4..].to_vec(),
    };
    let chunked = reply
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
    let length = reply
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok());
    if head_request || status == 204 || status == 304 {
        reply.body.clear();
    } else if chunked {
        while !reply.body.ends_with(b"0\r\n\r\n") {
            if stream.read_buf(&mut reply.body).await? == 0 {
                break;
            }
        }
        reply.body = dechunk(&reply.body);
    } else if let Some(length) = length {
        while reply.body.len() < length {
            if stream.read_buf(&mut reply.body).await? == 0 {
                break;
            }
        }
        reply.body.truncate(length);
    } else {
        stream.read_to_end(&mut reply.body).await?;
    }
    Ok(Some(reply))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(data, b"\r\n") {
        let size = std::str::from_utf8(&data[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size.filter(|&s| s > 0) else {
            break;
        };
        data = &data[eol + 2..];
        out.extend_from_slice(&data[..size.min(data.len())]);
        data = data.get(size + 2..).unwrap_or_default();
    }
    out
}

/// Whether the peer closes the connection within `wait` (EOF or reset) without sending more.
async fn closes_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 64];
    match timeout(wait, stream.read(&mut byte)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!(
            "unexpected bytes after the answer: {:?}",
            String::from_utf8_lossy(&byte[..n])
        ),
    }
}

/// Sends `request` exactly as given on a new connection and reads one answer.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (Reply, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // A gateway that closes early may make the write fail; the answer is still readable.
    let _ = stream.write_all(request).await;
    let reply = timeout(Duration::from_secs(10), read_reply(&mut stream, false))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no answer within 10 s to {:?}",
                String::from_utf8_lossy(request)
            )
        })
        .unwrap_or_else(|e| {
            panic!(
                "reading the answer to {:?}: {e}",
                String::from_utf8_lossy(request)
            )
        })
        .unwrap_or_else(|| {
            panic!(
                "closed without an answer to {:?}",
                String::from_utf8_lossy(request)
            )
        });
    (reply, stream)
}

/// The request is answered `status` by the gateway, the connection is closed when `close`, and the
/// backend applied nothing.
async fn refused_unread(config: Option<&str>, request: &str, status: u16, close: bool) {
    let (backend, gateway) = start(config);
    let before = applied(&backend).await;
    let request = request.replace("{host}", &gateway.addr().to_string());
    let (reply, mut stream) = exchange(gateway.addr(), request.as_bytes()).await;
    assert_eq!(
        reply.status,
        status,
        "{request:?} was answered {} {}",
        reply.status,
        reply.text()
    );
    if close {
        assert!(
            closes_within(&mut stream, Duration::from_secs(3)).await,
            "the connection stayed open after {request:?}: its framing cannot be trusted"
        );
    }
    assert_eq!(
        applied(&backend).await,
        before,
        "the backend applied {request:?}"
    );
}

const PUT: &str = "PUT /docs/hostile HTTP/1.1\r\nHost: {host}\r\n";

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ordinary_writes_still_pass() {
    let (backend, gateway) = start(None);
    let host = gateway.addr();
    let (reply, _) = exchange(
        host,
        format!("PUT /docs/plain HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nplain")
            .as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let (reply, _) = exchange(
        host,
        format!(
            "PUT /docs/chunked HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nchunked\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let bodies: Vec<String> = applied(&backend)
        .await
        .iter()
        .map(|w| w["body"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(bodies, ["plain", "chunked"]);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400_and_closes() {
    // Pingora would let chunked win and drop Content-Length; the gateway refuses (RFC 9112 §6.1).
    let request = format!(
        "{PUT}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn differing_content_lengths_are_400_and_close() {
    let request = format!("{PUT}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!");
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn a_content_length_list_that_differs_is_400_and_closes() {
    let request = format!("{PUT}Content-Length: 5, 6\r\n\r\nhello!");
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn a_non_numeric_content_length_is_400_and_closes() {
    let request = format!("{PUT}Content-Length: 5a\r\n\r\nhello");
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn transfer_encoding_chunked_chunked_is_400_and_closes() {
    let request =
        format!("{PUT}Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn repeated_transfer_encoding_is_400_and_closes() {
    let request = format!(
        "{PUT}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn transfer_encoding_xchunked_is_400_and_closes() {
    let request = format!("{PUT}Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn transfer_encoding_identity_is_400_and_closes() {
    let request = format!("{PUT}Transfer-Encoding: identity\r\n\r\nhello");
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn transfer_encoding_after_a_tab_is_400_and_closes() {
    let request = format!("{PUT}Transfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn transfer_encoding_with_trailing_whitespace_is_400_and_closes() {
    let request = format!("{PUT}Transfer-Encoding: chunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    refused_unread(None, &request, 400, true).await;
}

#[tokio::test]
async fn transfer_encoding_on_http10_is_400_and_closes() {
    let request = "PUT /docs/hostile HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    refused_unread(None, request, 400, true).await;
}

#[tokio::test]
async fn an_http10_write_with_a_body_but_no_length_is_400_and_closes() {
    // Without the guard the backend would get an empty PUT (requests are never close-delimited).
    let request =
        "PUT /docs/hostile HTTP/1.0\r\nHost: {host}\r\nContent-Type: text/plain\r\n\r\nhello";
    refused_unread(None, request, 400, true).await;
}

// ---------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_head_over_max_header_bytes_is_431() {
    let pad = "a".repeat(40_000); // default limit: 32768
    let request = format!("{PUT}X-Pad: {pad}\r\nContent-Length: 2\r\n\r\nhi");
    refused_unread(None, &request, 431, false).await;
}

#[tokio::test]
async fn more_than_max_etags_in_if_match_is_400() {
    let tags = ["\"t\""; 17].join(", "); // default limit: 16
    let request = format!("{PUT}If-Match: {tags}\r\nContent-Length: 2\r\n\r\nhi");
    refused_unread(None, &request, 400, false).await;
}

#[tokio::test]
async fn more_than_max_etags_in_if_none_match_across_lines_is_400() {
    let line = ["\"t\""; 9].join(", ");
    let request = format!(
        "{PUT}If-None-Match: {line}\r\nIf-None-Match: {line}\r\nContent-Length: 2\r\n\r\nhi"
    );
    refused_unread(None, &request, 400, false).await;
}

#[tokio::test]
async fn an_etag_over_max_etag_length_is_400() {
    let long = "x".repeat(300); // default limit: 256
    let request = format!("{PUT}If-None-Match: \"{long}\"\r\nContent-Length: 2\r\n\r\nhi");
    refused_unread(None, &request, 400, false).await;
}

#[tokio::test]
async fn a_body_over_max_body_bytes_is_413_and_closes() {
    let request = format!("{PUT}Content-Length: 11\r\n\r\nhello world");
    refused_unread(Some("[limits]\nmax_body_bytes = 10\n"), &request, 413, true).await;
}

#[tokio::test]
async fn a_chunked_body_over_max_body_bytes_is_413_and_not_applied() {
    let (backend, gateway) = start(Some("[limits]\nmax_body_bytes = 10\n"));
    let before = applied(&backend).await;
    // no Content-Length up front: the limit is enforced as the chunks arrive
    let request =
        format!("{PUT}Transfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n6\r\nworld!\r\n0\r\n\r\n")
            .replace("{host}", &gateway.addr().to_string());
    let (reply, _) = exchange(gateway.addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(
        reply.text().contains("limits.max_body_bytes"),
        "{}",
        reply.text()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        applied(&backend).await,
        before,
        "a cut-off body is never applied"
    );
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn aliases_share_one_etag_and_paths_that_escape_are_400() {
    let (backend, gateway) = start(None);
    let host = gateway.addr();
    let request = |method: &str, target: &str, extra: &str, body: &str| {
        let length = if method == "GET" {
            String::new()
        } else {
            format!("Content-Length: {}\r\n", body.len())
        };
        format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}{length}\r\n{body}")
    };

    let (created, _) = exchange(host, request("PUT", "/docs/a", "", "v1").as_bytes()).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let e1 = created.etag().expect("an etag for the write");
    for alias in ["/docs/a", "/docs//a/", "/docs/./a", "/docs/%61"] {
        let (read, _) = exchange(host, request("GET", alias, "", "").as_bytes()).await;
        assert_eq!(read.status, 200, "GET {alias}: {}", read.text());
        assert_eq!(read.etag().as_deref(), Some(e1.as_str()), "GET {alias}");
        assert_eq!(read.text(), "v1", "GET {alias}");
    }
    // a write through one spelling changes the etag of all of them
    let if_match = format!("If-Match: \"{e1}\"\r\n");
    let (updated, _) = exchange(
        host,
        request("PUT", "/docs/./a", &if_match, "v2").as_bytes(),
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let e2 = updated.etag().expect("an etag for the update");
    let (stale, _) = exchange(
        host,
        request("PUT", "/docs/%61", &if_match, "v3").as_bytes(),
    )
    .await;
    assert_eq!(
        stale.status, 409,
        "the old etag is stale under every spelling"
    );
    let (read, _) = exchange(host, request("GET", "/docs//a/", "", "").as_bytes()).await;
    assert_eq!(read.etag().as_deref(), Some(e2.as_str()));

    let before = applied(&backend).await;
    for target in ["/../x", "/docs/%2e%2e/%2e%2e/x", "/docs/a%2Fb", "/docs/%00"] {
        for method in ["GET", "PUT"] {
            let (reply, _) = exchange(host, request(method, target, "", "evil").as_bytes()).await;
            assert_eq!(reply.status, 400, "{method} {target}: {}", reply.text());
        }
    }
    assert_eq!(
        applied(&backend).await,
        before,
        "a hostile path reached the backend"
    );
}

// ---------------------------------------------------------------------------------------------
// Slow clients: the head deadline
// ---------------------------------------------------------------------------------------------

const ONE_SECOND_HEADS: &str = "[limits]\nheader_read_timeout_ms = 1000\n";

#[tokio::test]
async fn a_client_dripping_its_head_is_cut_off() {
    let (backend, gateway) = start(Some(ONE_SECOND_HEADS));
    let before = applied(&backend).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    let request = format!(
        "PUT /docs/drip HTTP/1.1\r\nHost: {}\r\nContent-Length: 2\r\n\r\nhi",
        gateway.addr()
    );
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut cut = None;
    // one byte every 300 ms; between bytes, watch for an answer or a close
    for byte in request.bytes() {
        if stream.write_all(&[byte]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        match timeout(Duration::from_millis(300), stream.read_buf(&mut answer)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = Some(started.elapsed());
                break;
            }
            Ok(Ok(_)) => {
                cut = Some(started.elapsed());
                let _ = timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let cut = cut.expect("the dripping client was still connected after 5 s");
    assert!(
        cut < Duration::from_millis(2_500),
        "cut off only after {cut:?} (limit 1 s)"
    );
    if !answer.is_empty() {
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert!(closes_within(&mut stream, Duration::from_secs(2)).await);
    assert_eq!(
        applied(&backend).await,
        before,
        "the dripped write was applied"
    );
}

#[tokio::test]
async fn a_slow_body_is_not_cut_by_the_head_deadline() {
    let (backend, gateway) = start(Some(ONE_SECOND_HEADS));
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    let head = format!(
        "PUT /docs/slow-body HTTP/1.1\r\nHost: {}\r\nContent-Length: 8\r\n\r\n",
        gateway.addr()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for byte in b"sloooowy" {
        tokio::time::sleep(Duration::from_millis(250)).await; // 2 s in all
        stream.write_all(&[*byte]).await.unwrap();
    }
    let reply = timeout(Duration::from_secs(10), read_reply(&mut stream, false))
        .await
        .expect("an answer")
        .expect("readable")
        .expect("not closed");
    assert_eq!(reply.status, 201, "{}", reply.text());
    let log = applied(&backend).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["body"], "sloooowy");
}

#[tokio::test]
async fn keep_alive_requests_each_get_the_limit_and_an_idle_connection_is_closed() {
    let (_backend, gateway) = start(Some(ONE_SECOND_HEADS));
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    let request = format!(
        "GET /docs/none HTTP/1.1\r\nHost: {}\r\n\r\n",
        gateway.addr()
    );
    // three requests 600 ms apart on one connection: 1.8 s in all, each head within its second
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        let reply = timeout(Duration::from_secs(10), read_reply(&mut stream, false))
            .await
            .expect("an answer")
            .expect("readable")
            .unwrap_or_else(|| panic!("request {i}: the connection was closed"));
        assert_eq!(reply.status, 404, "request {i}: {}", reply.text());
    }
    // nothing more: the wait for the next head ends after the limit, without an answer
    let started = Instant::now();
    assert!(closes_within(&mut stream, Duration::from_secs(3)).await);
    assert!(started.elapsed() >= Duration::from_millis(800));
}
