//! The admin listener: metrics count what the gateway did, the etag API needs its token.

mod common;

use common::{client, etag_of, DemoBackend, Gateway};
use std::net::TcpListener;

const TOKEN: &str = "test-token-0123456789";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_a_conflict_and_the_etag_api_needs_the_token() {
    let backend = DemoBackend::start(&[]);
    let admin = format!("127.0.0.1:{}", free_port());
    let gateway = Gateway::start(
        &backend.url(),
        Some(&format!(
            "[admin]\nlisten = \"{admin}\"\ntoken = \"{TOKEN}\"\n[log]\naccess = true\n"
        )),
    );
    let http = client();
    let url = format!("{}/docs/a", gateway.url());
    let admin_url = format!("http://{admin}");

    let metrics = || async {
        http.get(format!("{admin_url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let conflict = r#"etag_gateway_requests_total{method="PUT",outcome="conflict"}"#;
    let before = metric(&metrics().await, conflict);

    let created = http.put(&url).body("v1").send().await.unwrap();
    let etag = etag_of(&created).unwrap();
    let stale = http
        .put(&url)
        .header("If-Match", "\"00000000-0000-0000-0000-000000000000\"")
        .body("v2")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status().as_u16(), 409);

    let text = metrics().await;
    assert_eq!(metric(&text, conflict), before + 1.0, "{text}");
    assert!(
        metric(
            &text,
            r#"etag_gateway_requests_total{method="PUT",outcome="forwarded"}"#
        ) >= 1.0
    );
    assert!(
        metric(
            &text,
            r#"etag_gateway_write_outcomes_total{outcome="applied"}"#
        ) >= 1.0
    );
    assert!(metric(&text, "etag_gateway_table_entries") >= 1.0);
    assert!(text.contains("etag_gateway_upstream_seconds_bucket"));

    let health = http
        .get(format!("{admin_url}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);

    // the etag API: 401 without the token or with a wrong one, the current etag with it
    let lookup = format!("{admin_url}/etags?url=%2Fdocs%2Fa");
    let denied = http.get(&lookup).send().await.unwrap();
    assert_eq!(denied.status().as_u16(), 401);
    let wrong = http
        .get(&lookup)
        .bearer_auth("test-token-0123456788")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let found: serde_json::Value = http
        .get(&lookup)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["etag"], etag.as_str());
    assert_eq!(found["known"], true);

    // invalidation: the etag stops matching at once
    let invalidated = http
        .delete(&lookup)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(invalidated.status().as_u16(), 200);
    let refused = http
        .put(&url)
        .header("If-Match", format!("\"{etag}\""))
        .body("v3")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 409);

    // the admin API is not on the public listener
    let public = http
        .get(format!("{}/metrics", gateway.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        public.status().as_u16(),
        404,
        "forwarded to the backend, which has no /metrics"
    );
    assert!(gateway.stderr().contains("etag_gateway::access"));
}
