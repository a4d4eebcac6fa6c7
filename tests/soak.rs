//! Soak: the fault torture of `tests/torture.rs`, for longer, under LRU pressure and through backend
//! outages, with the gateway's memory watched.
//!
//! - **Faults** as in `torture_under_faults`: 5xx / dropped connection / truncated answer after
//!   applying, answers slower than the gateway's read timeout, writes applied after the gateway gave up.
//! - **The counter** (`/docs/counter`): the lost-update workload of `common/torture.rs` (writers doing
//!   read-modify-write with `If-Match`, readers alongside).
//! - **LRU pressure**: the gateway's table holds [`CAPACITY`] entries while [`DOCS`] other documents,
//!   created directly on the backend beforehand, are read (in order, so every read evicts) and
//!   written (read-modify-write with `If-Match`, at random) alongside. Each document is a counter
//!   of its own, so its applied log must be one chain too.
//! - **Backend outages**: the backend is frozen with SIGSTOP for [`OUTAGE`] and thawed with SIGCONT,
//!   once in a short run, every minute in a long one. Requests sent meanwhile time out at the gateway
//!   (unknown outcomes) and are processed, in no particular order, when it wakes up. This stands for a
//!   restart: a true restart (kill, start again on the same port) would lose the demo backend's
//!   in-memory documents, and with them the applied log the invariants are checked against. The
//!   gateway's `timeout_hold_ms` is longer than the outage: a write that is applied after read
//!   timeout + hold can overwrite a newer one, which no proxy can prevent (README, "Timeouts").
//! - **Memory stays flat**: the gateway's RSS (`VmRSS`) and open file descriptors are sampled every
//!   second; the last samples must stay within a bound of the first sample after warm-up.
//!
//! Invariants as in the torture tests: every applied write was based on the state the backend held
//! just before it (one chain per document), every write answered 2xx was applied, no etag let two
//! writes through, and applied writes are the 2xx ones plus some of the unknown ones.
//!
//! `SOAK_SECONDS` (default 30) sets how long the clients run; the long run is
//! `SOAK_SECONDS=300 cargo test --release --test soak -- --nocapture`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::torture::{
    check_chain, check_invariants, counts, next_counter, run_workload, Deadline, Route, Workload,
    DOC, FAULTS, READERS, WRITERS,
};
use common::{backend_get, client, etag_of, DemoBackend, Gateway};
use futures::StreamExt;
use serde_json::Value;

/// Entries in the gateway's table.
const CAPACITY: usize = 50;
/// Documents besides the counter, ten times the table's capacity.
const DOCS: usize = 500;
/// Clients that read the documents in order (every read is a miss that evicts an entry).
const DOC_READERS: usize = 4;
/// Clients that do read-modify-write on random documents.
const DOC_WRITERS: usize = 4;
/// How long the backend is frozen each time.
const OUTAGE: Duration = Duration::from_secs(2);
/// Gateway read timeout (as in `torture_under_faults`).
const READ_TIMEOUT_MS: u64 = 300;
/// How long a timed-out write keeps its resource locked: longer than an outage plus the time the
/// backend takes to work off its backlog, so that no write sent before an outage is applied after
/// its lock is gone (read timeout + hold = 3.3 s > 2 s outage + backlog).
const TIMEOUT_HOLD_MS: u64 = 3_000;

fn soak_duration() -> Duration {
    let secs = match std::env::var("SOAK_SECONDS") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("SOAK_SECONDS={v:?} is not a number of seconds")),
        Err(_) => 30,
    };
    assert!(secs >= 10, "SOAK_SECONDS must be at least 10");
    Duration::from_secs(secs)
}

/// When the outages start, from the clients' start: once at 40 % of a short run; from 40 s on every
/// 60 s in a long one, none in its last 20 s.
fn outage_starts(load: Duration) -> Vec<Duration> {
    let secs = load.as_secs();
    if secs < 120 {
        return vec![load.mul_f64(0.4)];
    }
    (40..=secs - 20)
        .step_by(60)
        .map(Duration::from_secs)
        .collect()
}

