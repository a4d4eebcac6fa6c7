//! End-to-end: the conditional requests of RFC 9110 as the gateway implements them (If-None-Match,
//! HEAD, strong If-Match, lists, `*`, create-only, 412 and 428 policies, backend validators and
//! changes made behind the gateway, collections, If-Match on reads, POST with Location,
//! If-Unmodified-Since, malformed headers), with the real `etag-gateway` in front of the real
//! `demo-backend`. Every test also reads the backend directly (its documents or its applied log), so
//! that a request the gateway should have refused but forwarded is seen.

mod common;

use common::{
    backend_get, backend_log, client, etag_of, send, DemoBackend, Gateway, RawConnection,
};
use reqwest::{Client, Method, Response};
use serde_json::Value;
use std::time::Duration;

const DOC: &str = "/docs/a";

fn start(backend_args: &[&str], config: Option<&str>) -> (DemoBackend, Gateway, Client) {
    let backend = DemoBackend::start(backend_args);
    let gateway = Gateway::start(&backend.url(), config);
    (backend, gateway, client())
}

/// `"<etag>"`
fn quoted(etag: &str) -> String {
    format!("\"{etag}\"")
}

/// GET through the gateway: 200 and an etag (nothing else is running), returned with the body.
async fn read(c: &Client, gw: &Gateway, path: &str) -> (String, String) {
    let r = send(c, Method::GET, &gw.url(), path, &[], None).await;
    assert_eq!(r.status(), 200, "GET {path} through the gateway");
    let etag = etag_of(&r).unwrap_or_else(|| panic!("GET {path}: no ETag"));
    (etag, r.text().await.unwrap())
}

/// PUT through the gateway without precondition; must succeed.
async fn put_unconditionally(c: &Client, gw: &Gateway, path: &str, body: &str) {
    let r = send(c, Method::PUT, &gw.url(), path, &[], Some(body)).await;
    assert!(
        r.status().is_success(),
        "unconditional PUT {path} through the gateway: {}",
        r.status()
    );
}

/// PUT directly on the backend, behind the gateway's back; must succeed.
async fn put_behind_the_gateway(c: &Client, backend: &DemoBackend, path: &str, body: &str) {
    let r = send(c, Method::PUT, &backend.url(), path, &[], Some(body)).await;
    assert!(
        r.status().is_success(),
        "PUT {path} directly on the backend: {}",
        r.status()
    );
}

/// What the backend holds at `path` and how many writes it applied there.
/// PUT `body` with `If-Match: "<etag>"`.
async fn put_if_match(c: &Client, gw: &Gateway, path: &str, etag: &str, body: &str) -> Response {
    send(
        c,
        Method::PUT,
        &gw.url(),
        path,
        &[("If-Match", &quoted(etag))],
        Some(body),
    )
    .await
}

/// Creates `DOC` ("v1"), reads its etag and updates it ("v2") with that etag: returns the etag that
/// is stale now, the current one, and the backend's state after the update.
async fn an_etag_made_stale(
    c: &Client,
    gw: &Gateway,
    backend: &DemoBackend,
) -> (String, String, ((u16, String), usize)) {
    put_unconditionally(c, gw, DOC, "v1").await;
    let (old, _) = read(c, gw, DOC).await;
    let r = put_if_match(c, gw, DOC, &old, "v2").await;
    assert!(
        r.status().is_success(),
        "PUT with the current etag: {}",
        r.status()
    );
    let current = etag_of(&r).expect("new etag");
    (old, current, backend_state(backend, DOC).await)
}

/// The seed's 409 body for a stale PUT of `DOC`: the etag it carried, and the current one.
fn assert_seed_conflict(body: &Value, carried: &str, current: &str) {
    assert_eq!(body["url"], DOC);
    assert_eq!(body["actualETag"], carried);
    assert_eq!(body["expectedETag"], current);
    assert_eq!(
        body["error"],
        "PUT attempted on document 'a' using a non current etag"
    );
}

async fn backend_state(backend: &DemoBackend, path: &str) -> ((u16, String), usize) {
    (
        backend_get(&backend.url(), path).await,
        backend_log(&backend.url(), path).await.len(),
    )
}

/// Every write the backend applied, on any path.
async fn whole_backend_log(c: &Client, backend: &DemoBackend) -> Vec<Value> {
    let r = send(c, Method::GET, &backend.url(), "/__demo/log", &[], None).await;
    assert_eq!(r.status(), 200, "GET /__demo/log");
    r.json().await.expect("applied log is a JSON array")
}

