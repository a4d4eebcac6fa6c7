//! Gateway-issued entity tags.
//!
//! An [`Etag`] is a random UUID chosen by the gateway, optionally prefixed by the store's epoch. It
//! names one state of one resource as the gateway vouches for it; the backend never sees it. Random
//! (not counted) so that an etag from before a restart or from another table can never collide with a
//! current one. The epoch (shared store only) changes when the store loses its history (restart from an
//! old snapshot, failover): every etag of an older epoch is then stale, even if old data comes back.

use http::HeaderValue;
use std::fmt;
use std::io::Write;
use uuid::Uuid;

/// An etag issued by this gateway. Text form: `<uuid>` (epoch 0, the memory store) or
/// `<epoch>-<uuid>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Etag {
    epoch: u64,
    id: Uuid,
}

const UUID_LEN: usize = 36;
/// The longest `ETag` header value: quotes around a u64 epoch (20 digits), a hyphen and a UUID.
const HEADER_VALUE_MAX: usize = 2 + 20 + 1 + UUID_LEN;

impl Etag {
    /// The nil UUID in epoch 0: never issued (a fresh etag is a v4 UUID, whose version bits are set),
    /// so the table may use it to stand for "no etag" inside its entries.
    pub(crate) const NIL: Etag = Etag {
        epoch: 0,
        id: Uuid::nil(),
    };

    /// A fresh etag that nobody holds yet.
    pub fn fresh() -> Etag {
        Etag::fresh_in(0)
    }

    /// A fresh etag of a store epoch.
    pub fn fresh_in(epoch: u64) -> Etag {
        Etag {
            epoch,
            id: Uuid::new_v4(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Reads the opaque part of an entity tag as one of ours; `None` if it cannot be one.
    pub fn parse(opaque: &str) -> Option<Etag> {
        if opaque.len() == UUID_LEN {
            return Uuid::try_parse(opaque).ok().map(|id| Etag { epoch: 0, id });
        }
        let (epoch, id) = opaque.split_at_checked(opaque.len().checked_sub(UUID_LEN + 1)?)?;
        let id = id.strip_prefix('-')?;
        if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Etag {
            epoch: epoch.parse().ok()?,
            id: Uuid::try_parse(id).ok()?,
        })
    }

    /// The value for an `ETag` response header: quoted, as RFC 9110 wants. Written on the stack, so
    /// that the header value's own buffer is the only allocation: this runs for every answer that
    /// carries an etag.
    pub fn header_value(&self) -> HeaderValue {
        let mut buf = [0u8; HEADER_VALUE_MAX];
        let mut out = &mut buf[..];
        let mut id = [0u8; UUID_LEN];
        let id = self.id.hyphenated().encode_lower(&mut id);
        // Writing into a slice long enough for the longest etag cannot fail.
        let written = if self.epoch == 0 {
            write!(out, "\"{id}\"")
        } else {
            write!(out, "\"{}-{id}\"", self.epoch)
        };
        written.expect("HEADER_VALUE_MAX holds any etag");
        let len = HEADER_VALUE_MAX - out.len();
        HeaderValue::from_bytes(&buf[..len]).expect("digits, hex and hyphens in quotes")
    }
}

/// The bare opaque value (no quotes), as it appears inside the conflict body.
impl fmt::Display for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.epoch == 0 {
            write!(f, "{}", self.id.hyphenated())
        } else {
            write!(f, "{}-{}", self.epoch, self.id.hyphenated())
        }
    }
}

impl fmt::Debug for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Etag({self})")
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
        assert_eq!(a.header_value().to_str().unwrap(), format!("\"{a}\""));
        assert_eq!(a.to_string().len(), 36);
    }

    #[test]
    fn epochs_are_part_of_the_etag() {
        let e = Etag::fresh_in(1_796_000_000_123);
        let text = e.to_string();
        assert!(text.starts_with("1796000000123-"), "{text}");
        assert_eq!(Etag::parse(&text), Some(e));
        assert_eq!(e.epoch(), 1_796_000_000_123);
        assert_eq!(e.header_value().to_str().unwrap(), format!("\"{text}\""));
        // the same id in another epoch is another etag
        let other = Etag::parse(&format!("7-{}", &text[text.len() - 36..])).unwrap();
        assert_ne!(other, e);
    }

    #[test]
    fn header_values_are_the_quoted_text_in_both_forms() {
        let id = Uuid::parse_str("dd62a2e0-2744-11df-a9ff-001c251ced36").unwrap();
        let plain = Etag { epoch: 0, id };
        assert_eq!(
            plain.header_value(),
            "\"dd62a2e0-2744-11df-a9ff-001c251ced36\""
        );
        let with_epoch = Etag { epoch: 7, id };
        assert_eq!(
            with_epoch.header_value(),
            "\"7-dd62a2e0-2744-11df-a9ff-001c251ced36\""
        );
        let longest = Etag {
            epoch: u64::MAX,
            id,
        };
        assert_eq!(
            longest.header_value(),
            "\"18446744073709551615-dd62a2e0-2744-11df-a9ff-001c251ced36\""
        );
        for e in [plain, with_epoch, longest, Etag::fresh(), Etag::fresh_in(1)] {
            assert_eq!(e.header_value().to_str().unwrap(), format!("\"{e}\""));
        }
    }

    #[test]
    fn foreign_values_are_not_etags() {
        for bad in [
            "rev-12",
            "",
            "-",
            "x-dd62a2e0-2744-11df-a9ff-001c251ced36",
            "-dd62a2e0-2744-11df-a9ff-001c251ced36",
            "12dd62a2e0-2744-11df-a9ff-001c251ced36",
            "é-dd62a2e0-2744-11df-a9ff-001c251ced36",
        ] {
            assert_eq!(Etag::parse(bad), None, "{bad}");
        }
    }
}
