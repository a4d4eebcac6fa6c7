//! Two gateway processes sharing one `redis-server`: the etag table is the store's, not a
//! replica's. An etag one replica issued is served and accepted by the other; the lost-update
//! torture holds across replicas, and while one of them is killed mid-write (its reservation expires
//! into an unknown outcome, never into "free"); a store that is down fails closed; a store that comes
//! back with older data cannot make an older etag current again.
//!
//! The last three tests pin holes through which an older state becomes writable again with the
//! Redis store: a server resynced from a lagging one keeps its `run_id` (no new epoch); an entry
//! with a write in flight expires after `store.idle_ttl_seconds`; a request body sent slowly keeps
//! a forwarded write open past its lease.
//!
//! Each test starts its own `redis-server` (Debian package `redis-server`; `scripts/setup.sh`
//! installs it) on a free loopback port. Run with `--nocapture` to see the figures.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::torture::{
    check_invariants, counts, next_counter, run_workload, Deadline, OkWrite, Route, Run, Workload,
    WriterStats, DOC, LOAD,
};
use common::{backend_get, backend_log, client, etag_of, DemoBackend, Gateway, Redis, Resp};
use serde_json::Value;

/// The tests compete for two cores with their gateways, backend and Redis: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A gateway config using `redis` as its store, plus `extra` (other sections).
fn redis_config(redis: &Redis, extra: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n{extra}",
        redis.url()
    )
}

async fn put(url: &str, body: &str, if_match: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .put(url)
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(etag) = if_match {
        req = req.header("If-Match", format!("\"{etag}\""));
    }
    req.send().await.expect("PUT through the gateway")
}

