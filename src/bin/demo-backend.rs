//! `demo-backend`: a plain in-memory REST document store to put behind `etag-gateway`.
//!
//! It is the kind of backend the gateway exists for: it stores whatever bytes it is given under any
//! path and applies every write it receives, in arrival order, with **no concurrency control of its
//! own** ("last one wins"). The gateway in front of it is what turns that into optimistic concurrency
//! with `If-Match`/`ETag`.
//!
//! - `GET`/`HEAD` a path: the stored document (with its Content-Type), or, when nothing is stored at
//!   exactly that path but documents exist below it, a JSON listing of the collection; 404 otherwise.
//! - `PUT` stores (201 created / 200 replaced), `PATCH` shallow-merges JSON objects, `DELETE` removes
//!   (204 / 404), `POST` creates a child `path/<uuid>` (201 + `Location`).
//! - Paths are normalised like the gateway normalises them (unreserved `%XX` decoded, dot segments
//!   removed, repeated and trailing slashes dropped), so every spelling of a resource is one document.
//! - Every write that changed state is appended to the **applied log**, under the same lock as the
//!   change itself, so log order is apply order: `GET /__demo/log[?path=/docs/x]`. Tests compare what
//!   the backend really applied with what clients were told.
//! - `--validators etag|last-modified|both` gives documents the backend's own validators
//!   (`ETag: "rev-<N>"`, `Last-Modified`) and makes it honour its own conditional headers; with the
//!   default `none` it ignores conditional headers entirely (a naive backend).
//!
//! It **misbehaves on purpose** when asked to: the fault flags (`--fail-after-apply-rate`,
//! `--drop-after-apply-rate`, `--slow-rate`/`--slow-ms`, `--truncate-rate`) hit writes *after* they
//! were applied and logged: the answer is a 500, no answer at all, a late answer, or a truncated one.
//! Those are exactly the outcomes a gateway cannot read as "not applied", and the torture tests use
//! them to prove that it does not (an etag put back after such an outcome would allow a lost update).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = BoxBody<Bytes, BoxError>;

#[derive(Parser, Debug)]
#[command(
    about = "In-memory REST document store without concurrency control (demo backend for etag-gateway)"
)]
struct Args {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the actual address is printed).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// The backend's own validators (and whether it honours its own conditional headers).
    #[arg(long, value_enum, default_value_t = Validators::None)]
    validators: Validators,
    /// Probability that an applied write is answered 500.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    fail_after_apply_rate: f64,
    /// Probability that an applied write gets no answer (the connection is closed).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    drop_after_apply_rate: f64,
    /// Probability that an applied write is answered only after `--slow-ms`.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    slow_rate: f64,
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// Probability that an applied write is answered 200 with a body cut short (then the connection is aborted).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    truncate_rate: f64,
    /// Probability that a write is applied only after `--late-apply-ms` (a backend still working on a
    /// request the gateway has already given up on).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    late_apply_rate: f64,
    #[arg(long, default_value_t = 0)]
    late_apply_ms: u64,
    /// Sleep before handling every request (widens race windows).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("`{s}` is not a probability in [0, 1]")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Validators {
    None,
    Etag,
    LastModified,
    Both,
}

impl Validators {
    fn etag(self) -> bool {
        matches!(self, Validators::Etag | Validators::Both)
    }
    fn last_modified(self) -> bool {
        matches!(self, Validators::LastModified | Validators::Both)
    }
}

struct Doc {
    body: Bytes,
    content_type: HeaderValue,
    rev: u64,
    modified: u64, // unix seconds
}

#[derive(Serialize)]
struct LogEntry {
    seq: u64,
    method: String,
    path: String,
    body: String,
}

#[derive(Default)]
struct Store {
    docs: BTreeMap<String, Doc>,
    /// Last modification second handed out per path (kept after a delete), so that every change of a
    /// document moves its `Last-Modified` forward, even several changes within one second.
    modified: HashMap<String, u64>,
    rev: u64,
    log: Vec<LogEntry>,
}

