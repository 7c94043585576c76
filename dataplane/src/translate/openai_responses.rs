//! OpenAI Responses (`POST /v1/responses`) in and out of the canonical model: used by
//! Responses clients of a backend that is not a Responses backend (requests in, answers and
//! streams out), and to read a Responses answer or stream passed through from an OpenAI or
//! Azure backend (usage for the meter).
//!
//! ```text
//!  Responses body ─► request_in ─► Request ─► another API's request_out ─► backend
//!  `response` JSON ─► response_in ─► Response ─► response_out ─► `response` JSON
//!  SSE data ─► EventsIn ─► Event* ─► EventsOut ─► `event:` + `data:` lines
//!  error body ─► error_in ─► ApiError ─► error_out ─► error body (OpenAI's envelope)
//! ```
//!
//! Stored state lives only at OpenAI: `store: true`, `previous_response_id`, `conversation`,
//! `background: true`, `prompt` and `item_reference` inputs are refused here (400 naming the
//! field); on an OpenAI or Azure Responses backend the body passes through and they work.
//! Built-in tools (web search, file search, code interpreter, computer use, MCP, image
//! generation, custom tools) run on OpenAI's servers and are refused too. `include`: only
//! `message.output_text.logprobs` is refused (no other backend gives log probabilities);
//! `reasoning.encrypted_content` is always honoured, and the entries naming built-in tool
//! outputs or input image URLs can have no effect once those are refused: ignored, named.
//!
//! Thinking goes out as a `reasoning` item: its text as one `summary_text` part, its
//! signature in `encrypted_content`, tagged with the API that issued it so the next turn sends
//! it back only there (`Signature.origin`):
//!
//! ```text
//!  mg1.<origin>.t.<signature>   a thinking block's signature
//!  mg1.<origin>.r.<data>        a redacted thinking block (summary empty)
//!  <anything else>              OpenAI's own encrypted_content (origin OpenAiResponses)
//!  origin: openai-chat | anthropic | openai-responses | bedrock | gemini
//! ```
//!
//! A thinking signature issued by OpenAI Responses itself is written untagged, as OpenAI
//! wrote it. A failed stream ends as OpenAI ends one: an `error` event with the error nested
//! (on which the openai SDKs raise `APIError`, in `responses.create(stream=True)` and in
//! `responses.stream()`), then `response.failed` carrying the answer so far. Usage: Responses `input_tokens` is the whole prompt (canonical input +
//! cache_read + cache_write), `output_tokens` includes the reasoning tokens
//! (docs/providers.md 5). Reading borrows with `Deserialize` structs, one top-level field at a
//! time so a wrong type names its field; tool schemas and arguments stay `RawValue` text.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{MAX_STREAM_TOOL_CALLS, Refused, openai_chat};
use crate::canonical::{
    Api, ApiError, Block, BlockKind, Delta, Effort, ErrorKind, Event, ImageSource, Message,
    Reasoning, Request, Response, ResponseFormat, Role, Signature, StopReason, TextBlock, Tool,
    ToolChoice, Usage,
};

/// Most bytes of text, tool arguments, thinking and signatures `EventsOut` holds for the
/// final `response` object of one stream (`response.completed` repeats the whole answer).
/// Well above the longest answer any model writes (128k tokens is about 0.5 MiB); past it
/// the stream ends with `response.failed`.
pub const MAX_HELD_BYTES: usize = 4 << 20;

/// Most output items one streamed answer may have (each canonical block is one item).
const MAX_ITEMS: usize = 4 * MAX_STREAM_TOOL_CALLS;

/// Most output items (and message parts) `EventsIn` keeps open at once.
const MAX_OPEN: usize = MAX_STREAM_TOOL_CALLS;

/// Most upstream text copied into an error message.
const MAX_ERROR_TEXT: usize = 1024;

/// Most of a parser's complaint copied into a refusal (serde quotes the offending value).
const MAX_PARSE_ERROR_BYTES: usize = 200;

/// What a stream that stops without finishing says.
const CUT_SHORT: &str = "the upstream stream ended before the message was complete";

/// The tag of the gateway's `encrypted_content` values (module doc).
const TAG: &str = "mg1.";

// ---------------------------------------------------------------------------------------------
// Signatures in encrypted_content
// ---------------------------------------------------------------------------------------------

fn origin_word(api: Api) -> &'static str {
    match api {
        Api::OpenAiChat => "openai-chat",
        Api::AnthropicMessages => "anthropic",
        Api::OpenAiResponses => "openai-responses",
        Api::BedrockConverse => "bedrock",
        Api::Gemini => "gemini",
    }
}

fn origin_of(word: &str) -> Option<Api> {
    Some(match word {
        "openai-chat" => Api::OpenAiChat,
        "anthropic" => Api::AnthropicMessages,
        "openai-responses" => Api::OpenAiResponses,
        "bedrock" => Api::BedrockConverse,
        "gemini" => Api::Gemini,
        _ => return None,
    })
}

/// The `encrypted_content` that carries a signature (or redacted data) of `origin`.
fn encrypted(origin: Api, value: &str, redacted: bool) -> Cow<'_, str> {
    if origin == Api::OpenAiResponses && !redacted {
        return Cow::Borrowed(value);
    }
    let kind = if redacted { "r" } else { "t" };
    Cow::Owned(format!("{TAG}{}.{kind}.{value}", origin_word(origin)))
}

/// What an `encrypted_content` holds.
#[derive(Debug, PartialEq, Eq)]
enum Sealed {
    Thinking(Signature),
    Redacted(Signature),
}

/// Reads an `encrypted_content`; `None` for a tag the gateway did not write.
fn unseal(value: String) -> Option<Sealed> {
    let Some(rest) = value.strip_prefix(TAG) else {
        return Some(Sealed::Thinking(Signature {
            origin: Api::OpenAiResponses,
            value,
        }));
    };
    let (origin, rest) = rest.split_once('.')?;
    let (kind, inner) = rest.split_once('.')?;
    let signature = Signature {
        origin: origin_of(origin)?,
        value: inner.to_owned(),
    };
    match kind {
        "t" => Some(Sealed::Thinking(signature)),
        "r" => Some(Sealed::Redacted(signature)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Requests in
// ---------------------------------------------------------------------------------------------

/// The top level of a Responses request: every field as raw JSON, read one by one so a wrong
/// type names its field. `null` reads as absent; unknown fields are dropped unnamed (as
/// `openai_chat::request_in` does).
#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_choice: Option<&'a RawValue>,
    #[serde(borrow)]
    parallel_tool_calls: Option<&'a RawValue>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    reasoning: Option<&'a RawValue>,
    #[serde(borrow)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    temperature: Option<&'a RawValue>,
    #[serde(borrow)]
    top_p: Option<&'a RawValue>,
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    #[serde(borrow)]
    safety_identifier: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    store: Option<&'a RawValue>,
    #[serde(borrow)]
    previous_response_id: Option<&'a RawValue>,
    #[serde(borrow)]
    conversation: Option<&'a RawValue>,
    #[serde(borrow)]
    background: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    include: Option<&'a RawValue>,
    #[serde(borrow)]
    top_logprobs: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    truncation: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tool_calls: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_cache_key: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_cache_options: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_cache_retention: Option<&'a RawValue>,
    #[serde(borrow)]
    service_tier: Option<&'a RawValue>,
    #[serde(borrow)]
    context_management: Option<&'a RawValue>,
    #[serde(borrow)]
    moderation: Option<&'a RawValue>,
}

/// One input item; which fields count depends on `type` (and `role` for messages).
#[derive(Deserialize)]
struct WireItem<'a> {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default, borrow)]
    output: Option<&'a RawValue>,
    #[serde(default, borrow)]
    summary: Option<&'a RawValue>,
    #[serde(default)]
    encrypted_content: Option<String>,
}

/// A content part of a message or of a function call's output.
#[derive(Deserialize)]
struct WirePart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    image_url: Option<String>,
    #[serde(default)]
    file_id: Option<String>,
    #[serde(default)]
    file_data: Option<String>,
    #[serde(default)]
    file_url: Option<String>,
    #[serde(default)]
    filename: Option<String>,
}

/// A `summary_text` or `reasoning_text` entry of a reasoning item.
#[derive(Deserialize)]
struct WireText {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
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
    name: Option<String>,
}

#[derive(Deserialize)]
struct WireTextConfig<'a> {
    #[serde(default, borrow)]
    format: Option<WireFormat<'a>>,
    #[serde(default, borrow)]
    verbosity: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireFormat<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, borrow)]
    schema: Option<&'a RawValue>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
struct WireReasoningConfig {
    #[serde(default)]
    effort: Option<String>,
}

fn refuse(param: &'static str, message: impl Into<String>) -> Refused {
    Refused::new(Some(param), message)
}

fn clip(s: &str) -> &str {
    super::clip(s, MAX_PARSE_ERROR_BYTES)
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

fn stored_state(param: &'static str, what: &str) -> Refused {
    refuse(
        param,
        format!(
            "{what} needs state stored at OpenAI, which only an OpenAI or Azure Responses backend keeps; \
             this model's backend keeps none: send the whole conversation as 'input' items"
        ),
    )
}

/// A Responses request body into the canonical model (for a backend that is not Responses).
/// Refuses stored state, built-in tools and what no other backend API can express, naming
/// the field.
pub fn request_in(body: &[u8]) -> Result<Request, Refused> {
    let wire: WireRequest = serde_json::from_slice(body).map_err(|e| {
        Refused::new(
            None,
            format!(
                "the request body is not a valid JSON object: {}",
                clip(&e.to_string())
            ),
        )
    })?;

    // Stored state: only OpenAI has it.
    if field::<bool>(wire.store, "store", "a boolean")? == Some(true) {
        return Err(stored_state("store", "'store: true'"));
    }
    if field::<String>(
        wire.previous_response_id,
        "previous_response_id",
        "a string",
    )?
    .is_some()
    {
        return Err(stored_state(
            "previous_response_id",
            "'previous_response_id'",
        ));
    }
    if wire.conversation.is_some() {
        return Err(stored_state("conversation", "'conversation'"));
    }
    if field::<bool>(wire.background, "background", "a boolean")? == Some(true) {
        return Err(stored_state("background", "'background: true'"));
    }
    if wire.prompt.is_some() {
        return Err(stored_state(
            "prompt",
            "a stored prompt template ('prompt')",
        ));
    }
    if field::<u64>(wire.top_logprobs, "top_logprobs", "an integer")?.is_some_and(|n| n > 0) {
        return Err(refuse(
            "top_logprobs",
            "'top_logprobs' is not supported by this model's backend",
        ));
    }
    let include: Vec<String> =
        field(wire.include, "include", "an array of strings")?.unwrap_or_default();
    if include.iter().any(|i| i == "message.output_text.logprobs") {
        return Err(refuse(
            "include",
            "'include: message.output_text.logprobs' is not supported by this model's backend",
        ));
    }

    let mut req = Request {
        model: field(wire.model, "model", "a string")?
            .ok_or_else(|| refuse("model", "missing required field 'model'"))?,
        include_usage: true,
        ..Request::default()
    };

    if let Some(text) = field::<String>(wire.instructions, "instructions", "a string")? {
        req.system.push(TextBlock { text, cache: None });
    }
    let Some(input) = wire.input else {
        return Err(refuse("input", "missing required field 'input'"));
    };
    if first_byte(input) == b'"' {
        let text: String =
            field(Some(input), "input", "a string or an array of items")?.unwrap_or_default();
        req.messages.push(Message {
            role: Role::User,
            content: vec![Block::Text(TextBlock { text, cache: None })],
        });
    } else {
        let items: Vec<&RawValue> =
            field(Some(input), "input", "a string or an array of items")?.unwrap_or_default();
        read_items(&items, &mut req)?;
    }

    if let Some(tools) = field::<Vec<WireTool>>(wire.tools, "tools", "an array of tools")? {
        for t in tools {
            if t.kind != "function" {
                return Err(refuse(
                    "tools",
                    format!(
                        "tools of type '{}' run on OpenAI's servers and are not supported by this model's backend; \
                         only 'function' tools are",
                        clip(&t.kind)
                    ),
                ));
            }
            let Some(name) = t.name else {
                return Err(refuse("tools", "a function tool needs 'name'"));
            };
            req.tools.push(Tool {
                name,
                description: t.description,
                input_schema: t.parameters.map(RawValue::to_owned),
                strict: t.strict,
                cache: None,
            });
        }
    }
    req.tool_choice = tool_choice(wire.tool_choice)?;
    req.parallel_tool_calls = field(wire.parallel_tool_calls, "parallel_tool_calls", "a boolean")?;
    if let Some(text) = field::<WireTextConfig>(wire.text, "text", "an object")? {
        if let Some(f) = text.format {
            req.response_format = Some(match f.kind.as_str() {
                "text" => ResponseFormat::Text,
                "json_object" => ResponseFormat::JsonObject,
                "json_schema" => match f.schema {
                    Some(schema) => ResponseFormat::JsonSchema {
                        name: f.name,
                        schema: schema.to_owned(),
                        strict: f.strict,
                    },
                    None => {
                        return Err(refuse(
                            "text",
                            "'text.format' of type json_schema needs 'schema'",
                        ));
                    }
                },
                other => {
                    return Err(refuse(
                        "text",
                        format!("'text.format' of type '{}' is not supported", clip(other)),
                    ));
                }
            });
        }
        if text.verbosity.is_some() {
            req.ignored.push("text.verbosity");
        }
    }
    if let Some(r) = field::<WireReasoningConfig>(wire.reasoning, "reasoning", "an object")?
        && let Some(word) = r.effort
    {
        req.reasoning = Some(match word.as_str() {
            "none" => Reasoning::Off,
            w => Reasoning::Effort(Effort::parse(w).ok_or_else(|| {
                refuse(
                    "reasoning",
                    "'reasoning.effort' must be one of none, minimal, low, medium, high, xhigh, max",
                )
            })?),
        });
    }
    req.max_output_tokens = field(
        wire.max_output_tokens,
        "max_output_tokens",
        "a non-negative integer",
    )?;
    req.temperature = field(wire.temperature, "temperature", "a number")?;
    req.top_p = field(wire.top_p, "top_p", "a number")?;
    let user: Option<String> = field(wire.user, "user", "a string")?;
    let safety: Option<String> = field(wire.safety_identifier, "safety_identifier", "a string")?;
    req.user = safety.or(user);
    req.stream = field(wire.stream, "stream", "a boolean")?.unwrap_or(false);
    // `include_obfuscation` is all `stream_options` holds: only its type is checked.
    if wire.stream_options.is_some_and(|o| first_byte(o) != b'{') {
        return Err(refuse(
            "stream_options",
            "'stream_options' must be an object",
        ));
    }

    if include.iter().any(|i| i != "reasoning.encrypted_content") {
        req.ignored.push("include");
    }
    for (raw, name) in [
        (wire.metadata, "metadata"),
        (wire.truncation, "truncation"),
        (wire.max_tool_calls, "max_tool_calls"),
        (wire.prompt_cache_key, "prompt_cache_key"),
        (wire.prompt_cache_options, "prompt_cache_options"),
        (wire.prompt_cache_retention, "prompt_cache_retention"),
        (wire.service_tier, "service_tier"),
        (wire.context_management, "context_management"),
        (wire.moderation, "moderation"),
    ] {
        if raw.is_some() {
            req.ignored.push(name);
        }
    }
    Ok(req)
}

fn tool_choice(raw: Option<&RawValue>) -> Result<Option<ToolChoice>, Refused> {
    const WHAT: &str = "'tool_choice' must be 'none', 'auto', 'required' or {type: function, name}";
    let Some(raw) = raw else { return Ok(None) };
    if first_byte(raw) == b'"' {
        let word: String =
            field(Some(raw), "tool_choice", "a string or an object")?.unwrap_or_default();
        return Ok(Some(match word.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Any,
            _ => return Err(refuse("tool_choice", WHAT)),
        }));
    }
    let named: Option<WireNamedChoice> = field(Some(raw), "tool_choice", WHAT)?;
    match named {
        Some(WireNamedChoice {
            kind,
            name: Some(name),
        }) if kind == "function" => Ok(Some(ToolChoice::Tool(name))),
        Some(WireNamedChoice { kind, .. }) if kind != "function" => Err(refuse(
            "tool_choice",
            format!(
                "'tool_choice' of type '{}' is not supported by this model's backend",
                clip(&kind)
            ),
        )),
        _ => Err(refuse("tool_choice", WHAT)),
    }
}

