//! The etag table in this process: an [`EtagTable`] behind a `std::sync::Mutex`.
//!
//! A std mutex, not tokio's: every step is O(1) and never awaits while holding the lock, so the
//! lock is held for well under a microsecond and async locking would only add cost.

use super::snapshot::{self, HeldEntry, Snapshot, SnapshotEntry, SnapshotError};
use super::{EtagStore, StoreError};
use crate::etag::Etag;
use crate::precondition::{IfMatch, IfNoneMatch, Preconditions};
use crate::resource_key::ResourceKey;
use crate::table::{
    BackendValidator, EntryState, EtagTable, ReadAnswer, ReadStart, ReadTicket, Refusal,
    Reservation, WriteOutcome, WriteTicket,
};
use async_trait::async_trait;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

pub struct MemoryStore {
    table: Mutex<EtagTable>,
    /// A stop has begun: writes abandoned from now on (their tasks dropped by the shutdown) stay
    /// busy, to be saved as held, instead of being settled as unknown in a table about to vanish.
    stopping: AtomicBool,
}

/// What a snapshot brought back.
#[derive(Debug)]
pub struct Restored {
    pub entries: usize,
    /// Resources locked until their time, to be released by [`ReleaseHolds`].
    pub held: Vec<HeldEntry>,
}

impl MemoryStore {
    pub fn new(capacity: NonZeroUsize) -> MemoryStore {
        MemoryStore {
            table: Mutex::new(EtagTable::new(capacity)),
            stopping: AtomicBool::new(false),
        }
    }

    /// The process is stopping (see `stopping`).
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn table(&self) -> MutexGuard<'_, EtagTable> {
        // A panic while holding the lock cannot leave the table half-updated in a way that lets a stale
        // etag match (each step mutates one entry at the end), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resources with a write in flight (or held after one whose outcome is unknown).
    pub fn busy_len(&self) -> usize {
        self.table().busy_len()
    }

    /// Writes the table to `path` (at a clean stop, once nothing can change it any more). Resources
    /// whose writes have no outcome yet are saved as held for `hold` from now: the longest a write
    /// can still be applied after its last byte left. Returns (entries, held).
    pub fn save_snapshot(
        &self,
        path: &Path,
        hold: Duration,
    ) -> Result<(usize, usize), SnapshotError> {
        let table = self.table();
        let until = SystemTime::now() + hold;
        let snapshot = Snapshot {
            entries: table
                .export()
                .into_iter()
                .map(|(slot, etag, backend)| SnapshotEntry {
                    slot,
                    etag,
                    backend,
                })
                .collect(),
            held: table
                .busy_slots()
                .into_iter()
                .map(|slot| HeldEntry { slot, until })
                .collect(),
        };
        drop(table);
        snapshot::write(path, &snapshot)?;
        Ok((snapshot.entries.len(), snapshot.held.len()))
    }

    /// Loads (and removes) the snapshot at `path`, if there is one. Held resources whose time has
    /// not passed are locked; the caller releases them on time with [`ReleaseHolds`].
    pub fn restore_snapshot(&self, path: &Path) -> Result<Option<Restored>, SnapshotError> {
        let Some(snapshot) = snapshot::take(path)? else {
            return Ok(None);
        };
        let now = SystemTime::now();
        let mut table = self.table();
        table.import(
            snapshot
                .entries
                .iter()
                .map(|e| (e.slot, e.etag, e.backend.clone())),
        );
        let held: Vec<HeldEntry> = snapshot
            .held
            .into_iter()
            .filter(|h| h.until > now)
            .collect();
        for h in &held {
            table.hold(h.slot);
        }
        Ok(Some(Restored {
            entries: snapshot.entries.len(),
            held,
        }))
    }
}

/// Releases the holds a snapshot carried over, each at its time (a background service).
pub struct ReleaseHolds {
    pub store: Arc<MemoryStore>,
    pub held: Vec<HeldEntry>,
}

#[async_trait]
impl pingora::services::background::BackgroundService for ReleaseHolds {
    async fn start(&self, _shutdown: pingora::server::ShutdownWatch) {
        let mut held = self.held.clone();
        held.sort_by_key(|h| h.until);
        for h in held {
            if let Ok(wait) = h.until.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            self.store.table().release_held(h.slot);
        }
    }
}

#[async_trait]
impl EtagStore for MemoryStore {
    async fn begin_read(
        &self,
        key: &ResourceKey,
        if_none_match: Option<&IfNoneMatch>,
    ) -> Result<ReadStart, StoreError> {
        Ok(self.table().begin_read(key, if_none_match))
    }

    async fn finish_read(
        &self,
        ticket: &ReadTicket,
        answer: ReadAnswer,
    ) -> Result<Option<Etag>, StoreError> {
        Ok(self.table().finish_read(ticket, answer))
    }

    async fn check(
        &self,
        key: &ResourceKey,
        precondition: &IfMatch,
    ) -> Result<Result<(), Refusal>, StoreError> {
        Ok(self.table().check(key, precondition))
    }

    async fn reserve_write(
        &self,
        key: &ResourceKey,
        preconditions: &Preconditions,
    ) -> Result<Result<Reservation, Refusal>, StoreError> {
        Ok(self.table().reserve_write(key, preconditions))
    }

    async fn settle_write(
        &self,
        ticket: WriteTicket,
        outcome: WriteOutcome,
        validator: BackendValidator,
    ) -> Result<Option<Etag>, StoreError> {
        Ok(self.table().settle_write(ticket, outcome, validator))
    }

    async fn register_created(
        &self,
        key: &ResourceKey,
        validator: BackendValidator,
    ) -> Result<Option<Etag>, StoreError> {
        Ok(self.table().register_created(key, validator))
    }

    async fn withdraw(&self, key: &ResourceKey, etag: Etag) -> Result<(), StoreError> {
        self.table().withdraw(key, etag);
        Ok(())
    }

    async fn describe(&self, key: &ResourceKey) -> Result<Option<EntryState>, StoreError> {
        Ok(self.table().describe(key))
    }

    async fn invalidate(&self, key: &ResourceKey) -> Result<(), StoreError> {
        self.table().invalidate(key);
        Ok(())
    }

    fn local_entries(&self) -> Option<usize> {
        Some(self.len())
    }

    fn settle_abandoned(&self, ticket: WriteTicket) {
        if self.stopping.load(Ordering::Acquire) {
            // Left busy: saved as held (see `stopping`).
            return;
        }
        self.table()
            .settle_write(ticket, WriteOutcome::Unknown, BackendValidator::default());
    }
}
