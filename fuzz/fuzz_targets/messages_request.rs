//! The proxy's one-pass reader of Anthropic bodies: arbitrary bytes as the JSON body of
//! `/v1/messages` or `/v1/messages/count_tokens` (`ApiRequest::parse`), as `request.rs`
//! checks the OpenAI endpoints.
//!
//! Input: the first byte picks the endpoint (`m` messages, `t` count_tokens, otherwise the
//! byte modulo 2), the rest is the body. Whatever the body: parsing answers `Ok` or an error
//! that becomes a 4xx; `messages` needs `max_tokens`, `count_tokens` is never a stream and
//! reserves no output; the output reservation never wraps past what a client may ask for;
//! the body sent upstream is one JSON object with the client's fields as sent and the
//! upstream model (Anthropic streams carry their usage: nothing is added); and when the
//! translators' reader (`anthropic::request_in`) also accepts the body, both read the same
//! model, stream flag and (without a `max_completion_tokens` the proxy also weighs)
//! `max_tokens`, so admission reserves what a translated request sends.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::error::ProxyError;
use modelgate_dataplane::request::{ApiRequest, Endpoint, MAX_CHOICES, MAX_OUTPUT_TOKENS};
use modelgate_dataplane::translate::anthropic;
use serde_json::value::RawValue;

/// (default reservation, route ceiling) pairs every parsed request is reserved against.
const RESERVATIONS: &[(u64, Option<u64>)] = &[
    (1024, None),
    (0, None),
    (u64::MAX, None),
    (1000, Some(500)),
    (1, Some(1)),
    (u64::MAX, Some(MAX_OUTPUT_TOKENS)),
    (u64::MAX, Some(u64::MAX)),
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let endpoint = match first {
        b'm' => Endpoint::Messages,
        b't' => Endpoint::CountTokens,
        b => [Endpoint::Messages, Endpoint::CountTokens][usize::from(b % 2)],
    };
    match ApiRequest::parse(endpoint, body) {
        Ok(req) => check(endpoint, body, &req),
        Err(e) => client_error(e),
    }
});

fn client_error(e: ProxyError) {
    assert!(!e.to_string().is_empty());
    let status = e.into_response().status();
    assert!(
        status.is_client_error(),
        "a bad body is the client's fault: {status}"
    );
}

fn check(endpoint: Endpoint, body: &[u8], req: &ApiRequest<'_>) {
    assert_eq!(req.endpoint, endpoint);
    assert!(!req.model.is_empty());
    assert!((1..=MAX_CHOICES).contains(&req.choices), "{}", req.choices);
    assert!(req.max_tokens.is_none_or(|m| m <= MAX_OUTPUT_TOKENS));
    assert!(req.client_wants_usage, "Anthropic streams always carry usage");
    assert!(!(req.stream && endpoint == Endpoint::CountTokens));
    if endpoint == Endpoint::Messages {
        assert!(req.field("max_tokens").is_some(), "messages without max_tokens");
    }
    assert!(req.prompt_bytes <= body.len());
    let _ = req.prompt_tokens_estimate();

    for &(default, ceiling) in RESERVATIONS {
        match req.output_reservation(default, ceiling) {
            Ok(r) => {
                if endpoint == Endpoint::CountTokens {
                    assert_eq!(r, 0);
                    continue;
                }
                let per_choice = match (req.max_tokens, ceiling) {
                    (Some(m), _) => m,
                    (None, Some(c)) => default.min(c),
                    (None, None) => default,
                };
                assert!(ceiling.is_none_or(|c| per_choice <= c));
                assert_eq!(r, per_choice.saturating_mul(req.choices));
            }
            Err(e) => {
                // Only a `max_tokens` above the ceiling is refused.
                let (Some(m), Some(c)) = (req.max_tokens, ceiling) else {
                    panic!("refused without a ceiling: {e}");
                };
                assert!(m > c);
                assert!(matches!(e, ProxyError::InvalidParam { .. }), "{e:?}");
                client_error(e);
            }
        }
    }

    let client = object(body).expect("a parsed body is a JSON object");
    for model in ["upstream-model", "", "quote \" and \\ and \u{1F680}"] {
        let up = req.upstream_body(model);
        let fields = object(&up).unwrap_or_else(|| {
            panic!(
                "upstream body is not a JSON object: {}",
                String::from_utf8_lossy(&up)
            )
        });
        let got: String = serde_json::from_str(fields["model"].get()).unwrap();
        assert_eq!(got, model);
        for (k, v) in &client {
            if k == "model" {
                continue;
            }
            assert_eq!(fields.get(k).map(|r| r.get()), Some(v.get()), "field {k:?}");
            assert_eq!(req.field(k), Some(v.get()));
        }
        assert_eq!(fields.len(), client.len());
    }

    if let Ok(a) = anthropic::request_in(body) {
        assert_eq!(a.model, req.model, "the two readers' model");
        assert_eq!(a.stream, req.stream, "the two readers' stream");
        if endpoint == Endpoint::Messages && req.field("max_completion_tokens").is_none() {
            assert_eq!(a.max_output_tokens, req.max_tokens, "the two readers' max_tokens");
        }
    }
}

/// Top-level fields of a JSON object, raw; None when `bytes` is not one.
fn object(bytes: &[u8]) -> Option<BTreeMap<String, &RawValue>> {
    serde_json::from_slice(bytes).ok()
}
