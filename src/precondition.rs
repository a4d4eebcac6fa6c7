//! Conditional request headers: parsing and evaluation against the table's current etag.
//!
//! Grammar (RFC 9110 §8.8.3, §13.1.1): `If-Match = "*" / #entity-tag`, `entity-tag = [ "W/" ] DQUOTE
//! *etagc DQUOTE`. RavenDB clients send the etag without quotes (`If-Match:dd62a2e0-…`), so a bare
//! token is accepted as a strong tag too. Anything else is malformed: the request is answered 400
//! and nothing is forwarded, because guessing what a broken precondition meant could let a write through.

use crate::etag::Etag;
use std::fmt;

/// One entity tag as a client sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityTag {
    pub weak: bool,
    pub opaque: String,
}

impl EntityTag {
    /// Strong comparison (RFC 9110 §8.8.3.2): both strong and the same opaque value.
    pub fn strong_match(&self, current: &Etag) -> bool {
        !self.weak && Etag::parse(&self.opaque) == Some(*current)
    }
}

/// The value of an `If-Match` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: true when the resource exists.
    Any,
    /// A non-empty list; true when one of them strongly matches the current etag.
    Tags(Vec<EntityTag>),
}

impl IfMatch {
    /// Evaluates the precondition against the etag the table vouches for now (`None`: the gateway
    /// knows no current state, so nothing can match).
    pub fn is_satisfied_by(&self, current: Option<&Etag>) -> bool {
        match (self, current) {
            (_, None) => false,
            (IfMatch::Any, Some(_)) => true,
            (IfMatch::Tags(tags), Some(etag)) => tags.iter().any(|t| t.strong_match(etag)),
        }
    }

