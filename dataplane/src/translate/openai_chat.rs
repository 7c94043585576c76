//! OpenAI Chat Completions in and out of the canonical model: used by OpenAI clients of a
//! translated backend (answers and streams out) and by `openai`, `azure-openai` and
//! `openai-compatible` backends of translated clients (requests out, answers and streams in).
//!
//! ```text
//!  client body ─► request_in ─► Request ─► request_out ─► backend body
//!  client ◄─ response_out / EventsOut / error_out ◄─ canonical ◄─ response_in / EventsIn / error_in ◄─ backend
//! ```
//!
//! Bodies are read with borrowing `Deserialize` structs, one field at a time so a wrong type
//! names its field; tool schemas and tool arguments stay `RawValue` text and are never
//! re-formatted. Output is written by `Serialize` structs that borrow the canonical values,
//! so the stream path builds no JSON trees. Extensions other gateways use and the openai SDK
//! carries through unchanged (docs/providers.md 4.5): `thinking_blocks` and
//! `reasoning_content` on assistant messages, `cache_control` on messages and content parts.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{MAX_STREAM_TOOL_CALLS, Refused};
use crate::canonical::{
    Api, ApiError, Block, BlockKind, CacheMark, CacheTtl, Delta, Effort, ErrorKind, Event,
    ImageSource, Message, Reasoning, Request, Response, ResponseFormat, Role, Signature,
    StopReason, TextBlock, Tool, ToolChoice, Usage,
};

/// The `usage` object of an OpenAI chat or completions answer, as sent.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct OpenAiUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    #[serde(default)]
    pub cache_write_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct CompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

impl OpenAiUsage {
    /// The canonical usage: `prompt_tokens` includes the cached tokens, canonical `input`
    /// does not (docs/providers.md section 5); subtractions saturate.
    pub fn normalized(&self) -> Usage {
        let details = self.prompt_tokens_details.unwrap_or_default();
        let cache_read = details.cached_tokens.unwrap_or(0);
        let cache_write = details.cache_write_tokens.unwrap_or(0);
        Usage {
            input: Some(
                self.prompt_tokens
                    .saturating_sub(cache_read)
                    .saturating_sub(cache_write),
            ),
            cache_read: details.cached_tokens,
            cache_write: details.cache_write_tokens,
            output: Some(self.completion_tokens),
            reasoning: self
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens),
        }
    }
}

/// How the request for an OpenAI-shaped backend is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    /// `max_completion_tokens` (OpenAI, Azure) or `max_tokens` (OpenAI-compatible servers,
    /// many of which know only that).
    pub max_tokens_field: MaxTokensField,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensField {
    MaxCompletionTokens,
    MaxTokens,
}

/// Most stop sequences an OpenAI chat request takes.
const MAX_STOP: usize = 4;

/// Most bytes of an upstream's error text copied into an error; the rest is cut.
const MAX_ERROR_TEXT: usize = 1024;

/// Most bytes of thinking text and signatures `EventsOut` keeps, over all open blocks, for
/// their `thinking_blocks` entries (the stream's default event limit, docs/providers.md 2.7).
pub const MAX_THINKING_BYTES: usize = 1 << 20;

/// What a stream that stops without finishing says.
const CUT_SHORT: &str = "the upstream stream ended before the message was complete";

// ---------------------------------------------------------------------------------------------
// Requests in
// ---------------------------------------------------------------------------------------------

/// The top level of a chat request: every field as raw JSON, read one by one so a wrong type
/// names its field. `null` reads as absent.
#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_choice: Option<&'a RawValue>,
    #[serde(borrow)]
    parallel_tool_calls: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    stop: Option<&'a RawValue>,
    #[serde(borrow)]
    temperature: Option<&'a RawValue>,
    #[serde(borrow)]
    top_p: Option<&'a RawValue>,
    #[serde(borrow)]
    response_format: Option<&'a RawValue>,
    #[serde(borrow)]
    reasoning_effort: Option<&'a RawValue>,
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    #[serde(borrow)]
    safety_identifier: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    n: Option<&'a RawValue>,
    #[serde(borrow)]
    logprobs: Option<&'a RawValue>,
    #[serde(borrow)]
    top_logprobs: Option<&'a RawValue>,
    #[serde(borrow)]
    audio: Option<&'a RawValue>,
    #[serde(borrow)]
    modalities: Option<&'a RawValue>,
    #[serde(borrow)]
    prediction: Option<&'a RawValue>,
    #[serde(borrow)]
    functions: Option<&'a RawValue>,
    #[serde(borrow)]
    function_call: Option<&'a RawValue>,
    #[serde(borrow)]
    seed: Option<&'a RawValue>,
    #[serde(borrow)]
    presence_penalty: Option<&'a RawValue>,
    #[serde(borrow)]
    frequency_penalty: Option<&'a RawValue>,
    #[serde(borrow)]
    logit_bias: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    store: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_cache_key: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_cache_options: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_cache_retention: Option<&'a RawValue>,
    #[serde(borrow)]
    verbosity: Option<&'a RawValue>,
    #[serde(borrow)]
    service_tier: Option<&'a RawValue>,
    #[serde(borrow)]
    web_search_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireMessage<'a> {
    role: String,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    thinking_blocks: Option<Vec<WireThinking>>,
    #[serde(default)]
    cache_control: Option<WireCache>,
    #[serde(default, borrow)]
    function_call: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WirePart<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    image_url: Option<WireImageUrl>,
    #[serde(default)]
    file: Option<WireFile>,
    #[serde(default, borrow)]
    input_audio: Option<&'a RawValue>,
    #[serde(default)]
    cache_control: Option<WireCache>,
}

#[derive(Deserialize)]
struct WireImageUrl {
    url: String,
}

#[derive(Deserialize)]
struct WireFile {
    #[serde(default)]
    file_data: Option<String>,
    #[serde(default)]
    file_id: Option<String>,
}

#[derive(Deserialize)]
struct WireCache {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    id: Option<String>,
    function: WireFunctionCall,
}

#[derive(Deserialize)]
struct WireFunctionCall {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// An entry of the `thinking_blocks` extension (LiteLLM's field, docs/providers.md 4.5).
#[derive(Deserialize)]
struct WireThinking {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

#[derive(Deserialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, borrow)]
    function: Option<WireFunction<'a>>,
    #[serde(default)]
    cache_control: Option<WireCache>,
}

#[derive(Deserialize)]
struct WireFunction<'a> {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, borrow)]
    parameters: Option<&'a RawValue>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
struct WireNamedChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    function: Option<WireName>,
}

#[derive(Deserialize)]
struct WireName {
    name: String,
}

#[derive(Deserialize)]
struct WireFormat<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, borrow)]
    json_schema: Option<WireJsonSchema<'a>>,
}

#[derive(Deserialize)]
struct WireJsonSchema<'a> {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, borrow)]
    schema: Option<&'a RawValue>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
struct WireStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn refuse(param: &'static str, message: impl Into<String>) -> Refused {
    Refused::new(Some(param), message)
}

/// A field read as `T`, or a refusal naming it: "'{name}' must be {what}".
fn field<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    name: &'static str,
    what: &str,
) -> Result<Option<T>, Refused> {
    raw.map(|r| {
        serde_json::from_str::<T>(r.get())
            .map_err(|_| refuse(name, format!("'{name}' must be {what}")))
    })
    .transpose()
}

/// The JSON value's first byte: `"`, `[`, `{`, `n`...
fn first_byte(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b'n')
}

/// An OpenAI chat request body read into the canonical model. Refuses what no other backend
/// API can express (`n` > 1, `logprobs`, audio input...), naming the field.
pub fn request_in(body: &[u8]) -> Result<Request, Refused> {
    let wire: WireRequest = serde_json::from_slice(body).map_err(|e| {
        Refused::new(
            None,
            format!("the request body is not a valid JSON object: {e}"),
        )
    })?;

    // What no other backend can answer: refused before anything else is read.
    if field::<u64>(wire.n, "n", "a positive integer")?.is_some_and(|n| n > 1) {
        return Err(refuse(
            "n",
            "'n' > 1 is not supported by this model's backend",
        ));
    }
    if field::<bool>(wire.logprobs, "logprobs", "a boolean")? == Some(true) {
        return Err(refuse(
            "logprobs",
            "'logprobs' is not supported by this model's backend",
        ));
    }
    if field::<u64>(wire.top_logprobs, "top_logprobs", "an integer")?.is_some_and(|n| n > 0) {
        return Err(refuse(
            "top_logprobs",
            "'top_logprobs' is not supported by this model's backend",
        ));
    }
    if wire.audio.is_some() {
        return Err(refuse(
            "audio",
            "audio output is not supported by this model's backend",
        ));
    }
    let modalities: Option<Vec<String>> =
        field(wire.modalities, "modalities", "an array of strings")?;
    if modalities.is_some_and(|m| m.iter().any(|m| m == "audio")) {
        return Err(refuse(
            "modalities",
            "audio output is not supported by this model's backend",
        ));
    }
    if wire.prediction.is_some() {
        return Err(refuse(
            "prediction",
            "predicted outputs are not supported by this model's backend",
        ));
    }
    if wire.functions.is_some() {
        return Err(refuse(
            "functions",
            "'functions' is deprecated and not translated; send 'tools'",
        ));
    }
    if wire.function_call.is_some() {
        return Err(refuse(
            "function_call",
            "'function_call' is deprecated and not translated; send 'tool_choice'",
        ));
    }

    let mut req = Request {
        model: field(wire.model, "model", "a string")?
            .ok_or_else(|| refuse("model", "missing required field 'model'"))?,
        ..Request::default()
    };

    let Some(messages) = wire.messages else {
        return Err(refuse("messages", "missing required field 'messages'"));
    };
    let messages: Vec<&RawValue> =
        field(Some(messages), "messages", "an array of messages")?.unwrap_or_default();
    read_messages(&messages, &mut req)?;

    if let Some(tools) = field::<Vec<WireTool>>(wire.tools, "tools", "an array of tools")? {
        for t in tools {
            if t.kind != "function" {
                return Err(refuse(
                    "tools",
                    format!(
                        "tools of type '{}' are not supported by this model's backend",
                        t.kind
                    ),
                ));
            }
            let Some(f) = t.function else {
                return Err(refuse("tools", "a function tool needs 'function'"));
            };
            req.tools.push(Tool {
                name: f.name,
                description: f.description,
                input_schema: f.parameters.map(RawValue::to_owned),
                strict: f.strict,
                cache: cache_mark(t.cache_control, "tools")?,
            });
        }
    }
    req.tool_choice = match wire.tool_choice {
        None => None,
        Some(raw) if first_byte(raw) == b'"' => {
            let word: String =
                field(Some(raw), "tool_choice", "a string or an object")?.unwrap_or_default();
            Some(match word.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Any,
                _ => {
                    return Err(refuse(
                        "tool_choice",
                        "'tool_choice' must be 'none', 'auto', 'required' or a named function",
                    ));
                }
            })
        }
        Some(raw) => {
            let named: Option<WireNamedChoice> = field(
                Some(raw),
                "tool_choice",
                "a string or {type: function, function: {name}}",
            )?;
            match named {
                Some(WireNamedChoice {
                    kind,
                    function: Some(f),
                }) if kind == "function" => Some(ToolChoice::Tool(f.name)),
                _ => {
                    return Err(refuse(
                        "tool_choice",
                        "'tool_choice' must be 'none', 'auto', 'required' or a named function",
                    ));
                }
            }
        }
    };
    req.parallel_tool_calls = field(wire.parallel_tool_calls, "parallel_tool_calls", "a boolean")?;
    let max_completion: Option<u64> = field(
        wire.max_completion_tokens,
        "max_completion_tokens",
        "a non-negative integer",
    )?;
    let max_tokens: Option<u64> = field(wire.max_tokens, "max_tokens", "a non-negative integer")?;
    req.max_output_tokens = max_completion.or(max_tokens);
    req.stop = match wire.stop {
        None => Vec::new(),
        Some(raw) if first_byte(raw) == b'"' => {
            vec![
                field::<String>(Some(raw), "stop", "a string or an array of strings")?
                    .unwrap_or_default(),
            ]
        }
        Some(raw) => {
            field(Some(raw), "stop", "a string or an array of strings")?.unwrap_or_default()
        }
    };
    req.temperature = field(wire.temperature, "temperature", "a number")?;
    req.top_p = field(wire.top_p, "top_p", "a number")?;
    if let Some(f) = field::<WireFormat>(
        wire.response_format,
        "response_format",
        "an object with 'type'",
    )? {
        req.response_format = Some(match f.kind.as_str() {
            "text" => ResponseFormat::Text,
            "json_object" => ResponseFormat::JsonObject,
            "json_schema" => {
                let Some(s) = f.json_schema else {
                    return Err(refuse(
                        "response_format",
                        "'response_format' of type json_schema needs 'json_schema'",
                    ));
                };
                match s.schema {
                    Some(schema) => ResponseFormat::JsonSchema {
                        name: s.name,
                        schema: schema.to_owned(),
                        strict: s.strict,
                    },
                    // No schema: any JSON object will do, which is JSON mode.
                    None => ResponseFormat::JsonObject,
                }
            }
            other => {
                return Err(refuse(
                    "response_format",
                    format!("'response_format' of type '{other}' is not supported"),
                ));
            }
        });
    }
    if let Some(word) = field::<String>(wire.reasoning_effort, "reasoning_effort", "a string")? {
        req.reasoning = Some(match word.as_str() {
            "none" => Reasoning::Off,
            w => Reasoning::Effort(Effort::parse(w).ok_or_else(|| {
                refuse(
                    "reasoning_effort",
                    "'reasoning_effort' must be one of none, minimal, low, medium, high, xhigh, max",
                )
            })?),
        });
    }
    let user: Option<String> = field(wire.user, "user", "a string")?;
    let safety: Option<String> = field(wire.safety_identifier, "safety_identifier", "a string")?;
    req.user = safety.or(user);
    req.stream = field(wire.stream, "stream", "a boolean")?.unwrap_or(false);
    req.include_usage =
        field::<WireStreamOptions>(wire.stream_options, "stream_options", "an object")?
            .and_then(|o| o.include_usage)
            .unwrap_or(false);

    for (raw, name) in [
        (wire.seed, "seed"),
        (wire.presence_penalty, "presence_penalty"),
        (wire.frequency_penalty, "frequency_penalty"),
        (wire.logit_bias, "logit_bias"),
        (wire.metadata, "metadata"),
        (wire.store, "store"),
        (wire.prompt_cache_key, "prompt_cache_key"),
        (wire.prompt_cache_options, "prompt_cache_options"),
        (wire.prompt_cache_retention, "prompt_cache_retention"),
        (wire.verbosity, "verbosity"),
        (wire.service_tier, "service_tier"),
        (wire.web_search_options, "web_search_options"),
    ] {
        if raw.is_some() {
            req.ignored.push(name);
        }
    }
    Ok(req)
}

