//! Stopping, and handing over to a successor, without losing an update.
//!
//! The memory table is the authority on every etag it issued, so at most one process may use it at
//! a time. [`TableLock`] makes that so: the process that serves from a memory table holds an
//! exclusive `flock` on a lock file for as long as it lives. A second gateway started with the same
//! configuration is refused; a successor started with `--upgrade` waits for the lock, which the
//! old process releases only by exiting, after it has written its table to the snapshot. So the
//! new process never answers while the old one still might, and starts from the old one's table.
//!
//! [`Connections`] counts the proxy's downstream connections, so that a stopping process can exit as
//! soon as the last one is done instead of sleeping out Pingora's whole grace period, and so that
//! connections accepted just before a stop get their first request served rather than dropped.

use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An exclusive lock on the memory table, held for the life of the process (released by the
/// kernel when it exits, however it exits).
#[derive(Debug)]
pub struct TableLock {
    _file: File,
    path: PathBuf,
}

/// Why the table lock was not taken.
#[derive(thiserror::Error, Debug)]
pub enum LockError {
    #[error(
        "another etag-gateway{holder} serves from the same etag table (lock {path}): two processes \
         would each accept writes the other cannot see. Stop it first, or take over from it with \
         --upgrade and SIGQUIT"
    )]
    Held { path: String, holder: Holder },
    #[error(
        "the previous etag-gateway{holder} still holds the etag table lock {path} after {waited:?}; \
         giving up"
    )]
    StillHeld {
        path: String,
        holder: Holder,
        waited: Duration,
    },
    #[error("cannot use the etag table lock {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The process id written in a lock file by its holder, for the error message.
#[derive(Debug)]
pub struct Holder(Option<u32>);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, " (pid {pid})"),
            None => Ok(()),
        }
    }
}

impl TableLock {
    /// The lock files of a memory table, to be taken in this order: next to the upgrade socket
    /// (what an old and a new process always share, whatever else their configurations change),
    /// and next to the snapshot when there is one (what the holder owns: two gateways on different
    /// addresses must not share it either).
    pub fn paths_for(snapshot: Option<&Path>, upgrade_sock: &Path) -> Vec<PathBuf> {
        let lock = |p: &Path| {
            let mut path = p.as_os_str().to_owned();
            path.push(".lock");
            PathBuf::from(path)
        };
        std::iter::once(lock(upgrade_sock))
            .chain(snapshot.map(lock))
            .collect()
    }

    /// Takes the lock at once, or fails if another process holds it.
    pub fn acquire(path: &Path) -> Result<TableLock, LockError> {
        let mut file = open(path)?;
        match file.try_lock() {
            Ok(()) => TableLock::held(file, path),
            Err(TryLockError::WouldBlock) => Err(LockError::Held {
                path: path.display().to_string(),
                holder: holder(&mut file),
            }),
            Err(TryLockError::Error(source)) => Err(io_error(path, source)),
        }
    }

