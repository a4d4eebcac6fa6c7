//! The etag table in this process: an [`EtagTable`] behind a `std::sync::Mutex`.
//!
//! A std mutex, not tokio's: every step is O(1) and never awaits while holding the lock, so the
//! lock is held for well under a microsecond and async locking would only add cost.

use super::snapshot::{self, SnapshotEntry, SnapshotError};
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
use std::sync::{Mutex, MutexGuard};

pub struct MemoryStore {
    table: Mutex<EtagTable>,
}

impl MemoryStore {
    pub fn new(capacity: NonZeroUsize) -> MemoryStore {
        MemoryStore {
            table: Mutex::new(EtagTable::new(capacity)),
        }
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

    /// Writes the table to `path` (at a clean stop, once nothing can change it any more).
    pub fn save_snapshot(&self, path: &Path) -> Result<usize, SnapshotError> {
        let entries: Vec<SnapshotEntry> = self
            .table()
            .export()
            .into_iter()
            .map(|(slot, etag, backend)| SnapshotEntry {
                slot,
                etag,
                backend,
            })
            .collect();
        snapshot::write(path, &entries)?;
        Ok(entries.len())
    }

    /// Loads (and removes) the snapshot at `path`, if there is one; the number of entries loaded.
    pub fn restore_snapshot(&self, path: &Path) -> Result<Option<usize>, SnapshotError> {
        let Some(entries) = snapshot::take(path)? else {
            return Ok(None);
        };
        let n = entries.len();
        self.table()
            .import(entries.into_iter().map(|e| (e.slot, e.etag, e.backend)));
        Ok(Some(n))
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
        self.table()
            .settle_write(ticket, WriteOutcome::Unknown, BackendValidator::default());
    }
}
