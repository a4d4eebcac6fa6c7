//! End-to-end: TLS, both ways, with a throwaway CA made by the test.
//!
//! A first gateway with an HTTPS listener (`server.tls_listen`, certificate for `localhost` signed by
//! the test CA) in front of the demo backend acts as the HTTPS upstream of a second gateway
//! (`upstream.url = "https://localhost:PORT"`). The etags are rewritten twice on that path; these
//! tests are about transport: the upstream works when the CA is trusted (`upstream.ca_file`), and is
//! refused (502, nothing applied) when it is not or when the name does not match — verification is
//! always on. The HTTPS listener is also checked with `curl --cacert` as a client.

mod common;

use common::{backend_get, backend_log, client, etag_of, unique_temp_dir, DemoBackend, Gateway};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A test CA and a server certificate it signed for `localhost` only, as PEM files.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = unique_temp_dir("tls");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "etag-gateway test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();

        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn wait_for(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The demo backend behind a gateway that also listens for HTTPS; returns the HTTPS port.
fn tls_terminator(pki: &Pki, backend: &DemoBackend) -> (Gateway, u16) {
    let port = free_port();
    let config = format!(
        "[server]\ntls_listen = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        pki.path("cert.pem"),
        pki.path("key.pem")
    );
    let gateway = Gateway::start(&backend.url(), Some(&config));
    wait_for(format!("127.0.0.1:{port}").parse().unwrap());
    (gateway, port)
}

/// The gateway's log says `needle` within a few seconds (the error line is written after the answer).
fn assert_logged(gateway: &Gateway, needle: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gateway.stderr().contains(needle) {
        assert!(Instant::now() < deadline, "{what}:\n{}", gateway.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `curl -i` over HTTPS; `(exit code, output)`.
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "--noproxy", "*"])
        .args(args)
        .output()
        .expect("run curl (scripts/setup.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn an_https_upstream_works_with_its_ca_and_is_refused_without() {
    let pki = Pki::new();
    let backend = DemoBackend::start(&[]);
    let (_terminator, port) = tls_terminator(&pki, &backend);
    let upstream = format!("https://localhost:{port}");
    let c = client();

    // Trusted through upstream.ca_file: the write and the read go through TLS.
    let trusted = Gateway::start(
        &upstream,
        Some(&format!(
            "[upstream]\nca_file = \"{}\"\n",
            pki.path("ca.pem")
        )),
    );
    let r = c
        .put(format!("{}/docs/a", trusted.url()))
        .body("over tls")
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "PUT over an https upstream: {}",
        r.status()
    );
    let r = c
        .get(format!("{}/docs/a", trusted.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = etag_of(&r).expect("an etag from the gateway");
    assert_eq!(r.text().await.unwrap(), "over tls");
    assert_eq!(
        backend_get(&backend.url(), "/docs/a").await,
        (200, "over tls".to_owned())
    );
    // Conditional writes work across it too.
    let r = c
        .put(format!("{}/docs/a", trusted.url()))
        .header("If-Match", format!("\"{etag}\""))
        .body("v2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "conditional PUT over an https upstream");

    // Without the CA (the system's CAs do not know it): 502 with a JSON body, nothing applied.
    let untrusted = Gateway::start(&upstream, None);
    let r = c
        .put(format!("{}/docs/b", untrusted.url()))
        .body("must not arrive")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "upstream certificate from an unknown CA");
    let body: Value = r.json().await.expect("a JSON body");
    assert!(body.is_object(), "{body}");
    assert_logged(
        &untrusted,
        "UnknownIssuer",
        "the TLS handshake failed on the certificate",
    );

    // The CA is trusted but the name is not the certificate's (it is for localhost only).
    let wrong_name = Gateway::start(
        &format!("https://127.0.0.1:{port}"),
        Some(&format!(
            "[upstream]\nca_file = \"{}\"\n",
            pki.path("ca.pem")
        )),
    );
    let r = c
        .put(format!("{}/docs/b", wrong_name.url()))
        .body("must not arrive")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "certificate not valid for 127.0.0.1");
    assert_logged(
        &wrong_name,
        "not valid for name",
        "the TLS handshake failed on the name",
    );

    assert_eq!(backend_get(&backend.url(), "/docs/b").await.0, 404);
    assert!(backend_log(&backend.url(), "/docs/b").await.is_empty());
}

#[tokio::test]
async fn the_tls_listener_serves_https() {
    let pki = Pki::new();
    let backend = DemoBackend::start(&[]);
    let (gateway, port) = tls_terminator(&pki, &backend);
    let base = format!("https://localhost:{port}");
    let ca = pki.path("ca.pem");

    let (code, out) = curl(&[
        "--cacert",
        &ca,
        "-X",
        "PUT",
        "--data",
        "hello",
        &format!("{base}/docs/t"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("HTTP/1.1 201") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    let (code, out) = curl(&["--cacert", &ca, &format!("{base}/docs/t")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_ascii_lowercase().contains("\netag: \""), "{out}");
    assert!(out.ends_with("hello"), "{out}");

    // A client that does not trust the CA refuses the listener (curl: exit 60, bad certificate).
    let (code, out) = curl(&[&format!("{base}/docs/t")]);
    assert_eq!(code, 60, "{out}");

    // The plain listener still speaks HTTP.
    let r = client()
        .get(format!("{}/docs/t", gateway.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn check_validates_the_tls_files() {
    let pki = Pki::new();
    let dir = unique_temp_dir("tls-check");
    let check = |config: &str| {
        let path = dir.join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        Command::new(env!("CARGO_BIN_EXE_etag-gateway"))
            .arg("--config")
            .arg(&path)
            .arg("--check")
            .output()
            .unwrap()
    };
    let good = format!(
        "[server]\ntls_listen = \"127.0.0.1:8443\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         [upstream]\nurl = \"https://localhost:9443\"\nca_file = \"{}\"\n",
        pki.path("cert.pem"),
        pki.path("key.pem"),
        pki.path("ca.pem")
    );
    let out = check(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("https 127.0.0.1:8443"));

    let missing = Path::new("/nonexistent/cert.pem");
    let out = check(&good.replace(&pki.path("cert.pem"), &missing.display().to_string()));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("server.tls_cert = \"/nonexistent/cert.pem\" is not allowed (cannot read it"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