/// The first RSS sample that counts as the baseline: after 5 s, or a tenth of a long run.
fn warm_up(load: Duration) -> Duration {
    Duration::from_secs(5).max(load / 10)
}

fn doc_path(i: usize) -> String {
    format!("/docs/d{i:03}")
}

const INITIAL: &str = r#"{"n":0,"id":"init","prev":null}"#;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `(VmRSS in KiB, open file descriptors)` of a process.
fn sample_process(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
}

/// Samples `pid` every second until `deadline` passes.
async fn sample_until(pid: u32, started: Instant, deadline: Deadline) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await; // the first tick is immediate
    while !deadline.passed() {
        tick.tick().await;
        if let Some((rss_kib, fds)) = sample_process(pid) {
            samples.push(Sample {
                at: started.elapsed(),
                rss_kib,
                fds,
            });
        }
    }
    samples
}

/// Freezes the backend at each of `starts` (from `started`) for [`OUTAGE`]. Returns when the last
/// outage is over.
async fn outages(backend: &DemoBackend, started: Instant, starts: &[Duration]) -> Vec<Duration> {
    let mut done = Vec::new();
    for &at in starts {
        tokio::time::sleep_until((started + at).into()).await;
        let began = started.elapsed();
        backend.pause();
        tokio::time::sleep(OUTAGE).await;
        backend.resume();
        println!(
            "soak: backend frozen from {:.1} s to {:.1} s",
            began.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        done.push(began);
    }
    done
}

/// A document write answered 2xx.
#[derive(Debug, Clone)]
struct OkDocWrite {
    path: String,
    id: String,
    if_match: String,
}

#[derive(Default, Debug)]
struct DocStats {
    ok: Vec<OkDocWrite>,
    conflicts: u64,
    /// Unknown outcomes per document.
    unknown: BTreeMap<String, u64>,
    unknown_statuses: Vec<String>,
    reads: u64,
    reads_with_etag: u64,
    read_failures: u64,
    read_failure_reasons: Vec<String>,
}

impl DocStats {
    fn absorb(&mut self, o: DocStats) {
        self.ok.extend(o.ok);
        self.conflicts += o.conflicts;
        for (path, n) in o.unknown {
            *self.unknown.entry(path).or_insert(0) += n;
        }
        self.unknown_statuses.extend(o.unknown_statuses);
        self.reads += o.reads;
        self.reads_with_etag += o.reads_with_etag;
        self.read_failures += o.read_failures;
        self.read_failure_reasons.extend(o.read_failure_reasons);
    }

    fn unknown_total(&self) -> u64 {
        self.unknown.values().sum()
    }
}

/// Read-modify-write on random documents, with `If-Match`, until `deadline`. Between the read and the
/// write it waits a little, so that the document's entry may be evicted meanwhile.
async fn doc_writer(c: reqwest::Client, gateway: String, deadline: Deadline) -> DocStats {
    let mut s = DocStats::default();
    while !deadline.passed() {
        let path = doc_path(rand::random_range(0..DOCS));
        s.reads += 1;
        let r = match c.get(format!("{gateway}{path}")).send().await {
            Ok(r) if r.status() == 200 => r,
            other => {
                s.read_failures += 1;
                s.read_failure_reasons.push(match other {
                    Ok(r) => r.status().as_u16().to_string(),
                    Err(e) => format!("error: {e}"),
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let Some(etag) = etag_of(&r) else {
            let _ = r.bytes().await;
            continue;
        };
        s.reads_with_etag += 1;
        let Ok(doc) = r.json::<Value>().await else {
            s.read_failures += 1;
            s.read_failure_reasons.push("body".into());
            continue;
        };
        let n = doc["n"].as_u64().expect("document has n");
        let prev = doc["id"].as_str().expect("document has id").to_string();
        let (id, body) = next_counter(n, &prev);
        let pause = rand::random_range(0..20);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let resp = c
            .put(format!("{gateway}{path}"))
            .header("If-Match", format!("\"{etag}\""))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                s.ok.push(OkDocWrite {
                    path,
                    id,
                    if_match: etag,
                });
                let _ = r.bytes().await;
            }
            Ok(r) if r.status() == 409 => {
                s.conflicts += 1;
                let _ = r.bytes().await;
            }
            Ok(r) => {
                *s.unknown.entry(path).or_insert(0) += 1;
                s.unknown_statuses.push(r.status().as_u16().to_string());
                let _ = r.bytes().await;
            }
            Err(e) => {
                *s.unknown.entry(path).or_insert(0) += 1;
                s.unknown_statuses
                    .push(if e.is_timeout() { "timeout" } else { "error" }.to_string());
            }
        }
    }
    s
}

/// Reads the documents in order, starting at `first`, until `deadline`: with ten times more documents
/// than table entries, nearly every read misses and evicts the least recently used entry.
async fn doc_reader(
    c: reqwest::Client,
    gateway: String,
    first: usize,
    deadline: Deadline,
) -> DocStats {
    let mut s = DocStats::default();
    let mut i = first;
    while !deadline.passed() {
        let path = doc_path(i % DOCS);
        i += 1;
        s.reads += 1;
        match c.get(format!("{gateway}{path}")).send().await {
            Ok(r) if r.status() == 200 => {
                s.reads_with_etag += u64::from(etag_of(&r).is_some());
                let _ = r.bytes().await;
            }
            other => {
                s.read_failures += 1;
                s.read_failure_reasons.push(match other {
                    Ok(r) => r.status().as_u16().to_string(),
                    Err(e) => format!("error: {e}"),
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    s
}

/// The backend's whole applied log, straight from the backend.
async fn whole_log(backend_url: &str) -> Vec<Value> {
    let resp = client()
        .get(format!("{backend_url}/__demo/log"))
        .send()
        .await
        .expect("GET /__demo/log");
    assert_eq!(resp.status(), 200, "GET /__demo/log");
    resp.json().await.expect("applied log is a JSON array")
}

/// Creates the documents on the backend directly (each once: a fault only spoils the answer, the
/// write is applied all the same), and checks that each was applied exactly once.
async fn create_documents(backend: &DemoBackend) {
    let c = client();
    let url = backend.url();
    let answers: Vec<_> = futures::stream::iter(0..DOCS)
        .map(|i| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                c.put(format!("{url}{}", doc_path(i)))
                    .header("Content-Type", "application/json")
                    .body(INITIAL)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let spoiled = answers
        .iter()
        .filter(|a| !a.as_ref().is_ok_and(|s| *s == 201))
        .count();
    let mut created: BTreeMap<String, usize> = BTreeMap::new();
    for e in whole_log(&url).await {
        *created
            .entry(e["path"].as_str().expect("log path").to_string())
            .or_insert(0) += 1;
    }
    for i in 0..DOCS {
        assert_eq!(
            created.get(&doc_path(i)),
            Some(&1),
            "{} was created once",
            doc_path(i)
        );
    }
    println!("soak: {DOCS} documents created on the backend ({spoiled} answers spoiled by faults)");
}

/// Every document's applied log is one chain from its creation; every 2xx write was applied; applied
/// writes are the 2xx ones plus some of the unknown ones; the stored body is the chain's end.
/// Returns the number of applied writes over all documents.
async fn check_documents(backend: &DemoBackend, stats: &DocStats) -> usize {
    let log = whole_log(&backend.url()).await;
    let mut by_path: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in log {
        let path = e["path"].as_str().expect("log path").to_string();
        by_path.entry(path).or_default().push(e);
    }
    let expected: HashSet<String> = (0..DOCS).map(doc_path).chain([DOC.to_string()]).collect();
    for path in by_path.keys() {
        assert!(
            expected.contains(path),
            "the backend applied a write to {path}, which no client wrote"
        );
    }

    let mut ok_by_path: BTreeMap<&str, Vec<&OkDocWrite>> = BTreeMap::new();
    for ok in &stats.ok {
        ok_by_path.entry(&ok.path).or_default().push(ok);
    }
    let mut applied_total = 0;
    for i in 0..DOCS {
        let path = doc_path(i);
        let entries = by_path.get(&path).map(Vec::as_slice).unwrap_or_default();
        let applied_ids = match std::panic::catch_unwind(|| check_chain(entries)) {
            Ok(ids) => ids,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{path}: {msg}");
            }
        };
        let applied: HashSet<&String> = applied_ids.iter().collect();
        let oks = ok_by_path
            .get(path.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for ok in oks {
            assert!(
                applied.contains(&ok.id),
                "{path}: write {} was answered 2xx but the backend never applied it",
                ok.id
            );
        }
        let mut seen = HashSet::new();
        for ok in oks {
            assert!(
                seen.insert(&ok.if_match),
                "{path}: two writes carrying If-Match {} both succeeded",
                ok.if_match
            );
        }
        let unknown = stats.unknown.get(&path).copied().unwrap_or(0);
        assert!(
            applied_ids.len() >= oks.len() && applied_ids.len() as u64 <= oks.len() as u64 + unknown,
            "{path}: applied writes ({}) must be the 2xx ones ({}) plus some of the unknown ones ({unknown})",
            applied_ids.len(),
            oks.len()
        );
        let (status, body) = backend_get(&backend.url(), &path).await;
        assert_eq!(status, 200, "{path} exists");
        let stored: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            stored["n"].as_u64(),
            Some(applied_ids.len() as u64),
            "{path}: stored n == number of applied writes"
        );
        applied_total += applied_ids.len();
    }
    applied_total
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The RSS curve, ten samples a line.
fn rss_curve(samples: &[Sample]) -> String {
    let mut out = String::new();
    for chunk in samples.chunks(10) {
        let _ = write!(out, "  t={:>4.0}s:", chunk[0].at.as_secs_f64());
        for s in chunk {
            let _ = write!(out, " {:6.1}", mib(s.rss_kib));
        }
        out.push('\n');
    }
    out
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_under_faults_eviction_and_outages() {
    let load = soak_duration();
    let backend = DemoBackend::start(FAULTS);
    create_documents(&backend).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let gateway = Gateway::start(
        &backend.url(),
        Some(&format!(
            "[upstream]\nread_timeout_ms = {READ_TIMEOUT_MS}\ntimeout_hold_ms = {TIMEOUT_HOLD_MS}\n\
             [store]\ncapacity = {CAPACITY}\n[admin]\nlisten = \"{admin}\"\n"
        )),
    );
    let gw = gateway.url();
    let c = client();

    let started = Instant::now();
    let deadline = Deadline::new(started + load);
    let workload = Workload {
        writers: vec![Route::via(&gw); WRITERS],
        readers: vec![Route::via(&gw); READERS],
        load,
        deadline: Some(deadline.clone()),
        create_via: gw.clone(),
    };
    let doc_tasks: Vec<_> = (0..DOC_WRITERS)
        .map(|_| tokio::spawn(doc_writer(c.clone(), gw.clone(), deadline.clone())))
        .chain((0..DOC_READERS).map(|k| {
            tokio::spawn(doc_reader(
                c.clone(),
                gw.clone(),
                k * DOCS / DOC_READERS,
                deadline.clone(),
            ))
        }))
        .collect();
    let planned = outage_starts(load);
    let (run, outages_done, samples) = tokio::join!(
        run_workload(&backend, &workload),
        outages(&backend, started, &planned),
        sample_until(gateway.pid(), started, deadline.clone()),
    );
    let mut docs = DocStats::default();
    for t in futures::future::join_all(doc_tasks).await {
        docs.absorb(t.expect("document client task"));
    }
    let metrics = c
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");

    // Writes that timed out at the gateway may still be pending in the backend: let them land.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let applied = check_invariants(&backend, &run).await;
    let doc_applied = check_documents(&backend, &docs).await;
    let s = &run.stats;

    println!(
        "soak: {:.1} s, {} outage(s) of {:?} at {:?}; table capacity {CAPACITY}, {DOCS} documents",
        run.duration.as_secs_f64(),
        outages_done.len(),
        OUTAGE,
        outages_done
            .iter()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>(),
    );
    println!(
        "soak: counter: {WRITERS} writers, {READERS} readers: writes ok {}, conflicts {}, unknown {} ({:?}), applied {}; \
         reads {} ({} without etag, {} failed: {:?}), reader reads {} ({} with etag)",
        s.ok.len(),
        s.conflicts,
        s.unknown,
        counts(&s.unknown_statuses),
        applied,
        s.reads,
        s.reads_without_etag,
        s.read_failures,
        counts(&s.read_failure_reasons),
        run.reader_reads,
        run.reader_reads_with_etag,
    );
    println!(
        "soak: documents: {DOC_WRITERS} writers, {DOC_READERS} readers: writes ok {}, conflicts {}, unknown {} ({:?}), \
         applied {}; reads {} ({} with etag, {} failed: {:?})",
        docs.ok.len(),
        docs.conflicts,
        docs.unknown_total(),
        counts(&docs.unknown_statuses),
        doc_applied,
        docs.reads,
        docs.reads_with_etag,
        docs.read_failures,
        counts(&docs.read_failure_reasons),
    );
    let evictions = metric(&metrics, "etag_gateway_table_evictions_total");
    println!(
        "soak: gateway table: {} entries at the end, {} evictions; write outcomes: {}",
        metric(&metrics, "etag_gateway_table_entries"),
        evictions,
        metrics
            .lines()
            .filter(|l| l.starts_with("etag_gateway_write_outcomes_total{"))
            .map(|l| l.trim_start_matches("etag_gateway_write_outcomes_total"))
            .collect::<Vec<_>>()
            .join(", "),
    );

    // Progress and coverage.
    assert!(!s.ok.is_empty(), "no counter write succeeded");
    assert!(!docs.ok.is_empty(), "no document write succeeded");
    assert!(
        applied >= s.ok.len() && applied as u64 <= s.ok.len() as u64 + s.unknown,
        "counter: applied writes ({applied}) must be the 2xx ones ({}) plus some of the unknown ones ({})",
        s.ok.len(),
        s.unknown
    );
    assert_eq!(outages_done.len(), planned.len(), "every outage happened");
    assert!(
        evictions >= DOCS as f64,
        "the table was under LRU pressure ({evictions} evictions)"
    );

    // Memory stays flat.
    let warm = warm_up(load);
    println!(
        "soak: gateway RSS (MiB, one sample a second; baseline: first sample after {:?}):\n{}",
        warm,
        rss_curve(&samples)
    );
    println!(
        "soak: gateway open fds: first {:?}, max {:?}, last {:?}",
        samples.first().map(|s| s.fds),
        samples.iter().map(|s| s.fds).max(),
        samples.last().map(|s| s.fds)
    );
    let baseline = samples
        .iter()
        .find(|s| s.at >= warm)
        .copied()
        .expect("RSS samples after warm-up");
    let bound_kib = baseline.rss_kib * 3 / 2 + 5 * 1024;
    let last = &samples[samples.len().saturating_sub(3)..];
    println!(
        "soak: RSS baseline {:.1} MiB at {:.0} s, bound {:.1} MiB, peak {:.1} MiB, last {:?} MiB",
        mib(baseline.rss_kib),
        baseline.at.as_secs_f64(),
        mib(bound_kib),
        mib(samples.iter().map(|s| s.rss_kib).max().unwrap_or(0)),
        last.iter()
            .map(|s| format!("{:.1}", mib(s.rss_kib)))
            .collect::<Vec<_>>()
    );
    for s in last {
        assert!(
            s.rss_kib <= bound_kib,
            "the gateway's RSS grew: {:.1} MiB at {:.0} s, more than {:.1} MiB (baseline {:.1} MiB × 1.5 + 5 MiB)",
            mib(s.rss_kib),
            s.at.as_secs_f64(),
            mib(bound_kib),
            mib(baseline.rss_kib)
        );
        assert!(
            s.fds <= baseline.fds * 2 + 100,
            "the gateway's open file descriptors grew: {} at {:.0} s (baseline {})",
            s.fds,
            s.at.as_secs_f64(),
            baseline.fds
        );
    }
}
