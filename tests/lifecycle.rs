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

/// SIGTERM, and the gateway must be gone within 10 s.
async fn stop_cleanly(mut gateway: Gateway) -> Gateway {
    tokio::task::spawn_blocking(move || {
        let took = gateway.terminate(Duration::from_secs(10));
        assert!(took.is_some(), "clean stop:\n{}", gateway.stderr());
        gateway
    })
    .await
    .unwrap()
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
    let first = Gateway::start(&backend.url(), Some(&config));
    let created = http
        .put(format!("{}/docs/a", first.url()))
        .body("v1")
        .send()
        .await
        .unwrap();
    let e1 = etag_of(&created).expect("an etag");
    let first = stop_cleanly(first).await;
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

/// A write whose backend timed out may still be applied: the gateway holds its resource (no etag,
/// conditional writes refused) for `timeout_hold_ms`. A stop in the middle of that hold carries it
/// over: the next process keeps the resource locked until the hold's time, instead of naming the
/// state before the late write with a fresh etag that a later write could use to overwrite it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_survives_a_clean_restart() {
    // every write is applied 3 s after it arrived, long after the gateway's 200 ms read timeout
    let backend = DemoBackend::start(&["--late-apply-rate", "1", "--late-apply-ms", "3000"]);
    let dir = unique_temp_dir("etag-snapshot-hold");
    let config = format!(
        "[server]\ngrace_period_seconds = 1\n[upstream]\nconnect_timeout_ms = 100\n\
         read_timeout_ms = 200\ntimeout_hold_ms = 3000\n[store]\nsnapshot = \"{}\"\n",
        dir.join("etags").display()
    );
    let http = client();
    let first = Gateway::start(&backend.url(), Some(&config));
    let url = format!("{}/docs/late", first.url());
    let put = |url: String, body: &'static str, if_match: Option<String>| {
        let http = http.clone();
        async move {
            let mut req = http.put(url).body(body);
            if let Some(etag) = if_match {
                req = req.header("If-Match", etag);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(put(url.clone(), "v0", None).await, 504);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(
        common::backend_get(&backend.url(), "/docs/late").await,
        (200, "v0".to_string())
    );
    // v1 times out too; it lands at the backend 3 s from now. Stop the gateway meanwhile.
    assert_eq!(put(url.clone(), "v1", None).await, 504);
    let first = stop_cleanly(first).await;
    assert!(
        first.stderr().contains("held=1"),
        "the hold is saved:\n{}",
        first.stderr()
    );

    let second = Gateway::start(&backend.url(), Some(&config));
    let url = format!("{}/docs/late", second.url());
    let read = http.get(&url).send().await.unwrap();
    assert_eq!(
        common::backend_get(&backend.url(), "/docs/late").await,
        (200, "v0".to_string()),
        "v1 has not landed yet (the test was too slow to tell anything)"
    );
    assert_eq!(read.status().as_u16(), 200);
    assert_eq!(
        etag_of(&read),
        None,
        "no etag for v0 while v1 may still land:\n{}",
        second.stderr()
    );
    assert_eq!(
        put(
            url.clone(),
            "v2",
            Some("\"00000000-0000-0000-0000-000000000000\"".into())
        )
        .await,
        409
    );

    // After the hold: an etag again, naming the state after the late write.
    let started = std::time::Instant::now();
    let (etag, body) = loop {
        let r = http.get(&url).send().await.unwrap();
        if let Some(etag) = etag_of(&r) {
            break (etag, r.text().await.unwrap());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still held after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        body, "v1",
        "the first etag after the hold names the late write's state"
    );
    let log = common::backend_log(&backend.url(), "/docs/late").await;
    let bodies: Vec<&str> = log.iter().map(|w| w["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["v0", "v1"], "v2 never reached the backend");
    // The new etag is current: a write with it is forwarded (and, like every write to this
    // backend, times out), not refused.
    assert_eq!(
        put(url.clone(), "v3", Some(format!("\"{etag}\""))).await,
        504
    );
}
