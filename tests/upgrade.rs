//! Zero-downtime upgrade: `etag-gateway --upgrade` takes the listening sockets over from the running
//! gateway when that one gets SIGQUIT, and the etags it handed out stay valid. Under a steady load
//! of writers (each writing its own document with `If-Match` set to the etag of its previous
//! write) no request fails, no write is refused, and the backend applies exactly the writes that
//! were answered 2xx.
//!
//! Every request goes on a fresh connection: an idle kept-alive connection may be closed by the
//! stopping process between two requests, as HTTP/1.1 allows at any time and clients handle by
//! retrying on a new connection; that race is not the gateway's to remove.

mod common;

use common::{backend_log, unique_temp_dir, DemoBackend, Gateway, Redis};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITERS: usize = 6;

/// One test at a time: they start processes that hand listening sockets around and pick free ports
/// by binding and releasing them, so two of them at once could meet on a port (seen once: a request
/// reached another test's gateway while it was handing its sockets over).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const READERS: usize = 2;

/// A client that opens a new connection for every request.
fn fresh_connections() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[derive(Default, Debug)]
struct Tally {
    /// (when the answer came, the body written) of every 2xx write, in order.
    writes: Vec<(Instant, String)>,
    reads: u64,
    /// Anything else: a transport error, a 409, a 5xx...
    failures: Vec<String>,
}

/// PUT `body` to `url` with `If-Match: <etag>` (as the server sent it).
async fn put_if_match(
    http: &reqwest::Client,
    url: &str,
    etag: &str,
    body: &'static str,
) -> reqwest::Response {
    http.put(url)
        .header("If-Match", etag)
        .body(body)
        .send()
        .await
        .unwrap()
}

fn quoted_etag(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn writer(url: String, doc: String, stop: Arc<AtomicBool>) -> Tally {
    let c = fresh_connections();
    let mut t = Tally::default();
    let created = c
        .put(format!("{url}{doc}"))
        .body(json!({"n": 0}).to_string())
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201, "create {doc}");
    let mut etag = quoted_etag(&created).expect("an etag for the created document");
    t.writes.push((Instant::now(), json!({"n": 0}).to_string()));
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = json!({"n": n}).to_string();
        match c
            .put(format!("{url}{doc}"))
            .header("If-Match", &etag)
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => match quoted_etag(&r) {
                Some(next) => {
                    etag = next;
                    t.writes.push((Instant::now(), body));
                }
                None => t.failures.push(format!("{doc} #{n}: 200 without an etag")),
            },
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                t.failures.push(format!("{doc} #{n}: {status} {text}"));
                return t;
            }
            Err(e) => {
                t.failures.push(format!("{doc} #{n}: {e:?}"));
                return t;
            }
        }
    }
    t
}