/// 304 with `ETag: "<etag>"` and no body.
async fn assert_not_modified(r: Response, etag: &str, what: &str) {
    assert_eq!(r.status(), 304, "{what}");
    assert_eq!(
        etag_of(&r).as_deref(),
        Some(etag),
        "{what}: ETag of the 304"
    );
    assert_eq!(r.text().await.unwrap(), "", "{what}: a 304 has no body");
}

/// The answer's JSON body, checking its Content-Type.
async fn json_body(r: Response, what: &str) -> Value {
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        ct.as_deref()
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{what}: Content-Type {ct:?}"
    );
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"))
}

#[tokio::test]
async fn if_none_match_with_current_etag_is_304_with_the_etag() {
    // Backend without validators: the gateway answers from its table.
    {
        let (backend, gw, c) = start(&["--validators", "none"], None);
        put_unconditionally(&c, &gw, DOC, "v1").await;
        let (etag, _) = read(&c, &gw, DOC).await;

        let inm = quoted(&etag);
        let r = send(
            &c,
            Method::GET,
            &gw.url(),
            DOC,
            &[("If-None-Match", &inm)],
            None,
        )
        .await;
        assert_not_modified(
            r,
            &etag,
            "no validators: If-None-Match with the current etag",
        )
        .await;

        // Weak comparison: W/"<etag>" names the same state.
        let weak = format!("W/{inm}");
        let r = send(
            &c,
            Method::GET,
            &gw.url(),
            DOC,
            &[("If-None-Match", &weak)],
            None,
        )
        .await;
        assert_not_modified(r, &etag, "no validators: If-None-Match W/<current etag>").await;

        // Another etag: the full answer.
        let other = quoted(&uuid::Uuid::new_v4().to_string());
        let r = send(
            &c,
            Method::GET,
            &gw.url(),
            DOC,
            &[("If-None-Match", &other)],
            None,
        )
        .await;
        assert_eq!(r.status(), 200, "If-None-Match with another etag");
        assert_eq!(etag_of(&r).as_deref(), Some(etag.as_str()));
        assert_eq!(r.text().await.unwrap(), "v1");

        assert_eq!(backend_state(&backend, DOC).await, ((200, "v1".into()), 1));
    }

    // Backend with validators: the gateway revalidates with the backend's own etag.
    {
        let (backend, gw, c) = start(&["--validators", "etag"], None);
        put_unconditionally(&c, &gw, DOC, "v1").await;
        let (etag, _) = read(&c, &gw, DOC).await;
        let inm = quoted(&etag);
        let r = send(
            &c,
            Method::GET,
            &gw.url(),
            DOC,
            &[("If-None-Match", &inm)],
            None,
        )
        .await;
        assert_not_modified(r, &etag, "validators: If-None-Match with the current etag").await;
        let weak = format!("W/{inm}");
        let r = send(
            &c,
            Method::GET,
            &gw.url(),
            DOC,
            &[("If-None-Match", &weak)],
            None,
        )
        .await;
        assert_not_modified(r, &etag, "validators: If-None-Match W/<current etag>").await;
        assert_eq!(backend_state(&backend, DOC).await, ((200, "v1".into()), 1));

        // The gateway really asks the backend: after a change behind its back, the same
        // If-None-Match gets the new body with a new etag, not a 304 from the table.
        put_behind_the_gateway(&c, &backend, DOC, "v2").await;
        let r = send(
            &c,
            Method::GET,
            &gw.url(),
            DOC,
            &[("If-None-Match", &inm)],
            None,
        )
        .await;
        assert_eq!(
            r.status(),
            200,
            "revalidation after a change behind the gateway"
        );
        let rotated = etag_of(&r).expect("an etag for the new state");
        assert_ne!(rotated, etag, "the etag rotates with the change");
        assert_eq!(r.text().await.unwrap(), "v2");
        assert_eq!(backend_state(&backend, DOC).await, ((200, "v2".into()), 2));
    }
}

