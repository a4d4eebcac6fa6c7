//! The Pingora glue: hooks that feed requests to the rules and send back what they decide.
//!
//! Flow of one request:
//! - `request_filter`: choose the route (canonical path and host; see [`crate::upstream`]), whose
//!   policy and backends the request gets from then on; read the conditional headers; a write is checked and reserved in one store
//!   step, a read notes the entry's version (and may be answered 304 from the table). Refused or
//!   malformed requests are answered here; nothing is forwarded.
//! - `upstream_request_filter`: conditional headers carrying gateway etags are removed (the backend
//!   does not know them) and replaced by the backend's own validators where the gateway knows them;
//!   from here on, bytes may reach the backend.
//! - `upstream_response_filter`: the backend's `ETag` is recorded and replaced by the gateway's; a
//!   write is settled by its status (2xx applied, 4xx not applied, 412 to the backend's own
//!   precondition: changed behind the gateway, anything else unknown).
//! - `logging`: a write that got no answer is settled (nothing sent: not applied; else unknown); an etag
//!   handed out for an answer that then broke off is withdrawn.
//! - `error_while_proxy`: a write is never retried once bytes may have been sent.

use crate::answers::{self, GatewayAnswer};
use crate::config::PolicyConfig;
use crate::etag::Etag;
use crate::metrics::{Metrics, RequestOutcome};
use crate::precondition::Preconditions;
use crate::resource_key::ResourceKey;
use crate::store::EtagStore;
use crate::table::{
    BackendValidator, ReadAnswer, ReadStart, ReadTicket, Refusal, WriteOutcome, WriteTicket,
};
use crate::upstream::{request_host, Existence, RouteId, Upstreams};
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the proxy needs to know beyond the routes (each route carries its own policy: conflict
/// status, required If-Match, guarded methods; see [`Upstreams::policy`]).
pub struct GatewaySettings {
    /// How long a write that timed out keeps its resource locked before it is settled as unknown.
    /// The backend may still be working on it: until it is settled, reads get no etag and
    /// conditional writes are refused, so a late apply cannot overwrite a newer write.
    pub unknown_outcome_hold: Duration,
    /// One `access` log line per request (target `etag_gateway::access`, level info).
    pub access_log: bool,
    /// A reserved write's request body must be read within this, counted from the reservation, and
    /// each piece of it within `body_read_timeout`: a write cannot outlive its reservation (a shared
    /// store's lease) by a client sending its body slowly.
    pub body_deadline: Duration,
    pub body_read_timeout: Duration,
    /// Sizes and shapes a request may have (`[limits]`).
    pub limits: crate::config::LimitsConfig,
}

impl GatewaySettings {
    /// The longest a reserved write can take from reservation to settlement: the lease a shared store
    /// must give it (plus margin).
    pub fn longest_write(&self, connect_timeout: Duration, read_timeout: Duration) -> Duration {
        self.body_deadline
            + self.body_read_timeout
            + connect_timeout
            + read_timeout
            + self.unknown_outcome_hold
    }
}

pub struct Gateway {
    store: Arc<dyn EtagStore>,
    upstreams: Arc<Upstreams>,
    settings: GatewaySettings,
}

impl Gateway {
    pub fn new(
        store: Arc<dyn EtagStore>,
        upstreams: Arc<Upstreams>,
        settings: GatewaySettings,
    ) -> Gateway {
        Gateway {
            store,
            upstreams,
            settings,
        }
    }
}

/// A reserved write not yet settled. If the request is dropped without reaching `logging` (runtime
/// shutdown), Drop settles it as unknown: a reservation must never be forgotten.
pub struct PendingWrite {
    ticket: Option<WriteTicket>,
    store: Arc<dyn EtagStore>,
}

impl PendingWrite {
    fn take(&mut self) -> Option<WriteTicket> {
        self.ticket.take()
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.store.settle_abandoned(ticket);
        }
    }
}