impl Store {
    /// Records an applied write; called with the lock held, right where the change is made.
    fn log(&mut self, method: &Method, path: &str, body: &[u8]) {
        let seq = self.log.len() as u64 + 1;
        let body = String::from_utf8_lossy(body).into_owned();
        let (method, path) = (method.to_string(), path.to_string());
        self.log.push(LogEntry {
            seq,
            method,
            path,
            body,
        });
    }

    fn put(&mut self, path: &str, body: Bytes, content_type: HeaderValue) -> &Doc {
        self.rev += 1;
        let last = self.modified.get(path).copied().unwrap_or(0);
        let modified = unix_now().max(last + 1);
        self.modified.insert(path.to_string(), modified);
        let doc = Doc {
            body,
            content_type,
            rev: self.rev,
            modified,
        };
        self.docs.insert(path.to_string(), doc);
        &self.docs[path]
    }
}

struct App {
    args: Args,
    store: Mutex<Store>,
}

/// A document's (or collection's) validators as the backend would send them.
struct Validator {
    etag: String,
    modified: Option<u64>,
}

impl Doc {
    fn validator(&self) -> Validator {
        Validator {
            etag: format!("\"rev-{}\"", self.rev),
            modified: Some(self.modified),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "demo-backend listening on {addr}")?;
    out.flush()?;
    drop(out);
    info!(?args, "demo-backend started");

    let app = Arc::new(App {
        args,
        store: Mutex::new(Store::default()),
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(app.clone(), req));
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                debug!(%peer, "connection ended: {e}");
            }
        });
    }
    info!("shutting down");
    Ok(())
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<RespBody>, BoxError> {
    let args = &app.args;
    if args.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
    }
    let method = req.method().clone();
    let path = canonical_path(req.uri().path());
    let query = req.uri().query().map(str::to_string);
    let headers = req.headers().clone();
    let body = req.into_body().collect().await?.to_bytes();
    debug!(%method, %path, len = body.len(), "request");

    if path == "/__demo" || path.starts_with("/__demo/") {
        return Ok(demo_route(&app, &method, &path, query.as_deref()));
    }
    let head = method == Method::HEAD;
    let is_write = matches!(
        method,
        Method::PUT | Method::PATCH | Method::DELETE | Method::POST
    );
    let (resp, applied) = match method {
        Method::GET | Method::HEAD => (read(&app, &path, &headers, head), false),
        _ if is_write && rand::random_bool(args.late_apply_rate) => {
            // Like a real server thread, the work goes on when the client has gone: the write is
            // applied in a task of its own, even if this connection is closed meanwhile.
            info!(%method, %path, "fault: applying after {} ms", args.late_apply_ms);
            let (app, method, path) = (app.clone(), method.clone(), path.clone());
            let late = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(app.args.late_apply_ms)).await;
                write(&app, &method, &path, &headers, body)
            });
            late.await?
        }
        Method::PUT | Method::PATCH | Method::DELETE | Method::POST => {
            write(&app, &method, &path, &headers, body)
        }
        _ => {
            let mut r = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method not allowed"}),
                false,
            );
            let allow = HeaderValue::from_static("GET, HEAD, PUT, PATCH, DELETE, POST");
            r.headers_mut().insert(header::ALLOW, allow);
            (r, false)
        }
    };
    if !applied {
        return Ok(resp);
    }

    // Faults: only for writes that changed state, and only now that they are applied and logged.
    if rand::random_bool(args.slow_rate) {
        info!(%method, %path, "fault: answering after {} ms", args.slow_ms);
        tokio::time::sleep(Duration::from_millis(args.slow_ms)).await;
    }
    if rand::random_bool(args.drop_after_apply_rate) {
        info!(%method, %path, "fault: dropping the connection after applying");
        return Err("connection dropped on purpose after applying the write".into());
    }
    if rand::random_bool(args.truncate_rate) {
        info!(%method, %path, "fault: truncating the answer after applying");
        return Ok(truncated_response(&path));
    }
    if rand::random_bool(args.fail_after_apply_rate) {
        info!(%method, %path, "fault: answering 500 after applying");
        let err =
            json!({"error": "internal error (injected after applying the write)", "path": path});
        return Ok(json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &err,
            false,
        ));
    }
    Ok(resp)
}

