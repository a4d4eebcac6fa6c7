//! The etag table: the gateway's authority on which state of each resource an etag names.
//!
//! Invariant (the concurrency contract): a write carrying `If-Match: E` is let through only if E is the
//! current etag of its resource and no other write to that resource is in flight; from that moment E
//! stops matching, so no other write carrying E can ever pass. An etag is put back only when the write
//! certainly did not happen (4xx, nothing sent) and nothing else changed meanwhile.
//!
//! Plain data and O(1) steps under one lock, never held across an await (the callers hold a
//! `std::sync::Mutex`; each step is a handful of hash-map operations).
//!
//! Entries with writes in flight live in `busy`, outside the LRU, so that eviction can never forget a
//! reservation (a forgotten reservation would let a read hand out an etag while the write is pending).
//! Idle entries live in the bounded LRU; evicting one is safe because an unknown resource matches no
//! `If-Match`.
//!
//! The backend's own validator (its `ETag`, its `Last-Modified`) is recorded per entry: a read that
//! shows a different one reveals a change made behind the gateway, and the etag is rotated before it is
//! handed out.

use crate::etag::Etag;
use crate::precondition::{IfMatch, IfNoneMatch, Preconditions};
use crate::resource_key::ResourceKey;
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::SystemTime;

/// The backend's own validators for one state of a resource, as its answer carried them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendValidator {
    /// The backend's `ETag` header value, as sent (quotes included).
    pub etag: Option<String>,
    pub last_modified: Option<SystemTime>,
}

impl BackendValidator {
    pub fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }
}

/// An `Option<Etag>` in 24 bytes instead of 32 (an entry is the table's memory per resource):
/// "none" is the nil UUID of epoch 0, which the gateway never issues (a v4 UUID has its version bits
/// set). Read only through [`PackedEtag::get`], so that the stand-in is never compared with an etag
/// a client sent (a client may well send the nil UUID): it reads as `None`, which matches nothing.
#[derive(Debug, Clone, Copy)]
struct PackedEtag(Etag);

impl PackedEtag {
    const NONE: PackedEtag = PackedEtag(Etag::NIL);

    fn new(etag: Option<Etag>) -> PackedEtag {
        // A nil etag (only from a hand-made snapshot) is stored as none: unknown, never a match.
        etag.map_or(PackedEtag::NONE, PackedEtag)
    }

    fn get(self) -> Option<Etag> {
        (self.0 != Etag::NIL).then_some(self.0)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// The etag the gateway vouches for; `None`: no state it can name (never read, deleted, unknown
    /// outcome, or a write in flight). Nothing matches `None`.
    etag: PackedEtag,
    /// Changes on every change of the entry; unique across the table's life (taken from one counter),
    /// so a re-created entry never repeats an old version.
    version: u64,
    writes_in_flight: u32,
    /// The backend's validator for the state `etag` names (`None` when it sends none or is
    /// unknown). Boxed: most backends send none, and an entry stays small.
    backend: Option<Box<BackendValidator>>,
}

impl Entry {
    fn new(version: u64) -> Entry {
        Entry {
            etag: PackedEtag::NONE,
            version,
            writes_in_flight: 0,
            backend: None,
        }
    }

    fn etag(&self) -> Option<Etag> {
        self.etag.get()
    }

    fn set_etag(&mut self, etag: Option<Etag>) {
        self.etag = PackedEtag::new(etag);
    }

    /// The resource's state changed to one the gateway cannot name: no etag, no backend validator.
    fn forget_state(&mut self, version: u64) {
        self.etag = PackedEtag::NONE;
        self.backend = None;
        self.version = version;
    }

    fn settled(&self) -> bool {
        self.writes_in_flight == 0
    }

    fn backend(&self) -> &BackendValidator {
        static NONE: BackendValidator = BackendValidator {
            etag: None,
            last_modified: None,
        };
        self.backend.as_deref().unwrap_or(&NONE)
    }

    fn set_backend(&mut self, validator: BackendValidator) {
        self.backend = (!validator.is_empty()).then(|| Box::new(validator));
    }
}

/// Taken when a read starts; tells at its end whether a write overlapped it.
#[derive(Debug, Clone)]
pub struct ReadTicket {
    pub key: ResourceKey,
    pub(crate) version: u64,
}

/// How a read goes on.
#[derive(Debug, Clone)]
pub enum ReadStart {
    /// `If-None-Match` names the current state and the backend has no validator of its own: the
    /// table alone knows the answer is 304.
    NotModified(Etag),
    /// Forward the read. With `revalidate`, the client's copy is the current state: ask the backend
    /// with its own validator, so that it can answer 304 cheaply.
    Forward {
        ticket: ReadTicket,
        revalidate: Option<BackendValidator>,
    },
}

/// A resource's entry as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryState {
    pub etag: Option<Etag>,
    pub writes_in_flight: u32,
    pub backend: BackendValidator,
}

/// What the backend answered to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAnswer {
    /// 2xx, or 304 to a revalidation, with the backend's validators.
    Found(BackendValidator),
    /// 404 or 410: the resource does not exist.
    Gone,
    /// Anything else: no evidence either way.
    Failed,
}

/// A reservation for one write; settle it exactly once.
#[derive(Debug)]
pub struct WriteTicket {
    pub key: ResourceKey,
    /// The entry's version right after this reservation.
    pub(crate) version: u64,
    /// The etag to put back if the write certainly did not happen.
    pub(crate) etag_before: Option<Etag>,
}

