//! Reading a client's JSON body and writing the upstream's.
//!
//! The body is parsed one level deep: top-level fields are kept as raw JSON slices borrowed
//! from the request bytes, so a 100 KB prompt is never walked or copied into a tree. Only
//! `model`, `stream`, `stream_options` and `max_tokens` are read; the upstream body is the
//! same fields written back with the upstream model name and `include_usage` switched on.

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

#[derive(Debug)]
pub struct ApiRequest<'a> {
    pub endpoint: Endpoint,
    fields: BTreeMap<String, &'a RawValue>,
    pub model: String,
    pub stream: bool,
    /// The client itself asked for the usage chunk in the stream.
    pub client_wants_usage: bool,
    pub max_tokens: Option<u64>,
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
        let mut max_tokens = None;
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(raw) = fields.get(field) {
                match serde_json::from_str::<Option<u64>>(raw.get()) {
                    Ok(v) => max_tokens = max_tokens.or(v),
                    Err(_) => return Err(bad(format!("'{field}' must be a non-negative integer"))),
                }
            }
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
            prompt_bytes,
        })
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
}
