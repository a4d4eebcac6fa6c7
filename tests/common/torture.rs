//! The lost-update torture workload, shared by `tests/torture.rs` (one gateway) and
//! `tests/replicas.rs` (several gateways sharing one Redis).
//!
//! Many writers do read-modify-write on one counter document through the gateway(s), with `If-Match`
//! and retry on conflict, while readers read alongside. Each write names the write it was based on
//! (`prev` = the `id` it read). The backend applies everything it receives and logs it in apply
//! order, so afterwards the log must be one unbroken chain: every applied write was based on the
//! state the backend held just before it. A lost update would show up as a fork (two writes with
//! the same `prev`).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::{backend_get, backend_log, client, etag_of, DemoBackend};
use serde_json::{json, Value};

pub const DOC: &str = "/docs/counter";
pub const WRITERS: usize = 16;
pub const READERS: usize = 4;
pub const LOAD: Duration = Duration::from_secs(5);

/// The demo backend's faults for the fault tortures: 5xx after applying, connection dropped after
/// applying, answers slower than the gateway's read timeout, truncated answers, and writes applied
/// only after the gateway timed out (the timeout hold keeps the resource locked meanwhile).
pub const FAULTS: &[&str] = &[
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
    "--late-apply-rate",
    "0.03",
    "--late-apply-ms",
    "500",
];

/// Which gateway(s) one client talks to (base URLs, `http://127.0.0.1:PORT`).
#[derive(Clone, Debug)]
pub struct Route {
    /// Where it reads (GET).
    pub read: String,
    /// Where it writes (PUT with `If-Match`).
    pub write: String,
    /// Where it goes instead after a transport error from `read` or `write` (a replica that died).
    pub fallback: Option<String>,
}

impl Route {
    /// Reads and writes through one gateway, no fallback.
    pub fn via(url: &str) -> Route {
        Route {
            read: url.to_string(),
            write: url.to_string(),
            fallback: None,
        }
    }

    /// A transport error from `failed`: every use of it moves to the fallback (once).
    fn fail_over(&mut self, failed: &str, tally: &mut u64) {
        let Some(fallback) = self.fallback.clone() else {
            return;
        };
        if failed == fallback {
            return;
        }
        let mut moved = false;
        for url in [&mut self.read, &mut self.write] {
            if url == failed {
                *url = fallback.clone();
                moved = true;
            }
        }
        *tally += u64::from(moved);
    }
}

/// When the clients stop; it may be moved while they run.
#[derive(Clone, Debug)]
pub struct Deadline(Arc<Mutex<Instant>>);

impl Deadline {
    pub fn new(at: Instant) -> Deadline {
        Deadline(Arc::new(Mutex::new(at)))
    }

    pub fn set(&self, at: Instant) {
        *self.0.lock().unwrap() = at;
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= *self.0.lock().unwrap()
    }
}

/// Who does what for how long.
#[derive(Clone, Debug)]
pub struct Workload {
    pub writers: Vec<Route>,
    pub readers: Vec<Route>,
    /// How long the clients run, from their start...
    pub load: Duration,
    /// ... unless this is given: then they run until it passes.
    pub deadline: Option<Deadline>,
    /// The gateway the counter is created through.
    pub create_via: String,
}

impl Workload {
    /// `WRITERS` writers and `READERS` readers on one gateway for `LOAD`.
    pub fn single(url: &str) -> Workload {
        Workload {
            writers: vec![Route::via(url); WRITERS],
            readers: vec![Route::via(url); READERS],
            load: LOAD,
            deadline: None,
            create_via: url.to_string(),
        }
    }
}

/// A write answered 2xx.
#[derive(Clone, Debug)]
pub struct OkWrite {
    /// The `id` it wrote.
    pub id: String,
    /// The `If-Match` it carried.
    pub if_match: String,
    /// When its answer arrived (wall clock, comparable with the Redis server's clock on this host).
    pub at: SystemTime,
    /// The gateway it was written through.
    pub via: String,
    /// The gateway its etag was read from.
    pub read_via: String,
}

#[derive(Default, Debug)]
pub struct WriterStats {
    /// Every write answered 2xx.
    pub ok: Vec<OkWrite>,
    pub conflicts: u64,
    /// Write answers other than 2xx/409, and transport errors: applied or not, nobody knows.
    pub unknown: u64,
    pub unknown_statuses: Vec<String>,
    /// GETs that came back without an etag (they overlapped a write) or failed.
    pub reads_without_etag: u64,
    pub read_failures: u64,
    pub read_failure_reasons: Vec<String>,
    pub reads: u64,
    /// Clients that moved to their fallback gateway.
    pub fail_overs: u64,
}

impl WriterStats {
    pub fn absorb(&mut self, w: WriterStats) {
        self.ok.extend(w.ok);
        self.conflicts += w.conflicts;
        self.unknown += w.unknown;
        self.unknown_statuses.extend(w.unknown_statuses);
        self.reads_without_etag += w.reads_without_etag;
        self.read_failures += w.read_failures;
        self.read_failure_reasons.extend(w.read_failure_reasons);
        self.reads += w.reads;
        self.fail_overs += w.fail_overs;
    }
}

