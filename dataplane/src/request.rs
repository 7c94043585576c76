//! Reading a client's JSON body and writing the upstream's.
//!
//! The body is parsed one level deep: top-level fields are kept as raw JSON slices borrowed
//! from the request bytes, so a 100 KB prompt is never walked or copied into a tree. Only
//! `model`, `stream`, `stream_options` and the fields that bound the output (`max_tokens`,
//! `max_completion_tokens`, `n`, `best_of`) are read; the upstream body is the same fields
//! written back with the upstream model name and `include_usage` switched on.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::error::ProxyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// Path below the provider's base URL.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    fn input_field(self) -> &'static str {
        match self {
            Self::Chat => "messages",
            Self::Completions => "prompt",
            Self::Embeddings => "input",
        }
    }
}

/// No model writes more output tokens than this per choice; a larger `max_tokens` is a
/// mistake or an attempt to overflow a reservation, and gets a 400.
pub const MAX_OUTPUT_TOKENS: u64 = u32::MAX as u64;
/// Most choices (`n`, `best_of`) one request may ask for; OpenAI allows 128.
pub const MAX_CHOICES: u64 = 128;

#[derive(Debug)]
pub struct ApiRequest<'a> {
    pub endpoint: Endpoint,
    fields: BTreeMap<String, &'a RawValue>,
    pub model: String,
    pub stream: bool,
    /// The client itself asked for the usage chunk in the stream.
    pub client_wants_usage: bool,
    /// The larger of `max_tokens` and `max_completion_tokens`, per choice.
    pub max_tokens: Option<u64>,
    /// Which of the two fields `max_tokens` came from, for error messages.
    max_tokens_field: &'static str,
    /// Completions generated upstream: `n`, or `best_of` when larger (completions only).
    pub choices: u64,
    /// Raw JSON size of the prompt (messages, prompt or input).
    pub prompt_bytes: usize,
}

fn bad(msg: impl Into<String>) -> ProxyError {
    ProxyError::BadRequest(msg.into())
}

