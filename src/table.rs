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

use crate::etag::Etag;
use crate::precondition::IfMatch;
use crate::resource_key::ResourceKey;
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;

#[derive(Debug, Clone)]
struct Entry {
    /// The etag the gateway vouches for; `None`: no state it can name (never read, deleted, unknown
    /// outcome, or a write in flight). Nothing matches `None`.
    etag: Option<Etag>,
    /// Changes on every change of the entry; unique across the table's life (taken from one counter),
    /// so a re-created entry never repeats an old version.
    version: u64,
    writes_in_flight: u32,
}

/// Taken when a read starts; tells at its end whether a write overlapped it.
#[derive(Debug, Clone)]
pub struct ReadTicket {
    pub key: ResourceKey,
    version: u64,
}

/// A reservation for one write; settle it exactly once.
#[derive(Debug)]
pub struct WriteTicket {
    pub key: ResourceKey,
    /// The entry's version right after this reservation.
    version: u64,
    /// The etag to put back if the write certainly did not happen.
    etag_before: Option<Etag>,
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
}

pub struct EtagTable {
    idle: LruCache<ResourceKey, Entry>,
    busy: HashMap<ResourceKey, Entry>,
    last_version: u64,
}

impl EtagTable {
    pub fn new(capacity: NonZeroUsize) -> EtagTable {
        EtagTable {
            idle: LruCache::new(capacity),
            busy: HashMap::new(),
            last_version: 0,
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The etag the table vouches for now, without touching recency.
    pub fn current(&self, key: &ResourceKey) -> Option<Etag> {
        self.peek(key).and_then(|e| e.etag)
    }

    fn peek(&self, key: &ResourceKey) -> Option<&Entry> {
        self.busy.get(key).or_else(|| self.idle.peek(key))
    }

    fn peek_mut(&mut self, key: &ResourceKey) -> Option<&mut Entry> {
        match self.busy.get_mut(key) {
            Some(e) => Some(e),
            None => self.idle.peek_mut(key),
        }
    }

    /// A read starts. An unknown resource gets a placeholder entry now, so that a write starting
    /// during the read is seen at its end.
    pub fn begin_read(&mut self, key: &ResourceKey) -> ReadTicket {
        let version = match self.busy.get(key) {
            Some(e) => e.version,
            None => match self.idle.get(key) {
                Some(e) => e.version,
                None => {
                    let version = self.next_version();
                    let placeholder = Entry {
                        etag: None,
                        version,
                        writes_in_flight: 0,
                    };
                    self.idle.push(key.clone(), placeholder);
                    version
                }
            },
        };
        ReadTicket {
            key: key.clone(),
            version,
        }
    }

    /// A read's answer arrived. For a 2xx answer, returns the etag that names the body just read, or
    /// `None` when a write overlapped the read (the body may be older or newer than any etag).
    /// A non-2xx answer creates no entry and returns `None`.
    pub fn finish_read(&mut self, ticket: &ReadTicket, answered_2xx: bool) -> Option<Etag> {
        let entry = self.peek(&ticket.key)?;
        let untouched = entry.version == ticket.version && entry.writes_in_flight == 0;
        if !answered_2xx {
            if untouched && entry.etag.is_none() {
                self.idle.pop(&ticket.key);
            }
            return None;
        }
        if !untouched {
            return None;
        }
        let entry = self.peek_mut(&ticket.key)?;
        // Concurrent readers of one unchanged state share the etag: naming it changes no version.
        Some(*entry.etag.get_or_insert_with(Etag::fresh))
    }

    /// Evaluates `If-Match` for a request that changes nothing (GET, HEAD): true only if it names the
    /// current state and no write is in flight.
    pub fn check(&self, key: &ResourceKey, precondition: &IfMatch) -> Result<(), Refusal> {
        let entry = self.peek(key);
        let settled = entry.is_some_and(|e| e.writes_in_flight == 0);
        let current = entry.and_then(|e| e.etag);
        if settled && precondition.is_satisfied_by(current.as_ref()) {
            Ok(())
        } else {
            Err(Refusal { current })
        }
    }

    /// Check and reserve in one step. With a precondition, the write passes only if it names the
    /// current etag and no write is in flight; without one (last write wins) it always passes. Either
    /// way, once reserved the current etag stops matching until the write is settled.
    pub fn reserve_write(
        &mut self,
        key: &ResourceKey,
        precondition: Option<&IfMatch>,
    ) -> Result<WriteTicket, Refusal> {
        if let Some(precondition) = precondition {
            self.check(key, precondition)?;
        }
        let mut entry = match self.busy.remove(key) {
            Some(e) => e,
            None => self.idle.pop(key).unwrap_or(Entry {
                etag: None,
                version: 0,
                writes_in_flight: 0,
            }),
        };
        let etag_before = entry.etag.take();
        entry.version = self.next_version();
        entry.writes_in_flight += 1;
        let version = entry.version;
        self.busy.insert(key.clone(), entry);
        Ok(WriteTicket {
            key: key.clone(),
            version,
            etag_before,
        })
    }

    /// Records what became of a reserved write. Returns the etag to give the client: the new one, only
    /// when no other change came after this write's reservation (otherwise nobody can tell which state
    /// the backend ended in, and no etag is handed out). If an earlier write is still in flight, the
    /// etag matches nothing until that one settles, and is dropped if it turns out to have applied.
    pub fn settle_write(&mut self, ticket: WriteTicket, outcome: WriteOutcome) -> Option<Etag> {
        let version = self.next_version();
        let Some(entry) = self.busy.get_mut(&ticket.key) else {
            // Unreachable while tickets are settled once; refusing to guess is the safe answer.
            debug_assert!(false, "settling a write that is not in flight");
            return None;
        };
        entry.writes_in_flight -= 1;
        let alone = entry.version == ticket.version;
        let handed_out = match outcome {
            WriteOutcome::Applied(new) if alone => {
                entry.etag = Some(new);
                Some(new)
            }
            WriteOutcome::NotApplied if alone => {
                entry.etag = ticket.etag_before;
                None
            }
            // Another change overlapped: the write that did not happen leaves the other's result alone.
            WriteOutcome::NotApplied => None,
            // Applied alongside others, applied to an unnamed state, or unknown: a state nobody holds
            // an etag for. Never put the old etag back: the backend may have changed.
            WriteOutcome::Applied(_) | WriteOutcome::AppliedUnnamed | WriteOutcome::Unknown => {
                entry.etag = None;
                None
            }
        };
        entry.version = version;
        if entry.writes_in_flight == 0 {
            if let Some(entry) = self.busy.remove(&ticket.key) {
                self.idle.push(ticket.key.clone(), entry);
            }
        }
        if outcome != WriteOutcome::NotApplied {
            self.collection_changed(&ticket.key);
        }
        handed_out
    }

    /// The etag handed out for an applied write cannot be trusted after all (its answer broke off):
    /// unless something else changed the entry since, it names no state any more.
    pub fn withdraw(&mut self, key: &ResourceKey, etag: Etag) {
        let version = self.next_version();
        if let Some(entry) = self.peek_mut(key) {
            if entry.etag == Some(etag) {
                entry.etag = None;
                entry.version = version;
            }
        }
    }

    /// A member of a collection may have changed, so the collection's listing did: its etag goes.
    fn collection_changed(&mut self, member: &ResourceKey) {
        let Some(parent) = member.parent() else {
            return;
        };
        let version = self.next_version();
        if let Some(entry) = self.peek_mut(&parent) {
            entry.etag = None;
            entry.version = version;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precondition::{EntityTag, IfMatch};

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

    /// A GET that the backend answers 200, with nothing else going on.
    fn read(t: &mut EtagTable, k: &ResourceKey) -> Option<Etag> {
        let ticket = t.begin_read(k);
        t.finish_read(&ticket, true)
    }

    fn write(
        t: &mut EtagTable,
        k: &ResourceKey,
        pre: Option<Etag>,
    ) -> Result<Option<Etag>, Refusal> {
        let im = pre.map(if_match);
        let ticket = t.reserve_write(k, im.as_ref())?;
        Ok(t.settle_write(ticket, WriteOutcome::Applied(Etag::fresh())))
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
        let ticket = t.begin_read(&k);
        assert_eq!(t.finish_read(&ticket, false), None);
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
        let first = t.reserve_write(&k, Some(&if_match(e0))).unwrap();
        // the same etag again, while the first is in flight
        assert_eq!(
            t.reserve_write(&k, Some(&if_match(e0))).unwrap_err(),
            Refusal { current: None }
        );
        // a read overlapping the write gets no etag
        let r = t.begin_read(&k);
        assert_eq!(t.finish_read(&r, true), None);
        let e1 = Etag::fresh();
        assert_eq!(t.settle_write(first, WriteOutcome::Applied(e1)), Some(e1));
        assert_eq!(read(&mut t, &k), Some(e1));
    }

    #[test]
    fn read_that_a_write_overlapped_gets_no_etag() {
        let mut t = table(10);
        let k = key("/docs/a");
        read(&mut t, &k);
        let r = t.begin_read(&k);
        write(&mut t, &k, None).unwrap();
        assert_eq!(t.finish_read(&r, true), None);
    }

    #[test]
    fn refused_write_puts_the_old_etag_back() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let w = t.reserve_write(&k, Some(&if_match(e0))).unwrap();
        assert_eq!(t.settle_write(w, WriteOutcome::NotApplied), None);
        assert_eq!(t.current(&k), Some(e0));
        assert!(write(&mut t, &k, Some(e0)).is_ok());
    }

    #[test]
    fn unknown_outcome_leaves_an_etag_nobody_holds() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let w = t.reserve_write(&k, Some(&if_match(e0))).unwrap();
        assert_eq!(t.settle_write(w, WriteOutcome::Unknown), None);
        assert!(write(&mut t, &k, Some(e0)).is_err());
        let e1 = read(&mut t, &k).unwrap();
        assert_ne!(e0, e1);
    }

    #[test]
    fn overlapping_unconditional_writes_hand_out_no_etag() {
        let mut t = table(10);
        let k = key("/docs/a");
        let w1 = t.reserve_write(&k, None).unwrap();
        let w2 = t.reserve_write(&k, None).unwrap();
        // w2 was the last change, but w1 is still in flight: its etag cannot match yet
        let e2 = t
            .settle_write(w2, WriteOutcome::Applied(Etag::fresh()))
            .unwrap();
        assert!(t.check(&k, &if_match(e2)).is_err());
        // w1 may have reached the backend after w2: nobody can tell which state is there now
        assert_eq!(
            t.settle_write(w1, WriteOutcome::Applied(Etag::fresh())),
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
        let w1 = t.reserve_write(&k, Some(&if_match(e0))).unwrap();
        let w2 = t.reserve_write(&k, None).unwrap();
        let e2 = t
            .settle_write(w2, WriteOutcome::Applied(Etag::fresh()))
            .unwrap();
        assert_eq!(t.settle_write(w1, WriteOutcome::NotApplied), None);
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
        assert!(t.reserve_write(&k, Some(&IfMatch::Any)).is_err());
        assert!(t.is_empty());
    }

    #[test]
    fn delete_leaves_no_etag_to_match() {
        let mut t = table(10);
        let k = key("/docs/a");
        let e0 = read(&mut t, &k).unwrap();
        let w = t.reserve_write(&k, Some(&if_match(e0))).unwrap();
        assert_eq!(t.settle_write(w, WriteOutcome::AppliedUnnamed), None);
        assert!(write(&mut t, &k, Some(e0)).is_err());
        // a later 404 removes the entry altogether
        let r = t.begin_read(&k);
        assert_eq!(t.finish_read(&r, false), None);
        assert!(t.is_empty());
    }

    #[test]
    fn eviction_forgets_idle_entries_only() {
        let mut t = table(2);
        let a = key("/a");
        let ea = read(&mut t, &a).unwrap();
        let w = t.reserve_write(&a, Some(&if_match(ea))).unwrap();
        // fill the LRU well past capacity while /a is in flight
        for i in 0..10 {
            read(&mut t, &key(&format!("/x{i}")));
        }
        assert_eq!(t.len(), 3, "2 idle + 1 busy");
        let r = t.begin_read(&a);
        assert_eq!(t.finish_read(&r, true), None, "still in flight");
        let e1 = Etag::fresh();
        assert_eq!(t.settle_write(w, WriteOutcome::Applied(e1)), Some(e1));
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
        let r = t.begin_read(&a);
        read(&mut t, &key("/b")); // evicts /a's placeholder
        assert_eq!(t.finish_read(&r, true), None);
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
        let w = t.reserve_write(&key("/docs/b"), None).unwrap();
        t.settle_write(w, WriteOutcome::NotApplied);
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
}