fn demo_route(app: &App, method: &Method, path: &str, query: Option<&str>) -> Response<RespBody> {
    let head = method == Method::HEAD;
    if path != "/__demo/log" || !(method == Method::GET || head) {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "no such demo endpoint", "path": path}),
            head,
        );
    }
    let filter = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("path="))
            .map(|v| canonical_path(&percent_decode(v)))
    });
    let store = app.store.lock().unwrap();
    let entries: Vec<&LogEntry> = store
        .log
        .iter()
        .filter(|e| filter.as_ref().is_none_or(|p| &e.path == p))
        .collect();
    // Serialised from the structs (not through a `Value`) to keep the field order seq, method, path, body.
    let body = Bytes::from(serde_json::to_vec(&entries).unwrap());
    bytes_response(StatusCode::OK, body, JSON, head)
}

fn read(app: &App, path: &str, headers: &HeaderMap, head: bool) -> Response<RespBody> {
    let mode = app.args.validators;
    let store = app.store.lock().unwrap();
    if let Some(doc) = store.docs.get(path) {
        let v = doc.validator();
        return match preconditions(mode, headers, Some(&v), true) {
            Pre::Proceed => {
                let mut r = bytes_response(
                    StatusCode::OK,
                    doc.body.clone(),
                    doc.content_type.clone(),
                    head,
                );
                validator_headers(mode, &mut r, &v);
                r
            }
            pre => pre.response(mode, path, Some(&v)),
        };
    }
    let prefix = if path.ends_with('/') {
        path.to_string()
    } else {
        format!("{path}/")
    };
    let items: Vec<&String> = store
        .docs
        .range(prefix.clone()..)
        .map(|(k, _)| k)
        .take_while(|k| k.starts_with(&prefix))
        .collect();
    if items.is_empty() {
        return not_found(path, head);
    }
    // A collection changes whenever any document does; it gets an etag from the global revision
    // (conservative: it changes more often than the listing) and no Last-Modified.
    let v = Validator {
        etag: format!("\"rev-{}\"", store.rev),
        modified: None,
    };
    match preconditions(mode, headers, Some(&v), true) {
        Pre::Proceed => {
            let mut r = json_response(
                StatusCode::OK,
                &json!({"collection": path, "items": items}),
                head,
            );
            validator_headers(mode, &mut r, &v);
            r
        }
        pre => pre.response(mode, path, Some(&v)),
    }
}

