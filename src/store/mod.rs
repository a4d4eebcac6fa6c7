//! Where the etag table lives. The proxy talks to one small trait; the memory store keeps the table in
//! this process, a shared store (Redis) will keep it for several replicas. Every step is atomic on the
//! store's side: check-and-reserve is one step, never a read followed by a write.

pub mod memory;
pub mod redis;
pub mod snapshot;

use crate::etag::Etag;
use crate::precondition::{IfMatch, IfNoneMatch, Preconditions};
use crate::resource_key::ResourceKey;
use crate::table::{
    BackendValidator, EntryState, ReadAnswer, ReadStart, ReadTicket, Refusal, Reservation,
    WriteOutcome, WriteTicket,
};
use async_trait::async_trait;

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// The store could not answer; the request gets a 503 and nothing is forwarded.
#[derive(Debug, thiserror::Error)]
#[error("etag store unavailable: {0}")]
pub struct StoreError(pub String);

#[async_trait]
pub trait EtagStore: Send + Sync + 'static {
    /// A read starts; `If-None-Match` is evaluated (see [`crate::table::EtagTable::begin_read`]).
    async fn begin_read(
        &self,
        key: &ResourceKey,
        if_none_match: Option<&IfNoneMatch>,
    ) -> Result<ReadStart, StoreError>;
    /// A read's answer arrived: the etag naming its body, if one can be vouched for.
    async fn finish_read(
        &self,
        ticket: &ReadTicket,
        answer: ReadAnswer,
    ) -> Result<Option<Etag>, StoreError>;
    /// `If-Match` on a request that changes nothing.
    async fn check(
        &self,
        key: &ResourceKey,
        precondition: &IfMatch,
    ) -> Result<Result<(), Refusal>, StoreError>;
    /// Evaluate the preconditions and reserve a write, in one atomic step.
    async fn reserve_write(
        &self,
        key: &ResourceKey,
        preconditions: &Preconditions,
    ) -> Result<Result<Reservation, Refusal>, StoreError>;
    /// Record the outcome of a reserved write; the etag to hand to the client, if any.
    async fn settle_write(
        &self,
        ticket: WriteTicket,
        outcome: WriteOutcome,
        validator: BackendValidator,
    ) -> Result<Option<Etag>, StoreError>;
    /// A write created a resource at `key` (POST answered with `Location`): its etag.
    async fn register_created(
        &self,
        key: &ResourceKey,
        validator: BackendValidator,
    ) -> Result<Option<Etag>, StoreError>;
    /// The etag handed out for an applied write turned out not to be trustworthy (the answer broke off
    /// after its headers): unless something else changed since, the resource's state becomes unknown.
    async fn withdraw(&self, key: &ResourceKey, etag: Etag) -> Result<(), StoreError>;
    /// What the store holds for a resource (admin API); `None` if nothing.
    async fn describe(&self, key: &ResourceKey) -> Result<Option<EntryState>, StoreError>;
    /// Forget a resource's etag (admin API): it stops matching at once.
    async fn invalidate(&self, key: &ResourceKey) -> Result<(), StoreError>;
    /// Entries held in this process, for the metrics (`None`: the table lives elsewhere).
    fn local_entries(&self) -> Option<usize> {
        None
    }
    /// Settle a write whose request was dropped without an outcome (gateway shutting down, task
    /// cancelled) as unknown: must not block.
    fn settle_abandoned(&self, ticket: WriteTicket);
}
