//! Stopping and starting: SIGTERM lets in-flight requests finish and exits within the grace period;
//! the etag table survives a clean restart (snapshot), and never a crash.

mod common;

use common::{client, etag_of, unique_temp_dir, DemoBackend, Gateway};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_within_the_grace_period() {
    // every request takes 700 ms at the backend
    let backend = DemoBackend::start(&["--delay-ms", "700"]);
    let mut gateway = Gateway::start(&backend.url(), Some("[server]\ngrace_period_seconds = 3\n"));
    let url = format!("{}/docs/a", gateway.url());
    let http = client();
    let in_flight = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.put(&url)
                .body("v1")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let took = tokio::task::spawn_blocking(move || {
        let took = gateway.terminate(Duration::from_secs(10));
        (took, gateway)
    })
    .await
    .unwrap();
    let (took, gateway) = took;
    let took =
        took.unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", gateway.stderr()));
    assert_eq!(
        in_flight.await.unwrap().expect("answered"),
        201,
        "the in-flight write finished"
    );
    assert!(
        took <= Duration::from_millis(3_500),
        "exited {took:?} after SIGTERM, grace period 3 s ({:?} since)",
        started.elapsed()
    );
    let log = common::backend_log(&backend.url(), "/docs/a").await;
    assert_eq!(log.len(), 1);
}

fn snapshot_config(dir: &std::path::Path) -> String {
    format!(
        "[server]\ngrace_period_seconds = 1\n[store]\nsnapshot = \"{}\"\n",
        dir.join("etags").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_survive_a_clean_restart_but_not_a_crash() {
    let backend = DemoBackend::start(&[]);
    let dir = unique_temp_dir("etag-snapshot");
    let config = snapshot_config(&dir);
    let http = client();

    // clean stop: the table is saved and loaded by the next process
    let mut first = Gateway::start(&backend.url(), Some(&config));
    let created = http
        .put(format!("{}/docs/a", first.url()))
        .body("v1")
        .send()
        .await
        .unwrap();
    let e1 = etag_of(&created).expect("an etag");
    let first = tokio::task::spawn_blocking(move || {
        let took = first.terminate(Duration::from_secs(10));
        assert!(took.is_some(), "clean stop:\n{}", first.stderr());
        first
    })
    .await
    .unwrap();
    assert!(
        dir.join("etags").exists(),
        "snapshot written:\n{}",
        first.stderr()
    );

    let mut second = Gateway::start(&backend.url(), Some(&config));
    assert!(
        !dir.join("etags").exists(),
        "the snapshot is consumed at start"
    );
    let updated = http
        .put(format!("{}/docs/a", second.url()))
        .header("If-Match", format!("\"{e1}\""))
        .body("v2")
        .send()
        .await
        .unwrap();
    assert_eq!(updated.status().as_u16(), 200, "{}", second.stderr());
    let e2 = etag_of(&updated).expect("an etag");

    // crash: nothing is saved, every old etag is unknown
    second.kill();
    let third = Gateway::start(&backend.url(), Some(&config));
    let refused = http
        .put(format!("{}/docs/a", third.url()))
        .header("If-Match", format!("\"{e2}\""))
        .body("v3")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 409);
    assert_eq!(
        common::backend_get(&backend.url(), "/docs/a").await,
        (200, "v2".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_as_soon_as_the_last_request_is_done_not_at_the_end_of_the_grace_period() {
    let backend = DemoBackend::start(&["--delay-ms", "300"]);
    let mut gateway = Gateway::start(
        &backend.url(),
        Some("[server]\ngrace_period_seconds = 60\n"),
    );
    let url = format!("{}/docs/a", gateway.url());
    let in_flight = tokio::spawn(async move {
        client()
            .put(&url)
            .body("v1")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (took, gateway) = tokio::task::spawn_blocking(move || {
        let took = gateway.terminate(Duration::from_secs(30));
        (took, gateway)
    })
    .await
    .unwrap();
    assert_eq!(in_flight.await.unwrap().expect("answered"), 201);
    let took = took.unwrap_or_else(|| {
        panic!(
            "still running 30 s after SIGTERM (grace period 60 s):\n{}",
            gateway.stderr()
        )
    });
    // Drained within a fraction of a second of the write's answer; 30 s leaves room for a slow
    // machine while still telling "when drained" from "at the end of the grace period".
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(
        gateway.stderr().contains("every connection is done"),
        "{}",
        gateway.stderr()
    );
}