/// A counter body based on `prev` (whose `n` was `n`), with a fresh id: `(id, body)`.
pub fn next_counter(n: u64, prev: &str) -> (String, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({"n": n + 1, "id": id, "prev": prev}).to_string();
    (id, body)
}

async fn writer(c: reqwest::Client, mut route: Route, deadline: Deadline) -> WriterStats {
    let mut s = WriterStats::default();
    while !deadline.passed() {
        s.reads += 1;
        let read_via = route.read.clone();
        let r = match c.get(format!("{read_via}{DOC}")).send().await {
            Ok(r) if r.status() == 200 => r,
            other => {
                s.read_failures += 1;
                s.read_failure_reasons.push(match other {
                    Ok(r) => r.status().as_u16().to_string(),
                    Err(e) => {
                        route.fail_over(&read_via, &mut s.fail_overs);
                        format!("error: {e:?}")
                    }
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
        let (id, body) = next_counter(n, &prev);
        let via = route.write.clone();
        let resp = c
            .put(format!("{via}{DOC}"))
            .header("If-Match", format!("\"{etag}\""))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                s.ok.push(OkWrite {
                    id,
                    if_match: etag,
                    at: SystemTime::now(),
                    via,
                    read_via,
                });
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
                if !e.is_timeout() {
                    route.fail_over(&via, &mut s.fail_overs);
                }
            }
        }
    }
    s
}

async fn reader(c: reqwest::Client, mut route: Route, deadline: Deadline) -> (u64, u64) {
    let (mut reads, mut with_etag) = (0, 0);
    let mut fail_overs = 0;
    while !deadline.passed() {
        let via = route.read.clone();
        match c.get(format!("{via}{DOC}")).send().await {
            Ok(r) => {
                reads += 1;
                with_etag += u64::from(etag_of(&r).is_some());
                let _ = r.bytes().await;
            }
            Err(_) => {
                route.fail_over(&via, &mut fail_overs);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    (reads, with_etag)
}

pub struct Run {
    pub stats: WriterStats,
    pub reader_reads: u64,
    pub reader_reads_with_etag: u64,
    pub duration: Duration,
    /// When the writers and readers started.
    pub started: Instant,
}

/// Creates the counter through the workload's gateway, then runs its writers and readers.
pub async fn run_workload(backend: &DemoBackend, workload: &Workload) -> Run {
    run_workload_at(&backend.url(), workload).await
}

/// [`run_workload`] with a demo backend reached at `backend_url` (`http://host:port`), e.g. one
/// running in a container (`tests/compose.rs`).
pub async fn run_workload_at(backend_url: &str, workload: &Workload) -> Run {
    let c = client();
    // With faults on, the creation itself may be answered badly; the backend applies it anyway.
    let created = c
        .put(format!("{}{DOC}", workload.create_via))
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
        backend_log(backend_url, DOC).await.len(),
        1,
        "the counter was created once"
    );

    let start = Instant::now();
    let deadline = workload
        .deadline
        .clone()
        .unwrap_or_else(|| Deadline::new(start + workload.load));
    let writers: Vec<_> = workload
        .writers
        .iter()
        .map(|route| tokio::spawn(writer(c.clone(), route.clone(), deadline.clone())))
        .collect();
    let readers: Vec<_> = workload
        .readers
        .iter()
        .map(|route| tokio::spawn(reader(c.clone(), route.clone(), deadline.clone())))
        .collect();

    let mut stats = WriterStats::default();
    for w in futures::future::join_all(writers).await {
        stats.absorb(w.expect("writer task"));
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
        started: start,
    }
}

/// The applied log for the counter, checked to be one chain from `init`: every applied write was
/// based on the state the backend held just before it. Returns the ids of the applied writes.
pub fn check_chain(log: &[Value]) -> Vec<String> {
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

pub fn counts(items: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item.as_str()).or_insert(0) += 1;
    }
    counts
}

/// Invariants that hold with or without faults. Returns the number of applied writes.
pub async fn check_invariants(backend: &DemoBackend, run: &Run) -> usize {
    check_invariants_at(&backend.url(), run).await
}

/// [`check_invariants`] with a demo backend reached at `backend_url`.
pub async fn check_invariants_at(backend_url: &str, run: &Run) -> usize {
    let log = backend_log(backend_url, DOC).await;
    let applied_ids = check_chain(&log);
    let applied = applied_ids.len();

    let (status, body) = backend_get(backend_url, DOC).await;
    assert_eq!(status, 200);
    let final_doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        final_doc["n"].as_u64(),
        Some(applied as u64),
        "final n == number of applied writes"
    );

    let applied_set: HashSet<&String> = applied_ids.iter().collect();
    for ok in &run.stats.ok {
        assert!(
            applied_set.contains(&ok.id),
            "write {} was answered 2xx but the backend never applied it",
            ok.id
        );
    }
    let mut seen = HashSet::new();
    for ok in &run.stats.ok {
        assert!(
            seen.insert(&ok.if_match),
            "two writes carrying If-Match {} both succeeded",
            ok.if_match
        );
    }
    applied
}