/// A write let through.
#[derive(Debug)]
pub struct Reservation {
    pub ticket: WriteTicket,
    /// `If-None-Match: *` on a resource the gateway knows nothing of: ask the backend whether it
    /// exists before forwarding (the reservation keeps others out meanwhile).
    pub probe_existence: bool,
    /// The backend's validator of the state the precondition named: sent along as the backend's own
    /// precondition, so that a backend that checks it refuses a change made behind the gateway.
    pub backend_precondition: Option<BackendValidator>,
}

/// A write (or `If-Match` on a read) the table refuses; `current` is what it vouches for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub current: Option<Etag>,
}

/// What became of a forwarded write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// 2xx: the resource now holds what this write made of it; the etag names that state.
    Applied(Etag),
    /// 2xx, but the resulting state has no name the gateway can give (DELETE, POST to a collection).
    AppliedUnnamed,
    /// 4xx, or nothing was sent: the backend did not change.
    NotApplied,
    /// 5xx, timeout, reset, truncated answer, gateway stopped: the write may or may not have happened.
    Unknown,
    /// The backend refused the precondition it was sent (412): the resource changed behind the
    /// gateway. Not applied, and the state the gateway knew is gone.
    ChangedBehind,
}

/// How a read goes on, given the entry's state when it starts (shared by every store).
pub fn plan_read(
    ticket: ReadTicket,
    etag: Option<Etag>,
    settled: bool,
    backend: &BackendValidator,
    if_none_match: Option<&IfNoneMatch>,
) -> ReadStart {
    let client_copy_is_current =
        settled && if_none_match.is_some_and(|inm| inm.matches_weakly(etag.as_ref()));
    let revalidate = match (client_copy_is_current, etag) {
        (true, Some(etag)) if backend.is_empty() => return ReadStart::NotModified(etag),
        (true, _) => Some(backend.clone()),
        (false, _) => None,
    };
    ReadStart::Forward { ticket, revalidate }
}

/// What the table keys its entries by: a 128-bit hash of the canonical path, not the path itself —
/// half the memory of an entry. Two paths with one hash would share an entry: a spurious conflict
/// at worst (merged, never split), with odds of 2^-128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot(pub u128);

impl Slot {
    pub fn of(key: &ResourceKey) -> Slot {
        use std::hash::{DefaultHasher, Hash, Hasher};
        // Two SipHash-1-3 runs with fixed, different prefixes: the same slot in every process.
        let half = |seed: u8| {
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            key.as_str().hash(&mut h);
            h.finish()
        };
        Slot(((half(1) as u128) << 64) | half(2) as u128)
    }
}

pub struct EtagTable {
    /// Idle entries, most recently used first. Unbounded for the `lru` crate, bounded here
    /// ([`EtagTable::keep_idle`]): a bounded `LruCache` allocates its hash map for the whole capacity
    /// up front (71 MB at 2M before the first entry); this one grows with the table.
    idle: LruCache<Slot, Entry>,
    capacity: usize,
    busy: HashMap<Slot, Entry>,
    last_version: u64,
}

impl EtagTable {
    pub fn new(capacity: NonZeroUsize) -> EtagTable {
        EtagTable {
            idle: LruCache::unbounded(),
            capacity: capacity.get(),
            busy: HashMap::new(),
            last_version: 0,
        }
    }

    /// Puts an idle entry in the LRU (most recently used); the least recently used one goes if the
    /// table is full. The new entry is never the one to go (the capacity is at least 1).
    fn keep_idle(&mut self, slot: Slot, entry: Entry) {
        self.idle.push(slot, entry);
        while self.idle.len() > self.capacity {
            self.idle.pop_lru();
            crate::metrics::Metrics::get().table_evictions.inc();
        }
    }

    fn next_version(&mut self) -> u64 {
        self.last_version += 1;
        self.last_version
    }

    /// Entries held (idle and busy).
    pub fn len(&self) -> usize {
        self.idle.len() + self.busy.len()
    }

