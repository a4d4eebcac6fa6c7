//! End-to-end: the seed's scenario (RavenDB's "Revisions and Concurrency with E-Tags") and the
//! gateway's contract around it, with the real `etag-gateway` in front of the real `demo-backend`.
//! The backend is always read directly (not through the gateway) to check what really happened.

mod common;

use common::{backend_get, backend_log, client, etag_of, raw_request, DemoBackend, Gateway};
use reqwest::{Client, Response};
use serde_json::Value;

const DOC: &str = "/docs/bobs_address";
const SEED_BODY: &str = "{ FirstName : 'Bob', LastName: 'Smith', Address: '5 Elm St.' }";

fn start(backend_args: &[&str]) -> (DemoBackend, Gateway, Client) {
    let backend = DemoBackend::start(backend_args);
    let gateway = Gateway::start(&backend.url(), None);
    (backend, gateway, client())
}

/// The seed's 409 body, byte for byte (field order as in the seed).
fn conflict_body(method: &str, url: &str, carried: &str, current: &str) -> String {
    let name = url.rsplit('/').next().unwrap();
    format!(
        r#"{{"url":"{url}","actualETag":"{carried}","expectedETag":"{current}","error":"{method} attempted on document '{name}' using a non current etag"}}"#
    )
}

/// GET through the gateway: 200 and an etag, which is returned (unquoted) with the body.
async fn read(c: &Client, gw: &Gateway, path: &str) -> (String, String) {
    let r = c.get(format!("{}{path}", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path} through the gateway");
    let etag =
        etag_of(&r).unwrap_or_else(|| panic!("GET {path}: no ETag (nothing else was running)"));
    (etag, r.text().await.unwrap())
}

async fn put(c: &Client, gw: &Gateway, path: &str, if_match: Option<&str>, body: &str) -> Response {
    let mut req = c.put(format!("{}{path}", gw.url())).body(body.to_string());
    if let Some(tag) = if_match {
        req = req.header("If-Match", tag);
    }
    req.send().await.unwrap()
}

/// Asserts the seed's conflict answer for `method` carrying `carried` while `current` is current.
async fn assert_conflict(r: Response, method: &str, path: &str, carried: &str, current: &str) {
    assert_eq!(r.status(), 409, "{method} with a stale etag");
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        ct.as_deref()
            .is_some_and(|ct| ct.starts_with("application/json")),
        "Content-Type {ct:?}"
    );
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(
        etag,
        Some(format!("\"{current}\"")),
        "the 409 carries the current etag"
    );
    assert_eq!(
        r.text().await.unwrap(),
        conflict_body(method, path, carried, current)
    );
}

/// Snapshot of what the backend holds and has applied for `path`.
async fn backend_state(backend: &DemoBackend, path: &str) -> ((u16, String), usize) {
    (
        backend_get(&backend.url(), path).await,
        backend_log(&backend.url(), path).await.len(),
    )
}

