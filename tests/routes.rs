//! End-to-end: `[[route]]` tables. Two real demo backends behind one real gateway: `/a` goes to
//! backend A under its own policy (412, If-Match required), everything else to backend B under
//! `[policy]` (409, If-Match optional). Every test reads the backends' applied logs directly, so a
//! request that went to the wrong backend, or was forwarded when it should have been refused, is seen.
//! Then: a route chosen by host, and a dead server in a route's list skipped once the health check
//! noticed it.

mod common;

use common::{backend_log, client, etag_of, send, DemoBackend, Gateway};
use reqwest::{Client, Method};
use std::net::TcpListener;
use std::time::Duration;

/// `/a` → A (412, If-Match required); `/h` for host `api.example.com` → A; the rest → B (409).
fn routes_config(a: &DemoBackend) -> String {
    format!(
        "[policy]\nconflict_status = 409\nrequire_if_match = false\n\
         [[route]]\nprefix = \"/a\"\nupstream = \"{a}\"\nconflict_status = 412\nrequire_if_match = true\n\
         [[route]]\nprefix = \"/h\"\nhost = \"api.example.com\"\nupstream = \"{a}\"\n",
        a = a.url()
    )
}

/// Writes applied at `path` by each backend: (A, B).
async fn applied(a: &DemoBackend, b: &DemoBackend, path: &str) -> (usize, usize) {
    (
        backend_log(&a.url(), path).await.len(),
        backend_log(&b.url(), path).await.len(),
    )
}

/// GET through the gateway: 200 and an etag.
async fn current_etag(c: &Client, gw: &Gateway, path: &str) -> String {
    let r = send(c, Method::GET, &gw.url(), path, &[], None).await;
    assert_eq!(r.status(), 200, "GET {path}");
    etag_of(&r).unwrap_or_else(|| panic!("GET {path}: no ETag"))
}

#[tokio::test]
async fn each_route_reaches_its_backend_under_its_own_policy() {
    let a = DemoBackend::start(&[]);
    let b = DemoBackend::start(&[]);
    let gw = Gateway::start(&b.url(), Some(&routes_config(&a)));
    let c = client();

    // Route /a requires If-Match: an unconditional write is 428 and reaches no backend.
    let r = send(&c, Method::PUT, &gw.url(), "/a/doc", &[], Some("v0")).await;
    assert_eq!(
        r.status(),
        428,
        "unconditional PUT on the route that requires If-Match"
    );
    assert_eq!(applied(&a, &b, "/a/doc").await, (0, 0));

    // Create-only is still allowed there; the existence probe (HEAD) goes to A, which says 404.
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/a/doc",
        &[("If-None-Match", "*")],
        Some("v1"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "create-only PUT /a/doc: {}",
        r.status()
    );
    assert_eq!(
        applied(&a, &b, "/a/doc").await,
        (1, 0),
        "the write went to A only"
    );

    let e1 = current_etag(&c, &gw, "/a/doc").await;
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/a/doc",
        &[("If-Match", &e1)],
        Some("v2"),
    )
    .await;
    assert_eq!(r.status(), 200, "PUT /a/doc with the current etag");
    // The stale etag: the route's 412, not [policy]'s 409; nothing forwarded.
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/a/doc",
        &[("If-Match", &e1)],
        Some("v3"),
    )
    .await;
    assert_eq!(r.status(), 412, "stale If-Match on /a");
    assert_eq!(applied(&a, &b, "/a/doc").await, (2, 0));

    // The default route: B, 409, If-Match optional.
    let r = send(&c, Method::PUT, &gw.url(), "/b/doc", &[], Some("w1")).await;
    assert!(
        r.status().is_success(),
        "unconditional PUT /b/doc: {}",
        r.status()
    );
    let e1 = current_etag(&c, &gw, "/b/doc").await;
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/b/doc",
        &[("If-Match", &e1)],
        Some("w2"),
    )
    .await;
    assert_eq!(r.status(), 200, "PUT /b/doc with the current etag");
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/b/doc",
        &[("If-Match", &e1)],
        Some("w3"),
    )
    .await;
    assert_eq!(r.status(), 409, "stale If-Match on the default route");
    assert_eq!(applied(&a, &b, "/b/doc").await, (0, 2));

    // Whole segments: /ab is not under /a; /a spelled differently is.
    let r = send(&c, Method::PUT, &gw.url(), "/ab/doc", &[], Some("x")).await;
    assert!(
        r.status().is_success(),
        "PUT /ab/doc goes to B without If-Match: {}",
        r.status()
    );
    assert_eq!(applied(&a, &b, "/ab/doc").await, (0, 1));
    let r = send(&c, Method::PUT, &gw.url(), "//a/./other/", &[], Some("x")).await;
    assert_eq!(r.status(), 428, "//a/./other/ is /a/other: route /a");

    // Reads follow the route too: /a/doc comes from A, which holds v2.
    let r = send(&c, Method::GET, &gw.url(), "/a/doc", &[], None).await;
    assert_eq!(r.text().await.unwrap(), "v2");
}