    /// Waits up to `limit` for the holder (the process being upgraded) to exit.
    pub fn wait_for(path: &Path, limit: Duration) -> Result<TableLock, LockError> {
        let mut file = open(path)?;
        let started = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    if told {
                        tracing::info!(waited = ?started.elapsed(), "the previous process has exited");
                    }
                    return TableLock::held(file, path);
                }
                Err(TryLockError::WouldBlock) if started.elapsed() < limit => {
                    if !told {
                        tracing::info!(
                            lock = %path.display(),
                            holder = %holder(&mut file),
                            "waiting for the previous process to finish its requests and save the etag table"
                        );
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(LockError::StillHeld {
                        path: path.display().to_string(),
                        holder: holder(&mut file),
                        waited: started.elapsed(),
                    })
                }
                Err(TryLockError::Error(source)) => return Err(io_error(path, source)),
            }
        }
    }

    /// Writes this process's id into the file (for the messages of whoever finds it held).
    fn held(mut file: File, path: &Path) -> Result<TableLock, LockError> {
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| io_error(path, e))?;
        Ok(TableLock {
            _file: file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open(path: &Path) -> Result<File, LockError> {
    // Never truncated on open: the holder's pid stays readable until this process holds the lock.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_error(path, e))
}

fn holder(file: &mut File) -> Holder {
    let mut text = String::new();
    let pid = file
        .rewind()
        .and_then(|()| file.read_to_string(&mut text))
        .ok()
        .and_then(|_| text.trim().parse().ok());
    Holder(pid)
}

fn io_error(path: &Path, source: std::io::Error) -> LockError {
    LockError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The proxy's downstream connections: how many are open, and how many of those still wait for
/// their first request head.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
    awaiting_first_head: AtomicUsize,
}

/// One open connection; counted until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<Connections>);

/// A connection whose first request head has not fully arrived; counted until dropped.
#[derive(Debug)]
pub struct AwaitingFirstHead(Arc<Connections>);

impl Connections {
    pub fn new() -> Arc<Connections> {
        Arc::default()
    }

    pub fn open(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenConnection(self.clone())
    }

    pub fn awaiting_first_head(self: &Arc<Self>) -> AwaitingFirstHead {
        self.awaiting_first_head.fetch_add(1, Ordering::AcqRel);
        AwaitingFirstHead(self.clone())
    }

    pub fn open_now(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn awaiting_first_head_now(&self) -> usize {
        self.awaiting_first_head.load(Ordering::Acquire)
    }

    /// At a stop: returns once no connection waits for its first head, or after `limit` (the head
    /// deadline, which cuts such a connection anyway). First gives connections accepted just
    /// before the stop a moment to reach the count: their tasks may not have run yet.
    pub async fn first_heads_arrived(&self, limit: Duration) {
        let started = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        while self.awaiting_first_head_now() > 0 && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for AwaitingFirstHead {
    fn drop(&mut self) {
        self.0.awaiting_first_head.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A background service that ends the process early at a stop. Once the stop has begun (Pingora's
/// shutdown signal: at once on SIGTERM, after the 5 s hand-over on SIGQUIT), it calls `finish` and
/// exits as soon as `drained` holds, checked every few milliseconds for up to `limit`. Pingora
/// would otherwise sleep out the whole grace period however early the last request ended; past
/// `limit`, its own shutdown goes on. (A service, not a thread started beforehand, so that it runs
/// in the daemon after `--daemon` forks.)
pub struct ExitWhenDrained<D, F> {
    pub limit: Duration,
    pub drained: D,
    pub finish: F,
}

#[async_trait::async_trait]
impl<D, F> BackgroundService for ExitWhenDrained<D, F>
where
    D: Fn() -> bool + Send + Sync,
    F: Fn() + Send + Sync,
{
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let started = Instant::now();
        while started.elapsed() < self.limit {
            if (self.drained)() {
                tracing::info!(after = ?started.elapsed(), "every connection is done");
                (self.finish)();
                std::process::exit(0);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The signals that stop or upgrade the gateway: Pingora's (SIGTERM graceful stop, SIGINT fast stop,
/// SIGQUIT hand-over to a successor), except that a SIGQUIT only hands over when a successor is there
/// to take the sockets. Pingora would stop the process after failing to send them, so a stray
/// `kill -QUIT`, or a new binary that failed to start, would take the service down. The successor's
/// socket file exists exactly while it waits for the sockets (it removes it afterwards); it may be
/// started just after the signal (systemd's reload sends the signal first), so its socket is awaited
/// for up to 5 s, as long as Pingora itself would try to reach it.
///
/// `on_stop` runs when a stop begins, before Pingora is told: with a grace period of 0 it shuts its
/// runtimes down at once, and whatever must be in place before tasks are dropped (the memory
/// store's stopping flag) must be set here, not in a task that may never run.
pub struct Signals {
    pub upgrade_sock: PathBuf,
    pub on_stop: Box<dyn Fn() + Send + Sync>,
}

const SUCCESSOR_WAIT: Duration = Duration::from_secs(5);

#[async_trait::async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let stop = |signal| {
            (self.on_stop)();
            signal
        };
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    if self.successor_waits().await {
                        return stop(ShutdownSignal::GracefulUpgrade);
                    }
                    tracing::warn!(
                        upgrade_sock = %self.upgrade_sock.display(),
                        "SIGQUIT, but no successor waits on the upgrade socket (start `etag-gateway \
                         --upgrade` with the same configuration): ignored, still serving"
                    );
                }
                _ = term.recv() => return stop(ShutdownSignal::GracefulTerminate),
                _ = interrupt.recv() => return stop(ShutdownSignal::FastShutdown),
            }
        }
    }
}

impl Signals {
    async fn successor_waits(&self) -> bool {
        let started = Instant::now();
        loop {
            if self.upgrade_sock.exists() {
                return true;
            }
            if started.elapsed() >= SUCCESSOR_WAIT {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_lock(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "etag-gateway-lifecycle-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("etags.lock")
    }

    #[test]
    fn the_locks_sit_next_to_the_upgrade_socket_and_the_snapshot() {
        let sock = Path::new("/tmp/g.sock");
        assert_eq!(
            TableLock::paths_for(Some(Path::new("/var/lib/g/etags")), sock),
            [
                PathBuf::from("/tmp/g.sock.lock"),
                PathBuf::from("/var/lib/g/etags.lock")
            ]
        );
        assert_eq!(
            TableLock::paths_for(None, sock),
            [PathBuf::from("/tmp/g.sock.lock")]
        );
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let path = temp_lock("second");
        let first = TableLock::acquire(&path).expect("first");
        let e = TableLock::acquire(&path).expect_err("second");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("--upgrade"),
            "{msg}"
        );
        drop(first);
        TableLock::acquire(&path).expect("free again once the first is gone");
    }

    #[test]
    fn a_successor_waits_for_the_holder_and_gives_up_at_the_limit() {
        let path = temp_lock("wait");
        let first = TableLock::acquire(&path).expect("first");
        let e = TableLock::wait_for(&path, Duration::from_millis(50)).expect_err("still held");
        assert!(matches!(e, LockError::StillHeld { .. }), "{e}");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(first);
        });
        let second = TableLock::wait_for(&path, Duration::from_secs(30)).expect("taken over");
        release.join().unwrap();
        let pid = std::fs::read_to_string(second.path()).unwrap();
        assert_eq!(pid, std::process::id().to_string());
    }

    #[tokio::test]
    async fn connections_are_counted_until_their_guards_drop() {
        let c = Connections::new();
        let open = c.open();
        let fresh = c.awaiting_first_head();
        assert_eq!((c.open_now(), c.awaiting_first_head_now()), (1, 1));
        let waiting = {
            let c = c.clone();
            tokio::spawn(async move { c.first_heads_arrived(Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a head is still awaited");
        drop(fresh);
        waiting.await.unwrap();
        drop(open);
        assert_eq!((c.open_now(), c.awaiting_first_head_now()), (0, 0));
    }
}