#[tokio::test]
async fn head_gets_the_same_etag_as_get() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (etag, _) = read(&c, &gw, DOC).await;
    let r = send(&c, Method::HEAD, &gw.url(), DOC, &[], None).await;
    assert_eq!(r.status(), 200, "HEAD");
    assert_eq!(
        etag_of(&r).as_deref(),
        Some(etag.as_str()),
        "HEAD after GET"
    );
    assert_eq!(r.text().await.unwrap(), "", "HEAD has no body");

    // HEAD first: GET then names the same state with the same etag.
    put_unconditionally(&c, &gw, "/docs/b", "b1").await;
    let r = send(&c, Method::HEAD, &gw.url(), "/docs/b", &[], None).await;
    assert_eq!(r.status(), 200, "HEAD");
    let head_etag = etag_of(&r).expect("HEAD gives an ETag");
    let (get_etag, body) = read(&c, &gw, "/docs/b").await;
    assert_eq!(get_etag, head_etag, "GET after HEAD");
    assert_eq!(body, "b1");

    assert_eq!(backend_state(&backend, DOC).await, ((200, "v1".into()), 1));
    assert_eq!(
        backend_state(&backend, "/docs/b").await,
        ((200, "b1".into()), 1)
    );
}

#[tokio::test]
async fn if_match_with_weak_etag_is_refused_strong_comparison() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (etag, _) = read(&c, &gw, DOC).await;
    let before = backend_state(&backend, DOC).await;

    let weak = format!("W/{}", quoted(&etag));
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", &weak)],
        Some("v2"),
    )
    .await;
    assert_eq!(
        r.status(),
        409,
        "If-Match W/<current etag> (strong comparison)"
    );
    assert_eq!(
        etag_of(&r).as_deref(),
        Some(etag.as_str()),
        "the conflict carries the current etag"
    );
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PUT reached the backend"
    );
    // The refusal changed nothing: the strong form still matches.
    assert_eq!(read(&c, &gw, DOC).await.0, etag);
}

#[tokio::test]
async fn if_match_list_containing_current_etag_is_accepted() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (etag, _) = read(&c, &gw, DOC).await;

    let list = format!("\"x\", {}", quoted(&etag));
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", &list)],
        Some("v2"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "If-Match list holding the current etag: {}",
        r.status()
    );
    let next = etag_of(&r).expect("a successful write answers with the new etag");
    assert_ne!(next, etag);
    assert_eq!(backend_state(&backend, DOC).await, ((200, "v2".into()), 2));
}

#[tokio::test]
async fn if_match_star_needs_an_existing_document() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    read(&c, &gw, DOC).await;

    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", "*")],
        Some("v2"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "If-Match: * on a document the gateway has seen: {}",
        r.status()
    );
    assert_eq!(backend_state(&backend, DOC).await, ((200, "v2".into()), 2));

    let r = send(&c, Method::DELETE, &gw.url(), DOC, &[], None).await;
    assert!(r.status().is_success(), "DELETE: {}", r.status());
    let before = backend_state(&backend, DOC).await;
    assert_eq!(before.0 .0, 404, "the backend deleted it");

    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", "*")],
        Some("resurrected"),
    )
    .await;
    assert_eq!(r.status(), 409, "If-Match: * on a deleted document");
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PUT reached the backend"
    );
}

#[tokio::test]
async fn if_none_match_star_creates_only() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    let create_only = [("If-None-Match", "*")];

    // (a) A document the gateway has seen.
    put_unconditionally(&c, &gw, DOC, "v1").await;
    read(&c, &gw, DOC).await;
    let before = backend_state(&backend, DOC).await;
    let r = send(&c, Method::PUT, &gw.url(), DOC, &create_only, Some("again")).await;
    assert_eq!(
        r.status(),
        409,
        "create-only on a document the gateway has seen"
    );
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PUT reached the backend"
    );

    // (b) A document that exists at the backend only (the gateway never saw it): probed.
    let hidden = "/docs/hidden";
    put_behind_the_gateway(&c, &backend, hidden, "direct").await;
    let before = backend_state(&backend, hidden).await;
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        hidden,
        &create_only,
        Some("overwrite"),
    )
    .await;
    assert_eq!(
        r.status(),
        409,
        "create-only on a document that exists at the backend only"
    );
    assert_eq!(
        backend_state(&backend, hidden).await,
        before,
        "the refused PUT reached the backend"
    );
    assert_eq!(before, ((200, "direct".into()), 1));

    // (c) A new document.
    let new = "/docs/new";
    let r = send(&c, Method::PUT, &gw.url(), new, &create_only, Some("fresh")).await;
    assert_eq!(r.status(), 201, "create-only on a new document");
    let created = etag_of(&r).expect("the created document gets an etag");
    assert_eq!(
        backend_state(&backend, new).await,
        ((200, "fresh".into()), 1)
    );
    assert_eq!(read(&c, &gw, new).await.0, created);
}

