//! The answers the gateway writes itself, as plain data (status, etag, JSON body), so that their exact
//! bytes are unit-tested without sockets. The proxy only sends them.

use crate::etag::Etag;
use crate::precondition::{MalformedPrecondition, Preconditions};
use crate::resource_key::ResourceKey;
use http::{Method, StatusCode};
use serde::Serialize;

/// A response the gateway answers on its own, without the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAnswer {
    pub status: StatusCode,
    /// Goes out as `ETag` when present.
    pub etag: Option<Etag>,
    pub body: String,
}

/// The seed's conflict body. Field order and names are RavenDB 1.0's: `actualETag` is the etag the
/// request carried, `expectedETag` the current one (later RavenDB versions swapped the two names).
#[derive(Serialize)]
struct ConflictBody<'a> {
    url: &'a str,
    #[serde(rename = "actualETag")]
    actual_etag: String,
    #[serde(rename = "expectedETag")]
    expected_etag: Option<String>,
    error: String,
}

/// A failed precondition: nothing was forwarded, nothing changed. The seed defines the body for
/// `If-Match`; the other preconditions keep its shape, with what they carried and why they failed.
pub fn conflict(
    status: StatusCode,
    method: &Method,
    key: &ResourceKey,
    pre: &Preconditions,
    current: Option<Etag>,
) -> GatewayAnswer {
    let document = key.document_name();
    let (carried, error) = if let Some(if_match) = &pre.if_match {
        (
            if_match.as_reported(),
            format!("{method} attempted on document '{document}' using a non current etag"),
        )
    } else if let Some(since) = pre.if_unmodified_since {
        (
            httpdate::fmt_http_date(since),
            format!("{method} attempted on document '{document}' which was modified since (If-Unmodified-Since)"),
        )
    } else if let Some(if_none_match) = pre.if_none_match.as_ref().filter(|inm| inm.is_any()) {
        (
            if_none_match.as_reported(),
            format!("{method} attempted on document '{document}' which already exists (If-None-Match: *)"),
        )
    } else {
        (
            pre.if_none_match.as_ref().map(|inm| inm.as_reported()).unwrap_or_default(),
            format!("{method} attempted on document '{document}' whose current etag is in If-None-Match"),
        )
    };
    let body = ConflictBody {
        url: key.as_str(),
        actual_etag: carried,
        expected_etag: current.map(|e| e.to_string()),
        error,
    };
    GatewayAnswer {
        status,
        etag: current,
        body: to_json(&body),
    }
}