/// Appends a block to the assistant turn the conversation ends with, or opens one.
fn push_assistant(req: &mut Request, blocks: Vec<Block>) {
    if blocks.is_empty() {
        return;
    }
    match req.messages.last_mut() {
        Some(last) if last.role == Role::Assistant => last.content.extend(blocks),
        _ => req.messages.push(Message {
            role: Role::Assistant,
            content: blocks,
        }),
    }
}

fn read_items(items: &[&RawValue], req: &mut Request) -> Result<(), Refused> {
    let mut leading = true;
    // Whether the last message made is the user turn a run of function call outputs opened,
    // which the next user message joins.
    let mut tool_turn = false;
    for (i, raw) in items.iter().enumerate() {
        let bad = |msg: &str| refuse("input", format!("input[{i}]: {msg}"));
        let item: WireItem = serde_json::from_str(raw.get())
            .map_err(|e| bad(&format!("not an input item: {}", clip(&e.to_string()))))?;
        let kind = match (item.kind.as_deref(), item.role.as_deref()) {
            (Some(kind), _) => kind,
            (None, Some(_)) => "message",
            (None, None) => return Err(bad("an item needs 'type' or 'role'")),
        };
        if !(kind == "message" && matches!(item.role.as_deref(), Some("system" | "developer"))) {
            leading = false;
        }
        match kind {
            "message" => {
                let role = item.role.as_deref().unwrap_or("");
                match role {
                    "system" | "developer" => {
                        let blocks = system_content(item.content, i)?;
                        if leading {
                            req.system.extend(blocks);
                        } else if !blocks.is_empty() {
                            req.messages.push(Message {
                                role: Role::System,
                                content: blocks.into_iter().map(Block::Text).collect(),
                            });
                            tool_turn = false;
                        }
                    }
                    "user" => {
                        let blocks = user_content(item.content, i)?;
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
                        let blocks = assistant_content(item.content, i)?;
                        push_assistant(req, blocks);
                        tool_turn = false;
                    }
                    other => return Err(bad(&format!("unknown role '{}'", clip(other)))),
                }
            }
            "function_call" => {
                let (Some(call_id), Some(name)) = (item.call_id, item.name) else {
                    return Err(bad("a function_call needs 'call_id' and 'name'"));
                };
                let block = Block::ToolUse {
                    id: call_id,
                    name,
                    input: arguments(item.arguments.as_deref().unwrap_or("")),
                    cache: None,
                };
                push_assistant(req, vec![block]);
                tool_turn = false;
            }
            "function_call_output" => {
                let Some(call_id) = item.call_id else {
                    return Err(bad("a function_call_output needs 'call_id'"));
                };
                let result = Block::ToolResult {
                    tool_use_id: call_id,
                    content: output_content(item.output, i)?,
                    is_error: false,
                    cache: None,
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
            "reasoning" => {
                let block = reasoning_block(&item, i)?;
                push_assistant(req, block.into_iter().collect());
                tool_turn = false;
            }
            "item_reference" => {
                return Err(bad(
                    "'item_reference' needs items stored at OpenAI, which only an OpenAI or Azure Responses backend keeps; \
                     send the item itself",
                ));
            }
            other => {
                return Err(bad(&format!(
                    "items of type '{}' belong to tools that run on OpenAI's servers and are not supported by this model's backend",
                    clip(other)
                )));
            }
        }
    }
    Ok(())
}

fn parts(raw: &RawValue, i: usize) -> Result<Vec<WirePart>, Refused> {
    serde_json::from_str(raw.get()).map_err(|e| {
        refuse(
            "input",
            format!("input[{i}].content: {}", clip(&e.to_string())),
        )
    })
}

fn not_content(i: usize) -> Refused {
    refuse(
        "input",
        format!("input[{i}].content must be a string or an array of content parts"),
    )
}

/// A string, or `None` when the content is not one.
fn string_content(raw: &RawValue, i: usize) -> Result<Option<String>, Refused> {
    if first_byte(raw) != b'"' {
        return Ok(None);
    }
    serde_json::from_str(raw.get())
        .map(Some)
        .map_err(|_| not_content(i))
}

/// System and developer content: a string or `input_text` parts.
fn system_content(content: Option<&RawValue>, i: usize) -> Result<Vec<TextBlock>, Refused> {
    let Some(raw) = content else {
        return Err(not_content(i));
    };
    if let Some(text) = string_content(raw, i)? {
        return Ok(vec![TextBlock { text, cache: None }]);
    }
    if first_byte(raw) != b'[' {
        return Err(not_content(i));
    }
    parts(raw, i)?
        .into_iter()
        .map(|p| match (p.kind.as_str(), p.text) {
            ("input_text", Some(text)) => Ok(TextBlock { text, cache: None }),
            (kind, _) => Err(refuse(
                "input",
                format!(
                    "input[{i}].content: only input_text parts are allowed in system and developer messages, not '{}'",
                    clip(kind)
                ),
            )),
        })
        .collect()
}

/// Assistant content: a string, or `output_text` (or `input_text`) and `refusal` parts.
fn assistant_content(content: Option<&RawValue>, i: usize) -> Result<Vec<Block>, Refused> {
    let Some(raw) = content else {
        return Err(not_content(i));
    };
    let text = |text: String| Block::Text(TextBlock { text, cache: None });
    if let Some(s) = string_content(raw, i)? {
        return Ok(if s.is_empty() {
            Vec::new()
        } else {
            vec![text(s)]
        });
    }
    if first_byte(raw) != b'[' {
        return Err(not_content(i));
    }
    parts(raw, i)?
        .into_iter()
        .map(|p| match (p.kind.as_str(), p.text, p.refusal) {
            ("output_text" | "input_text", Some(t), _) | ("refusal", _, Some(t)) => Ok(text(t)),
            (kind, _, _) => Err(refuse(
                "input",
                format!(
                    "input[{i}].content: assistant parts must be output_text or refusal, not '{}'",
                    clip(kind)
                ),
            )),
        })
        .collect()
}

fn user_content(content: Option<&RawValue>, i: usize) -> Result<Vec<Block>, Refused> {
    let Some(raw) = content else {
        return Err(not_content(i));
    };
    if let Some(text) = string_content(raw, i)? {
        return Ok(vec![Block::Text(TextBlock { text, cache: None })]);
    }
    if first_byte(raw) != b'[' {
        return Err(not_content(i));
    }
    parts(raw, i)?
        .into_iter()
        .map(|p| input_part(p, i))
        .collect()
}

/// A function call's output: a string, or text, image and file parts.
fn output_content(output: Option<&RawValue>, i: usize) -> Result<Vec<Block>, Refused> {
    let Some(raw) = output else {
        return Err(refuse(
            "input",
            format!("input[{i}]: a function_call_output needs 'output'"),
        ));
    };
    if first_byte(raw) == b'"' {
        let text: String = serde_json::from_str(raw.get()).map_err(|_| {
            refuse(
                "input",
                format!("input[{i}].output must be a string or an array of content parts"),
            )
        })?;
        return Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![Block::Text(TextBlock { text, cache: None })]
        });
    }
    if first_byte(raw) != b'[' {
        return Err(refuse(
            "input",
            format!("input[{i}].output must be a string or an array of content parts"),
        ));
    }
    parts(raw, i)?
        .into_iter()
        .map(|p| input_part(p, i))
        .collect()
}

/// An `input_text`, `input_image` or `input_file` part.
fn input_part(p: WirePart, i: usize) -> Result<Block, Refused> {
    let bad = |msg: &str| refuse("input", format!("input[{i}].content: {msg}"));
    match p.kind.as_str() {
        "input_text" => {
            let text = p
                .text
                .ok_or_else(|| bad("an input_text part needs 'text'"))?;
            Ok(Block::Text(TextBlock { text, cache: None }))
        }
        "input_image" => {
            if p.file_id.is_some() {
                return Err(bad(
                    "images by 'file_id' are not supported by this model's backend; send 'image_url'",
                ));
            }
            let url = p
                .image_url
                .ok_or_else(|| bad("an input_image part needs 'image_url'"))?;
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
                            "images of type '{}' are not supported; send png, jpeg, gif or webp",
                            clip(other)
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
            Ok(Block::Image {
                source,
                cache: None,
            })
        }
        "input_file" => {
            if p.file_id.is_some() || p.file_url.is_some() {
                return Err(bad(
                    "files by 'file_id' or 'file_url' are not supported by this model's backend; send 'file_data'",
                ));
            }
            let data = p
                .file_data
                .ok_or_else(|| bad("an input_file part needs 'file_data'"))?;
            let pdf_name = p
                .filename
                .as_deref()
                .is_some_and(|n| n.to_ascii_lowercase().ends_with(".pdf"));
            let b64 = match data.strip_prefix("data:").and_then(data_url) {
                Some(("application/pdf", b64)) => b64.to_owned(),
                // Raw base64 named *.pdf, as some clients send it.
                None if pdf_name && !data.starts_with("data:") => data,
                _ => {
                    return Err(bad(
                        "only PDF files are supported, as data:application/pdf;base64,<data>",
                    ));
                }
            };
            Ok(Block::Document {
                media_type: "application/pdf".to_owned(),
                data: b64,
                cache: None,
            })
        }
        other => Err(bad(&format!(
            "content parts of type '{}' are not supported by this model's backend",
            clip(other)
        ))),
    }
}

/// The media type and base64 data of a data URL (after `data:`); never decoded.
fn data_url(rest: &str) -> Option<(&str, &str)> {
    let (head, data) = rest.split_once(',')?;
    let media_type = head.strip_suffix(";base64")?;
    Some((media_type, data))
}

/// The text of `summary_text` (or, when there is none, `reasoning_text`) entries, joined by
/// blank lines.
fn reasoning_text(raw: Option<&RawValue>) -> Option<String> {
    let entries: Vec<WireText> = serde_json::from_str(raw?.get()).ok()?;
    let texts: Vec<String> = entries
        .into_iter()
        .filter_map(|t| t.text)
        .filter(|t| !t.is_empty())
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n\n"))
}

/// A reasoning item as a thinking block; `None` when it holds nothing.
fn reasoning_block(item: &WireItem, i: usize) -> Result<Option<Block>, Refused> {
    let text = reasoning_text(item.summary)
        .or_else(|| reasoning_text(item.content))
        .unwrap_or_default();
    let Some(enc) = item.encrypted_content.clone() else {
        return Ok((!text.is_empty()).then_some(Block::Thinking {
            text,
            signature: None,
        }));
    };
    match unseal(enc) {
        Some(Sealed::Thinking(signature)) => Ok(Some(Block::Thinking {
            text,
            signature: Some(signature),
        })),
        Some(Sealed::Redacted(data)) => Ok(Some(Block::RedactedThinking { data })),
        None => Err(refuse(
            "input",
            format!("input[{i}].encrypted_content: a modelgate tag the gateway cannot read"),
        )),
    }
}

/// Tool-call arguments as the model wrote them, if they are a JSON object; anything else
/// becomes `{}` (docs/providers.md 4.3), as `openai_chat` does.
fn arguments(text: &str) -> Box<RawValue> {
    match serde_json::from_str::<Box<RawValue>>(text) {
        Ok(raw) if raw.get().starts_with('{') => raw,
        _ => empty_object(),
    }
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("`{}` is valid JSON")
}

// ---------------------------------------------------------------------------------------------
// Answers in
// ---------------------------------------------------------------------------------------------

/// The `usage` of a Responses answer, as sent.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<WireInputDetails>,
    #[serde(default)]
    output_tokens_details: Option<WireOutputDetails>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct WireInputDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct WireOutputDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl WireUsage {
    /// `input_tokens` includes both cache kinds, canonical `input` neither; subtractions
    /// saturate.
    fn canonical(&self) -> Usage {
        let details = self.input_tokens_details.unwrap_or_default();
        Usage {
            input: self.input_tokens.map(|n| {
                n.saturating_sub(details.cached_tokens.unwrap_or(0))
                    .saturating_sub(details.cache_write_tokens.unwrap_or(0))
            }),
            cache_read: details.cached_tokens,
            cache_write: details.cache_write_tokens,
            output: self.output_tokens,
            reasoning: self.output_tokens_details.and_then(|d| d.reasoning_tokens),
        }
    }
}

