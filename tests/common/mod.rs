//! Test harness for the end-to-end tests: runs the real `demo-backend` and `etag-gateway` binaries
//! as child processes on free local ports, and a few HTTP helpers.
//!
//! Each process writes its stderr to a file in a unique temp directory; when a test fails (the
//! harness is dropped while the thread panics) the tail of that file is printed and the directory is
//! kept, otherwise it is removed.

#![allow(dead_code)] // each test crate uses a different subset

pub mod torture;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A unique directory under the system temp dir for one child process.
pub fn unique_temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("etag-gateway-tests")
        .join(format!(
            "{what}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// Kills and reaps a child; on a failing test prints the tail of its stderr and keeps its directory.
fn shut_down(child: &mut Child, what: &str, dir: &Path) {
    let _ = child.kill();
    let _ = child.wait();
    if std::thread::panicking() {
        eprintln!(
            "---- {what} stderr (tail; files kept in {}) ----\n{}\n---- end of {what} stderr ----",
            dir.display(),
            tail(&dir.join("stderr.log"), 8_000)
        );
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The `demo-backend` binary, listening on a free port.
pub struct DemoBackend {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    // Kept open so that the backend never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl DemoBackend {
    /// Starts `demo-backend --listen 127.0.0.1:0 <args>` and learns its address from its first
    /// stdout line (`demo-backend listening on <addr>`).
    pub fn start(args: &[&str]) -> DemoBackend {
        let dir = unique_temp_dir("demo-backend");
        let stderr = File::create(dir.join("stderr.log")).expect("create stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_demo-backend"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn demo-backend");
        let stdout = child.stdout.take().expect("piped stdout");

        // Read the first line on a thread, so that a backend that never prints cannot hang the test.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let res = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send((res, reader));
        });
        let fail = |child: &mut Child, msg: String| -> ! {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{msg}\n---- demo-backend stderr ----\n{}",
                tail(&dir.join("stderr.log"), 8_000)
            );
        };
        let (line, reader) = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok((Ok(line), reader)) => (line, reader),
            Ok((Err(e), _)) => fail(&mut child, format!("reading demo-backend stdout: {e}")),
            Err(_) => fail(
                &mut child,
                "demo-backend printed no address within 20 s".into(),
            ),
        };
        let addr = match line
            .trim()
            .strip_prefix("demo-backend listening on ")
            .map(str::parse)
        {
            Some(Ok(addr)) => addr,
            _ => fail(
                &mut child,
                format!("unexpected first line from demo-backend: {line:?}"),
            ),
        };
        DemoBackend {
            child,
            addr,
            dir,
            _stdout: reader,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl DemoBackend {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the backend with SIGSTOP: the kernel still accepts connections and buffers requests,
    /// nothing is answered or applied until [`DemoBackend::resume`] (then the backlog is processed,
    /// in no particular order). Its in-memory documents survive, unlike a real restart.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// SIGCONT after [`DemoBackend::pause`].
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }
}

/// `kill -<sig> <pid>` (no libc in the test dependencies).
pub fn signal_pid(pid: u32, sig: &str) {
    signal(pid, sig)
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}: {status}");
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        shut_down(&mut self.child, "demo-backend", &self.dir);
    }
}

/// The `etag-gateway` binary, listening on a free port in front of `upstream_url`.
pub struct Gateway {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Gateway {
    /// Starts `etag-gateway --upstream <url> --listen 127.0.0.1:<free port> [--config <file>]` and
    /// waits until it accepts TCP connections. `config_toml` must not set `listen` or `url`.
    pub fn start(upstream_url: &str, config_toml: Option<&str>) -> Gateway {
        // The free port is found by binding and releasing it; someone may take it in between, so a
        // gateway that dies complaining about its address is started again on another port.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Gateway::try_start(upstream_url, config_toml) {
                Ok(gateway) => return gateway,
                Err((msg, stderr)) => {
                    let lower = stderr.to_lowercase();
                    let port_taken =
                        lower.contains("address already in use") || lower.contains("addrinuse");
                    if port_taken && attempt < 3 {
                        continue;
                    }
                    panic!("{msg}\n---- etag-gateway stderr ----\n{stderr}\n---- end ----");
                }
            }
        }
    }

    fn try_start(
        upstream_url: &str,
        config_toml: Option<&str>,
    ) -> Result<Gateway, (String, String)> {
        let dir = unique_temp_dir("etag-gateway");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let stderr = File::create(dir.join("stderr.log")).expect("create stderr file");
        let stdout = File::create(dir.join("stdout.log")).expect("create stdout file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_etag-gateway"));
        cmd.args(["--upstream", upstream_url, "--listen", &addr.to_string()]);
        if let Some(toml) = config_toml {
            let path = dir.join("gateway.toml");
            std::fs::write(&path, toml).expect("write config file");
            cmd.arg("--config").arg(&path);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn etag-gateway");

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Gateway { child, addr, dir });
            }
            let problem = match child.try_wait() {
                Ok(Some(status)) => Some(format!(
                    "etag-gateway exited before listening on {addr}: {status}"
                )),
                _ if Instant::now() > deadline => {
                    Some(format!("etag-gateway not listening on {addr} after 20 s"))
                }
                _ => None,
            };
            if let Some(msg) = problem {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = tail(&dir.join("stderr.log"), 8_000);
                let _ = std::fs::remove_dir_all(&dir);
                return Err((msg, stderr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// SIGTERM (a clean stop), then waits up to `limit` for the process to exit; how long it took,
    /// or `None` if it was still running at `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        signal(self.child.id(), "TERM");
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        shut_down(&mut self.child, "etag-gateway", &self.dir);
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// An HTTP client that never goes through a proxy (whatever the environment says).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build reqwest client")
}

/// The response's `ETag` without its quotes (`"abc"` → `abc`; `W/"abc"` → `W/abc`).
pub fn etag_of(resp: &reqwest::Response) -> Option<String> {
    let raw = resp
        .headers()
        .get(reqwest::header::ETAG)?
        .to_str()
        .ok()?
        .trim();
    Some(unquote(raw))
}

fn unquote(raw: &str) -> String {
    let (weak, tag) = match raw.strip_prefix("W/") {
        Some(rest) => ("W/", rest),
        None => ("", raw),
    };
    let tag = tag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(tag);
    format!("{weak}{tag}")
}

/// The backend's applied log for one path (read directly from the backend, not through the gateway).
pub async fn backend_log(backend_url: &str, path: &str) -> Vec<Value> {
    let resp = client()
        .get(format!("{backend_url}/__demo/log"))
        .query(&[("path", path)])
        .send()
        .await
        .expect("GET /__demo/log");
    assert_eq!(resp.status(), 200, "GET /__demo/log");
    resp.json().await.expect("applied log is a JSON array")
}

/// What the backend holds at `path` (read directly from the backend): status and body.
pub async fn backend_get(backend_url: &str, path: &str) -> (u16, String) {
    let resp = client()
        .get(format!("{backend_url}{path}"))
        .send()
        .await
        .expect("GET from the backend");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("backend body"))
}

/// A response read by [`raw_request`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `ETag` without quotes, like [`etag_of`].
    pub fn etag(&self) -> Option<String> {
        self.header("etag").map(|v| unquote(v.trim()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection, with the request target sent exactly as given
/// (reqwest would normalise `/docs/./a`). Blocking; `Connection: close`.
pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || matches!(method, "PUT" | "POST" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).expect("send request head");
    stream.write_all(body).expect("send request body");

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let rest = &raw[split + 4..];
    let (status, headers) = parse_head(&head);
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    resp.body = if method == "HEAD" || status == 204 || status == 304 {
        Vec::new()
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        dechunk(rest)
    } else if let Some(len) = resp
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    resp
}

/// One HTTP/1.1 connection kept open across requests (blocking): for what the gateway does with
/// the connection after an answer.
pub struct RawConnection {
    stream: TcpStream,
    addr: SocketAddr,
    /// Bytes read past the end of the last response.
    unread: Vec<u8>,
}

impl RawConnection {
    pub fn open(addr: SocketAddr) -> RawConnection {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        RawConnection {
            stream,
            addr,
            unread: Vec::new(),
        }
    }

    /// Sends one request and reads its response. `Content-Length` is added unless `headers` has a
    /// `Transfer-Encoding` (then `body` must be the encoded body, sent as given).
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        // A server that answers early and closes may make the write fail; its answer is still
        // readable.
        let _ = self.stream.write_all(&bytes);
        self.read_response(method)
    }

    /// Reads one response: its head, then its body by `Content-Length` or chunked coding (up to the
    /// close without either).
    pub fn read_response(&mut self, method: &str) -> RawResponse {
        let mut buf = std::mem::take(&mut self.unread);
        let split = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(
                self.fill(&mut buf) > 0,
                "closed inside a response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        };
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        let mut rest = buf.split_off(split + 4);
        let (status, headers) = parse_head(&head);
        let mut resp = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if method == "HEAD" || status == 204 || status == 304 {
            self.unread = rest;
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            while !rest.windows(5).any(|w| w == b"0\r\n\r\n") {
                assert!(self.fill(&mut rest) > 0, "closed inside a chunked body");
            }
            resp.body = dechunk(&rest);
        } else if let Some(len) = resp
            .header("content-length")
            .and_then(|l| l.parse::<usize>().ok())
        {
            while rest.len() < len {
                assert!(self.fill(&mut rest) > 0, "closed inside a response body");
            }
            self.unread = rest.split_off(len);
            resp.body = rest;
        } else {
            while self.fill(&mut rest) > 0 {}
            resp.body = rest;
        }
        resp
    }

    /// Whether the server closes the connection (end of stream or reset) within `wait`, sending
    /// nothing more.
    pub fn closes_within(&mut self, wait: Duration) -> bool {
        assert!(self.unread.is_empty(), "unexpected bytes after the answer");
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut byte = [0u8; 64];
        let closed = match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(n) => panic!(
                "unexpected bytes after the answer: {:?}",
                String::from_utf8_lossy(&byte[..n])
            ),
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        closed
    }

    /// Reads more bytes into `buf`; 0 at the end of the stream (a reset counts as the end).
    fn fill(&mut self, buf: &mut Vec<u8>) -> usize {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("reading a response: {e}"),
        }
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(&data[..eol]).into_owned();
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            out.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
    out
}

impl Gateway {
    /// Starts the successor of this gateway for a zero-downtime upgrade: `etag-gateway --upgrade`
    /// with the same upstream and listen address and `config_toml` (which should be this one's).
    /// Returns at once: the successor waits for this gateway's sockets, sent on SIGQUIT.
    pub fn start_successor(&self, upstream_url: &str, config_toml: Option<&str>) -> Gateway {
        let dir = unique_temp_dir("etag-gateway-successor");
        let stderr = File::create(dir.join("stderr.log")).expect("create stderr file");
        let stdout = File::create(dir.join("stdout.log")).expect("create stdout file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_etag-gateway"));
        cmd.args(["--upgrade", "--upstream", upstream_url])
            .args(["--listen", &self.addr.to_string()]);
        if let Some(toml) = config_toml {
            let path = dir.join("gateway.toml");
            std::fs::write(&path, toml).expect("write config file");
            cmd.arg("--config").arg(&path);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn etag-gateway --upgrade");
        Gateway {
            child,
            addr: self.addr,
            dir,
        }
    }

    /// `kill -<sig>` to the gateway (`"QUIT"`, `"TERM"`, ...).
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// Waits up to `limit` for the process to exit on its own; its exit status, or `None`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if started.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the gateway with SIGKILL, as a crash would: no graceful shutdown, reservations it holds
    /// are left behind. Dropping it afterwards is fine.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A reply of a Redis server (RESP2), as read by [`Redis::command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The text of a simple or bulk string (`None` for nil, errors, ints, arrays).
    pub fn text(&self) -> Option<&str> {
        match self {
            Resp::Simple(s) | Resp::Bulk(Some(s)) => Some(s),
            _ => None,
        }
    }

    /// The items of an array (empty for nil and non-arrays).
    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(items)) => items,
            _ => &[],
        }
    }
}

