//! The built-in mock model: answers in OpenAI's wire format without any network, so the
//! quickstart and demos work offline. Answers are deterministic: the same request gets the
//! same words, token counts and embedding vectors. Latency, answer length and the delay
//! between streamed chunks are set per backend.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::request::{ApiRequest, Endpoint};
use crate::stream::{MockStream, UpstreamBody};

#[derive(Debug, Clone)]
pub struct MockSettings {
    pub latency: Duration,
    pub chunk_delay: Duration,
    pub output_tokens: u32,
    pub dimensions: u32,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            output_tokens: 16,
            dimensions: 8,
        }
    }
}

/// The answer's words, one token each, cycled to the requested length.
fn words(prompt_tokens: u64, model: &str, n: u64) -> Vec<String> {
    let sentence = format!(
        "Hello from the modelgate mock model {model}. You sent about {prompt_tokens} prompt tokens."
    );
    let base: Vec<&str> = sentence.split(' ').collect();
    (0..n as usize)
        .map(|i| {
            let w = base[i % base.len()];
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

fn unix_now() -> u64 {
    crate::admission::unix_now()
}

fn response_id(req: &ApiRequest<'_>, prefix: &str) -> String {
    let digest = Sha256::digest(
        req.field("messages")
            .or(req.field("prompt"))
            .unwrap_or("")
            .as_bytes(),
    );
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-mock-{hex}")
}

pub async fn respond(
    s: &MockSettings,
    req: &ApiRequest<'_>,
    model: &str,
) -> Response<UpstreamBody> {
    if !s.latency.is_zero() {
        tokio::time::sleep(s.latency).await;
    }
    let prompt_tokens = req.prompt_tokens_estimate();
    if req.endpoint == Endpoint::Embeddings {
        return json_body(embeddings(s, req, model, prompt_tokens));
    }
    let wanted = u64::from(s.output_tokens);
    let n = req.max_tokens.map_or(wanted, |m| m.min(wanted)).max(1);
    let finish = if n < wanted { "length" } else { "stop" };
    let words = words(prompt_tokens, model, n);
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n});
    let chat = req.endpoint == Endpoint::Chat;
    let (id, object) = if chat {
        (response_id(req, "chatcmpl"), "chat.completion")
    } else {
        (response_id(req, "cmpl"), "text_completion")
    };
    let created = unix_now();
    if !req.stream {
        let text = words.concat();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        };
        return json_body(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice], "usage": usage, "system_fingerprint": "modelgate-mock",
        }));
    }
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = |choice: serde_json::Value| {
        let v = json!({"id": id, "object": object, "created": created, "model": model,
            "system_fingerprint": "modelgate-mock", "choices": [choice]});
        sse(&v)
    };
    let mut chunks = Vec::with_capacity(words.len() + 4);
    if chat {
        chunks.push(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})));
    }
    for w in &words {
        chunks.push(chunk(if chat {
            json!({"index": 0, "delta": {"content": w}, "logprobs": null, "finish_reason": null})
        } else {
            json!({"index": 0, "text": w, "logprobs": null, "finish_reason": null})
        }));
    }
    chunks.push(chunk(if chat {
        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish})
    }));
    // The gateway always asks upstreams for the usage chunk; it strips it for clients that
    // did not ask.
    chunks.push(sse(
        &json!({"id": id, "object": object, "created": created, "model": model,
        "system_fingerprint": "modelgate-mock", "choices": [], "usage": usage}),
    ));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let mut resp = Response::new(UpstreamBody::Mock(MockStream::new(chunks, s.chunk_delay)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn sse(v: &serde_json::Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn json_body(v: serde_json::Value) -> Response<UpstreamBody> {
    let body = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
    let mut resp = Response::new(UpstreamBody::Mock(MockStream::new(
        vec![body],
        Duration::ZERO,
    )));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn embeddings(
    s: &MockSettings,
    req: &ApiRequest<'_>,
    model: &str,
    prompt_tokens: u64,
) -> serde_json::Value {
    let raw = req.field("input").unwrap_or("\"\"");
    // A list of strings or of token lists embeds each item; anything else is one input.
    let items: Vec<String> = match serde_json::from_str::<Vec<serde_json::Value>>(raw) {
        Ok(v) if v.iter().all(|x| x.is_string() || x.is_array()) && !v.is_empty() => {
            v.iter().map(|x| x.to_string()).collect()
        }
        _ => vec![raw.to_owned()],
    };
    let base64 = req.field("encoding_format") == Some("\"base64\"");
    let dims = req
        .field("dimensions")
        .and_then(|d| d.parse::<u32>().ok())
        .filter(|d| (1..=s.dimensions.max(1)).contains(d))
        .unwrap_or(s.dimensions);
    let data: Vec<_> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let v = vector(item, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
}

/// A unit vector derived from the input's hash.
fn vector(item: &str, dims: u32) -> Vec<f32> {
    let mut seed = Sha256::digest(item.as_bytes()).to_vec();
    let mut v = Vec::with_capacity(dims as usize);
    while v.len() < dims as usize {
        for pair in seed.chunks(2) {
            let x = u16::from_le_bytes([pair[0], pair[1]]) as f32 / 32_768.0 - 1.0;
            v.push(x);
        }
        seed = Sha256::digest(&seed).to_vec();
    }
    v.truncate(dims as usize);
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter().map(|x| x / norm).collect()
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn vectors_are_deterministic_unit_vectors() {
        let a = vector("hello", 8);
        assert_eq!(a, vector("hello", 8));
        assert_ne!(a, vector("world", 8));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