#[derive(Deserialize)]
struct WireResponse<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default, borrow)]
    output: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    incomplete_details: Option<WireIncomplete>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireIncomplete {
    #[serde(default)]
    reason: Option<String>,
}

/// An output item of an answer (or of a stream's item events); fields by `type`.
#[derive(Deserialize)]
struct WireOutItem<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default, borrow)]
    summary: Option<&'a RawValue>,
    #[serde(default)]
    encrypted_content: Option<String>,
}

/// A message's output part: `output_text` or `refusal`.
#[derive(Deserialize)]
struct WireOutPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

/// The stop reason of a finished answer's status.
fn stop_of(
    status: Option<&str>,
    reason: Option<&str>,
    tool_use: bool,
    refused: bool,
) -> StopReason {
    match status {
        Some("incomplete") => match reason {
            Some("max_output_tokens") => StopReason::MaxTokens,
            Some("content_filter") => StopReason::ContentFilter,
            _ => StopReason::Other,
        },
        Some("completed") | None if tool_use => StopReason::ToolUse,
        Some("completed") | None if refused => StopReason::Refusal,
        Some("completed") | None => StopReason::EndTurn,
        _ => StopReason::Other,
    }
}

/// A reasoning output item as a thinking block (an OpenAI-issued one, or the gateway's own
/// tag read back); `None` when it holds nothing.
fn reasoning_out_item(item: &WireOutItem) -> Option<Block> {
    let text = reasoning_text(item.summary)
        .or_else(|| reasoning_text(item.content))
        .unwrap_or_default();
    match item.encrypted_content.clone().and_then(unseal) {
        Some(Sealed::Thinking(signature)) => Some(Block::Thinking {
            text,
            signature: Some(signature),
        }),
        Some(Sealed::Redacted(data)) => Some(Block::RedactedThinking { data }),
        None => (!text.is_empty()).then_some(Block::Thinking {
            text,
            signature: None,
        }),
    }
}

/// A whole Responses answer (a `response` object) read into the canonical model: used to
/// meter pass-through answers (usage) and for a Responses backend. Output items of built-in
/// tools are skipped.
pub fn response_in(body: &[u8]) -> Result<Response, String> {
    let wire: WireResponse = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the answer is not a Responses response: {}",
            clip(&e.to_string())
        )
    })?;
    let mut content = Vec::new();
    let (mut tool_use, mut refused) = (false, false);
    for raw in wire.output.unwrap_or_default() {
        let Ok(item) = serde_json::from_str::<WireOutItem>(raw.get()) else {
            continue;
        };
        match item.kind.as_str() {
            "message" => {
                let parts: Vec<WireOutPart> = item
                    .content
                    .and_then(|c| serde_json::from_str(c.get()).ok())
                    .unwrap_or_default();
                for p in parts {
                    let text = match p.kind.as_str() {
                        "output_text" => p.text,
                        "refusal" => {
                            refused = true;
                            p.refusal
                        }
                        _ => None,
                    };
                    if let Some(text) = text.filter(|t| !t.is_empty()) {
                        content.push(Block::Text(TextBlock { text, cache: None }));
                    }
                }
            }
            "function_call" => {
                tool_use = true;
                content.push(Block::ToolUse {
                    id: item.call_id.unwrap_or_default(),
                    name: item.name.unwrap_or_default(),
                    input: arguments(item.arguments.as_deref().unwrap_or("")),
                    cache: None,
                });
            }
            "reasoning" => content.extend(reasoning_out_item(&item)),
            _ => {}
        }
    }
    let reason = wire.incomplete_details.and_then(|d| d.reason);
    Ok(Response {
        id: wire.id.unwrap_or_default(),
        model: wire.model.unwrap_or_default(),
        content,
        stop: stop_of(wire.status.as_deref(), reason.as_deref(), tool_use, refused),
        stop_sequence: None,
        usage: wire.usage.map(|u| u.canonical()).unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------
// Answers out
// ---------------------------------------------------------------------------------------------

/// The `response` object, as OpenAI writes it. Fields the canonical answer does not know
/// (the request's tools, sampling, instructions) are written as OpenAI writes their defaults.
#[derive(Serialize)]
struct ResponseOut<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    background: bool,
    error: Option<ErrorObjectOut<'a>>,
    incomplete_details: Option<IncompleteOut>,
    instructions: (),
    max_output_tokens: (),
    max_tool_calls: (),
    model: &'a str,
    output: &'a [ItemOut<'a>],
    parallel_tool_calls: bool,
    previous_response_id: (),
    reasoning: ReasoningConfigOut,
    safety_identifier: (),
    store: bool,
    temperature: (),
    text: TextConfigOut,
    tool_choice: &'static str,
    tools: [(); 0],
    top_p: (),
    truncation: &'static str,
    usage: Option<UsageOut>,
    user: (),
    metadata: EmptyObject,
}

#[derive(Serialize)]
struct EmptyObject {}

#[derive(Serialize)]
struct ReasoningConfigOut {
    effort: (),
    summary: (),
}

#[derive(Serialize)]
struct TextConfigOut {
    format: FormatOut,
}

#[derive(Serialize)]
struct FormatOut {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct IncompleteOut {
    reason: &'static str,
}

#[derive(Serialize)]
struct ErrorObjectOut<'a> {
    code: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
struct UsageOut {
    input_tokens: u64,
    input_tokens_details: InputDetailsOut,
    output_tokens: u64,
    output_tokens_details: OutputDetailsOut,
    total_tokens: u64,
}

#[derive(Serialize)]
struct InputDetailsOut {
    cached_tokens: u64,
    cache_write_tokens: u64,
}

#[derive(Serialize)]
struct OutputDetailsOut {
    reasoning_tokens: u64,
}

impl From<&Usage> for UsageOut {
    fn from(u: &Usage) -> Self {
        Self {
            input_tokens: u.prompt(),
            input_tokens_details: InputDetailsOut {
                cached_tokens: u.cache_read.unwrap_or(0),
                cache_write_tokens: u.cache_write.unwrap_or(0),
            },
            output_tokens: u.output.unwrap_or(0),
            output_tokens_details: OutputDetailsOut {
                reasoning_tokens: u.reasoning.unwrap_or(0),
            },
            total_tokens: u.processed(),
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ItemOut<'a> {
    Message {
        id: &'a str,
        status: &'static str,
        role: &'static str,
        content: Vec<PartOut<'a>>,
    },
    FunctionCall {
        id: &'a str,
        status: &'static str,
        arguments: &'a str,
        call_id: &'a str,
        name: &'a str,
    },
    Reasoning {
        id: &'a str,
        summary: Vec<SummaryOut<'a>>,
        encrypted_content: Option<Cow<'a, str>>,
    },
}

#[derive(Serialize, Clone, Copy)]
#[serde(tag = "type", rename_all = "snake_case")]
enum PartOut<'a> {
    OutputText {
        annotations: [(); 0],
        logprobs: [(); 0],
        text: &'a str,
    },
    Refusal {
        refusal: &'a str,
    },
}

#[derive(Serialize, Clone, Copy)]
struct SummaryOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

fn summary(text: &str) -> Vec<SummaryOut<'_>> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![SummaryOut {
            kind: "summary_text",
            text,
        }]
    }
}

/// The response id of a canonical answer id: deterministic, `resp_` first.
fn response_id(id: &str) -> String {
    if id.starts_with("resp_") {
        id.to_owned()
    } else if id.is_empty() {
        "resp_modelgate".to_owned()
    } else {
        format!("resp_{id}")
    }
}

/// The id of the `n`-th output item (`msg`, `fc` or `rs` first), from the response id.
fn item_id(prefix: &str, response_id: &str, n: usize) -> String {
    let base = response_id.strip_prefix("resp_").unwrap_or(response_id);
    format!("{prefix}_{base}_{n}")
}

/// The status, incomplete reason and error code of a finished answer.
fn status_of(stop: StopReason) -> (&'static str, Option<IncompleteOut>) {
    match stop {
        StopReason::MaxTokens | StopReason::ContextWindow => (
            "incomplete",
            Some(IncompleteOut {
                reason: "max_output_tokens",
            }),
        ),
        StopReason::ContentFilter => (
            "incomplete",
            Some(IncompleteOut {
                reason: "content_filter",
            }),
        ),
        StopReason::EndTurn
        | StopReason::StopSequence
        | StopReason::ToolUse
        | StopReason::Refusal
        | StopReason::PauseTurn
        | StopReason::Other => ("completed", None),
    }
}

/// The Responses error code (`ResponseError.code`) of an error kind.
fn error_code(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::RateLimited | ErrorKind::QuotaExhausted => "rate_limit_exceeded",
        ErrorKind::InvalidRequest
        | ErrorKind::ContextLength
        | ErrorKind::ContentFiltered
        | ErrorKind::RequestTooLarge => "invalid_prompt",
        ErrorKind::Authentication
        | ErrorKind::Permission
        | ErrorKind::NotFound
        | ErrorKind::Overloaded
        | ErrorKind::Timeout
        | ErrorKind::Server
        | ErrorKind::Billing => "server_error",
    }
}

/// Fills the fields every `response` object has the same.
#[allow(clippy::too_many_arguments)]
fn response_object<'a>(
    id: &'a str,
    model: &'a str,
    created: u64,
    status: &'static str,
    incomplete_details: Option<IncompleteOut>,
    error: Option<ErrorObjectOut<'a>>,
    output: &'a [ItemOut<'a>],
    usage: Option<UsageOut>,
) -> ResponseOut<'a> {
    ResponseOut {
        id,
        object: "response",
        created_at: created,
        status,
        background: false,
        error,
        incomplete_details,
        instructions: (),
        max_output_tokens: (),
        max_tool_calls: (),
        model,
        output,
        parallel_tool_calls: true,
        previous_response_id: (),
        reasoning: ReasoningConfigOut {
            effort: (),
            summary: (),
        },
        safety_identifier: (),
        store: false,
        temperature: (),
        text: TextConfigOut {
            format: FormatOut { kind: "text" },
        },
        tool_choice: "auto",
        tools: [],
        top_p: (),
        truncation: "disabled",
        usage,
        user: (),
        metadata: EmptyObject {},
    }
}

/// A canonical answer as a Responses `response` object. `model`: the client's public model
/// name; `created`: unix seconds. Each block is one output item, in order: text a `message`
/// (its part a `refusal` when the model refused), tool use a `function_call`, thinking a
/// `reasoning` item (module doc).
pub fn response_out(resp: &Response, model: &str, created: u64) -> Vec<u8> {
    let id = response_id(&resp.id);
    let (status, incomplete_details) = status_of(resp.stop);
    let ids: Vec<String> = resp
        .content
        .iter()
        .enumerate()
        .map(|(n, b)| {
            let prefix = match b {
                Block::ToolUse { .. } => "fc",
                Block::Thinking { .. } | Block::RedactedThinking { .. } => "rs",
                _ => "msg",
            };
            item_id(prefix, &id, n)
        })
        .collect();
    let last = resp.content.len().saturating_sub(1);
    let mut output = Vec::with_capacity(resp.content.len());
    for (n, (block, item_id)) in resp.content.iter().zip(&ids).enumerate() {
        // A cut answer's last item is the one that was cut.
        let item_status = if status == "incomplete" && n == last {
            "incomplete"
        } else {
            "completed"
        };
        output.push(match block {
            Block::Text(t) => ItemOut::Message {
                id: item_id,
                status: item_status,
                role: "assistant",
                content: vec![if resp.stop == StopReason::Refusal {
                    PartOut::Refusal { refusal: &t.text }
                } else {
                    PartOut::OutputText {
                        annotations: [],
                        logprobs: [],
                        text: &t.text,
                    }
                }],
            },
            Block::ToolUse {
                id: call_id,
                name,
                input,
                ..
            } => ItemOut::FunctionCall {
                id: item_id,
                status: item_status,
                arguments: input.get(),
                call_id,
                name,
            },
            Block::Thinking { text, signature } => ItemOut::Reasoning {
                id: item_id,
                summary: summary(text),
                encrypted_content: signature
                    .as_ref()
                    .map(|s| encrypted(s.origin, &s.value, false)),
            },
            Block::RedactedThinking { data } => ItemOut::Reasoning {
                id: item_id,
                summary: Vec::new(),
                encrypted_content: Some(encrypted(data.origin, &data.value, true)),
            },
            // Answers carry no other blocks.
            Block::Image { .. } | Block::Document { .. } | Block::ToolResult { .. } => continue,
        });
    }
    let body = response_object(
        &id,
        model,
        created,
        status,
        incomplete_details,
        None,
        &output,
        Some(UsageOut::from(&resp.usage)),
    );
    serde_json::to_vec(&body).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An error body for a Responses client: the Responses API answers errors in the same
/// envelope as chat completions (`{"error": {message, type, param, code}}`).
pub fn error_out(err: &ApiError) -> Vec<u8> {
    openai_chat::error_out(err)
}

/// An error body (any status) from a Responses backend: OpenAI's envelope, read as
/// `openai_chat` reads it.
pub fn error_in(status: u16, body: &[u8]) -> ApiError {
    openai_chat::error_in(status, body)
}

// ---------------------------------------------------------------------------------------------
// Streams in
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(rename = "type")]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    response: Option<WireEventResponse<'a>>,
    #[serde(default, borrow)]
    item: Option<WireOutItem<'a>>,
    #[serde(default)]
    output_index: Option<u64>,
    #[serde(default)]
    content_index: Option<u64>,
    #[serde(default)]
    summary_index: Option<u64>,
    #[serde(default)]
    delta: Option<String>,
    #[serde(default)]
    part: Option<WireOutPart>,
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default, borrow)]
    param: Option<&'a RawValue>,
    /// Some servers nest the error of an `error` event.
    #[serde(default, borrow)]
    error: Option<WireEventError<'a>>,
}

/// The `response` of a lifecycle event: its output is not read (the items came before).
#[derive(Deserialize)]
struct WireEventResponse<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    incomplete_details: Option<WireIncomplete>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default, borrow)]
    error: Option<WireEventError<'a>>,
}

#[derive(Deserialize)]
struct WireEventError<'a> {
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default, borrow)]
    param: Option<&'a RawValue>,
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