/// 304: the client's copy (named by `If-None-Match`) is the current state.
pub fn not_modified(etag: Etag) -> GatewayAnswer {
    GatewayAnswer {
        status: StatusCode::NOT_MODIFIED,
        etag: Some(etag),
        body: String::new(),
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<&'a str>,
}

fn error_answer(
    status: StatusCode,
    error: &str,
    header: Option<&str>,
    hint: Option<&str>,
) -> GatewayAnswer {
    GatewayAnswer {
        status,
        etag: None,
        body: to_json(&ErrorBody {
            error,
            header,
            hint,
        }),
    }
}

/// 400: a conditional header the gateway cannot read; nothing was forwarded.
pub fn malformed(error: &MalformedPrecondition) -> GatewayAnswer {
    error_answer(
        StatusCode::BAD_REQUEST,
        &error.to_string(),
        Some(error.header),
        Some("nothing was forwarded; send If-Match: \"<etag>\" (or the bare etag, or *)"),
    )
}

/// 428 (RFC 6585): the policy requires writes to be conditional.
pub fn precondition_required(method: &Method, key: &ResourceKey) -> GatewayAnswer {
    error_answer(
        StatusCode::PRECONDITION_REQUIRED,
        &format!("{method} on '{key}' must be conditional"),
        Some("If-Match"),
        Some("GET the resource, then resend the write with If-Match: <the ETag you got>; to create a new resource send If-None-Match: *"),
    )
}

/// 4xx: the gateway refused the request while reading it; nothing the backend could apply was sent.
pub fn request_refused(status: StatusCode, detail: &str) -> GatewayAnswer {
    error_answer(
        status,
        detail,
        None,
        Some("the request was cut off before the backend got all of it; a write that was reserved has an unknown outcome: read the resource again before retrying"),
    )
}

/// 503: the etag store could not answer, so the gateway cannot vouch for anything; nothing forwarded.
pub fn store_unavailable(detail: &str) -> GatewayAnswer {
    error_answer(
        StatusCode::SERVICE_UNAVAILABLE,
        detail,
        None,
        Some("nothing was forwarded; retry later"),
    )
}

/// 502/504: the backend could not be reached or did not answer in time.
pub fn upstream_failed(
    status: StatusCode,
    detail: &str,
    write_outcome_unknown: bool,
) -> GatewayAnswer {
    let hint = if write_outcome_unknown {
        "the write may or may not have been applied; GET the resource for its current state and etag before writing again"
    } else {
        "nothing was applied; retry later"
    };
    error_answer(status, detail, None, Some(hint))
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing plain structs of strings cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| String::from("{}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precondition::{parse_if_match, TagSet};

    fn if_match(value: &str) -> Preconditions {
        Preconditions {
            if_match: parse_if_match([value.as_bytes()]).unwrap(),
            ..Preconditions::default()
        }
    }

    #[test]
    fn conflict_body_is_the_seeds_byte_for_byte() {
        let key = ResourceKey::from_path("/docs/bobs_address");
        let carried = if_match("dd62a2e0-2744-11df-a9ff-001c251ced36");
        let current = Etag::parse("ac6ca153-2745-11df-a9ff-001c251ced36").unwrap();
        let answer = conflict(
            StatusCode::CONFLICT,
            &Method::PUT,
            &key,
            &carried,
            Some(current),
        );
        assert_eq!(answer.status, StatusCode::CONFLICT);
        assert_eq!(answer.etag, Some(current));
        assert_eq!(
            answer.body,
            r#"{"url":"/docs/bobs_address","actualETag":"dd62a2e0-2744-11df-a9ff-001c251ced36","expectedETag":"ac6ca153-2745-11df-a9ff-001c251ced36","error":"PUT attempted on document 'bobs_address' using a non current etag"}"#
        );
    }

    #[test]
    fn conflict_names_the_method_and_reports_unknown_as_null() {
        let key = ResourceKey::from_path("/docs/x");
        let carried = if_match("\"abc\"");
        let answer = conflict(
            StatusCode::PRECONDITION_FAILED,
            &Method::DELETE,
            &key,
            &carried,
            None,
        );
        assert_eq!(answer.status, StatusCode::PRECONDITION_FAILED);
        assert_eq!(answer.etag, None);
        assert_eq!(
            answer.body,
            r#"{"url":"/docs/x","actualETag":"abc","expectedETag":null,"error":"DELETE attempted on document 'x' using a non current etag"}"#
        );
    }

    #[test]
    fn error_answers_are_json_that_says_what_was_wrong() {
        let err = parse_if_match([&b"\"open"[..]]).unwrap_err();
        let answer = malformed(&err);
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(v["header"], "If-Match");
        assert!(v["error"].as_str().unwrap().contains("never closed"));

        let create_only = Preconditions {
            if_none_match: Some(TagSet::Any),
            ..Preconditions::default()
        };
        let answer = conflict(
            StatusCode::CONFLICT,
            &Method::PUT,
            &ResourceKey::from_path("/d/a"),
            &create_only,
            None,
        );
        assert!(
            answer.body.contains("'a' which already exists"),
            "{}",
            answer.body
        );
        assert!(
            answer.body.contains(r#""actualETag":"*""#),
            "{}",
            answer.body
        );

        let answer = precondition_required(&Method::PUT, &ResourceKey::from_path("/a"));
        assert_eq!(answer.status.as_u16(), 428);
        let v: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert!(v["hint"].as_str().unwrap().contains("If-Match"));
    }
}