/// Applies a write. Returns the answer and whether state changed (then it was logged).
fn write(
    app: &App,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> (Response<RespBody>, bool) {
    let mode = app.args.validators;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let mut store = app.store.lock().unwrap();

    if *method == Method::POST {
        // Preconditions are not evaluated for POST: it creates a new document.
        let child = format!("{}/{}", path.trim_end_matches('/'), uuid::Uuid::new_v4());
        store.put(&child, body.clone(), content_type);
        store.log(method, &child, &body);
        let mut r = json_response(
            StatusCode::CREATED,
            &json!({"ok": true, "path": child}),
            false,
        );
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_str(&child).unwrap());
        return (r, true);
    }

    let current = store.docs.get(path).map(Doc::validator);
    let pre = preconditions(mode, headers, current.as_ref(), false);
    if pre != Pre::Proceed {
        return (pre.response(mode, path, current.as_ref()), false);
    }
    match *method {
        Method::PUT => {
            let status = if current.is_some() {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let v = store.put(path, body.clone(), content_type).validator();
            store.log(method, path, &body);
            let mut r = json_response(status, &json!({"ok": true, "path": path}), false);
            validator_headers(mode, &mut r, &v);
            (r, true)
        }
        Method::PATCH => {
            let Some(doc) = store.docs.get(path) else {
                return (not_found(path, false), false);
            };
            let (Ok(Value::Object(mut merged)), Ok(Value::Object(patch))) = (
                serde_json::from_slice::<Value>(&doc.body),
                serde_json::from_slice::<Value>(&body),
            ) else {
                let err = json!({"error": "PATCH needs a stored JSON object and a JSON object body", "path": path});
                return (json_response(StatusCode::BAD_REQUEST, &err, false), false);
            };
            merged.extend(patch);
            let merged = Bytes::from(serde_json::to_vec(&merged).unwrap());
            let v = store.put(path, merged.clone(), JSON).validator();
            store.log(method, path, &body);
            let mut r = bytes_response(StatusCode::OK, merged, JSON, false);
            validator_headers(mode, &mut r, &v);
            (r, true)
        }
        _ => {
            // DELETE
            if store.docs.remove(path).is_none() {
                return (not_found(path, false), false);
            }
            store.rev += 1;
            store.log(method, path, &body);
            (
                bytes_response(StatusCode::NO_CONTENT, Bytes::new(), JSON, false),
                true,
            )
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Pre {
    Proceed,
    NotModified,
    Failed,
}

impl Pre {
    fn response(self, mode: Validators, path: &str, v: Option<&Validator>) -> Response<RespBody> {
        let mut r = match self {
            Pre::NotModified => bytes_response(StatusCode::NOT_MODIFIED, Bytes::new(), JSON, false),
            _ => json_response(
                StatusCode::PRECONDITION_FAILED,
                &json!({"error": "precondition failed", "path": path}),
                false,
            ),
        };
        if let Some(v) = v {
            validator_headers(mode, &mut r, v);
        }
        r
    }
}

/// RFC 9110 section 13.2.2, for the backend's own validators. With `--validators none` every
/// conditional header is ignored.
fn preconditions(
    mode: Validators,
    headers: &HeaderMap,
    current: Option<&Validator>,
    read: bool,
) -> Pre {
    if mode == Validators::None {
        return Pre::Proceed;
    }
    let etag = current.filter(|_| mode.etag()).map(|v| v.etag.as_str());
    let modified = current
        .filter(|_| mode.last_modified())
        .and_then(|v| v.modified);
    let if_match = header_str(headers, header::IF_MATCH);
    if let Some(list) = if_match {
        if !etag_list_matches(list, current.is_some(), etag, false) {
            return Pre::Failed;
        }
    } else if let (Some(since), Some(m)) =
        (header_date(headers, header::IF_UNMODIFIED_SINCE), modified)
    {
        if m > since {
            return Pre::Failed;
        }
    }
    if let Some(list) = header_str(headers, header::IF_NONE_MATCH) {
        if etag_list_matches(list, current.is_some(), etag, true) {
            return if read { Pre::NotModified } else { Pre::Failed };
        }
    } else if let (true, Some(since), Some(m)) = (
        read,
        header_date(headers, header::IF_MODIFIED_SINCE),
        modified,
    ) {
        if m <= since {
            return Pre::NotModified;
        }
    }
    Pre::Proceed
}

/// Does an `If-Match`/`If-None-Match` list match? `*` matches any existing representation.
fn etag_list_matches(list: &str, exists: bool, current: Option<&str>, weak: bool) -> bool {
    if list.trim() == "*" {
        return exists;
    }
    let Some(current) = current else { return false };
    list.split(',')
        .map(str::trim)
        .any(|tag| match tag.strip_prefix("W/") {
            Some(t) => weak && t == current,
            None => tag == current,
        })
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn header_date(headers: &HeaderMap, name: header::HeaderName) -> Option<u64> {
    header_str(headers, name).and_then(parse_http_date)
}

fn validator_headers(mode: Validators, r: &mut Response<RespBody>, v: &Validator) {
    if mode.etag() {
        r.headers_mut()
            .insert(header::ETAG, HeaderValue::from_str(&v.etag).unwrap());
    }
    if let (true, Some(m)) = (mode.last_modified(), v.modified) {
        r.headers_mut().insert(
            header::LAST_MODIFIED,
            HeaderValue::from_str(&format_http_date(m)).unwrap(),
        );
    }
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");

fn not_found(path: &str, head: bool) -> Response<RespBody> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": "not found", "path": path}),
        head,
    )
}

fn json_response(status: StatusCode, value: &Value, head: bool) -> Response<RespBody> {
    let body = Bytes::from(serde_json::to_vec(value).unwrap());
    bytes_response(status, body, JSON, head)
}

/// A response with `body`; for HEAD the same headers (Content-Length included) and no body.
fn bytes_response(
    status: StatusCode,
    body: Bytes,
    content_type: HeaderValue,
    head: bool,
) -> Response<RespBody> {
    let mut builder = Response::builder().status(status);
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return builder.body(empty()).unwrap();
    }
    builder = builder.header(header::CONTENT_TYPE, content_type);
    if head {
        builder
            .header(header::CONTENT_LENGTH, body.len())
            .body(empty())
            .unwrap()
    } else {
        builder.body(full(body)).unwrap()
    }
}

fn full(b: Bytes) -> RespBody {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn empty() -> RespBody {
    full(Bytes::new())
}

/// 200 announcing the full length of the answer, sending half of it, then aborting the connection.
fn truncated_response(path: &str) -> Response<RespBody> {
    let payload = serde_json::to_vec(&json!({"ok": true, "path": path})).unwrap();
    let sent = Bytes::copy_from_slice(&payload[..payload.len() / 2]);
    let body = TruncatedBody {
        part: Some(sent),
        pause: Box::pin(tokio::time::sleep(Duration::from_millis(50))),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, payload.len())
        .body(body.boxed())
        .unwrap()
}

/// Yields one chunk, waits a little (so that the chunk is flushed), then fails: hyper aborts the connection.
struct TruncatedBody {
    part: Option<Bytes>,
    pause: Pin<Box<tokio::time::Sleep>>,
}

impl Body for TruncatedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(part) = self.part.take() {
            return Poll::Ready(Some(Ok(Frame::data(part))));
        }
        match self.pause.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err("answer truncated on purpose".into()))),
        }
    }
}