    /// Entries with writes in flight, or held after a write whose outcome is unknown.
    pub fn busy_len(&self) -> usize {
        self.busy.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The etag the table vouches for now, without touching recency.
    pub fn current(&self, key: &ResourceKey) -> Option<Etag> {
        self.peek(Slot::of(key)).and_then(Entry::etag)
    }

    // The steps below take a key's slot once (two SipHash runs over the path) and pass it on.
    fn peek(&self, slot: Slot) -> Option<&Entry> {
        self.busy.get(&slot).or_else(|| self.idle.peek(&slot))
    }

    fn peek_mut(&mut self, slot: Slot) -> Option<&mut Entry> {
        match self.busy.get_mut(&slot) {
            Some(e) => Some(e),
            None => self.idle.peek_mut(&slot),
        }
    }

    /// A read starts. An unknown resource gets a placeholder entry now, so that a write starting
    /// during the read is seen at its end. `If-None-Match` (weak comparison) is evaluated here.
    pub fn begin_read(
        &mut self,
        key: &ResourceKey,
        if_none_match: Option<&IfNoneMatch>,
    ) -> ReadStart {
        let slot = Slot::of(key);
        // `get` promotes an idle entry in the LRU: reads keep resources alive.
        if !self.busy.contains_key(&slot) && self.idle.get(&slot).is_none() {
            let version = self.next_version();
            self.keep_idle(slot, Entry::new(version));
        }
        let entry = self.peek(slot).expect("inserted above");
        plan_read(
            ReadTicket {
                key: key.clone(),
                version: entry.version,
            },
            entry.etag(),
            entry.settled(),
            entry.backend(),
            if_none_match,
        )
    }

    /// A read's answer arrived. Returns the etag that names the body just read, or `None` when a
    /// write overlapped the read (the body may be older or newer than any etag). If the backend's
    /// validator differs from the one recorded, the resource changed behind the gateway: the etag is
    /// rotated first, so the one from before stops matching. A 404/410 is evidence too: the resource
    /// is gone, whatever etag the table held stops matching. Other answers change nothing.
    pub fn finish_read(&mut self, ticket: &ReadTicket, answer: ReadAnswer) -> Option<Etag> {
        let slot = Slot::of(&ticket.key);
        let entry = self.peek(slot)?;
        let untouched = entry.version == ticket.version && entry.settled();
        let validator = match answer {
            ReadAnswer::Found(validator) if untouched => validator,
            ReadAnswer::Gone if untouched && entry.etag().is_some() => {
                let version = self.next_version();
                self.peek_mut(slot)?.forget_state(version);
                return None;
            }
            // Non-2xx answers create no entry: drop the placeholder this read made.
            ReadAnswer::Gone | ReadAnswer::Failed if untouched && entry.etag().is_none() => {
                self.idle.pop(&slot);
                return None;
            }
            _ => return None,
        };
        let changed_behind =
            !entry.backend().is_empty() && !validator.is_empty() && *entry.backend() != validator;
        let version = self.next_version();
        let entry = self.peek_mut(slot)?;
        if changed_behind {
            entry.set_etag(Some(Etag::fresh()));
            entry.version = version;
        }
        if !validator.is_empty() {
            entry.set_backend(validator);
        }
        // Concurrent readers of one unchanged state share the etag: naming it changes no version.
        let etag = entry.etag().unwrap_or_else(Etag::fresh);
        entry.set_etag(Some(etag));
        Some(etag)
    }

    /// Evaluates `If-Match` for a request that changes nothing (GET, HEAD): true only if it names the
    /// current state and no write is in flight.
    pub fn check(&self, key: &ResourceKey, precondition: &IfMatch) -> Result<(), Refusal> {
        let entry = self.peek(Slot::of(key));
        let settled = entry.is_some_and(Entry::settled);
        let current = entry.and_then(Entry::etag);
        if settled && precondition.is_satisfied_by(current.as_ref()) {
            Ok(())
        } else {
            Err(Refusal { current })
        }
    }

    /// Evaluates the preconditions (RFC 9110 §13.2.2 order) and reserves the write, in one step.
    /// A write without precondition (last write wins) always passes. Once reserved, the current etag
    /// stops matching until the write is settled.
    pub fn reserve_write(
        &mut self,
        key: &ResourceKey,
        pre: &Preconditions,
    ) -> Result<Reservation, Refusal> {
        const UNKNOWN: BackendValidator = BackendValidator {
            etag: None,
            last_modified: None,
        };
        let slot = Slot::of(key);
        let (current, settled, backend) = match self.peek(slot) {
            Some(e) => (e.etag(), e.settled(), e.backend()),
            None => (None, true, &UNKNOWN),
        };
        let refuse = Err(Refusal { current });
        // Whether the precondition named the state the table knows (then the backend's validator of
        // that state can go along).
        let mut named_state = false;
        if let Some(if_match) = &pre.if_match {
            if !(settled && if_match.is_satisfied_by(current.as_ref())) {
                return refuse;
            }
            named_state = true;
        } else if let Some(since) = pre.if_unmodified_since {
            match backend.last_modified {
                // Unknown Last-Modified: the header goes to the backend, which evaluates it itself.
                None => {}
                Some(_) if !settled || current.is_none() => return refuse,
                Some(modified) if modified > since => return refuse,
                Some(_) => named_state = true,
            }
        }
        let mut probe_existence = false;
        if let Some(if_none_match) = &pre.if_none_match {
            if !settled || if_none_match.matches_weakly(current.as_ref()) {
                return refuse;
            }
            // `*` and no etag: the gateway does not know whether the resource exists.
            probe_existence = if_none_match.is_any();
        }
        let backend_precondition = (named_state && !backend.is_empty()).then(|| backend.clone());

        let version = self.next_version();
        let mut entry = match self.busy.remove(&slot) {
            Some(e) => e,
            None => self.idle.pop(&slot).unwrap_or(Entry::new(version)),
        };
        let etag_before = entry.etag();
        entry.set_etag(None);
        entry.version = version;
        entry.writes_in_flight += 1;
        self.busy.insert(slot, entry);
        Ok(Reservation {
            ticket: WriteTicket {
                key: key.clone(),
                version,
                etag_before,
            },
            probe_existence,
            backend_precondition,
        })
    }

    /// Records what became of a reserved write, with the backend's validator from its answer. Returns
    /// the etag to give the client: the new one, only when no other change came after this write's
    /// reservation (otherwise nobody can tell which state the backend ended in, and no etag is handed
    /// out). If an earlier write is still in flight, the etag matches nothing until that one settles,
    /// and is dropped if it turns out to have applied.
    pub fn settle_write(
        &mut self,
        ticket: WriteTicket,
        outcome: WriteOutcome,
        validator: BackendValidator,
    ) -> Option<Etag> {
        let version = self.next_version();
        let slot = Slot::of(&ticket.key);
        let Some(entry) = self.busy.get_mut(&slot) else {
            // Unreachable while tickets are settled once; refusing to guess is the safe answer.
            debug_assert!(false, "settling a write that is not in flight");
            return None;
        };
        entry.writes_in_flight -= 1;
        let alone = entry.version == ticket.version;
        let handed_out = match outcome {
            WriteOutcome::Applied(new) if alone => {
                entry.set_etag(Some(new));
                entry.set_backend(validator);
                Some(new)
            }
            WriteOutcome::NotApplied if alone => {
                entry.set_etag(ticket.etag_before);
                None
            }
            // Another change overlapped: the write that did not happen leaves the other's result alone.
            WriteOutcome::NotApplied => None,
            // Applied alongside others, applied to an unnamed state, unknown, or changed behind the
            // gateway: a state nobody holds an etag for. Never put the old etag back.
            WriteOutcome::Applied(_)
            | WriteOutcome::AppliedUnnamed
            | WriteOutcome::Unknown
            | WriteOutcome::ChangedBehind => {
                entry.set_etag(None);
                entry.backend = None;
                None
            }
        };
        entry.version = version;
        if entry.settled() {
            if let Some(entry) = self.busy.remove(&slot) {
                self.keep_idle(slot, entry);
            }
        }
        if !matches!(
            outcome,
            WriteOutcome::NotApplied | WriteOutcome::ChangedBehind
        ) {
            self.collection_changed(&ticket.key);
        }
        handed_out
    }

    /// A write created a resource (POST answered with `Location`): its state is what the write sent,
    /// so it gets an etag now. `None` if that resource has writes of its own in flight.
    pub fn register_created(
        &mut self,
        key: &ResourceKey,
        validator: BackendValidator,
    ) -> Option<Etag> {
        let version = self.next_version();
        let slot = Slot::of(key);
        if self.busy.contains_key(&slot) {
            return None;
        }
        let etag = Etag::fresh();
        let mut entry = self.idle.pop(&slot).unwrap_or(Entry::new(version));
        entry.set_etag(Some(etag));
        entry.version = version;
        entry.set_backend(validator);
        self.keep_idle(slot, entry);
        Some(etag)
    }

    /// The etag handed out for an applied write cannot be trusted after all (its answer broke off):
    /// unless something else changed the entry since, it names no state any more.
    pub fn withdraw(&mut self, key: &ResourceKey, etag: Etag) {
        let version = self.next_version();
        if let Some(entry) = self.peek_mut(Slot::of(key)) {
            if entry.etag() == Some(etag) {
                entry.forget_state(version);
            }
        }
    }

    /// The idle entries with an etag, most recently used last (for a snapshot at a clean stop).
    /// Entries with a write in flight are left out: their state is unknown.
    pub fn export(&self) -> Vec<(Slot, Etag, BackendValidator)> {
        self.idle
            .iter()
            .rev()
            .filter_map(|(k, e)| e.etag().map(|etag| (*k, etag, e.backend().clone())))
            .collect()
    }

    /// Loads entries (from a snapshot) into an empty table, in order (the last becomes the most
    /// recently used).
    pub fn import(&mut self, entries: impl IntoIterator<Item = (Slot, Etag, BackendValidator)>) {
        for (key, etag, backend) in entries {
            let version = self.next_version();
            let mut entry = Entry::new(version);
            entry.set_etag(Some(etag));
            entry.set_backend(backend);
            self.keep_idle(key, entry);
        }
    }

    /// The resources with a write in flight or held: their state is not known yet.
    pub fn busy_slots(&self) -> Vec<Slot> {
        self.busy.keys().copied().collect()
    }

    /// Locks a resource as if a write to it were in flight (a hold carried over a restart): reads
    /// get no etag and conditional writes are refused until [`EtagTable::release_held`].
    pub fn hold(&mut self, slot: Slot) {
        let version = self.next_version();
        let mut entry = self
            .idle
            .pop(&slot)
            .or_else(|| self.busy.remove(&slot))
            .unwrap_or_else(|| Entry::new(version));
        entry.forget_state(version);
        entry.writes_in_flight += 1;
        self.busy.insert(slot, entry);
    }

    /// Ends a hold like a write settled as unknown: a state nobody holds an etag for.
    pub fn release_held(&mut self, slot: Slot) {
        let version = self.next_version();
        let Some(entry) = self.busy.get_mut(&slot) else {
            return;
        };
        entry.writes_in_flight = entry.writes_in_flight.saturating_sub(1);
        entry.forget_state(version);
        if entry.settled() {
            if let Some(entry) = self.busy.remove(&slot) {
                self.keep_idle(slot, entry);
            }
        }
    }

    /// What the table holds for a resource (admin API).
    pub fn describe(&self, key: &ResourceKey) -> Option<EntryState> {
        self.peek(Slot::of(key)).map(|e| EntryState {
            etag: e.etag(),
            writes_in_flight: e.writes_in_flight,
            backend: e.backend().clone(),
        })
    }

    /// Forgets the current etag (admin invalidation): it stops matching; the next read names the
    /// state with a fresh one.
    pub fn invalidate(&mut self, key: &ResourceKey) {
        let version = self.next_version();
        if let Some(entry) = self.peek_mut(Slot::of(key)) {
            entry.forget_state(version);
        }
    }

    /// A member of a collection may have changed, so the listings that contain it did: the etags of
    /// its parent and of every ancestor go (a backend may list nested members; when unsure, merge).
    fn collection_changed(&mut self, member: &ResourceKey) {
        let mut ancestor = member.parent();
        while let Some(key) = ancestor {
            let version = self.next_version();
            if let Some(entry) = self.peek_mut(Slot::of(&key)) {
                entry.forget_state(version);
            }
            ancestor = key.parent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precondition::{EntityTag, IfMatch, TagSet};

    fn table(capacity: usize) -> EtagTable {
        EtagTable::new(NonZeroUsize::new(capacity).unwrap())
    }

    fn key(p: &str) -> ResourceKey {
        ResourceKey::from_path(p)
    }

    fn if_match(e: Etag) -> IfMatch {
        IfMatch::Tags(vec![EntityTag {
            weak: false,
            opaque: e.to_string(),
        }])
    }

    fn none() -> BackendValidator {
        BackendValidator::default()
    }

    fn backend_etag(v: &str) -> BackendValidator {
        BackendValidator {
            etag: Some(v.to_string()),
            last_modified: None,
        }
    }

    fn begin(t: &mut EtagTable, k: &ResourceKey) -> ReadTicket {
        match t.begin_read(k, None) {
            ReadStart::Forward {
                ticket,
                revalidate: None,
            } => ticket,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn pre(if_match: Option<Etag>) -> Preconditions {
        Preconditions {
            if_match: if_match.map(self::if_match),
            ..Preconditions::default()
        }
    }

    fn reserve(
        t: &mut EtagTable,
        k: &ResourceKey,
        if_match: Option<Etag>,
    ) -> Result<WriteTicket, Refusal> {
        t.reserve_write(k, &pre(if_match)).map(|r| r.ticket)
    }

    /// A GET that the backend answers 200, with nothing else going on.
    fn read(t: &mut EtagTable, k: &ResourceKey) -> Option<Etag> {
        let ticket = begin(t, k);
        t.finish_read(&ticket, ReadAnswer::Found(none()))
    }

    fn write(
        t: &mut EtagTable,
        k: &ResourceKey,
        pre: Option<Etag>,
    ) -> Result<Option<Etag>, Refusal> {
        let ticket = reserve(t, k, pre)?;
        Ok(t.settle_write(ticket, WriteOutcome::Applied(Etag::fresh()), none()))
    }

    #[test]
    fn a_hold_carried_over_a_restart_locks_the_resource_until_released() {
        let mut t = table(10);
        let k = key("/docs/held");
        let old = read(&mut t, &k).unwrap();
        t.hold(Slot::of(&k));
        assert_eq!(t.busy_slots(), vec![Slot::of(&k)]);
        assert!(reserve(&mut t, &k, Some(old)).is_err(), "old etag refused");
        assert_eq!(read(&mut t, &k), None, "no etag while held");
        // A resource the table never saw can be held too (the snapshot names slots only).
        let other = key("/docs/never-read");
        t.hold(Slot::of(&other));
        assert_eq!(read(&mut t, &other), None);

        t.release_held(Slot::of(&k));
        t.release_held(Slot::of(&other));
        assert!(t.busy_slots().is_empty());
        let fresh = read(&mut t, &k).expect("an etag again after the hold");
        assert_ne!(fresh, old);
        assert!(read(&mut t, &other).is_some());
        // Releasing what is not held changes nothing.
        t.release_held(Slot::of(&k));
        assert_eq!(t.current(&k), Some(fresh));
    }

    #[test]
    fn first_read_creates_an_etag_that_later_reads_repeat() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e = read(&mut t, &k).unwrap();
        assert_eq!(read(&mut t, &k), Some(e));
        assert_eq!(t.current(&k), Some(e));
    }

    #[test]
    fn non_2xx_read_creates_no_entry() {
        let mut t = table(10);
        let k = key("/docs/missing");
        let ticket = begin(&mut t, &k);
        assert_eq!(t.finish_read(&ticket, ReadAnswer::Gone), None);
        assert!(t.is_empty());
    }

    #[test]
    fn matching_write_gets_new_etag_and_old_one_stops_matching() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let e1 = write(&mut t, &k, Some(e0)).unwrap().unwrap();
        assert_ne!(e0, e1);
        assert_eq!(t.current(&k), Some(e1));
        assert_eq!(
            write(&mut t, &k, Some(e0)),
            Err(Refusal { current: Some(e1) })
        );
    }

    #[test]
    fn reservation_is_exclusive_while_in_flight() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let first = reserve(&mut t, &k, Some(e0)).unwrap();
        // the same etag again, while the first is in flight
        assert_eq!(
            reserve(&mut t, &k, Some(e0)).unwrap_err(),
            Refusal { current: None }
        );
        // a read overlapping the write gets no etag
        let r = begin(&mut t, &k);
        assert_eq!(t.finish_read(&r, ReadAnswer::Found(none())), None);
        let e1 = Etag::fresh();
        assert_eq!(
            t.settle_write(first, WriteOutcome::Applied(e1), none()),
            Some(e1)
        );
        assert_eq!(read(&mut t, &k), Some(e1));
    }

    #[test]
    fn read_that_a_write_overlapped_gets_no_etag() {
        let mut t = table(10);
        let k = key("/docs/a");
        read(&mut t, &k);
        let r = begin(&mut t, &k);
        write(&mut t, &k, None).unwrap();
        assert_eq!(t.finish_read(&r, ReadAnswer::Found(none())), None);
    }

    #[test]
    fn refused_write_puts_the_old_etag_back() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let w = reserve(&mut t, &k, Some(e0)).unwrap();
        assert_eq!(t.settle_write(w, WriteOutcome::NotApplied, none()), None);
        assert_eq!(t.current(&k), Some(e0));
        assert!(write(&mut t, &k, Some(e0)).is_ok());
    }

    #[test]
    fn unknown_outcome_leaves_an_etag_nobody_holds() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let w = reserve(&mut t, &k, Some(e0)).unwrap();
        assert_eq!(t.settle_write(w, WriteOutcome::Unknown, none()), None);
        assert!(write(&mut t, &k, Some(e0)).is_err());
        let e1 = read(&mut t, &k).unwrap();
        assert_ne!(e0, e1);
    }