fn cache_mark(c: Option<WireCache>, param: &'static str) -> Result<Option<CacheMark>, Refused> {
    let Some(c) = c else { return Ok(None) };
    if c.kind != "ephemeral" {
        return Err(refuse(
            param,
            format!(
                "'cache_control' must have type 'ephemeral', not '{}'",
                c.kind
            ),
        ));
    }
    let ttl = match c.ttl.as_deref() {
        None => None,
        Some("5m") => Some(CacheTtl::FiveMinutes),
        Some("1h") => Some(CacheTtl::OneHour),
        Some(other) => {
            return Err(refuse(
                param,
                format!("'cache_control.ttl' must be '5m' or '1h', not '{other}'"),
            ));
        }
    };
    Ok(Some(CacheMark { ttl }))
}

/// Puts a message-level cache mark on the last block that can carry one.
fn mark_last(blocks: &mut [Block], mark: CacheMark) {
    for b in blocks.iter_mut().rev() {
        let slot = match b {
            Block::Text(t) => &mut t.cache,
            Block::Image { cache, .. }
            | Block::Document { cache, .. }
            | Block::ToolUse { cache, .. }
            | Block::ToolResult { cache, .. } => cache,
            Block::Thinking { .. } | Block::RedactedThinking { .. } => continue,
        };
        *slot = Some(mark);
        return;
    }
}

fn read_messages(messages: &[&RawValue], req: &mut Request) -> Result<(), Refused> {
    let mut leading = true;
    // Whether the last message made is the user turn a run of tool messages opened, which
    // the next user message joins.
    let mut tool_turn = false;
    for (i, raw) in messages.iter().enumerate() {
        let m: WireMessage = serde_json::from_str(raw.get())
            .map_err(|e| refuse("messages", format!("messages[{i}]: {e}")))?;
        let mark = cache_mark(m.cache_control, "messages")?;
        let role = m.role.as_str();
        if !matches!(role, "system" | "developer") {
            leading = false;
        }
        match role {
            "system" | "developer" => {
                let mut blocks = text_content(m.content, i)?;
                if let Some(mark) = mark
                    && let Some(last) = blocks.last_mut()
                {
                    last.cache = Some(mark);
                }
                if leading {
                    req.system.extend(blocks);
                } else {
                    req.messages.push(Message {
                        role: Role::System,
                        content: blocks.into_iter().map(Block::Text).collect(),
                    });
                    tool_turn = false;
                }
            }
            "user" => {
                let mut blocks = user_content(m.content, i)?;
                if let Some(mark) = mark {
                    mark_last(&mut blocks, mark);
                }
                match req.messages.last_mut() {
                    Some(last) if tool_turn => last.content.extend(blocks),
                    _ => req.messages.push(Message {
                        role: Role::User,
                        content: blocks,
                    }),
                }
                tool_turn = false;
            }
            "assistant" => {
                if m.function_call.is_some() {
                    return Err(refuse(
                        "messages",
                        format!(
                            "messages[{i}]: 'function_call' is deprecated and not translated; send 'tool_calls'"
                        ),
                    ));
                }
                let mut blocks = Vec::new();
                for t in m.thinking_blocks.unwrap_or_default() {
                    blocks.push(thinking_block(t, i)?);
                }
                blocks.extend(assistant_text(m.content, i)?);
                if let Some(r) = m.refusal.filter(|r| !r.is_empty()) {
                    blocks.push(Block::Text(TextBlock {
                        text: r,
                        cache: None,
                    }));
                }
                for call in m.tool_calls.unwrap_or_default() {
                    blocks.push(Block::ToolUse {
                        id: call.id.unwrap_or_default(),
                        name: call.function.name.unwrap_or_default(),
                        input: arguments(call.function.arguments.as_deref().unwrap_or("")),
                        cache: None,
                    });
                }
                if let Some(mark) = mark {
                    mark_last(&mut blocks, mark);
                }
                req.messages.push(Message {
                    role: Role::Assistant,
                    content: blocks,
                });
                tool_turn = false;
            }
            "tool" => {
                let Some(id) = m.tool_call_id else {
                    return Err(refuse(
                        "messages",
                        format!("messages[{i}]: a tool message needs 'tool_call_id'"),
                    ));
                };
                let content = text_content(m.content, i)?
                    .into_iter()
                    .filter(|t| !t.text.is_empty() || t.cache.is_some())
                    .map(Block::Text)
                    .collect();
                let result = Block::ToolResult {
                    tool_use_id: id,
                    content,
                    is_error: false,
                    cache: mark,
                };
                match req.messages.last_mut() {
                    Some(last) if tool_turn => last.content.push(result),
                    _ => req.messages.push(Message {
                        role: Role::User,
                        content: vec![result],
                    }),
                }
                tool_turn = true;
            }
            "function" => {
                return Err(refuse(
                    "messages",
                    format!(
                        "messages[{i}]: 'function' messages are deprecated and not translated; send 'tool' messages"
                    ),
                ));
            }
            other => {
                return Err(refuse(
                    "messages",
                    format!("messages[{i}]: unknown role '{other}'"),
                ));
            }
        }
    }
    Ok(())
}

fn parts<'a>(raw: &'a RawValue, i: usize) -> Result<Vec<WirePart<'a>>, Refused> {
    serde_json::from_str(raw.get())
        .map_err(|e| refuse("messages", format!("messages[{i}].content: {e}")))
}

fn not_content(i: usize) -> Refused {
    refuse(
        "messages",
        format!("messages[{i}].content must be a string or an array of content parts"),
    )
}

/// System, developer and tool content: a string or text parts.
fn text_content(content: Option<&RawValue>, i: usize) -> Result<Vec<TextBlock>, Refused> {
    let Some(raw) = content else {
        return Ok(Vec::new());
    };
    match first_byte(raw) {
        b'"' => {
            let text: String = serde_json::from_str(raw.get()).map_err(|_| not_content(i))?;
            Ok(vec![TextBlock { text, cache: None }])
        }
        b'[' => parts(raw, i)?
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(text)) => Ok(TextBlock {
                    text,
                    cache: cache_mark(p.cache_control, "messages")?,
                }),
                (kind, _) => Err(refuse(
                    "messages",
                    format!(
                        "messages[{i}].content: only text parts are allowed here, not '{kind}'"
                    ),
                )),
            })
            .collect(),
        _ => Err(not_content(i)),
    }
}

/// Assistant content: a string or text and refusal parts.
fn assistant_text(content: Option<&RawValue>, i: usize) -> Result<Vec<Block>, Refused> {
    let Some(raw) = content else {
        return Ok(Vec::new());
    };
    let text = |text: String, cache| Block::Text(TextBlock { text, cache });
    match first_byte(raw) {
        b'"' => {
            let s: String = serde_json::from_str(raw.get()).map_err(|_| not_content(i))?;
            Ok(if s.is_empty() {
                Vec::new()
            } else {
                vec![text(s, None)]
            })
        }
        b'[' => parts(raw, i)?
            .into_iter()
            .map(|p| {
                let cache = cache_mark(p.cache_control, "messages")?;
                match (p.kind.as_str(), p.text, p.refusal) {
                    ("text", Some(t), _) | ("refusal", _, Some(t)) => Ok(text(t, cache)),
                    (kind, _, _) => Err(refuse(
                        "messages",
                        format!("messages[{i}].content: assistant parts must be text or refusal, not '{kind}'"),
                    )),
                }
            })
            .collect(),
        _ => Err(not_content(i)),
    }
}

fn user_content(content: Option<&RawValue>, i: usize) -> Result<Vec<Block>, Refused> {
    let Some(raw) = content else {
        return Err(not_content(i));
    };
    match first_byte(raw) {
        b'"' => {
            let text: String = serde_json::from_str(raw.get()).map_err(|_| not_content(i))?;
            Ok(vec![Block::Text(TextBlock { text, cache: None })])
        }
        b'[' => parts(raw, i)?
            .into_iter()
            .map(|p| user_part(p, i))
            .collect(),
        _ => Err(not_content(i)),
    }
}

fn user_part(p: WirePart, i: usize) -> Result<Block, Refused> {
    let cache = cache_mark(p.cache_control, "messages")?;
    let bad = |msg: &str| refuse("messages", format!("messages[{i}].content: {msg}"));
    match p.kind.as_str() {
        "text" => {
            let text = p.text.ok_or_else(|| bad("a text part needs 'text'"))?;
            Ok(Block::Text(TextBlock { text, cache }))
        }
        "image_url" => {
            let url = p
                .image_url
                .ok_or_else(|| bad("an image_url part needs 'image_url'"))?
                .url;
            let source = if let Some(rest) = url.strip_prefix("data:") {
                let (media_type, data) = data_url(rest).ok_or_else(|| {
                    bad("an image data URL must be data:<media type>;base64,<data>")
                })?;
                let media_type = match media_type {
                    "image/jpg" | "image/jpeg" => "image/jpeg",
                    "image/png" => "image/png",
                    "image/gif" => "image/gif",
                    "image/webp" => "image/webp",
                    other => {
                        return Err(bad(&format!(
                            "images of type '{other}' are not supported; send png, jpeg, gif or webp"
                        )));
                    }
                };
                ImageSource::Base64 {
                    media_type: media_type.to_owned(),
                    data: data.to_owned(),
                }
            } else if url.starts_with("https://") || url.starts_with("http://") {
                ImageSource::Url(url)
            } else {
                return Err(bad("an image URL must be http(s) or a base64 data URL"));
            };
            Ok(Block::Image { source, cache })
        }
        "file" => {
            let file = p.file.ok_or_else(|| bad("a file part needs 'file'"))?;
            if file.file_id.is_some() {
                return Err(bad(
                    "files by 'file_id' are not supported by this model's backend; send 'file_data'",
                ));
            }
            let data = file
                .file_data
                .ok_or_else(|| bad("a file part needs 'file_data'"))?;
            match data.strip_prefix("data:").and_then(data_url) {
                Some(("application/pdf", b64)) => Ok(Block::Document {
                    media_type: "application/pdf".to_owned(),
                    data: b64.to_owned(),
                    cache,
                }),
                _ => Err(bad(
                    "only PDF files are supported, as data:application/pdf;base64,<data>",
                )),
            }
        }
        "input_audio" => {
            let _ = p.input_audio;
            Err(bad("audio input is not supported by this model's backend"))
        }
        other => Err(bad(&format!("unknown content part type '{other}'"))),
    }
}