#[tokio::test]
async fn conflict_status_412_answers_412_with_the_seed_body() {
    let (backend, gw, c) = start(
        &["--validators", "none"],
        Some("[policy]\nconflict_status = 412\n"),
    );
    let (old, current, before) = an_etag_made_stale(&c, &gw, &backend).await;

    let r = put_if_match(&c, &gw, DOC, &old, "stale").await;
    assert_eq!(r.status(), 412, "stale If-Match with conflict_status = 412");
    assert_eq!(etag_of(&r).as_deref(), Some(current.as_str()));
    let body = json_body(r, "412").await;
    let fields: Vec<&str> = body
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = fields.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        ["actualETag", "error", "expectedETag", "url"],
        "the seed's fields: {body}"
    );
    assert_seed_conflict(&body, &old, &current);
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PUT reached the backend"
    );
    assert_eq!(before, ((200, "v2".into()), 2));
}

#[tokio::test]
async fn require_if_match_answers_428_to_unconditional_writes() {
    let (backend, gw, c) = start(
        &["--validators", "none"],
        Some("[policy]\nrequire_if_match = true\n"),
    );
    let r = send(&c, Method::PUT, &gw.url(), DOC, &[], Some("unconditional")).await;
    assert_eq!(r.status(), 428, "unconditional PUT with require_if_match");
    let body = json_body(r, "428").await;
    let hint = body["hint"].as_str().unwrap_or_default();
    assert!(
        hint.contains("If-Match"),
        "the hint says how to resubmit: {body}"
    );
    assert_eq!(
        whole_backend_log(&c, &backend).await.len(),
        0,
        "the refused PUT reached the backend"
    );
    assert_eq!(backend_get(&backend.url(), DOC).await.0, 404);

    // Create-only is a precondition too.
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-None-Match", "*")],
        Some("v1"),
    )
    .await;
    assert_eq!(r.status(), 201, "create-only PUT with require_if_match");
    assert_eq!(backend_state(&backend, DOC).await, ((200, "v1".into()), 1));

    let (etag, _) = read(&c, &gw, DOC).await;
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", &quoted(&etag))],
        Some("v2"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "PUT with the current etag with require_if_match: {}",
        r.status()
    );
    assert_eq!(backend_state(&backend, DOC).await, ((200, "v2".into()), 2));

    // Still 428 without a precondition on an existing document.
    let r = send(&c, Method::PUT, &gw.url(), DOC, &[], Some("v3")).await;
    assert_eq!(r.status(), 428);
    assert_eq!(backend_state(&backend, DOC).await, ((200, "v2".into()), 2));
}

#[tokio::test]
async fn out_of_band_change_rotates_the_etag() {
    let (backend, gw, c) = start(&["--validators", "etag"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (e1, _) = read(&c, &gw, DOC).await;
    put_behind_the_gateway(&c, &backend, DOC, "out of band").await;
    let (e2, body) = read(&c, &gw, DOC).await;
    assert_eq!(body, "out of band");
    assert_ne!(e2, e1, "a change behind the gateway rotates the etag");

    let before = backend_state(&backend, DOC).await;
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", &quoted(&e1))],
        Some("based on v1"),
    )
    .await;
    assert_eq!(r.status(), 409, "PUT with the etag from before the change");
    assert_eq!(etag_of(&r).as_deref(), Some(e2.as_str()));
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the stale PUT reached the backend"
    );
    assert_eq!(before.0, (200, "out of band".to_string()));
}

#[tokio::test]
async fn out_of_band_change_between_read_and_write_is_a_conflict() {
    let (backend, gw, c) = start(&["--validators", "etag"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (e1, _) = read(&c, &gw, DOC).await;
    put_behind_the_gateway(&c, &backend, DOC, "out of band").await;
    let before = backend_state(&backend, DOC).await;

    // No read in between: the gateway still believes E1 is current and forwards the write with the
    // backend's own etag as If-Match; the backend refuses it (412).
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", &quoted(&e1))],
        Some("based on v1"),
    )
    .await;
    assert_eq!(
        r.status(),
        409,
        "PUT with an etag the backend's state no longer matches"
    );
    let body = json_body(r, "conflict").await;
    assert_eq!(body["actualETag"], e1.as_str(), "{body}");
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the backend applied the stale PUT"
    );
    assert_eq!(before, ((200, "out of band".into()), 2));

    // E1 stays refused, and the next read names the out-of-band state with a new etag.
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", &quoted(&e1))],
        Some("based on v1, again"),
    )
    .await;
    assert_eq!(r.status(), 409, "the same stale PUT again");
    let (e2, body) = read(&c, &gw, DOC).await;
    assert_ne!(e2, e1);
    assert_eq!(body, "out of band");
    assert_eq!(backend_state(&backend, DOC).await, before);
}