/// The canonical error of a stream's `error` event or failed response.
fn stream_error(
    code: Option<&RawValue>,
    message: Option<&RawValue>,
    param: Option<&RawValue>,
) -> ApiError {
    let code = text_of(code, 256);
    let (status, kind) = match code.as_deref() {
        Some("rate_limit_exceeded") => (429, ErrorKind::RateLimited),
        Some("insufficient_quota") => (429, ErrorKind::QuotaExhausted),
        Some("context_length_exceeded") => (400, ErrorKind::ContextLength),
        Some("content_filter") => (400, ErrorKind::ContentFiltered),
        Some("server_is_overloaded" | "overloaded") => (503, ErrorKind::Overloaded),
        // `invalid_prompt`, the image codes and anything else: the answer failed upstream.
        _ => (500, ErrorKind::Server),
    };
    ApiError {
        status,
        kind,
        message: text_of(message, MAX_ERROR_TEXT)
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "the upstream response failed".to_owned()),
        param: text_of(param, 256),
        code,
    }
}

/// An output item the upstream opened, as `EventsIn` tracks it.
#[derive(Debug)]
enum InItem {
    /// Its open parts: upstream content index to block index.
    Message {
        parts: Vec<(u64, u32)>,
    },
    Call {
        index: u32,
        args_seen: bool,
    },
    /// `part`: the summary (or reasoning text) part the last delta belonged to.
    Reasoning {
        index: u32,
        text_seen: bool,
        part: Option<u64>,
    },
    /// A built-in tool's item: skipped with its events.
    Skipped,
}

/// Reads a Responses stream (the `data` of each server-sent event; its `type` names the
/// event) into canonical events: used to meter a stream passed through from an OpenAI or
/// Azure Responses backend, and for a Responses backend.
///
/// Each message part, function call and reasoning item is one block; parts of one reasoning
/// summary are joined by a blank line. State is bounded: the items still open (at most
/// `MAX_OPEN`), counters, and whether a tool was called or the model refused.
#[derive(Debug, Default)]
pub struct EventsIn {
    started: bool,
    /// A terminal event or an error was passed on: nothing follows.
    over: bool,
    next_index: u32,
    /// Open items by upstream output index.
    open: Vec<(u64, InItem)>,
    tool_calls: usize,
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

    fn block(&mut self, kind: BlockKind, out: &mut Vec<Event>) -> u32 {
        let index = self.next_index;
        self.next_index = index.saturating_add(1);
        out.push(Event::BlockStart { index, kind });
        index
    }

    fn item(&mut self, output_index: Option<u64>) -> Result<&mut InItem, String> {
        let key = output_index.ok_or("an item event without 'output_index'")?;
        self.open
            .iter_mut()
            .find(|(k, _)| *k == key)
            .map(|(_, item)| item)
            .ok_or_else(|| format!("an event for output item {key}, which is not open"))
    }

    fn open_count(&self) -> usize {
        self.open
            .iter()
            .map(|(_, i)| match i {
                InItem::Message { parts } => 1 + parts.len(),
                _ => 1,
            })
            .sum()
    }

    /// Stops every open block, in index order.
    fn close_all(&mut self, out: &mut Vec<Event>) {
        let mut indexes: Vec<u32> = Vec::new();
        for (_, item) in self.open.drain(..) {
            match item {
                InItem::Message { parts } => indexes.extend(parts.iter().map(|&(_, i)| i)),
                InItem::Call { index, .. } | InItem::Reasoning { index, .. } => indexes.push(index),
                InItem::Skipped => {}
            }
        }
        indexes.sort_unstable();
        out.extend(indexes.into_iter().map(|index| Event::BlockStop { index }));
    }

    /// One event's data; appends the canonical events it makes.
    pub fn event(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        if self.over || data.trim_ascii() == b"[DONE]" {
            return Ok(());
        }
        let e: WireEvent = serde_json::from_slice(data)
            .map_err(|e| format!("not a Responses stream event: {}", clip(&e.to_string())))?;
        match e.kind.as_ref() {
            "response.created" | "response.in_progress" | "response.queued" => {
                let id = e.response.as_ref().and_then(|r| r.id.as_deref());
                self.start(id, out);
            }
            "response.output_item.added" => {
                let key = e
                    .output_index
                    .ok_or("an item event without 'output_index'")?;
                let item = e
                    .item
                    .ok_or("'response.output_item.added' without 'item'")?;
                self.start(None, out);
                if self.open.iter().any(|(k, _)| *k == key) {
                    return Err(format!("output item {key} added twice"));
                }
                if self.open_count() >= MAX_OPEN {
                    return Err(format!("more than {MAX_OPEN} output items open at once"));
                }
                let tracked = match item.kind.as_str() {
                    "message" => InItem::Message { parts: Vec::new() },
                    "function_call" => {
                        if self.tool_calls >= MAX_STREAM_TOOL_CALLS {
                            return Err(format!(
                                "the upstream answer called more than {MAX_STREAM_TOOL_CALLS} tools"
                            ));
                        }
                        self.tool_calls += 1;
                        let index = self.block(
                            BlockKind::ToolUse {
                                id: item.call_id.unwrap_or_default(),
                                name: item.name.unwrap_or_default(),
                            },
                            out,
                        );
                        let args = item.arguments.unwrap_or_default();
                        let args_seen = !args.is_empty();
                        if args_seen {
                            out.push(Event::BlockDelta {
                                index,
                                delta: Delta::ToolArgs(args),
                            });
                        }
                        InItem::Call { index, args_seen }
                    }
                    "reasoning" => InItem::Reasoning {
                        index: self.block(BlockKind::Thinking, out),
                        text_seen: false,
                        part: None,
                    },
                    _ => InItem::Skipped,
                };
                self.open.push((key, tracked));
            }
            "response.content_part.added" => {
                let part = e
                    .part
                    .ok_or("'response.content_part.added' without 'part'")?;
                let content_index = e.content_index.unwrap_or(0);
                let open = self.open_count();
                let text = match part.kind.as_str() {
                    "output_text" => part.text,
                    "refusal" => {
                        self.refused = true;
                        part.refusal
                    }
                    // Reasoning text parts come with their own deltas.
                    _ => return Ok(()),
                };
                let InItem::Message { parts } = self.item(e.output_index)? else {
                    return Ok(());
                };
                if parts.iter().any(|&(c, _)| c == content_index) {
                    return Err(format!("content part {content_index} added twice"));
                }
                if open >= MAX_OPEN {
                    return Err(format!("more than {MAX_OPEN} content parts open at once"));
                }
                let index = self.next_index;
                self.next_index = index.saturating_add(1);
                out.push(Event::BlockStart {
                    index,
                    kind: BlockKind::Text,
                });
                if let Some(text) = text.filter(|t| !t.is_empty()) {
                    out.push(Event::BlockDelta {
                        index,
                        delta: Delta::Text(text),
                    });
                }
                if let InItem::Message { parts } = self.item(e.output_index)? {
                    parts.push((content_index, index));
                }
            }
            "response.output_text.delta" | "response.refusal.delta" => {
                let content_index = e.content_index.unwrap_or(0);
                let open = self.open_count();
                let next = self.next_index;
                let InItem::Message { parts } = self.item(e.output_index)? else {
                    return Err(format!("a {} for an item that is not a message", e.kind));
                };
                let index = match parts.iter().find(|&&(c, _)| c == content_index) {
                    Some(&(_, index)) => index,
                    // A server that leaves out `content_part.added` opens the part with its
                    // first delta.
                    None => {
                        if open >= MAX_OPEN {
                            return Err(format!("more than {MAX_OPEN} content parts open at once"));
                        }
                        parts.push((content_index, next));
                        self.next_index = next.saturating_add(1);
                        out.push(Event::BlockStart {
                            index: next,
                            kind: BlockKind::Text,
                        });
                        next
                    }
                };
                if e.kind == "response.refusal.delta" {
                    self.refused = true;
                }
                if let Some(delta) = e.delta.filter(|d| !d.is_empty()) {
                    out.push(Event::BlockDelta {
                        index,
                        delta: Delta::Text(delta),
                    });
                }
            }
            "response.content_part.done" => {
                let content_index = e.content_index.unwrap_or(0);
                if let InItem::Message { parts } = self.item(e.output_index)?
                    && let Some(pos) = parts.iter().position(|&(c, _)| c == content_index)
                {
                    let (_, index) = parts.remove(pos);
                    out.push(Event::BlockStop { index });
                }
            }
            "response.function_call_arguments.delta" => {
                let InItem::Call { index, args_seen } = self.item(e.output_index)? else {
                    return Err("arguments for an item that is not a function call".into());
                };
                if let Some(delta) = e.delta.filter(|d| !d.is_empty()) {
                    *args_seen = true;
                    out.push(Event::BlockDelta {
                        index: *index,
                        delta: Delta::ToolArgs(delta),
                    });
                }
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                let InItem::Reasoning {
                    index,
                    text_seen,
                    part,
                } = self.item(e.output_index)?
                else {
                    return Err("reasoning text for an item that is not reasoning".into());
                };
                let Some(delta) = e.delta.filter(|d| !d.is_empty()) else {
                    return Ok(());
                };
                // A later part starts after a blank line, as `response_in` joins them.
                let this = e.summary_index.or(e.content_index);
                let delta = if *text_seen && this != *part {
                    format!("\n\n{delta}")
                } else {
                    delta
                };
                *part = this;
                *text_seen = true;
                out.push(Event::BlockDelta {
                    index: *index,
                    delta: Delta::Thinking(delta),
                });
            }
            "response.output_item.done" => {
                let key = e
                    .output_index
                    .ok_or("an item event without 'output_index'")?;
                let Some(pos) = self.open.iter().position(|(k, _)| *k == key) else {
                    return Err(format!("output item {key} done, but not open"));
                };
                let (_, tracked) = self.open.remove(pos);
                match tracked {
                    InItem::Message { parts } => {
                        out.extend(
                            parts
                                .into_iter()
                                .map(|(_, index)| Event::BlockStop { index }),
                        );
                    }
                    InItem::Call { index, args_seen } => {
                        // Arguments that came whole with the finished item only.
                        if !args_seen
                            && let Some(args) = e
                                .item
                                .as_ref()
                                .and_then(|i| i.arguments.clone())
                                .filter(|a| !a.is_empty())
                        {
                            out.push(Event::BlockDelta {
                                index,
                                delta: Delta::ToolArgs(args),
                            });
                        }
                        out.push(Event::BlockStop { index });
                    }
                    InItem::Reasoning {
                        index, text_seen, ..
                    } => {
                        if let Some(item) = &e.item {
                            if !text_seen
                                && let Some(text) = reasoning_text(item.summary)
                                    .or_else(|| reasoning_text(item.content))
                            {
                                out.push(Event::BlockDelta {
                                    index,
                                    delta: Delta::Thinking(text),
                                });
                            }
                            if let Some(enc) =
                                item.encrypted_content.clone().filter(|c| !c.is_empty())
                            {
                                out.push(Event::BlockDelta {
                                    index,
                                    delta: Delta::Signature(enc),
                                });
                            }
                        }
                        out.push(Event::BlockStop { index });
                    }
                    InItem::Skipped => {}
                }
            }
            "response.completed" | "response.incomplete" => {
                let response = e.response;
                self.start(response.as_ref().and_then(|r| r.id.as_deref()), out);
                self.close_all(out);
                let (status, reason, usage) = match response {
                    Some(r) => (
                        r.status,
                        r.incomplete_details.and_then(|d| d.reason),
                        r.usage,
                    ),
                    None => (None, None, None),
                };
                if let Some(u) = usage {
                    out.push(Event::Usage(u.canonical()));
                }
                let status = status.unwrap_or_else(|| {
                    e.kind
                        .strip_prefix("response.")
                        .unwrap_or_default()
                        .to_owned()
                });
                out.push(Event::MessageStop {
                    stop: stop_of(
                        Some(&status),
                        reason.as_deref(),
                        self.tool_calls > 0,
                        self.refused,
                    ),
                    stop_sequence: None,
                });
                self.over = true;
            }
            "response.failed" => {
                let response = e.response;
                if let Some(u) = response.as_ref().and_then(|r| r.usage) {
                    self.start(None, out);
                    out.push(Event::Usage(u.canonical()));
                }
                let err = match response.and_then(|r| r.error) {
                    Some(err) => stream_error(err.code, err.message, err.param),
                    None => stream_error(None, None, None),
                };
                out.push(Event::Error(err));
                self.over = true;
            }
            "error" => {
                let err = match e.error {
                    Some(err) => stream_error(err.code, err.message, err.param),
                    None => stream_error(e.code, e.message, e.param),
                };
                out.push(Event::Error(err));
                self.over = true;
            }
            // Built-in tool progress, annotations, `*.done` events whose content came as
            // deltas, and event types added later.
            _ => {}
        }
        Ok(())
    }

    /// The upstream body ended; appends what closes the message (an error: a Responses
    /// stream ends with a terminal event, never just stops).
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.over {
            return;
        }
        self.over = true;
        out.push(Event::Error(ApiError {
            status: 502,
            kind: ErrorKind::Server,
            message: CUT_SHORT.to_owned(),
            param: None,
            code: None,
        }));
    }
}

// ---------------------------------------------------------------------------------------------
// Streams out
// ---------------------------------------------------------------------------------------------

