//! Reading a client's JSON body and writing the upstream's.
//!
//! One pass over the top-level object keeps the fields the gateway reads (`model`, `stream`,
//! `stream_options`, the fields that bound the output and the prompt) as raw JSON slices
//! borrowed from the request bytes; every other field is checked and skipped, so a 100 KB
//! prompt is validated once and never copied or built into a tree. The upstream body is the
//! client's bytes with at most two splices, every other byte kept as the client sent it:
//!
//! ```text
//! client    { "model":"public", "messages":[...], "stream":true }
//!                     ^^^^^^^^                                  ^
//! upstream  { "model":"gpt-4o", "messages":[...], "stream":true ,"stream_options":{"include_usage":true}}
//! ```
//!
//! The usage splice (streams only) switches on `stream_options.include_usage` so the stream
//! can be metered: it sets the value to `true`, adds the key to the client's object, replaces
//! a `null`, or adds the whole field before the closing brace.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ProxyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    /// Anthropic's Messages API.
    Messages,
    /// Anthropic's token counting: no model output, nothing metered but the request.
    CountTokens,
    /// OpenAI's Responses API.
    Responses,
}

impl Endpoint {
    /// Path below the provider's base URL.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
            Self::Messages => "/messages",
            Self::CountTokens => "/messages/count_tokens",
            Self::Responses => "/responses",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Messages => "messages",
            Self::CountTokens => "count_tokens",
            Self::Responses => "responses",
        }
    }

    /// The dialect a client of this endpoint speaks, for translations and errors.
    pub fn dialect(self) -> crate::translate::Dialect {
        match self {
            Self::Messages | Self::CountTokens => crate::translate::Dialect::Anthropic,
            Self::Responses => crate::translate::Dialect::OpenAiResponses,
            Self::Chat | Self::Completions | Self::Embeddings => {
                crate::translate::Dialect::OpenAiChat
            }
        }
    }

    fn anthropic(self) -> bool {
        matches!(self, Self::Messages | Self::CountTokens)
    }

    fn input_field(self) -> Field {
        match self {
            Self::Chat | Self::Messages | Self::CountTokens => Field::Messages,
            Self::Completions => Field::Prompt,
            Self::Embeddings | Self::Responses => Field::Input,
        }
    }
}

/// No model writes more output tokens than this per choice; a larger `max_tokens` is a
/// mistake or an attempt to overflow a reservation, and gets a 400.
pub const MAX_OUTPUT_TOKENS: u64 = u32::MAX as u64;
/// Most choices (`n`, `best_of`) one request may ask for; OpenAI allows 128.
pub const MAX_CHOICES: u64 = 128;

/// The top-level fields the gateway reads.
///
/// A body that repeats one of them is refused. The gateway forwards the client's bytes, so
/// it must act on the same copy the upstream acts on, and JSON parsers disagree on which
/// that is (serde_json, Python and Go keep the last, some keep the first, some refuse):
/// with `"max_tokens":100000,"max_tokens":1` the gateway could reserve for one token while
/// an upstream generates 100,000, or route and meter by one `model` while the upstream
/// serves another. No SDK sends such bodies. Other fields are the upstream's business and
/// pass through as sent, repeats included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Model,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    N,
    BestOf,
    Messages,
    Prompt,
    Input,
    /// Anthropic bodies: part of the prompt.
    System,
    /// Anthropic and Responses bodies: part of the prompt.
    Tools,
    /// Responses bodies: part of the prompt.
    Instructions,
    /// Responses bodies: the output bound.
    MaxOutputTokens,
}

impl Field {
    const COUNT: usize = 14;

    /// The field the gateway reads under `key` in a body of `endpoint`: `system` is read
    /// (and so refused when repeated) only in Anthropic bodies and `instructions` only in
    /// Responses bodies, `tools` in both, where they are part of the prompt; a Responses body
    /// is bounded by `max_output_tokens` alone (its API has no `max_tokens` or `n`).
    fn read(key: &str, endpoint: Endpoint) -> Option<Self> {
        let responses = endpoint == Endpoint::Responses;
        Self::of(key).filter(|f| match f {
            Self::System => endpoint.anthropic(),
            Self::Tools => endpoint.anthropic() || responses,
            Self::Instructions | Self::MaxOutputTokens => responses,
            Self::MaxTokens | Self::MaxCompletionTokens | Self::N | Self::StreamOptions => {
                !responses
            }
            _ => true,
        })
    }