impl<'a> ApiRequest<'a> {
    pub fn parse(endpoint: Endpoint, body: &'a [u8]) -> Result<Self, ProxyError> {
        if body.is_empty() {
            return Err(bad("the request body is empty; send a JSON object"));
        }
        let fields: BTreeMap<String, &'a RawValue> = serde_json::from_slice(body)
            .map_err(|e| bad(format!("the request body is not a JSON object: {e}")))?;
        let model = match fields.get("model") {
            None => return Err(bad("missing required field 'model'")),
            Some(raw) => match serde_json::from_str::<String>(raw.get()) {
                Ok(m) if !m.is_empty() => m,
                _ => return Err(bad("'model' must be a non-empty string")),
            },
        };
        let stream = match fields.get("stream") {
            None => false,
            Some(raw) => match raw.get() {
                "true" => true,
                "false" | "null" => false,
                _ => return Err(bad("'stream' must be a boolean")),
            },
        };
        if stream && endpoint == Endpoint::Embeddings {
            return Err(bad("embeddings cannot be streamed"));
        }
        let client_wants_usage = match fields.get("stream_options") {
            None => false,
            Some(raw) => {
                #[derive(serde::Deserialize)]
                struct StreamOptions {
                    #[serde(default)]
                    include_usage: Option<bool>,
                }
                match serde_json::from_str::<Option<StreamOptions>>(raw.get()) {
                    Ok(o) => o.and_then(|o| o.include_usage).unwrap_or(false),
                    Err(_) => return Err(bad("'stream_options' must be an object")),
                }
            }
        };
        let mut max_tokens: Option<u64> = None;
        let mut max_tokens_field = "max_tokens";
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(v) = int_field(&fields, field, 0, MAX_OUTPUT_TOKENS)?
                && max_tokens.is_none_or(|m| v > m)
            {
                max_tokens = Some(v);
                max_tokens_field = field;
            }
        }
        let mut choices = int_field(&fields, "n", 1, MAX_CHOICES)?.unwrap_or(1);
        if endpoint == Endpoint::Completions {
            // The server generates `best_of` candidates and returns the best `n`.
            choices = choices.max(int_field(&fields, "best_of", 1, MAX_CHOICES)?.unwrap_or(1));
        }
        let input = endpoint.input_field();
        let prompt_bytes = match fields.get(input) {
            Some(raw) if raw.get() != "null" => raw.get().len(),
            _ => return Err(bad(format!("missing required field '{input}'"))),
        };
        if endpoint == Endpoint::Chat && !fields[input].get().starts_with('[') {
            return Err(bad("'messages' must be an array"));
        }
        Ok(Self {
            endpoint,
            fields,
            model,
            stream,
            client_wants_usage,
            max_tokens,
            max_tokens_field,
            choices,
            prompt_bytes,
        })
    }

    /// Output tokens to reserve: the larger of `max_tokens` and `max_completion_tokens` (or
    /// `default` when neither is set) for each of `choices`. A value above the route's
    /// `ceiling` is refused; the default is held to the ceiling.
    pub fn output_reservation(
        &self,
        default: u64,
        ceiling: Option<u64>,
    ) -> Result<u64, ProxyError> {
        if self.endpoint == Endpoint::Embeddings {
            return Ok(0);
        }
        let per_choice = match (self.max_tokens, ceiling) {
            (Some(v), Some(c)) if v > c => {
                return Err(ProxyError::InvalidParam {
                    param: self.max_tokens_field,
                    message: format!(
                        "'{}' is {v}, above this model's ceiling of {c} output tokens (the route's maxOutputTokens)",
                        self.max_tokens_field
                    ),
                });
            }
            (Some(v), _) => v,
            (None, c) => c.map_or(default, |c| default.min(c)),
        };
        Ok(per_choice.saturating_mul(self.choices))
    }

    /// A deliberately generous prompt estimate (about 4 bytes of JSON per token) used for
    /// reservations and for metering when an upstream reports no usage.
    pub fn prompt_tokens_estimate(&self) -> u64 {
        (self.prompt_bytes as u64).div_ceil(4)
    }

    /// Raw JSON of a top-level field.
    pub fn field(&self, name: &str) -> Option<&'a str> {
        self.fields.get(name).map(|r| r.get())
    }

    /// The body to send upstream: the client's fields, `model` replaced, and for streams
    /// `stream_options.include_usage` on so the stream can be metered.
    pub fn upstream_body(&self, model: &str) -> Bytes {
        let mut out = Vec::with_capacity(self.prompt_bytes + 256);
        out.push(b'{');
        for (k, v) in &self.fields {
            if k == "model" || (self.stream && k == "stream_options") {
                continue;
            }
            write_json_str(&mut out, k);
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
            out.push(b',');
        }
        out.extend_from_slice(b"\"model\":");
        write_json_str(&mut out, model);
        if self.stream {
            out.extend_from_slice(b",\"stream_options\":");
            let mut opts = self
                .fields
                .get("stream_options")
                .and_then(|raw| {
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get())
                        .ok()
                })
                .unwrap_or_default();
            opts.insert("include_usage".into(), serde_json::Value::Bool(true));
            let _ = serde_json::to_writer(&mut out, &opts);
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

/// An optional integer field in `min..=max` (`null` counts as absent).
fn int_field(
    fields: &BTreeMap<String, &RawValue>,
    field: &'static str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ProxyError> {
    let Some(raw) = fields.get(field) else {
        return Ok(None);
    };
    match serde_json::from_str::<Option<u64>>(raw.get()) {
        Ok(v) if v.is_none_or(|v| (min..=max).contains(&v)) => Ok(v),
        _ => Err(ProxyError::InvalidParam {
            param: field,
            message: format!(
                "'{field}' must be an integer from {min} to {max}, not {}",
                raw.get().chars().take(40).collect::<String>()
            ),
        }),
    }
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_model_and_asks_for_usage() {
        let body = br#"{"model":"public","messages":[{"role":"user","content":"hi \"there\""}],"stream":true,"temperature":0.2}"#;
        let req = ApiRequest::parse(Endpoint::Chat, body).unwrap();
        assert!(req.stream && !req.client_wants_usage);
        let up: serde_json::Value =
            serde_json::from_slice(&req.upstream_body("upstream-1")).unwrap();
        assert_eq!(up["model"], "upstream-1");
        assert_eq!(up["stream_options"]["include_usage"], true);
        assert_eq!(up["messages"][0]["content"], "hi \"there\"");
        assert_eq!(up["temperature"], 0.2);
    }

    #[test]
    fn keeps_client_stream_options() {
        let body = br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true,"x":1}}"#;
        let req = ApiRequest::parse(Endpoint::Chat, body).unwrap();
        assert!(req.client_wants_usage);
        let up: serde_json::Value = serde_json::from_slice(&req.upstream_body("m")).unwrap();
        assert_eq!(up["stream_options"]["x"], 1);
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"[1,2]", "not a JSON object"),
            (b"{\"model\":", "not a JSON object"),
            (b"{\"messages\":[]}", "'model'"),
            (b"{\"model\":7,\"messages\":[]}", "'model' must be"),
            (
                b"{\"model\":\"m\",\"messages\":[],\"stream\":\"yes\"}",
                "'stream'",
            ),
            (b"{\"model\":\"m\"}", "'messages'"),
            (b"{\"model\":\"m\",\"messages\":{}}", "must be an array"),
            (
                b"{\"model\":\"m\",\"messages\":[],\"max_tokens\":-1}",
                "max_tokens",
            ),
        ];
        for (body, want) in cases {
            let err = ApiRequest::parse(Endpoint::Chat, body)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    fn chat(extra: &str) -> Vec<u8> {
        format!(r#"{{"model":"m","messages":[]{extra}}}"#).into_bytes()
    }

    fn reservation(endpoint: Endpoint, body: &[u8], ceiling: Option<u64>) -> Result<u64, String> {
        let req = ApiRequest::parse(endpoint, body).map_err(|e| e.to_string())?;
        req.output_reservation(1000, ceiling)
            .map_err(|e| e.to_string())
    }

    fn param_of(endpoint: Endpoint, body: &[u8], ceiling: Option<u64>) -> &'static str {
        let err = match ApiRequest::parse(endpoint, body) {
            Err(e) => e,
            Ok(req) => req.output_reservation(1000, ceiling).unwrap_err(),
        };
        match err {
            ProxyError::InvalidParam { param, .. } => param,
            other => panic!("not a parameter error: {other}"),
        }
    }

    #[test]
    fn reservation_takes_the_larger_field_times_the_choices() {
        let cases: &[(Endpoint, &str, u64)] = &[
            (Endpoint::Chat, "", 1000),
            (Endpoint::Chat, r#","max_tokens":null"#, 1000),
            (Endpoint::Chat, r#","max_tokens":10"#, 10),
            (Endpoint::Chat, r#","max_completion_tokens":20"#, 20),
            (
                Endpoint::Chat,
                r#","max_tokens":10,"max_completion_tokens":20"#,
                20,
            ),
            (
                Endpoint::Chat,
                r#","max_tokens":30,"max_completion_tokens":20"#,
                30,
            ),
            (
                Endpoint::Chat,
                r#","max_tokens":30,"max_completion_tokens":null"#,
                30,
            ),
            (Endpoint::Chat, r#","max_tokens":30,"n":4"#, 120),
            (Endpoint::Chat, r#","n":3"#, 3000),
            // best_of means nothing to chat; the completions endpoint generates that many.
            (Endpoint::Chat, r#","max_tokens":30,"best_of":5"#, 30),
            (Endpoint::Chat, r#","max_tokens":0,"n":128"#, 0),
        ];
        for (endpoint, extra, want) in cases {
            assert_eq!(
                reservation(*endpoint, &chat(extra), None),
                Ok(*want),
                "{extra}"
            );
        }
        let completions = |extra: &str| format!(r#"{{"model":"m","prompt":"hi"{extra}}}"#);
        for (extra, want) in [
            (r#","max_tokens":30,"best_of":5"#, 150),
            (r#","max_tokens":30,"best_of":2,"n":2"#, 60),
            (r#","max_tokens":30,"n":3"#, 90),
        ] {
            assert_eq!(
                reservation(Endpoint::Completions, completions(extra).as_bytes(), None),
                Ok(want),
                "{extra}"
            );
        }
        let emb = br#"{"model":"m","input":"hi","max_tokens":5,"n":3}"#;
        assert_eq!(reservation(Endpoint::Embeddings, emb, None), Ok(0));
    }

    #[test]
    fn the_largest_values_saturate_instead_of_wrapping() {
        let max = MAX_OUTPUT_TOKENS;
        let body = chat(&format!(r#","max_tokens":{max},"n":{MAX_CHOICES}"#));
        assert_eq!(
            reservation(Endpoint::Chat, &body, None),
            Ok(max * MAX_CHOICES)
        );
        let plain = chat("");
        let req = ApiRequest::parse(Endpoint::Chat, &plain).unwrap();
        assert_eq!(
            req.output_reservation(u64::MAX, None).unwrap(),
            u64::MAX,
            "a huge default never wraps"
        );
        let many = chat(r#","n":128"#);
        let req = ApiRequest::parse(Endpoint::Chat, &many).unwrap();
        assert_eq!(req.output_reservation(u64::MAX, None).unwrap(), u64::MAX);
    }

    #[test]
    fn absurd_negative_or_fractional_values_name_their_field() {
        let u64_max = u64::MAX.to_string();
        let cases: Vec<(String, &str)> = vec![
            (format!(r#","max_tokens":{u64_max}"#), "max_tokens"),
            (r#","max_tokens":18446744073709551616"#.into(), "max_tokens"),
            (r#","max_tokens":4294967296"#.into(), "max_tokens"),
            (r#","max_tokens":-1"#.into(), "max_tokens"),
            (r#","max_tokens":1.5"#.into(), "max_tokens"),
            (r#","max_tokens":1e400"#.into(), "max_tokens"),
            (r#","max_tokens":"100""#.into(), "max_tokens"),
            (
                format!(r#","max_tokens":10,"max_completion_tokens":{u64_max}"#),
                "max_completion_tokens",
            ),
            (
                r#","max_completion_tokens":-5"#.into(),
                "max_completion_tokens",
            ),
            (r#","n":0"#.into(), "n"),
            (r#","n":129"#.into(), "n"),
            (format!(r#","n":{u64_max}"#), "n"),
            (r#","n":-1"#.into(), "n"),
            (r#","n":2.5"#.into(), "n"),
        ];
        for (extra, field) in &cases {
            assert_eq!(
                param_of(Endpoint::Chat, &chat(extra), None),
                *field,
                "{extra}"
            );
        }
        let body = br#"{"model":"m","prompt":"x","best_of":1000}"#;
        assert_eq!(param_of(Endpoint::Completions, body, None), "best_of");
        let err = ApiRequest::parse(Endpoint::Chat, &chat(r#","n":0"#)).unwrap_err();
        let resp = err.into_response();
        assert_eq!(resp.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_route_ceiling_refuses_larger_requests_and_bounds_the_default() {
        let body = chat(r#","max_tokens":10,"max_completion_tokens":600"#);
        assert_eq!(
            param_of(Endpoint::Chat, &body, Some(500)),
            "max_completion_tokens"
        );
        let err = reservation(Endpoint::Chat, &body, Some(500)).unwrap_err();
        assert!(err.contains("ceiling of 500"), "{err}");
        assert_eq!(
            reservation(Endpoint::Chat, &chat(r#","max_tokens":500"#), Some(500)),
            Ok(500)
        );
        assert_eq!(reservation(Endpoint::Chat, &chat(""), Some(500)), Ok(500));
        assert_eq!(
            reservation(Endpoint::Chat, &chat(r#","n":2"#), Some(5000)),
            Ok(2000)
        );
    }
}