/// One event's `data`; `type` names the `event:` line too, `sequence_number` is added.
#[derive(Serialize)]
#[serde(tag = "type")]
enum EventOut<'a> {
    #[serde(rename = "response.created")]
    Created { response: &'a ResponseOut<'a> },
    #[serde(rename = "response.in_progress")]
    InProgress { response: &'a ResponseOut<'a> },
    #[serde(rename = "response.completed")]
    Completed { response: &'a ResponseOut<'a> },
    #[serde(rename = "response.incomplete")]
    Incomplete { response: &'a ResponseOut<'a> },
    #[serde(rename = "response.failed")]
    Failed { response: &'a ResponseOut<'a> },
    /// OpenAI nests the error (the openai SDKs raise on a top-level `error`); the flat
    /// fields are the SDK type's (`ResponseErrorEvent`).
    #[serde(rename = "error")]
    Error {
        code: Option<&'a str>,
        message: &'a str,
        param: Option<&'a str>,
        error: &'a RawValue,
    },
    #[serde(rename = "response.output_item.added")]
    ItemAdded {
        output_index: usize,
        item: ItemOut<'a>,
    },
    #[serde(rename = "response.output_item.done")]
    ItemDone {
        output_index: usize,
        item: ItemOut<'a>,
    },
    #[serde(rename = "response.content_part.added")]
    PartAdded {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        part: PartOut<'a>,
    },
    #[serde(rename = "response.content_part.done")]
    PartDone {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        part: PartOut<'a>,
    },
    #[serde(rename = "response.output_text.delta")]
    TextDelta {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        delta: &'a str,
        logprobs: [(); 0],
    },
    #[serde(rename = "response.output_text.done")]
    TextDone {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        text: &'a str,
        logprobs: [(); 0],
    },
    #[serde(rename = "response.function_call_arguments.delta")]
    ArgumentsDelta {
        item_id: &'a str,
        output_index: usize,
        delta: &'a str,
    },
    #[serde(rename = "response.function_call_arguments.done")]
    ArgumentsDone {
        item_id: &'a str,
        output_index: usize,
        name: &'a str,
        arguments: &'a str,
    },
    #[serde(rename = "response.reasoning_summary_part.added")]
    SummaryPartAdded {
        item_id: &'a str,
        output_index: usize,
        summary_index: u32,
        part: SummaryOut<'a>,
    },
    #[serde(rename = "response.reasoning_summary_text.delta")]
    SummaryDelta {
        item_id: &'a str,
        output_index: usize,
        summary_index: u32,
        delta: &'a str,
    },
    #[serde(rename = "response.reasoning_summary_text.done")]
    SummaryDone {
        item_id: &'a str,
        output_index: usize,
        summary_index: u32,
        text: &'a str,
    },
    #[serde(rename = "response.reasoning_summary_part.done")]
    SummaryPartDone {
        item_id: &'a str,
        output_index: usize,
        summary_index: u32,
        part: SummaryOut<'a>,
    },
}

impl EventOut<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Created { .. } => "response.created",
            Self::InProgress { .. } => "response.in_progress",
            Self::Completed { .. } => "response.completed",
            Self::Incomplete { .. } => "response.incomplete",
            Self::Failed { .. } => "response.failed",
            Self::Error { .. } => "error",
            Self::ItemAdded { .. } => "response.output_item.added",
            Self::ItemDone { .. } => "response.output_item.done",
            Self::PartAdded { .. } => "response.content_part.added",
            Self::PartDone { .. } => "response.content_part.done",
            Self::TextDelta { .. } => "response.output_text.delta",
            Self::TextDone { .. } => "response.output_text.done",
            Self::ArgumentsDelta { .. } => "response.function_call_arguments.delta",
            Self::ArgumentsDone { .. } => "response.function_call_arguments.done",
            Self::SummaryPartAdded { .. } => "response.reasoning_summary_part.added",
            Self::SummaryDelta { .. } => "response.reasoning_summary_text.delta",
            Self::SummaryDone { .. } => "response.reasoning_summary_text.done",
            Self::SummaryPartDone { .. } => "response.reasoning_summary_part.done",
        }
    }
}

#[derive(Serialize)]
struct Frame<'a> {
    #[serde(flatten)]
    event: &'a EventOut<'a>,
    sequence_number: u64,
}

/// An output item of the answer being streamed: kept whole for the final `response`.
#[derive(Debug)]
struct StreamItem {
    id: String,
    done: bool,
    kind: StreamKind,
}

#[derive(Debug)]
enum StreamKind {
    Message {
        text: String,
    },
    Call {
        call_id: String,
        name: String,
        arguments: String,
    },
    Reasoning {
        text: String,
        signature: String,
        redacted: bool,
    },
}

impl StreamItem {
    fn out(&self, origin: Api) -> ItemOut<'_> {
        let status = if self.done {
            "completed"
        } else {
            "in_progress"
        };
        match &self.kind {
            StreamKind::Message { text } => ItemOut::Message {
                id: &self.id,
                status,
                role: "assistant",
                content: if self.done {
                    vec![output_text(text)]
                } else {
                    Vec::new()
                },
            },
            StreamKind::Call {
                call_id,
                name,
                arguments,
            } => ItemOut::FunctionCall {
                id: &self.id,
                status,
                arguments: if self.done { arguments } else { "" },
                call_id,
                name,
            },
            StreamKind::Reasoning {
                text,
                signature,
                redacted,
            } => ItemOut::Reasoning {
                id: &self.id,
                summary: if self.done { summary(text) } else { Vec::new() },
                encrypted_content: (self.done && !signature.is_empty())
                    .then(|| encrypted(origin, signature, *redacted)),
            },
        }
    }

    fn held(&self) -> usize {
        self.id.len()
            + match &self.kind {
                StreamKind::Message { text } => text.len(),
                StreamKind::Call {
                    call_id,
                    name,
                    arguments,
                } => call_id.len() + name.len() + arguments.len(),
                StreamKind::Reasoning {
                    text, signature, ..
                } => text.len() + signature.len(),
            }
    }
}

fn output_text(text: &str) -> PartOut<'_> {
    PartOut::OutputText {
        annotations: [],
        logprobs: [],
        text,
    }
}

/// Writes canonical events as a Responses stream: `event:` and `data:` lines, a
/// `sequence_number` on every event, `response.created` first and `response.completed`,
/// `response.incomplete` or `response.failed` (with the whole answer) last.
///
/// Every output item is kept until the end, because the last event repeats the whole
/// answer: at most `MAX_ITEMS` items and `MAX_HELD_BYTES` of text, arguments, thinking and
/// signatures; past either the stream ends with `response.failed`.
#[derive(Debug)]
pub struct EventsOut {
    model: String,
    created: u64,
    /// Where the thinking signatures of this stream come from (the backend's API).
    origin: Api,
    id: String,
    seq: u64,
    started: bool,
    /// A terminal event was written: nothing follows.
    ended: bool,
    items: Vec<StreamItem>,
    /// Canonical block index to the position of its item in `items`, for open blocks.
    open: Vec<(u32, usize)>,
    held: usize,
    usage: Usage,
    usage_seen: bool,
}

impl Default for EventsOut {
    fn default() -> Self {
        Self::new("", 0)
    }
}

impl EventsOut {
    /// `model`: the client's public name; `created`: unix seconds. Thinking signatures are
    /// taken as Anthropic's (the only streaming backend that sends them today) unless
    /// `signatures_from` says otherwise.
    pub fn new(model: &str, created: u64) -> Self {
        Self {
            model: model.to_owned(),
            created,
            origin: Api::AnthropicMessages,
            id: response_id(""),
            seq: 0,
            started: false,
            ended: false,
            items: Vec::new(),
            open: Vec::new(),
            held: 0,
            usage: Usage::default(),
            usage_seen: false,
        }
    }

    /// The API of the backend whose stream this is: the origin written into the tag of
    /// every thinking signature (module doc).
    pub fn signatures_from(mut self, origin: Api) -> Self {
        self.origin = origin;
        self
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        self.started = true;
        let snapshot = response_object(
            &self.id,
            &self.model,
            self.created,
            "in_progress",
            None,
            None,
            &[],
            None,
        );
        write_frame(
            out,
            &EventOut::Created {
                response: &snapshot,
            },
            self.seq,
        );
        write_frame(
            out,
            &EventOut::InProgress {
                response: &snapshot,
            },
            self.seq + 1,
        );
        self.seq += 2;
    }

    /// Room for `n` more bytes of held text; past the allowance the stream fails.
    fn hold(&mut self, n: usize, out: &mut Vec<u8>) -> bool {
        if self.held.saturating_add(n) > MAX_HELD_BYTES {
            self.fail(
                &ApiError {
                    status: 502,
                    kind: ErrorKind::Server,
                    message: format!(
                        "the answer exceeded the {MAX_HELD_BYTES} bytes the gateway keeps for a streamed response"
                    ),
                    param: None,
                    code: None,
                },
                out,
            );
            return false;
        }
        self.held += n;
        true
    }

    fn position(&self, index: u32) -> Option<usize> {
        self.open
            .iter()
            .find(|&&(i, _)| i == index)
            .map(|&(_, p)| p)
    }

    /// Appends the bytes of the server-sent events `event` makes.
    pub fn event(&mut self, event: &Event, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if let Event::MessageStart { id, usage } = event {
            self.usage.merge(*usage);
            if !self.started {
                self.id = response_id(id);
                self.start(out);
            }
            return;
        }
        if !self.started {
            // `client.responses.stream()` needs `response.created` before anything else.
            self.start(out);
        }
        match event {
            Event::MessageStart { .. } => {}
            Event::BlockStart { index, kind } => self.block_start(*index, kind, out),
            Event::BlockDelta { index, delta } => self.block_delta(*index, delta, out),
            Event::BlockStop { index } => {
                if let Some(at) = self.open.iter().position(|&(i, _)| i == *index) {
                    let (_, pos) = self.open.swap_remove(at);
                    self.item_done(pos, out);
                }
            }
            Event::Usage(u) => {
                self.usage.merge(*u);
                self.usage_seen = true;
            }
            Event::MessageStop { stop, .. } => {
                self.close_open(out);
                let (status, incomplete_details) = status_of(*stop);
                let output = self.outputs();
                let response = response_object(
                    &self.id,
                    &self.model,
                    self.created,
                    status,
                    incomplete_details,
                    None,
                    &output,
                    Some(UsageOut::from(&self.usage)),
                );
                let terminal = if status == "incomplete" {
                    EventOut::Incomplete {
                        response: &response,
                    }
                } else {
                    EventOut::Completed {
                        response: &response,
                    }
                };
                write_frame(out, &terminal, self.seq);
                self.seq += 1;
                self.ended = true;
            }
            Event::Error(err) => self.fail(err, out),
        }
    }

    fn outputs(&self) -> Vec<ItemOut<'_>> {
        self.items.iter().map(|i| i.out(self.origin)).collect()
    }

    fn block_start(&mut self, index: u32, kind: &BlockKind, out: &mut Vec<u8>) {
        if self.position(index).is_some() {
            return;
        }
        if self.items.len() >= MAX_ITEMS {
            self.fail(
                &ApiError {
                    status: 502,
                    kind: ErrorKind::Server,
                    message: format!("the answer has more than {MAX_ITEMS} output items"),
                    param: None,
                    code: None,
                },
                out,
            );
            return;
        }
        let n = self.items.len();
        let (prefix, kind) = match kind {
            BlockKind::Text => (
                "msg",
                StreamKind::Message {
                    text: String::new(),
                },
            ),
            BlockKind::Thinking => (
                "rs",
                StreamKind::Reasoning {
                    text: String::new(),
                    signature: String::new(),
                    redacted: false,
                },
            ),
            BlockKind::RedactedThinking { data } => (
                "rs",
                StreamKind::Reasoning {
                    text: String::new(),
                    signature: data.clone(),
                    redacted: true,
                },
            ),
            BlockKind::ToolUse { id, name } => (
                "fc",
                StreamKind::Call {
                    call_id: id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                },
            ),
        };
        let item = StreamItem {
            id: item_id(prefix, &self.id, n),
            done: false,
            kind,
        };
        if !self.hold(item.held(), out) {
            return;
        }
        let added = EventOut::ItemAdded {
            output_index: n,
            item: item.out(self.origin),
        };
        write_frame(out, &added, self.seq);
        self.seq += 1;
        if matches!(item.kind, StreamKind::Message { .. }) {
            let part = EventOut::PartAdded {
                item_id: &item.id,
                output_index: n,
                content_index: 0,
                part: output_text(""),
            };
            write_frame(out, &part, self.seq);
            self.seq += 1;
        }
        self.items.push(item);
        self.open.push((index, n));
    }

    fn block_delta(&mut self, index: u32, delta: &Delta, out: &mut Vec<u8>) {
        let Some(pos) = self.position(index) else {
            return;
        };
        let fragment = match delta {
            Delta::Text(s) | Delta::ToolArgs(s) | Delta::Thinking(s) | Delta::Signature(s) => s,
        };
        if fragment.is_empty() || !self.hold(fragment.len(), out) {
            return;
        }
        let Some(item) = self.items.get_mut(pos) else {
            return;
        };
        let item_id = item.id.as_str();
        let event = match (&mut item.kind, delta) {
            (StreamKind::Message { text }, Delta::Text(t)) => {
                text.push_str(t);
                EventOut::TextDelta {
                    item_id,
                    output_index: pos,
                    content_index: 0,
                    delta: t,
                    logprobs: [],
                }
            }
            (StreamKind::Call { arguments, .. }, Delta::ToolArgs(a)) => {
                arguments.push_str(a);
                EventOut::ArgumentsDelta {
                    item_id,
                    output_index: pos,
                    delta: a,
                }
            }
            (StreamKind::Reasoning { text, .. }, Delta::Thinking(t)) => {
                let first = text.is_empty();
                text.push_str(t);
                if first {
                    write_frame(
                        out,
                        &EventOut::SummaryPartAdded {
                            item_id,
                            output_index: pos,
                            summary_index: 0,
                            part: SummaryOut {
                                kind: "summary_text",
                                text: "",
                            },
                        },
                        self.seq,
                    );
                    self.seq += 1;
                }
                EventOut::SummaryDelta {
                    item_id,
                    output_index: pos,
                    summary_index: 0,
                    delta: t,
                }
            }
            // The signature is written once, whole, with the finished item.
            (StreamKind::Reasoning { signature, .. }, Delta::Signature(s)) => {
                signature.push_str(s);
                return;
            }
            // A delta of another kind than its block says nothing a client could use.
            _ => return,
        };
        write_frame(out, &event, self.seq);
        self.seq += 1;
    }

    /// Writes the `*.done` events of the item at `pos` and marks it done.
    fn item_done(&mut self, pos: usize, out: &mut Vec<u8>) {
        let origin = self.origin;
        let mut seq = self.seq;
        let Some(item) = self.items.get_mut(pos) else {
            return;
        };
        item.done = true;
        let item = &*item;
        let item_id = item.id.as_str();
        let mut frame = |out: &mut Vec<u8>, e: EventOut| {
            write_frame(out, &e, seq);
            seq += 1;
        };
        match &item.kind {
            StreamKind::Message { text } => {
                frame(
                    out,
                    EventOut::TextDone {
                        item_id,
                        output_index: pos,
                        content_index: 0,
                        text,
                        logprobs: [],
                    },
                );
                frame(
                    out,
                    EventOut::PartDone {
                        item_id,
                        output_index: pos,
                        content_index: 0,
                        part: output_text(text),
                    },
                );
            }
            StreamKind::Call {
                name, arguments, ..
            } => frame(
                out,
                EventOut::ArgumentsDone {
                    item_id,
                    output_index: pos,
                    name,
                    arguments,
                },
            ),
            StreamKind::Reasoning { text, .. } if !text.is_empty() => {
                let part = SummaryOut {
                    kind: "summary_text",
                    text,
                };
                frame(
                    out,
                    EventOut::SummaryDone {
                        item_id,
                        output_index: pos,
                        summary_index: 0,
                        text,
                    },
                );
                frame(
                    out,
                    EventOut::SummaryPartDone {
                        item_id,
                        output_index: pos,
                        summary_index: 0,
                        part,
                    },
                );
            }
            StreamKind::Reasoning { .. } => {}
        }
        frame(
            out,
            EventOut::ItemDone {
                output_index: pos,
                item: item.out(origin),
            },
        );
        self.seq = seq;
    }

    /// Finishes the items still open, in the order they started.
    fn close_open(&mut self, out: &mut Vec<u8>) {
        let mut open: Vec<usize> = self.open.drain(..).map(|(_, p)| p).collect();
        open.sort_unstable();
        for pos in open {
            self.item_done(pos, out);
        }
    }

    /// Ends the stream as OpenAI ends a failed one: an `error` event (on which the openai SDK
    /// raises `APIError`), then `response.failed` with the answer so far and
    /// `error {code, message}`.
    fn fail(&mut self, err: &ApiError, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if !self.started {
            self.start(out);
        }
        self.ended = true;
        // The error object of OpenAI's envelope (type and code by kind), as `error_out`
        // writes it for an HTTP error.
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            error: &'a RawValue,
        }
        #[derive(Deserialize)]
        struct Inner<'a> {
            #[serde(default, borrow)]
            code: Option<Cow<'a, str>>,
        }
        let body = openai_chat::error_out(err);
        let nested = serde_json::from_slice::<Envelope>(&body).ok();
        if let Some(Envelope { error }) = nested {
            let code = serde_json::from_str::<Inner>(error.get())
                .ok()
                .and_then(|i| i.code);
            write_frame(
                out,
                &EventOut::Error {
                    code: Some(code.as_deref().unwrap_or(error_code(err.kind))),
                    message: &err.message,
                    param: err.param.as_deref(),
                    error,
                },
                self.seq,
            );
            self.seq += 1;
        }
        let output = self.outputs();
        let response = response_object(
            &self.id,
            &self.model,
            self.created,
            "failed",
            None,
            Some(ErrorObjectOut {
                code: error_code(err.kind),
                message: &err.message,
            }),
            &output,
            self.usage_seen.then(|| UsageOut::from(&self.usage)),
        );
        write_frame(
            out,
            &EventOut::Failed {
                response: &response,
            },
            self.seq,
        );
        self.seq += 1;
    }

    /// The stream is over: appends what is still owed (`response.failed` if the answer
    /// never finished).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.fail(
            &ApiError {
                status: 502,
                kind: ErrorKind::Server,
                message: CUT_SHORT.to_owned(),
                param: None,
                code: None,
            },
            out,
        );
    }
}