/// The media type and base64 data of a data URL (after `data:`); never decoded.
fn data_url(rest: &str) -> Option<(&str, &str)> {
    let (head, data) = rest.split_once(',')?;
    let media_type = head.strip_suffix(";base64")?;
    Some((media_type, data))
}

fn thinking_block(t: WireThinking, i: usize) -> Result<Block, Refused> {
    let signature = |value: String| Signature {
        origin: Api::AnthropicMessages,
        value,
    };
    match t.kind.as_str() {
        "thinking" => Ok(Block::Thinking {
            text: t.thinking.unwrap_or_default(),
            signature: t.signature.filter(|s| !s.is_empty()).map(signature),
        }),
        "redacted_thinking" => Ok(Block::RedactedThinking {
            data: signature(t.data.ok_or_else(|| {
                refuse(
                    "messages",
                    format!(
                        "messages[{i}].thinking_blocks: a redacted_thinking block needs 'data'"
                    ),
                )
            })?),
        }),
        other => Err(refuse(
            "messages",
            format!("messages[{i}].thinking_blocks: unknown type '{other}'"),
        )),
    }
}

/// Tool-call arguments as the model wrote them, if they are a JSON object; anything else
/// becomes `{}` (docs/providers.md 4.3: lossy, counted by the caller).
fn arguments(text: &str) -> Box<RawValue> {
    match serde_json::from_str::<Box<RawValue>>(text) {
        Ok(raw) if raw.get().starts_with('{') => raw,
        _ => empty_object(),
    }
}

/// Whether `arguments` had to replace the model's text by `{}`.
pub fn arguments_lossy(text: &str) -> bool {
    !matches!(serde_json::from_str::<Box<RawValue>>(text), Ok(raw) if raw.get().starts_with('{'))
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("`{}` is valid JSON")
}

// ---------------------------------------------------------------------------------------------
// Requests out
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<OutToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<OutFormat<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
#[serde(tag = "role", rename_all = "lowercase")]
enum OutMessage<'a> {
    System {
        content: OutContent<'a>,
    },
    User {
        content: OutContent<'a>,
    },
    Assistant {
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<Cow<'a, str>>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<OutToolCall<'a>>,
    },
    Tool {
        tool_call_id: &'a str,
        content: Cow<'a, str>,
    },
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutContent<'a> {
    Text(&'a str),
    Parts(Vec<OutPart<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutPart<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: OutImageUrl<'a> },
    File { file: OutFile },
}

#[derive(Serialize)]
struct OutImageUrl<'a> {
    url: Cow<'a, str>,
}

#[derive(Serialize)]
struct OutFile {
    file_data: String,
    filename: &'static str,
}

#[derive(Serialize)]
struct OutToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunctionCall<'a>,
}

#[derive(Serialize)]
struct OutFunctionCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct OutTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunction<'a>,
}

#[derive(Serialize)]
struct OutFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutToolChoice<'a> {
    Word(&'static str),
    Named {
        #[serde(rename = "type")]
        kind: &'static str,
        function: OutName<'a>,
    },
}

#[derive(Serialize)]
struct OutName<'a> {
    name: &'a str,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutFormat<'a> {
    Text,
    JsonObject,
    JsonSchema { json_schema: OutJsonSchema<'a> },
}

#[derive(Serialize)]
struct OutJsonSchema<'a> {
    name: &'a str,
    schema: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

/// One block as content: text as one string, several blocks (or any non-text) as parts.
fn out_content<'a>(blocks: impl Iterator<Item = &'a Block>) -> Option<OutContent<'a>> {
    let mut parts = Vec::new();
    for b in blocks {
        match b {
            Block::Text(t) => parts.push(OutPart::Text { text: &t.text }),
            Block::Image { source, .. } => parts.push(OutPart::ImageUrl {
                image_url: OutImageUrl {
                    url: match source {
                        ImageSource::Url(u) => Cow::Borrowed(u.as_str()),
                        ImageSource::Base64 { media_type, data } => {
                            Cow::Owned(format!("data:{media_type};base64,{data}"))
                        }
                    },
                },
            }),
            Block::Document {
                media_type, data, ..
            } => parts.push(OutPart::File {
                file: OutFile {
                    file_data: format!("data:{media_type};base64,{data}"),
                    filename: "document.pdf",
                },
            }),
            // Tool use belongs to assistants, results are written as tool messages, and no
            // OpenAI field carries thinking (docs/providers.md 4.2).
            Block::ToolUse { .. }
            | Block::ToolResult { .. }
            | Block::Thinking { .. }
            | Block::RedactedThinking { .. } => {}
        }
    }
    match parts.as_slice() {
        [] => None,
        [OutPart::Text { text }] => Some(OutContent::Text(text)),
        _ => Some(OutContent::Parts(parts)),
    }
}

/// Text blocks joined; `None` when there are none.
fn joined<'a>(blocks: impl Iterator<Item = &'a Block>, sep: &str) -> Option<Cow<'a, str>> {
    let mut texts = blocks.filter_map(|b| match b {
        Block::Text(t) => Some(t.text.as_str()),
        _ => None,
    });
    let first = texts.next()?;
    let mut rest = texts.peekable();
    if rest.peek().is_none() {
        return Some(Cow::Borrowed(first));
    }
    let mut s = first.to_owned();
    for t in rest {
        s.push_str(sep);
        s.push_str(t);
    }
    Some(Cow::Owned(s))
}

fn out_messages(req: &Request) -> Vec<OutMessage<'_>> {
    let mut out = Vec::with_capacity(req.messages.len() + 1);
    if !req.system.is_empty() {
        out.push(OutMessage::System {
            content: match req.system.as_slice() {
                [one] => OutContent::Text(&one.text),
                many => OutContent::Parts(
                    many.iter()
                        .map(|t| OutPart::Text { text: &t.text })
                        .collect(),
                ),
            },
        });
    }
    for m in &req.messages {
        match m.role {
            Role::System => {
                if let Some(content) = out_content(m.content.iter()) {
                    out.push(OutMessage::System { content });
                }
            }
            Role::Assistant => {
                let tool_calls: Vec<OutToolCall> = m
                    .content
                    .iter()
                    .filter_map(|b| match b {
                        Block::ToolUse {
                            id, name, input, ..
                        } => Some(OutToolCall {
                            id,
                            kind: "function",
                            function: OutFunctionCall {
                                name,
                                arguments: input.get(),
                            },
                        }),
                        _ => None,
                    })
                    .collect();
                let content = joined(m.content.iter(), "");
                let content = match content {
                    None if tool_calls.is_empty() => Some(Cow::Borrowed("")),
                    c => c,
                };
                out.push(OutMessage::Assistant {
                    content,
                    tool_calls,
                });
            }
            Role::User => {
                // Tool messages must follow the assistant turn that called them, so every
                // result goes first; images in results move to the user message after them.
                let mut moved: Vec<&Block> = Vec::new();
                for b in &m.content {
                    if let Block::ToolResult {
                        tool_use_id,
                        content,
                        ..
                    } = b
                    {
                        out.push(OutMessage::Tool {
                            tool_call_id: tool_use_id,
                            content: joined(content.iter(), "\n").unwrap_or(Cow::Borrowed("")),
                        });
                        moved.extend(content.iter().filter(|c| matches!(c, Block::Image { .. })));
                    }
                }
                let rest = moved.into_iter().chain(
                    m.content
                        .iter()
                        .filter(|b| !matches!(b, Block::ToolResult { .. })),
                );
                if let Some(content) = out_content(rest) {
                    out.push(OutMessage::User { content });
                }
            }
        }
    }
    out
}

/// The request body for an OpenAI-shaped backend, `model` being the upstream's name.
pub fn request_out(req: &Request, model: &str, out: Out) -> Result<Vec<u8>, Refused> {
    if req.stop.len() > MAX_STOP {
        return Err(refuse(
            "stop_sequences",
            format!("this model's backend takes at most {MAX_STOP} stop sequences"),
        ));
    }
    let (max_completion_tokens, max_tokens) = match out.max_tokens_field {
        MaxTokensField::MaxCompletionTokens => (req.max_output_tokens, None),
        MaxTokensField::MaxTokens => (None, req.max_output_tokens),
    };
    let body = ChatBody {
        model,
        messages: out_messages(req),
        tools: req
            .tools
            .iter()
            .map(|t| OutTool {
                kind: "function",
                function: OutFunction {
                    name: &t.name,
                    description: t.description.as_deref(),
                    parameters: t.input_schema.as_deref(),
                    strict: t.strict,
                },
            })
            .collect(),
        tool_choice: req.tool_choice.as_ref().map(|c| match c {
            ToolChoice::Auto => OutToolChoice::Word("auto"),
            ToolChoice::Any => OutToolChoice::Word("required"),
            ToolChoice::None => OutToolChoice::Word("none"),
            ToolChoice::Tool(name) => OutToolChoice::Named {
                kind: "function",
                function: OutName { name },
            },
        }),
        parallel_tool_calls: req.parallel_tool_calls,
        max_completion_tokens,
        max_tokens,
        stop: &req.stop,
        temperature: req.temperature,
        top_p: req.top_p,
        response_format: req.response_format.as_ref().map(|f| match f {
            ResponseFormat::Text => OutFormat::Text,
            ResponseFormat::JsonObject => OutFormat::JsonObject,
            ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            } => OutFormat::JsonSchema {
                json_schema: OutJsonSchema {
                    name: name.as_deref().unwrap_or("response"),
                    schema,
                    strict: *strict,
                },
            },
        }),
        reasoning_effort: match req.reasoning {
            Some(Reasoning::Effort(e)) => Some(e.as_str()),
            Some(Reasoning::Budget(n)) => Some(match n {
                0..4096 => "low",
                4096..16384 => "medium",
                _ => "high",
            }),
            Some(Reasoning::Off | Reasoning::Adaptive) | None => None,
        },
        user: req.user.as_deref(),
        stream: req.stream,
        // The gateway meters every stream, whatever the client asked to see.
        stream_options: req.stream.then_some(StreamOptions {
            include_usage: true,
        }),
    };
    serde_json::to_vec(&body)
        .map_err(|e| Refused::new(None, format!("cannot write the request: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireCompletion<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default, borrow)]
    choices: Vec<WireChoice<'a>>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    message: Option<WireAnswer<'a>>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireAnswer<'a> {
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    thinking_blocks: Option<Vec<WireThinking>>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

/// The canonical stop reason of an OpenAI `finish_reason` (docs/providers.md 4.3).
pub fn stop_reason(finish_reason: &str) -> StopReason {
    match finish_reason {
        "stop" => StopReason::EndTurn,
        "length" => StopReason::MaxTokens,
        "tool_calls" | "function_call" => StopReason::ToolUse,
        "content_filter" => StopReason::ContentFilter,
        _ => StopReason::Other,
    }
}

/// An OpenAI chat completion (a 2xx body) read into the canonical model.
pub fn response_in(body: &[u8]) -> Result<Response, String> {
    let wire: WireCompletion = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not a chat completion: {e}"))?;
    let Some(choice) = wire
        .choices
        .into_iter()
        .enumerate()
        .find(|(i, c)| c.index.unwrap_or(*i as u64) == 0)
        .map(|(_, c)| c)
    else {
        return Err("the answer has no choice".to_owned());
    };
    let Some(message) = choice.message else {
        return Err("the answer's choice has no message".to_owned());
    };
    let mut content = Vec::new();
    match message.thinking_blocks {
        Some(blocks) if !blocks.is_empty() => {
            for t in blocks {
                content.push(thinking_block(t, 0).map_err(|e| e.message)?);
            }
        }
        _ => {
            if let Some(text) = message.reasoning_content.filter(|t| !t.is_empty()) {
                content.push(Block::Thinking {
                    text,
                    signature: None,
                });
            }
        }
    }
    content.extend(assistant_text(message.content, 0).map_err(|e| e.message)?);
    let mut stop = stop_reason(choice.finish_reason.as_deref().unwrap_or("stop"));
    if let Some(r) = message.refusal.filter(|r| !r.is_empty()) {
        content.push(Block::Text(TextBlock {
            text: r,
            cache: None,
        }));
        stop = StopReason::Refusal;
    }
    for call in message.tool_calls.unwrap_or_default() {
        content.push(Block::ToolUse {
            id: call.id.unwrap_or_default(),
            name: call.function.name.unwrap_or_default(),
            input: arguments(call.function.arguments.as_deref().unwrap_or("")),
            cache: None,
        });
    }
    Ok(Response {
        id: wire.id.unwrap_or_default(),
        model: wire.model.unwrap_or_default(),
        content,
        stop,
        stop_sequence: None,
        usage: wire.usage.map(|u| u.normalized()).unwrap_or_default(),
    })
}

#[derive(Serialize)]
struct CompletionOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChoiceOut<'a>; 1],
    usage: UsageOut,
}

#[derive(Serialize)]
struct ChoiceOut<'a> {
    index: u32,
    message: AnswerOut<'a>,
    logprobs: (),
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AnswerOut<'a> {
    role: &'static str,
    content: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_blocks: Option<Vec<ThinkingOut<'a>>>,
}

/// An entry of `thinking_blocks`, as LiteLLM writes it.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ThinkingOut<'a> {
    Thinking {
        thinking: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        signature: Option<&'a str>,
    },
    RedactedThinking {
        data: &'a str,
    },
}