#[derive(Default)]
pub struct RequestCtx {
    key: Option<ResourceKey>,
    /// The route the request takes: its backends and its policy.
    route: RouteId,
    preconditions: Preconditions,
    /// The request may change the resource (any method but GET, HEAD, OPTIONS, TRACE).
    is_write: bool,
    read: Option<ReadTicket>,
    /// Ask the backend with its own validator (the client's copy is the current state).
    revalidate: Option<BackendValidator>,
    write: Option<PendingWrite>,
    /// The backend's validator sent along with a write as the backend's own precondition.
    backend_precondition: Option<BackendValidator>,
    /// Bytes may have reached the backend.
    sent_to_backend: bool,
    /// The etag given in a write's 2xx answer; withdrawn if that answer breaks off.
    handed_out: Option<Etag>,
    /// An answer decided after the backend answered (its 412 becomes the gateway's conflict).
    late_answer: Option<GatewayAnswer>,
    /// What the gateway did with the request (for the metrics and the access log).
    outcome: Option<RequestOutcome>,
    /// When the write was reserved.
    reserved_at: Option<Instant>,
    /// Request body bytes seen so far.
    body_bytes: u64,
    /// Why the gateway cut the request off while reading it.
    refused: Option<String>,
    /// When the request was sent to the backend.
    upstream_started: Option<Instant>,
    upstream_time: Option<Duration>,
    /// The request is already in the metrics (answers the gateway gave itself are counted before
    /// they are sent, so that a client reading the metrics after the answer sees it counted).
    counted: bool,
}

/// The metrics' name for an answer the gateway gave itself.
fn outcome_of(status: StatusCode, conflict_status: StatusCode) -> RequestOutcome {
    match status {
        s if s == conflict_status => RequestOutcome::Conflict,
        StatusCode::NOT_MODIFIED => RequestOutcome::NotModified,
        StatusCode::PRECONDITION_REQUIRED => RequestOutcome::PreconditionRequired,
        StatusCode::SERVICE_UNAVAILABLE => RequestOutcome::StoreUnavailable,
        s if s.is_client_error() => RequestOutcome::BadRequest,
        _ => RequestOutcome::Forwarded,
    }
}

fn write_outcome_index(outcome: WriteOutcome) -> usize {
    match outcome {
        WriteOutcome::Applied(_) => 0,
        WriteOutcome::AppliedUnnamed => 1,
        WriteOutcome::NotApplied => 2,
        WriteOutcome::Unknown => 3,
        WriteOutcome::ChangedBehind => 4,
    }
}

fn changes_nothing(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// What a backend's status says about a forwarded write.
fn write_outcome(
    method: &Method,
    status: StatusCode,
    sent_backend_precondition: bool,
) -> WriteOutcome {
    if status.is_success() {
        // After DELETE the resource is gone; after POST the target collection changed to a state
        // whose content the gateway never saw. Neither can be named by an etag.
        if *method == Method::DELETE || *method == Method::POST {
            WriteOutcome::AppliedUnnamed
        } else {
            WriteOutcome::Applied(Etag::fresh())
        }
    } else if status == StatusCode::PRECONDITION_FAILED && sent_backend_precondition {
        WriteOutcome::ChangedBehind
    } else if status.is_client_error() {
        WriteOutcome::NotApplied
    } else {
        WriteOutcome::Unknown
    }
}

/// The backend's own validators in its answer.
fn backend_validator(headers: &HeaderMap) -> BackendValidator {
    BackendValidator {
        etag: headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        last_modified: headers
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok()),
    }
}

async fn send_answer(session: &mut Session, answer: GatewayAnswer) -> Result<()> {
    let has_body = !answer.body.is_empty();
    let mut h = ResponseHeader::build(answer.status, Some(4))?;
    if has_body {
        h.insert_header("Content-Type", "application/json")?;
        h.insert_header("Content-Length", answer.body.len().to_string())?;
    }
    if let Some(etag) = answer.etag {
        h.insert_header("ETag", etag.header_value())?;
    }
    let head_only = session.req_header().method == Method::HEAD || !has_body;
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::from(answer.body)), true)
            .await?;
    }
    Ok(())
}

/// The largest request body the gateway reads (and drops) before answering a request it refuses
/// itself: see [`Gateway::drain_small_body`].
const DRAIN_BEFORE_ANSWER_MAX: u64 = 16 * 1024;

