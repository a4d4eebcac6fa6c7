//! The Pingora glue: hooks that feed requests to the rules and send back what they decide.
//!
//! Flow of one request:
//! - `request_filter`: read `If-Match`; a write is checked and reserved in one store step, a read
//!   notes the entry's version. Refused or malformed requests are answered here; nothing is forwarded.
//! - `upstream_request_filter`: conditional headers carrying gateway etags are removed (the backend
//!   does not know them); from here on, bytes may reach the backend.
//! - `upstream_response_filter`: the backend's `ETag` is replaced by the gateway's; a write is settled
//!   by its status (2xx applied, 4xx not applied, anything else unknown).
//! - `logging`: a write that got no answer is settled (nothing sent: not applied; else unknown); an etag
//!   handed out for an answer that then broke off is withdrawn.
//! - `error_while_proxy`: a write is never retried once bytes may have been sent.

use crate::answers::{self, GatewayAnswer};
use crate::etag::Etag;
use crate::precondition::parse_if_match;
use crate::resource_key::ResourceKey;
use crate::store::EtagStore;
use crate::table::{ReadTicket, Refusal, WriteOutcome, WriteTicket};
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method, StatusCode};
use pingora::http::ResponseHeader;
use pingora::lb::{selection::RoundRobin, LoadBalancer};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use std::sync::Arc;
use std::time::Duration;

/// What the proxy needs to know about its policy and upstreams.
pub struct GatewaySettings {
    pub conflict_status: StatusCode,
    pub require_if_match: bool,
    pub guarded_methods: Vec<Method>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// How long a write that got no answer (timeout, reset) keeps its resource locked before it is
    /// settled as unknown. The backend may still be working on it: until it is settled, reads get no
    /// etag and conditional writes are refused, so a late apply cannot overwrite a newer write.
    pub unknown_outcome_hold: Duration,
}

/// Idle upstream connections are dropped before common backend keep-alive timeouts (Node: 5 s) close
/// them: a write sent on a connection the backend is closing has an unknown outcome.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub struct Gateway {
    store: Arc<dyn EtagStore>,
    upstreams: Arc<LoadBalancer<RoundRobin>>,
    settings: GatewaySettings,
}

