//! A write the gateway gave up on (timeout) may still be applied by the backend later. The gateway
//! keeps the resource locked for `upstream.timeout_hold_ms`: no etag is handed out and conditional
//! writes are refused until the late write has had its chance to land.

mod common;

use common::{backend_get, backend_log, client, etag_of, DemoBackend, Gateway};
use std::time::Duration;

#[tokio::test]
async fn a_timed_out_write_locks_its_resource_until_the_hold_ends() {
    let backend = DemoBackend::start(&["--late-apply-rate", "1", "--late-apply-ms", "600"]);
    let gateway = Gateway::start(
        &backend.url(),
        Some("[upstream]\nread_timeout_ms = 200\ntimeout_hold_ms = 1500\n"),
    );
    let http = client();
    let url = format!("{}/docs/slow", gateway.url());

    // every write is applied 600 ms late, after the gateway's 200 ms read timeout
    let created = http.put(&url).body("v1").send().await.unwrap();
    assert_eq!(
        created.status().as_u16(),
        504,
        "the gateway gave up on the write"
    );
    // v1 lands in the backend meanwhile; wait for the hold to end
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let read = http.get(&url).send().await.unwrap();
    assert_eq!(read.status().as_u16(), 200);
    let e1 = etag_of(&read).expect("settled: an etag again");
    assert_eq!(read.text().await.unwrap(), "v1");

    let timed_out = http
        .put(&url)
        .header("If-Match", format!("\"{e1}\""))
        .body("v2")
        .send()
        .await
        .unwrap();
    assert_eq!(timed_out.status().as_u16(), 504);

    // during the hold: the old etag is refused, and reads hand out no etag (the body is v1 for now,
    // but v2 may land at any moment)
    let stale = http
        .put(&url)
        .header("If-Match", format!("\"{e1}\""))
        .body("v3")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status().as_u16(), 409);
    let during = http.get(&url).send().await.unwrap();
    assert_eq!(during.status().as_u16(), 200);
    assert_eq!(
        etag_of(&during),
        None,
        "no etag while the outcome is pending"
    );

    // v2 landed late; after the hold the state is known again, under a new etag
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        backend_get(&backend.url(), "/docs/slow").await,
        (200, "v2".to_string())
    );
    let after = http.get(&url).send().await.unwrap();
    let e2 = etag_of(&after).expect("an etag after the hold");
    assert_ne!(e1, e2);
    assert_eq!(after.text().await.unwrap(), "v2");
    let log = backend_log(&backend.url(), "/docs/slow").await;
    let bodies: Vec<&str> = log.iter().map(|w| w["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["v1", "v2"], "v3 never reached the backend");
}
