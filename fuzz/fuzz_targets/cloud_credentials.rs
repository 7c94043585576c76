//! What the cloud backends and their credential endpoints answer: bytes →
//! `aws_auth::web_identity_response` (STS XML), `google_auth::token_response` (OAuth2 JSON),
//! `google_auth::ServiceAccountKey::from_json` (a key file), `bedrock::error_in`,
//! `gemini::error_in`, and the answers `bedrock::response_in`, `gemini::response_in` and
//! `openai_responses::response_in` (each answer read written back for every client).
//!
//! Input: two bytes of status (big-endian), one byte `n`, `n` bytes of the
//! `x-amzn-ErrorType` header Bedrock's error reader is given (lossily; none when `n` is 0),
//! then the body every reader is given. Checked, whatever the body:
//!   - nothing panics;
//!   - an `Err` carries at most `MAX_ERROR` bytes, and an error read keeps the status and has a
//!     message, its message, `param` and `code` at most `MAX_ERROR` bytes: upstream text is
//!     clipped;
//!   - no `Err` of a credential reader carries the secret it was reading (an access token, a
//!     private key, a secret access key or session token), unless the fields an error is
//!     documented to quote hold it too;
//!   - an answer read is written as one JSON object for each client dialect.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::canonical::{ApiError, Response};
use modelgate_dataplane::providers::{aws_auth, google_auth};
use modelgate_dataplane::translate::{anthropic, bedrock, gemini, openai_chat, openai_responses};
use serde_json::{Map, Value};

const MAX_ERROR: usize = 4096;
const REQUEST_ID: &str = "req-fuzz";
/// Secrets shorter than this could be in any message by chance.
const MIN_SECRET: usize = 8;

fn bounded<T>(what: &str, r: &Result<T, String>) {
    if let Err(e) = r {
        assert!(
            e.len() <= MAX_ERROR,
            "{what}: an error of {} bytes",
            e.len()
        );
        assert!(!e.is_empty(), "{what}: an empty error");
    }
}

fn api_error(what: &str, status: u16, e: &ApiError) {
    assert_eq!(e.status, status, "{what}");
    assert!(!e.message.is_empty(), "{what}: an error without a message");
    assert!(
        e.message.len() <= MAX_ERROR,
        "{what}: a message of {} bytes",
        e.message.len()
    );
    assert!(
        e.param.as_ref().is_none_or(|p| p.len() <= MAX_ERROR),
        "{what}"
    );
    assert!(
        e.code.as_ref().is_none_or(|c| c.len() <= MAX_ERROR),
        "{what}"
    );
}

fn json_object(what: &str, body: &[u8]) {
    if let Err(e) = serde_json::from_slice::<Map<String, Value>>(body) {
        panic!(
            "{what}: not a JSON object ({e}): {}",
            String::from_utf8_lossy(body)
        );
    }
}

fn answer(what: &str, r: Result<Response, String>) {
    bounded(what, &r);
    if let Ok(resp) = r {
        json_object(what, &openai_chat::response_out(&resp, "m", 0));
        json_object(what, &anthropic::response_out(&resp, "m"));
        json_object(what, &openai_responses::response_out(&resp, "m", 0));
    }
}

/// The string `key` of a JSON object body, if long enough to be a secret worth checking.
fn json_string(body: &[u8], key: &str) -> Option<(String, Map<String, Value>)> {
    let m: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let s = m.get(key)?.as_str()?.to_owned();
    (s.len() >= MIN_SECRET).then_some((s, m))
}

/// Whether any string member of `m` but `key` holds `secret` (an error may quote those).
fn quoted_elsewhere(m: &Map<String, Value>, key: &str, secret: &str) -> bool {
    m.iter()
        .any(|(k, v)| k != key && v.as_str().is_some_and(|s| s.contains(secret)))
}

/// The text of the first `<name>…</name>` of an XML body.
fn xml_element<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = start + text[start..].find(&format!("</{name}>"))?;
    Some(&text[start..end])
}

fn sts(body: &[u8]) {
    let r = aws_auth::web_identity_response(body);
    bounded("web_identity_response", &r);
    let (Err(e), Ok(text)) = (&r, std::str::from_utf8(body)) else {
        return;
    };
    // An error answer quotes its code and message, whatever else the body holds.
    if text.contains("<ErrorResponse") {
        return;
    }
    for name in ["SecretAccessKey", "SessionToken"] {
        if let Some(secret) = xml_element(text, name).filter(|s| s.len() >= MIN_SECRET) {
            assert!(!e.contains(secret), "an STS error carries the {name}: {e}");
        }
    }
}

fn token(body: &[u8]) {
    let r = google_auth::token_response(body);
    bounded("token_response", &r);
    if let Err(e) = &r
        && let Some((secret, m)) = json_string(body, "access_token")
        && !quoted_elsewhere(&m, "access_token", &secret)
    {
        assert!(!e.contains(&secret), "a token error carries the token: {e}");
    }
}

fn key(body: &[u8]) {
    let r = google_auth::ServiceAccountKey::from_json(body).map(|k| {
        assert!(!k.client_email().is_empty());
        assert!(k.token_uri().starts_with("http"));
    });
    bounded("ServiceAccountKey::from_json", &r);
    if let Err(e) = &r
        && let Some((secret, m)) = json_string(body, "private_key")
        && !quoted_elsewhere(&m, "private_key", &secret)
    {
        assert!(
            !e.contains(&secret),
            "a key error carries the private key: {e}"
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let [hi, lo, n, rest @ ..] = input else {
        return;
    };
    let status = u16::from_be_bytes([*hi, *lo]);
    let (header, body) = rest.split_at(usize::from(*n).min(rest.len()));
    let error_type = (*n != 0).then(|| String::from_utf8_lossy(header));

    sts(body);
    token(body);
    key(body);

    api_error(
        "bedrock::error_in",
        status,
        &bedrock::error_in(status, error_type.as_deref(), body),
    );
    api_error("gemini::error_in", status, &gemini::error_in(status, body));

    answer(
        "bedrock::response_in",
        bedrock::response_in(body, REQUEST_ID),
    );
    answer("gemini::response_in", gemini::response_in(body, REQUEST_ID));
    answer(
        "openai_responses::response_in",
        openai_responses::response_in(body),
    );
});
