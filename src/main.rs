//! `etag-gateway`: reads the configuration (file, then flags), then runs the Pingora server.

use clap::Parser;
use etag_gateway::admin::AdminApp;
use etag_gateway::config::{Cli, Config, StoreKind};
use etag_gateway::header_deadline::HeaderDeadline;
use etag_gateway::lifecycle::{Connections, ExitWhenDrained, Signals, TableLock};
use etag_gateway::proxy::{Gateway, GatewaySettings};
use etag_gateway::store::memory::ReleaseHolds;
use etag_gateway::store::{EtagStore, MemoryStore, RedisStore};
use etag_gateway::upstream::Upstreams;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::*;
use pingora::protocols::ALPN;
use pingora::server::configuration::ServerConf;
use pingora::server::RunArgs;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// mimalloc: measured -11% CPU per GET, -14% per forwarded PUT, 344 -> 209 B/entry at 1M (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_cli(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("etag-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        let origin = cli
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults".into());
        println!("{origin}: ok: {}", config.summary());
        return ExitCode::SUCCESS;
    }
    init_logging(config.log.json);
    match run(config, cli.upgrade, cli.daemon) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etag-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    // Pingora logs through `log`; the subscriber's tracing-log bridge collects those lines too.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn run(config: Config, upgrade: bool, daemon: bool) -> anyhow::Result<()> {
    tracing::info!("starting: {}", config.summary());

    let (upstreams, upstream_services) = Upstreams::new(&config)?;
    let settings = GatewaySettings {
        unknown_outcome_hold: config.upstream.timeout_hold,
        access_log: config.log.access,
        body_deadline: config.upstream.read_timeout,
        body_read_timeout: config.upstream.read_timeout.min(Duration::from_secs(10)),
        limits: config.limits.clone(),
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, pingora_conf(&config, daemon));
    let mut stop = Stop::default();
    // The longest a forwarded write can take, on any route: a Redis lease outlives it, and a write
    // without an outcome at a stop stays held that long.
    let longest_write = {
        let (connect_timeout, read_timeout) = upstreams.longest_timeouts();
        settings.longest_write(connect_timeout, read_timeout)
    };
    let store: Arc<dyn EtagStore> = match (config.store.kind, &config.store.url) {
        (StoreKind::Redis, Some(url)) => {
            // A reservation outlives the longest a forwarded write can take, with margin.
            let lease = longest_write + Duration::from_secs(5);
            let store = Arc::new(RedisStore::new(url, config.store.idle_ttl, lease)?);
            // Redis is the authority: old and new process may serve side by side during an upgrade.
            take_over_listeners(&mut server, upgrade);
            store
        }
        _ => {
            let snapshot = config.store.snapshot.as_deref();
            if let Some(path) = snapshot {
                // Fail now, not at the stop, if the snapshot could not be written there.
                probe_writable(path)?;
            }
            // One process at a time serves from a memory table (see lifecycle.rs).
            let lock_paths = TableLock::paths_for(snapshot, &config.server.upgrade_sock);
            let locks = if upgrade {
                take_over_listeners(&mut server, upgrade);
                // The old process goes on serving for 5 s (Pingora's hand-over time), then finishes
                // its requests within its grace period and saves its table; connections meanwhile
                // wait in the listen queue.
                let limit = Duration::from_secs(5 + config.server.grace_period_seconds + 30);
                lock_paths
                    .iter()
                    .map(|path| TableLock::wait_for(path, limit))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                let locks = lock_paths
                    .iter()
                    .map(|path| TableLock::acquire(path))
                    .collect::<Result<Vec<_>, _>>()?;
                take_over_listeners(&mut server, upgrade);
                locks
            };
            let memory = Arc::new(MemoryStore::new(config.store.capacity));
            if let Some(path) = snapshot {
                // Before the first request: the snapshot is consumed whether it can be used or not.
                match memory.restore_snapshot(path) {
                    Ok(Some(restored)) => {
                        tracing::info!(entries = restored.entries, held = restored.held.len(), path = %path.display(), "etag table restored from the snapshot of a clean stop");
                        if !restored.held.is_empty() {
                            server.add_service(background_service(
                                "release held writes",
                                ReleaseHolds {
                                    store: memory.clone(),
                                    held: restored.held,
                                },
                            ));
                        }
                    }
                    Ok(None) => {
                        tracing::info!(path = %path.display(), "no snapshot to restore: the etag table starts empty")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "snapshot not used: every old etag is unknown (a conflict)")
                    }
                }
            }
            stop.memory = Some(StoppingTable {
                memory: memory.clone(),
                snapshot: config.store.snapshot.clone(),
                // A write may still be applied this long after the stop.
                hold: longest_write,
                _locks: locks,
            });
            memory
        }
    };

    let admin_store = store.clone();
    let connections = Connections::new();
    // The header deadline wraps Pingora's HTTP loop: a client dripping its request head is cut off.
    let mut proxy = etag_gateway::header_deadline::proxy_service(
        &server.configuration,
        Gateway::new(store.clone(), Arc::new(upstreams), settings),
        config.limits.header_read_timeout,
        connections.clone(),
    );
    for addr in &config.server.listen {
        proxy.add_tcp(&addr.to_string());
    }
    if let Some(tls) = &config.server.tls {
        // The files were checked at validation (Pingora panics on bad ones when the listener starts).
        let (cert, key) = (
            tls.cert.display().to_string(),
            tls.key.display().to_string(),
        );
        for addr in &tls.listen {
            let mut settings = TlsSettings::intermediate(&cert, &key)?;
            settings.set_certificate_chain_file(&cert)?;
            settings.set_private_key_file(&key)?;
            // HTTP/1.1 only, like the plain listener (the head deadline and the gateway's write
            // handling are HTTP/1).
            settings.set_alpn(ALPN::H1);
            proxy.add_tls_with_settings(&addr.to_string(), None, settings);
        }
        tracing::info!(listen = ?tls.listen, cert = %cert, "https listener");
    }
    server.add_service(proxy);
    for service in upstream_services {
        server.add_service(service);
    }
    if let Some(addr) = config.admin.listen {
        let app = AdminApp::new(admin_store, config.admin.token.clone());
        let app = HeaderDeadline::new(
            HttpServer::new_app(app),
            config.limits.header_read_timeout,
            Connections::new(),
        );
        let mut admin = Service::new("etag-gateway admin".to_string(), app);
        admin.add_tcp(&addr.to_string());
        server.add_service(admin);
        tracing::info!(%addr, etag_api = config.admin.token.is_some(), "admin listener");
    }

    // Once a stop has begun, exit as soon as the last connection is done and no write is held,
    // rather than sleeping out the whole grace period (a successor may be waiting for the table).
    let stop = Arc::new(stop);
    server.add_service(background_service(
        "exit when drained",
        ExitWhenDrained {
            limit: Duration::from_secs(config.server.grace_period_seconds),
            drained: {
                let stop = stop.clone();
                move || connections.open_now() == 0 && stop.writes_held() == 0
            },
            finish: {
                let stop = stop.clone();
                move || stop.finish()
            },
        },
    ));
    let stop_begin = stop.clone();
    // Returns once every service has stopped: nothing can change the table any more.
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            upgrade_sock: config.server.upgrade_sock.clone(),
            on_stop: Box::new(move || stop_begin.begin()),
        }),
    });
    stop.finish();
    Ok(())
}