#[tokio::test]
async fn write_to_a_child_changes_the_collection_etag() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, "/docs/a", "a").await;
    put_unconditionally(&c, &gw, "/docs/b", "b").await;
    let (e, listing) = read(&c, &gw, "/docs").await;
    let listing: Value = serde_json::from_str(&listing).expect("a JSON listing");
    assert_eq!(
        listing["items"].as_array().map(Vec::len),
        Some(2),
        "{listing}"
    );

    put_unconditionally(&c, &gw, "/docs/c", "c").await;
    let (e2, listing) = read(&c, &gw, "/docs").await;
    let listing: Value = serde_json::from_str(&listing).expect("a JSON listing");
    assert_eq!(
        listing["items"].as_array().map(Vec::len),
        Some(3),
        "{listing}"
    );
    assert_ne!(e2, e, "a write to a child changes the collection's etag");

    let before = backend_state(&backend, "/docs").await;
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/docs",
        &[("If-Match", &quoted(&e))],
        Some("replaces the listing"),
    )
    .await;
    assert_eq!(r.status(), 409, "PUT /docs with the collection's old etag");
    assert_eq!(etag_of(&r).as_deref(), Some(e2.as_str()));
    assert_eq!(
        backend_state(&backend, "/docs").await,
        before,
        "the stale PUT reached the backend"
    );
    assert_eq!(before.1, 0, "nothing was ever written at /docs itself");
}

#[tokio::test]
async fn if_match_on_get_is_evaluated_by_the_gateway() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (e1, _) = read(&c, &gw, DOC).await;
    put_unconditionally(&c, &gw, DOC, "v2").await;
    let (e2, _) = read(&c, &gw, DOC).await;
    assert_ne!(e1, e2);

    let r = send(
        &c,
        Method::GET,
        &gw.url(),
        DOC,
        &[("If-Match", &quoted(&e1))],
        None,
    )
    .await;
    assert_eq!(r.status(), 409, "GET with a stale If-Match");
    assert_eq!(etag_of(&r).as_deref(), Some(e2.as_str()));
    let body = json_body(r, "conflict").await;
    assert_ne!(body["error"], Value::Null, "{body}");

    let r = send(
        &c,
        Method::GET,
        &gw.url(),
        DOC,
        &[("If-Match", &quoted(&e2))],
        None,
    )
    .await;
    assert_eq!(r.status(), 200, "GET with the current If-Match");
    assert_eq!(etag_of(&r).as_deref(), Some(e2.as_str()));
    assert_eq!(r.text().await.unwrap(), "v2");
    assert_eq!(backend_state(&backend, DOC).await, ((200, "v2".into()), 2));
}

#[tokio::test]
async fn post_location_gets_an_etag_when_post_is_guarded() {
    let (backend, gw, c) = start(
        &["--validators", "none"],
        Some("[policy]\nguarded_methods = [\"PUT\", \"PATCH\", \"DELETE\", \"POST\"]\n"),
    );
    let r = send(&c, Method::POST, &gw.url(), "/docs", &[], Some("posted")).await;
    assert_eq!(r.status(), 201, "POST /docs");
    let location = r
        .headers()
        .get("location")
        .expect("POST answers with Location")
        .to_str()
        .unwrap()
        .to_string();
    let id = location
        .strip_prefix("/docs/")
        .unwrap_or_else(|| panic!("Location /docs/<id>: {location}"));
    assert!(!id.is_empty() && !id.contains('/'), "Location {location}");
    let etag = etag_of(&r).expect("the created resource's etag");
    assert_eq!(
        backend_state(&backend, &location).await,
        ((200, "posted".into()), 1)
    );

    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        &location,
        &[("If-Match", &quoted(&etag))],
        Some("updated"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "PUT {location} with the etag the POST answered with: {}",
        r.status()
    );
    assert_eq!(
        backend_state(&backend, &location).await,
        ((200, "updated".into()), 2)
    );
}