#[tokio::test]
async fn a_route_with_a_host_takes_only_that_host() {
    let a = DemoBackend::start(&[]);
    let b = DemoBackend::start(&[]);
    let gw = Gateway::start(&b.url(), Some(&routes_config(&a)));
    let c = client();

    // Matched case-insensitively, without the port.
    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/h/1",
        &[("Host", "API.example.com:8080")],
        Some("x"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "PUT /h/1 for api.example.com: {}",
        r.status()
    );
    assert_eq!(applied(&a, &b, "/h/1").await, (1, 0), "api.example.com → A");

    let r = send(
        &c,
        Method::PUT,
        &gw.url(),
        "/h/2",
        &[("Host", "other.example.com")],
        Some("x"),
    )
    .await;
    assert!(
        r.status().is_success(),
        "PUT /h/2 for another host: {}",
        r.status()
    );
    assert_eq!(
        applied(&a, &b, "/h/2").await,
        (0, 1),
        "another host → the default route"
    );

    let r = send(&c, Method::PUT, &gw.url(), "/h/3", &[], Some("x")).await;
    assert!(
        r.status().is_success(),
        "PUT /h/3 with the gateway's address as Host"
    );
    assert_eq!(applied(&a, &b, "/h/3").await, (0, 1));
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_dead_server_in_a_route_is_skipped_once_the_health_check_noticed() {
    let a = DemoBackend::start(&[]);
    let b = DemoBackend::start(&[]);
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let config = format!(
        "[upstream]\nhealth_check_interval_ms = 500\n\
         [[route]]\nprefix = \"/a\"\nupstream = [\"{dead}\", \"{a}\"]\n",
        a = a.url()
    );
    let gw = Gateway::start(&b.url(), Some(&config));
    let c = client();

    // Without health checks the round robin keeps choosing the dead server: about every other
    // request fails (a refused connection is not retried on the next server).
    let unchecked = Gateway::start(
        &b.url(),
        Some(&config.replace(
            "health_check_interval_ms = 500",
            "health_check_interval_ms = 0",
        )),
    );
    let mut failed = 0;
    for i in 0..4 {
        let path = format!("/a/unchecked{i}");
        let r = send(&c, Method::PUT, &unchecked.url(), &path, &[], Some("x")).await;
        if r.status() == 502 {
            failed += 1;
        }
    }
    assert!(
        failed > 0,
        "without health checks the dead server is still chosen"
    );
    drop(unchecked);

    // A few checks' worth of time.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let stderr = gw.stderr();
    assert!(
        stderr.contains("unhealthy"),
        "the health check should have reported the dead server:\n{stderr}"
    );
    for i in 0..20 {
        let path = format!("/a/doc{i}");
        let r = send(&c, Method::PUT, &gw.url(), &path, &[], Some("x")).await;
        assert!(
            r.status().is_success(),
            "PUT {path}: {} (the dead server should be skipped)",
            r.status()
        );
        assert_eq!(
            applied(&a, &b, &path).await,
            (1, 0),
            "{path} applied once, on A"
        );
    }
}

#[tokio::test]
async fn a_server_that_accepts_connections_but_fails_its_http_check_is_skipped() {
    let a = DemoBackend::start(&[]);
    let b = DemoBackend::start(&[]);
    // Only A can answer the check's path (B answers 404 there, though it accepts connections).
    let c = client();
    let r = send(&c, Method::PUT, &a.url(), "/health/ok", &[], Some("ok")).await;
    assert!(r.status().is_success());
    let config = format!(
        "[upstream]\nhealth_check_interval_ms = 300\nhealth_check_path = \"/health/ok\"\n\
         [[route]]\nprefix = \"/a\"\nupstream = [\"{b}\", \"{a}\"]\n",
        a = a.url(),
        b = b.url()
    );
    let fallback = DemoBackend::start(&[]);
    let gw = Gateway::start(&fallback.url(), Some(&config));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for i in 0..10 {
        let path = format!("/a/doc{i}");
        let r = send(&c, Method::PUT, &gw.url(), &path, &[], Some("x")).await;
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
        assert_eq!(
            applied(&a, &b, &path).await,
            (1, 0),
            "{path} applied once, on A (B failed its check):\n{}",
            gw.stderr()
        );
    }
}
