//! The memory table across a clean restart.
//!
//! Written once, at a clean stop, after every request has finished or been settled as unknown (the
//! server has stopped by then, so nothing can change the table afterwards). Read once, at start, and
//! removed before the first request is served: a snapshot can be trusted only if nothing happened
//! after it. After a crash there is none, so every old etag is unknown (a conflict), never an older
//! table. Entries with a write in flight are not written (their state is unknown).
//!
//! Format: JSON lines. A header `{"format":"etag-gateway-snapshot","version":1}`, one line per entry,
//! and a trailer with the entry count; a file without its trailer (cut short) is refused.

use crate::etag::Etag;
use crate::table::{BackendValidator, Slot};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

const FORMAT: &str = "etag-gateway-snapshot";
const VERSION: u32 = 1;

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
    Trailer {
        entries: usize,
    },
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
pub fn write(path: &Path, entries: &[SnapshotEntry]) -> Result<(), SnapshotError> {
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
    for e in entries {
        put(&Line::Entry {
            slot: format!("{:032x}", e.slot.0),
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
    put(&Line::Trailer {
        entries: entries.len(),
    })
    .map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Reads the snapshot at `path` and removes it, whatever it held: it is used at most once.
/// `Ok(None)` when there is none.
pub fn take(path: &Path) -> Result<Option<Vec<SnapshotEntry>>, SnapshotError> {
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

fn read_entries(reader: impl BufRead) -> Result<Vec<SnapshotEntry>, String> {
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
        Some(Line::Header { format, version }) if format == FORMAT && version == VERSION => {}
        _ => return Err(format!("no {FORMAT} version {VERSION} header")),
    }
    let mut entries = Vec::new();
    loop {
        match next()? {
            Some(Line::Entry {
                slot,
                etag,
                backend_etag,
                last_modified,
            }) => entries.push(SnapshotEntry {
                slot: Slot(
                    u128::from_str_radix(&slot, 16)
                        .map_err(|_| format!("{slot:?} is not a slot"))?,
                ),
                etag: Etag::parse(&etag).ok_or_else(|| format!("{etag:?} is not an etag"))?,
                backend: BackendValidator {
                    etag: backend_etag,
                    last_modified: last_modified.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
                },
            }),
            Some(Line::Trailer { entries: n }) if n == entries.len() => {
                if next()?.is_some() {
                    return Err("lines after the trailer".into());
                }
                return Ok(entries);
            }
            Some(Line::Trailer { entries: n }) => {
                return Err(format!("trailer says {n} entries, found {}", entries.len()))
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

    #[test]
    fn round_trip_and_consumed() {
        let path = temp("rt");
        let entries = vec![entry("/docs/a", Some("\"rev-1\"")), entry("/docs/b", None)];
        write(&path, &entries).unwrap();
        assert_eq!(take(&path).unwrap(), Some(entries));
        assert!(!path.exists(), "a snapshot is used once");
        assert_eq!(take(&path).unwrap(), None);
    }

    #[test]
    fn a_snapshot_cut_short_or_altered_is_refused_and_removed() {
        let path = temp("cut");
        write(&path, &[entry("/a", None), entry("/b", None)]).unwrap();
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
}