#[tokio::test]
async fn if_unmodified_since_uses_the_backend_last_modified() {
    let (backend, gw, c) = start(&["--validators", "last-modified"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let r = send(&c, Method::GET, &gw.url(), DOC, &[], None).await;
    assert_eq!(r.status(), 200);
    let last_modified = r
        .headers()
        .get("last-modified")
        .expect("the backend sends Last-Modified")
        .to_str()
        .unwrap()
        .to_string();
    let last_modified = httpdate::parse_http_date(&last_modified).expect("an HTTP date");
    let before = backend_state(&backend, DOC).await;

    let earlier = httpdate::fmt_http_date(last_modified - Duration::from_secs(3600));
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Unmodified-Since", &earlier)],
        Some("based on an older state"),
    )
    .await;
    assert_eq!(
        r.status(),
        409,
        "If-Unmodified-Since an hour before Last-Modified"
    );
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the refused PUT reached the backend"
    );

    let at = httpdate::fmt_http_date(last_modified);
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Unmodified-Since", &at)],
        Some("v2"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "If-Unmodified-Since = Last-Modified: {}",
        r.status()
    );
    assert_eq!(backend_state(&backend, DOC).await, ((200, "v2".into()), 2));

    let later = httpdate::fmt_http_date(last_modified + Duration::from_secs(3600));
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Unmodified-Since", &later)],
        Some("v3"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "If-Unmodified-Since an hour after Last-Modified: {}",
        r.status()
    );
    assert_eq!(backend_state(&backend, DOC).await, ((200, "v3".into()), 3));
}

#[tokio::test]
async fn malformed_if_none_match_is_400_and_nothing_is_forwarded() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (etag, _) = read(&c, &gw, DOC).await;
    let before = backend_state(&backend, DOC).await;

    for method in [Method::GET, Method::PUT] {
        let body = (method == Method::PUT).then_some("malformed");
        let r = send(
            &c,
            method.clone(),
            &gw.url(),
            DOC,
            &[("If-None-Match", "\"open")],
            body,
        )
        .await;
        assert_eq!(r.status(), 400, "{method} with If-None-Match: \"open");
        let body = json_body(r, "400").await;
        assert!(body["error"].is_string(), "{body}");
        assert_eq!(body["header"], "If-None-Match", "{body}");
    }
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "a request with a malformed If-None-Match was forwarded"
    );
    assert_eq!(read(&c, &gw, DOC).await.0, etag, "the etag did not change");
}

// ---- Found while writing the tests above: a 404, an out-of-band change and nested listings ----

/// BUG: with a backend that has validators, `If-Match` on a GET is checked only against the table.
/// After a change behind the gateway the table still holds E1, so the GET goes through and the
/// client receives the other state (with a rotated etag) although it asked for E1 only.
#[tokio::test]
async fn get_with_if_match_after_an_out_of_band_change_is_a_conflict() {
    let (backend, gw, c) = start(&["--validators", "etag"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (e1, _) = read(&c, &gw, DOC).await;
    put_behind_the_gateway(&c, &backend, DOC, "out of band").await;
    let before = backend_state(&backend, DOC).await;

    let r = send(
        &c,
        Method::GET,
        &gw.url(),
        DOC,
        &[("If-Match", &quoted(&e1))],
        None,
    )
    .await;
    let (status, etag) = (r.status(), etag_of(&r));
    let body = r.text().await.unwrap();
    assert_eq!(
        status, 409,
        "GET with If-Match E1 after the backend changed (its validator no longer matches): got \
         ETag {etag:?} (E1 = {e1}) and body {body:?}"
    );
    assert_eq!(backend_state(&backend, DOC).await, before);
}

/// BUG: the gateway reads a 404 for a resource whose etag it holds (deleted behind its back, naive
/// backend) and keeps vouching for that etag: If-None-Match E1 is answered 304 from the table, and a
/// PUT with If-Match E1 is forwarded and re-creates the document.
#[tokio::test]
async fn an_etag_does_not_survive_a_404_read() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, DOC, "v1").await;
    let (e1, _) = read(&c, &gw, DOC).await;
    let r = send(&c, Method::DELETE, &backend.url(), DOC, &[], None).await;
    assert!(r.status().is_success(), "DELETE directly on the backend");
    let r = send(&c, Method::GET, &gw.url(), DOC, &[], None).await;
    assert_eq!(r.status(), 404, "the gateway sees the document is gone");
    let before = backend_state(&backend, DOC).await;
    assert_eq!(before.0 .0, 404);

    let r = send(
        &c,
        Method::GET,
        &gw.url(),
        DOC,
        &[("If-None-Match", &quoted(&e1))],
        None,
    )
    .await;
    assert_ne!(
        r.status(),
        304,
        "If-None-Match E1 after the gateway itself read 404 (ETag {:?})",
        etag_of(&r)
    );

    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        DOC,
        &[("If-Match", &quoted(&e1))],
        Some("resurrected"),
    )
    .await;
    assert_eq!(
        r.status(),
        409,
        "PUT If-Match E1 after the gateway itself read 404"
    );
    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "the stale PUT re-created the deleted document"
    );
}

