//! Canonical resource keys: one table entry per resource, whatever the spelling of its path.
//!
//! Invariant: two request paths that a backend could reasonably treat as the same resource map to the
//! same key. When unsure we merge: merging costs a spurious conflict, splitting costs a lost update.
//! Steps (RFC 3986 §6.2.2): decode percent-encoded unreserved characters, upper-case the hex of the
//! escapes that stay, remove dot segments, merge repeated slashes, drop the trailing slash.
//! The query is not part of the key.

use std::fmt;

/// The canonical path of one resource, e.g. `/docs/bobs_address`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey(String);

impl ResourceKey {
    /// The key of a request path (the part before `?`; a query, if given, is ignored).
    pub fn from_path(path: &str) -> ResourceKey {
        let path = path.split('?').next().unwrap_or("");
        if is_canonical(path) {
            // The common case: nothing to decode or remove, one allocation.
            return ResourceKey(path.to_owned());
        }
        let decoded = decode_unreserved(path);
        let mut segments: Vec<&str> = Vec::new();
        for segment in decoded.split('/') {
            match segment {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                s => segments.push(s),
            }
        }
        let mut key = String::with_capacity(decoded.len() + 1);
        for s in &segments {
            key.push('/');
            key.push_str(s);
        }
        if key.is_empty() {
            key.push('/');
        }
        ResourceKey(key)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The collection that lists this resource (`/docs/b` → `/docs`); `None` for the root.
    pub fn parent(&self) -> Option<ResourceKey> {
        if self.0 == "/" {
            return None;
        }
        let cut = self.0.rfind('/').unwrap_or(0);
        Some(ResourceKey(if cut == 0 {
            "/".to_string()
        } else {
            self.0[..cut].to_string()
        }))
    }

    /// The last path segment: the "document" a conflict message names.
    pub fn document_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResourceKey({})", self.0)
    }
}

/// Already in canonical form: starts with `/`, no `%`, no empty, `.` or `..` segment, no trailing
/// slash (unless it is `/`).
fn is_canonical(path: &str) -> bool {
    let bytes = path.as_bytes();
    if path == "/" {
        return true;
    }
    if bytes.first() != Some(&b'/') || bytes.last() == Some(&b'/') || bytes.contains(&b'%') {
        return false;
    }
    path[1..]
        .split('/')
        .all(|segment| !matches!(segment, "" | "." | ".."))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes of unreserved characters and upper-cases the hex digits of the others, so
/// `%7e`, `%7E` and `~` are one spelling and `%2f` equals `%2F` (an encoded slash stays encoded: it is
/// not a segment separator for most backends).
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                let value = hi * 16 + lo;
                if is_unreserved(value) {
                    out.push(value);
                } else {
                    out.push(b'%');
                    out.push(bytes[i + 1].to_ascii_uppercase());
                    out.push(bytes[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        if bytes[i] == b'%' {
            // A `%` that begins no escape is a literal percent sign: written as the escape `%25`,
            // or the next canonicalisation could read it as the start of one (`%%34%31` → `%41` →
            // `A`), and the key of a key would not be the key.
            out.extend_from_slice(b"%25");
        } else {
            out.push(bytes[i]);
        }
        i += 1;
    }
    // Only ASCII was added or removed, so the result is valid UTF-8 whenever the input was.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str) -> String {
        ResourceKey::from_path(p).as_str().to_string()
    }

    #[test]
    fn aliases_share_one_key() {
        for alias in [
            "/docs/a",
            "/docs/a/",
            "/docs//a",
            "//docs///a//",
            "/docs/./a",
            "/docs/x/../a",
            "/docs/%61",
            "/%64ocs/a",
            "/docs/a?x=1",
            "/docs/%2e/a",
        ] {
            assert_eq!(key(alias), "/docs/a", "alias {alias}");
        }
    }

    #[test]
    fn reserved_escapes_stay_encoded_but_normalised() {
        assert_eq!(key("/docs/a%2fb"), "/docs/a%2Fb");
        assert_eq!(key("/docs/a%2Fb"), "/docs/a%2Fb");
        assert_ne!(key("/docs/a%2Fb"), key("/docs/a/b"));
        assert_eq!(key("/docs/%7e"), "/docs/~");
    }

    #[test]
    fn a_percent_that_begins_no_escape_is_a_literal_percent() {
        assert_eq!(key("/docs/%zz"), "/docs/%25zz");
        assert_eq!(key("/docs/%4"), "/docs/%254");
        assert_eq!(key("/docs/100%"), "/docs/100%25");
        assert_eq!(key("/docs/100%25"), "/docs/100%25");
        // found by fuzzing: the key of a key must be the key
        for path in ["/docs/%%34%31", "%E%63", "/%%%", "/a%2%41"] {
            let once = key(path);
            assert_eq!(key(&once), once, "{path}");
        }
    }

    #[test]
    fn dot_segments_cannot_climb_above_root() {
        assert_eq!(key("/../../etc"), "/etc");
        assert_eq!(key(""), "/");
        assert_eq!(key("/"), "/");
        assert_eq!(key("/.."), "/");
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_canonicalisation() {
        for path in [
            "/",
            "/a",
            "/docs/a",
            "/docs/a.b",
            "/docs/.a",
            "/docs/a..",
            "/d/e/f",
            "/docs/..a",
        ] {
            assert!(is_canonical(path), "{path}");
            assert_eq!(key(path), path);
        }
        for path in [
            "", "a", "/a/", "//a", "/a//b", "/./a", "/a/.", "/a/..", "/%61",
        ] {
            assert!(!is_canonical(path), "{path}");
        }
    }

    #[test]
    fn case_is_significant() {
        assert_ne!(key("/Docs/A"), key("/docs/a"));
    }

    #[test]
    fn parent_and_document_name() {
        let k = ResourceKey::from_path("/docs/bobs_address");
        assert_eq!(k.document_name(), "bobs_address");
        assert_eq!(k.parent().unwrap().as_str(), "/docs");
        assert_eq!(
            ResourceKey::from_path("/docs").parent().unwrap().as_str(),
            "/"
        );
        assert_eq!(ResourceKey::from_path("/").parent(), None);
    }
}
