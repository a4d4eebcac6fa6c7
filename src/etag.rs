//! Gateway-issued entity tags.
//!
//! An [`Etag`] is a random UUID chosen by the gateway. It names one state of one resource as the
//! gateway vouches for it; the backend never sees it. Random (not counted) so that an etag from
//! before a restart or from another table can never collide with a current one.

use std::fmt;
use uuid::Uuid;

/// An etag issued by this gateway.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Etag(Uuid);

impl Etag {
    /// A fresh etag that nobody holds yet.
    pub fn fresh() -> Etag {
        Etag(Uuid::new_v4())
    }

    /// Reads the opaque part of an entity tag as one of ours; `None` if it cannot be one.
    pub fn parse(opaque: &str) -> Option<Etag> {
        Uuid::try_parse(opaque).ok().map(Etag)
    }

    /// The value for an `ETag` response header: quoted, as RFC 9110 wants.
    pub fn header_value(&self) -> String {
        format!("\"{}\"", self.0.hyphenated())
    }
}

/// The bare opaque value (no quotes), as it appears inside the conflict body.
impl fmt::Display for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

impl fmt::Debug for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Etag({})", self.0.hyphenated())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_etags_differ_and_round_trip() {
        let a = Etag::fresh();
        let b = Etag::fresh();
        assert_ne!(a, b);
        assert_eq!(Etag::parse(&a.to_string()), Some(a));
        assert_eq!(a.header_value(), format!("\"{a}\""));
    }

    #[test]
    fn foreign_values_are_not_etags() {
        assert_eq!(Etag::parse("rev-12"), None);
        assert_eq!(Etag::parse(""), None);
    }
}