    /// Matches the key as JSON decodes it, so `"mod\u0065l"` is `model`.
    fn of(key: &str) -> Option<Self> {
        Some(match key {
            "model" => Self::Model,
            "stream" => Self::Stream,
            "stream_options" => Self::StreamOptions,
            "max_tokens" => Self::MaxTokens,
            "max_completion_tokens" => Self::MaxCompletionTokens,
            "n" => Self::N,
            "best_of" => Self::BestOf,
            "messages" => Self::Messages,
            "prompt" => Self::Prompt,
            "input" => Self::Input,
            "system" => Self::System,
            "tools" => Self::Tools,
            "instructions" => Self::Instructions,
            "max_output_tokens" => Self::MaxOutputTokens,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Stream => "stream",
            Self::StreamOptions => "stream_options",
            Self::MaxTokens => "max_tokens",
            Self::MaxCompletionTokens => "max_completion_tokens",
            Self::N => "n",
            Self::BestOf => "best_of",
            Self::Messages => "messages",
            Self::Prompt => "prompt",
            Self::Input => "input",
            Self::System => "system",
            Self::Tools => "tools",
            Self::Instructions => "instructions",
            Self::MaxOutputTokens => "max_output_tokens",
        }
    }
}

/// Bytes of the body replaced by fixed text when the upstream body is written.
type Splice = (Range<usize>, &'static str);

#[derive(Debug)]
pub struct ApiRequest<'a> {
    pub endpoint: Endpoint,
    body: &'a [u8],
    /// The raw values of the fields the gateway reads, by `Field`.
    fields: [Option<&'a RawValue>; Field::COUNT],
    /// Borrowed from the body unless the client escaped characters in it.
    pub model: Cow<'a, str>,
    /// Where `model`'s value, quotes included, lies in the body.
    model_span: Range<usize>,
    /// For a stream whose body does not switch `include_usage` on: the splice that does.
    usage_splice: Option<Splice>,
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
        let mut fields = [None; Field::COUNT];
        let mut repeated = None;
        each_field(
            body,
            |key| Field::read(key, endpoint),
            |field, raw| {
                if fields[field as usize].replace(raw).is_some() {
                    repeated.get_or_insert(field);
                }
            },
        )
        .map_err(|e| bad(format!("the request body is not a JSON object: {e}")))?;
        if let Some(field) = repeated {
            return Err(bad(format!(
                "'{}' appears more than once in the request body; send each field once",
                field.name()
            )));
        }
        let get = |field: Field| fields[field as usize];

        let (model, model_span) = match get(Field::Model) {
            None => return Err(bad("missing required field 'model'")),
            Some(raw) => match string(raw) {
                Some(m) if !m.is_empty() => (m, span(body, raw)),
                _ => return Err(bad("'model' must be a non-empty string")),
            },
        };
        let stream = match get(Field::Stream) {
            None => false,
            Some(raw) => match raw.get() {
                "true" => true,
                "false" | "null" => false,
                _ => return Err(bad("'stream' must be a boolean")),
            },
        };
        if stream && matches!(endpoint, Endpoint::Embeddings | Endpoint::CountTokens) {
            return Err(bad(format!("{} cannot be streamed", endpoint.as_str())));
        }
        let stream_options = get(Field::StreamOptions);
        let include_usage = match stream_options {
            None => None,
            Some(raw) => {
                /// `include_usage` as written, `null` included, so it can be replaced.
                #[derive(serde::Deserialize)]
                struct StreamOptions<'a> {
                    #[serde(default, borrow, deserialize_with = "present")]
                    include_usage: Option<&'a RawValue>,
                }
                fn present<'de, D: Deserializer<'de>>(
                    d: D,
                ) -> Result<Option<&'de RawValue>, D::Error> {
                    serde::Deserialize::deserialize(d).map(Some)
                }
                match serde_json::from_str::<Option<StreamOptions<'a>>>(raw.get()) {
                    Ok(o) => match o.and_then(|o| o.include_usage) {
                        Some(v) if !matches!(v.get(), "true" | "false" | "null") => {
                            return Err(bad("'stream_options' must be an object"));
                        }
                        v => v,
                    },
                    Err(_) => return Err(bad("'stream_options' must be an object")),
                }
            }
        };
        // Anthropic and Responses streams always carry their usage.
        let own_usage = endpoint.anthropic() || endpoint == Endpoint::Responses;
        let client_wants_usage = own_usage || include_usage.is_some_and(|v| v.get() == "true");
        let usage_splice = match stream_options {
            _ if !stream || own_usage => None,
            None => {
                let close = body
                    .iter()
                    .rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                    .expect("a JSON object ends with '}'");
                Some((close..close, ",\"stream_options\":{\"include_usage\":true}"))
            }
            // `null`, or the array form `[true]` that serde reads as a struct: a replacement
            // object the upstream reads for sure.
            Some(raw) if !raw.get().starts_with('{') => {
                Some((span(body, raw), "{\"include_usage\":true}"))
            }
            Some(raw) => match include_usage {
                Some(v) if v.get() == "true" => None,
                Some(v) => Some((span(body, v), "true")),
                None => {
                    let open = span(body, raw).start + 1;
                    let empty = raw.get()[1..]
                        .trim_start_matches([' ', '\t', '\n', '\r'])
                        .starts_with('}');
                    let text = if empty {
                        "\"include_usage\":true"
                    } else {
                        "\"include_usage\":true,"
                    };
                    Some((open..open, text))
                }
            },
        };

        let mut max_tokens: Option<u64> = None;
        let mut max_tokens_field = "max_tokens";
        for field in [
            Field::MaxTokens,
            Field::MaxCompletionTokens,
            Field::MaxOutputTokens,
        ] {
            if let Some(v) = int_field(get(field), field, 0, MAX_OUTPUT_TOKENS)?
                && max_tokens.is_none_or(|m| v > m)
            {
                max_tokens = Some(v);
                max_tokens_field = field.name();
            }
        }
        let mut choices = int_field(get(Field::N), Field::N, 1, MAX_CHOICES)?.unwrap_or(1);
        if endpoint == Endpoint::Completions {
            // The server generates `best_of` candidates and returns the best `n`.
            let best_of = int_field(get(Field::BestOf), Field::BestOf, 1, MAX_CHOICES)?;
            choices = choices.max(best_of.unwrap_or(1));
        }
        let input = endpoint.input_field();
        let prompt = match get(input) {
            Some(raw) if raw.get() != "null" => raw.get(),
            _ => return Err(bad(format!("missing required field '{}'", input.name()))),
        };
        if matches!(
            endpoint,
            Endpoint::Chat | Endpoint::Messages | Endpoint::CountTokens
        ) && !prompt.starts_with('[')
        {
            return Err(bad("'messages' must be an array"));
        }
        if endpoint == Endpoint::Responses && !(prompt.starts_with('[') || prompt.starts_with('"'))
        {
            return Err(ProxyError::InvalidParam {
                param: "input",
                message: "'input' must be a string or an array of input items".into(),
            });
        }
        let mut prompt_bytes = prompt.len();
        if endpoint == Endpoint::Responses {
            // The instructions and tool definitions are prompt too.
            for f in [Field::Instructions, Field::Tools] {
                prompt_bytes += get(f).map_or(0, |raw| raw.get().len());
            }
        }
        if endpoint.anthropic() {
            if endpoint == Endpoint::Messages && get(Field::MaxTokens).is_none() {
                return Err(ProxyError::InvalidParam {
                    param: "max_tokens",
                    message: "missing required field 'max_tokens'".into(),
                });
            }
            // Anthropic's prompt is also its system text and tool definitions.
            for f in [Field::System, Field::Tools] {
                prompt_bytes += get(f).map_or(0, |raw| raw.get().len());
            }
        }
        Ok(Self {
            endpoint,
            body,
            fields,
            model,
            model_span,
            usage_splice,
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
        if matches!(self.endpoint, Endpoint::Embeddings | Endpoint::CountTokens) {
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

    /// The client's body as it came.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// Raw JSON of a top-level field. The fields the gateway does not read are not kept:
    /// asking for one walks the body again (the mock provider does, the proxy does not) and
    /// finds the last copy, as serde_json would.
    pub fn field(&self, name: &str) -> Option<&'a str> {
        if let Some(field) = Field::read(name, self.endpoint) {
            return self.fields[field as usize].map(RawValue::get);
        }
        let mut found = None;
        each_field(
            self.body,
            |key| (key == name).then_some(()),
            |(), raw| {
                found = Some(raw);
            },
        )
        .ok()?;
        found.map(RawValue::get)
    }

    /// The body to send upstream: the client's bytes with `model` replaced, and for streams
    /// `stream_options.include_usage` on so the stream can be metered.
    pub fn upstream_body(&self, model: &str) -> Bytes {
        Bytes::from(self.splice(model))
    }

    /// The upstream body in one allocation of exactly its size.
    fn splice(&self, model: &str) -> Vec<u8> {
        enum Text<'t> {
            /// A string to write as JSON.
            Json(&'t str),
            Raw(&'static str),
        }
        let mut len = self.body.len() - self.model_span.len() + json_str_len(model);
        if let Some((at, text)) = &self.usage_splice {
            len = len - at.len() + text.len();
        }
        let model = (self.model_span.clone(), Text::Json(model));
        let usage = self
            .usage_splice
            .clone()
            .map(|(at, text)| (at, Text::Raw(text)));
        // The spans never overlap: `model`'s value is not inside `stream_options`'s, and the
        // closing brace is after both.
        let splices = match usage {
            Some(usage) if usage.0.start < model.0.start => [Some(usage), Some(model)],
            usage => [Some(model), usage],
        };
        let mut out = Vec::with_capacity(len);
        let mut copied = 0;
        for (at, text) in splices.into_iter().flatten() {
            out.extend_from_slice(&self.body[copied..at.start]);
            match text {
                Text::Json(s) => write_json_str(&mut out, s),
                Text::Raw(s) => out.extend_from_slice(s.as_bytes()),
            }
            copied = at.end;
        }
        out.extend_from_slice(&self.body[copied..]);
        debug_assert_eq!(out.len(), len);
        out
    }
}

/// Walks a JSON object's top-level fields in one pass: `key` picks the fields of interest
/// (it sees each key decoded, no String per key), `value` gets their raw JSON borrowed from
/// `body`. Every value is checked as JSON, the kept ones and the rest. The only allocation
/// is serde_json's scratch buffer, once, when a key is escaped or a value nests containers
/// (its stack for skipping them).
fn each_field<'a, T>(
    body: &'a [u8],
    key: impl Fn(&str) -> Option<T>,
    mut value: impl FnMut(T, &'a RawValue),
) -> Result<(), serde_json::Error> {
    struct Fields<'v, K, V> {
        key: &'v K,
        value: &'v mut V,
    }
    impl<'de, T, K, V> Visitor<'de> for Fields<'_, K, V>
    where
        K: Fn(&str) -> Option<T>,
        V: FnMut(T, &'de RawValue),
    {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key_seed(Key(self.key))? {
                let raw: &'de RawValue = map.next_value()?;
                if let Some(key) = key {
                    (self.value)(key, raw);
                }
            }
            Ok(())
        }
    }
    /// A key, decoded into serde_json's scratch buffer when escaped and borrowed otherwise.
    struct Key<'v, K>(&'v K);
    impl<'de, T, K: Fn(&str) -> Option<T>> DeserializeSeed<'de> for Key<'_, K> {
        type Value = Option<T>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<T, K: Fn(&str) -> Option<T>> Visitor<'_> for Key<'_, K> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a field name")
        }
        fn visit_str<E>(self, key: &str) -> Result<Option<T>, E> {
            Ok((self.0)(key))
        }
    }

    // One check of the whole body is cheaper than serde_json's check of each value.
    let body =
        std::str::from_utf8(body).map_err(<serde_json::Error as serde::de::Error>::custom)?;
    let mut de = serde_json::Deserializer::from_str(body);
    (&mut de).deserialize_map(Fields {
        key: &key,
        value: &mut value,
    })?;
    de.end()
}

