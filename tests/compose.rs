//! The lost-update torture against the replicas of `docker-compose.yml` (profile `replicas`):
//! `gateway-a` and `gateway-b` in containers, sharing their etags through the `redis` container, in
//! front of the `backend` container. `tests/compose.sh` starts the stack and runs this test with
//!
//! - `ETAG_COMPOSE_GATEWAYS=http://127.0.0.1:A,http://127.0.0.1:B` (the replicas' published ports),
//! - `ETAG_COMPOSE_BACKEND=http://127.0.0.1:C` (the backend's published port: its applied log),
//! - optionally `ETAG_COMPOSE_LOAD_MS` (how long the clients run; 3000 by default).
//!
//! Without them (a plain `cargo test`) it prints SKIP and passes.

mod common;

use std::time::Duration;

use common::torture::{check_invariants_at, run_workload_at, Route, Workload, READERS, WRITERS};

/// Writers alternate: even ones read through `a` and write through `b`, odd ones the reverse, so
/// every successful write carried an etag issued by the other replica. Readers are split.
fn crossed(a: &str, b: &str, load: Duration) -> Workload {
    let route = |read: &str, write: &str| Route {
        read: read.to_string(),
        write: write.to_string(),
        fallback: None,
    };
    Workload {
        writers: (0..WRITERS)
            .map(|i| if i % 2 == 0 { route(a, b) } else { route(b, a) })
            .collect(),
        readers: (0..READERS)
            .map(|i| if i % 2 == 0 { route(a, a) } else { route(b, b) })
            .collect(),
        load,
        deadline: None,
        create_via: a.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torture_across_compose_replicas() {
    let (Ok(gateways), Ok(backend)) = (
        std::env::var("ETAG_COMPOSE_GATEWAYS"),
        std::env::var("ETAG_COMPOSE_BACKEND"),
    ) else {
        println!(
            "SKIP: torture_across_compose_replicas needs ETAG_COMPOSE_GATEWAYS and \
             ETAG_COMPOSE_BACKEND (tests/compose.sh sets them)"
        );
        return;
    };
    let gateways: Vec<&str> = gateways.split(',').map(str::trim).collect();
    let [a, b] = gateways[..] else {
        panic!(
            "ETAG_COMPOSE_GATEWAYS: give two gateway URLs separated by a comma, got {gateways:?}"
        );
    };
    let load = std::env::var("ETAG_COMPOSE_LOAD_MS")
        .ok()
        .map(|ms| {
            ms.parse()
                .expect("ETAG_COMPOSE_LOAD_MS is a number of milliseconds")
        })
        .map_or(Duration::from_secs(3), Duration::from_millis);

    let run = run_workload_at(&backend, &crossed(a, b, load)).await;
    let applied = check_invariants_at(&backend, &run).await;
    let s = &run.stats;
    let through = |read: &str, write: &str| {
        s.ok.iter()
            .filter(|w| w.read_via == read && w.via == write)
            .count()
    };
    let (a_to_b, b_to_a) = (through(a, b), through(b, a));
    println!(
        "torture_across_compose_replicas: {WRITERS} writers, {READERS} readers, {:.1} s: \
         writes ok {} (read A -> write B {a_to_b}, read B -> write A {b_to_a}), conflicts {}, \
         unknown {}, applied {applied}; reads {} ({} without etag, {} failed; readers {}, {} with etag)",
        run.duration.as_secs_f64(),
        s.ok.len(),
        s.conflicts,
        s.unknown,
        s.reads + run.reader_reads,
        s.reads_without_etag,
        s.read_failures,
        run.reader_reads,
        run.reader_reads_with_etag,
    );
    assert_eq!(
        s.unknown, 0,
        "no faults were injected, yet some writes had odd answers: {:?}",
        s.unknown_statuses
    );
    assert_eq!(
        s.read_failures, 0,
        "reads failed: {:?}",
        s.read_failure_reasons
    );
    assert_eq!(
        applied,
        s.ok.len(),
        "every applied write was answered 2xx and vice versa"
    );
    assert!(
        a_to_b > 0 && b_to_a > 0,
        "etags issued by one replica were accepted by the other (A -> B {a_to_b}, B -> A {b_to_a})"
    );
    assert!(
        s.conflicts > 0,
        "16 writers on one document: some must have conflicted"
    );
}