    /// How the conflict body reports what the request carried (`actualETag`): the bare value for one
    /// tag, as RavenDB prints it; the list as sent otherwise.
    pub fn as_reported(&self) -> String {
        match self {
            IfMatch::Any => "*".to_string(),
            IfMatch::Tags(tags) if tags.len() == 1 && !tags[0].weak => tags[0].opaque.clone(),
            IfMatch::Tags(tags) => tags
                .iter()
                .map(|t| format!("{}\"{}\"", if t.weak { "W/" } else { "" }, t.opaque))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Why a conditional header could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedPrecondition {
    pub header: &'static str,
    pub reason: String,
}

impl fmt::Display for MalformedPrecondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed {} header: {}", self.header, self.reason)
    }
}

/// Parses every `If-Match` field line of a request (several lines form one list). `Ok(None)` when the
/// request has none.
pub fn parse_if_match<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<IfMatch>, MalformedPrecondition> {
    parse_tag_list("If-Match", values)
}

fn parse_tag_list<'a>(
    header: &'static str,
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<IfMatch>, MalformedPrecondition> {
    let malformed = |reason: String| MalformedPrecondition { header, reason };
    let mut seen_header = false;
    let mut any = false;
    let mut tags = Vec::new();
    for value in values {
        seen_header = true;
        let mut rest = value;
        loop {
            rest = trim_start(rest);
            if rest.is_empty() {
                break;
            }
            if rest[0] == b',' {
                // RFC 9110 §5.6.1: empty list elements are allowed and ignored.
                rest = &rest[1..];
                continue;
            }
            let (item, after) = parse_item(rest).map_err(malformed)?;
            match item {
                None => any = true,
                Some(tag) => tags.push(tag),
            }
            rest = trim_start(after);
            match rest.first() {
                None => break,
                Some(b',') => rest = &rest[1..],
                Some(&c) => {
                    return Err(malformed(format!(
                        "unexpected character {:?} after an entity tag; separate tags with commas",
                        c as char
                    )))
                }
            }
        }
    }
    if !seen_header {
        return Ok(None);
    }
    match (any, tags.is_empty()) {
        (true, true) => Ok(Some(IfMatch::Any)),
        (true, false) => Err(malformed(
            "\"*\" cannot be combined with entity tags".into(),
        )),
        (false, false) => Ok(Some(IfMatch::Tags(tags))),
        (false, true) => Err(malformed(
            "the header is empty; send an etag, e.g. \"3f1c…\", or *".into(),
        )),
    }
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let Some((b' ' | b'\t', rest)) = s.split_first() {
        s = rest;
    }
    s
}

/// One list item: `*` (→ `None`), `W/"x"`, `"x"`, or a bare token. Returns the item and the rest.
fn parse_item(s: &[u8]) -> Result<(Option<EntityTag>, &[u8]), String> {
    if s[0] == b'*' {
        return Ok((None, &s[1..]));
    }
    let (weak, s) = match s {
        [b'W', b'/', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    if let Some(body) = s.strip_prefix(b"\"") {
        let end = body
            .iter()
            .position(|&b| b == b'"')
            .ok_or_else(|| "an entity tag opens a quote that is never closed".to_string())?;
        let opaque = &body[..end];
        if let Some(&bad) = opaque.iter().find(|&&b| !is_etagc(b)) {
            return Err(format!(
                "byte 0x{bad:02x} is not allowed inside an entity tag"
            ));
        }
        let opaque = String::from_utf8_lossy(opaque).into_owned();
        return Ok((Some(EntityTag { weak, opaque }), &body[end + 1..]));
    }
    if weak {
        return Err("W/ must be followed by a quoted entity tag, e.g. W/\"abc\"".into());
    }
    // RavenDB's unquoted form: a run of visible characters up to a comma or whitespace.
    let end = s
        .iter()
        .position(|&b| matches!(b, b',' | b' ' | b'\t'))
        .unwrap_or(s.len());
    let token = &s[..end];
    if let Some(&bad) = token.iter().find(|&&b| !is_etagc(b)) {
        return Err(format!("byte 0x{bad:02x} is not allowed in an entity tag"));
    }
    let opaque = String::from_utf8_lossy(token).into_owned();
    Ok((
        Some(EntityTag {
            weak: false,
            opaque,
        }),
        &s[end..],
    ))
}

/// `etagc = %x21 / %x23-7E / obs-text`
fn is_etagc(b: u8) -> bool {
    b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(values: &[&str]) -> Result<Option<IfMatch>, MalformedPrecondition> {
        parse_if_match(values.iter().map(|v| v.as_bytes()))
    }

    fn strong(s: &str) -> EntityTag {
        EntityTag {
            weak: false,
            opaque: s.into(),
        }
    }

    #[test]
    fn absent_header_is_no_precondition() {
        assert_eq!(parse(&[]), Ok(None));
    }

    #[test]
    fn quoted_unquoted_weak_and_star() {
        assert_eq!(
            parse(&["\"a\""]),
            Ok(Some(IfMatch::Tags(vec![strong("a")])))
        );
        let uuid = "dd62a2e0-2744-11df-a9ff-001c251ced36";
        assert_eq!(parse(&[uuid]), Ok(Some(IfMatch::Tags(vec![strong(uuid)]))));
        assert_eq!(
            parse(&["W/\"a\""]),
            Ok(Some(IfMatch::Tags(vec![EntityTag {
                weak: true,
                opaque: "a".into()
            }])))
        );
        assert_eq!(parse(&[" * "]), Ok(Some(IfMatch::Any)));
    }

    #[test]
    fn lists_across_commas_and_lines() {
        let got = parse(&["\"a\", \"b\"", "c,,"]).unwrap().unwrap();
        assert_eq!(
            got,
            IfMatch::Tags(vec![strong("a"), strong("b"), strong("c")])
        );
        // a comma inside quotes belongs to the tag
        assert_eq!(
            parse(&["\"a,b\""]),
            Ok(Some(IfMatch::Tags(vec![strong("a,b")])))
        );
    }

    #[test]
    fn malformed_values_are_refused_with_a_reason() {
        for bad in [
            "\"unterminated",
            "",
            " , ",
            "*, \"a\"",
            "W/abc",
            "\"a\" \"b\"",
            "\"a\"b",
            "\"a\u{7f}\"",
        ] {
            let err = parse(&[bad]).expect_err(bad);
            assert_eq!(err.header, "If-Match");
            assert!(!err.reason.is_empty());
        }
    }

    #[test]
    fn strong_comparison_only() {
        let current = Etag::fresh();
        let quoted = parse(&[&current.header_value()]).unwrap().unwrap();
        assert!(quoted.is_satisfied_by(Some(&current)));
        let bare = parse(&[&current.to_string()]).unwrap().unwrap();
        assert!(bare.is_satisfied_by(Some(&current)));
        let weak = parse(&[&format!("W/{}", current.header_value())])
            .unwrap()
            .unwrap();
        assert!(!weak.is_satisfied_by(Some(&current)));
        let other = parse(&[&Etag::fresh().header_value()]).unwrap().unwrap();
        assert!(!other.is_satisfied_by(Some(&current)));
        let list = parse(&[&format!("\"x\", {}", current.header_value())])
            .unwrap()
            .unwrap();
        assert!(list.is_satisfied_by(Some(&current)));
    }

    #[test]
    fn nothing_matches_an_unknown_resource() {
        assert!(!IfMatch::Any.is_satisfied_by(None));
        let tag = parse(&["\"a\""]).unwrap().unwrap();
        assert!(!tag.is_satisfied_by(None));
    }

    #[test]
    fn reported_form_is_bare_for_one_tag() {
        assert_eq!(parse(&["\"abc\""]).unwrap().unwrap().as_reported(), "abc");
        assert_eq!(parse(&["abc"]).unwrap().unwrap().as_reported(), "abc");
        assert_eq!(
            parse(&["\"a\", W/\"b\""]).unwrap().unwrap().as_reported(),
            "\"a\", W/\"b\""
        );
    }
}