/// Where a raw value borrowed from `body` lies in it.
fn span(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr().addr().wrapping_sub(body.as_ptr().addr());
    let end = start.wrapping_add(raw.get().len());
    assert!(
        start <= end && end <= body.len(),
        "a value parsed from the body lies within it"
    );
    start..end
}

/// A JSON string's value, borrowed unless it holds escapes.
fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let json = raw.get();
    match json.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(s) if !s.contains('\\') => Some(Cow::Borrowed(s)),
        _ => serde_json::from_str::<String>(json).ok().map(Cow::Owned),
    }
}

/// An optional integer field in `min..=max` (`null` counts as absent).
fn int_field(
    raw: Option<&RawValue>,
    field: Field,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ProxyError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    match serde_json::from_str::<Option<u64>>(raw.get()) {
        Ok(v) if v.is_none_or(|v| (min..=max).contains(&v)) => Ok(v),
        _ => Err(ProxyError::InvalidParam {
            param: field.name(),
            message: format!(
                "'{}' must be an integer from {min} to {max}, not {}",
                field.name(),
                raw.get().chars().take(40).collect::<String>()
            ),
        }),
    }
}

/// What a byte of a string becomes in JSON: itself (`None`), or `\` and a letter; `u` means
/// `\u00XX`. The same choices as serde_json's.
fn json_escape(b: u8) -> Option<u8> {
    Some(match b {
        b'"' => b'"',
        b'\\' => b'\\',
        b'\n' => b'n',
        b'\r' => b'r',
        b'\t' => b't',
        0x08 => b'b',
        0x0c => b'f',
        0x00..=0x1f => b'u',
        _ => return None,
    })
}

