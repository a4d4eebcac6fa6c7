//! The lost-update torture tests: the proof of the product.
//!
//! Many writers do read-modify-write on one counter document through the gateway, with `If-Match`
//! and retry on conflict, while readers read alongside. Each write names the write it was based on
//! (`prev` = the `id` it read). The backend applies everything it receives and logs it in apply
//! order, so afterwards the log must be one unbroken chain: every applied write was based on the
//! state the backend held just before it. A lost update would show up as a fork (two writes with
//! the same `prev`). Run with `--nocapture` to see the figures.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::{backend_get, backend_log, client, etag_of, DemoBackend, Gateway};
use serde_json::{json, Value};

const DOC: &str = "/docs/counter";
const WRITERS: usize = 16;
const READERS: usize = 4;
const LOAD: Duration = Duration::from_secs(5);

/// The torture tests compete for two cores with their own gateway and backend: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default, Debug)]
struct WriterStats {
    /// (id written, If-Match carried) of every write answered 2xx.
    ok: Vec<(String, String)>,
    conflicts: u64,
    /// Write answers other than 2xx/409, and transport errors: applied or not, nobody knows.
    unknown: u64,
    unknown_statuses: Vec<String>,
    /// GETs that came back without an etag (they overlapped a write) or failed.
    reads_without_etag: u64,
    read_failures: u64,
    read_failure_reasons: Vec<String>,
    reads: u64,
}