impl Gateway {
    /// Reads and drops the body of a request the gateway answers itself (refused, 304, ...), when it
    /// is small and its length known, so that the connection can carry the client's next request:
    /// with the body unread Pingora must answer `Connection: close` (the next request's first byte
    /// cannot be found), and every conflict would cost the client a reconnect. Only a
    /// `Content-Length` body of at most 16 KiB and within `limits.max_body_bytes`, read within
    /// `body_read_timeout`; chunked or larger bodies, `Expect: 100-continue` (the client waits for
    /// us before sending) and a body that does not arrive in time keep closing the connection.
    /// The bytes read go nowhere: the request is still never forwarded.
    async fn drain_small_body(&self, session: &mut Session) {
        let headers = &session.req_header().headers;
        if headers.contains_key(header::TRANSFER_ENCODING) || headers.contains_key(header::EXPECT) {
            return;
        }
        let Some(length) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            return;
        };
        let max = self
            .settings
            .limits
            .max_body_bytes
            .map_or(DRAIN_BEFORE_ANSWER_MAX, |m| m.min(DRAIN_BEFORE_ANSWER_MAX));
        if length == 0 || length > max {
            return;
        }
        let downstream = session.as_downstream_mut();
        let drained = tokio::time::timeout(
            self.settings.body_read_timeout,
            downstream.drain_request_body(),
        )
        .await;
        if !matches!(drained, Ok(Ok(()))) {
            // Part of the body may be unread: the connection cannot be reused.
            downstream.set_keepalive(None);
            tracing::debug!("the body of a refused request did not arrive in time: closing");
        }
    }

    /// The policy of a route.
    fn policy(&self, route: RouteId) -> &PolicyConfig {
        self.upstreams.policy(route)
    }

    fn conflict(
        &self,
        route: RouteId,
        method: &Method,
        key: &ResourceKey,
        pre: &Preconditions,
        refusal: Refusal,
    ) -> GatewayAnswer {
        answers::conflict(
            self.policy(route).conflict_status,
            method,
            key,
            pre,
            refusal.current,
        )
    }

    /// Decides a request on its headers alone. `Some(answer)`: answer it here, forward nothing.
    async fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Option<GatewayAnswer> {
        let req = session.req_header();
        let method = &req.method;
        let route = ctx.route;
        let key = match &ctx.key {
            Some(key) => key.clone(),
            None => ResourceKey::from_path(req.uri.path()),
        };
        ctx.key = Some(key.clone());
        ctx.preconditions = match Preconditions::from_headers(&req.headers) {
            Ok(p) => p,
            Err(e) => return Some(answers::malformed(&e)),
        };
        let pre = &ctx.preconditions;
        ctx.is_write = !changes_nothing(method);
        if !ctx.is_write {
            if let Some(if_match) = &pre.if_match {
                match self.store.check(&key, if_match).await {
                    Ok(Ok(())) => {}
                    Ok(Err(refusal)) => {
                        return Some(self.conflict(route, method, &key, pre, refusal))
                    }
                    Err(e) => return Some(answers::store_unavailable(&e.to_string())),
                }
            }
            if !matches!(*method, Method::GET | Method::HEAD) {
                return None;
            }
            return match self
                .store
                .begin_read(&key, pre.if_none_match.as_ref())
                .await
            {
                Ok(ReadStart::NotModified(etag)) => Some(answers::not_modified(etag)),
                Ok(ReadStart::Forward { ticket, revalidate }) => {
                    ctx.read = Some(ticket);
                    ctx.revalidate = revalidate;
                    None
                }
                // The store cannot vouch for anything: the read is served, without an etag.
                Err(_) => None,
            };
        }
        let creates_only = pre.if_none_match.as_ref().is_some_and(|inm| inm.is_any());
        if pre.if_match.is_none()
            && !creates_only
            && self.policy(route).require_if_match
            && self.policy(route).guarded_methods.contains(method)
        {
            return Some(answers::precondition_required(method, &key));
        }
        let reservation = match self.store.reserve_write(&key, pre).await {
            Ok(Ok(r)) => r,
            Ok(Err(refusal)) => return Some(self.conflict(route, method, &key, pre, refusal)),
            Err(e) => return Some(answers::store_unavailable(&e.to_string())),
        };
        let mut pending = PendingWrite {
            ticket: Some(reservation.ticket),
            store: self.store.clone(),
        };
        if reservation.probe_existence {
            let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
            let host = req.headers.get(header::HOST).map(|h| h.as_bytes());
            let existence = self.upstreams.probe(route, path, host).await;
            if existence != Existence::Absent {
                if let Some(ticket) = pending.take() {
                    let _ = self
                        .store
                        .settle_write(
                            ticket,
                            WriteOutcome::NotApplied,
                            BackendValidator::default(),
                        )
                        .await;
                }
                return Some(match existence {
                    Existence::Exists => {
                        self.conflict(route, method, &key, pre, Refusal { current: None })
                    }
                    _ => answers::upstream_failed(
                        StatusCode::BAD_GATEWAY,
                        "could not tell whether the resource exists (If-None-Match: *)",
                        false,
                    ),
                });
            }
        }
        ctx.backend_precondition = reservation.backend_precondition;
        ctx.write = Some(pending);
        ctx.reserved_at = Some(Instant::now());
        None
    }

    async fn settle(
        &self,
        ctx: &mut RequestCtx,
        outcome: WriteOutcome,
        validator: BackendValidator,
    ) -> Option<Etag> {
        let ticket = ctx.write.as_mut()?.take()?;
        Metrics::get().write_settled(write_outcome_index(outcome));
        match self.store.settle_write(ticket, outcome, validator).await {
            Ok(etag) => etag,
            Err(e) => {
                // The store's lease on the reservation expires into "unknown": still safe.
                tracing::error!(error = %e, "could not settle a write");
                None
            }
        }
    }

    /// Settles a write from the backend's answer; the etag for the client, if any.
    async fn settle_from_response(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        validator: BackendValidator,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Etag>> {
        let method = &session.req_header().method;
        let sent_precondition =
            ctx.backend_precondition.is_some() || ctx.preconditions.if_unmodified_since.is_some();
        let outcome = write_outcome(method, resp.status, sent_precondition);
        let etag = self.settle(ctx, outcome, validator.clone()).await;
        if outcome == WriteOutcome::ChangedBehind {
            // The backend refused the state the client named: the client's etag is stale. Answer with
            // the gateway's conflict, not the backend's 412.
            let key = ctx
                .key
                .clone()
                .unwrap_or_else(|| ResourceKey::from_path("/"));
            ctx.late_answer = Some(self.conflict(
                ctx.route,
                method,
                &key,
                &ctx.preconditions,
                Refusal { current: None },
            ));
            return Err(Error::explain(
                ErrorType::HTTPStatus(self.policy(ctx.route).conflict_status.as_u16()),
                "changed behind the gateway",
            ));
        }
        if *method == Method::POST
            && resp.status.is_success()
            && self.policy(ctx.route).guarded_methods.contains(method)
        {
            // A POST that created a resource: the created resource holds what was sent.
            let created = resp
                .headers
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| l.parse::<http::Uri>().ok())
                .map(|uri| ResourceKey::from_path(uri.path()));
            if let Some(created) = created {
                return Ok(self
                    .store
                    .register_created(&created, validator)
                    .await
                    .unwrap_or(None));
            }
        }
        Ok(etag)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // The route decides the policy, so it comes first (a pure function of the path and host).
        let req = session.req_header();
        let key = ResourceKey::from_path(req.uri.path());
        ctx.route = self.upstreams.route_for(request_host(req).as_deref(), &key);
        ctx.key = Some(key);
        // Hostile or ambiguous shapes first: nothing of them reaches the table or the backend.
        let guarded = self
            .policy(ctx.route)
            .guarded_methods
            .contains(&session.req_header().method);
        // The raw head only matters when Transfer-Encoding is present (Pingora then drops a
        // Content-Length from the parsed header, and trims the value): copying it costs a head's
        // worth of bytes per request, so only then.
        let raw_head = if session
            .req_header()
            .headers
            .contains_key(header::TRANSFER_ENCODING)
        {
            session.as_downstream().to_h1_raw()
        } else {
            Bytes::new()
        };
        if let Err(rejection) = crate::request_guard::check(
            session.req_header(),
            &raw_head,
            &self.settings.limits,
            guarded,
        ) {
            if rejection.close {
                session.as_downstream_mut().set_keepalive(None);
            }
            ctx.outcome = Some(RequestOutcome::BadRequest);
            Metrics::get().request(&session.req_header().method, RequestOutcome::BadRequest);
            ctx.counted = true;
            send_answer(session, rejection.answer()).await?;
            return Ok(true);
        }
        match self.admit(session, ctx).await {
            None => {
                ctx.outcome = Some(RequestOutcome::Forwarded);
                if ctx.reserved_at.is_some() {
                    // Bound how long a slow body can keep the reservation (see body_deadline).
                    session
                        .as_downstream_mut()
                        .set_read_timeout(Some(self.settings.body_read_timeout));
                }
                Ok(false)
            }
            Some(answer) => {
                let outcome = outcome_of(answer.status, self.policy(ctx.route).conflict_status);
                ctx.outcome = Some(outcome);
                Metrics::get().request(&session.req_header().method, outcome);
                ctx.counted = true;
                if answer.status == StatusCode::NOT_MODIFIED {
                    Metrics::get().etags_issued.inc();
                }
                tracing::debug!(status = answer.status.as_u16(), key = ?ctx.key, "answered by the gateway");
                self.drain_small_body(session).await;
                send_answer(session, answer).await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A chunked body has no length up front: limits.max_body_bytes is enforced as it arrives.
        if let (Some(max), Some(chunk)) = (self.settings.limits.max_body_bytes, body.as_ref()) {
            ctx.body_bytes += chunk.len() as u64;
            let guarded = self
                .policy(ctx.route)
                .guarded_methods
                .contains(&session.req_header().method);
            if guarded && ctx.body_bytes > max {
                let detail = format!(
                    "the body is more than the {max} bytes allowed (limits.max_body_bytes)"
                );
                ctx.refused = Some(detail.clone());
                return Error::e_explain(
                    ErrorType::HTTPStatus(StatusCode::PAYLOAD_TOO_LARGE.as_u16()),
                    detail,
                );
            }
        }
        if ctx
            .reserved_at
            .is_some_and(|at| at.elapsed() > self.settings.body_deadline)
        {
            // The body is cut short: the backend gets an incomplete request and cannot apply it.
            ctx.refused = Some(
                "the request body took longer than a write may hold its reservation (upstream.read_timeout_ms)"
                    .into(),
            );
            return Error::e_explain(
                ErrorType::HTTPStatus(StatusCode::REQUEST_TIMEOUT.as_u16()),
                "the request body took longer than a write may hold its reservation",
            );
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        self.upstreams.peer(ctx.route).map(Box::new)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // These carry gateway etags, which the backend does not know: it would refuse or misread them.
        upstream_request.remove_header(&header::IF_MATCH);
        upstream_request.remove_header(&header::IF_NONE_MATCH);
        upstream_request.remove_header(&header::IF_RANGE);
        let pre = &ctx.preconditions;
        if pre.if_none_match.is_some() {
            // RFC 9110 §13.1.3: If-Modified-Since is ignored when If-None-Match is present.
            upstream_request.remove_header(&header::IF_MODIFIED_SINCE);
        }
        if pre.if_match.is_some() {
            // §13.1.4: If-Unmodified-Since is ignored when If-Match is present.
            upstream_request.remove_header(&header::IF_UNMODIFIED_SINCE);
        }
        if ctx.is_write && pre.if_none_match.as_ref().is_some_and(|inm| inm.is_any()) {
            // Create-only carries no gateway etag: a backend that checks it closes the window too.
            upstream_request.insert_header(header::IF_NONE_MATCH, "*")?;
        }
        // The backend's own validators, where the gateway knows them.
        if let Some(v) = ctx.backend_precondition.as_ref() {
            if let Some(etag) = &v.etag {
                upstream_request.insert_header(header::IF_MATCH, etag.as_str())?;
            } else if let Some(modified) = v.last_modified {
                upstream_request.insert_header(
                    header::IF_UNMODIFIED_SINCE,
                    httpdate::fmt_http_date(modified),
                )?;
            }
        }
        if let Some(v) = ctx.revalidate.as_ref() {
            if let Some(etag) = &v.etag {
                upstream_request.insert_header(header::IF_NONE_MATCH, etag.as_str())?;
            } else if let Some(modified) = v.last_modified {
                upstream_request
                    .insert_header(header::IF_MODIFIED_SINCE, httpdate::fmt_http_date(modified))?;
            }
        }
        ctx.sent_to_backend = true;
        ctx.upstream_started = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if resp.status.is_informational() {
            return Ok(());
        }
        if let Some(started) = ctx.upstream_started {
            let elapsed = started.elapsed();
            ctx.upstream_time = Some(elapsed);
            Metrics::get()
                .upstream_seconds
                .observe(elapsed.as_secs_f64());
        }
        let validator = backend_validator(&resp.headers);
        // Clients only ever see gateway etags.
        resp.remove_header(&header::ETAG);
        let etag = if let Some(read) = ctx.read.take() {
            let answer = match resp.status {
                s if s.is_success() || s == StatusCode::NOT_MODIFIED => {
                    ReadAnswer::Found(validator)
                }
                StatusCode::NOT_FOUND | StatusCode::GONE => ReadAnswer::Gone,
                _ => ReadAnswer::Failed,
            };
            let found = matches!(answer, ReadAnswer::Found(_));
            let etag = match self.store.finish_read(&read, answer).await {
                Ok(etag) => etag,
                Err(e) => {
                    tracing::warn!(error = %e, "read finished without an etag");
                    None
                }
            };
            if let Some(if_match) = ctx.preconditions.if_match.as_ref().filter(|_| found) {
                // If-Match passed at the gateway, but the body is not the state it named (changed
                // behind the gateway, or a write overlapped): the client must not get it as such.
                if !if_match.is_satisfied_by(etag.as_ref()) {
                    let method = session.req_header().method.clone();
                    let key = ctx
                        .key
                        .clone()
                        .unwrap_or_else(|| ResourceKey::from_path("/"));
                    ctx.late_answer = Some(self.conflict(
                        ctx.route,
                        &method,
                        &key,
                        &ctx.preconditions,
                        Refusal { current: etag },
                    ));
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(self.policy(ctx.route).conflict_status.as_u16()),
                        "the read did not return the state If-Match named",
                    ));
                }
            }
            etag
        } else if ctx.write.is_some() {
            let etag = self
                .settle_from_response(session, resp, validator, ctx)
                .await?;
            ctx.handed_out = etag;
            etag
        } else {
            None
        };
        if let Some(etag) = etag {
            Metrics::get().etags_issued.inc();
            resp.insert_header("ETag", etag.header_value())?;
        }
        Ok(())
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        // A backend 412 turned into the gateway's conflict is an answer, not a failure.
        ctx.late_answer.is_some()
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // Once bytes may have reached the backend, a write's outcome is unknown: replaying it could
        // apply it twice or over a newer state. Reads may be retried as Pingora would.
        if ctx.is_write || !session.req_header().method.is_idempotent() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let writable = session.as_downstream().response_written().is_none();
        // The connection is not reused after a failure: say so, or a client would send its next
        // request on a connection about to close.
        session.as_downstream_mut().set_keepalive(None);
        if let Some(answer) = ctx.late_answer.clone() {
            ctx.outcome = Some(RequestOutcome::Conflict);
            let code = answer.status.as_u16();
            if writable {
                if let Err(err) = send_answer(session, answer).await {
                    tracing::debug!(error = %err, "could not send the answer");
                }
            }
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        let code = match (e.esource(), e.etype()) {
            (_, ErrorType::HTTPStatus(code)) => *code,
            (ErrorSource::Upstream, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => 504,
            (ErrorSource::Upstream, ErrorType::ConnectTimedout) => 504,
            (ErrorSource::Upstream, _) => 502,
            (
                ErrorSource::Downstream,
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
            ) => 0,
            (ErrorSource::Downstream, _) => 400,
            (ErrorSource::Internal | ErrorSource::Unset, _) => 500,
        };
        if code > 0 && writable {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            if status.is_client_error() {
                // Refused by the gateway while reading the request (body too large or too slow).
                ctx.outcome = Some(RequestOutcome::BadRequest);
                let detail = ctx.refused.as_deref().unwrap_or("request refused");
                if let Err(err) =
                    send_answer(session, answers::request_refused(status, detail)).await
                {
                    tracing::debug!(error = %err, "could not send the answer");
                }
                return FailToProxy {
                    error_code: code,
                    can_reuse_downstream: false,
                };
            }
            let unknown = ctx.is_write && ctx.sent_to_backend;
            let answer = answers::upstream_failed(
                status,
                &format!("backend failed: {}", e.etype().as_str()),
                unknown,
            );
            if let Err(err) = send_answer(session, answer).await {
                tracing::debug!(error = %err, "could not send the error answer");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.write.as_ref().is_some_and(|w| w.ticket.is_some()) {
            let timed_out = e.is_some_and(|e| {
                matches!(
                    e.etype(),
                    ErrorType::ReadTimedout | ErrorType::WriteTimedout
                )
            });
            if !ctx.sent_to_backend {
                // Nothing reached the backend: nothing happened.
                self.settle(ctx, WriteOutcome::NotApplied, BackendValidator::default())
                    .await;
            } else if !timed_out {
                // Reset or closed: the backend stopped talking; whatever it did is done.
                self.settle(ctx, WriteOutcome::Unknown, BackendValidator::default())
                    .await;
            } else if let Some(pending) = ctx.write.take() {
                // Timed out: the backend may still be working on it and apply it late. Hold the
                // reservation a while before settling as unknown. If the runtime stops first, Drop
                // settles it.
                let hold = self.settings.unknown_outcome_hold;
                tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    let mut pending = pending;
                    if let Some(ticket) = pending.take() {
                        let settled = pending
                            .store
                            .settle_write(
                                ticket,
                                WriteOutcome::Unknown,
                                BackendValidator::default(),
                            )
                            .await;
                        if let Err(e) = settled {
                            tracing::error!(error = %e, "could not settle a write");
                        }
                    }
                });
            }
        }
        if let (Some(err), Some(etag), Some(key)) = (e, ctx.handed_out, ctx.key.as_ref()) {
            tracing::debug!(error = %err, %key, "answer broke off after its etag was sent: withdrawn");
            if let Err(e) = self.store.withdraw(key, etag).await {
                tracing::error!(error = %e, "could not withdraw an etag");
            }
        }
        let method = &session.req_header().method;
        if let (Some(outcome), false) = (ctx.outcome, ctx.counted) {
            Metrics::get().request(method, outcome);
        }
        if self.settings.access_log {
            tracing::info!(
                target: "etag_gateway::access",
                method = %method,
                path = %session.req_header().uri.path(),
                status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(0),
                outcome = ctx.outcome.map_or("none", RequestOutcome::as_str),
                upstream_ms = ctx.upstream_time.map(|d| d.as_secs_f64() * 1000.0),
                error = e.map(|e| e.etype().as_str()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_of_a_write_follows_its_status() {
        let put = |code: u16, sent: bool| {
            write_outcome(&Method::PUT, StatusCode::from_u16(code).unwrap(), sent)
        };
        assert!(matches!(put(200, false), WriteOutcome::Applied(_)));
        assert!(matches!(
            write_outcome(&Method::PATCH, StatusCode::CREATED, false),
            WriteOutcome::Applied(_)
        ));
        assert_eq!(
            write_outcome(&Method::DELETE, StatusCode::NO_CONTENT, false),
            WriteOutcome::AppliedUnnamed
        );
        assert_eq!(
            write_outcome(&Method::POST, StatusCode::CREATED, false),
            WriteOutcome::AppliedUnnamed
        );
        assert_eq!(put(404, false), WriteOutcome::NotApplied);
        assert_eq!(put(412, false), WriteOutcome::NotApplied);
        assert_eq!(put(412, true), WriteOutcome::ChangedBehind);
        assert_eq!(put(500, false), WriteOutcome::Unknown);
        assert_eq!(put(502, false), WriteOutcome::Unknown);
        assert_eq!(put(301, false), WriteOutcome::Unknown);
    }

    #[test]
    fn only_safe_methods_change_nothing() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(changes_nothing(&m));
        }
        for m in [
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::POST,
            Method::from_bytes(b"PURGE").unwrap(),
        ] {
            assert!(!changes_nothing(&m));
        }
    }

    #[test]
    fn backend_validators_are_read_from_its_answer() {
        let mut h = HeaderMap::new();
        assert!(backend_validator(&h).is_empty());
        h.insert(header::ETAG, "\"rev-3\"".parse().unwrap());
        h.insert(
            header::LAST_MODIFIED,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        let v = backend_validator(&h);
        assert_eq!(v.etag.as_deref(), Some("\"rev-3\""));
        assert!(v.last_modified.is_some());
    }
}