/// OpenAI usage from canonical: the prompt total counts every cache kind once.
#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<ReasoningOut>,
}

#[derive(Serialize)]
struct PromptOut {
    cached_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_write_tokens: Option<u64>,
}

#[derive(Serialize)]
struct ReasoningOut {
    reasoning_tokens: u64,
}

impl From<&Usage> for UsageOut {
    fn from(u: &Usage) -> Self {
        Self {
            prompt_tokens: u.prompt(),
            completion_tokens: u.output.unwrap_or(0),
            total_tokens: u.processed(),
            prompt_tokens_details: PromptOut {
                cached_tokens: u.cache_read.unwrap_or(0),
                cache_write_tokens: u.cache_write.filter(|&n| n > 0),
            },
            completion_tokens_details: u
                .reasoning
                .map(|reasoning_tokens| ReasoningOut { reasoning_tokens }),
        }
    }
}

/// A chat completion for an OpenAI client; `model` is the client's public name.
pub fn response_out(resp: &Response, model: &str, created: u64) -> Vec<u8> {
    let thinking = resp.content.iter().filter_map(|b| match b {
        Block::Thinking { text, .. } => Some(text.as_str()),
        _ => None,
    });
    let reasoning_content = {
        let mut all = thinking.clone();
        match (all.next(), all.next()) {
            (None, _) => None,
            (Some(one), None) => Some(Cow::Borrowed(one)),
            (Some(_), Some(_)) => Some(Cow::Owned(thinking.collect::<String>())),
        }
    };
    let needs_blocks = resp.content.iter().any(|b| {
        matches!(
            b,
            Block::Thinking {
                signature: Some(_),
                ..
            } | Block::RedactedThinking { .. }
        )
    });
    let thinking_blocks = needs_blocks.then(|| {
        resp.content
            .iter()
            .filter_map(|b| match b {
                Block::Thinking { text, signature } => Some(ThinkingOut::Thinking {
                    thinking: text,
                    signature: signature.as_ref().map(|s| s.value.as_str()),
                }),
                Block::RedactedThinking { data } => {
                    Some(ThinkingOut::RedactedThinking { data: &data.value })
                }
                _ => None,
            })
            .collect()
    });
    let body = CompletionOut {
        id: &resp.id,
        object: "chat.completion",
        created,
        model,
        choices: [ChoiceOut {
            index: 0,
            message: AnswerOut {
                role: "assistant",
                content: joined(resp.content.iter(), ""),
                tool_calls: resp
                    .content
                    .iter()
                    .filter_map(|b| match b {
                        Block::ToolUse {
                            id, name, input, ..
                        } => Some(OutToolCall {
                            id,
                            kind: "function",
                            function: OutFunctionCall {
                                name,
                                arguments: input.get(),
                            },
                        }),
                        _ => None,
                    })
                    .collect(),
                reasoning_content,
                thinking_blocks,
            },
            logprobs: (),
            finish_reason: resp.stop.openai(),
        }],
        usage: UsageOut::from(&resp.usage),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireErrorBody<'a> {
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct WireError<'a> {
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow)]
    param: Option<&'a RawValue>,
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
    #[serde(default, borrow)]
    innererror: Option<WireInnerError<'a>>,
}

#[derive(Deserialize)]
struct WireInnerError<'a> {
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
    #[serde(default, borrow)]
    content_filter_result: Option<&'a RawValue>,
    #[serde(default, borrow)]
    content_filter_results: Option<&'a RawValue>,
}

/// A string or number field as text, capped; anything else is none.
fn text_of(raw: Option<&RawValue>, max: usize) -> Option<String> {
    let raw = raw?;
    match first_byte(raw) {
        b'"' => serde_json::from_str::<String>(raw.get())
            .ok()
            .map(|s| super::clip(&s, max).to_owned()),
        b'-' | b'0'..=b'9' => Some(super::clip(raw.get(), max).to_owned()),
        _ => None,
    }
}

/// The error kind of an upstream's status and error `type`/`code` (docs/providers.md 6.3).
fn error_kind(status: u16, kind: Option<&str>, code: Option<&str>, filtered: bool) -> ErrorKind {
    let is = |word: &str| kind == Some(word) || code == Some(word);
    if filtered || is("content_filter") {
        return ErrorKind::ContentFiltered;
    }
    if is("context_length_exceeded") {
        return ErrorKind::ContextLength;
    }
    match status {
        429 if is("insufficient_quota") => ErrorKind::QuotaExhausted,
        429 => ErrorKind::RateLimited,
        401 => ErrorKind::Authentication,
        402 => ErrorKind::Billing,
        403 => ErrorKind::Permission,
        404 => ErrorKind::NotFound,
        413 => ErrorKind::RequestTooLarge,
        408 | 504 => ErrorKind::Timeout,
        503 | 529 => ErrorKind::Overloaded,
        400..=499 => ErrorKind::InvalidRequest,
        _ => ErrorKind::Server,
    }
}

/// The error object of an OpenAI or Azure body (or stream chunk), read leniently.
fn read_error(status: u16, error: Option<&RawValue>, top_message: Option<&RawValue>) -> ApiError {
    let e: WireError = match error {
        Some(raw) if first_byte(raw) == b'{' => serde_json::from_str(raw.get()).unwrap_or_default(),
        // `{"error": "text"}`, as some compatible servers write it.
        Some(raw) => WireError {
            message: Some(raw),
            ..WireError::default()
        },
        None => WireError {
            message: top_message,
            ..WireError::default()
        },
    };
    let kind = text_of(e.kind, 256);
    let code = text_of(e.code, 256);
    let filtered = e.innererror.as_ref().is_some_and(|i| {
        i.content_filter_result.is_some()
            || i.content_filter_results.is_some()
            || text_of(i.code, 256).as_deref() == Some("ResponsibleAIPolicyViolation")
    });
    let kind = error_kind(status, kind.as_deref(), code.as_deref(), filtered);
    let code = match kind {
        ErrorKind::ContentFiltered => Some("content_filter".to_owned()),
        _ => code,
    };
    ApiError {
        status,
        kind,
        message: text_of(e.message, MAX_ERROR_TEXT)
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| format!("the upstream answered with status {status}")),
        param: text_of(e.param, 256),
        code,
    }
}

/// An OpenAI-shaped error body (any status) read into the canonical model.
pub fn error_in(status: u16, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<WireErrorBody>(body) {
        Ok(b) => read_error(status, b.error, b.message),
        Err(_) => read_error(status, None, None),
    }
}

#[derive(Serialize)]
struct ErrorBodyOut<'a> {
    error: ErrorOut<'a>,
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl<'a> From<&'a ApiError> for ErrorBodyOut<'a> {
    fn from(err: &'a ApiError) -> Self {
        let code = err.code.as_deref();
        let (kind, code) = match err.kind {
            ErrorKind::ContextLength => ("invalid_request_error", Some("context_length_exceeded")),
            ErrorKind::ContentFiltered => ("invalid_request_error", Some("content_filter")),
            ErrorKind::InvalidRequest | ErrorKind::NotFound | ErrorKind::RequestTooLarge => {
                ("invalid_request_error", code)
            }
            ErrorKind::Authentication => ("authentication_error", code),
            ErrorKind::Permission => ("permission_error", code),
            ErrorKind::RateLimited => ("rate_limit_error", code),
            ErrorKind::QuotaExhausted => ("insufficient_quota", Some("insufficient_quota")),
            ErrorKind::Overloaded => ("upstream_error", Some("upstream_overloaded")),
            ErrorKind::Timeout => ("upstream_error", Some("upstream_timeout")),
            ErrorKind::Billing => ("upstream_error", Some("upstream_billing")),
            ErrorKind::Server => ("upstream_error", Some("upstream_error")),
        };
        Self {
            error: ErrorOut {
                message: &err.message,
                kind,
                param: err.param.as_deref(),
                code,
            },
        }
    }
}

/// An error body for an OpenAI client.
pub fn error_out(err: &ApiError) -> Vec<u8> {
    serde_json::to_vec(&ErrorBodyOut::from(err)).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Streams in
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    choices: Option<Vec<WireChunkChoice>>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolDelta>>,
}

#[derive(Deserialize)]
struct WireToolDelta {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunctionCall>,
}

/// The text-like block open in an upstream stream: at most one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Text,
    Thinking,
}

/// Reads an OpenAI chat stream (the `data` of each server-sent event) into canonical events.
///
/// Text and thinking blocks close when the other kind or a tool call starts; tool blocks
/// stay open until the finish, because a server may interleave the argument fragments of
/// parallel calls (they are addressed by the upstream's tool index).
#[derive(Debug, Default)]
pub struct EventsIn {
    started: bool,
    /// `MessageStop` or an error was emitted: nothing follows.
    over: bool,
    next_index: u32,
    /// The open text or thinking block.
    flow: Option<(u32, Flow)>,
    /// Upstream tool index to block index, in the order the calls started.
    tools: Vec<(u64, u32)>,
    /// Open tool blocks are `tools[open_tools..]`.
    open_tools: usize,
    stop: Option<StopReason>,
    refused: bool,
}

impl EventsIn {
    pub fn new() -> Self {
        Self::default()
    }

    fn start(&mut self, id: Option<&str>, out: &mut Vec<Event>) {
        if !self.started {
            self.started = true;
            out.push(Event::MessageStart {
                id: id.unwrap_or_default().to_owned(),
                usage: Usage::default(),
            });
        }
    }

    fn close_flow(&mut self, out: &mut Vec<Event>) {
        if let Some((index, _)) = self.flow.take() {
            out.push(Event::BlockStop { index });
        }
    }

    /// A text or thinking fragment, opening its block when another kind is open.
    fn flow(&mut self, kind: Flow, text: String, out: &mut Vec<Event>) {
        if text.is_empty() {
            return;
        }
        let index = match self.flow {
            Some((index, k)) if k == kind => index,
            _ => {
                self.close_flow(out);
                let index = self.next_index;
                self.next_index += 1;
                out.push(Event::BlockStart {
                    index,
                    kind: match kind {
                        Flow::Text => BlockKind::Text,
                        Flow::Thinking => BlockKind::Thinking,
                    },
                });
                self.flow = Some((index, kind));
                index
            }
        };
        out.push(Event::BlockDelta {
            index,
            delta: match kind {
                Flow::Text => Delta::Text(text),
                Flow::Thinking => Delta::Thinking(text),
            },
        });
    }