async fn reader(url: String, doc: String, stop: Arc<AtomicBool>) -> Tally {
    let c = fresh_connections();
    let mut t = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        match c.get(format!("{url}{doc}")).send().await {
            Ok(r) if r.status() == 200 => {
                t.reads += 1;
                let _ = r.bytes().await;
            }
            Ok(r) => t.failures.push(format!("GET {doc}: {}", r.status())),
            Err(e) => t.failures.push(format!("GET {doc}: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t
}

/// Starts the successor of `old` with `config`, sends `old` SIGQUIT, and waits for it to exit (0,
/// within 30 s): (successor, old).
async fn upgrade(old: Gateway, backend_url: &str, config: &str) -> (Gateway, Gateway) {
    let new = old.start_successor(backend_url, Some(config));
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("QUIT");
    let (status, old) = tokio::task::spawn_blocking(move || {
        let mut old = old;
        (old.wait_exit(Duration::from_secs(30)), old)
    })
    .await
    .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process, 30 s after SIGQUIT: {status:?}\n{}",
        old.stderr()
    );
    (new, old)
}

/// `[store] snapshot` in `dir`, a 5 s grace period.
fn memory_config(dir: &std::path::Path) -> String {
    format!(
        "[server]\ngrace_period_seconds = 5\n[store]\nsnapshot = \"{}\"\n",
        dir.join("etags").display()
    )
}

/// Runs the load against `old`, upgrades it to a successor with the same configuration, runs the
/// load on, and checks the outcome. Returns the successor.
async fn upgrade_under_load(backend: &DemoBackend, config: &str) -> Gateway {
    let old = Gateway::start(&backend.url(), Some(config));
    let url = old.url();
    let stop = Arc::new(AtomicBool::new(false));
    let docs: Vec<String> = (0..WRITERS).map(|i| format!("/docs/up-{i}")).collect();
    let writers: Vec<_> = docs
        .iter()
        .map(|doc| tokio::spawn(writer(url.clone(), doc.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let readers: Vec<_> = (0..READERS)
        .map(|i| tokio::spawn(reader(url.clone(), docs[i].clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The successor first (it waits for the sockets), then SIGQUIT to the old process.
    let quit = Instant::now();
    let (mut new, old) = upgrade(old, &backend.url(), config).await;
    let old_gone = Instant::now();
    println!(
        "old process exited {:?} after SIGQUIT (Pingora hands over for 5 s, then it drains)",
        old_gone - quit
    );
    // Load on the successor alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut all = Tally::default();
    let mut per_doc = Vec::new();
    for w in futures::future::join_all(writers).await {
        let w = w.expect("writer task");
        per_doc.push(w.writes.clone());
        all.writes.extend(w.writes);
        all.failures.extend(w.failures);
    }
    for r in futures::future::join_all(readers).await {
        let r = r.expect("reader task");
        all.reads += r.reads;
        all.failures.extend(r.failures);
    }
    let before = all.writes.iter().filter(|(at, _)| *at < quit).count();
    let after = all.writes.iter().filter(|(at, _)| *at > old_gone).count();
    println!(
        "writes answered 2xx: {} ({before} before SIGQUIT, {after} after the old process exited); \
         reads: {}; failures: {}",
        all.writes.len(),
        all.reads,
        all.failures.len()
    );
    assert!(
        all.failures.is_empty(),
        "requests failed or were refused across the upgrade: {:#?}\n---- old ----\n{}\n---- new ----\n{}",
        all.failures,
        old.stderr(),
        new.stderr()
    );
    assert!(before > 0 && after > 0, "the load ran on both processes");
    // Exactly the answered writes reached the backend, in order, none twice.
    for (doc, writes) in docs.iter().zip(&per_doc) {
        let log = backend_log(&backend.url(), doc).await;
        let applied: Vec<String> = log
            .iter()
            .map(|e| e["body"].as_str().unwrap_or_default().to_owned())
            .collect();
        let answered: Vec<String> = writes.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(applied, answered, "{doc}: applied vs answered writes");
    }
    let still = new.wait_exit(Duration::ZERO);
    assert!(still.is_none(), "the successor exited: {:?}", still);
    new
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_under_load_hands_the_memory_table_over() {
    let _serial = SERIAL.lock().await;
    let backend = DemoBackend::start(&[]);
    let dir = unique_temp_dir("upgrade-memory");
    let config = memory_config(&dir);
    let new = upgrade_under_load(&backend, &config).await;
    let log = new.stderr();
    assert!(
        log.contains("etag table restored from the snapshot"),
        "the successor started from the old table:\n{log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_under_load_with_redis() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let backend = DemoBackend::start(&[]);
    let config = format!(
        "[server]\ngrace_period_seconds = 5\n[store]\nkind = \"redis\"\nurl = \"{}\"\n",
        redis.url()
    );
    upgrade_under_load(&backend, &config).await;
}

#[test]
fn a_second_gateway_on_the_same_memory_table_is_refused() {
    let _serial = SERIAL.blocking_lock();
    let backend = DemoBackend::start(&[]);
    let dir = unique_temp_dir("upgrade-refused");
    let config = format!("[store]\nsnapshot = \"{}\"\n", dir.join("etags").display());
    let first = Gateway::start(&backend.url(), Some(&config));
    let path = dir.join("second.toml");
    std::fs::write(&path, &config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_etag-gateway"))
        .args(["--upstream", &backend.url(), "--listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run a second etag-gateway");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second gateway started:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("another etag-gateway (pid {})", first.pid()))
            && stderr.contains("etags.lock")
            && stderr.contains("--upgrade"),
        "{stderr}"
    );
    drop(first);
    let _ = std::fs::remove_dir_all(dir);
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purposes (its parent, the test, has not reaped a daemon it never
    // started as a child: daemons are reparented to init).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

/// Kills, when dropped, every pid the test noted in this file (one per line), and the one in
/// `gateway.pid` beside it (a daemon the test has not noted yet).
struct KillDaemons(std::path::PathBuf);

impl KillDaemons {
    fn note(path: &std::path::Path, pid: u32) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{pid}").unwrap();
    }
}

impl Drop for KillDaemons {
    fn drop(&mut self) {
        let mut pids = std::fs::read_to_string(&self.0).unwrap_or_default();
        pids.push('\n');
        pids.push_str(
            &std::fs::read_to_string(self.0.with_file_name("gateway.pid")).unwrap_or_default(),
        );
        for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if alive(pid) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What `conf/etag-gateway.service` does: `--daemon` (Type=forking, PIDFile), and on reload
/// `kill -QUIT $MAINPID` then `etag-gateway --upgrade --daemon`, which returns once the new daemon
/// runs; its pid replaces the old one in the pid file, and the etags live on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_mode_upgrade_the_way_the_systemd_unit_reloads() {
    let _serial = SERIAL.lock().await;
    let backend = DemoBackend::start(&[]);
    let dir = unique_temp_dir("upgrade-daemon");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pid_file = dir.join("gateway.pid");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ngrace_period_seconds = 5\npid_file = \"{}\"\n\
             upgrade_sock = \"{}\"\n[upstream]\nurl = \"{}\"\n[store]\nsnapshot = \"{}\"\n",
            pid_file.display(),
            dir.join("upgrade.sock").display(),
            backend.url(),
            dir.join("etags").display()
        ),
    )
    .unwrap();
    let gateway = |extra: &[&str]| {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_etag-gateway"))
            .arg("--config")
            .arg(&config)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .expect("run etag-gateway")
    };
    let log = || std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    // Daemons are not this test's children: whatever happens, kill every one it started.
    let _daemons = KillDaemons(dir.join("pids"));

    // ExecStart: returns once forked.
    let started = gateway(&["--daemon"]);
    assert!(started.success(), "{started}:\n{}", log());
    assert!(
        wait_until(Duration::from_secs(20), || read_pid(&pid_file)
            .is_some_and(alive)),
        "no daemon in the pid file:\n{}",
        log()
    );
    let old_pid = read_pid(&pid_file).unwrap();
    KillDaemons::note(&dir.join("pids"), old_pid);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        }),
        "the daemon does not listen:\n{}",
        log()
    );
    let url = format!("http://127.0.0.1:{port}/docs/d");
    let http = common::client();
    let created = http.put(&url).body("v1").send().await.unwrap();
    assert_eq!(created.status(), 201, "{}", log());
    let etag = quoted_etag(&created).unwrap();

    // ExecReload: kill -QUIT $MAINPID, then etag-gateway --upgrade --daemon.
    common::signal_pid(old_pid, "QUIT");
    // Blocks this worker until the new daemon runs (nothing else runs on it meanwhile).
    let upgraded = gateway(&["--upgrade", "--daemon"]);
    assert!(upgraded.success(), "{upgraded}:\n{}", log());
    assert!(
        wait_until(Duration::from_secs(20), || !alive(old_pid)),
        "the old daemon still runs:\n{}",
        log()
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            read_pid(&pid_file).is_some_and(|pid| pid != old_pid)
        }),
        "the new daemon's pid is not in the pid file:\n{}",
        log()
    );
    let new_pid = read_pid(&pid_file).unwrap();
    KillDaemons::note(&dir.join("pids"), new_pid);
    assert!(alive(new_pid), "{}", log());

    // The etag issued by the old daemon is current in the new one.
    let next = put_if_match(&http, &url, &etag, "v2").await;
    assert_eq!(next.status(), 200, "{}", log());
    let stale = put_if_match(&http, &url, &etag, "v3").await;
    assert_eq!(stale.status(), 409);

    // systemctl stop: SIGTERM.
    common::signal_pid(new_pid, "TERM");
    assert!(
        wait_until(Duration::from_secs(20), || !alive(new_pid)),
        "the daemon ignored SIGTERM:\n{}",
        log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pingora stops a process that got SIGQUIT and found nobody to hand its sockets to; the gateway
/// ignores such a SIGQUIT (after waiting 5 s for a successor to appear) and goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigquit_without_a_successor_is_ignored() {
    let _serial = SERIAL.lock().await;
    let backend = DemoBackend::start(&[]);
    let mut gateway = Gateway::start(&backend.url(), None);
    let url = format!("{}/docs/q", gateway.url());
    let http = common::client();
    let created = http.put(&url).body("v1").send().await.unwrap();
    let etag = quoted_etag(&created).expect("an etag");
    gateway.signal("QUIT");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        gateway.wait_exit(Duration::ZERO).is_none(),
        "the gateway stopped:\n{}",
        gateway.stderr()
    );
    assert!(
        gateway
            .stderr()
            .contains("no successor waits on the upgrade socket"),
        "{}",
        gateway.stderr()
    );
    let next = put_if_match(&http, &url, &etag, "v2").await;
    assert_eq!(next.status(), 200, "still serving, same table");
}

/// The lost-update torture (16 writers racing read-modify-write on one counter, 4 readers, on
/// kept-alive connections) with a zero-downtime upgrade in the middle: the backend's log must still
/// be one unbroken chain, every write answered 2xx applied, no etag used twice, and writes must
/// succeed through the successor with the etags the old process handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_update_is_lost_across_an_upgrade() {
    let _serial = SERIAL.lock().await;
    use common::torture::{check_invariants, run_workload_at, Deadline, Workload};
    let backend = DemoBackend::start(&[]);
    let dir = unique_temp_dir("upgrade-torture");
    let config = memory_config(&dir);
    let old = Gateway::start(&backend.url(), Some(&config));
    let deadline = Deadline::new(Instant::now() + Duration::from_secs(60));
    let mut workload = Workload::single(&old.url());
    workload.deadline = Some(deadline.clone());
    let run = tokio::spawn({
        let backend_url = backend.url();
        async move { run_workload_at(&backend_url, &workload).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (new, _old) = upgrade(old, &backend.url(), &config).await;
    let switched = std::time::SystemTime::now();
    deadline.set(Instant::now() + Duration::from_millis(2000));
    let run = run.await.unwrap();
    let applied = check_invariants(&backend, &run).await;
    let s = &run.stats;
    let after = s.ok.iter().filter(|w| w.at > switched).count();
    println!(
        "torture across an upgrade: writes ok {} ({after} after the old process exited), conflicts {}, \
         unknown {} {:?}, applied {applied}, reads {} ({} failed)",
        s.ok.len(),
        s.conflicts,
        s.unknown,
        s.unknown_statuses,
        s.reads + run.reader_reads,
        s.read_failures,
    );
    assert!(
        after > 0,
        "writes succeeded through the successor:\n{}",
        new.stderr()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A successor whose configuration moves the snapshot still waits for the old process (the lock
/// beside the upgrade socket, which both always share): never two tables serving at once. Its table
/// starts empty (the old one was saved elsewhere), so old etags are conflicts, never matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_with_another_snapshot_path_still_waits_for_the_old_process() {
    let _serial = SERIAL.lock().await;
    let backend = DemoBackend::start(&[]);
    let dir = unique_temp_dir("upgrade-moved-snapshot");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    let old = Gateway::start(&backend.url(), Some(&memory_config(&dir.join("a"))));
    let http = common::client();
    let url = format!("{}/docs/m", old.url());
    let created = http.put(&url).body("v1").send().await.unwrap();
    let etag = quoted_etag(&created).expect("an etag");
    std::fs::create_dir_all(dir.join("b")).unwrap();
    let (new, _old) = upgrade(old, &backend.url(), &memory_config(&dir.join("b"))).await;
    // It logged that it waited; that it then took over is logged a moment after the old one exits.
    assert!(
        wait_until(Duration::from_secs(10), || new
            .stderr()
            .contains("the previous process has exited")),
        "the successor did not take over:\n{}",
        new.stderr()
    );
    let log = new.stderr();
    assert!(
        log.contains("waiting for the previous process"),
        "the successor did not wait for the old process:\n{log}"
    );
    let stale = put_if_match(&http, &url, &etag, "v2").await;
    assert_eq!(stale.status(), 409, "an empty table vouches for nothing");
    let _ = std::fs::remove_dir_all(dir);
}
