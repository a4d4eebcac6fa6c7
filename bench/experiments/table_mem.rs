//! RSS per entry of the etag table alone, and the cost of a read step and of a write step at that
//! size: table_mem <capacity> <entries>
use etag_gateway::etag::Etag;
use etag_gateway::precondition::{EntityTag, Preconditions, TagSet};
use etag_gateway::resource_key::ResourceKey;
use etag_gateway::table::{BackendValidator, EtagTable, ReadAnswer, ReadStart, WriteOutcome};
use std::num::NonZeroUsize;
use std::time::Instant;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

fn read(t: &mut EtagTable, k: &ResourceKey) {
    if let ReadStart::Forward { ticket, .. } = t.begin_read(k, None) {
        t.finish_read(&ticket, ReadAnswer::Found(BackendValidator::default()));
    }
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (cap, n) = (a[0], a[1]);
    let r0 = rss_kb();
    let mut t = EtagTable::new(NonZeroUsize::new(cap).unwrap());
    let r1 = rss_kb();
    for i in 0..n {
        read(&mut t, &ResourceKey::from_path(&format!("/r/{i}")));
    }
    let r2 = rss_kb();
    // a read step (begin_read + finish_read) on existing entries, scattered order
    let keys: Vec<ResourceKey> = (0..200_000usize)
        .map(|k| ResourceKey::from_path(&format!("/r/{}", (k * 104729) % n)))
        .collect();
    let start = Instant::now();
    for k in &keys {
        read(&mut t, k);
    }
    let read_ns = start.elapsed().as_nanos() as f64 / keys.len() as f64;
    // a conditional write step (reserve_write with the current etag + settle_write applied) on the
    // same entries; the preconditions are made before the clock starts
    let pres: Vec<Preconditions> = keys
        .iter()
        .map(|k| Preconditions {
            if_match: t.current(k).map(|e| {
                TagSet::Tags(vec![EntityTag {
                    weak: false,
                    opaque: e.to_string(),
                }])
            }),
            ..Preconditions::default()
        })
        .collect();
    let start = Instant::now();
    let mut passed = 0;
    for (k, pre) in keys.iter().zip(&pres) {
        if let Ok(r) = t.reserve_write(k, pre) {
            passed += 1;
            t.settle_write(
                r.ticket,
                WriteOutcome::Applied(Etag::fresh()),
                BackendValidator::default(),
            );
        }
    }
    let write_ns = start.elapsed().as_nanos() as f64 / keys.len() as f64;
    println!(
        "capacity {cap} entries {} : empty table {} kB, filled +{} kB = {:.1} B/entry (incl. table alloc: {:.1}); read step {:.0} ns; write step {:.0} ns ({passed} passed)",
        t.len(),
        r1 - r0,
        r2 - r1,
        (r2 - r1) as f64 * 1024.0 / n as f64,
        (r2 - r0) as f64 * 1024.0 / n as f64,
        read_ns,
        write_ns
    );
}