    fn tool(&mut self, t: WireToolDelta, out: &mut Vec<Event>) -> Result<(), String> {
        // A server that leaves out the index streams one call at a time.
        let key = t
            .index
            .unwrap_or_else(|| self.tools.last().map_or(0, |&(k, _)| k));
        let (name, args) = match t.function {
            Some(f) => (f.name, f.arguments),
            None => (None, None),
        };
        let index = match self.tools.iter().find(|&&(k, _)| k == key) {
            Some(&(_, index)) => index,
            None => {
                if self.tools.len() >= MAX_STREAM_TOOL_CALLS {
                    return Err(format!(
                        "the upstream stream has more than {MAX_STREAM_TOOL_CALLS} tool calls"
                    ));
                }
                self.close_flow(out);
                let index = self.next_index;
                self.next_index += 1;
                out.push(Event::BlockStart {
                    index,
                    kind: BlockKind::ToolUse {
                        id: t.id.unwrap_or_default(),
                        name: name.unwrap_or_default(),
                    },
                });
                self.tools.push((key, index));
                index
            }
        };
        if let Some(args) = args.filter(|a| !a.is_empty()) {
            out.push(Event::BlockDelta {
                index,
                delta: Delta::ToolArgs(args),
            });
        }
        Ok(())
    }

    /// Stops every open block, in index order.
    fn close_all(&mut self, out: &mut Vec<Event>) {
        let flow = self.flow.take().map(|(index, _)| index);
        let mut tools = self.tools.get(self.open_tools..).unwrap_or_default().iter();
        self.open_tools = self.tools.len();
        let mut next_tool = tools.next().map(|&(_, i)| i);
        let mut flow = flow;
        loop {
            let index = match (flow, next_tool) {
                (Some(f), Some(t)) if f < t => flow.take(),
                (_, Some(_)) => next_tool.take().inspect(|_| {
                    next_tool = tools.next().map(|&(_, i)| i);
                }),
                (Some(_), None) => flow.take(),
                (None, None) => break,
            };
            if let Some(index) = index {
                out.push(Event::BlockStop { index });
            }
        }
    }

    fn message_stop(&mut self, out: &mut Vec<Event>) {
        self.close_all(out);
        let stop = match self.stop.unwrap_or(StopReason::Other) {
            StopReason::EndTurn if self.refused => StopReason::Refusal,
            s => s,
        };
        out.push(Event::MessageStop {
            stop,
            stop_sequence: None,
        });
        self.over = true;
    }

    fn cut_short(&mut self, out: &mut Vec<Event>) {
        out.push(Event::Error(ApiError {
            status: 502,
            kind: ErrorKind::Server,
            message: CUT_SHORT.to_owned(),
            param: None,
            code: None,
        }));
        self.over = true;
    }

    /// One event's data (`[DONE]` included); appends the canonical events it makes.
    pub fn event(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        if self.over {
            return Ok(());
        }
        if data.trim_ascii() == b"[DONE]" {
            if self.started {
                self.message_stop(out);
            } else {
                self.cut_short(out);
            }
            return Ok(());
        }
        let chunk: WireChunk = serde_json::from_slice(data)
            .map_err(|e| format!("the upstream sent an event that is not a chat chunk: {e}"))?;
        if let Some(error) = chunk.error {
            let mut err = read_error(500, Some(error), None);
            if err.kind == ErrorKind::InvalidRequest {
                err.kind = ErrorKind::Server;
            }
            out.push(Event::Error(err));
            self.over = true;
            return Ok(());
        }
        let id = chunk.id.as_deref();
        for (i, choice) in chunk.choices.into_iter().flatten().enumerate() {
            if choice.index.unwrap_or(i as u64) != 0 {
                continue;
            }
            // Azure annotation-only chunks have no `delta`; only a finish counts from them.
            if let Some(delta) = choice.delta
                && self.stop.is_none()
            {
                self.start(id, out);
                self.flow(
                    Flow::Thinking,
                    delta.reasoning_content.unwrap_or_default(),
                    out,
                );
                self.flow(Flow::Text, delta.content.unwrap_or_default(), out);
                if let Some(r) = delta.refusal.filter(|r| !r.is_empty()) {
                    self.refused = true;
                    self.flow(Flow::Text, r, out);
                }
                for t in delta.tool_calls.into_iter().flatten() {
                    self.tool(t, out)?;
                }
            }
            if let Some(reason) = choice.finish_reason
                && self.stop.is_none()
            {
                self.start(id, out);
                self.close_all(out);
                self.stop = Some(stop_reason(&reason));
            }
        }
        if let Some(usage) = chunk.usage {
            self.start(id, out);
            out.push(Event::Usage(usage.normalized()));
        }
        Ok(())
    }

    /// The upstream body ended; appends what closes the message.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.over {
            return;
        }
        if self.started && self.stop.is_some() {
            self.message_stop(out);
        } else {
            self.cut_short(out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streams out
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoiceOut<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
}

#[derive(Serialize)]
struct ChunkChoiceOut<'a> {
    index: u32,
    delta: DeltaOut<'a>,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolDeltaOut<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_blocks: Option<[ThinkingOut<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolDeltaOut<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDeltaOut<'a>,
}

#[derive(Serialize)]
struct FunctionDeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// A block open in the canonical stream, as `EventsOut` needs to remember it.
#[derive(Debug)]
enum OpenBlock {
    Other,
    /// The n-th tool call of the answer (the client's `tool_calls[].index`).
    Tool(u32),
    Thinking {
        text: String,
        signature: String,
        overflow: bool,
    },
}

/// Writes canonical events as an OpenAI chat stream (`data:` lines, `[DONE]` last).
#[derive(Debug)]
pub struct EventsOut {
    model: String,
    created: u64,
    include_usage: bool,
    id: String,
    tools: u32,
    open: Vec<(u32, OpenBlock)>,
    usage: Usage,
    stopped: bool,
    failed: bool,
    done: bool,
}

impl EventsOut {
    /// `model`: the client's public name; `include_usage`: the client asked for the usage
    /// chunk.
    pub fn new(model: &str, created: u64, include_usage: bool) -> Self {
        Self {
            model: model.to_owned(),
            created,
            include_usage,
            id: String::new(),
            tools: 0,
            open: Vec::new(),
            usage: Usage::default(),
            stopped: false,
            failed: false,
            done: false,
        }
    }

    fn write(&self, out: &mut Vec<u8>, choice: Option<ChunkChoiceOut>, usage: Option<UsageOut>) {
        let choices = choice.as_slice();
        let chunk = ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        out.extend_from_slice(b"data: ");
        // Writing these structs into a Vec cannot fail: no maps with non-string keys.
        let _ = serde_json::to_writer(&mut *out, &chunk);
        out.extend_from_slice(b"\n\n");
    }

    fn delta(&self, out: &mut Vec<u8>, delta: DeltaOut) {
        self.write(
            out,
            Some(ChunkChoiceOut {
                index: 0,
                delta,
                logprobs: (),
                finish_reason: None,
            }),
            None,
        );
    }

    fn error(&mut self, out: &mut Vec<u8>, err: &ApiError) {
        out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(&mut *out, &ErrorBodyOut::from(err));
        out.extend_from_slice(b"\n\n");
        self.failed = true;
    }

    /// Thinking text and signatures held for every open block: bounded together, so many
    /// open thinking blocks cannot hold more than one block's allowance.
    fn thinking_held(&self) -> usize {
        self.open
            .iter()
            .map(|(_, b)| match b {
                OpenBlock::Thinking {
                    text, signature, ..
                } => text.len() + signature.len(),
                OpenBlock::Other | OpenBlock::Tool(_) => 0,
            })
            .sum()
    }

    fn block(&mut self, index: u32) -> Option<&mut OpenBlock> {
        self.open
            .iter_mut()
            .find(|(i, _)| *i == index)
            .map(|(_, b)| b)
    }

    /// Appends the bytes of the server-sent events `event` makes.
    pub fn event(&mut self, event: &Event, out: &mut Vec<u8>) {
        if self.stopped || self.failed {
            return;
        }
        match event {
            Event::MessageStart { id, usage } => {
                id.clone_into(&mut self.id);
                self.usage.merge(*usage);
                self.delta(
                    out,
                    DeltaOut {
                        role: Some("assistant"),
                        content: Some(""),
                        ..DeltaOut::default()
                    },
                );
            }
            Event::BlockStart { index, kind } => {
                let block = match kind {
                    BlockKind::Text => OpenBlock::Other,
                    BlockKind::Thinking => OpenBlock::Thinking {
                        text: String::new(),
                        signature: String::new(),
                        overflow: false,
                    },
                    BlockKind::RedactedThinking { data } => {
                        self.delta(
                            out,
                            DeltaOut {
                                thinking_blocks: Some([ThinkingOut::RedactedThinking { data }]),
                                ..DeltaOut::default()
                            },
                        );
                        OpenBlock::Other
                    }
                    BlockKind::ToolUse { id, name } => {
                        let n = self.tools;
                        self.tools = self.tools.saturating_add(1);
                        self.delta(
                            out,
                            DeltaOut {
                                tool_calls: Some([ToolDeltaOut {
                                    index: n,
                                    id: Some(id),
                                    kind: Some("function"),
                                    function: FunctionDeltaOut {
                                        name: Some(name),
                                        arguments: "",
                                    },
                                }]),
                                ..DeltaOut::default()
                            },
                        );
                        OpenBlock::Tool(n)
                    }
                };
                if self.open.len() <= MAX_STREAM_TOOL_CALLS + 2 {
                    self.open.push((*index, block));
                }
            }
            Event::BlockDelta { index, delta } => match delta {
                Delta::Text(t) if !t.is_empty() => self.delta(
                    out,
                    DeltaOut {
                        content: Some(t),
                        ..DeltaOut::default()
                    },
                ),
                Delta::Thinking(t) if !t.is_empty() => {
                    let held = self.thinking_held();
                    if let Some(OpenBlock::Thinking { text, overflow, .. }) = self.block(*index) {
                        if held + t.len() <= MAX_THINKING_BYTES {
                            text.push_str(t);
                        } else {
                            *overflow = true;
                        }
                    }
                    self.delta(
                        out,
                        DeltaOut {
                            reasoning_content: Some(t),
                            ..DeltaOut::default()
                        },
                    );
                }
                Delta::Signature(s) => {
                    let held = self.thinking_held();
                    if let Some(OpenBlock::Thinking {
                        signature,
                        overflow,
                        ..
                    }) = self.block(*index)
                    {
                        if held + s.len() <= MAX_THINKING_BYTES {
                            signature.push_str(s);
                        } else {
                            *overflow = true;
                        }
                    }
                }
                Delta::ToolArgs(a) if !a.is_empty() => {
                    if let Some(&mut OpenBlock::Tool(n)) = self.block(*index) {
                        self.delta(
                            out,
                            DeltaOut {
                                tool_calls: Some([ToolDeltaOut {
                                    index: n,
                                    id: None,
                                    kind: None,
                                    function: FunctionDeltaOut {
                                        name: None,
                                        arguments: a,
                                    },
                                }]),
                                ..DeltaOut::default()
                            },
                        );
                    }
                }
                Delta::Text(_) | Delta::Thinking(_) | Delta::ToolArgs(_) => {}
            },
            Event::BlockStop { index } => {
                let Some(pos) = self.open.iter().position(|(i, _)| i == index) else {
                    return;
                };
                let (_, block) = self.open.swap_remove(pos);
                if let OpenBlock::Thinking {
                    text,
                    signature,
                    overflow,
                } = block
                    && !signature.is_empty()
                {
                    if overflow {
                        self.error(
                            out,
                            &ApiError {
                                status: 502,
                                kind: ErrorKind::Server,
                                message: format!(
                                    "a thinking block exceeded the {MAX_THINKING_BYTES} bytes the gateway keeps for its signature"
                                ),
                                param: None,
                                code: None,
                            },
                        );
                        return;
                    }
                    self.delta(
                        out,
                        DeltaOut {
                            thinking_blocks: Some([ThinkingOut::Thinking {
                                thinking: &text,
                                signature: Some(&signature),
                            }]),
                            ..DeltaOut::default()
                        },
                    );
                }
            }
            Event::Usage(u) => self.usage.merge(*u),
            Event::MessageStop { stop, .. } => {
                self.write(
                    out,
                    Some(ChunkChoiceOut {
                        index: 0,
                        delta: DeltaOut::default(),
                        logprobs: (),
                        finish_reason: Some(stop.openai()),
                    }),
                    None,
                );
                if self.include_usage {
                    self.write(out, None, Some(UsageOut::from(&self.usage)));
                }
                self.stopped = true;
            }
            Event::Error(err) => self.error(out, err),
        }
    }

