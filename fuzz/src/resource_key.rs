//! Canonical resource keys (`etag_gateway::resource_key::ResourceKey::from_path`).
//!
//! Input: any UTF-8 string, taken as a request path (a `?` starts the ignored query).
//!
//! Properties:
//! - never panics;
//! - the key starts with `/`, has no empty segment (`//`), no `.` or `..` segment, no query, and no
//!   trailing `/` unless it is `/` itself;
//! - it is canonical: the key of the key is the key (idempotence);
//! - `parent()` steps up one segment at a time, each ancestor a prefix of the one below, and ends at
//!   `/` (whose parent is `None`); the parent has the shape above; `document_name()` is the last
//!   segment.
//!
//! Found by this target and fixed (`regressions/resource_key/`): a `%` that began no escape could
//! begin one once the bytes after it were decoded (`%E%63` → `/%Ec` → `/%EC`, `/docs/%%34%31` →
//! `/docs/%41` → `/docs/A`); such a `%` is now written `%25` in the key.

use etag_gateway::resource_key::ResourceKey;

/// Checks one path.
pub fn check(path: &str) {
    let key = ResourceKey::from_path(path);
    check_shape(key.as_str());

    let again = ResourceKey::from_path(key.as_str());
    assert!(
        again == key,
        "not idempotent: {path:?} -> {:?} -> {:?}",
        key.as_str(),
        again.as_str()
    );

    if key.as_str() == "/" {
        assert_eq!(key.document_name(), "");
    } else {
        let last = key.as_str().rsplit('/').next().unwrap();
        assert_eq!(key.document_name(), last);
        assert!(!last.is_empty());
    }

    let segments = key.as_str().split('/').filter(|s| !s.is_empty()).count();
    let mut steps = 0;
    let mut current = key.clone();
    while let Some(parent) = current.parent() {
        steps += 1;
        assert!(
            steps <= segments,
            "parent chain of {:?} does not end",
            key.as_str()
        );
        if steps == 1 {
            // Ancestors further up are prefixes of this one: checking each would make long paths
            // quadratic and the fuzzer slow.
            check_shape(parent.as_str());
        }
        assert!(
            current.as_str().starts_with(parent.as_str()),
            "{:?} is not an ancestor of {:?}",
            parent.as_str(),
            current.as_str()
        );
        assert!(parent.as_str().len() < current.as_str().len());
        current = parent;
    }
    assert_eq!(current.as_str(), "/", "the parent chain ends at the root");
    assert_eq!(steps, segments, "one parent per segment");
}

fn check_shape(key: &str) {
    assert!(key.starts_with('/'), "key {key:?} does not start with /");
    assert!(!key.contains("//"), "key {key:?} has an empty segment");
    assert!(key == "/" || !key.ends_with('/'), "key {key:?} ends with /");
    for segment in key.split('/').skip(1) {
        assert!(
            segment != "." && segment != "..",
            "key {key:?} has a dot segment"
        );
    }
    assert!(!key.contains('?'), "key {key:?} holds a query");
}