/// Takes the listening sockets over from the process being upgraded (`--upgrade`: blocks until it
/// sends them on SIGQUIT; Pingora exits if none come within 5 s); without it, nothing happens here.
fn take_over_listeners(server: &mut Server, upgrade: bool) {
    if upgrade {
        tracing::info!(
            "upgrade: waiting for the running gateway's listening sockets (send it SIGQUIT)"
        );
    }
    server.bootstrap();
    if upgrade {
        tracing::info!("upgrade: listening sockets received");
    }
}

/// What a stop must do once nothing can change the table any more, exactly once: save the memory
/// table to its snapshot. The table lock is released only when the process exits, after that.
#[derive(Default)]
struct Stop {
    memory: Option<StoppingTable>,
    done: Mutex<bool>,
}

struct StoppingTable {
    memory: Arc<MemoryStore>,
    snapshot: Option<PathBuf>,
    /// How long a write without an outcome must stay locked after the stop.
    hold: Duration,
    _locks: Vec<TableLock>,
}

impl Stop {
    fn begin(&self) {
        if let Some(t) = &self.memory {
            t.memory.begin_stop();
        }
    }

    fn writes_held(&self) -> usize {
        self.memory.as_ref().map_or(0, |t| t.memory.busy_len())
    }

    fn finish(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if *done {
            return;
        }
        if let Some(StoppingTable {
            memory,
            snapshot: Some(path),
            hold,
            ..
        }) = &self.memory
        {
            match memory.save_snapshot(path, *hold) {
                Ok((entries, held)) => {
                    tracing::info!(entries, held, path = %path.display(), "etag table saved for the next start")
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not save the etag table: the next start begins empty")
                }
            }
        }
        tracing::info!("stopped");
        *done = true;
    }
}

/// Checks that a file can be created next to `path` (where the snapshot will be written).
fn probe_writable(path: &std::path::Path) -> anyhow::Result<()> {
    let probe = path.with_extension("probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            anyhow::anyhow!(
                "store.snapshot = {:?}: cannot write there ({e}); the etag table could not be saved at stop",
                path.display().to_string()
            )
        })
}

/// Pingora's own settings, from ours. Its defaults that would bite are replaced: a 300 s grace
/// period (docker stops after 10 s), and pid/upgrade-socket paths shared by every instance on a host.
fn pingora_conf(config: &Config, daemon: bool) -> ServerConf {
    ServerConf {
        threads: config.server.threads,
        // Pingora waits the whole grace period, then gives its runtimes a shutdown timeout: together
        // they make grace_period_seconds, so the process is gone within it (or earlier: see
        // ExitWhenDrained).
        grace_period_seconds: Some(config.server.grace_period_seconds.saturating_sub(1)),
        graceful_shutdown_timeout_seconds: Some(config.server.grace_period_seconds.min(1)),
        daemon,
        pid_file: config.server.pid_file.display().to_string(),
        // Old and new process must agree on it (see ServerConfig::upgrade_sock).
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        ..ServerConf::default()
    }
}