/// BUG: a write invalidates only its direct parent's etag, but the demo backend's listing of
/// `/docs` includes every document below it: after PUT /docs/y/z the listing of /docs changed and
/// its etag did not, so a write based on the old listing passes.
#[tokio::test]
async fn write_to_a_grandchild_changes_the_collection_etag() {
    let (backend, gw, c) = start(&["--validators", "none"], None);
    put_unconditionally(&c, &gw, "/docs/x", "x").await;
    let (e, listing) = read(&c, &gw, "/docs").await;
    put_unconditionally(&c, &gw, "/docs/y/z", "z").await;
    let (e2, listing2) = read(&c, &gw, "/docs").await;
    assert_ne!(listing, listing2, "the backend's listing of /docs changed");
    assert_ne!(e2, e, "same etag for two listings: {listing} / {listing2}");

    let before = backend_state(&backend, "/docs").await;
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/docs",
        &[("If-Match", &quoted(&e))],
        Some("based on the old listing"),
    )
    .await;
    assert_eq!(
        r.status(),
        409,
        "PUT /docs with the etag of the old listing"
    );
    assert_eq!(backend_state(&backend, "/docs").await, before);
}

#[tokio::test]
async fn a_refused_write_with_a_small_body_keeps_the_connection() {
    let (backend, gw, c) = start(&[], None);
    let (old, current, before) = an_etag_made_stale(&c, &gw, &backend).await;
    let stale = quoted(&old);

    // Two stale writes with a small body on one connection: the gateway reads and drops each body,
    // answers the seed's conflict and keeps the connection for the next request.
    let mut conn = RawConnection::open(gw.addr());
    for attempt in 0..2 {
        let r = conn.request(
            "PUT",
            DOC,
            &[("If-Match", &stale), ("Content-Type", "application/json")],
            br#"{"v":3}"#,
        );
        assert_eq!(r.status, 409, "stale PUT {attempt}: {}", r.text());
        assert_eq!(
            r.etag().as_deref(),
            Some(current.as_str()),
            "stale PUT {attempt}"
        );
        assert_eq!(
            r.header("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("keep-alive"),
            "stale PUT {attempt}"
        );
        let body: Value = serde_json::from_slice(&r.body).expect("a JSON body");
        assert_seed_conflict(&body, &old, &current);
    }
    // The connection still carries ordinary requests.
    let r = conn.request("GET", DOC, &[], b"");
    assert_eq!(r.status, 200, "GET after two conflicts: {}", r.text());
    assert_eq!(r.etag().as_deref(), Some(current.as_str()));

    // A body over 16 KiB is left unread: answered, then the connection is closed.
    let large = vec![b'x'; 16 * 1024 + 1];
    let r = conn.request("PUT", DOC, &[("If-Match", &stale)], &large);
    assert_eq!(r.status, 409, "stale PUT with a large body: {}", r.text());
    assert_eq!(r.header("connection"), Some("close"));
    assert!(conn.closes_within(Duration::from_secs(3)));

    // So is a chunked body (its length is not known up front).
    let mut conn = RawConnection::open(gw.addr());
    let r = conn.request(
        "PUT",
        DOC,
        &[("If-Match", &stale), ("Transfer-Encoding", "chunked")],
        b"7\r\n{\"v\":4}\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 409, "stale chunked PUT: {}", r.text());
    assert_eq!(r.header("connection"), Some("close"));
    assert!(conn.closes_within(Duration::from_secs(3)));

    assert_eq!(
        backend_state(&backend, DOC).await,
        before,
        "a refused PUT reached the backend"
    );
    assert_eq!(before, ((200, "v2".into()), 2));
}