async fn writer(c: reqwest::Client, url: String, deadline: Instant) -> WriterStats {
    let mut s = WriterStats::default();
    while Instant::now() < deadline {
        s.reads += 1;
        let r = match c.get(&url).send().await {
            Ok(r) if r.status() == 200 => r,
            other => {
                s.read_failures += 1;
                s.read_failure_reasons.push(match other {
                    Ok(r) => r.status().as_u16().to_string(),
                    Err(e) => format!("error: {e:?}"),
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let Some(etag) = etag_of(&r) else {
            // The read overlapped a write: the gateway withholds the etag; read again.
            s.reads_without_etag += 1;
            let _ = r.bytes().await;
            continue;
        };
        let Ok(doc) = r.json::<Value>().await else {
            s.read_failures += 1;
            continue;
        };
        let n = doc["n"].as_u64().expect("counter has n");
        let prev = doc["id"].as_str().expect("counter has id").to_string();
        let id = uuid::Uuid::new_v4().to_string();
        let body = json!({"n": n + 1, "id": id, "prev": prev}).to_string();
        let resp = c
            .put(&url)
            .header("If-Match", format!("\"{etag}\""))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                s.ok.push((id, etag));
                let _ = r.bytes().await;
            }
            Ok(r) if r.status() == 409 => {
                s.conflicts += 1;
                let _ = r.bytes().await;
            }
            Ok(r) => {
                s.unknown += 1;
                s.unknown_statuses.push(r.status().as_u16().to_string());
                let _ = r.bytes().await;
            }
            Err(e) => {
                s.unknown += 1;
                s.unknown_statuses
                    .push(if e.is_timeout() { "timeout" } else { "error" }.to_string());
            }
        }
    }
    s
}

async fn reader(c: reqwest::Client, url: String, deadline: Instant) -> (u64, u64) {
    let (mut reads, mut with_etag) = (0, 0);
    while Instant::now() < deadline {
        if let Ok(r) = c.get(&url).send().await {
            reads += 1;
            with_etag += u64::from(etag_of(&r).is_some());
            let _ = r.bytes().await;
        }
    }
    (reads, with_etag)
}

struct Run {
    stats: WriterStats,
    reader_reads: u64,
    reader_reads_with_etag: u64,
    duration: Duration,
}

/// Creates the counter through the gateway, then runs the writers and readers for `LOAD`.
async fn run_workload(backend: &DemoBackend, gateway: &Gateway) -> Run {
    let c = client();
    let url = format!("{}{DOC}", gateway.url());
    // With faults on, the creation itself may be answered badly; the backend applies it anyway.
    let created = c
        .put(&url)
        .header("Content-Type", "application/json")
        .body(r#"{"n":0,"id":"init","prev":null}"#)
        .send()
        .await;
    if !created.as_ref().is_ok_and(|r| r.status().is_success()) {
        println!(
            "creating the counter: {:?} (a fault; the backend applied it first)",
            created.map(|r| r.status())
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        backend_log(&backend.url(), DOC).await.len(),
        1,
        "the counter was created once"
    );

    let start = Instant::now();
    let deadline = start + LOAD;
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| tokio::spawn(writer(c.clone(), url.clone(), deadline)))
        .collect();
    let readers: Vec<_> = (0..READERS)
        .map(|_| tokio::spawn(reader(c.clone(), url.clone(), deadline)))
        .collect();

    let mut stats = WriterStats::default();
    for w in futures::future::join_all(writers).await {
        let w = w.expect("writer task");
        stats.ok.extend(w.ok);
        stats.conflicts += w.conflicts;
        stats.unknown += w.unknown;
        stats.unknown_statuses.extend(w.unknown_statuses);
        stats.reads_without_etag += w.reads_without_etag;
        stats.read_failures += w.read_failures;
        stats.read_failure_reasons.extend(w.read_failure_reasons);
        stats.reads += w.reads;
    }
    let (mut reader_reads, mut reader_reads_with_etag) = (0, 0);
    for r in futures::future::join_all(readers).await {
        let (reads, with_etag) = r.expect("reader task");
        reader_reads += reads;
        reader_reads_with_etag += with_etag;
    }
    Run {
        stats,
        reader_reads,
        reader_reads_with_etag,
        duration: start.elapsed(),
    }
}

/// The applied log for the counter, checked to be one chain from `init`: every applied write was
/// based on the state the backend held just before it. Returns the ids of the applied writes.
fn check_chain(log: &[Value]) -> Vec<String> {
    assert!(!log.is_empty(), "the backend applied nothing");
    let bodies: Vec<Value> = log
        .iter()
        .map(|e| {
            assert_eq!(e["method"], "PUT", "unexpected write in the log: {e}");
            serde_json::from_str(e["body"].as_str().expect("log body"))
                .expect("logged body is JSON")
        })
        .collect();
    assert_eq!(
        bodies[0]["id"], "init",
        "the first applied write is the creation"
    );
    assert_eq!(bodies[0]["n"], 0);
    for (i, pair) in bodies.windows(2).enumerate() {
        let (before, write) = (&pair[0], &pair[1]);
        assert_eq!(
            write["prev"], before["id"],
            "LOST UPDATE: applied write #{} (seq {}) was based on {} but the backend held {} (seq {})",
            i + 1,
            log[i + 1]["seq"],
            write["prev"],
            before["id"],
            log[i]["seq"]
        );
        assert_eq!(
            write["n"].as_u64(),
            before["n"].as_u64().map(|n| n + 1),
            "n goes up by one at seq {}",
            log[i + 1]["seq"]
        );
    }
    bodies[1..]
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

fn counts(items: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item.as_str()).or_insert(0) += 1;
    }
    counts
}

/// Invariants that hold with or without faults. Returns the number of applied writes.
async fn check_invariants(backend: &DemoBackend, run: &Run) -> usize {
    let log = backend_log(&backend.url(), DOC).await;
    let applied_ids = check_chain(&log);
    let applied = applied_ids.len();

    let (status, body) = backend_get(&backend.url(), DOC).await;
    assert_eq!(status, 200);
    let final_doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        final_doc["n"].as_u64(),
        Some(applied as u64),
        "final n == number of applied writes"
    );

    let applied_set: HashSet<&String> = applied_ids.iter().collect();
    for (id, _) in &run.stats.ok {
        assert!(
            applied_set.contains(id),
            "write {id} was answered 2xx but the backend never applied it"
        );
    }
    let mut seen = HashSet::new();
    for (_, if_match) in &run.stats.ok {
        assert!(
            seen.insert(if_match),
            "two writes carrying If-Match {if_match} both succeeded"
        );
    }
    applied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_update_torture() {
    let _serial = SERIAL.lock().await;
    let backend = DemoBackend::start(&[]);
    let gateway = Gateway::start(&backend.url(), None);
    let run = run_workload(&backend, &gateway).await;
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
    let backend = DemoBackend::start(&[
        "--fail-after-apply-rate",
        "0.03",
        "--drop-after-apply-rate",
        "0.03",
        "--slow-rate",
        "0.03",
        "--slow-ms",
        "800",
        "--truncate-rate",
        "0.02",
        // applied only after the gateway timed out: the timeout hold keeps the resource locked
        "--late-apply-rate",
        "0.03",
        "--late-apply-ms",
        "500",
    ]);
    let gateway = Gateway::start(
        &backend.url(),
        Some("[upstream]\nread_timeout_ms = 300\ntimeout_hold_ms = 1000\n"),
    );
    let run = run_workload(&backend, &gateway).await;
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