/// GET through a gateway: status, etag, body.
async fn get(url: &str) -> (u16, Option<String>, String) {
    let resp = client()
        .get(url)
        .send()
        .await
        .expect("GET through the gateway");
    let (status, etag) = (resp.status().as_u16(), etag_of(&resp));
    (status, etag, resp.text().await.expect("body"))
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etag_from_one_replica_is_accepted_by_the_other() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let backend = DemoBackend::start(&[]);
    let config = redis_config(&redis, "");
    let a = Gateway::start(&backend.url(), Some(&config));
    let b = Gateway::start(&backend.url(), Some(&config));
    let (doc_a, doc_b) = (
        format!("{}/docs/shared", a.url()),
        format!("{}/docs/shared", b.url()),
    );

    let created = put(&doc_a, r#"{"v":1}"#, None).await;
    assert!(
        created.status().is_success(),
        "create: {}",
        created.status()
    );

    // A issues E1 ...
    let (status, e1, body) = get(&doc_a).await;
    assert_eq!((status, body.as_str()), (200, r#"{"v":1}"#));
    let e1 = e1.expect("A's GET has an ETag");
    // ... B serves the same one ...
    let (status, e1_at_b, _) = get(&doc_b).await;
    assert_eq!(status, 200);
    assert_eq!(
        e1_at_b.as_deref(),
        Some(e1.as_str()),
        "B serves the etag A issued"
    );

    // ... and accepts it.
    let written = put(&doc_b, r#"{"v":2}"#, Some(&e1)).await;
    assert!(
        written.status().is_success(),
        "B must accept the etag A issued: {} {}",
        written.status(),
        written.text().await.unwrap_or_default()
    );
    let e2 = etag_of(&written).expect("B's 2xx write answer carries the new ETag");
    assert_ne!(e2, e1);
    let log_len = backend_log(&backend.url(), "/docs/shared").await.len();
    assert_eq!(log_len, 2, "create + B's write applied");

    // A refuses the etag B superseded, with the seed's conflict answer naming the current one.
    let refused = put(&doc_a, r#"{"v":3}"#, Some(&e1)).await;
    assert_eq!(refused.status(), 409, "A must refuse the etag B superseded");
    assert_eq!(
        etag_of(&refused).as_deref(),
        Some(e2.as_str()),
        "the conflict carries the current etag (written through B)"
    );
    let conflict: Value = refused.json().await.expect("conflict body is JSON");
    assert_eq!(conflict["actualETag"], e1.as_str(), "{conflict}");
    assert_eq!(conflict["expectedETag"], e2.as_str(), "{conflict}");

    // Nothing reached the backend.
    assert_eq!(
        backend_log(&backend.url(), "/docs/shared").await.len(),
        log_len,
        "the refused write reached the backend"
    );
    assert_eq!(
        backend_get(&backend.url(), "/docs/shared").await,
        (200, r#"{"v":2}"#.to_string())
    );

    // And A now serves (and accepts) B's etag.
    let (status, at_a, _) = get(&doc_a).await;
    assert_eq!((status, at_a.as_deref()), (200, Some(e2.as_str())));
    let written = put(&doc_a, r#"{"v":4}"#, Some(&e2)).await;
    assert!(
        written.status().is_success(),
        "A accepts B's etag: {}",
        written.status()
    );
}

/// Writers alternate: even ones read through `a` and write through `b`, odd ones the reverse.
/// Readers are split between the two.
fn crossed(a: &str, b: &str, fallback: bool, load: Duration) -> Workload {
    let route = |read: &str, write: &str, other: &str| Route {
        read: read.to_string(),
        write: write.to_string(),
        fallback: fallback.then(|| other.to_string()),
    };
    Workload {
        writers: (0..common::torture::WRITERS)
            .map(|i| {
                if i % 2 == 0 {
                    route(a, b, b)
                } else {
                    route(b, a, b)
                }
            })
            .collect(),
        readers: (0..common::torture::READERS)
            .map(|i| {
                if i % 2 == 0 {
                    route(a, a, b)
                } else {
                    route(b, b, b)
                }
            })
            .collect(),
        load,
        deadline: None,
        create_via: a.to_string(),
    }
}

fn summary(name: &str, run: &Run, applied: usize) -> String {
    let s = &run.stats;
    format!(
        "{name}: {:.1} s: writes ok {}, conflicts {}, unknown {} ({:?}), applied {}, fail-overs {}, \
         reads {} ({} by writers, {} of them without etag, {} failed; {} by readers, {} with etag)",
        run.duration.as_secs_f64(),
        s.ok.len(),
        s.conflicts,
        s.unknown,
        counts(&s.unknown_statuses),
        applied,
        s.fail_overs,
        s.reads + run.reader_reads,
        s.reads,
        s.reads_without_etag,
        s.read_failures,
        run.reader_reads,
        run.reader_reads_with_etag,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torture_across_replicas() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let backend = DemoBackend::start(&[]);
    let config = redis_config(&redis, "");
    let a = Gateway::start(&backend.url(), Some(&config));
    let b = Gateway::start(&backend.url(), Some(&config));

    let run = run_workload(&backend, &crossed(&a.url(), &b.url(), false, LOAD)).await;
    let applied = check_invariants(&backend, &run).await;
    let s = &run.stats;
    let through = |read: &str, write: &str| {
        s.ok.iter()
            .filter(|w| w.read_via == read && w.via == write)
            .count()
    };
    let (a_to_b, b_to_a) = (through(&a.url(), &b.url()), through(&b.url(), &a.url()));
    println!(
        "{} (read A → write B ok {a_to_b}, read B → write A ok {b_to_a})",
        summary("torture_across_replicas", &run, applied)
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
    assert!(
        a_to_b > 0 && b_to_a > 0,
        "writes must succeed with etags read through the other replica, both ways"
    );
}

/// What the killer saw.
struct Kill {
    /// When replica A was killed, by the wall clock.
    at: SystemTime,
    /// The write A was forwarding when it died: the `If-Match` it carried.
    if_match: String,
    /// Its own writes before that, and the killed one (unknown).
    stats: WriterStats,
    /// The lease left behind in Redis (its deadline, ms since the epoch), seen twice a second apart.
    stuck_lease_deadline: Option<u64>,
}

/// The lease set of the counter's entry in Redis (layout of `src/store/redis.rs`: `eg:{key}:l`,
/// one member per reservation, scored by its deadline in ms).
fn leases(redis: &Redis) -> Vec<(String, u64)> {
    let reply = redis.command(&[
        "ZRANGE",
        &format!("eg:{{{DOC}}}:l"),
        "0",
        "-1",
        "WITHSCORES",
    ]);
    reply
        .items()
        .chunks(2)
        .map(|pair| {
            let member = pair[0].text().unwrap_or_default().to_string();
            let score = pair[1]
                .text()
                .unwrap_or_default()
                .parse::<f64>()
                .unwrap_or(0.0);
            (member, score as u64)
        })
        .collect()
}

/// After `after`, takes part in the workload through A (read, then write with `If-Match`) until one
/// of its writes is not answered within `window`: A has reserved it and forwarded it to the (slow)
/// backend. Then A is killed with SIGKILL, and the workload's deadline set to `then` after the kill.
async fn kill_mid_write(
    mut a: Gateway,
    redis: Arc<Redis>,
    after: Duration,
    window: Duration,
    deadline: Deadline,
    then: Duration,
) -> (Gateway, Kill) {
    tokio::time::sleep(after).await;
    let c = client();
    let url = format!("{}{DOC}", a.url());
    let mut stats = WriterStats::default();
    // Under 16 writers the counter is often mid-write: keep trying.
    let give_up = Instant::now() + Duration::from_secs(20);
    let (at, if_match) = loop {
        assert!(
            Instant::now() < give_up,
            "the killer never caught A forwarding a write: {stats:?}"
        );
        let r = c.get(&url).send().await.expect("A is alive: GET");
        stats.reads += 1;
        let Some(etag) = etag_of(&r) else {
            stats.reads_without_etag += 1;
            let _ = r.bytes().await;
            continue;
        };
        let doc: Value = r.json().await.expect("counter JSON");
        let (id, body) = next_counter(
            doc["n"].as_u64().expect("n"),
            doc["id"].as_str().expect("id"),
        );
        let mut write = tokio::spawn(
            c.put(&url)
                .header("If-Match", format!("\"{etag}\""))
                .header("Content-Type", "application/json")
                .body(body)
                .send(),
        );
        match tokio::time::timeout(window, &mut write).await {
            Ok(answer) => match answer.expect("PUT task") {
                Ok(r) if r.status().is_success() => stats.ok.push(OkWrite {
                    id,
                    if_match: etag,
                    at: SystemTime::now(),
                    via: a.url(),
                    read_via: a.url(),
                }),
                Ok(r) if r.status() == 409 => stats.conflicts += 1,
                other => panic!("before the kill, A answered a write with {other:?}"),
            },
            Err(_) => {
                let at = SystemTime::now();
                a.kill();
                deadline.set(Instant::now() + then);
                match write.await.expect("PUT task") {
                    Ok(r) if r.status().is_success() => stats.ok.push(OkWrite {
                        id,
                        if_match: etag.clone(),
                        at: SystemTime::now(),
                        via: a.url(),
                        read_via: a.url(),
                    }),
                    Ok(r) => {
                        stats.unknown += 1;
                        stats.unknown_statuses.push(r.status().as_u16().to_string());
                    }
                    Err(_) => {
                        stats.unknown += 1;
                        stats.unknown_statuses.push("killed".into());
                    }
                }
                break (at, etag);
            }
        }
    };
    // A reservation that is still there a second later, and another second later, is the dead
    // replica's: a live one settles within the upstream timeouts (< 1 s), and no other conditional
    // write can be reserved while it is held.
    let redis2 = redis.clone();
    let (first, second) = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(1000));
        let first = leases(&redis2);
        std::thread::sleep(Duration::from_millis(1000));
        (first, leases(&redis2))
    })
    .await
    .expect("lease probe");
    let stuck_lease_deadline = match (first.as_slice(), second.as_slice()) {
        ([one], [two]) if one == two => Some(one.1),
        _ => None,
    };
    println!(
        "killer: A killed at {} ms while forwarding a write with If-Match {if_match}; leases 1 s after: \
         {first:?}, 2 s after: {second:?}",
        millis(at)
    );
    (
        a,
        Kill {
            at,
            if_match,
            stats,
            stuck_lease_deadline,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torture_while_a_replica_is_killed() {
    let _serial = SERIAL.lock().await;
    let redis = Arc::new(Redis::start());
    // Every request waits 30 ms at the backend: a forwarded write holds its reservation that long,
    // so the killer can catch replica A in the middle of one.
    let backend = DemoBackend::start(&["--delay-ms", "30"]);
    // lease = body deadline (read timeout) + body read timeout (read timeout) + connect + read
    //         timeout + timeout hold + 5 s = 6.4 s (src/main.rs)
    let config = redis_config(
        &redis,
        "[upstream]\nconnect_timeout_ms = 200\nread_timeout_ms = 300\ntimeout_hold_ms = 300\n",
    );
    let lease = Duration::from_millis(6_400);
    let a = Gateway::start(&backend.url(), Some(&config));
    let b = Gateway::start(&backend.url(), Some(&config));
    let (a_url, b_url) = (a.url(), b.url());

    // The workload runs until 3 s after the lease of the killed write expired (the killer moves the
    // deadline when it kills; it gives up after 5 s of trying).
    let kill_after = Duration::from_secs(2);
    let after_expiry = lease + Duration::from_secs(3);
    let deadline =
        Deadline::new(Instant::now() + kill_after + Duration::from_secs(6) + after_expiry);
    let killer = tokio::spawn(kill_mid_write(
        a,
        redis.clone(),
        kill_after,
        Duration::from_millis(12),
        deadline.clone(),
        after_expiry,
    ));
    let mut workload = crossed(&a_url, &b_url, true, after_expiry);
    workload.deadline = Some(deadline);
    let mut run = run_workload(&backend, &workload).await;
    let (_a, kill) = killer.await.expect("killer task");
    let killed_if_match = kill.if_match.clone();
    run.stats.absorb(kill.stats);
    // A write cut off by the kill may still be at the backend: let it land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let applied = check_invariants(&backend, &run).await;
    let s = &run.stats;

    let killed_at = millis(kill.at);
    let expiry = kill
        .stuck_lease_deadline
        .unwrap_or(killed_at + lease.as_millis() as u64);
    let when = |from: u64, to: u64| {
        s.ok.iter()
            .filter(|w| (from..to).contains(&millis(w.at)))
            .count()
    };
    // A write answered just after the kill may have been settled just before A reserved: a margin.
    let margin = 300;
    let (before, stuck, after) = (
        when(0, killed_at),
        when(killed_at + margin, expiry.saturating_sub(100)),
        when(expiry, u64::MAX),
    );
    println!(
        "{}\n  ok writes: {before} before the kill, {stuck} while A's reservation was held \
         ({margin} ms → {} ms after the kill), {after} after it expired",
        summary("torture_while_a_replica_is_killed", &run, applied),
        expiry.saturating_sub(killed_at),
    );

    assert!(
        applied >= s.ok.len() && applied as u64 <= s.ok.len() as u64 + s.unknown,
        "applied writes ({applied}) must be the 2xx ones ({}) plus some of the unknown ones ({})",
        s.ok.len(),
        s.unknown
    );
    assert!(before > 0, "no write succeeded before the kill");
    let deadline = kill
        .stuck_lease_deadline
        .expect("A died holding a reservation: its lease must stay in Redis until it expires");
    assert!(
        deadline <= killed_at + lease.as_millis() as u64 + 200,
        "the lease ({deadline}) outlasts kill ({killed_at}) + lease ({lease:?})"
    );
    assert_eq!(
        stuck, 0,
        "a write succeeded while the dead replica's reservation was still held"
    );
    assert!(
        after > 0,
        "no write succeeded after the dead replica's lease expired (at {} ms after the kill): \
         an expired reservation must count as an unknown outcome, not as stuck forever",
        expiry - killed_at
    );
    assert!(
        s.ok.iter().all(|w| w.if_match != killed_if_match),
        "the etag the killed write carried ({killed_if_match}) was accepted again after its lease \
         expired: an expired reservation must be an unknown outcome (fresh etag), not a free one"
    );
}

/// Retries `PUT` while the gateway answers 503 (it reconnects to Redis), for up to `patience`.
async fn put_until_store_answers(
    url: &str,
    body: &str,
    if_match: Option<&str>,
    patience: Duration,
) -> reqwest::Response {
    let deadline = Instant::now() + patience;
    loop {
        let resp = put(url, body, if_match).await;
        if resp.status() != 503 || Instant::now() > deadline {
            return resp;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_fails_closed() {
    let _serial = SERIAL.lock().await;
    let mut redis = Redis::start();
    let backend = DemoBackend::start(&[]);
    let gateway = Gateway::start(&backend.url(), Some(&redis_config(&redis, "")));
    let url = format!("{}/docs/a", gateway.url());

    assert!(put(&url, r#"{"v":1}"#, None).await.status().is_success());
    let (status, etag, _) = get(&url).await;
    assert_eq!(status, 200);
    let etag = etag.expect("GET has an ETag while Redis is up");

    redis.stop();
    for (what, if_match) in [
        ("conditional", Some(etag.as_str())),
        ("unconditional", None),
    ] {
        let started = Instant::now();
        let resp = put(&url, r#"{"v":2}"#, if_match).await;
        let elapsed = started.elapsed();
        assert_eq!(resp.status(), 503, "{what} PUT while Redis is down");
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{what} PUT: 503 is JSON"
        );
        assert!(etag_of(&resp).is_none(), "{what} PUT: 503 names no etag");
        let body: Value = resp.json().await.expect("503 body is JSON");
        assert!(body["error"].is_string(), "{what} PUT: {body}");
        println!("{what} PUT with Redis down: 503 after {elapsed:?}: {body}");
    }
    assert_eq!(
        backend_log(&backend.url(), "/docs/a").await.len(),
        1,
        "a write reached the backend while Redis was down"
    );
    let (status, read_etag, body) = get(&url).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"v":1}"#),
        "reads are served while Redis is down"
    );
    assert_eq!(
        read_etag, None,
        "no etag can be vouched for while Redis is down"
    );

    redis.restart();
    let started = Instant::now();
    let resp = put_until_store_answers(&url, r#"{"v":3}"#, None, Duration::from_secs(5)).await;
    assert!(
        resp.status().is_success(),
        "writes work again after Redis is back: {} after {:?}",
        resp.status(),
        started.elapsed()
    );
    println!(
        "Redis back: first write answered {} after {:?}",
        resp.status(),
        started.elapsed()
    );
    assert_eq!(
        backend_get(&backend.url(), "/docs/a").await,
        (200, r#"{"v":3}"#.to_string())
    );
    assert_eq!(backend_log(&backend.url(), "/docs/a").await.len(), 2);

    // The restarted Redis lost the table: the etag from before is unknown, hence refused.
    let stale = put(&url, r#"{"v":4}"#, Some(&etag)).await;
    assert_eq!(stale.status(), 409, "an etag from before the store restart");
    let (status, fresh, _) = get(&url).await;
    assert_eq!(status, 200);
    let fresh = fresh.expect("GET has an ETag again");
    assert_ne!(fresh, etag);
    let resp = put(&url, r#"{"v":5}"#, Some(&fresh)).await;
    assert!(
        resp.status().is_success(),
        "conditional write: {}",
        resp.status()
    );
    assert_eq!(backend_log(&backend.url(), "/docs/a").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn older_snapshot_cannot_resurrect_an_etag() {
    let _serial = SERIAL.lock().await;
    let mut redis = Redis::start_with_snapshots();
    let backend = DemoBackend::start(&[]);
    let gateway = Gateway::start(&backend.url(), Some(&redis_config(&redis, "")));
    let url = format!("{}/docs/a", gateway.url());
    let entry = "eg:{/docs/a}"; // the entry's hash (layout of src/store/redis.rs)

    assert!(put(&url, r#"{"v":1}"#, None).await.status().is_success());
    let (status, e1, _) = get(&url).await;
    assert_eq!(status, 200);
    let e1 = e1.expect("GET has an ETag");

    // The snapshot holds E1 as current.
    redis.save();
    let old = redis.dir().join("old.rdb");
    redis.copy_rdb_to(&old);

    let resp = put(&url, r#"{"v":2}"#, Some(&e1)).await;
    assert!(
        resp.status().is_success(),
        "PUT If-Match E1: {}",
        resp.status()
    );
    let e2 = etag_of(&resp).expect("2xx write carries the new ETag");

    // Redis comes back with the older data.
    redis.shutdown_nosave();
    redis.restore_rdb_from(&old);
    redis.restart();
    assert_eq!(
        redis.command(&["HGET", entry, "e"]),
        Resp::Bulk(Some(e1.clone())),
        "the restored snapshot holds E1 as the current etag (else this test proves nothing)"
    );

    let resp = put_until_store_answers(&url, r#"{"v":3}"#, Some(&e1), Duration::from_secs(5)).await;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(
        status, 409,
        "E1 became current again after Redis was restored from an older snapshot: {body}"
    );
    assert_eq!(
        backend_get(&backend.url(), "/docs/a").await,
        (200, r#"{"v":2}"#.to_string()),
        "the backend still holds what was written with E2"
    );
    assert_eq!(backend_log(&backend.url(), "/docs/a").await.len(), 2);

    let (status, e3, body) = get(&url).await;
    assert_eq!((status, body.as_str()), (200, r#"{"v":2}"#));
    let e3 = e3.expect("GET has an ETag");
    assert_ne!(e3, e1, "E1 handed out again");
    assert_ne!(
        e3, e2,
        "E2 handed out again (the store cannot know it is still current)"
    );
    // E2 is unknown to the restored store: refused too.
    let resp = put(&url, r#"{"v":4}"#, Some(&e2)).await;
    assert_eq!(resp.status(), 409, "E2 is from a store state that was lost");
    let resp = put(&url, r#"{"v":5}"#, Some(&e3)).await;
    assert!(
        resp.status().is_success(),
        "PUT If-Match E3: {}",
        resp.status()
    );
}

/// `INFO replication` of `redis`, as `field:value` lines.
fn replication_info(redis: &Redis) -> String {
    redis
        .command(&["INFO", "replication"])
        .text()
        .unwrap_or_default()
        .to_string()
}

/// Makes `replica` a replica of `master` and waits until it holds `master`'s data (its link is up
/// and `key`'s field `field` reads `expected`).
fn replicate(replica: &Redis, master: &Redis, key: &str, field: &str, expected: &str) {
    let reply = replica.command(&["REPLICAOF", "127.0.0.1", &master.port().to_string()]);
    assert_eq!(reply.text(), Some("OK"), "REPLICAOF: {reply:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = replication_info(replica).contains("master_link_status:up");
        if up && replica.command(&["HGET", key, field]).text() == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica on {} did not sync from {} within 20 s: {}",
            replica.port(),
            master.port(),
            replication_info(replica)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn promote(redis: &Redis) {
    let reply = redis.command(&["REPLICAOF", "NO", "ONE"]);
    assert_eq!(reply.text(), Some("OK"), "REPLICAOF NO ONE: {reply:?}");
}

fn run_id(redis: &Redis) -> String {
    let info = redis.command(&["INFO", "server"]);
    info.text()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The "failover to a lagging replica" of the contract, seen from a gateway that keeps talking to
/// one address: the server there is resynced from a server that missed the last write, then
/// promoted back. Same process (same `run_id`), older data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resync_from_a_lagging_server_cannot_resurrect_an_etag() {
    let _serial = SERIAL.lock().await;
    let store = Redis::start();
    let lagging = Redis::start();
    let backend = DemoBackend::start(&[]);
    let gateway = Gateway::start(&backend.url(), Some(&redis_config(&store, "")));
    let url = format!("{}/docs/a", gateway.url());
    let entry = "eg:{/docs/a}"; // the entry's hash (layout of src/store/redis.rs)

    assert!(put(&url, r#"{"v":1}"#, None).await.status().is_success());
    let (status, e1, _) = get(&url).await;
    assert_eq!(status, 200);
    let e1 = e1.expect("GET has an ETag");

    // A replica holds E1 as current, then stops following (it lags from here on).
    replicate(&lagging, &store, entry, "e", &e1);
    promote(&lagging);

    // Attaching its first replica gives the store a new replication id (Redis starts a fresh
    // replication history), so the gateway moved to a new epoch: E1 stops matching, a spurious
    // conflict at worst. Read again.
    let stale = put(&url, r#"{"v":2}"#, Some(&e1)).await;
    assert_eq!(stale.status().as_u16(), 409, "new identity, new epoch");
    let (status, e1b, _) = get(&url).await;
    assert_eq!(status, 200);
    let e1b = e1b.expect("GET has an ETag");
    assert_ne!(e1b, e1);
    let resp = put(&url, r#"{"v":2}"#, Some(&e1b)).await;
    assert!(
        resp.status().is_success(),
        "PUT If-Match E1b: {}",
        resp.status()
    );
    let e2 = etag_of(&resp).expect("2xx write carries the new ETag");

    // The gateway's server takes the lagging server's data (a failover to it and back), and is
    // promoted again: same process, older data.
    let before = run_id(&store);
    replicate(&store, &lagging, entry, "e", &e1);
    promote(&store);
    assert_eq!(run_id(&store), before, "same process");

    let resp = put_until_store_answers(&url, r#"{"v":3}"#, Some(&e1), Duration::from_secs(5)).await;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let log = backend_log(&backend.url(), "/docs/a").await;
    assert_eq!(
        status,
        409,
        "E1 became current again after the store was resynced from a lagging server (same run_id): \
         the write based on v1 overwrote v2 (written with E2 {e2}); backend log: {log:?}; answer: {body}"
    );
    let again = put(&url, r#"{"v":3}"#, Some(&e1b)).await;
    assert_eq!(
        again.status().as_u16(),
        409,
        "nor the etag of the epoch before"
    );
    assert_eq!(
        backend_get(&backend.url(), "/docs/a").await,
        (200, r#"{"v":2}"#.to_string())
    );
}

/// `store.idle_ttl_seconds` lets an idle entry expire in Redis. An entry with a write in flight is
/// not idle: if it expired mid-write (idle TTL shorter than the write), a read would get a fresh
/// etag for the state before the write, and a write with that etag would be forwarded alongside the
/// first one. (The memory store keeps entries with writes in flight out of its LRU.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entry_with_a_write_in_flight_does_not_expire() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    // Every write is applied 3 s after it arrives, then answered (a slow backend, well within the
    // read timeout).
    let backend = DemoBackend::start(&["--late-apply-rate", "1", "--late-apply-ms", "3000"]);
    let config = redis_config(
        &redis,
        "idle_ttl_seconds = 1\n[upstream]\nread_timeout_ms = 10000\n",
    );
    let a = Gateway::start(&backend.url(), Some(&config));
    let b = Gateway::start(&backend.url(), Some(&config));
    let path = "/docs/slow";
    let (at_a, at_b) = (format!("{}{path}", a.url()), format!("{}{path}", b.url()));

    let created = put(&at_a, r#"{"n":0,"id":"init","prev":null}"#, None).await;
    assert!(
        created.status().is_success(),
        "create: {}",
        created.status()
    );
    let (status, e0, _) = get(&at_a).await;
    assert_eq!(status, 200);
    let e0 = e0.expect("GET has an ETag");

    // W1 through A, based on init: applied 3 s from now.
    let (_, w1) = next_counter(0, "init");
    let first = tokio::spawn({
        let (url, e0) = (at_a.clone(), e0.clone());
        async move { put(&url, &w1, Some(&e0)).await.status().as_u16() }
    });
    // 1.5 s into W1 (longer than the idle TTL), a reader through B, then a write with what it got.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, mid_etag, mid_body) = get(&at_b).await;
    assert_eq!(status, 200);
    let second = match &mid_etag {
        Some(etag) => {
            let doc: Value = serde_json::from_str(&mid_body).expect("JSON");
            let (_, w2) = next_counter(
                doc["n"].as_u64().expect("n"),
                doc["id"].as_str().expect("id"),
            );
            put(&at_b, &w2, Some(etag)).await.status().as_u16()
        }
        None => 0,
    };
    let first = first.await.expect("W1 task");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = backend_log(&backend.url(), path).await;
    println!(
        "entry_with_a_write_in_flight_does_not_expire: W1 {first}; read 1.5 s into W1: etag {mid_etag:?}; \
         W2 with it: {second}; applied {}",
        log.len()
    );
    common::torture::check_chain(&log);
    assert!(
        mid_etag.is_none(),
        "a read 1.5 s into a write (idle TTL 1 s) got an etag: the entry expired while the write \
         was in flight (W2 with that etag was answered {second})"
    );
    assert!(first == 200, "W1: {first}");
}

/// A write's reservation in Redis lasts its lease (connect + read timeout + timeout hold + 5 s). A
/// client that sends its request body slowly keeps the forwarded write open at the backend for as
/// long as it likes: the upstream read timeout starts again with every body chunk forwarded. If the
/// lease expired while the body is still coming, a read would get a fresh etag for the state before
/// the slow write, and a second write with it would be forwarded; then the slow write lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_request_body_cannot_outlast_its_lease() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let backend = DemoBackend::start(&[]);
    // lease = 300 + 300 + 200 + 300 + 300 ms + 5 s = 6.4 s (src/main.rs)
    let config = redis_config(
        &redis,
        "[upstream]\nconnect_timeout_ms = 200\nread_timeout_ms = 300\ntimeout_hold_ms = 300\n",
    );
    let a = Gateway::start(&backend.url(), Some(&config));
    let b = Gateway::start(&backend.url(), Some(&config));
    let path = "/docs/body";
    let (at_a, at_b) = (format!("{}{path}", a.url()), format!("{}{path}", b.url()));

    let created = put(&at_a, r#"{"n":0,"id":"init","prev":null}"#, None).await;
    assert!(
        created.status().is_success(),
        "create: {}",
        created.status()
    );
    let (status, e0, _) = get(&at_a).await;
    assert_eq!(status, 200);
    let e0 = e0.expect("GET has an ETag");

    // W1 through A, based on init, its body sent one byte every 100 ms (8 s in all).
    let (_, w1) = next_counter(0, "init");
    let w1 = format!(
        "{}, \"pad\": \"{}\"}}",
        w1.trim_end_matches('}'),
        " ".repeat(10)
    );
    let interval = Duration::from_millis(100);
    let slow_for = interval * w1.len() as u32;
    let addr = a.addr();
    let slow = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nIf-Match: \"{e0}\"\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            w1.len()
        );
        s.write_all(head.as_bytes()).await.expect("head");
        for byte in w1.as_bytes() {
            tokio::time::sleep(interval).await;
            if s.write_all(&[*byte]).await.is_err() {
                break; // the gateway gave up on the body
            }
        }
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or("no answer")
            .to_string()
    });

    // After the lease ran out (but before the slow body is complete): a reader through B, then a
    // write with what it got.
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    let (status, mid_etag, mid_body) = get(&at_b).await;
    assert_eq!(status, 200);
    let second = match &mid_etag {
        Some(etag) => {
            let doc: Value = serde_json::from_str(&mid_body).expect("JSON");
            let (_, w2) = next_counter(
                doc["n"].as_u64().expect("n"),
                doc["id"].as_str().expect("id"),
            );
            put(&at_b, &w2, Some(etag)).await.status().as_u16()
        }
        None => 0,
    };
    let first = slow.await.expect("slow writer");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = backend_log(&backend.url(), path).await;
    println!(
        "slow_request_body_cannot_outlast_its_lease: W1 body over {slow_for:?}: {first}; read 6.5 s in: \
         etag {mid_etag:?}; W2 with it: {second}; applied {}",
        log.len()
    );
    common::torture::check_chain(&log);
}