    #[test]
    fn overlapping_unconditional_writes_hand_out_no_etag() {
        let mut t = table(10);
        let k = key("/docs/a");
        let w1 = reserve(&mut t, &k, None).unwrap();
        let w2 = reserve(&mut t, &k, None).unwrap();
        // w2 was the last change, but w1 is still in flight: its etag cannot match yet
        let e2 = t
            .settle_write(w2, WriteOutcome::Applied(Etag::fresh()), none())
            .unwrap();
        assert!(t.check(&k, &if_match(e2)).is_err());
        // w1 may have reached the backend after w2: nobody can tell which state is there now
        assert_eq!(
            t.settle_write(w1, WriteOutcome::Applied(Etag::fresh()), none()),
            None
        );
        assert_eq!(t.current(&k), None);
        assert!(t.check(&k, &if_match(e2)).is_err());
    }

    #[test]
    fn refused_write_does_not_restore_over_a_later_change() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let w1 = reserve(&mut t, &k, Some(e0)).unwrap();
        let w2 = reserve(&mut t, &k, None).unwrap();
        let e2 = t
            .settle_write(w2, WriteOutcome::Applied(Etag::fresh()), none())
            .unwrap();
        assert_eq!(t.settle_write(w1, WriteOutcome::NotApplied, none()), None);
        // w1 did not happen, so w2's state is what the backend holds
        assert_eq!(t.current(&k), Some(e2));
        assert!(write(&mut t, &k, Some(e0)).is_err());
    }

    #[test]
    fn unknown_resource_matches_no_precondition() {
        let mut t = table(10);
        let k = key("/docs/never");
        assert_eq!(
            write(&mut t, &k, Some(Etag::fresh())),
            Err(Refusal { current: None })
        );
        let any = Preconditions {
            if_match: Some(TagSet::Any),
            ..Preconditions::default()
        };
        assert!(t.reserve_write(&k, &any).is_err());
        assert!(t.is_empty());
    }

    #[test]
    fn delete_leaves_no_etag_to_match() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let w = reserve(&mut t, &k, Some(e0)).unwrap();
        assert_eq!(
            t.settle_write(w, WriteOutcome::AppliedUnnamed, none()),
            None
        );
        assert!(write(&mut t, &k, Some(e0)).is_err());
        // a later 404 removes the entry altogether
        let r = begin(&mut t, &k);
        assert_eq!(t.finish_read(&r, ReadAnswer::Gone), None);
        assert!(t.is_empty());
    }

    #[test]
    fn eviction_forgets_idle_entries_only() {
        let mut t = table(2);
        let a = key("/a");
        let ea = read(&mut t, &a).unwrap();
        let w = reserve(&mut t, &a, Some(ea)).unwrap();
        // fill the LRU well past capacity while /a is in flight
        for i in 0..10 {
            read(&mut t, &key(&format!("/x{i}")));
        }
        assert_eq!(t.len(), 3, "2 idle + 1 busy");
        let r = begin(&mut t, &a);
        assert_eq!(
            t.finish_read(&r, ReadAnswer::Found(none())),
            None,
            "still in flight"
        );
        let e1 = Etag::fresh();
        assert_eq!(
            t.settle_write(w, WriteOutcome::Applied(e1), none()),
            Some(e1)
        );
        // an evicted entry is unknown: its old etag conflicts
        let b = key("/b");
        let eb = read(&mut t, &b).unwrap();
        read(&mut t, &key("/y1"));
        read(&mut t, &key("/y2"));
        assert_eq!(t.current(&b), None);
        assert_eq!(write(&mut t, &b, Some(eb)), Err(Refusal { current: None }));
    }

    #[test]
    fn read_whose_entry_was_evicted_meanwhile_gets_no_etag() {
        let mut t = table(1);
        let a = key("/a");
        let r = begin(&mut t, &a);
        read(&mut t, &key("/b")); // evicts /a's placeholder
        assert_eq!(t.finish_read(&r, ReadAnswer::Found(none())), None);
    }

    #[test]
    fn a_write_changes_the_collection_etag() {
        let mut t = table(10);
        let docs = key("/docs");
        let ec = read(&mut t, &docs).unwrap();
        write(&mut t, &key("/docs/b"), None).unwrap();
        assert_eq!(t.current(&docs), None);
        let ec2 = read(&mut t, &docs).unwrap();
        assert_ne!(ec, ec2);
        // a refused write changes nothing
        let w = reserve(&mut t, &key("/docs/b"), None).unwrap();
        t.settle_write(w, WriteOutcome::NotApplied, none());
        assert_eq!(t.current(&docs), Some(ec2));
    }

    #[test]
    fn withdrawn_etag_stops_matching_but_a_later_one_survives() {
        let mut t = table(10);
        let k = key("/a");
        let e1 = write(&mut t, &k, None).unwrap().unwrap();
        t.withdraw(&k, e1);
        assert_eq!(t.current(&k), None);
        let e2 = write(&mut t, &k, None).unwrap().unwrap();
        t.withdraw(&k, e1);
        assert_eq!(t.current(&k), Some(e2));
    }

    #[test]
    fn check_evaluates_without_reserving() {
        let mut t = table(10);
        let k = key("/a");
        let e = read(&mut t, &k).unwrap();
        assert!(t.check(&k, &if_match(e)).is_ok());
        assert!(t.check(&k, &if_match(e)).is_ok());
        assert!(t.check(&k, &if_match(Etag::fresh())).is_err());
        assert!(t.check(&k, &IfMatch::Any).is_ok());
    }

    fn inm(e: Etag) -> TagSet {
        TagSet::Tags(vec![EntityTag {
            weak: true,
            opaque: e.to_string(),
        }])
    }

    #[test]
    fn if_none_match_answers_304_from_the_table_when_the_backend_has_no_validator() {
        let mut t = table(10);
        let k = key("/a");
        let e = read(&mut t, &k).unwrap();
        match t.begin_read(&k, Some(&inm(e))) {
            ReadStart::NotModified(got) => assert_eq!(got, e),
            other => panic!("{other:?}"),
        }
        // another etag: forward without revalidation
        assert!(matches!(
            t.begin_read(&k, Some(&inm(Etag::fresh()))),
            ReadStart::Forward {
                revalidate: None,
                ..
            }
        ));
        // while a write is in flight the table cannot know
        let w = reserve(&mut t, &k, None).unwrap();
        assert!(matches!(
            t.begin_read(&k, Some(&inm(e))),
            ReadStart::Forward {
                revalidate: None,
                ..
            }
        ));
        t.settle_write(w, WriteOutcome::NotApplied, none());
    }

    #[test]
    fn with_a_backend_validator_the_read_is_revalidated_with_it() {
        let mut t = table(10);
        let k = key("/a");
        let r = begin(&mut t, &k);
        let e = t
            .finish_read(&r, ReadAnswer::Found(backend_etag("\"rev-1\"")))
            .unwrap();
        match t.begin_read(&k, Some(&inm(e))) {
            ReadStart::Forward {
                ticket,
                revalidate: Some(v),
            } => {
                assert_eq!(v, backend_etag("\"rev-1\""));
                // the backend answers 304 with the same validator: same etag
                assert_eq!(
                    t.finish_read(&ticket, ReadAnswer::Found(backend_etag("\"rev-1\""))),
                    Some(e)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_change_behind_the_gateway_rotates_the_etag() {
        let mut t = table(10);
        let k = key("/a");
        let r = begin(&mut t, &k);
        let e1 = t
            .finish_read(&r, ReadAnswer::Found(backend_etag("\"rev-1\"")))
            .unwrap();
        let r = begin(&mut t, &k);
        let e2 = t
            .finish_read(&r, ReadAnswer::Found(backend_etag("\"rev-9\"")))
            .unwrap();
        assert_ne!(e1, e2);
        assert_eq!(
            write(&mut t, &k, Some(e1)),
            Err(Refusal { current: Some(e2) })
        );
        // an answer without validator is no evidence of change
        let r = begin(&mut t, &k);
        assert_eq!(t.finish_read(&r, ReadAnswer::Found(none())), Some(e2));
    }

    #[test]
    fn the_backend_validator_goes_along_with_a_conditional_write() {
        let mut t = table(10);
        let k = key("/a");
        let r = begin(&mut t, &k);
        let e1 = t
            .finish_read(&r, ReadAnswer::Found(backend_etag("\"rev-1\"")))
            .unwrap();
        let reservation = t.reserve_write(&k, &pre(Some(e1))).unwrap();
        assert_eq!(
            reservation.backend_precondition,
            Some(backend_etag("\"rev-1\""))
        );
        // the backend refused it: changed behind the gateway, nobody's etag is current
        t.settle_write(reservation.ticket, WriteOutcome::ChangedBehind, none());
        assert_eq!(t.current(&k), None);
        // an unconditional write sends no backend precondition
        let reservation = t.reserve_write(&k, &pre(None)).unwrap();
        assert_eq!(reservation.backend_precondition, None);
        // the validator from a write's answer is recorded with its etag
        let e2 = t
            .settle_write(
                reservation.ticket,
                WriteOutcome::Applied(Etag::fresh()),
                backend_etag("\"rev-2\""),
            )
            .unwrap();
        let r = t.reserve_write(&k, &pre(Some(e2))).unwrap();
        assert_eq!(r.backend_precondition, Some(backend_etag("\"rev-2\"")));
    }

    #[test]
    fn create_only_refuses_a_known_resource_and_probes_an_unknown_one() {
        let mut t = table(10);
        let create = Preconditions {
            if_none_match: Some(TagSet::Any),
            ..Preconditions::default()
        };
        let known = key("/known");
        read(&mut t, &known).unwrap();
        assert!(t.reserve_write(&known, &create).is_err());
        let unknown = key("/unknown");
        let r = t.reserve_write(&unknown, &create).unwrap();
        assert!(r.probe_existence);
        // while the probe runs, the reservation keeps a second creator out
        assert!(t.reserve_write(&unknown, &create).is_err());
        t.settle_write(r.ticket, WriteOutcome::NotApplied, none());
    }

    #[test]
    fn if_unmodified_since_uses_the_backend_last_modified() {
        let mut t = table(10);
        let k = key("/a");
        let modified = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let r = begin(&mut t, &k);
        t.finish_read(
            &r,
            ReadAnswer::Found(BackendValidator {
                etag: None,
                last_modified: Some(modified),
            }),
        );
        let since = |secs| Preconditions {
            if_unmodified_since: Some(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            ),
            ..Preconditions::default()
        };
        assert!(t.reserve_write(&k, &since(999_999)).is_err());
        let ok = t.reserve_write(&k, &since(1_000_000)).unwrap();
        assert!(ok.backend_precondition.is_some());
        t.settle_write(ok.ticket, WriteOutcome::NotApplied, none());
        // unknown Last-Modified: let the backend evaluate it
        let other = key("/b");
        let r = t.reserve_write(&other, &since(1)).unwrap();
        assert_eq!(r.backend_precondition, None);
    }

    #[test]
    fn a_created_resource_gets_an_etag() {
        let mut t = table(10);
        let k = key("/docs/new");
        let e = t.register_created(&k, none()).unwrap();
        assert_eq!(t.current(&k), Some(e));
        assert!(write(&mut t, &k, Some(e)).is_ok());
    }

    #[test]
    fn a_404_makes_the_etag_stop_matching() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e = read(&mut t, &k).unwrap();
        let r = begin(&mut t, &k);
        assert_eq!(t.finish_read(&r, ReadAnswer::Gone), None);
        assert_eq!(t.current(&k), None);
        assert!(write(&mut t, &k, Some(e)).is_err());
        // a failed read (5xx) is no evidence: the etag stays
        let e2 = read(&mut t, &k).unwrap();
        let r = begin(&mut t, &k);
        assert_eq!(t.finish_read(&r, ReadAnswer::Failed), None);
        assert_eq!(t.current(&k), Some(e2));
    }

    #[test]
    fn a_write_changes_every_ancestor_listing() {
        let mut t = table(10);
        let docs = key("/docs");
        let root = key("/");
        let ed = read(&mut t, &docs).unwrap();
        let er = read(&mut t, &root).unwrap();
        write(&mut t, &key("/docs/y/z"), None).unwrap();
        assert_eq!(t.current(&docs), None);
        assert_eq!(t.current(&root), None);
        assert!(write(&mut t, &docs, Some(ed)).is_err());
        assert!(write(&mut t, &root, Some(er)).is_err());
    }

    #[test]
    fn invalidation_makes_the_etag_stop_matching() {
        let mut t = table(10);
        let k = key("/a");
        let e = read(&mut t, &k).unwrap();
        assert_eq!(t.describe(&k).unwrap().etag, Some(e));
        t.invalidate(&k);
        assert_eq!(t.describe(&k).unwrap().etag, None);
        assert!(write(&mut t, &k, Some(e)).is_err());
        assert_ne!(read(&mut t, &k), Some(e));
        assert_eq!(t.describe(&key("/never")), None);
    }

    #[test]
    fn export_and_import_keep_idle_etags_only() {
        let mut t = table(10);
        let a = key("/a");
        let b = key("/b");
        let ea = read(&mut t, &a).unwrap();
        let eb = read(&mut t, &b).unwrap();
        let busy = reserve(&mut t, &b, Some(eb)).unwrap();
        let exported = t.export();
        assert_eq!(exported, vec![(Slot::of(&a), ea, none())]);
        let mut fresh = table(10);
        fresh.import(exported);
        assert!(write(&mut fresh, &a, Some(ea)).is_ok());
        assert!(write(&mut fresh, &b, Some(eb)).is_err());
        t.settle_write(busy, WriteOutcome::NotApplied, none());
    }

    #[test]
    fn an_entry_stays_small() {
        // Memory per resource is the table's cost at scale (see BENCHMARKS.md): key 16 bytes, entry
        // 48, the LRU's two pointers: an 80-byte node (an allocator size class), plus the hash
        // table's slot.
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        assert!(
            std::mem::size_of::<Entry>() <= 48,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn the_nil_etag_a_client_sends_matches_nothing() {
        // Inside an entry, the nil UUID stands for "no etag": it must read as none, never as a match.
        let nil = Etag::parse("00000000-0000-0000-0000-000000000000").unwrap();
        let mut t = table(10);
        let k = key("/a");
        let r = begin(&mut t, &k); // a placeholder entry, no etag yet
        assert_eq!(t.current(&k), None);
        assert_eq!(write(&mut t, &k, Some(nil)), Err(Refusal { current: None }));
        assert!(t.check(&k, &if_match(nil)).is_err());
        assert_eq!(t.describe(&k).unwrap().etag, None);
        let e = t.finish_read(&r, ReadAnswer::Found(none())).unwrap();
        assert_ne!(e, nil);
        assert!(write(&mut t, &k, Some(nil)).is_err());
        // a nil etag put in an entry (a hand-made snapshot) is no etag
        let mut fresh = table(10);
        fresh.import([(Slot::of(&k), nil, none())]);
        assert_eq!(fresh.current(&k), None);
        assert!(write(&mut fresh, &k, Some(nil)).is_err());
    }

    #[test]
    fn the_least_recently_used_idle_entry_is_evicted_first() {
        let mut t = table(3);
        let keys: Vec<ResourceKey> = (0..4).map(|i| key(&format!("/e{i}"))).collect();
        let etags: Vec<Etag> = keys[..3].iter().map(|k| read(&mut t, k).unwrap()).collect();
        // /e0 is read again: /e1 is now the least recently used
        assert_eq!(read(&mut t, &keys[0]), Some(etags[0]));
        read(&mut t, &keys[3]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.current(&keys[1]), None, "evicted");
        assert_eq!(t.current(&keys[0]), Some(etags[0]));
        assert_eq!(t.current(&keys[2]), Some(etags[2]));
        assert_eq!(
            write(&mut t, &keys[1], Some(etags[1])),
            Err(Refusal { current: None })
        );
    }
}
