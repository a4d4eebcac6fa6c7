//! `If-Match` / `If-None-Match` parsing (`etag_gateway::precondition`).
//!
//! Input: one flag byte, then the field lines of one header, separated by `\n`.
//! Flag bit 0: If-None-Match instead of If-Match.
//!
//! Properties:
//! - parsing never panics, whatever the bytes;
//! - a parsed list (`Tags`) is non-empty and no tag's opaque value holds a `"` (nor whitespace or a
//!   control character: `etagc` excludes them);
//! - `as_reported()` never panics; re-parsing the reported form of a list (several tags, or one
//!   weak tag) gives the same tags; so does re-parsing the bare form of one strong tag when that
//!   form is unambiguous (non-empty, no comma, not starting with `*` or `W/`);
//! - `Preconditions::from_headers` reads the same list from a `HeaderMap` holding those lines;
//! - a tag that parses as a gateway `Etag` matches it: strongly when the tag is strong, weakly always.

use etag_gateway::etag::Etag;
use etag_gateway::precondition::{parse_if_match, parse_if_none_match, Preconditions, TagSet};

/// Checks one input: a flag byte, then field lines separated by `\n`.
pub fn check(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let none_match = flags & 1 == 1;
    let lines: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    let parse = |lines: &[&[u8]]| {
        if none_match {
            parse_if_none_match(lines.iter().copied())
        } else {
            parse_if_match(lines.iter().copied())
        }
    };

    let parsed = parse(&lines);
    if let Ok(Some(set)) = &parsed {
        check_set(set, &parse);
    }

    // The same lines through a HeaderMap, as the proxy reads them (lines a HeaderValue refuses —
    // CR, NUL, other controls — cannot reach the gateway; then the test is skipped).
    let values: Option<Vec<http::HeaderValue>> = lines
        .iter()
        .map(|l| http::HeaderValue::from_bytes(l).ok())
        .collect();
    if let Some(values) = values {
        let name = if none_match {
            http::header::IF_NONE_MATCH
        } else {
            http::header::IF_MATCH
        };
        let mut headers = http::HeaderMap::new();
        for v in &values {
            headers.append(name.clone(), v.clone());
        }
        let from_map = Preconditions::from_headers(&headers);
        match (&from_map, &parsed) {
            (Ok(p), Ok(direct)) => {
                let got = if none_match {
                    &p.if_none_match
                } else {
                    &p.if_match
                };
                assert_eq!(got, direct, "from_headers and the parser disagree");
                if !none_match && direct.is_some() {
                    assert_eq!(p.if_unmodified_since, None);
                }
            }
            (Err(e), Err(d)) => assert_eq!(e, d),
            _ => panic!("from_headers {from_map:?} but the parser {parsed:?}"),
        }
    }
}

/// `parse_if_match` or `parse_if_none_match`, over header lines.
type ParseLines<'a> = dyn Fn(&[&[u8]]) -> Result<Option<TagSet>, etag_gateway::precondition::MalformedPrecondition>
    + 'a;

fn check_set(set: &TagSet, parse: &ParseLines<'_>) {
    let reported = set.as_reported();
    let TagSet::Tags(tags) = set else {
        assert_eq!(reported, "*");
        return;
    };
    assert!(!tags.is_empty(), "an empty list parsed as Tags");
    for t in tags {
        assert!(
            !t.opaque.contains('"'),
            "opaque {:?} holds a quote",
            t.opaque
        );
        assert!(
            !t.opaque
                .chars()
                .any(|c| c == ' ' || c == '\t' || c.is_ascii_control()),
            "opaque {:?} holds whitespace or a control character",
            t.opaque
        );
        if let Some(etag) = Etag::parse(&t.opaque) {
            let one = TagSet::Tags(vec![t.clone()]);
            assert_eq!(one.is_satisfied_by(Some(&etag)), !t.weak);
            assert!(one.matches_weakly(Some(&etag)));
            assert_eq!(Etag::parse(&etag.to_string()), Some(etag));
        }
    }
    let list_form = tags.len() > 1 || tags[0].weak;
    // One strong tag is reported bare, as RavenDB prints it; that form reads back the same unless the
    // opaque value is empty, holds a comma, or starts with `*` or `W/` (`If-Match: "*x"` is reported
    // `*x`, which reads as `*` followed by garbage). The bare form only names the tag in the conflict
    // body, which nobody parses back.
    let opaque = &tags[0].opaque;
    let bare_token = !list_form
        && !opaque.is_empty()
        && !opaque.contains(',')
        && !opaque.starts_with('*')
        && !opaque.starts_with("W/");
    if list_form || bare_token {
        let again = parse(&[reported.as_bytes()]);
        assert_eq!(
            again.as_ref().ok().and_then(Option::as_ref),
            Some(set),
            "re-parsing the reported form {reported:?} gave {again:?}"
        );
    }
}
