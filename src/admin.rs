//! The admin listener (`[admin] listen`): metrics, health, and etag lookup/invalidation. It is a
//! separate listener from the public one, meant for loopback or a private network.
//!
//! - `GET /healthz`, `GET /metrics` (Prometheus text): open.
//! - `GET /etags?url=/docs/x`, `DELETE /etags?url=/docs/x`: need `Authorization: Bearer <token>`
//!   (compared in constant time); without a configured token they are off (404).

use crate::metrics;
use crate::resource_key::ResourceKey;
use crate::store::EtagStore;
use async_trait::async_trait;
use http::{header, Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::Arc;
use subtle::ConstantTimeEq;

pub struct AdminApp {
    store: Arc<dyn EtagStore>,
    token: Option<String>,
}

impl AdminApp {
    pub fn new(store: Arc<dyn EtagStore>, token: Option<String>) -> AdminApp {
        AdminApp { store, token }
    }

    fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        let (Some(token), Some(given)) = (&self.token, authorization) else {
            return false;
        };
        let Some(given) = given.strip_prefix(b"Bearer ") else {
            return false;
        };
        // Constant time: the comparison must not tell an attacker how much of the token matched.
        given.ct_eq(token.as_bytes()).into()
    }

    async fn etags(&self, method: &Method, query: Option<&str>) -> (StatusCode, serde_json::Value) {
        let url = query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "url")
                .map(|(_, v)| v.into_owned())
        });
        let Some(url) = url.filter(|u| u.starts_with('/')) else {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": "give the resource as ?url=/path (percent-encoded)"}),
            );
        };
        let key = ResourceKey::from_path(&url);
        match *method {
            Method::GET => match self.store.describe(&key).await {
                Ok(state) => (
                    StatusCode::OK,
                    json!({
                        "url": url,
                        "key": key.as_str(),
                        "known": state.is_some(),
                        "etag": state.as_ref().and_then(|s| s.etag).map(|e| e.to_string()),
                        "writes_in_flight": state.as_ref().map_or(0, |s| s.writes_in_flight),
                        "backend_etag": state.as_ref().and_then(|s| s.backend.etag.clone()),
                        "backend_last_modified": state.as_ref().and_then(|s| s.backend.last_modified).map(httpdate::fmt_http_date),
                    }),
                ),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": e.to_string()}),
                ),
            },
            Method::DELETE => match self.store.invalidate(&key).await {
                Ok(()) => (
                    StatusCode::OK,
                    json!({"url": url, "key": key.as_str(), "invalidated": true}),
                ),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": e.to_string()}),
                ),
            },
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "use GET or DELETE on /etags"}),
            ),
        }
    }
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

fn respond_json(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    respond(status, "application/json", value.to_string().into_bytes())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_owned();
        let query = req.uri.query().map(str::to_owned);
        let authorization = req
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        match (method.clone(), path.as_str()) {
            (Method::GET, "/healthz") => respond_json(StatusCode::OK, json!({"status": "ok"})),
            (Method::GET, "/metrics") => {
                if let Some(n) = self.store.local_entries() {
                    metrics::Metrics::get().table_entries.set(n as i64);
                }
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    metrics::render().into_bytes(),
                )
            }
            (_, "/etags") if self.token.is_none() => respond_json(
                StatusCode::NOT_FOUND,
                json!({"error": "the etag API is off: set [admin] token to enable it"}),
            ),
            (_, "/etags") if !self.authorized(authorization.as_deref()) => {
                let mut r = respond_json(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "missing or wrong token: send Authorization: Bearer <token>"}),
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                r
            }
            (_, "/etags") => {
                let (status, body) = self.etags(&method, query.as_deref()).await;
                respond_json(status, body)
            }
            _ => respond_json(
                StatusCode::NOT_FOUND,
                json!({"error": "not found", "routes": ["/healthz", "/metrics", "/etags?url=/path"]}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::num::NonZeroUsize;

    fn app(token: Option<&str>) -> AdminApp {
        AdminApp::new(
            Arc::new(MemoryStore::new(NonZeroUsize::new(10).unwrap())),
            token.map(str::to_owned),
        )
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let a = app(Some("s3cret"));
        assert!(a.authorized(Some(b"Bearer s3cret")));
        assert!(!a.authorized(Some(b"Bearer s3cre")));
        assert!(!a.authorized(Some(b"Bearer s3cret2")));
        assert!(!a.authorized(Some(b"s3cret")));
        assert!(!a.authorized(None));
        assert!(!app(None).authorized(Some(b"Bearer ")));
    }

    #[tokio::test]
    async fn lookup_and_invalidation() {
        let a = app(Some("t"));
        let (status, body) = a.etags(&Method::GET, Some("url=%2Fdocs%2F%2Fx%2F")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["key"], "/docs/x");
        assert_eq!(body["known"], false);
        let (status, _) = a.etags(&Method::GET, Some("nothing=1")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, body) = a.etags(&Method::DELETE, Some("url=/docs/x")).await;
        assert_eq!(
            (status, body["invalidated"].as_bool()),
            (StatusCode::OK, Some(true))
        );
        let (status, _) = a.etags(&Method::PUT, Some("url=/docs/x")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