    /// The stream is over: appends what is still owed (`[DONE]`).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.failed || self.done {
            return;
        }
        if self.stopped {
            out.extend_from_slice(b"data: [DONE]\n\n");
            self.done = true;
        } else {
            self.error(
                out,
                &ApiError {
                    status: 502,
                    kind: ErrorKind::Server,
                    message: CUT_SHORT.to_owned(),
                    param: None,
                    code: None,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! Golden files: the fixtures under `tests/fixtures/providers/openai/` (sources in its
    //! README), one snapshot per fixture and direction; asserts for the facts a snapshot
    //! could hide.

    use std::path::Path;

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/providers/openai"
    );

    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(Path::new(FIXTURES).join(path)).expect("fixture exists")
    }

    /// The `data` of each server-sent event, `data:` with or without its space.
    fn sse_data(bytes: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(bytes).expect("fixtures are UTF-8");
        text.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let d = e
                    .trim()
                    .strip_prefix("data:")
                    .expect("one data line per event");
                d.strip_prefix(' ').unwrap_or(d).to_owned()
            })
            .collect()
    }

    fn events_in(bytes: &[u8]) -> Vec<Event> {
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        for d in sse_data(bytes) {
            t.event(d.as_bytes(), &mut out)
                .expect("every fixture event is JSON");
        }
        t.finish(&mut out);
        out
    }

    fn events_out(events: &[Event], include_usage: bool) -> String {
        let mut t = EventsOut::new("public-model", 1_700_000_000, include_usage);
        let mut out = Vec::new();
        for e in events {
            t.event(e, &mut out);
        }
        t.finish(&mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn text(s: &str) -> Block {
        Block::Text(TextBlock {
            text: s.to_owned(),
            cache: None,
        })
    }

    fn pretty(body: &[u8]) -> Value {
        serde_json::from_slice(body).expect("the translator writes JSON")
    }

    /// Block indexes start at 0 and are contiguous; every start has one stop, before
    /// `MessageStop`, which comes once and last (or an error ends the stream).
    fn assert_well_formed(events: &[Event]) {
        let mut next = 0;
        let mut open = Vec::new();
        let mut stopped = false;
        for (k, e) in events.iter().enumerate() {
            assert!(!stopped, "nothing after MessageStop: {e:?}");
            match e {
                Event::MessageStart { .. } => assert_eq!(k, 0, "MessageStart comes first"),
                Event::BlockStart { index, .. } => {
                    assert_eq!(*index, next, "indexes are contiguous from 0");
                    next += 1;
                    open.push(*index);
                }
                Event::BlockDelta { index, .. } => {
                    assert!(open.contains(index), "delta on an open block: {e:?}")
                }
                Event::BlockStop { index } => {
                    let pos = open
                        .iter()
                        .position(|i| i == index)
                        .expect("stop of an open block");
                    open.remove(pos);
                }
                Event::MessageStop { .. } => {
                    assert!(
                        open.is_empty(),
                        "every block stops before MessageStop: {open:?}"
                    );
                    stopped = true;
                }
                Event::Usage(_) => {}
                Event::Error(_) => {
                    assert_eq!(k, events.len() - 1, "an error is the last event");
                    return;
                }
            }
        }
        assert!(stopped, "the stream ends with MessageStop or an error");
    }

    /// Per upstream tool index: the concatenated argument fragments of a fixture.
    fn upstream_arguments(bytes: &[u8]) -> Vec<(u64, String)> {
        let mut args: Vec<(u64, String)> = Vec::new();
        for d in sse_data(bytes) {
            let Ok(v) = serde_json::from_str::<Value>(&d) else {
                continue;
            };
            for c in v["choices"].as_array().into_iter().flatten() {
                for t in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                    let i = t["index"].as_u64().unwrap();
                    let frag = t["function"]["arguments"].as_str().unwrap_or("");
                    match args.iter_mut().find(|(k, _)| *k == i) {
                        Some((_, s)) => s.push_str(frag),
                        None => args.push((i, frag.to_owned())),
                    }
                }
            }
        }
        args
    }

    /// Per tool block, in start order: the concatenated ToolArgs deltas.
    fn canonical_arguments(events: &[Event]) -> Vec<(String, String)> {
        let mut tools: Vec<(u32, String, String)> = Vec::new();
        for e in events {
            match e {
                Event::BlockStart {
                    index,
                    kind: BlockKind::ToolUse { id, .. },
                } => tools.push((*index, id.clone(), String::new())),
                Event::BlockDelta {
                    index,
                    delta: Delta::ToolArgs(a),
                } => {
                    let t = tools.iter_mut().find(|t| t.0 == *index).unwrap();
                    t.2.push_str(a);
                }
                _ => {}
            }
        }
        tools.into_iter().map(|(_, id, a)| (id, a)).collect()
    }

    // ----- requests in ---------------------------------------------------------------------

    #[test]
    fn request_in_fixtures() {
        insta::glob!(
            "../../tests/fixtures/providers/openai/requests",
            "*.json",
            |path| {
                let body = std::fs::read(path).unwrap();
                insta::assert_debug_snapshot!(request_in(&body));
            }
        );
    }

    #[test]
    fn refusals_name_their_field() {
        for (file, param) in [
            ("n2.json", "n"),
            ("logprobs.json", "logprobs"),
            ("input_audio.json", "messages"),
            ("file_id.json", "messages"),
            ("image_unsupported_type.json", "messages"),
            ("wrong_types.json", "temperature"),
            ("legacy_functions.json", "functions"),
            ("cache_control_bad_type.json", "messages"),
        ] {
            let err = request_in(&fixture(&format!("requests/{file}"))).unwrap_err();
            assert_eq!(err.param, Some(param), "{file}: {err:?}");
        }
        for (body, param) in [
            (r#"{"model":"m"}"#, "messages"),
            (r#"{"messages":[]}"#, "model"),
            (r#"{"model":"m","messages":{}}"#, "messages"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":7}]}"#,
                "messages",
            ),
            (r#"{"model":"m","messages":[],"stop":[1]}"#, "stop"),
            (
                r#"{"model":"m","messages":[],"tool_choice":"maybe"}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","messages":[],"reasoning_effort":"extreme"}"#,
                "reasoning_effort",
            ),
            (
                r#"{"model":"m","messages":[],"modalities":["text","audio"]}"#,
                "modalities",
            ),
            (
                r#"{"model":"m","messages":[],"audio":{"voice":"alloy"}}"#,
                "audio",
            ),
            (
                r#"{"model":"m","messages":[],"prediction":{"type":"content"}}"#,
                "prediction",
            ),
            (
                r#"{"model":"m","messages":[],"tools":[{"type":"custom"}]}"#,
                "tools",
            ),
        ] {
            let err = request_in(body.as_bytes()).unwrap_err();
            assert_eq!(err.param, Some(param), "{body}: {err:?}");
        }
        assert_eq!(request_in(b"{not json").unwrap_err().param, None);
    }

    #[test]
    fn tool_runs_become_one_user_turn_with_later_text_merged() {
        let req = request_in(&fixture("requests/parallel_tools_two_turns.json")).unwrap();
        let roles: Vec<Role> = req.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Assistant,
                Role::User
            ]
        );
        let turn = &req.messages[2].content;
        assert!(
            matches!(&turn[0], Block::ToolResult { tool_use_id, .. } if tool_use_id == "call_fdNz3vOBKYgOIpMdWotB9MjY")
        );
        assert!(
            matches!(&turn[1], Block::ToolResult { tool_use_id, .. } if tool_use_id == "call_h1DWI1POMJLb0KwIyQHWXD4p")
        );
        assert!(matches!(&turn[2], Block::Text(t) if t.text == "Thanks. Now in Fahrenheit?"));
        // Arguments keep the model's bytes; a non-object becomes {}.
        let Block::ToolUse { input, .. } = &req.messages[1].content[0] else {
            panic!("tool use first")
        };
        assert_eq!(
            input.get(),
            r#"{"city": "Edinburgh", "country": "GB", "units": "c"}"#
        );
        let Block::ToolUse { input, .. } = &req.messages[3].content[2] else {
            panic!("text, then two tool uses")
        };
        assert_eq!(input.get(), "{}");
        assert!(arguments_lossy("not json") && arguments_lossy("[1]") && !arguments_lossy(" {} "));
    }

    #[test]
    fn thinking_blocks_come_first_with_an_anthropic_signature() {
        let req = request_in(&fixture("requests/thinking_blocks.json")).unwrap();
        let turn = &req.messages[1].content;
        assert!(
            matches!(&turn[0], Block::Thinking { signature: Some(s), .. } if s.origin == Api::AnthropicMessages)
        );
        assert!(
            matches!(&turn[1], Block::RedactedThinking { data } if data.origin == Api::AnthropicMessages)
        );
        assert!(
            matches!(&turn[2], Block::ToolUse { .. }),
            "empty content adds no text"
        );
        assert_eq!(turn.len(), 3);
    }

    // ----- requests out --------------------------------------------------------------------

    /// A request as an Anthropic client's would read: system, a mid-conversation system
    /// message, images, a PDF, thinking, parallel tool use, results with an image.
    fn anthropic_like_request() -> Request {
        Request {
            model: "public".into(),
            system: vec![
                TextBlock {
                    text: "You are terse.".into(),
                    cache: Some(CacheMark { ttl: None }),
                },
                TextBlock {
                    text: "Use metric units.".into(),
                    cache: None,
                },
            ],
            messages: vec![
                Message {
                    role: Role::User,
                    content: vec![
                        text("Weather in Paris and Oslo? See the map."),
                        Block::Image {
                            source: ImageSource::Base64 {
                                media_type: "image/png".into(),
                                data: "iVBORw0KGgo=".into(),
                            },
                            cache: None,
                        },
                        Block::Image {
                            source: ImageSource::Url("https://example.com/map.jpg".into()),
                            cache: None,
                        },
                        Block::Document {
                            media_type: "application/pdf".into(),
                            data: "JVBERi0xLjQ=".into(),
                            cache: None,
                        },
                    ],
                },
                Message {
                    role: Role::Assistant,
                    content: vec![
                        Block::Thinking {
                            text: "Two cities: two calls.".into(),
                            signature: Some(Signature {
                                origin: Api::AnthropicMessages,
                                value: "sig".into(),
                            }),
                        },
                        Block::RedactedThinking {
                            data: Signature {
                                origin: Api::AnthropicMessages,
                                value: "redacted".into(),
                            },
                        },
                        text("Checking both."),
                        Block::ToolUse {
                            id: "toolu_1".into(),
                            name: "weather".into(),
                            input: raw(r#"{"city": "Paris"}"#),
                            cache: None,
                        },
                        Block::ToolUse {
                            id: "toolu_2".into(),
                            name: "weather".into(),
                            input: raw(r#"{"city":"Oslo"}"#),
                            cache: None,
                        },
                    ],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        text("Also: which is warmer?"),
                        Block::ToolResult {
                            tool_use_id: "toolu_1".into(),
                            content: vec![text("15 C"), text("cloudy")],
                            is_error: false,
                            cache: None,
                        },
                        Block::ToolResult {
                            tool_use_id: "toolu_2".into(),
                            content: vec![
                                text("radar:"),
                                Block::Image {
                                    source: ImageSource::Url(
                                        "https://example.com/radar.png".into(),
                                    ),
                                    cache: None,
                                },
                            ],
                            is_error: true,
                            cache: None,
                        },
                    ],
                },
                Message {
                    role: Role::System,
                    content: vec![text("Answer in one line.")],
                },
            ],
            tools: vec![Tool {
                name: "weather".into(),
                description: Some("Current weather".into()),
                input_schema: Some(raw(
                    r#"{"type":"object","properties":{"city":{"type":"string"}}}"#,
                )),
                strict: None,
                cache: None,
            }],
            tool_choice: Some(ToolChoice::Any),
            parallel_tool_calls: Some(false),
            temperature: Some(0.5),
            top_p: Some(0.9),
            top_k: Some(40),
            max_output_tokens: Some(1024),
            stop: vec!["END".into()],
            response_format: Some(ResponseFormat::JsonSchema {
                name: None,
                schema: raw(r#"{"type":"object"}"#),
                strict: None,
            }),
            reasoning: Some(Reasoning::Budget(8000)),
            user: Some("user-1".into()),
            stream: true,
            include_usage: false,
            ignored: vec!["top_k"],
        }
    }

    #[test]
    fn request_out_max_completion_tokens() {
        let body = request_out(
            &anthropic_like_request(),
            "gpt-4o",
            Out {
                max_tokens_field: MaxTokensField::MaxCompletionTokens,
            },
        )
        .unwrap();
        insta::assert_json_snapshot!(pretty(&body));
    }

    #[test]
    fn request_out_max_tokens() {
        let mut req = anthropic_like_request();
        req.stream = false;
        req.system.truncate(1);
        req.reasoning = Some(Reasoning::Effort(Effort::XHigh));
        req.response_format = Some(ResponseFormat::JsonObject);
        req.tool_choice = Some(ToolChoice::Tool("weather".into()));
        let body = request_out(
            &req,
            "llama-3",
            Out {
                max_tokens_field: MaxTokensField::MaxTokens,
            },
        )
        .unwrap();
        insta::assert_json_snapshot!(pretty(&body));
    }

    #[test]
    fn request_out_rules() {
        let out = Out {
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
        };
        let mut req = anthropic_like_request();
        req.stop = (0..5).map(|i| i.to_string()).collect();
        assert_eq!(
            request_out(&req, "m", out).unwrap_err().param,
            Some("stop_sequences")
        );

        for (budget, word) in [
            (1024, "low"),
            (4095, "low"),
            (4096, "medium"),
            (16383, "medium"),
            (16384, "high"),
        ] {
            let mut req = anthropic_like_request();
            req.reasoning = Some(Reasoning::Budget(budget));
            let v = pretty(&request_out(&req, "m", out).unwrap());
            assert_eq!(v["reasoning_effort"], word, "budget {budget}");
        }
        for r in [Reasoning::Off, Reasoning::Adaptive] {
            let mut req = anthropic_like_request();
            req.reasoning = Some(r);
            let v = pretty(&request_out(&req, "m", out).unwrap());
            assert!(v.get("reasoning_effort").is_none());
        }
        // Arguments and schemas keep their bytes, spaces included.
        let body =
            String::from_utf8(request_out(&anthropic_like_request(), "m", out).unwrap()).unwrap();
        assert!(
            body.contains(r#""arguments":"{\"city\": \"Paris\"}""#),
            "{body}"
        );
        assert!(
            body.contains(
                r#""parameters":{"type":"object","properties":{"city":{"type":"string"}}}"#
            )
        );
        assert!(
            !body.contains("top_k") && !body.contains("signature") && !body.contains("is_error")
        );
    }

    #[test]
    fn openai_requests_round_trip() {
        let out = Out {
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
        };
        for file in [
            "parallel_tools_two_turns.json",
            "system_first_and_middle.json",
            "images.json",
            "json_schema.json",
        ] {
            let req = request_in(&fixture(&format!("requests/{file}"))).unwrap();
            let again = request_in(&request_out(&req, &req.model, out).unwrap()).unwrap();
            assert_eq!(req.messages.len(), again.messages.len(), "{file}");
            for (k, (a, b)) in req.messages.iter().zip(&again.messages).enumerate() {
                let (a, b) = (format!("{a:?}"), format!("{b:?}"));
                if file == "parallel_tools_two_turns.json" && k == 2 {
                    // A tool result's text parts are joined: the one loss of this trip.
                    assert_eq!(
                        a.replace(
                            r#"227.52", cache: None }), Text(TextBlock { text: "USD"#,
                            r#"227.52\nUSD"#
                        ),
                        b
                    );
                } else {
                    assert_eq!(a, b, "{file}");
                }
            }
            assert_eq!(req.system, again.system, "{file}");
            assert_eq!(
                format!("{:?}", req.tools),
                format!("{:?}", again.tools),
                "{file}"
            );
            assert_eq!(req.max_output_tokens, again.max_output_tokens);
        }
    }

    // ----- answers -------------------------------------------------------------------------

    #[test]
    fn response_in_fixtures() {
        insta::glob!(
            "../../tests/fixtures/providers/openai/responses",
            "*.json",
            |path| {
                let body = std::fs::read(path).unwrap();
                insta::assert_debug_snapshot!(response_in(&body));
            }
        );
    }

    #[test]
    fn usage_counts_each_prompt_token_once() {
        let resp = response_in(&fixture("responses/usage_cached_reasoning.json")).unwrap();
        let u = resp.usage;
        assert_eq!(
            (u.input, u.cache_read, u.cache_write),
            (Some(86), Some(1920), None)
        );
        assert_eq!((u.output, u.reasoning), (Some(300), Some(192)));
        assert_eq!(u.prompt(), 2006, "input + cache_read = prompt_tokens");
        assert_eq!(u.processed(), 2306, "reasoning is inside output, not added");
        let back = pretty(&response_out(&resp, "public", 1));
        assert_eq!(back["usage"]["prompt_tokens"], 2006);
        assert_eq!(back["usage"]["total_tokens"], 2306);
        assert_eq!(
            back["usage"]["prompt_tokens_details"]["cached_tokens"],
            1920
        );

        let resp = response_in(&fixture("responses/thinking_blocks.json")).unwrap();
        assert_eq!(resp.usage.input, Some(50), "1200 - 1000 read - 150 written");
        let back = pretty(&response_out(&resp, "public", 1));
        assert_eq!(back["usage"]["prompt_tokens"], 1200);
        assert_eq!(
            back["usage"]["prompt_tokens_details"]["cache_write_tokens"],
            150
        );
    }

    /// An answer as an Anthropic backend's would read.
    fn anthropic_like_response() -> Response {
        Response {
            id: "msg_01XFDUDYJgAACzvnptvVoYEL".into(),
            model: "claude-sonnet".into(),
            content: vec![
                Block::Thinking {
                    text: "Let me think. ".into(),
                    signature: Some(Signature {
                        origin: Api::AnthropicMessages,
                        value: "EqQBCgIYAh".into(),
                    }),
                },
                Block::RedactedThinking {
                    data: Signature {
                        origin: Api::AnthropicMessages,
                        value: "EmwKAhgB".into(),
                    },
                },
                text("Paris: "),
                text("15 C."),
                Block::ToolUse {
                    id: "toolu_1".into(),
                    name: "weather".into(),
                    input: raw(r#"{"city": "Oslo"}"#),
                    cache: None,
                },
            ],
            stop: StopReason::ToolUse,
            stop_sequence: None,
            usage: Usage {
                input: Some(10),
                cache_read: Some(1000),
                cache_write: Some(200),
                output: Some(50),
                reasoning: None,
            },
        }
    }

    #[test]
    fn response_out_anthropic_answer() {
        insta::assert_json_snapshot!(pretty(&response_out(
            &anthropic_like_response(),
            "public-model",
            1_700_000_000
        )));
    }

    #[test]
    fn response_out_plain_answer() {
        let resp = Response {
            id: "chatcmpl-1".into(),
            model: "m".into(),
            content: vec![Block::Thinking {
                text: "unsigned".into(),
                signature: None,
            }],
            stop: StopReason::MaxTokens,
            stop_sequence: None,
            usage: Usage::default(),
        };
        let v = pretty(&response_out(&resp, "public", 7));
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(v["choices"][0]["message"]["reasoning_content"], "unsigned");
        assert!(v["choices"][0]["message"].get("thinking_blocks").is_none());
        assert!(v["choices"][0]["message"].get("tool_calls").is_none());
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}})
        );
    }

    // ----- errors --------------------------------------------------------------------------

    #[test]
    fn error_fixtures() {
        insta::glob!(
            "../../tests/fixtures/providers/openai/errors",
            "*.json",
            |path| {
                let name = path.file_name().unwrap().to_str().unwrap();
                let status: u16 = name[..3].parse().unwrap();
                let err = error_in(status, &std::fs::read(path).unwrap());
                let out = pretty(&error_out(&err));
                insta::assert_debug_snapshot!((err, out));
            }
        );
    }

    #[test]
    fn error_kinds() {
        let kind = |file: &str| {
            let status = file[..3].parse().unwrap();
            error_in(status, &fixture(&format!("errors/{file}"))).kind
        };
        assert_eq!(
            kind("429-insufficient-quota.json"),
            ErrorKind::QuotaExhausted
        );
        assert_eq!(kind("429-rate-limit.json"), ErrorKind::RateLimited);
        assert_eq!(
            kind("400-context-length-exceeded.json"),
            ErrorKind::ContextLength
        );
        assert_eq!(
            kind("400-azure-content-filter-result.json"),
            ErrorKind::ContentFiltered
        );
        assert_eq!(
            kind("400-azure-content-filter-results.json"),
            ErrorKind::ContentFiltered
        );
        assert_eq!(kind("401-invalid-api-key.json"), ErrorKind::Authentication);
        assert_eq!(kind("404-model-not-found.json"), ErrorKind::NotFound);
        assert_eq!(kind("503-overloaded.json"), ErrorKind::Overloaded);
        assert_eq!(kind("502-not-json.json"), ErrorKind::Server);
        for (status, k) in [
            (403, ErrorKind::Permission),
            (413, ErrorKind::RequestTooLarge),
            (504, ErrorKind::Timeout),
            (500, ErrorKind::Server),
            (422, ErrorKind::InvalidRequest),
        ] {
            assert_eq!(error_in(status, b"").kind, k, "{status}");
        }
        // Never more than ~1 KiB of upstream text.
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "é".repeat(5000));
        assert!(error_in(400, long.as_bytes()).message.len() <= MAX_ERROR_TEXT);
    }

    #[test]
    fn errors_out_by_kind() {
        let out = |kind, code: Option<&str>| {
            let v = pretty(&error_out(&ApiError {
                status: 400,
                kind,
                message: "m".into(),
                param: Some("p".into()),
                code: code.map(str::to_owned),
            }));
            (
                v["error"]["type"].as_str().unwrap().to_owned(),
                v["error"]["code"].as_str().map(str::to_owned),
            )
        };
        let s = |t: &str, c: Option<&str>| (t.to_owned(), c.map(str::to_owned));
        assert_eq!(
            out(ErrorKind::InvalidRequest, Some("x")),
            s("invalid_request_error", Some("x"))
        );
        assert_eq!(
            out(ErrorKind::ContextLength, None),
            s("invalid_request_error", Some("context_length_exceeded"))
        );
        assert_eq!(
            out(ErrorKind::ContentFiltered, None),
            s("invalid_request_error", Some("content_filter"))
        );
        assert_eq!(
            out(ErrorKind::NotFound, None),
            s("invalid_request_error", None)
        );
        assert_eq!(
            out(ErrorKind::RequestTooLarge, None),
            s("invalid_request_error", None)
        );
        assert_eq!(
            out(ErrorKind::Authentication, None),
            s("authentication_error", None)
        );
        assert_eq!(
            out(ErrorKind::Permission, None),
            s("permission_error", None)
        );
        assert_eq!(
            out(ErrorKind::RateLimited, None),
            s("rate_limit_error", None)
        );
        assert_eq!(
            out(ErrorKind::QuotaExhausted, None),
            s("insufficient_quota", Some("insufficient_quota"))
        );
        assert_eq!(
            out(ErrorKind::Overloaded, None),
            s("upstream_error", Some("upstream_overloaded"))
        );
        assert_eq!(
            out(ErrorKind::Timeout, None),
            s("upstream_error", Some("upstream_timeout"))
        );
        assert_eq!(
            out(ErrorKind::Server, None),
            s("upstream_error", Some("upstream_error"))
        );
        assert_eq!(
            out(ErrorKind::Billing, None),
            s("upstream_error", Some("upstream_billing"))
        );
    }

    // ----- streams in ----------------------------------------------------------------------

    #[test]
    fn events_in_fixtures() {
        insta::glob!(
            "../../tests/fixtures/providers/openai/streams",
            "*.sse",
            |path| {
                let events = events_in(&std::fs::read(path).unwrap());
                assert_well_formed(&events);
                insta::assert_debug_snapshot!(events);
            }
        );
    }

    #[test]
    fn streamed_tool_arguments_arrive_whole_on_the_right_block() {
        for file in [
            "streams/parallel_tools.sse",
            "streams/parallel_tools_interleaved.sse",
        ] {
            let bytes = fixture(file);
            let events = events_in(&bytes);
            let got = canonical_arguments(&events);
            let want = upstream_arguments(&bytes);
            assert_eq!(got.len(), 2, "{file}");
            assert_eq!(got.len(), want.len());
            for ((_, g), (_, w)) in got.iter().zip(&want) {
                assert_eq!(g, w, "{file}");
                serde_json::from_str::<Value>(g).expect("whole arguments are JSON");
            }
            assert!(events.iter().all(|e| !matches!(e, Event::BlockDelta { delta: Delta::ToolArgs(a), .. } if a.is_empty())));
            assert!(events.contains(&Event::MessageStop {
                stop: StopReason::ToolUse,
                stop_sequence: None
            }));
        }
    }

    #[test]
    fn stream_usage_equals_the_answer_usage() {
        let events = events_in(&fixture("streams/text_include_usage.sse"));
        let mut u = Usage::default();
        for e in &events {
            if let Event::Usage(x) = e {
                u.merge(*x);
            }
        }
        assert_eq!(u.prompt(), 14);
        assert_eq!(u.output, Some(30));
        assert_eq!(u.reasoning, Some(0));
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                Event::BlockDelta {
                    delta: Delta::Text(t),
                    ..
                } => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert!(
            text.starts_with("I'm unable to provide real-time weather updates."),
            "{text}"
        );
    }

    #[test]
    fn azure_filter_chunks_make_nothing() {
        let bytes = fixture("streams/azure_async_filter.sse");
        let data = sse_data(&bytes);
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        t.event(data[0].as_bytes(), &mut out).unwrap();
        assert!(out.is_empty(), "the prompt-filter chunk: {out:?}");
        t.event(data[1].as_bytes(), &mut out).unwrap();
        assert_eq!(out.len(), 1, "the role chunk starts the message");
        out.clear();
        t.event(data[5].as_bytes(), &mut out).unwrap();
        assert!(out.is_empty(), "an annotation-only chunk: {out:?}");
        // A blocked completion's finish comes on an annotation chunk and still counts.
        let events = events_in(&fixture("streams/azure_blocked.sse"));
        assert!(events.contains(&Event::MessageStop {
            stop: StopReason::ContentFilter,
            stop_sequence: None
        }));
    }

    #[test]
    fn stream_endings() {
        // No [DONE]: a finish was seen, so the message closes.
        let events = events_in(&fixture("streams/tgi_no_done.sse"));
        assert!(matches!(events.last(), Some(Event::MessageStop { .. })));
        // Cut before a finish: an error, and nothing closes.
        let events = events_in(&fixture("streams/cut_short.sse"));
        assert!(
            matches!(events.last(), Some(Event::Error(e)) if e.kind == ErrorKind::Server && e.message == CUT_SHORT)
        );
        // A mid-stream error is last; events after it make nothing.
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        for d in sse_data(&fixture("streams/error_midstream.sse")) {
            t.event(d.as_bytes(), &mut out).unwrap();
        }
        t.event(b"[DONE]", &mut out).unwrap();
        t.finish(&mut out);
        assert!(
            matches!(out.last(), Some(Event::Error(e)) if e.message.starts_with("The server had an error"))
        );
        // [DONE] twice stops once; nothing at all is an error.
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        t.event(
            br#"{"id":"x","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}"#,
            &mut out,
        )
        .unwrap();
        t.event(b"[DONE]", &mut out).unwrap();
        t.event(b" [DONE]\n", &mut out).unwrap();
        t.finish(&mut out);
        assert_eq!(
            out.iter()
                .filter(|e| matches!(e, Event::MessageStop { .. }))
                .count(),
            1
        );
        let mut out = Vec::new();
        EventsIn::new().finish(&mut out);
        assert!(matches!(out.as_slice(), [Event::Error(_)]));
        assert!(EventsIn::new().event(b"{oops", &mut out).is_err());
    }

    #[test]
    fn tool_calls_are_bounded() {
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        let mut result = Ok(());
        for i in 0..=MAX_STREAM_TOOL_CALLS {
            let chunk = format!(
                r#"{{"id":"x","choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":{i},"id":"c{i}","function":{{"name":"f","arguments":""}}}}]}}}}]}}"#
            );
            result = t.event(chunk.as_bytes(), &mut out);
            if result.is_err() {
                assert_eq!(i, MAX_STREAM_TOOL_CALLS);
            }
        }
        assert!(result.is_err());
        assert!(t.tools.len() <= MAX_STREAM_TOOL_CALLS);
    }

    // ----- streams out ---------------------------------------------------------------------

    /// An Anthropic-like stream: thinking with a signature, redacted thinking, text, two tool
    /// calls with fragments, usage at the start and at the end.
    fn anthropic_like_events() -> Vec<Event> {
        let delta = |index, delta| Event::BlockDelta { index, delta };
        vec![
            Event::MessageStart {
                id: "msg_01".into(),
                usage: Usage {
                    input: Some(10),
                    cache_read: Some(1000),
                    cache_write: Some(200),
                    output: Some(1),
                    reasoning: None,
                },
            },
            Event::BlockStart {
                index: 0,
                kind: BlockKind::Thinking,
            },
            delta(0, Delta::Thinking("Two ".into())),
            delta(0, Delta::Thinking("calls.".into())),
            delta(0, Delta::Signature("EqQB".into())),
            Event::BlockStop { index: 0 },
            Event::BlockStart {
                index: 1,
                kind: BlockKind::RedactedThinking {
                    data: "EmwK".into(),
                },
            },
            Event::BlockStop { index: 1 },
            Event::BlockStart {
                index: 2,
                kind: BlockKind::Text,
            },
            delta(2, Delta::Text("Checking.".into())),
            delta(2, Delta::Text(String::new())),
            Event::BlockStop { index: 2 },
            Event::BlockStart {
                index: 3,
                kind: BlockKind::ToolUse {
                    id: "toolu_1".into(),
                    name: "weather".into(),
                },
            },
            delta(3, Delta::ToolArgs(String::new())),
            delta(3, Delta::ToolArgs(r#"{"city": "#.into())),
            Event::BlockStart {
                index: 4,
                kind: BlockKind::ToolUse {
                    id: "toolu_2".into(),
                    name: "weather".into(),
                },
            },
            delta(4, Delta::ToolArgs(r#"{"city":"Oslo"}"#.into())),
            delta(3, Delta::ToolArgs(r#""Paris"}"#.into())),
            Event::BlockStop { index: 3 },
            Event::BlockStop { index: 4 },
            Event::Usage(Usage {
                output: Some(57),
                ..Usage::default()
            }),
            Event::MessageStop {
                stop: StopReason::ToolUse,
                stop_sequence: None,
            },
        ]
    }

    #[test]
    fn events_out_with_usage() {
        insta::assert_snapshot!(events_out(&anthropic_like_events(), true));
    }

    #[test]
    fn events_out_without_usage() {
        let out = events_out(&anthropic_like_events(), false);
        assert!(!out.contains("\"usage\""), "no usage chunk, no usage: null");
        assert!(out.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn events_out_error_and_cut() {
        let mut events = anthropic_like_events();
        events.truncate(10);
        events.push(Event::Error(ApiError {
            status: 529,
            kind: ErrorKind::Overloaded,
            message: "Overloaded".into(),
            param: None,
            code: None,
        }));
        events.push(Event::BlockStop { index: 2 });
        let out = events_out(&events, true);
        insta::assert_snapshot!(out);
        assert!(out.ends_with("data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"upstream_overloaded\"}}\n\n"));

        let mut events = anthropic_like_events();
        events.truncate(10);
        let out = events_out(&events, true);
        assert!(out.ends_with(&format!("data: {{\"error\":{{\"message\":\"{CUT_SHORT}\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"upstream_error\"}}}}\n\n")));
        assert!(!out.contains("[DONE]"));
    }

    #[test]
    fn thinking_text_is_capped() {
        let big = "x".repeat(MAX_THINKING_BYTES / 2 + 1);
        let events = [
            Event::MessageStart {
                id: "m".into(),
                usage: Usage::default(),
            },
            Event::BlockStart {
                index: 0,
                kind: BlockKind::Thinking,
            },
            Event::BlockDelta {
                index: 0,
                delta: Delta::Thinking(big.clone()),
            },
            Event::BlockDelta {
                index: 0,
                delta: Delta::Thinking(big),
            },
            Event::BlockDelta {
                index: 0,
                delta: Delta::Signature("s".into()),
            },
            Event::BlockStop { index: 0 },
        ];
        let out = events_out(&events, false);
        assert!(
            out.ends_with("\"code\":\"upstream_error\"}}\n\n"),
            "past the cap the stream ends with an error"
        );
        assert!(!out.contains("thinking_blocks"));
    }

    #[test]
    fn thinking_held_over_all_open_blocks_is_capped_together() {
        let big = "x".repeat(MAX_THINKING_BYTES / 2 + 1);
        let mut events = vec![Event::MessageStart {
            id: "m".into(),
            usage: Usage::default(),
        }];
        // Two blocks open at once, each under the cap alone, over it together.
        for index in 0..2 {
            events.push(Event::BlockStart {
                index,
                kind: BlockKind::Thinking,
            });
            events.push(Event::BlockDelta {
                index,
                delta: Delta::Thinking(big.clone()),
            });
        }
        events.push(Event::BlockDelta {
            index: 1,
            delta: Delta::Signature("s".into()),
        });
        events.push(Event::BlockStop { index: 1 });
        let out = events_out(&events, false);
        assert!(
            out.ends_with("\"code\":\"upstream_error\"}}\n\n"),
            "the second block went past the shared allowance"
        );
    }

    /// OpenAI in, OpenAI out: what a client sees through two translations is what the
    /// upstream sent (text, tool calls with their fragments joined, usage, finish).
    #[test]
    fn openai_stream_round_trip() {
        for file in [
            "streams/parallel_tools_interleaved.sse",
            "streams/text_include_usage.sse",
            "streams/reasoning_content.sse",
        ] {
            let bytes = fixture(file);
            let out = events_out(&events_in(&bytes), true);
            let chunks: Vec<Value> = sse_data(out.as_bytes())
                .iter()
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            let mut args: Vec<(u64, String)> = Vec::new();
            for c in &chunks {
                assert_eq!(c["object"], "chat.completion.chunk");
                for t in c["choices"][0]["delta"]["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let i = t["index"].as_u64().unwrap();
                    let frag = t["function"]["arguments"].as_str().unwrap();
                    match args.iter_mut().find(|(k, _)| *k == i) {
                        Some((_, s)) => s.push_str(frag),
                        None => args.push((i, frag.to_owned())),
                    }
                }
            }
            assert_eq!(args, upstream_arguments(&bytes), "{file}");
            let usage = &chunks.last().unwrap()["usage"];
            let upstream: Vec<Value> = sse_data(&bytes)
                .iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .collect();
            let want = upstream
                .iter()
                .rev()
                .find(|c| c["usage"].is_object())
                .unwrap();
            assert_eq!(
                usage["prompt_tokens"], want["usage"]["prompt_tokens"],
                "{file}"
            );
            assert_eq!(
                usage["total_tokens"], want["usage"]["total_tokens"],
                "{file}"
            );
        }
    }

    // ----- never panics --------------------------------------------------------------------

    fn jsonish() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            "[\\[\\]{}\":,a-z0-9 .\\\\-]{0,200}".prop_map(String::into_bytes),
            // Valid chat-ish shapes with arbitrary values.
            ("[a-z_]{1,12}", "[\\[\\]{}\":,a-z0-9 ]{0,40}").prop_map(|(k, v)| {
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"{k}","{k}":{v}}}]}}],"{k}":{v}}}"#).into_bytes()
            }),
            ("[a-z_]{1,12}", "[\\[\\]{}\":,a-z0-9 ]{0,40}").prop_map(|(k, v)| {
                format!(r#"{{"id":"x","choices":[{{"index":0,"delta":{{"{k}":{v},"tool_calls":[{{"index":{v}}}]}},"finish_reason":{v}}}],"usage":{v},"error":{v}}}"#).into_bytes()
            }),
        ]
    }

    proptest! {
        #[test]
        fn nothing_panics(body in jsonish(), status in 0u16..1000) {
            let _ = request_in(&body);
            let _ = response_in(&body);
            let err = error_in(status, &body);
            let _ = error_out(&err);
            let mut t = EventsIn::new();
            let mut events = Vec::new();
            let _ = t.event(&body, &mut events);
            let _ = t.event(&body, &mut events);
            t.finish(&mut events);
            let mut o = EventsOut::new("m", 0, true);
            let mut bytes = Vec::new();
            for e in &events {
                o.event(e, &mut bytes);
            }
            o.finish(&mut bytes);
        }
    }
}