/// PUT without If-Match, GET the etag, PUT the seed's body with the etag unquoted (as the seed's
/// curl sends it). Returns (old etag, current etag).
async fn seed_prelude(c: &Client, gw: &Gateway) -> (String, String) {
    let r = put(c, gw, DOC, None, r#"{"FirstName":"Bob"}"#).await;
    assert!(r.status().is_success(), "first PUT: {}", r.status());
    let (old, _) = read(c, gw, DOC).await;
    let r = put(c, gw, DOC, Some(&old), SEED_BODY).await;
    assert!(
        r.status().is_success(),
        "PUT with the current etag unquoted: {}",
        r.status()
    );
    let new = etag_of(&r).expect("a successful write answers with the new etag");
    assert_ne!(new, old, "the etag changes when the document changes");
    let (current, body) = read(c, gw, DOC).await;
    assert_eq!(current, new, "GET gives the etag the write answered with");
    assert_eq!(body, SEED_BODY);
    (old, current)
}

#[tokio::test]
async fn seed_put_with_stale_etag_is_409_and_changes_nothing() {
    let (backend, gw, c) = start(&[]);
    let r = put(&c, &gw, DOC, None, r#"{"FirstName":"Bob"}"#).await;
    assert!(r.status().is_success(), "first PUT: {}", r.status());

    let r = c.get(format!("{}{DOC}", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let raw = r
        .headers()
        .get("etag")
        .expect("GET gives an ETag")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        raw.starts_with('"') && raw.ends_with('"') && raw.len() > 2,
        "ETag is a quoted strong etag: {raw}"
    );
    let old = etag_of(&r).unwrap();
    assert!(
        uuid::Uuid::parse_str(&old).is_ok(),
        "ETag is \"<uuid>\": {raw}"
    );

    let r = put(&c, &gw, DOC, Some(&old), SEED_BODY).await;
    assert!(
        r.status().is_success(),
        "PUT with the current etag unquoted: {}",
        r.status()
    );
    let current = etag_of(&r).expect("a successful write answers with the new etag");
    assert_ne!(current, old);
    assert_eq!(
        backend_get(&backend.url(), DOC).await,
        (200, SEED_BODY.to_string())
    );

    let before = backend_state(&backend, DOC).await;
    let r = put(&c, &gw, DOC, Some(&old), r#"{ FirstName : 'Bobby' }"#).await;
    assert_conflict(r, "PUT", DOC, &old, &current).await;
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PUT reached the backend"
    );
}

#[tokio::test]
async fn patch_and_delete_with_stale_etag_are_409_and_change_nothing() {
    let (backend, gw, c) = start(&[]);
    let (old, current) = seed_prelude(&c, &gw).await;
    let before = backend_state(&backend, DOC).await;

    let r = c
        .patch(format!("{}{DOC}", gw.url()))
        .header("If-Match", &old)
        .body(r#"{"LastName":"Jones"}"#)
        .send()
        .await
        .unwrap();
    assert_conflict(r, "PATCH", DOC, &old, &current).await;
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PATCH reached the backend"
    );

    let r = c
        .delete(format!("{}{DOC}", gw.url()))
        .header("If-Match", &old)
        .send()
        .await
        .unwrap();
    assert_conflict(r, "DELETE", DOC, &old, &current).await;
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused DELETE reached the backend"
    );

    // Still the current etag: nothing changed.
    assert_eq!(read(&c, &gw, DOC).await.0, current);
}

#[tokio::test]
async fn quoted_if_match_with_current_etag_succeeds() {
    let (backend, gw, c) = start(&[]);
    let (_, current) = seed_prelude(&c, &gw).await;
    let r = put(&c, &gw, DOC, Some(&format!("\"{current}\"")), r#"{"v":2}"#).await;
    assert!(
        r.status().is_success(),
        "PUT with the current etag quoted: {}",
        r.status()
    );
    let next = etag_of(&r).expect("new etag");
    assert_ne!(next, current);
    assert_eq!(
        backend_get(&backend.url(), DOC).await,
        (200, r#"{"v":2}"#.to_string())
    );

    // A list with the current etag in it matches too (RFC 9110 If-Match).
    let r = put(
        &c,
        &gw,
        DOC,
        Some(&format!("\"nope\", \"{next}\"")),
        r#"{"v":3}"#,
    )
    .await;
    assert!(
        r.status().is_success(),
        "PUT with a list holding the current etag: {}",
        r.status()
    );
    assert_eq!(
        backend_get(&backend.url(), DOC).await,
        (200, r#"{"v":3}"#.to_string())
    );
}

#[tokio::test]
async fn last_one_wins_without_if_match() {
    let (backend, gw, c) = start(&[]);
    let r = put(&c, &gw, DOC, None, "first").await;
    assert!(r.status().is_success());
    let (e0, _) = read(&c, &gw, DOC).await;

    let r = put(&c, &gw, DOC, None, "second").await;
    assert!(r.status().is_success());
    let answered1 = etag_of(&r);
    let (e1, body) = read(&c, &gw, DOC).await;
    assert_eq!(body, "second");
    assert_ne!(e1, e0, "the etag changes after an unconditional write");
    if let Some(a) = answered1 {
        assert_eq!(a, e1, "the write's ETag is the one GET gives next");
    }

    let r = put(&c, &gw, DOC, None, "third").await;
    assert!(r.status().is_success());
    let (e2, body) = read(&c, &gw, DOC).await;
    assert_eq!(body, "third", "the last write wins");
    assert_ne!(e2, e1);
    assert_ne!(e2, e0);
    assert_eq!(
        backend_get(&backend.url(), DOC).await,
        (200, "third".to_string())
    );
    assert_eq!(backend_log(&backend.url(), DOC).await.len(), 3);

    // The etag from before the unconditional writes is stale now.
    let r = put(&c, &gw, DOC, Some(&e0), "stale").await;
    assert_eq!(r.status(), 409);
    assert_eq!(
        backend_get(&backend.url(), DOC).await,
        (200, "third".to_string())
    );
}

#[tokio::test]
async fn delete_with_current_etag_then_put_with_it_is_409() {
    let (backend, gw, c) = start(&[]);
    let (_, current) = seed_prelude(&c, &gw).await;
    let r = c
        .delete(format!("{}{DOC}", gw.url()))
        .header("If-Match", &current)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "DELETE with the current etag: {}",
        r.status()
    );
    assert_eq!(backend_get(&backend.url(), DOC).await.0, 404);

    let before = backend_state(&backend, DOC).await;
    let r = put(&c, &gw, DOC, Some(&current), "resurrected").await;
    assert_eq!(r.status(), 409, "PUT with the etag of a deleted document");
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PUT reached the backend"
    );
}

#[tokio::test]
async fn if_match_on_a_document_the_gateway_never_saw_is_a_conflict() {
    let (backend, gw, c) = start(&[]);
    // The document exists, but was written behind the gateway's back.
    let r = c
        .put(format!("{}{DOC}", backend.url()))
        .body("direct")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let before = backend_state(&backend, DOC).await;

    let guess = uuid::Uuid::new_v4().to_string();
    let r = put(&c, &gw, DOC, Some(&format!("\"{guess}\"")), "guessed").await;
    assert_eq!(
        r.status(),
        409,
        "an etag the gateway cannot vouch for is never accepted"
    );
    let r = c
        .delete(format!("{}{DOC}", gw.url()))
        .header("If-Match", &guess)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused write reached the backend"
    );
}

#[tokio::test]
async fn malformed_if_match_is_400_and_nothing_is_forwarded() {
    let (backend, gw, c) = start(&[]);
    let (_, current) = seed_prelude(&c, &gw).await;
    let before = backend_state(&backend, DOC).await;

    let r = put(&c, &gw, DOC, Some("\"unterminated"), "malformed").await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("a JSON error body");
    assert!(
        body["error"].is_string(),
        "body has an \"error\" string: {body}"
    );
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "a request with a malformed If-Match was forwarded"
    );
    assert_eq!(
        read(&c, &gw, DOC).await.0,
        current,
        "the etag did not change"
    );
}

#[tokio::test]
async fn path_aliases_share_one_etag() {
    let (backend, gw, c) = start(&[]);
    let r = put(&c, &gw, "/docs/a", None, "v1").await;
    assert!(r.status().is_success());
    let (etag, _) = read(&c, &gw, "/docs/a").await;

    // Sent byte for byte (reqwest would normalise some of these spellings itself).
    for alias in [
        "/docs/a",
        "/docs//a/",
        "/docs/./a",
        "/docs/%61",
        "/docs/x/../a",
    ] {
        let r = raw_request(gw.addr(), "GET", alias, &[], b"");
        assert_eq!(r.status, 200, "GET {alias}");
        assert_eq!(
            r.etag().as_deref(),
            Some(etag.as_str()),
            "GET {alias} gives the etag of /docs/a"
        );
        assert_eq!(r.text(), "v1", "GET {alias}");
    }

    // A write through one spelling makes the etag stale for every spelling.
    let quoted = format!("\"{etag}\"");
    let r = raw_request(
        gw.addr(),
        "PUT",
        "/docs/%61",
        &[("If-Match", &quoted)],
        b"v2",
    );
    assert!(
        (200..300).contains(&r.status),
        "PUT /docs/%61 with the current etag: {}",
        r.status
    );
    let before = backend_state(&backend, "/docs/a").await;
    assert_eq!(before.0, (200, "v2".to_string()));
    for alias in ["/docs/a", "/docs//a/", "/docs/./a"] {
        let r = raw_request(
            gw.addr(),
            "PUT",
            alias,
            &[("If-Match", &quoted)],
            b"lost update",
        );
        assert_eq!(
            r.status, 409,
            "PUT {alias} with the etag /docs/%61 just used"
        );
    }
    assert_eq!(
        backend_state(&backend, "/docs/a").await,
        before,
        "a stale write through an alias reached the backend"
    );
}

#[tokio::test]
async fn write_answered_5xx_makes_the_old_etag_stale() {
    // Every write is applied, then answered 500: the outcome is unknown to the gateway.
    let (backend, gw, c) = start(&["--fail-after-apply-rate", "1"]);
    let r = put(&c, &gw, DOC, None, "v1").await;
    assert!(
        r.status().is_server_error(),
        "the backend answers 500: {}",
        r.status()
    );
    let (e1, body) = read(&c, &gw, DOC).await;
    assert_eq!(body, "v1");

    let r = put(&c, &gw, DOC, Some(&format!("\"{e1}\"")), "v2").await;
    assert!(
        r.status().is_server_error(),
        "the backend answers 500: {}",
        r.status()
    );
    // The backend did apply it.
    assert_eq!(
        backend_get(&backend.url(), DOC).await,
        (200, "v2".to_string())
    );

    let before = backend_state(&backend, DOC).await;
    let r = put(&c, &gw, DOC, Some(&format!("\"{e1}\"")), "v3 based on v1").await;
    assert_eq!(
        r.status(),
        409,
        "the etag from before a write with an unknown outcome must be refused"
    );
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PUT reached the backend"
    );

    let (e2, body) = read(&c, &gw, DOC).await;
    assert_eq!(body, "v2");
    assert_ne!(
        e2, e1,
        "after an unknown outcome the next GET gives a new etag"
    );
}
