//! The memory table across a clean restart.
//!
//! Written once, at a clean stop, after every request has finished or been settled as unknown (the
//! server has stopped by then, so nothing can change the table afterwards). Read once, at start, and
//! removed before the first request is served: a snapshot can be trusted only if nothing happened
//! after it. After a crash there is none, so every old etag is unknown (a conflict), never an older
//! table.
//!
//! Resources whose last write has no known outcome yet (its backend timed out and may still apply
//! it, or the stop cut it off) are written as *held*, with the time until which they must stay
//! locked: the next process keeps them busy (no etag handed out, conditional writes refused) until
//! then, as this one would have. Without that, it could name the state before a late write with a
//! fresh etag, and a write carrying that etag would overwrite the late one.
//!
//! Format: JSON lines. A header `{"format":"etag-gateway-snapshot","version":2}`, one line per entry,
//! one per held resource (`{"held":slot,"until_ms":unix ms}`), and a trailer with the counts; a file
//! without its trailer (cut short) is refused. Version 1 (no held lines) is still read.

use crate::etag::Etag;
use crate::table::{BackendValidator, Slot};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const FORMAT: &str = "etag-gateway-snapshot";
const VERSION: u32 = 2;
/// Versions this gateway reads.
const READS: [u32; 2] = [1, 2];

/// What a snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub entries: Vec<SnapshotEntry>,
    pub held: Vec<HeldEntry>,
}

/// A resource that must stay locked until `until` (a write to it may still be applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldEntry {
    pub slot: Slot,
    pub until: SystemTime,
}

/// One resource the table vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// The resource (its table slot: the hash of its canonical path).
    pub slot: Slot,
    pub etag: Etag,
    pub backend: BackendValidator,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Header {
        format: String,
        version: u32,
    },
    Entry {
        slot: String,
        etag: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend_etag: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_modified: Option<u64>,
    },
    Held {
        held: String,
        until_ms: u64,
    },
    Trailer {
        entries: usize,
        #[serde(default)]
        held: usize,
    },
}

fn slot_text(slot: Slot) -> String {
    format!("{:032x}", slot.0)
}

fn parse_slot(text: &str) -> Result<Slot, String> {
    u128::from_str_radix(text, 16)
        .map(Slot)
        .map_err(|_| format!("{text:?} is not a slot"))
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a snapshot this gateway can trust: {reason}")]
    Invalid { path: String, reason: String },
}

/// Writes the entries to `path` (through a temporary file and a rename, so a reader never sees half
/// a snapshot).
pub fn write(path: &Path, snapshot: &Snapshot) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let file = fs::File::create(&tmp).map_err(io)?;
    let mut out = BufWriter::new(file);
    let mut put = |line: &Line| -> std::io::Result<()> {
        serde_json::to_writer(&mut out, line)?;
        out.write_all(b"\n")
    };
    put(&Line::Header {
        format: FORMAT.into(),
        version: VERSION,
    })
    .map_err(io)?;
    for e in &snapshot.entries {
        put(&Line::Entry {
            slot: slot_text(e.slot),
            etag: e.etag.to_string(),
            backend_etag: e.backend.etag.clone(),
            last_modified: e
                .backend
                .last_modified
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        })
        .map_err(io)?;
    }
    for h in &snapshot.held {
        put(&Line::Held {
            held: slot_text(h.slot),
            // Rounded up: never shorter than the hold this process would have kept.
            until_ms: h
                .until
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64 + 1),
        })
        .map_err(io)?;
    }
    put(&Line::Trailer {
        entries: snapshot.entries.len(),
        held: snapshot.held.len(),
    })
    .map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Reads the snapshot at `path` and removes it, whatever it held: it is used at most once.
/// `Ok(None)` when there is none.
pub fn take(path: &Path) -> Result<Option<Snapshot>, SnapshotError> {
    let shown = path.display().to_string();
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SnapshotError::Io {
                path: shown,
                source,
            })
        }
    };
    let read = read_entries(BufReader::new(file));
    fs::remove_file(path).map_err(|source| SnapshotError::Io {
        path: shown.clone(),
        source,
    })?;
    read.map(Some).map_err(|reason| SnapshotError::Invalid {
        path: shown,
        reason,
    })
}