impl Gateway {
    pub fn new(
        store: Arc<dyn EtagStore>,
        upstreams: Arc<LoadBalancer<RoundRobin>>,
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
    /// The request may change the resource (any method but GET, HEAD, OPTIONS, TRACE).
    is_write: bool,
    read: Option<ReadTicket>,
    write: Option<PendingWrite>,
    /// Bytes may have reached the backend.
    sent_to_backend: bool,
    /// The etag given in a write's 2xx answer; withdrawn if that answer breaks off.
    handed_out: Option<Etag>,
}

fn changes_nothing(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// What a backend's status says about a forwarded write.
fn write_outcome(method: &Method, status: StatusCode) -> WriteOutcome {
    if status.is_success() {
        // After DELETE the resource is gone; after POST the target collection changed to a state
        // whose content the gateway never saw. Neither can be named by an etag.
        if *method == Method::DELETE || *method == Method::POST {
            WriteOutcome::AppliedUnnamed
        } else {
            WriteOutcome::Applied(Etag::fresh())
        }
    } else if status.is_client_error() {
        WriteOutcome::NotApplied
    } else {
        WriteOutcome::Unknown
    }
}

async fn send_answer(session: &mut Session, answer: GatewayAnswer) -> Result<()> {
    let mut h = ResponseHeader::build(answer.status, Some(4))?;
    h.insert_header("Content-Type", "application/json")?;
    h.insert_header("Content-Length", answer.body.len().to_string())?;
    if let Some(etag) = answer.etag {
        h.insert_header("ETag", etag.header_value())?;
    }
    let head_only = session.req_header().method == Method::HEAD;
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

impl Gateway {
    fn conflict(
        &self,
        method: &Method,
        key: &ResourceKey,
        carried: &crate::precondition::IfMatch,
        refusal: Refusal,
    ) -> GatewayAnswer {
        answers::conflict(
            self.settings.conflict_status,
            method,
            key,
            carried,
            refusal.current,
        )
    }

    /// Decides a request on its headers alone. `Some(answer)`: answer it here, forward nothing.
    async fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Option<GatewayAnswer> {
        let req = session.req_header();
        let method = &req.method;
        let key = ResourceKey::from_path(req.uri.path());
        let if_match = match parse_if_match(
            req.headers
                .get_all(header::IF_MATCH)
                .iter()
                .map(|v| v.as_bytes()),
        ) {
            Ok(p) => p,
            Err(e) => return Some(answers::malformed(&e)),
        };
        ctx.is_write = !changes_nothing(method);
        let decision = if !ctx.is_write {
            let refused = match &if_match {
                Some(pre) => match self.store.check(&key, pre).await {
                    Ok(r) => r
                        .err()
                        .map(|refusal| self.conflict(method, &key, pre, refusal)),
                    Err(e) => Some(answers::store_unavailable(&e.to_string())),
                },
                None => None,
            };
            if refused.is_none() && matches!(*method, Method::GET | Method::HEAD) {
                match self.store.begin_read(&key).await {
                    Ok(ticket) => ctx.read = Some(ticket),
                    Err(e) => return Some(answers::store_unavailable(&e.to_string())),
                }
            }
            refused
        } else if if_match.is_none()
            && self.settings.require_if_match
            && self.settings.guarded_methods.contains(method)
        {
            Some(answers::precondition_required(method, &key))
        } else {
            match self.store.reserve_write(&key, if_match.as_ref()).await {
                Ok(Ok(ticket)) => {
                    ctx.write = Some(PendingWrite {
                        ticket: Some(ticket),
                        store: self.store.clone(),
                    });
                    None
                }
                Ok(Err(refusal)) => {
                    // if_match is Some: a write without precondition is never refused
                    let carried = if_match.as_ref()?;
                    Some(self.conflict(method, &key, carried, refusal))
                }
                Err(e) => Some(answers::store_unavailable(&e.to_string())),
            }
        };
        ctx.key = Some(key);
        decision
    }

    async fn settle(&self, ctx: &mut RequestCtx, outcome: WriteOutcome) -> Option<Etag> {
        let ticket = ctx.write.as_mut()?.take()?;
        match self.store.settle_write(ticket, outcome).await {
            Ok(etag) => etag,
            Err(e) => {
                // The store's lease on the reservation expires into "unknown": still safe.
                tracing::error!(error = %e, "could not settle a write");
                None
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.admit(session, ctx).await {
            None => Ok(false),
            Some(answer) => {
                tracing::debug!(status = answer.status.as_u16(), key = ?ctx.key, "answered by the gateway");
                send_answer(session, answer).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let backend = self
            .upstreams
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no upstream available"))?;
        let mut peer = HttpPeer::new(backend.addr.to_string(), false, String::new());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.read_timeout = Some(self.settings.read_timeout);
        peer.options.write_timeout = Some(self.settings.read_timeout);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        Ok(Box::new(peer))
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
        ctx.sent_to_backend = true;
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
        // Clients only ever see gateway etags.
        resp.remove_header(&header::ETAG);
        let etag = if let Some(read) = ctx.read.take() {
            match self
                .store
                .finish_read(&read, resp.status.is_success())
                .await
            {
                Ok(etag) => etag,
                Err(e) => {
                    tracing::warn!(error = %e, "read finished without an etag");
                    None
                }
            }
        } else if ctx.write.is_some() {
            let outcome = write_outcome(&session.req_header().method, resp.status);
            let etag = self.settle(ctx, outcome).await;
            ctx.handed_out = etag;
            etag
        } else {
            None
        };
        if let Some(etag) = etag {
            resp.insert_header("ETag", etag.header_value())?;
        }
        Ok(())
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
        let writable = session.as_downstream().response_written().is_none();
        if code > 0 && writable {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
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
                self.settle(ctx, WriteOutcome::NotApplied).await;
            } else if !timed_out {
                // Reset or closed: the backend stopped talking; whatever it did is done.
                self.settle(ctx, WriteOutcome::Unknown).await;
            } else if let Some(pending) = ctx.write.take() {
                // Timed out: the backend may still be working on it and apply it late. Hold the
                // reservation a while before settling as unknown. If the runtime stops first, Drop
                // settles it.
                let hold = self.settings.unknown_outcome_hold;
                tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    let mut pending = pending;
                    if let Some(ticket) = pending.take() {
                        if let Err(e) = pending
                            .store
                            .settle_write(ticket, WriteOutcome::Unknown)
                            .await
                        {
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
        tracing::debug!(
            method = %session.req_header().method,
            key = ?ctx.key,
            status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(0),
            "request done"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_of_a_write_follows_its_status() {
        assert!(matches!(
            write_outcome(&Method::PUT, StatusCode::OK),
            WriteOutcome::Applied(_)
        ));
        assert!(matches!(
            write_outcome(&Method::PATCH, StatusCode::CREATED),
            WriteOutcome::Applied(_)
        ));
        assert_eq!(
            write_outcome(&Method::DELETE, StatusCode::NO_CONTENT),
            WriteOutcome::AppliedUnnamed
        );
        assert_eq!(
            write_outcome(&Method::POST, StatusCode::CREATED),
            WriteOutcome::AppliedUnnamed
        );
        assert_eq!(
            write_outcome(&Method::PUT, StatusCode::NOT_FOUND),
            WriteOutcome::NotApplied
        );
        assert_eq!(
            write_outcome(&Method::PUT, StatusCode::INTERNAL_SERVER_ERROR),
            WriteOutcome::Unknown
        );
        assert_eq!(
            write_outcome(&Method::PUT, StatusCode::BAD_GATEWAY),
            WriteOutcome::Unknown
        );
        assert_eq!(
            write_outcome(&Method::PUT, StatusCode::MOVED_PERMANENTLY),
            WriteOutcome::Unknown
        );
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
}