/// Canonical document path: `%XX` of unreserved characters decoded (others kept, hex upper-cased),
/// dot segments resolved, empty segments (repeated and trailing slashes) dropped.
fn canonical_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h << 4 | l) as char;
                if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                    decoded.push(c);
                } else {
                    decoded.push_str(&format!("%{:02X}", h << 4 | l));
                }
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i] as char);
        i += 1;
    }
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Full percent-decoding of a query value (`+` is a space).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]; // 1970-01-01 was a Thursday
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// RFC 9110 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn format_http_date(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    format!(
        "{}, {d:02} {} {y:04} {hh:02}:{mm:02}:{ss:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[m as usize - 1]
    )
}

/// Parses an IMF-fixdate (the only format senders may generate); anything else is ignored.
fn parse_http_date(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, d, mon, y, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let m = MONTHS.iter().position(|x| x == mon)? as u32 + 1;
    let (d, y): (u32, i64) = (d.parse().ok()?, y.parse().ok()?);
    let t: Vec<u64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [hh, mm, ss] = t.as_slice() else {
        return None;
    };
    let days = days_from_civil(y, m, d);
    u64::try_from(days)
        .ok()
        .map(|days| days * 86_400 + hh * 3600 + mm * 60 + ss)
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_round_trip() {
        assert_eq!(
            format_http_date(784_111_777),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(format_http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            format_http_date(951_782_400),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
        for secs in [0, 86_399, 951_782_400, 1_700_000_000, 4_102_444_800] {
            assert_eq!(parse_http_date(&format_http_date(secs)), Some(secs));
        }
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    }

    #[test]
    fn paths_are_canonical() {
        for raw in [
            "/docs/a",
            "/docs//a/",
            "/docs/./a",
            "/docs/%61",
            "/docs/x/../a",
            "//docs/%2e/a",
        ] {
            assert_eq!(canonical_path(raw), "/docs/a", "{raw}");
        }
        assert_eq!(canonical_path("/docs/a%2fb"), "/docs/a%2Fb");
        assert_eq!(canonical_path("/"), "/");
        assert_eq!(canonical_path(""), "/");
        assert_eq!(canonical_path("/%"), "/%");
        assert_eq!(percent_decode("%2Fdocs%2Fx+y"), "/docs/x y");
    }

    #[test]
    fn etag_lists() {
        assert!(etag_list_matches(
            "\"a\", \"rev-1\"",
            true,
            Some("\"rev-1\""),
            false
        ));
        assert!(!etag_list_matches(
            "W/\"rev-1\"",
            true,
            Some("\"rev-1\""),
            false
        ));
        assert!(etag_list_matches(
            "W/\"rev-1\"",
            true,
            Some("\"rev-1\""),
            true
        ));
        assert!(etag_list_matches("*", true, None, false));
        assert!(!etag_list_matches("*", false, None, false));
    }
}
