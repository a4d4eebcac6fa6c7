//! Conditional request headers: parsing and evaluation against the table's current etag.
//!
//! Grammar (RFC 9110 §8.8.3, §13.1.1-2): `If-Match = "*" / #entity-tag` (likewise If-None-Match),
//! `entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE`. RavenDB clients send the etag without quotes (`If-Match:dd62a2e0-…`), so a bare
//! token is accepted as a strong tag too. Anything else is malformed: the request is answered 400
//! and nothing is forwarded, because guessing what a broken precondition meant could let a write through.

use crate::etag::Etag;
use std::fmt;
use std::time::SystemTime;

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

/// The value of an `If-Match` or `If-None-Match` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagSet {
    /// `*`: matches when the resource exists.
    Any,
    /// A non-empty list.
    Tags(Vec<EntityTag>),
}

/// `If-Match` is evaluated with strong comparison.
pub type IfMatch = TagSet;
/// `If-None-Match` is evaluated with weak comparison.
pub type IfNoneMatch = TagSet;

impl TagSet {
    /// `If-Match` (strong comparison) against the etag the table vouches for now (`None`: the
    /// gateway knows no current state, so nothing can match).
    pub fn is_satisfied_by(&self, current: Option<&Etag>) -> bool {
        match (self, current) {
            (_, None) => false,
            (TagSet::Any, Some(_)) => true,
            (TagSet::Tags(tags), Some(etag)) => tags.iter().any(|t| t.strong_match(etag)),
        }
    }

    /// `If-None-Match` (weak comparison: `W/"x"` matches `"x"`): true when one tag names the
    /// current state, i.e. when the condition *fails*.
    pub fn matches_weakly(&self, current: Option<&Etag>) -> bool {
        match (self, current) {
            (_, None) => false,
            (TagSet::Any, Some(_)) => true,
            (TagSet::Tags(tags), Some(etag)) => {
                tags.iter().any(|t| Etag::parse(&t.opaque) == Some(*etag))
            }
        }
    }

    /// Whether this is the list form (not `*`).
    pub fn is_any(&self) -> bool {
        matches!(self, TagSet::Any)
    }

    /// How the conflict body reports what the request carried (`actualETag`): the bare value for one
    /// tag, as RavenDB prints it; the list as sent otherwise.
    pub fn as_reported(&self) -> String {
        match self {
            TagSet::Any => "*".to_string(),
            TagSet::Tags(tags) if tags.len() == 1 && !tags[0].weak => tags[0].opaque.clone(),
            TagSet::Tags(tags) => tags
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

/// The conditional headers of one request that the gateway evaluates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preconditions {
    pub if_match: Option<IfMatch>,
    pub if_none_match: Option<IfNoneMatch>,
    /// Already `None` when If-Match is present (RFC 9110 §13.1.4: then it must be ignored) or when
    /// the value is not a valid HTTP-date (likewise ignored).
    pub if_unmodified_since: Option<SystemTime>,
}

impl Preconditions {
    /// Reads If-Match, If-None-Match and If-Unmodified-Since from request headers.
    pub fn from_headers(headers: &http::HeaderMap) -> Result<Preconditions, MalformedPrecondition> {
        let lines = |name| headers.get_all(name).into_iter().map(|v| v.as_bytes());
        let if_match = parse_if_match(lines(http::header::IF_MATCH))?;
        let if_none_match = parse_if_none_match(lines(http::header::IF_NONE_MATCH))?;
        let if_unmodified_since = match if_match {
            Some(_) => None,
            None => headers
                .get(http::header::IF_UNMODIFIED_SINCE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok()),
        };
        Ok(Preconditions {
            if_match,
            if_none_match,
            if_unmodified_since,
        })
    }

    /// No precondition at all: the write is last-one-wins.
    pub fn is_empty(&self) -> bool {
        self.if_match.is_none()
            && self.if_none_match.is_none()
            && self.if_unmodified_since.is_none()
    }
}

/// Parses every `If-Match` field line of a request (several lines form one list). `Ok(None)` when the
/// request has none.
pub fn parse_if_match<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<IfMatch>, MalformedPrecondition> {
    parse_tag_list("If-Match", values)
}

/// Parses every `If-None-Match` field line of a request.
pub fn parse_if_none_match<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<IfNoneMatch>, MalformedPrecondition> {
    parse_tag_list("If-None-Match", values)
}

fn parse_tag_list<'a>(
    header: &'static str,
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<TagSet>, MalformedPrecondition> {
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
        (true, true) => Ok(Some(TagSet::Any)),
        (true, false) => Err(malformed(
            "\"*\" cannot be combined with entity tags".into(),
        )),
        (false, false) => Ok(Some(TagSet::Tags(tags))),
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
        let quoted = parse(&[current.header_value().to_str().unwrap()])
            .unwrap()
            .unwrap();
        assert!(quoted.is_satisfied_by(Some(&current)));
        let bare = parse(&[&current.to_string()]).unwrap().unwrap();
        assert!(bare.is_satisfied_by(Some(&current)));
        let weak = parse(&[&format!("W/{}", current.header_value().to_str().unwrap())])
            .unwrap()
            .unwrap();
        assert!(!weak.is_satisfied_by(Some(&current)));
        let other = parse(&[Etag::fresh().header_value().to_str().unwrap()])
            .unwrap()
            .unwrap();
        assert!(!other.is_satisfied_by(Some(&current)));
        let list = parse(&[&format!(
            "\"x\", {}",
            current.header_value().to_str().unwrap()
        )])
        .unwrap()
        .unwrap();
        assert!(list.is_satisfied_by(Some(&current)));
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let current = Etag::fresh();
        let weak = parse(&[&format!("W/{}", current.header_value().to_str().unwrap())])
            .unwrap()
            .unwrap();
        assert!(weak.matches_weakly(Some(&current)));
        assert!(!weak.matches_weakly(None));
        assert!(TagSet::Any.matches_weakly(Some(&current)));
        assert!(!TagSet::Any.matches_weakly(None));
        let other = parse(&["\"zzz\""]).unwrap().unwrap();
        assert!(!other.matches_weakly(Some(&current)));
    }

    #[test]
    fn preconditions_from_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("if-none-match", "*".parse().unwrap());
        h.insert(
            "if-unmodified-since",
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        let p = Preconditions::from_headers(&h).unwrap();
        assert_eq!(p.if_none_match, Some(TagSet::Any));
        assert!(p.if_unmodified_since.is_some());
        // If-Unmodified-Since is ignored when If-Match is present, and when it is not a date
        h.insert("if-match", "\"a\"".parse().unwrap());
        assert_eq!(
            Preconditions::from_headers(&h).unwrap().if_unmodified_since,
            None
        );
        let mut h = http::HeaderMap::new();
        h.insert("if-unmodified-since", "yesterday".parse().unwrap());
        let p = Preconditions::from_headers(&h).unwrap();
        assert!(p.is_empty());
        let mut h = http::HeaderMap::new();
        h.insert("if-none-match", "\"open".parse().unwrap());
        assert_eq!(
            Preconditions::from_headers(&h).unwrap_err().header,
            "If-None-Match"
        );
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