/// Length of `s` written as a JSON string, quotes included.
fn json_str_len(s: &str) -> usize {
    s.bytes().fold(2, |n, b| {
        n + match json_escape(b) {
            None => 1,
            Some(b'u') => 6,
            Some(_) => 2,
        }
    })
}

/// Appends `s` as a JSON string, quotes included.
pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut copied = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let Some(escape) = json_escape(b) else {
            continue;
        };
        out.extend_from_slice(&bytes[copied..i]);
        out.extend_from_slice(&[b'\\', escape]);
        if escape == b'u' {
            out.extend_from_slice(&[
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        }
        copied = i + 1;
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
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
    fn anthropic_bodies_pass_with_the_model_spliced_and_nothing_added() {
        let body = br#"{"model":"claude","max_tokens":300,"system":"Be brief.","tools":[{"name":"t","input_schema":{"type":"object"}}],"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let req = ApiRequest::parse(Endpoint::Messages, body).unwrap();
        assert!(
            req.stream && req.client_wants_usage,
            "Anthropic streams carry usage"
        );
        assert_eq!(req.max_tokens, Some(300));
        // The prompt is the messages, the system text and the tool definitions.
        let parts = [
            r#""Be brief.""#.len(),
            r#"[{"name":"t","input_schema":{"type":"object"}}]"#.len(),
            r#"[{"role":"user","content":"hi"}]"#.len(),
        ];
        assert_eq!(req.prompt_bytes, parts.iter().sum::<usize>());
        let up = req.upstream_body("claude-upstream");
        let expected = String::from_utf8_lossy(body).replace(r#""claude""#, r#""claude-upstream""#);
        assert_eq!(
            std::str::from_utf8(&up).unwrap(),
            expected,
            "no stream_options"
        );
        assert_eq!(req.output_reservation(1024, None).unwrap(), 300);
    }

    #[test]
    fn anthropic_bodies_need_max_tokens_and_count_tokens_none() {
        let no_max = br#"{"model":"claude","messages":[]}"#;
        match ApiRequest::parse(Endpoint::Messages, no_max) {
            Err(ProxyError::InvalidParam { param, .. }) => assert_eq!(param, "max_tokens"),
            other => panic!("{other:?}"),
        }
        let zero = br#"{"model":"claude","max_tokens":0,"messages":[]}"#;
        assert_eq!(
            ApiRequest::parse(Endpoint::Messages, zero)
                .unwrap()
                .max_tokens,
            Some(0)
        );
        let count = ApiRequest::parse(Endpoint::CountTokens, no_max).unwrap();
        assert_eq!(count.output_reservation(1024, None).unwrap(), 0);
        let streamed = br#"{"model":"claude","messages":[],"stream":true}"#;
        assert!(ApiRequest::parse(Endpoint::CountTokens, streamed).is_err());
        // Repeats of what the gateway reads are refused here as in chat bodies.
        let twice = br#"{"model":"c","max_tokens":1,"system":"a","system":"b","messages":[]}"#;
        assert!(ApiRequest::parse(Endpoint::Messages, twice).is_err());
        let chat = br#"{"model":"c","system":"a","system":"b","messages":[]}"#;
        assert!(
            ApiRequest::parse(Endpoint::Chat, chat).is_ok(),
            "not read in chat bodies"
        );
        // ... yet still found by name there (the fuzz target `request` asks for every field).
        let chat = br#"{"model":"c","tools":[1],"messages":[]}"#;
        let req = ApiRequest::parse(Endpoint::Chat, chat).unwrap();
        assert_eq!(req.field("tools"), Some("[1]"));
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

    /// The upstream body as text, checked to be written in one allocation of exactly its size.
    fn upstream(endpoint: Endpoint, body: &str, model: &str) -> String {
        let req = ApiRequest::parse(endpoint, body.as_bytes()).unwrap();
        let out = req.splice(model);
        assert_eq!(out.capacity(), out.len(), "{body}");
        assert_eq!(req.upstream_body(model), out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_upstream_body_is_the_clients_with_the_model_replaced() {
        let cases: &[(&str, &str)] = &[
            // Whitespace, key order and the spelling of numbers as sent.
            (
                "\n{ \"messages\" : [ {\"role\":\"user\", \"content\":\"hi\"} ],\n  \"model\" : \"public\" ,\"temperature\":0.20 }\r\n",
                "\n{ \"messages\" : [ {\"role\":\"user\", \"content\":\"hi\"} ],\n  \"model\" : \"up\" ,\"temperature\":0.20 }\r\n",
            ),
            // The model first, in the middle, last.
            (
                r#"{"model":"m","messages":[],"user":"u"}"#,
                r#"{"model":"up","messages":[],"user":"u"}"#,
            ),
            (
                r#"{"messages":[],"model":"m","user":"u"}"#,
                r#"{"messages":[],"model":"up","user":"u"}"#,
            ),
            (
                r#"{"messages":[],"user":"u","model":"a much longer client model name"}"#,
                r#"{"messages":[],"user":"u","model":"up"}"#,
            ),
            // Only the top-level field: a nested "model" key, or text that looks like one, is
            // the client's.
            (
                r#"{"metadata":{"model":"m"},"messages":[{"content":"\"model\":\"m\"","model":"m"}],"model":"m"}"#,
                r#"{"metadata":{"model":"m"},"messages":[{"content":"\"model\":\"m\"","model":"m"}],"model":"up"}"#,
            ),
            // An escaped key or value is the same field; the whole value is replaced.
            (
                r#"{"mod\u0065l":"pub\u006cic","messages":[]}"#,
                r#"{"mod\u0065l":"up","messages":[]}"#,
            ),
            // Repeats of fields the gateway does not read pass through as sent.
            (
                r#"{"model":"m","temperature":1,"messages":[],"temperature":2}"#,
                r#"{"model":"up","temperature":1,"messages":[],"temperature":2}"#,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(upstream(Endpoint::Chat, body, "up"), *want);
        }
        let completions = r#"{"prompt":"hi","model":"m","stream":false}"#;
        assert_eq!(
            upstream(Endpoint::Completions, completions, "up"),
            r#"{"prompt":"hi","model":"up","stream":false}"#
        );
    }

    #[test]
    fn upstream_model_names_are_written_as_json_strings() {
        for model in [
            "gpt-4o",
            "",
            "quote \" backslash \\ slash /",
            "line\nfeed\ttab\r\u{8}\u{c}",
            "\u{0}\u{1}\u{1f}\u{7f}",
            "é 🚀 \u{2028}",
        ] {
            let want = format!(
                r#"{{"model":{},"messages":[]}}"#,
                serde_json::to_string(model).unwrap()
            );
            let body = r#"{"model":"m","messages":[]}"#;
            assert_eq!(upstream(Endpoint::Chat, body, model), want, "{model:?}");
        }
    }

    #[test]
    fn the_model_is_borrowed_from_the_body_unless_escaped() {
        let req = ApiRequest::parse(Endpoint::Chat, br#"{"model":"m","messages":[]}"#).unwrap();
        assert!(matches!(req.model, Cow::Borrowed("m")));
        let body = br#"{"model":"a\/b \u00e9","messages":[]}"#;
        let req = ApiRequest::parse(Endpoint::Chat, body).unwrap();
        assert!(matches!(&req.model, Cow::Owned(m) if m == "a/b é"));
    }

    #[test]
    fn streams_get_include_usage_switched_on() {
        let so = |v: &str| {
            format!(r#"{{"model":"m","messages":[],"stream":true,"stream_options":{v}}}"#)
        };
        let up = |v: &str| {
            format!(r#"{{"model":"up","messages":[],"stream":true,"stream_options":{v}}}"#)
        };
        // (the client's stream_options, what goes upstream, client_wants_usage)
        let cases: &[(&str, &str, bool)] = &[
            ("null", r#"{"include_usage":true}"#, false),
            ("{}", r#"{"include_usage":true}"#, false),
            ("{ \n}", "{\"include_usage\":true \n}", false),
            (
                r#"{"x":[1],"y":{}}"#,
                r#"{"include_usage":true,"x":[1],"y":{}}"#,
                false,
            ),
            (r#"{ "x":1}"#, r#"{"include_usage":true, "x":1}"#, false),
            (
                r#"{"x":1,"include_usage":false}"#,
                r#"{"x":1,"include_usage":true}"#,
                false,
            ),
            (
                r#"{"include_usage" : null ,"x":1}"#,
                r#"{"include_usage" : true ,"x":1}"#,
                false,
            ),
            (
                r#"{"include\u005fusage":false}"#,
                r#"{"include\u005fusage":true}"#,
                false,
            ),
            // Already on: untouched.
            (
                r#"{"x":1, "include_usage" : true }"#,
                r#"{"x":1, "include_usage" : true }"#,
                true,
            ),
            // The array form serde reads as a struct: replaced by an object.
            ("[true]", r#"{"include_usage":true}"#, true),
            ("[]", r#"{"include_usage":true}"#, false),
        ];
        for (client, want, wants_usage) in cases {
            let body = so(client);
            let req = ApiRequest::parse(Endpoint::Chat, body.as_bytes()).unwrap();
            assert_eq!(req.client_wants_usage, *wants_usage, "{client}");
            assert_eq!(
                upstream(Endpoint::Chat, &so(client), "up"),
                up(want),
                "{client}"
            );
        }
        let cases: &[(&str, &str)] = &[
            // Absent: added before the closing brace, after any whitespace.
            (
                r#"{"model":"m","messages":[],"stream":true}"#,
                r#"{"model":"up","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                "{\"stream\":true,\"messages\":[],\"model\":\"m\" }\n",
                "{\"stream\":true,\"messages\":[],\"model\":\"up\" ,\"stream_options\":{\"include_usage\":true}}\n",
            ),
            // Before the model: both splices, in order.
            (
                r#"{"stream_options":{},"stream":true,"model":"m","messages":[]}"#,
                r#"{"stream_options":{"include_usage":true},"stream":true,"model":"up","messages":[]}"#,
            ),
            // Not a stream: stream_options as sent.
            (
                r#"{"model":"m","messages":[],"stream":false,"stream_options":{"include_usage":false}}"#,
                r#"{"model":"up","messages":[],"stream":false,"stream_options":{"include_usage":false}}"#,
            ),
            (
                r#"{"model":"m","messages":[],"stream_options":null}"#,
                r#"{"model":"up","messages":[],"stream_options":null}"#,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(upstream(Endpoint::Chat, body, "up"), *want);
        }
        for bad in [
            r#"{"include_usage":1}"#,
            r#"{"include_usage":"true"}"#,
            "true",
            "[1]",
        ] {
            let err = ApiRequest::parse(Endpoint::Chat, so(bad).as_bytes()).unwrap_err();
            assert!(err.to_string().contains("'stream_options'"), "{bad}: {err}");
        }
    }

    #[test]
    fn repeated_fields_the_gateway_reads_are_refused() {
        let chat = |extra: &str| format!(r#"{{"model":"m","messages":[]{extra}}}"#);
        let cases = [
            (chat(r#","model":"m""#), "model"),
            (chat(r#","mod\u0065l":"other""#), "model"),
            (chat(r#","stream":false,"stream":true"#), "stream"),
            (
                chat(r#","stream_options":null,"stream_options":{}"#),
                "stream_options",
            ),
            (chat(r#","max_tokens":100000,"max_tokens":1"#), "max_tokens"),
            (
                chat(r#","max_completion_tokens":1,"max_completion_tokens":1"#),
                "max_completion_tokens",
            ),
            (chat(r#","n":1,"n":2"#), "n"),
            (chat(r#","messages":[]"#), "messages"),
            // Fields another endpoint reads count too: such a body is no real client's.
            (chat(r#","best_of":1,"best_of":2"#), "best_of"),
        ];
        for (body, field) in &cases {
            let err = ApiRequest::parse(Endpoint::Chat, body.as_bytes()).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("'{field}' appears more than once")),
                "{body}: {msg}"
            );
            assert_eq!(err.into_response().status(), http::StatusCode::BAD_REQUEST);
        }
        let body = br#"{"model":"m","prompt":"a","prompt":"b"}"#;
        let err = ApiRequest::parse(Endpoint::Completions, body).unwrap_err();
        assert!(err.to_string().contains("'prompt'"), "{err}");
    }

    #[test]
    fn fields_are_found_whether_the_gateway_reads_them_or_not() {
        let body = br#"{"model":"m","messages":[1],"encoding_format":"base64","dimen\u0073ions":8,"x":{"dimensions":1},"user":"a","user":"b"}"#;
        let req = ApiRequest::parse(Endpoint::Chat, body).unwrap();
        assert_eq!(req.field("model"), Some(r#""m""#));
        assert_eq!(req.field("messages"), Some("[1]"));
        assert_eq!(req.field("encoding_format"), Some(r#""base64""#));
        assert_eq!(req.field("dimensions"), Some("8"));
        assert_eq!(
            req.field("user"),
            Some(r#""b""#),
            "the last copy, as serde_json"
        );
        assert_eq!(req.field("stream"), None);
        assert_eq!(req.field("nope"), None);
    }

    #[test]
    fn fields_the_gateway_skips_are_still_checked() {
        for body in [
            &b"{\"model\":\"m\",\"messages\":[],\"user\":\"\xff\"}"[..],
            b"{\"model\":\"m\",\"messages\":[],\"user\":[1,]}",
            b"{\"model\":\"m\",\"messages\":[],\"user\":\"a\"} x",
            b"{\"model\":\"m\",\"messages\":[],\"us\xffer\":1}",
        ] {
            let err = ApiRequest::parse(Endpoint::Chat, body).unwrap_err();
            assert!(err.to_string().contains("not a JSON object"), "{err}");
        }
    }

    mod props {
        use std::fmt::Write as _;

        use proptest::prelude::*;
        use serde_json::{Value, json};

        use super::super::*;

        /// What the upstream must read: the client's JSON with `model` set and, for streams,
        /// `stream_options.include_usage` on (the parse-to-a-tree approach this module replaced).
        fn reference(body: &str, model: &str) -> Value {
            let mut v: Value = serde_json::from_str(body).unwrap();
            let stream = v["stream"] == json!(true);
            v["model"] = json!(model);
            if stream {
                let opts = &mut v["stream_options"];
                if !opts.is_object() {
                    *opts = json!({});
                }
                opts["include_usage"] = json!(true);
            }
            v
        }

        fn ws() -> impl Strategy<Value = &'static str> + Clone {
            prop::sample::select(vec!["", "", " ", "\n  ", "\t", "\r\n"])
        }

        /// `s` as a JSON string, plainly or with every non-ASCII character escaped.
        fn json_string(s: &str, escaped: bool) -> String {
            if !escaped {
                return serde_json::to_string(s).unwrap();
            }
            let mut out = String::from("\"");
            for c in s.chars() {
                if matches!(c, ' '..='~') && c != '"' && c != '\\' {
                    out.push(c);
                } else {
                    for u in c.encode_utf16(&mut [0; 2]) {
                        write!(out, "\\u{u:04X}").unwrap();
                    }
                }
            }
            out.push('"');
            out
        }

        fn string() -> impl Strategy<Value = String> {
            (any::<String>(), any::<bool>()).prop_map(|(s, e)| json_string(&s, e))
        }

        /// A key: often one the gateway cares about somewhere, spelled plainly or escaped.
        fn key() -> impl Strategy<Value = String> {
            let names = [
                "model",
                "stream",
                "stream_options",
                "include_usage",
                "role",
                "x",
            ];
            prop_oneof![
                (prop::sample::select(names.to_vec()), any::<bool>())
                    .prop_map(|(k, e)| json_string(k, e)),
                string(),
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just("null".to_owned()),
                Just("true".to_owned()),
                Just("false".to_owned()),
                any::<i64>().prop_map(|n| n.to_string()),
                (-1e9f64..1e9).prop_map(|f| f.to_string()),
                string(),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                let item = (ws(), inner, ws());
                prop_oneof![
                    prop::collection::vec(item.clone(), 0..4).prop_map(|items| {
                        let items: Vec<_> =
                            items.iter().map(|(a, v, b)| format!("{a}{v}{b}")).collect();
                        format!("[{}]", items.join(","))
                    }),
                    prop::collection::vec((key(), item), 0..4).prop_map(|fields| {
                        let fields: Vec<_> = fields
                            .iter()
                            .map(|(k, (a, v, b))| format!("{k}:{a}{v}{b}"))
                            .collect();
                        format!("{{{}}}", fields.join(","))
                    }),
                ]
            })
        }

        /// A key the gateway does not read; repeats allowed.
        fn other_key() -> impl Strategy<Value = String> {
            let fixed = ["temperature", "user", "metadata", "tools", "x"];
            prop_oneof![
                (prop::sample::select(fixed.to_vec()), any::<bool>())
                    .prop_map(|(k, e)| json_string(k, e)),
                (any::<String>(), any::<bool>())
                    .prop_filter("not a field the gateway reads", |(k, _)| Field::of(k)
                        .is_none())
                    .prop_map(|(k, e)| json_string(&k, e)),
            ]
        }

        fn stream_options() -> impl Strategy<Value = String> {
            let include_usage =
                prop::option::of(prop::sample::select(vec!["true", "false", "null"]));
            let others = prop::collection::vec(
                (
                    (any::<String>(), any::<bool>())
                        .prop_filter("not include_usage", |(k, _)| k != "include_usage")
                        .prop_map(|(k, e)| json_string(&k, e)),
                    value(),
                ),
                0..3,
            );
            prop_oneof![
                Just("null".to_owned()),
                (include_usage, any::<bool>(), others, ws()).prop_flat_map(
                    |(usage, escaped, mut fields, pad)| {
                        if let Some(v) = usage {
                            fields.push((json_string("include_usage", escaped), v.to_owned()));
                        }
                        Just(fields).prop_shuffle().prop_map(move |fields| {
                            let fields: Vec<_> =
                                fields.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                            format!("{{{pad}{}}}", fields.join(","))
                        })
                    }
                ),
            ]
        }

        /// A chat body the gateway accepts: every field it reads valid and present once, the
        /// others random, in random order, with random whitespace.
        fn body() -> impl Strategy<Value = String> {
            let model = (
                any::<String>().prop_filter("non-empty", |m| !m.is_empty()),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(m, escaped, key_escaped)| {
                    (json_string("model", key_escaped), json_string(&m, escaped))
                });
            let messages =
                prop::collection::vec(value(), 0..3).prop_map(|v| format!("[{}]", v.join(",")));
            let stream = prop::option::of(prop::sample::select(vec!["true", "false", "null"]));
            let max_tokens = prop::option::of(0u32..5000);
            let n = prop::option::of(1u32..=128);
            let others = prop::collection::vec((other_key(), value()), 0..5);
            (
                model,
                messages,
                stream,
                prop::option::of(stream_options()),
                max_tokens,
                n,
                others,
            )
                .prop_flat_map(
                    |(model, messages, stream, options, max_tokens, n, others)| {
                        let mut fields = vec![model, (json_string("messages", false), messages)];
                        fields.extend(stream.map(|s| (r#""stream""#.to_owned(), s.to_owned())));
                        fields.extend(options.map(|o| (r#""stream_options""#.to_owned(), o)));
                        fields.extend(
                            max_tokens.map(|m| (r#""max_tokens""#.to_owned(), m.to_string())),
                        );
                        fields.extend(n.map(|n| (r#""n""#.to_owned(), n.to_string())));
                        fields.extend(others);
                        let pads =
                            prop::collection::vec((ws(), ws(), ws(), ws()), fields.len() + 1);
                        (Just(fields).prop_shuffle(), pads)
                    },
                )
                .prop_map(|(fields, pads)| {
                    let fields: Vec<_> = fields
                        .iter()
                        .zip(&pads)
                        .map(|((k, v), (a, b, c, d))| format!("{a}{k}{b}:{c}{v}{d}"))
                        .collect();
                    let (a, b, _, _) = pads[fields.len()];
                    format!("{a}{{{}}}{b}", fields.join(","))
                })
        }

        proptest! {
            #[test]
            fn the_upstream_reads_what_the_old_rewrite_sent(body in body(), model in any::<String>()) {
                let req = ApiRequest::parse(Endpoint::Chat, body.as_bytes()).unwrap();
                let out = req.splice(&model);
                prop_assert_eq!(out.capacity(), out.len());
                let got: Value = serde_json::from_slice(&out).unwrap();
                prop_assert_eq!(got, reference(&body, &model));
                if !model.is_empty() {
                    let again = ApiRequest::parse(Endpoint::Chat, &out).unwrap();
                    prop_assert_eq!(&*again.model, model.as_str());
                    prop_assert_eq!(again.client_wants_usage, req.stream || req.client_wants_usage);
                }
            }

            #[test]
            fn json_strings_are_written_as_serde_json_writes_them(s in any::<String>()) {
                let mut out = Vec::new();
                write_json_str(&mut out, &s);
                prop_assert_eq!(out.len(), json_str_len(&s));
                prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use std::hint::black_box;

    use super::*;

    /// Prints nanoseconds per `parse` alone and per `parse` + `upstream_body`, the best of
    /// five rounds each (the machine is shared, so the minimum is the least disturbed figure).
    fn measure(name: &str, body: serde_json::Value) {
        let body = serde_json::to_vec(&body).unwrap();
        let rounds = 200_000_000 / (body.len() * 10 + 2_000);
        let best_of_five = |f: &dyn Fn()| crate::timing::best_of_five(rounds, f);
        let parse = best_of_five(&|| {
            black_box(ApiRequest::parse(Endpoint::Chat, black_box(&body)).unwrap());
        });
        let both = best_of_five(&|| {
            let req = ApiRequest::parse(Endpoint::Chat, black_box(&body)).unwrap();
            black_box(req.upstream_body(black_box("gpt-4o-mini")));
        });
        println!(
            "{name:>6} ({:>5} B): parse {parse:>6.0} ns, parse + upstream_body {both:>6.0} ns",
            body.len()
        );
    }

    // Timing loops, run by hand in release:
    // `cargo test -p modelgate-dataplane --release --lib request::bench -- --ignored --nocapture`.
    // The small and stream bodies are those of `tests/src/bin/bench.rs`.

    #[test]
    #[ignore = "a timing loop"]
    fn small() {
        measure(
            "small",
            serde_json::json!({"model": "bench", "max_tokens": 16, "messages": [{"role": "user", "content": "Write one short sentence about the sea, please, for a benchmark of gateways and proxies."}]}),
        );
    }

    #[test]
    #[ignore = "a timing loop"]
    fn stream() {
        measure(
            "stream",
            serde_json::json!({"model": "bench-stream", "stream": true, "max_tokens": 128, "messages": [{"role": "user", "content": "Stream a long answer about the sea for a gateway benchmark run."}]}),
        );
    }

    #[test]
    #[ignore = "a timing loop"]
    fn large() {
        let text = "Context passage about the sea and its tides. ".repeat(16 * 1024 / 45);
        measure(
            "16 KB",
            serde_json::json!({"model": "bench", "max_tokens": 16, "messages": [{"role": "system", "content": "Answer from the context."}, {"role": "user", "content": text}]}),
        );
    }
}