fn read_entries(reader: impl BufRead) -> Result<Snapshot, String> {
    let mut lines = reader.lines();
    let mut next = || -> Result<Option<Line>, String> {
        match lines.next() {
            None => Ok(None),
            Some(line) => {
                let line = line.map_err(|e| e.to_string())?;
                serde_json::from_str(&line)
                    .map(Some)
                    .map_err(|e| format!("unreadable line: {e}"))
            }
        }
    };
    match next()? {
        Some(Line::Header { format, version }) if format == FORMAT && READS.contains(&version) => {}
        _ => return Err(format!("no {FORMAT} header of version {READS:?}")),
    }
    let mut entries = Vec::new();
    let mut held = Vec::new();
    loop {
        match next()? {
            Some(Line::Entry {
                slot,
                etag,
                backend_etag,
                last_modified,
            }) => entries.push(SnapshotEntry {
                slot: parse_slot(&slot)?,
                etag: Etag::parse(&etag).ok_or_else(|| format!("{etag:?} is not an etag"))?,
                backend: BackendValidator {
                    etag: backend_etag,
                    last_modified: last_modified.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
                },
            }),
            Some(Line::Held {
                held: slot,
                until_ms,
            }) => held.push(HeldEntry {
                slot: parse_slot(&slot)?,
                until: UNIX_EPOCH + Duration::from_millis(until_ms),
            }),
            Some(Line::Trailer {
                entries: n,
                held: h,
            }) if n == entries.len() && h == held.len() => {
                if next()?.is_some() {
                    return Err("lines after the trailer".into());
                }
                return Ok(Snapshot { entries, held });
            }
            Some(Line::Trailer {
                entries: n,
                held: h,
            }) => {
                return Err(format!(
                    "trailer says {n} entries and {h} held, found {} and {}",
                    entries.len(),
                    held.len()
                ))
            }
            Some(Line::Header { .. }) => return Err("a second header".into()),
            None => return Err("cut short (no trailer)".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, backend_etag: Option<&str>) -> SnapshotEntry {
        SnapshotEntry {
            slot: Slot::of(&crate::resource_key::ResourceKey::from_path(path)),
            etag: Etag::fresh(),
            backend: BackendValidator {
                etag: backend_etag.map(str::to_owned),
                last_modified: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            },
        }
    }

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("etag-snapshot-{}-{name}", std::process::id()))
    }

    fn snapshot(entries: Vec<SnapshotEntry>) -> Snapshot {
        Snapshot {
            entries,
            held: vec![],
        }
    }

    #[test]
    fn round_trip_and_consumed() {
        let path = temp("rt");
        let until = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let written = Snapshot {
            entries: vec![entry("/docs/a", Some("\"rev-1\"")), entry("/docs/b", None)],
            held: vec![HeldEntry {
                slot: Slot::of(&crate::resource_key::ResourceKey::from_path("/docs/c")),
                until,
            }],
        };
        write(&path, &written).unwrap();
        let read = take(&path).unwrap().expect("a snapshot");
        assert_eq!(read.entries, written.entries);
        assert_eq!(read.held.len(), 1);
        assert_eq!(read.held[0].slot, written.held[0].slot);
        assert!(read.held[0].until >= until, "a hold is never shortened");
        assert!(!path.exists(), "a snapshot is used once");
        assert_eq!(take(&path).unwrap(), None);
    }

    #[test]
    fn a_snapshot_cut_short_or_altered_is_refused_and_removed() {
        let path = temp("cut");
        write(&path, &snapshot(vec![entry("/a", None), entry("/b", None)])).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let cut: Vec<&str> = text.lines().take(2).collect();
        fs::write(&path, cut.join("\n")).unwrap();
        assert!(matches!(take(&path), Err(SnapshotError::Invalid { .. })));
        assert!(!path.exists());

        fs::write(&path, text.replace("\"entries\":2", "\"entries\":3")).unwrap();
        assert!(matches!(take(&path), Err(SnapshotError::Invalid { .. })));
        fs::write(&path, "{\"format\":\"something else\",\"version\":1}\n").unwrap();
        assert!(matches!(take(&path), Err(SnapshotError::Invalid { .. })));
    }

    #[test]
    fn a_version_1_snapshot_is_still_read() {
        let path = temp("v1");
        let e = entry("/docs/a", None);
        fs::write(
            &path,
            format!(
                "{{\"format\":\"etag-gateway-snapshot\",\"version\":1}}\n\
                 {{\"slot\":\"{}\",\"etag\":\"{}\",\"last_modified\":1700000000}}\n\
                 {{\"entries\":1}}\n",
                slot_text(e.slot),
                e.etag
            ),
        )
        .unwrap();
        assert_eq!(take(&path).unwrap(), Some(snapshot(vec![e])));
    }
}