fn write_frame(out: &mut Vec<u8>, event: &EventOut, sequence_number: u64) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.name().as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Writing into a Vec cannot fail, and these types always serialise.
    let _ = serde_json::to_writer(
        &mut *out,
        &Frame {
            event,
            sequence_number,
        },
    );
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    //! Golden files: the fixtures under `tests/fixtures/providers/openai-responses/` (sources
    //! in its README), one snapshot per fixture and direction; answers and streams of the
    //! other APIs' fixtures (`anthropic/`, `openai/`) read by their translators and written
    //! here. Asserts for the facts a snapshot could hide: the event sequence the openai SDK
    //! needs, signatures coming back to their origin, usage counted once.

    use std::path::{Path, PathBuf};

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::translate::anthropic;

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers")
    }

    fn fixture(path: &str) -> Vec<u8> {
        let path = dir().join("openai-responses").join(path);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The `data` of each event of an SSE recording; `event:` lines dropped.
    fn sse_data(bytes: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(bytes).expect("fixtures are UTF-8");
        text.replace("\r\n", "\n")
            .split("\n\n")
            .filter_map(|event| {
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                (!data.is_empty()).then(|| data.join("\n"))
            })
            .collect()
    }

    /// Each event of a Responses stream: its `event:` name and its parsed `data`.
    fn frames(bytes: &[u8]) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(bytes).expect("UTF-8");
        text.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let mut lines = e.lines();
                let name = lines
                    .next()
                    .and_then(|l| l.strip_prefix("event: "))
                    .expect("an event line first");
                let data = lines
                    .next()
                    .and_then(|l| l.strip_prefix("data: "))
                    .expect("one data line");
                assert!(lines.next().is_none(), "two lines per event");
                (
                    name.to_owned(),
                    serde_json::from_str(data).expect("JSON data"),
                )
            })
            .collect()
    }

    fn events_in(bytes: &[u8]) -> Vec<Event> {
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        for d in sse_data(bytes) {
            t.event(d.as_bytes(), &mut out).expect(&d);
        }
        t.finish(&mut out);
        out
    }

    fn events_out(events: &[Event]) -> String {
        let mut t = EventsOut::new("public-model", 1_700_000_000);
        let mut out = Vec::new();
        for e in events {
            t.event(e, &mut out);
        }
        t.finish(&mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    fn pretty(body: &[u8]) -> Value {
        serde_json::from_slice(body).expect("the translator writes JSON")
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

    /// Block indexes start at 0 and are contiguous; every start has one stop, before
    /// `MessageStop`, which comes once and last (or an error ends the stream).
    fn assert_well_formed(events: &[Event]) {
        let mut next = 0;
        let mut open = Vec::new();
        for (k, e) in events.iter().enumerate() {
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
                    let pos = open.iter().position(|i| i == index).expect("open block");
                    open.remove(pos);
                }
                Event::MessageStop { .. } => {
                    assert!(open.is_empty(), "every block stops first: {open:?}");
                    assert_eq!(k, events.len() - 1, "MessageStop is last");
                }
                Event::Usage(_) => {}
                Event::Error(_) => assert_eq!(k, events.len() - 1, "an error is last"),
            }
        }
        assert!(matches!(
            events.last(),
            Some(Event::MessageStop { .. } | Event::Error(_))
        ));
    }

    /// What the openai SDK's `ResponseStreamState` needs of a stream (lib/streaming/
    /// responses/_responses.py): `response.created` first, sequence numbers 0, 1, 2...,
    /// every delta on an item added before (a text delta on a message whose part was added),
    /// `*.done` repeating what the deltas built, one terminal event, last. Returns the
    /// terminal event's `response`.
    fn assert_sdk_stream(bytes: &[u8]) -> Value {
        let frames = frames(bytes);
        assert!(!frames.is_empty());
        let mut items: Vec<Value> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let mut terminal = None;
        for (n, (name, data)) in frames.iter().enumerate() {
            assert_eq!(data["type"], name.as_str(), "the event line names the type");
            assert_eq!(data["sequence_number"], n, "sequence numbers count from 0");
            assert!(
                terminal.is_none(),
                "nothing after the terminal event: {name}"
            );
            let at = |data: &Value| data["output_index"].as_u64().unwrap() as usize;
            match name.as_str() {
                "response.created" => {
                    assert_eq!(n, 0);
                    assert_eq!(data["response"]["status"], "in_progress");
                }
                "response.in_progress" => assert_eq!(n, 1),
                "response.output_item.added" => {
                    assert_eq!(at(data), items.len(), "items are added in order");
                    items.push(data["item"].clone());
                    texts.push(String::new());
                }
                "response.content_part.added" => {
                    assert_eq!(items[at(data)]["type"], "message");
                    assert_eq!(data["content_index"], 0);
                }
                "response.output_text.delta" => {
                    assert_eq!(items[at(data)]["type"], "message");
                    assert_eq!(data["item_id"], items[at(data)]["id"]);
                    texts[at(data)].push_str(data["delta"].as_str().unwrap());
                }
                "response.output_text.done" => {
                    assert_eq!(data["text"].as_str().unwrap(), texts[at(data)]);
                }
                "response.function_call_arguments.delta" => {
                    assert_eq!(items[at(data)]["type"], "function_call");
                    texts[at(data)].push_str(data["delta"].as_str().unwrap());
                }
                "response.function_call_arguments.done" => {
                    assert_eq!(data["arguments"].as_str().unwrap(), texts[at(data)]);
                }
                "response.reasoning_summary_text.delta" => {
                    assert_eq!(items[at(data)]["type"], "reasoning");
                    texts[at(data)].push_str(data["delta"].as_str().unwrap());
                }
                "response.reasoning_summary_text.done" => {
                    assert_eq!(data["text"].as_str().unwrap(), texts[at(data)]);
                }
                "response.output_item.done" => {
                    assert_eq!(data["item"]["id"], items[at(data)]["id"]);
                    items[at(data)] = data["item"].clone();
                }
                "response.completed" | "response.incomplete" | "response.failed" => {
                    terminal = Some(data["response"].clone());
                }
                "error" => {
                    // OpenAI's shape: nested (the SDK raises on it), then `response.failed`.
                    assert!(data["error"]["message"].is_string(), "nested error: {data}");
                    assert_eq!(data["message"], data["error"]["message"]);
                    assert_eq!(
                        frames.get(n + 1).map(|(name, _)| name.as_str()),
                        Some("response.failed"),
                        "an error is followed by response.failed"
                    );
                }
                _ => {}
            }
        }
        let response = terminal.expect("a terminal event ends the stream");
        if response["status"] != "failed" {
            assert_eq!(
                response["output"].as_array().unwrap(),
                &items,
                "the final response repeats the finished items"
            );
        }
        response
    }

    // ----- requests in ---------------------------------------------------------------------

    #[test]
    fn request_in_fixtures() {
        insta::glob!(
            "../../tests/fixtures/providers/openai-responses/requests",
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
            ("refused_store_true.json", "store"),
            ("refused_previous_response_id.json", "previous_response_id"),
            ("refused_conversation.json", "conversation"),
            ("refused_background.json", "background"),
            ("refused_prompt.json", "prompt"),
            ("refused_web_search.json", "tools"),
            ("refused_item_reference.json", "input"),
            ("refused_file_id.json", "input"),
            ("refused_logprobs.json", "include"),
            ("refused_wrong_type.json", "temperature"),
            ("refused_image_type.json", "input"),
        ] {
            let err = request_in(&fixture(&format!("requests/{file}"))).unwrap_err();
            assert_eq!(err.param, Some(param), "{file}: {err:?}");
        }
        let err = request_in(&fixture("requests/refused_store_true.json")).unwrap_err();
        assert!(
            err.message.contains("OpenAI or Azure Responses backend"),
            "says where stored state works: {err:?}"
        );
        for (body, param) in [
            (r#"{"input":"hi"}"#, "model"),
            (r#"{"model":"m"}"#, "input"),
            (r#"{"model":"m","input":7}"#, "input"),
            (r#"{"model":"m","input":{}}"#, "input"),
            (r#"{"model":"m","input":[7]}"#, "input"),
            (r#"{"model":"m","input":[{}]}"#, "input"),
            (
                r#"{"model":"m","input":[{"role":"tool","content":"x"}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":7}]}"#,
                "input",
            ),
            (r#"{"model":"m","input":[{"role":"user"}]}"#, "input"),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_audio"}]}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"role":"system","content":[{"type":"input_image","image_url":"https://x/y.png"}]}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"role":"assistant","content":[{"type":"input_image"}]}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"type":"function_call","name":"f"}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"type":"function_call_output","call_id":"c","output":5}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"type":"computer_call_output","call_id":"c"}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"type":"reasoning","summary":[],"encrypted_content":"mg1.nowhere.t.x"}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"ftp://x"}]}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_data":"data:text/plain;base64,aGk="}]}]}"#,
                "input",
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"mcp","server_label":"s"}]}"#,
                "tools",
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"code_interpreter"}]}"#,
                "tools",
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"custom","name":"c"}]}"#,
                "tools",
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"function"}]}"#,
                "tools",
            ),
            (r#"{"model":"m","input":"x","tools":{}}"#, "tools"),
            (
                r#"{"model":"m","input":"x","tool_choice":"maybe"}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","input":"x","tool_choice":{"type":"web_search_preview"}}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","input":"x","tool_choice":{"type":"function"}}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","input":"x","text":{"format":{"type":"json_schema","name":"n"}}}"#,
                "text",
            ),
            (
                r#"{"model":"m","input":"x","text":{"format":{"type":"grammar"}}}"#,
                "text",
            ),
            (r#"{"model":"m","input":"x","text":"json"}"#, "text"),
            (
                r#"{"model":"m","input":"x","reasoning":{"effort":"extreme"}}"#,
                "reasoning",
            ),
            (
                r#"{"model":"m","input":"x","reasoning":"high"}"#,
                "reasoning",
            ),
            (
                r#"{"model":"m","input":"x","max_output_tokens":-1}"#,
                "max_output_tokens",
            ),
            (
                r#"{"model":"m","input":"x","instructions":["a"]}"#,
                "instructions",
            ),
            (r#"{"model":"m","input":"x","stream":"yes"}"#, "stream"),
            (
                r#"{"model":"m","input":"x","stream_options":true}"#,
                "stream_options",
            ),
            (r#"{"model":"m","input":"x","store":"no"}"#, "store"),
            (
                r#"{"model":"m","input":"x","top_logprobs":3}"#,
                "top_logprobs",
            ),
            (r#"{"model":"m","input":"x","include":"all"}"#, "include"),
            (
                r#"{"model":"m","input":"x","parallel_tool_calls":1}"#,
                "parallel_tool_calls",
            ),
            (r#"{"model":"m","input":"x","user":5}"#, "user"),
        ] {
            let err = request_in(body.as_bytes()).expect_err(body);
            assert_eq!(err.param, Some(param), "{body}: {err:?}");
        }
        assert_eq!(request_in(b"{not json").unwrap_err().param, None);
        assert_eq!(request_in(b"[]").unwrap_err().param, None);
    }

    #[test]
    fn a_function_call_turn_becomes_assistant_and_user_turns() {
        let req = request_in(&fixture("requests/function_call_turn.json")).unwrap();
        let roles: Vec<Role> = req.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::User, Role::Assistant, Role::User]);
        assert_eq!(
            req.system.len(),
            2,
            "instructions, then the leading developer message"
        );
        let turn = &req.messages[1].content;
        assert!(matches!(
            &turn[0],
            Block::Thinking { signature: Some(s), .. } if s.origin == Api::OpenAiResponses
        ));
        let Block::ToolUse { id, input, .. } = &turn[1] else {
            panic!("a tool use after the reasoning")
        };
        assert_eq!(id, "call_fdNz3vOBKYgOIpMdWotB9MjY");
        assert_eq!(input.get(), r#"{"city": "Paris"}"#, "the model's bytes");
        let results = &req.messages[2].content;
        assert!(
            matches!(&results[0], Block::ToolResult { tool_use_id, .. } if tool_use_id == "call_fdNz3vOBKYgOIpMdWotB9MjY")
        );
        assert!(matches!(&results[1], Block::ToolResult { content, .. } if content.len() == 2));
        assert!(
            matches!(&results[2], Block::Text(t) if t.text == "Which is warmer?"),
            "user text after the outputs joins their turn"
        );
        assert_eq!(
            req.tool_choice,
            Some(ToolChoice::Tool("get_weather".into()))
        );
        assert_eq!(
            req.user.as_deref(),
            Some("sha256-abc"),
            "safety_identifier wins"
        );
        assert!(req.stream && req.include_usage);
        assert!(req.ignored.is_empty(), "{:?}", req.ignored);
    }

    #[test]
    fn ignored_fields_are_named() {
        let req = request_in(&fixture("requests/ignored_params.json")).unwrap();
        assert_eq!(
            req.ignored,
            [
                "include",
                "metadata",
                "truncation",
                "max_tool_calls",
                "prompt_cache_key",
                "prompt_cache_retention",
                "service_tier"
            ]
        );
        let req = request_in(&fixture("requests/json_schema.json")).unwrap();
        assert_eq!(req.ignored, ["text.verbosity"]);
    }

    // ----- signatures ----------------------------------------------------------------------

    #[test]
    fn signatures_come_back_to_their_origin() {
        let req = request_in(&fixture("requests/reasoning_round_trip.json")).unwrap();
        let assistant = &req.messages[1].content;
        assert!(matches!(
            &assistant[0],
            Block::Thinking { text, signature: Some(s) }
                if text == "Let me think. "
                    && s.origin == Api::AnthropicMessages
                    && s.value == "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
        ));
        assert!(matches!(
            &assistant[1],
            Block::RedactedThinking { data } if data.origin == Api::AnthropicMessages && data.value.starts_with("EmwK")
        ));
        // The Anthropic backend gets both back, unchanged and in order.
        let body = anthropic::request_out(
            &req,
            "claude-sonnet-4-5",
            anthropic::Out {
                default_max_tokens: 1024,
            },
        )
        .unwrap();
        insta::assert_json_snapshot!(pretty(&body));
        let v = pretty(&body);
        assert_eq!(v["messages"][1]["content"][0]["type"], "thinking");
        assert_eq!(
            v["messages"][1]["content"][0]["signature"],
            "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
        );
        assert_eq!(v["messages"][1]["content"][1]["type"], "redacted_thinking");
    }

    #[test]
    fn every_origin_survives_a_trip_through_a_client() {
        for origin in [
            Api::OpenAiChat,
            Api::AnthropicMessages,
            Api::OpenAiResponses,
            Api::BedrockConverse,
            Api::Gemini,
        ] {
            let sig = |value: &str| Signature {
                origin,
                value: value.into(),
            };
            let resp = Response {
                id: "msg_1".into(),
                model: "m".into(),
                content: vec![
                    Block::Thinking {
                        text: "thought".into(),
                        signature: Some(sig("a.b+c/=")),
                    },
                    Block::Thinking {
                        text: String::new(),
                        signature: Some(sig("empty-text")),
                    },
                    Block::RedactedThinking {
                        data: sig("redacted.data"),
                    },
                    text("answer"),
                ],
                stop: StopReason::EndTurn,
                stop_sequence: None,
                usage: Usage::default(),
            };
            // The client sends the output items back as input, as the SDK's
            // `input += response.output` does.
            let out = pretty(&response_out(&resp, "public", 1));
            let mut items = out["output"].as_array().unwrap().clone();
            items.push(json!({"role": "user", "content": "next"}));
            let body = json!({"model": "m", "input": items}).to_string();
            let req = request_in(body.as_bytes()).unwrap();
            let back = &req.messages[0].content;
            assert_eq!(
                format!("{back:?}"),
                format!("{:?}", resp.content),
                "{origin:?}"
            );
            // And the same through the whole answer read back.
            let again = response_in(&response_out(&resp, "public", 1)).unwrap();
            assert_eq!(
                format!("{:?}", again.content),
                format!("{:?}", resp.content)
            );
        }
        // OpenAI's own signature goes out untagged, as OpenAI wrote it.
        assert_eq!(
            encrypted(Api::OpenAiResponses, "gAAAA", false),
            Cow::Borrowed("gAAAA")
        );
        assert_eq!(
            encrypted(Api::OpenAiResponses, "gAAAA", true),
            "mg1.openai-responses.r.gAAAA"
        );
        assert_eq!(unseal("mg1.anthropic.x.v".into()), None);
        assert_eq!(unseal("mg1.anthropic".into()), None);
    }

    // ----- answers -------------------------------------------------------------------------

    #[test]
    fn response_in_fixtures() {
        insta::glob!(
            "../../tests/fixtures/providers/openai-responses/responses",
            "*.json",
            |path| {
                let body = std::fs::read(path).unwrap();
                insta::assert_debug_snapshot!(response_in(&body));
            }
        );
    }

    #[test]
    fn response_out_of_anthropic_answers() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "message-*.json",
            |path| {
                let resp = anthropic::response_in(&std::fs::read(path).unwrap()).unwrap();
                insta::assert_json_snapshot!(pretty(&response_out(
                    &resp,
                    "public-model",
                    1_700_000_000
                )));
            }
        );
    }

    #[test]
    fn response_out_of_openai_answers() {
        insta::glob!(
            "../../tests/fixtures/providers/openai/responses",
            "*.json",
            |path| {
                let resp = openai_chat::response_in(&std::fs::read(path).unwrap()).unwrap();
                insta::assert_json_snapshot!(pretty(&response_out(
                    &resp,
                    "public-model",
                    1_700_000_000
                )));
            }
        );
    }

    #[test]
    fn usage_counts_each_prompt_token_once() {
        let resp = response_in(&fixture("responses/function_call_reasoning.json")).unwrap();
        let u = resp.usage;
        assert_eq!(
            (u.input, u.cache_read, u.cache_write),
            (Some(86), Some(1920), Some(0))
        );
        assert_eq!((u.output, u.reasoning), (Some(300), Some(192)));
        assert_eq!(u.processed(), 2306, "reasoning is inside output");
        let back = pretty(&response_out(&resp, "public", 1));
        assert_eq!(back["usage"]["input_tokens"], 2006);
        assert_eq!(back["usage"]["input_tokens_details"]["cached_tokens"], 1920);
        assert_eq!(back["usage"]["output_tokens"], 300);
        assert_eq!(
            back["usage"]["output_tokens_details"]["reasoning_tokens"],
            192
        );
        assert_eq!(back["usage"]["total_tokens"], 2306);
        // Anthropic's input excludes both cache kinds: the Responses prompt adds them.
        let resp = Response {
            id: "msg_1".into(),
            model: "m".into(),
            content: vec![text("x")],
            stop: StopReason::EndTurn,
            stop_sequence: None,
            usage: Usage {
                input: Some(10),
                cache_read: Some(1000),
                cache_write: Some(200),
                output: Some(50),
                reasoning: None,
            },
        };
        let v = pretty(&response_out(&resp, "public", 1));
        assert_eq!(v["usage"]["input_tokens"], 1210);
        assert_eq!(
            v["usage"]["input_tokens_details"]["cache_write_tokens"],
            200
        );
        assert_eq!(v["usage"]["total_tokens"], 1260);
        // Unreported reasoning is written as 0 (the field is required) and reads back so.
        let back = response_in(&response_out(&resp, "p", 1)).unwrap().usage;
        assert_eq!(
            back,
            Usage {
                reasoning: Some(0),
                ..resp.usage
            }
        );
    }

    #[test]
    fn answers_read_back_the_same() {
        for file in [
            "output_text.json",
            "function_call_reasoning.json",
            "incomplete_max_output_tokens.json",
            "refusal.json",
        ] {
            let resp = response_in(&fixture(&format!("responses/{file}"))).unwrap();
            let again = response_in(&response_out(&resp, "public", 1)).unwrap();
            assert_eq!(
                format!("{:?}", resp.content),
                format!("{:?}", again.content),
                "{file}"
            );
            assert_eq!(resp.stop, again.stop, "{file}");
            assert_eq!(resp.usage, again.usage, "{file}");
        }
        let resp = response_in(&fixture("responses/function_call_reasoning.json")).unwrap();
        assert_eq!(resp.stop, StopReason::ToolUse);
        assert_eq!(resp.content.len(), 3, "the web search item is skipped");
        assert!(
            matches!(&resp.content[0], Block::Thinking { text, .. } if text.contains("calls.\n\n**Units**")),
            "summary parts joined by a blank line"
        );
        assert!(matches!(&resp.content[2], Block::ToolUse { input, .. } if input.get() == "{}"));
        let v = pretty(&response_out(
            &response_in(&fixture("responses/refusal.json")).unwrap(),
            "p",
            1,
        ));
        assert_eq!(v["output"][0]["content"][0]["type"], "refusal");
        assert_eq!(v["status"], "completed");
        let v = pretty(&response_out(
            &response_in(&fixture("responses/incomplete_max_output_tokens.json")).unwrap(),
            "p",
            1,
        ));
        assert_eq!(v["status"], "incomplete");
        assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(v["output"][0]["status"], "incomplete");
        assert!(response_in(b"[1]").is_err());
        assert!(response_in(b"{}").unwrap().content.is_empty());
    }

    #[test]
    fn errors_use_openai_envelope() {
        let err = error_in(
            429,
            br#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(err.kind, ErrorKind::RateLimited);
        let v = pretty(&error_out(&err));
        assert_eq!(v["error"]["message"], "slow down");
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }

    // ----- streams in ----------------------------------------------------------------------

    #[test]
    fn events_in_fixtures() {
        insta::glob!(
            "../../tests/fixtures/providers/openai-responses/streams",
            "*.sse",
            |path| {
                let events = events_in(&std::fs::read(path).unwrap());
                assert_well_formed(&events);
                insta::assert_debug_snapshot!(events);
            }
        );
    }

    #[test]
    fn streamed_answers_equal_their_final_response() {
        for file in [
            "text.sse",
            "function_call.sse",
            "reasoning.sse",
            "incomplete.sse",
        ] {
            let bytes = fixture(&format!("streams/{file}"));
            let events = events_in(&bytes);
            let data = sse_data(&bytes);
            let last = data.last().unwrap();
            let whole = response_in(
                serde_json::to_vec(&serde_json::from_str::<Value>(last).unwrap()["response"])
                    .unwrap()
                    .as_slice(),
            )
            .unwrap();
            let mut streamed = Response {
                id: String::new(),
                model: whole.model.clone(),
                content: Vec::new(),
                stop: StopReason::Other,
                stop_sequence: None,
                usage: Usage::default(),
            };
            let mut texts: Vec<(BlockKind, String, String)> = Vec::new();
            for e in &events {
                match e {
                    Event::MessageStart { id, .. } => streamed.id.clone_from(id),
                    Event::BlockStart { kind, .. } => {
                        texts.push((kind.clone(), String::new(), String::new()))
                    }
                    Event::BlockDelta { index, delta } => {
                        let t = &mut texts[*index as usize];
                        match delta {
                            Delta::Signature(s) => t.2.push_str(s),
                            Delta::Text(s) | Delta::Thinking(s) | Delta::ToolArgs(s) => {
                                t.1.push_str(s)
                            }
                        }
                    }
                    Event::Usage(u) => streamed.usage.merge(*u),
                    Event::MessageStop { stop, .. } => streamed.stop = *stop,
                    _ => {}
                }
            }
            for (kind, t, sig) in texts {
                streamed.content.push(match kind {
                    BlockKind::Text => text(&t),
                    BlockKind::Thinking => Block::Thinking {
                        text: t,
                        signature: (!sig.is_empty()).then_some(Signature {
                            origin: Api::OpenAiResponses,
                            value: sig,
                        }),
                    },
                    BlockKind::ToolUse { id, name } => Block::ToolUse {
                        id,
                        name,
                        input: raw(&t),
                        cache: None,
                    },
                    BlockKind::RedactedThinking { .. } => unreachable!(),
                });
            }
            assert_eq!(streamed.id, whole.id, "{file}");
            assert_eq!(
                format!("{:?}", streamed.content),
                format!("{:?}", whole.content),
                "{file}"
            );
            assert_eq!(streamed.stop, whole.stop, "{file}");
            assert_eq!(streamed.usage, whole.usage, "{file}");
        }
    }

    #[test]
    fn stream_failures_are_errors() {
        let events = events_in(&fixture("streams/failed.sse"));
        assert!(
            matches!(events.last(), Some(Event::Error(e)) if e.kind == ErrorKind::Server && e.message.starts_with("The model failed"))
        );
        let events = events_in(&fixture("streams/error_event.sse"));
        assert!(
            matches!(events.last(), Some(Event::Error(e)) if e.kind == ErrorKind::RateLimited && e.status == 429)
        );
        let events = events_in(&fixture("streams/cut_short.sse"));
        assert!(matches!(events.last(), Some(Event::Error(e)) if e.message == CUT_SHORT));
        // Nested error objects are read too; events after the end make nothing.
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        t.event(
            br#"{"type":"error","error":{"code":"context_length_exceeded","message":"too long"}}"#,
            &mut out,
        )
        .unwrap();
        t.event(
            br#"{"type":"response.created","response":{"id":"x"}}"#,
            &mut out,
        )
        .unwrap();
        t.finish(&mut out);
        assert!(matches!(out.as_slice(), [Event::Error(e)] if e.kind == ErrorKind::ContextLength));
        // Protocol errors.
        let mut t = EventsIn::new();
        assert!(t.event(b"{oops", &mut out).is_err());
        assert!(
            t.event(
                br#"{"type":"response.output_text.delta","output_index":3,"delta":"x"}"#,
                &mut out
            )
            .is_err()
        );
        assert!(
            t.event(br#"{"type":"response.output_item.added"}"#, &mut out)
                .is_err()
        );
        // A text delta without its part added first opens the part.
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        for e in [
            r#"{"type":"response.output_item.added","output_index":0,"item":{"type":"message"}}"#,
            r#"{"type":"response.output_text.delta","output_index":0,"content_index":0,"delta":"hi"}"#,
            r#"{"type":"response.output_item.done","output_index":0}"#,
            r#"{"type":"response.completed","response":{"status":"completed"}}"#,
        ] {
            t.event(e.as_bytes(), &mut out).unwrap();
        }
        assert_well_formed(&out);
        assert!(out.contains(&Event::BlockDelta {
            index: 0,
            delta: Delta::Text("hi".into())
        }));
        // `[DONE]` (which OpenAI does not send) says nothing.
        let mut out = Vec::new();
        EventsIn::new().event(b"[DONE]", &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn tool_calls_and_open_items_are_bounded() {
        let mut t = EventsIn::new();
        let mut out = Vec::new();
        let mut result = Ok(());
        for i in 0..=MAX_STREAM_TOOL_CALLS {
            let e = format!(
                r#"{{"type":"response.output_item.added","output_index":{i},"item":{{"type":"function_call","call_id":"c{i}","name":"f","arguments":""}}}}"#
            );
            result = t.event(e.as_bytes(), &mut out);
            let done = format!(r#"{{"type":"response.output_item.done","output_index":{i}}}"#);
            if result.is_ok() {
                t.event(done.as_bytes(), &mut out).unwrap();
            }
        }
        assert!(result.is_err(), "one call past the cap");
        let mut t = EventsIn::new();
        let mut result = Ok(());
        for i in 0..=MAX_OPEN {
            let e = format!(
                r#"{{"type":"response.output_item.added","output_index":{i},"item":{{"type":"message"}}}}"#
            );
            result = t.event(e.as_bytes(), &mut out);
        }
        assert!(result.is_err());
        assert!(t.open.len() <= MAX_OPEN);
    }

    // ----- streams out ---------------------------------------------------------------------

    #[test]
    fn events_out_of_anthropic_streams() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "stream-*.sse",
            |path| {
                let mut reader = anthropic::EventsIn::new();
                let mut events = Vec::new();
                for d in sse_data(&std::fs::read(path).unwrap()) {
                    reader.event(d.as_bytes(), &mut events).unwrap();
                }
                reader.finish(&mut events);
                let out = events_out(&events);
                assert_sdk_stream(out.as_bytes());
                insta::assert_snapshot!(out);
            }
        );
    }

    #[test]
    fn events_out_of_openai_streams() {
        insta::glob!(
            "../../tests/fixtures/providers/openai/streams",
            "*.sse",
            |path| {
                let mut reader = openai_chat::EventsIn::new();
                let mut events = Vec::new();
                for d in sse_data(&std::fs::read(path).unwrap()) {
                    reader.event(d.as_bytes(), &mut events).unwrap();
                }
                reader.finish(&mut events);
                let out = events_out(&events);
                assert_sdk_stream(out.as_bytes());
                insta::assert_snapshot!(out);
            }
        );
    }

    /// Responses in, Responses out: what a client sees through two translations is what the
    /// upstream sent (items, texts, arguments, usage, status).
    #[test]
    fn responses_stream_round_trip() {
        for file in [
            "text.sse",
            "function_call.sse",
            "reasoning.sse",
            "incomplete.sse",
        ] {
            let bytes = fixture(&format!("streams/{file}"));
            let events = events_in(&bytes);
            let mut w = EventsOut::new("public", 1).signatures_from(Api::OpenAiResponses);
            let mut out = Vec::new();
            for e in &events {
                w.event(e, &mut out);
            }
            w.finish(&mut out);
            let ours = assert_sdk_stream(&out);
            let data = sse_data(&bytes);
            let theirs = &serde_json::from_str::<Value>(data.last().unwrap()).unwrap()["response"];
            assert_eq!(ours["status"], theirs["status"], "{file}");
            assert_eq!(ours["usage"], theirs["usage"], "{file}");
            assert_eq!(ours["id"], theirs["id"], "{file}");
            let strip = |v: &Value| -> Vec<Value> {
                v["output"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| {
                        let mut i = i.clone();
                        i.as_object_mut().unwrap().remove("id");
                        i.as_object_mut().unwrap().remove("status");
                        i
                    })
                    .collect()
            };
            let (a, b) = (strip(&ours), strip(theirs));
            assert_eq!(a.len(), b.len(), "{file}");
            for (a, b) in a.iter().zip(&b) {
                match a["type"].as_str().unwrap() {
                    // Two summary parts come back as one, joined by a blank line.
                    "reasoning" => {
                        let joined: Vec<&str> = b["summary"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|s| s["text"].as_str().unwrap())
                            .collect();
                        assert_eq!(a["summary"][0]["text"], joined.join("\n\n"));
                        assert_eq!(a["encrypted_content"], b["encrypted_content"]);
                    }
                    _ => assert_eq!(a, b, "{file}"),
                }
            }
        }
    }

    fn anthropic_answer() -> Response {
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
                text("Paris: 15 C."),
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

    /// A whole answer written as a stream ends with the same `response` as `response_out`
    /// writes (the proxy's `stream_of` for a client that asked for a stream).
    #[test]
    fn a_streamed_answer_ends_with_the_whole_answer() {
        for stop in [
            StopReason::ToolUse,
            StopReason::MaxTokens,
            StopReason::ContentFilter,
        ] {
            let mut resp = anthropic_answer();
            resp.stop = stop;
            let out = events_out(&crate::translate::events_of(&resp));
            let last = assert_sdk_stream(out.as_bytes());
            let whole = pretty(&response_out(&resp, "public-model", 1_700_000_000));
            let mut items = whole["output"].as_array().unwrap().clone();
            if stop != StopReason::ToolUse {
                // A whole answer marks its cut item; a stream's items all finished.
                items.last_mut().unwrap()["status"] = json!("completed");
            }
            assert_eq!(last["output"].as_array().unwrap(), &items, "{stop:?}");
            let mut last = last;
            last["output"] = whole["output"].clone();
            assert_eq!(last, whole, "{stop:?}");
        }
    }

    #[test]
    fn events_out_anthropic_answer() {
        let out = events_out(&crate::translate::events_of(&anthropic_answer()));
        insta::assert_snapshot!(out);
    }

    #[test]
    fn an_error_ends_the_stream_with_response_failed() {
        let mut events = crate::translate::events_of(&anthropic_answer());
        events.truncate(6);
        events.push(Event::Error(ApiError {
            status: 529,
            kind: ErrorKind::Overloaded,
            message: "Overloaded".into(),
            param: None,
            code: None,
        }));
        events.push(Event::BlockStop { index: 2 });
        let out = events_out(&events);
        let last = assert_sdk_stream(out.as_bytes());
        assert_eq!(last["status"], "failed");
        assert_eq!(
            last["error"],
            json!({"code": "server_error", "message": "Overloaded"})
        );
        insta::assert_snapshot!(out);
        // No event at all but an error: still a whole lifecycle, created first.
        let out = events_out(&[Event::Error(ApiError {
            status: 429,
            kind: ErrorKind::RateLimited,
            message: "slow down".into(),
            param: None,
            code: None,
        })]);
        let last = assert_sdk_stream(out.as_bytes());
        assert_eq!(last["error"]["code"], "rate_limit_exceeded");
        // Cut short: `finish` owes a failure.
        let mut events = crate::translate::events_of(&anthropic_answer());
        events.truncate(9);
        let last = assert_sdk_stream(events_out(&events).as_bytes());
        assert_eq!(last["error"]["message"], CUT_SHORT);
        assert_eq!(
            last["output"][0]["status"],
            Value::Null,
            "reasoning has none"
        );
        assert_eq!(
            last["output"][2]["status"], "in_progress",
            "the open item as it was"
        );
        assert_eq!(last["output"][2]["content"], json!([]));
    }

    #[test]
    fn held_text_is_capped() {
        let big = "x".repeat(MAX_HELD_BYTES / 2 + 1);
        let mut events = vec![Event::MessageStart {
            id: "m".into(),
            usage: Usage::default(),
        }];
        for index in 0..2 {
            events.push(Event::BlockStart {
                index,
                kind: BlockKind::Text,
            });
            events.push(Event::BlockDelta {
                index,
                delta: Delta::Text(big.clone()),
            });
            events.push(Event::BlockStop { index });
        }
        events.push(Event::MessageStop {
            stop: StopReason::EndTurn,
            stop_sequence: None,
        });
        let out = events_out(&events);
        let last = assert_sdk_stream(out.as_bytes());
        assert_eq!(last["status"], "failed");
        assert!(
            last["error"]["message"]
                .as_str()
                .unwrap()
                .contains("exceeded")
        );

        let mut events = vec![Event::MessageStart {
            id: "m".into(),
            usage: Usage::default(),
        }];
        for index in 0..=MAX_ITEMS as u32 {
            events.push(Event::BlockStart {
                index,
                kind: BlockKind::Text,
            });
            events.push(Event::BlockStop { index });
        }
        let mut w = EventsOut::new("m", 0);
        let mut out = Vec::new();
        for e in &events {
            w.event(e, &mut out);
        }
        assert!(w.items.len() <= MAX_ITEMS);
        assert_eq!(assert_sdk_stream(&out)["status"], "failed");
    }

    #[test]
    fn stream_signatures_are_tagged_with_the_backend() {
        let events = crate::translate::events_of(&anthropic_answer());
        let out = events_out(&events);
        let last = assert_sdk_stream(out.as_bytes());
        assert_eq!(
            last["output"][0]["encrypted_content"],
            "mg1.anthropic.t.EqQBCgIYAh"
        );
        assert_eq!(
            last["output"][1]["encrypted_content"],
            "mg1.anthropic.r.EmwKAhgB"
        );
        let mut w = EventsOut::new("m", 0).signatures_from(Api::Gemini);
        let mut out = Vec::new();
        for e in &events {
            w.event(e, &mut out);
        }
        let last = assert_sdk_stream(&out);
        assert_eq!(
            last["output"][0]["encrypted_content"],
            "mg1.gemini.t.EqQBCgIYAh"
        );
    }

    // ----- never panics --------------------------------------------------------------------

    fn jsonish() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            "[\\[\\]{}\":,a-z0-9 .\\\\-]{0,200}".prop_map(String::into_bytes),
            ("[a-z_]{1,12}", "[\\[\\]{}\":,a-z0-9 ]{0,40}").prop_map(|(k, v)| {
                format!(r#"{{"model":"m","input":[{{"type":"{k}","role":{v},"content":[{{"type":"{k}","{k}":{v}}}],"summary":{v},"output":{v},"encrypted_content":{v}}}],"{k}":{v}}}"#).into_bytes()
            }),
            ("[a-z_.]{1,40}", "[\\[\\]{}\":,a-z0-9 ]{0,40}", 0u64..4).prop_map(|(k, v, i)| {
                format!(r#"{{"type":"{k}","output_index":{i},"content_index":{v},"item":{{"type":{v},"summary":{v}}},"part":{v},"delta":{v},"response":{{"usage":{v},"output":[{v}],"error":{v}}},"code":{v}}}"#).into_bytes()
            }),
        ]
    }

    fn stream_events() -> impl Strategy<Value = Vec<Event>> {
        let event = prop_oneof![
            ("[a-z]{0,4}").prop_map(|id| Event::MessageStart {
                id,
                usage: Usage::default()
            }),
            (
                0u32..4,
                prop_oneof![
                    Just(BlockKind::Text),
                    Just(BlockKind::Thinking),
                    "[a-z]{0,3}".prop_map(|data| BlockKind::RedactedThinking { data }),
                    "[a-z]{0,3}".prop_map(|id| BlockKind::ToolUse {
                        id,
                        name: "f".into()
                    }),
                ]
            )
                .prop_map(|(index, kind)| Event::BlockStart { index, kind }),
            (0u32..4, "[a-z{}\":]{0,5}", 0u8..4).prop_map(|(index, s, k)| Event::BlockDelta {
                index,
                delta: match k {
                    0 => Delta::Text(s),
                    1 => Delta::ToolArgs(s),
                    2 => Delta::Thinking(s),
                    _ => Delta::Signature(s),
                },
            }),
            (0u32..4).prop_map(|index| Event::BlockStop { index }),
            (0u64..100).prop_map(|n| Event::Usage(Usage {
                output: Some(n),
                ..Usage::default()
            })),
            Just(Event::MessageStop {
                stop: StopReason::EndTurn,
                stop_sequence: None
            }),
        ];
        proptest::collection::vec(event, 0..24)
    }

    proptest! {
        #[test]
        fn nothing_panics(body in jsonish(), status in 0u16..1000) {
            let _ = request_in(&body);
            if let Ok(resp) = response_in(&body) {
                let _ = response_out(&resp, "m", 0);
            }
            let _ = error_out(&error_in(status, &body));
            let mut t = EventsIn::new();
            let mut events = Vec::new();
            let _ = t.event(&body, &mut events);
            let _ = t.event(&body, &mut events);
            t.finish(&mut events);
            let mut o = EventsOut::new("m", 0);
            let mut bytes = Vec::new();
            for e in &events {
                o.event(e, &mut bytes);
            }
            o.finish(&mut bytes);
        }

        /// Any canonical event sequence, well formed or not, makes a stream the SDK reads.
        #[test]
        fn any_events_make_an_sdk_stream(events in stream_events()) {
            let out = events_out(&events);
            assert_sdk_stream(out.as_bytes());
        }
    }
}
