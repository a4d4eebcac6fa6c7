//! Prometheus metrics, registered in the registry that `pingora-prometheus` re-exports (one registry:
//! a second `prometheus` version would gather nothing). Label combinations are resolved once, so
//! counting on the hot path is an atomic add, not a hash lookup.

use http::Method;
use pingora_prometheus::prometheus::{
    self, register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
    Histogram, IntCounter, IntGauge,
};
use std::sync::OnceLock;

/// What became of a request at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Sent to the backend.
    Forwarded,
    /// A failed precondition (409 or 412).
    Conflict,
    /// 304 answered from the table.
    NotModified,
    /// 428: a guarded write without precondition.
    PreconditionRequired,
    /// 4xx for a malformed or hostile request.
    BadRequest,
    /// 503: the store could not answer.
    StoreUnavailable,
}

impl RequestOutcome {
    const ALL: [RequestOutcome; 6] = [
        RequestOutcome::Forwarded,
        RequestOutcome::Conflict,
        RequestOutcome::NotModified,
        RequestOutcome::PreconditionRequired,
        RequestOutcome::BadRequest,
        RequestOutcome::StoreUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Forwarded => "forwarded",
            RequestOutcome::Conflict => "conflict",
            RequestOutcome::NotModified => "not_modified",
            RequestOutcome::PreconditionRequired => "precondition_required",
            RequestOutcome::BadRequest => "bad_request",
            RequestOutcome::StoreUnavailable => "store_unavailable",
        }
    }
}

const METHODS: [&str; 8] = [
    "GET", "HEAD", "PUT", "PATCH", "DELETE", "POST", "OPTIONS", "OTHER",
];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::POST => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// What became of a forwarded write (the settle step).
pub const WRITE_OUTCOMES: [&str; 5] = [
    "applied",
    "applied_unnamed",
    "not_applied",
    "unknown",
    "changed_behind",
];

pub struct Metrics {
    requests: Vec<IntCounter>,
    pub etags_issued: IntCounter,
    writes: Vec<IntCounter>,
    pub table_entries: IntGauge,
    pub table_evictions: IntCounter,
    pub upstream_seconds: Histogram,
}

impl Metrics {
    /// The process-wide metrics (registered on first use).
    pub fn get() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::register)
    }

    fn register() -> Metrics {
        let requests = register_int_counter_vec!(
            "etag_gateway_requests_total",
            "Requests by method and what the gateway did with them",
            &["method", "outcome"]
        )
        .expect("metric names are unique");
        let writes = register_int_counter_vec!(
            "etag_gateway_write_outcomes_total",
            "Forwarded writes by outcome (unknown: the backend may or may not have applied it)",
            &["outcome"]
        )
        .expect("metric names are unique");
        Metrics {
            requests: METHODS
                .iter()
                .flat_map(|m| {
                    let requests = &requests;
                    RequestOutcome::ALL
                        .iter()
                        .map(move |o| requests.with_label_values(&[*m, o.as_str()]))
                })
                .collect(),
            etags_issued: register_int_counter!(
                "etag_gateway_etags_issued_total",
                "Etags handed out in responses"
            )
            .expect("metric names are unique"),
            writes: WRITE_OUTCOMES
                .iter()
                .map(|o| writes.with_label_values(&[*o]))
                .collect(),
            table_entries: register_int_gauge!(
                "etag_gateway_table_entries",
                "Entries in the in-memory etag table"
            )
            .expect("metric names are unique"),
            table_evictions: register_int_counter!(
                "etag_gateway_table_evictions_total",
                "Entries evicted from the in-memory etag table (LRU)"
            )
            .expect("metric names are unique"),
            upstream_seconds: register_histogram!(
                "etag_gateway_upstream_seconds",
                "Time from sending a request to the backend to its response header",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0
                ]
            )
            .expect("metric names are unique"),
        }
    }

    pub fn request(&self, method: &Method, outcome: RequestOutcome) {
        let o = RequestOutcome::ALL
            .iter()
            .position(|x| *x == outcome)
            .unwrap_or(0);
        self.requests[method_index(method) * RequestOutcome::ALL.len() + o].inc();
    }

    /// `outcome`: one of [`WRITE_OUTCOMES`].
    pub fn write_settled(&self, outcome: usize) {
        if let Some(c) = self.writes.get(outcome) {
            c.inc();
        }
    }
}

/// The Prometheus text exposition of every registered metric.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut out) {
        tracing::error!(error = %e, "could not encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_up_in_the_exposition() {
        let m = Metrics::get();
        m.request(&Method::PUT, RequestOutcome::Conflict);
        m.request(
            &Method::from_bytes(b"PURGE").unwrap(),
            RequestOutcome::BadRequest,
        );
        m.write_settled(3);
        let text = render();
        assert!(
            text.contains(r#"etag_gateway_requests_total{method="PUT",outcome="conflict"} "#),
            "{text}"
        );
        assert!(
            text.contains(r#"etag_gateway_requests_total{method="OTHER",outcome="bad_request"} "#)
        );
        assert!(text.contains(r#"etag_gateway_write_outcomes_total{outcome="unknown"} "#));
        assert!(text.contains("etag_gateway_upstream_seconds_bucket"));
    }
}