fn read_resp(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("RESP: {line:?}"));
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    let number = || rest.parse::<i64>().map_err(|_| bad());
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Int(number()?),
        "$" => match number()? {
            n if n < 0 => Resp::Bulk(None),
            n => {
                let mut buf = vec![0; n as usize + 2];
                reader.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Resp::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
            }
        },
        "*" => match number()? {
            n if n < 0 => Resp::Array(None),
            n => Resp::Array(Some(
                (0..n)
                    .map(|_| read_resp(reader))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        _ => return Err(bad()),
    })
}

/// A `redis-server` child process on a free loopback port, in its own temp directory (its log is
/// `stderr.log` there, kept across restarts). No persistence, unless started with
/// [`Redis::start_with_snapshots`]: then `SAVE` writes `dump.rdb` in that directory and a restart
/// loads it. Killed on Drop.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    snapshots: bool,
}

impl Redis {
    /// `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no --dir <temp dir>`.
    pub fn start() -> Redis {
        Redis::start_with(false)
    }

    /// Like [`Redis::start`], with `--dbfilename dump.rdb`: snapshots only on `SAVE` ([`Redis::save`]).
    pub fn start_with_snapshots() -> Redis {
        Redis::start_with(true)
    }

    fn start_with(snapshots: bool) -> Redis {
        let dir = unique_temp_dir("redis");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut redis = Redis {
                child: None,
                port: free_port(),
                dir: dir.clone(),
                snapshots,
            };
            match redis.spawn() {
                Ok(()) => return redis,
                // The free port was taken in between: try another one.
                Err(log)
                    if attempt < 3 && log.to_lowercase().contains("address already in use") =>
                {
                    continue
                }
                Err(log) => {
                    // Keep the directory out of Drop's hands: the log is in the panic message.
                    std::mem::forget(redis);
                    panic!("redis-server did not start\n---- redis-server log ----\n{log}\n---- end ----");
                }
            }
        }
    }

    /// Starts the server on `self.port`; waits until it answers `PING`. `Err(log tail)` otherwise.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stderr.log"))
            .expect("open redis log");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir);
        if self.snapshots {
            cmd.args(["--dbfilename", "dump.rdb"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn redis-server (is it installed? scripts/setup.sh): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Resp::Simple(pong)) = self.try_command(&["PING"]) {
                if pong == "PONG" {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            let problem = match child.try_wait() {
                Ok(Some(status)) => Some(format!("redis-server exited: {status}")),
                _ if Instant::now() > deadline => {
                    Some("redis-server not answering after 20 s".into())
                }
                _ => None,
            };
            if let Some(msg) = problem {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{msg}\n{}",
                    tail(&self.dir.join("stderr.log"), 4_000)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Where `SAVE` writes its snapshot (with [`Redis::start_with_snapshots`]).
    pub fn rdb_path(&self) -> PathBuf {
        self.dir.join("dump.rdb")
    }

    /// The server's directory (its log, its snapshot).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// One command on a fresh connection (raw RESP over TCP).
    pub fn try_command(&self, args: &[&str]) -> std::io::Result<Resp> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!("*{}\r\n", args.len());
        for arg in args {
            req.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(req.as_bytes())?;
        read_resp(&mut BufReader::new(stream))
    }

    /// One command; panics if the server cannot be reached or answers an error.
    pub fn command(&self, args: &[&str]) -> Resp {
        match self.try_command(args) {
            Ok(Resp::Error(e)) => panic!("redis {args:?}: {e}"),
            Ok(reply) => reply,
            Err(e) => panic!("redis {args:?}: {e}"),
        }
    }

    /// `SAVE`: a snapshot in [`Redis::rdb_path`], written when this returns.
    pub fn save(&self) {
        assert!(self.snapshots, "started without snapshots");
        assert_eq!(self.command(&["SAVE"]), Resp::Simple("OK".into()), "SAVE");
    }

    /// Copies the current snapshot file to `to`.
    pub fn copy_rdb_to(&self, to: &Path) {
        std::fs::copy(self.rdb_path(), to).expect("copy dump.rdb");
    }

    /// Puts `from` in place of the snapshot file (the server must be stopped: it reads the file at
    /// start).
    pub fn restore_rdb_from(&self, from: &Path) {
        assert!(
            !self.is_running(),
            "stop redis before replacing its snapshot"
        );
        std::fs::copy(from, self.rdb_path()).expect("restore dump.rdb");
    }

    /// Stops the server with SIGTERM and waits for it (SIGKILL after 10 s). Without save points it
    /// writes no snapshot.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server with SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `SHUTDOWN NOSAVE`, then waits for the process to exit.
    pub fn shutdown_nosave(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Success closes the connection without a reply.
        if let Ok(Resp::Error(e)) = self.try_command(&["SHUTDOWN", "NOSAVE"]) {
            panic!("SHUTDOWN NOSAVE: {e}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not exit within 10 s of SHUTDOWN NOSAVE");
    }

    /// Starts the server again on the same port, with the same settings (and the snapshot file in
    /// its directory, if any).
    pub fn restart(&mut self) {
        if let Err(log) = self.spawn() {
            panic!("redis-server did not restart on port {}\n---- redis-server log ----\n{log}\n---- end ----", self.port);
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server log (tail; files kept in {}) ----\n{}\n---- end of redis-server log ----",
                self.dir.display(),
                tail(&self.dir.join("stderr.log"), 4_000)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The status and header lines of an HTTP/1 response head (without its empty line).
pub fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// One request to `base` + `path` with the given headers and body.
pub async fn send(
    c: &reqwest::Client,
    method: reqwest::Method,
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> reqwest::Response {
    let mut req = c.request(method.clone(), format!("{base}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(body) = body {
        req = req.body(body.to_string());
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}
