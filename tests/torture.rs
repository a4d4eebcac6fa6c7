//! The lost-update torture tests: the proof of the product.
//!
//! Many writers do read-modify-write on one counter document through the gateway, with `If-Match`
//! and retry on conflict, while readers read alongside. Each write names the write it was based on
//! (`prev` = the `id` it read). The backend applies everything it receives and logs it in apply
//! order, so afterwards the log must be one unbroken chain: every applied write was based on the
//! state the backend held just before it. A lost update would show up as a fork (two writes with
//! the same `prev`). Run with `--nocapture` to see the figures. The workload is in `common/torture.rs`
//! (`tests/replicas.rs` runs it across gateway replicas).

mod common;

use std::time::Duration;

use common::torture::{check_invariants, counts, run_workload, Workload, FAULTS, READERS, WRITERS};
use common::{DemoBackend, Gateway};

/// The torture tests compete for two cores with their own gateway and backend: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_update_torture() {
    let _serial = SERIAL.lock().await;
    let backend = DemoBackend::start(&[]);
    let gateway = Gateway::start(&backend.url(), None);
    let run = run_workload(&backend, &Workload::single(&gateway.url())).await;
    let applied = check_invariants(&backend, &run).await;
    let s = &run.stats;

    println!(
        "lost_update_torture: {} writers, {} readers, {:.1} s: writes ok {}, conflicts {}, unknown {}, applied {}, \
         reads {} ({} by writers, {} of them without etag, {} failed {:?}; {} by readers, {} with etag)",
        WRITERS,
        READERS,
        run.duration.as_secs_f64(),
        s.ok.len(),
        s.conflicts,
        s.unknown,
        applied,
        s.reads + run.reader_reads,
        s.reads,
        s.reads_without_etag,
        s.read_failures,
        counts(&s.read_failure_reasons),
        run.reader_reads,
        run.reader_reads_with_etag,
    );
    assert_eq!(
        s.unknown, 0,
        "no faults were injected, yet some writes had odd answers: {:?}",
        s.unknown_statuses
    );
    assert_eq!(
        applied,
        s.ok.len(),
        "every applied write was answered 2xx and vice versa"
    );
    assert!(!s.ok.is_empty(), "no write succeeded in {:?}", run.duration);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torture_under_faults() {
    let _serial = SERIAL.lock().await;
    let backend = DemoBackend::start(FAULTS);
    let gateway = Gateway::start(
        &backend.url(),
        Some("[upstream]\nread_timeout_ms = 300\ntimeout_hold_ms = 1000\n"),
    );
    let run = run_workload(&backend, &Workload::single(&gateway.url())).await;
    // A write that timed out at the gateway may still be pending in the backend: let it land.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let applied = check_invariants(&backend, &run).await;
    let s = &run.stats;

    let statuses = counts(&s.unknown_statuses);
    println!(
        "torture_under_faults: {} writers, {} readers, {:.1} s: writes ok {}, conflicts {}, unknown outcomes {} ({:?}), \
         applied {}, reads {} ({} without etag, {} failed: {:?})",
        WRITERS,
        READERS,
        run.duration.as_secs_f64(),
        s.ok.len(),
        s.conflicts,
        s.unknown,
        statuses,
        applied,
        s.reads + run.reader_reads,
        s.reads_without_etag,
        s.read_failures,
        counts(&s.read_failure_reasons),
    );
    if s.unknown == 0 {
        println!("torture_under_faults: warning: no fault was hit (too few writes?)");
    }
    assert!(!s.ok.is_empty(), "no write succeeded in {:?}", run.duration);
    assert!(
        applied >= s.ok.len() && applied as u64 <= s.ok.len() as u64 + s.unknown,
        "applied writes ({applied}) must be the 2xx ones ({}) plus some of the unknown ones ({})",
        s.ok.len(),
        s.unknown
    );
}
