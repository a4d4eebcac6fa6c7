//! Request hardening (`etag_gateway::request_guard::check`) on heads read by Pingora's own HTTP/1
//! parser, as in the proxy: the raw bytes go through `ServerSession::read_request` over an in-memory
//! stream, and what Pingora accepts is checked with the head Pingora parsed and the raw head bytes.
//!
//! Input: one flag byte, then the raw request bytes. Flag bit 0: the method counts as guarded;
//! bit 1: tight limits (1 KiB head, 3 etags of at most 64 bytes, 10-byte bodies) instead of the
//! defaults.
//!
//! Properties, whenever Pingora accepts the head:
//! - `check` never panics and gives the same verdict twice;
//! - a request that passes has no `Content-Length` line together with a `Transfer-Encoding` line;
//! - a request that passes has a path without an encoded `/`, NUL or control byte, and none of its
//!   `..` segments (`.`/`%2e` spellings included) climbs above the root;
//! - a request that passes carries at most `max_etags` entity tags in each of If-Match and
//!   If-None-Match as the precondition parser reads them (the guard counts the way the parser splits);
//! - a refusal names a reason, and a 413 is only for a guarded method with a body limit.

use std::cell::RefCell;
use std::time::Duration;

use etag_gateway::precondition::{Preconditions, TagSet};
use etag_gateway::request_guard::{check as guard, Limits};
use pingora::protocols::http::ServerSession;
use tokio::io::AsyncWriteExt;

/// Pingora's parser reads from an in-memory pipe this large; longer inputs are cut.
const PIPE: usize = 64 * 1024;

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime"),
    );
}

/// Checks one input: a flag byte, then the raw request.
pub fn check(data: &[u8]) {
    let Some((&flags, raw)) = data.split_first() else {
        return;
    };
    let raw = &raw[..raw.len().min(PIPE - 1)];
    let guarded = flags & 1 == 1;
    let limits = if flags & 2 == 2 {
        Limits {
            max_header_bytes: 1024,
            max_etags: 3,
            max_etag_length: 64,
            max_body_bytes: Some(10),
            ..Limits::default()
        }
    } else {
        Limits::default()
    };

    RUNTIME.with(|rt| {
        rt.borrow().block_on(async {
            let (mut client, server) = tokio::io::duplex(PIPE);
            // Everything fits in the pipe; then EOF, so that a partial head ends the read.
            client.write_all(raw).await.expect("write to the pipe");
            drop(client);
            let mut session = ServerSession::new_http1(Box::new(server));
            let read = tokio::time::timeout(Duration::from_secs(5), session.read_request()).await;
            let Ok(Ok(true)) = read else {
                return; // refused or incomplete: Pingora answers it, no hook runs
            };
            let raw_head = session.to_h1_raw();
            let req = session.req_header();
            let verdict = guard(req, &raw_head, &limits, guarded);
            assert_eq!(
                verdict,
                guard(req, &raw_head, &limits, guarded),
                "same head, different verdicts"
            );
            match verdict {
                Ok(()) => passed(req, &raw_head, &limits),
                Err(r) => {
                    assert!(!r.error.is_empty(), "a refusal without a reason");
                    if r.status == http::StatusCode::PAYLOAD_TOO_LARGE {
                        assert!(guarded && limits.max_body_bytes.is_some());
                    }
                    let _ = r.answer();
                }
            }
        })
    });
}

/// What must hold of a request the guard let through.
fn passed(req: &pingora::http::RequestHeader, raw_head: &[u8], limits: &Limits) {
    // Framing: never both a Content-Length and a Transfer-Encoding line in the head as sent.
    let (mut cl, mut te) = (false, false);
    let mut lines = raw_head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .skip_while(|l| l.is_empty());
    lines.next();
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        cl |= name.eq_ignore_ascii_case(b"content-length");
        te |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    assert!(
        !(cl && te),
        "passed with both Content-Length and Transfer-Encoding: {:?}",
        String::from_utf8_lossy(raw_head)
    );

    // The path names one resource for the gateway and the backend alike.
    let path = req.uri.path();
    if path.starts_with('/') {
        let lower = path.to_ascii_lowercase();
        assert!(
            !lower.contains("%2f"),
            "passed with an encoded slash: {path:?}"
        );
        for b in 0u8..0x20 {
            assert!(
                !lower.contains(&format!("%{b:02x}")),
                "passed with an encoded control byte: {path:?}"
            );
        }
        assert!(
            !lower.contains("%7f"),
            "passed with an encoded DEL: {path:?}"
        );
        let mut depth = 0i64;
        for segment in lower.split('/') {
            match segment.replace("%2e", ".").as_str() {
                "" | "." => {}
                ".." => {
                    depth -= 1;
                    assert!(
                        depth >= 0,
                        "passed a path that climbs above the root: {path:?}"
                    );
                }
                _ => depth += 1,
            }
        }
    }
    let raw_path = req.raw_path();
    let raw_path = raw_path.split(|&b| b == b'?').next().unwrap_or_default();
    assert!(
        !raw_path.iter().any(|&b| b < 0x20 || b == 0x7f),
        "passed a raw control byte in the path: {:?}",
        String::from_utf8_lossy(raw_path)
    );

    // As many entity tags as the parser will read, at most.
    if let Ok(p) = Preconditions::from_headers(&req.headers) {
        for (name, set) in [
            ("If-Match", &p.if_match),
            ("If-None-Match", &p.if_none_match),
        ] {
            if let Some(TagSet::Tags(tags)) = set {
                assert!(
                    tags.len() <= limits.max_etags,
                    "{name}: the guard let {} tags through (max_etags {})",
                    tags.len(),
                    limits.max_etags
                );
            }
        }
    }
}
