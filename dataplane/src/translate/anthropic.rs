//! Anthropic Messages in and out of the canonical model: used by Anthropic clients of a
//! translated backend (requests in, answers and streams out) and by `anthropic` backends of
//! translated clients (requests out, answers and streams in).
//!
//! ```text
//!  Anthropic client body ─► request_in ─► Request ─► request_out ─► Anthropic backend body
//!  message JSON ─► response_in ─► Response ─► response_out ─► message JSON
//!  SSE data ─► EventsIn ─► Event* ─► EventsOut ─► `event:` + `data:` lines
//!  error body ─► error_in ─► ApiError ─► error_out ─► error body
//! ```
//!
//! Reading goes through `#[derive(Deserialize)]` structs that borrow tool inputs and schemas
//! as `RawValue`, so those bytes are copied once and never re-formatted; writing goes through
//! `#[derive(Serialize)]` structs that borrow from the canonical values. Wire details and their
//! sources: `docs/providers.md` 3.1 and 4.

use std::borrow::Cow;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use super::{MAX_STREAM_TOOL_CALLS, Refused};
use crate::canonical::{
    Api, ApiError, Block, BlockKind, CacheMark, CacheTtl, Delta, Effort, ErrorKind, Event,
    ImageSource, Message, Reasoning, Request, Response, ResponseFormat, Role, Signature,
    StopReason, TextBlock, Tool, ToolChoice, Usage,
};

/// How an Anthropic 400 for a prompt over the context window begins. Community-reported, not
/// documented (docs/providers.md 4.5 and 10): the one place to change when a recording says
/// otherwise.
pub const PROMPT_TOO_LONG: &str = "prompt is too long";

/// Most upstream text copied into an error message.
const MAX_UPSTREAM_MESSAGE_BYTES: usize = 1024;

/// Most of a parser's complaint copied into a refusal (serde quotes the offending value).
const MAX_PARSE_ERROR_BYTES: usize = 200;

/// Blocks one stream may hold open at once; past it the upstream is not speaking Anthropic.
const MAX_OPEN_BLOCKS: usize = MAX_STREAM_TOOL_CALLS;

/// How the request for an Anthropic backend is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    /// `max_tokens` to send when the request has none (Anthropic requires it): the request's
    /// output reservation, so admission reserved exactly what is sent.
    pub default_max_tokens: u64,
}

// ---------------------------------------------------------------------------------------------
// Requests in

/// The top level of a request: each field kept as raw JSON and read on its own, so that a
/// refusal names the field that was wrong.
#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    stop_sequences: Option<&'a RawValue>,
    #[serde(borrow)]
    temperature: Option<&'a RawValue>,
    #[serde(borrow)]
    top_p: Option<&'a RawValue>,
    #[serde(borrow)]
    top_k: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_choice: Option<&'a RawValue>,
    #[serde(borrow)]
    thinking: Option<&'a RawValue>,
    #[serde(borrow)]
    output_config: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    service_tier: Option<&'a RawValue>,
    #[serde(borrow)]
    container: Option<&'a RawValue>,
    #[serde(borrow)]
    inference_geo: Option<&'a RawValue>,
    #[serde(borrow)]
    cache_control: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireMessage<'a> {
    role: String,
    #[serde(borrow)]
    content: &'a RawValue,
}

/// Every content block kind in one flat shape: which fields matter depends on `type`.
/// (Serde's tagged enums buffer their input, which `RawValue` cannot be read from.)
#[derive(Deserialize)]
struct WireBlock<'a> {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    source: Option<WireSource>,
    id: Option<String>,
    name: Option<String>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    tool_use_id: Option<String>,
    /// `tool_result` and `mid_conv_system` content; read one level deep only.
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    is_error: Option<bool>,
    thinking: Option<String>,
    signature: Option<String>,
    data: Option<String>,
    cache_control: Option<WireCache>,
}

#[derive(Deserialize)]
struct WireSource {
    #[serde(rename = "type")]
    kind: String,
    media_type: Option<String>,
    data: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct WireCache {
    #[serde(rename = "type")]
    kind: String,
    ttl: Option<String>,
}

#[derive(Deserialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    description: Option<String>,
    #[serde(borrow)]
    input_schema: Option<&'a RawValue>,
    strict: Option<bool>,
    cache_control: Option<WireCache>,
}

#[derive(Deserialize)]
struct WireToolChoice {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Deserialize)]
struct WireThinking {
    #[serde(rename = "type")]
    kind: String,
    budget_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WireOutputConfig<'a> {
    effort: Option<String>,
    #[serde(borrow)]
    format: Option<WireFormat<'a>>,
}

#[derive(Deserialize)]
struct WireFormat<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow)]
    schema: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireMetadata {
    user_id: Option<String>,
}

/// An Anthropic Messages request body read into the canonical model. Only called when the
/// backend is not Anthropic, so what only Anthropic can run (server tools, `max_tokens: 0`) is
/// refused here, naming the field.
pub fn request_in(body: &[u8]) -> Result<Request, Refused> {
    let wire: WireRequest = serde_json::from_slice(body).map_err(|e| {
        Refused::new(
            None,
            format!(
                "the body is not a valid JSON object: {}",
                clip(&e.to_string())
            ),
        )
    })?;

    let model: String = required(wire.model, "model")?;
    let max_tokens: u64 = required(wire.max_tokens, "max_tokens")?;
    if max_tokens == 0 {
        return Err(Refused::new(
            Some("max_tokens"),
            "`max_tokens: 0` only fills Anthropic's prompt cache; the backend of this route has no equivalent",
        ));
    }

    let mut req = Request {
        model,
        max_output_tokens: Some(max_tokens),
        stream: field(wire.stream, "stream")?.unwrap_or(false),
        // Anthropic streams always carry usage, so an Anthropic client always sees it.
        include_usage: true,
        stop: field(wire.stop_sequences, "stop_sequences")?.unwrap_or_default(),
        temperature: field(wire.temperature, "temperature")?,
        top_p: field(wire.top_p, "top_p")?,
        top_k: field(wire.top_k, "top_k")?,
        ..Request::default()
    };

    if let Some(raw) = wire.system {
        req.system = system_in(raw)?;
    }
    let messages: Vec<WireMessage> = required(wire.messages, "messages")?;
    req.messages = messages_in(messages)?;

    if let Some(tools) = field::<Vec<WireTool>>(wire.tools, "tools")? {
        req.tools = tools.into_iter().map(tool_in).collect::<Result<_, _>>()?;
    }
    if let Some(choice) = field::<WireToolChoice>(wire.tool_choice, "tool_choice")? {
        req.tool_choice = Some(match choice.kind.as_str() {
            "auto" => ToolChoice::Auto,
            "any" => ToolChoice::Any,
            "none" => ToolChoice::None,
            "tool" => ToolChoice::Tool(choice.name.ok_or_else(|| {
                Refused::new(
                    Some("tool_choice"),
                    "`tool_choice` of type `tool` needs a `name`",
                )
            })?),
            other => {
                return Err(Refused::new(
                    Some("tool_choice"),
                    format!("unknown `tool_choice` type `{}`", clip(other)),
                ));
            }
        });
        if choice.disable_parallel_tool_use == Some(true) {
            req.parallel_tool_calls = Some(false);
        }
    }

    let mut reasoning = None;
    if let Some(thinking) = field::<WireThinking>(wire.thinking, "thinking")? {
        reasoning = Some(match thinking.kind.as_str() {
            "enabled" => Reasoning::Budget(thinking.budget_tokens.ok_or_else(|| {
                Refused::new(Some("thinking"), "`thinking` enabled needs `budget_tokens`")
            })?),
            "adaptive" => Reasoning::Adaptive,
            "disabled" => Reasoning::Off,
            other => {
                return Err(Refused::new(
                    Some("thinking"),
                    format!("unknown `thinking` type `{}`", clip(other)),
                ));
            }
        });
    }
    if let Some(config) = field::<WireOutputConfig>(wire.output_config, "output_config")? {
        if let Some(effort) = config.effort {
            let effort = Effort::parse(&effort).ok_or_else(|| {
                Refused::new(
                    Some("output_config"),
                    format!("unknown `output_config.effort` `{}`", clip(&effort)),
                )
            })?;
            // Thinking switched off stays off; otherwise the effort is the more precise ask
            // (it is all an OpenAI backend can take).
            if reasoning != Some(Reasoning::Off) {
                reasoning = Some(Reasoning::Effort(effort));
            }
        }
        if let Some(format) = config.format {
            if format.kind != "json_schema" {
                return Err(Refused::new(
                    Some("output_config"),
                    format!(
                        "unknown `output_config.format` type `{}`",
                        clip(&format.kind)
                    ),
                ));
            }
            let schema = format.schema.ok_or_else(|| {
                Refused::new(
                    Some("output_config"),
                    "`output_config.format` needs a `schema`",
                )
            })?;
            req.response_format = Some(ResponseFormat::JsonSchema {
                name: None,
                schema: schema.to_owned(),
                strict: None,
            });
        }
    }
    req.reasoning = reasoning;

    if let Some(metadata) = field::<WireMetadata>(wire.metadata, "metadata")? {
        req.user = metadata.user_id;
    }

    for (raw, name) in [
        (wire.service_tier, "service_tier"),
        (wire.container, "container"),
        (wire.inference_geo, "inference_geo"),
        (wire.cache_control, "cache_control"),
    ] {
        if raw.is_some() {
            req.ignored.push(name);
        }
    }
    Ok(req)
}

/// One top-level field read on its own; JSON `null` counts as absent.
fn field<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    name: &'static str,
) -> Result<Option<T>, Refused> {
    raw.map(|raw| {
        serde_json::from_str(raw.get()).map_err(|e| {
            Refused::new(
                Some(name),
                format!("`{name}` is not valid: {}", clip(&e.to_string())),
            )
        })
    })
    .transpose()
}

fn required<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    name: &'static str,
) -> Result<T, Refused> {
    field(raw, name)?.ok_or_else(|| Refused::new(Some(name), format!("`{name}` is required")))
}

/// A string, or an array of blocks: told apart by the first byte, since untagged enums cannot
/// hold `RawValue`s.
enum StringOrBlocks<'a> {
    String(String),
    Blocks(Vec<WireBlock<'a>>),
}

fn string_or_blocks<'a>(
    raw: &'a RawValue,
    name: &'static str,
) -> Result<StringOrBlocks<'a>, Refused> {
    let text = raw.get();
    let parsed = if text.trim_start().starts_with('"') {
        serde_json::from_str(text).map(StringOrBlocks::String)
    } else {
        serde_json::from_str(text).map(StringOrBlocks::Blocks)
    };
    parsed.map_err(|e| {
        Refused::new(
            Some(name),
            format!(
                "`{name}` content must be a string or an array of blocks: {}",
                clip(&e.to_string())
            ),
        )
    })
}

fn system_in(raw: &RawValue) -> Result<Vec<TextBlock>, Refused> {
    match string_or_blocks(raw, "system")? {
        StringOrBlocks::String(text) => Ok(vec![TextBlock { text, cache: None }]),
        StringOrBlocks::Blocks(blocks) => blocks
            .into_iter()
            .map(|b| text_block_in(b, "system"))
            .collect(),
    }
}

fn text_block_in(block: WireBlock, name: &'static str) -> Result<TextBlock, Refused> {
    if block.kind != "text" {
        return Err(Refused::new(
            Some(name),
            format!(
                "only text blocks are allowed here, not `{}`",
                clip(&block.kind)
            ),
        ));
    }
    Ok(TextBlock {
        text: block
            .text
            .ok_or_else(|| Refused::new(Some(name), "a text block needs `text`"))?,
        cache: cache_in(block.cache_control, name)?,
    })
}

fn cache_in(wire: Option<WireCache>, name: &'static str) -> Result<Option<CacheMark>, Refused> {
    let Some(wire) = wire else { return Ok(None) };
    if wire.kind != "ephemeral" {
        return Err(Refused::new(
            Some(name),
            format!("unknown `cache_control` type `{}`", clip(&wire.kind)),
        ));
    }
    let ttl = match wire.ttl.as_deref() {
        None => None,
        Some("5m") => Some(CacheTtl::FiveMinutes),
        Some("1h") => Some(CacheTtl::OneHour),
        Some(other) => {
            return Err(Refused::new(
                Some(name),
                format!("unknown `cache_control.ttl` `{}`", clip(other)),
            ));
        }
    };
    Ok(Some(CacheMark { ttl }))
}

fn messages_in(wire: Vec<WireMessage>) -> Result<Vec<Message>, Refused> {
    let mut messages = Vec::with_capacity(wire.len());
    for message in wire {
        let role = match message.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => Role::System,
            other => {
                return Err(Refused::new(
                    Some("messages"),
                    format!("unknown message role `{}`", clip(other)),
                ));
            }
        };
        let blocks = match string_or_blocks(message.content, "messages")? {
            StringOrBlocks::String(text) => {
                messages.push(Message {
                    role,
                    content: vec![Block::Text(TextBlock { text, cache: None })],
                });
                continue;
            }
            StringOrBlocks::Blocks(blocks) => blocks,
        };
        let before = messages.len();
        let mut content = Vec::with_capacity(blocks.len());
        for block in blocks {
            if block.kind == "mid_conv_system" {
                // Instructions inside the conversation: a system message at that position.
                if !content.is_empty() {
                    messages.push(Message {
                        role,
                        content: std::mem::take(&mut content),
                    });
                }
                messages.push(Message {
                    role: Role::System,
                    content: mid_conv_system_in(block)?,
                });
                continue;
            }
            content.push(block_in(block)?);
        }
        if !content.is_empty() || messages.len() == before {
            messages.push(Message { role, content });
        }
    }
    Ok(messages)
}

fn mid_conv_system_in(block: WireBlock) -> Result<Vec<Block>, Refused> {
    let Some(raw) = block.content else {
        return Err(Refused::new(
            Some("messages"),
            "a `mid_conv_system` block needs `content`",
        ));
    };
    let cache = cache_in(block.cache_control, "messages")?;
    let mut texts = match string_or_blocks(raw, "messages")? {
        StringOrBlocks::String(text) => vec![TextBlock { text, cache: None }],
        StringOrBlocks::Blocks(blocks) => blocks
            .into_iter()
            .map(|b| text_block_in(b, "messages"))
            .collect::<Result<Vec<_>, _>>()?,
    };
    if let (Some(cache), Some(last)) = (cache, texts.last_mut()) {
        last.cache.get_or_insert(cache);
    }
    Ok(texts.into_iter().map(Block::Text).collect())
}

fn missing(kind: &str, what: &str) -> Refused {
    Refused::new(
        Some("messages"),
        format!("a `{}` block needs `{what}`", clip(kind)),
    )
}

/// One content block of a message. `tool_result` content is read here, one level deep: its
/// blocks go through `leaf_block_in`, which never reads nested content.
fn block_in(block: WireBlock) -> Result<Block, Refused> {
    match block.kind.as_str() {
        "tool_use" => {
            let input = block.input.ok_or_else(|| missing("tool_use", "input"))?;
            Ok(Block::ToolUse {
                id: block.id.ok_or_else(|| missing("tool_use", "id"))?,
                name: block.name.ok_or_else(|| missing("tool_use", "name"))?,
                input: input.to_owned(),
                cache: cache_in(block.cache_control, "messages")?,
            })
        }
        "tool_result" => {
            let tool_use_id = block
                .tool_use_id
                .ok_or_else(|| missing("tool_result", "tool_use_id"))?;
            let content = match block.content {
                None => Vec::new(),
                Some(raw) => match string_or_blocks(raw, "messages")? {
                    StringOrBlocks::String(text) => {
                        vec![Block::Text(TextBlock { text, cache: None })]
                    }
                    StringOrBlocks::Blocks(blocks) => blocks
                        .into_iter()
                        .map(leaf_block_in)
                        .collect::<Result<_, _>>()?,
                },
            };
            Ok(Block::ToolResult {
                tool_use_id,
                content,
                is_error: block.is_error.unwrap_or(false),
                cache: cache_in(block.cache_control, "messages")?,
            })
        }
        "thinking" => Ok(Block::Thinking {
            text: block
                .thinking
                .ok_or_else(|| missing("thinking", "thinking"))?,
            // An empty signature is what a thinking block made from another API's reasoning
            // carries (`response_out`): no signature at all.
            signature: block
                .signature
                .filter(|s| !s.is_empty())
                .map(|value| Signature {
                    origin: Api::AnthropicMessages,
                    value,
                }),
        }),
        "redacted_thinking" => Ok(Block::RedactedThinking {
            data: Signature {
                origin: Api::AnthropicMessages,
                value: block
                    .data
                    .ok_or_else(|| missing("redacted_thinking", "data"))?,
            },
        }),
        _ => leaf_block_in(block),
    }
}

/// Text, image and PDF document blocks: what a message and a tool result both hold.
fn leaf_block_in(block: WireBlock) -> Result<Block, Refused> {
    let cache = cache_in(block.cache_control, "messages")?;
    match block.kind.as_str() {
        "text" => Ok(Block::Text(TextBlock {
            text: block.text.ok_or_else(|| missing("text", "text"))?,
            cache,
        })),
        "image" => {
            let source = block.source.ok_or_else(|| missing("image", "source"))?;
            let source = match source.kind.as_str() {
                "url" => ImageSource::Url(source.url.ok_or_else(|| missing("image", "url"))?),
                "base64" => {
                    let media_type = source
                        .media_type
                        .ok_or_else(|| missing("image", "media_type"))?;
                    if !matches!(
                        media_type.as_str(),
                        "image/jpeg" | "image/png" | "image/gif" | "image/webp"
                    ) {
                        return Err(Refused::new(
                            Some("messages"),
                            format!("unsupported image media type `{}`", clip(&media_type)),
                        ));
                    }
                    ImageSource::Base64 {
                        media_type,
                        data: source.data.ok_or_else(|| missing("image", "data"))?,
                    }
                }
                other => {
                    return Err(Refused::new(
                        Some("messages"),
                        format!(
                            "image source `{}` cannot be sent to this backend",
                            clip(other)
                        ),
                    ));
                }
            };
            Ok(Block::Image { source, cache })
        }
        "document" => {
            let source = block.source.ok_or_else(|| missing("document", "source"))?;
            let media_type = source.media_type.unwrap_or_default();
            if source.kind != "base64" || media_type != "application/pdf" {
                return Err(Refused::new(
                    Some("messages"),
                    "only base64 PDF documents can be sent to this backend",
                ));
            }
            Ok(Block::Document {
                media_type,
                data: source.data.ok_or_else(|| missing("document", "data"))?,
                cache,
            })
        }
        other => Err(Refused::new(
            Some("messages"),
            format!(
                "content block `{}` cannot be sent to this backend",
                clip(other)
            ),
        )),
    }
}

fn tool_in(wire: WireTool) -> Result<Tool, Refused> {
    if let Some(kind) = wire.kind.as_deref().filter(|k| *k != "custom") {
        return Err(Refused::new(
            Some("tools"),
            format!(
                "server tool `{}` (`{}`) runs only on an Anthropic backend",
                clip(wire.name.as_deref().unwrap_or("")),
                clip(kind)
            ),
        ));
    }
    Ok(Tool {
        name: wire
            .name
            .ok_or_else(|| Refused::new(Some("tools"), "a tool needs a `name`"))?,
        description: wire.description,
        input_schema: wire.input_schema.map(ToOwned::to_owned),
        strict: wire.strict,
        cache: cache_in(wire.cache_control, "tools")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Requests out

#[derive(Serialize)]
struct OutRequest<'a> {
    model: &'a str,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<OutText<'a>>,
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<OutToolChoice<'a>>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<OutThinking>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<OutOutputConfig<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<OutMetadata<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct OutText<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<OutCache>,
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: Vec<OutBlock<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutBlock<'a> {
    Text {
        text: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<OutCache>,
    },
    Image {
        source: OutSource<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<OutCache>,
    },
    Document {
        source: OutSource<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<OutCache>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Json<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<OutCache>,
    },
    ToolResult {
        tool_use_id: &'a str,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        content: Vec<OutBlock<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<OutCache>,
    },
    Thinking {
        thinking: &'a str,
        signature: &'a str,
    },
    RedactedThinking {
        data: &'a str,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutSource<'a> {
    Base64 { media_type: &'a str, data: &'a str },
    Url { url: &'a str },
}

#[derive(Serialize, Clone, Copy)]
struct OutCache {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<&'static str>,
}

#[derive(Serialize)]
struct OutTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Json<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<OutCache>,
}

#[derive(Serialize)]
struct OutToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Serialize)]
struct OutThinking {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_tokens: Option<u64>,
}

#[derive(Serialize)]
struct OutOutputConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    effort: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<OutFormat<'a>>,
}

#[derive(Serialize)]
struct OutFormat<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    schema: Json<'a>,
}

#[derive(Serialize)]
struct OutMetadata<'a> {
    user_id: &'a str,
}

/// JSON written into a body: the client's or model's bytes as they came, or one of the few
/// values the gateway supplies.
#[derive(Serialize)]
#[serde(untagged)]
enum Json<'a> {
    Raw(&'a RawValue),
    /// `{}`
    EmptyObject(EmptyObject),
    /// `{"type":"object"}`, or `{"type":"object","properties":{}}`
    ObjectSchema(ObjectSchema),
}

struct EmptyObject;

impl Serialize for EmptyObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
}

#[derive(Serialize)]
struct ObjectSchema {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<EmptyObject>,
}

fn is_object(raw: &RawValue) -> bool {
    raw.get().trim_start().starts_with('{')
}

/// A tool call's arguments: always an object on the wire (a non-object would be a 400).
fn tool_input(raw: &RawValue) -> Json<'_> {
    if is_object(raw) {
        Json::Raw(raw)
    } else {
        Json::EmptyObject(EmptyObject)
    }
}

fn cache_out(mark: Option<CacheMark>) -> Option<OutCache> {
    mark.map(|mark| OutCache {
        kind: "ephemeral",
        ttl: mark.ttl.map(|ttl| match ttl {
            CacheTtl::FiveMinutes => "5m",
            CacheTtl::OneHour => "1h",
        }),
    })
}

/// The request body for an Anthropic backend, `model` being the upstream's name.
pub fn request_out(req: &Request, model: &str, out: Out) -> Result<Vec<u8>, Refused> {
    let mut system: Vec<OutText> = req.system.iter().map(text_out).collect();
    let mut messages: Vec<OutMessage> = Vec::with_capacity(req.messages.len());
    for message in &req.messages {
        let role = match message.role {
            Role::System => {
                // Anthropic's system prompt is top level: hoisted, in order.
                for block in &message.content {
                    let Block::Text(text) = block else {
                        return Err(Refused::new(
                            Some("messages"),
                            "a system message can only hold text",
                        ));
                    };
                    system.push(text_out(text));
                }
                continue;
            }
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let mut content = Vec::with_capacity(message.content.len());
        for block in &message.content {
            if let Some(block) = block_out(block)? {
                content.push(block);
            }
        }
        if content.is_empty() && !message.content.is_empty() {
            // Only thinking from another API, dropped: nothing left to send for this turn.
            continue;
        }
        // Anthropic wants roles to alternate: consecutive turns of one role become one.
        match messages.last_mut() {
            Some(last) if last.role == role => last.content.append(&mut content),
            _ => messages.push(OutMessage { role, content }),
        }
    }
    for message in &mut messages {
        if message.role == "user" {
            // Tool results open the turn that answers the tool calls (stable: order kept).
            message
                .content
                .sort_by_key(|b| !matches!(b, OutBlock::ToolResult { .. }));
        }
    }

    let tools: Vec<OutTool> = req
        .tools
        .iter()
        .map(|tool| OutTool {
            name: &tool.name,
            description: tool.description.as_deref(),
            input_schema: match &tool.input_schema {
                Some(schema) => Json::Raw(schema),
                None => Json::ObjectSchema(ObjectSchema {
                    kind: "object",
                    properties: Some(EmptyObject),
                }),
            },
            strict: tool.strict,
            cache_control: cache_out(tool.cache),
        })
        .collect();

    let disable_parallel = (req.parallel_tool_calls == Some(false)).then_some(true);
    let tool_choice = match (&req.tool_choice, disable_parallel) {
        // Anthropic takes a choice only with tools to choose from.
        _ if tools.is_empty() => None,
        (None, None) => None,
        (None | Some(ToolChoice::Auto), _) => Some(OutToolChoice {
            kind: "auto",
            name: None,
            disable_parallel_tool_use: disable_parallel,
        }),
        (Some(ToolChoice::Any), _) => Some(OutToolChoice {
            kind: "any",
            name: None,
            disable_parallel_tool_use: disable_parallel,
        }),
        // `none` takes no `disable_parallel_tool_use`: no call at all is made.
        (Some(ToolChoice::None), _) => Some(OutToolChoice {
            kind: "none",
            name: None,
            disable_parallel_tool_use: None,
        }),
        (Some(ToolChoice::Tool(name)), _) => Some(OutToolChoice {
            kind: "tool",
            name: Some(name),
            disable_parallel_tool_use: disable_parallel,
        }),
    };

    let (thinking, effort) = match req.reasoning {
        None => (None, None),
        Some(Reasoning::Off) => (Some(thinking_out("disabled", None)), None),
        Some(Reasoning::Budget(n)) => (Some(thinking_out("enabled", Some(n))), None),
        Some(Reasoning::Adaptive) => (Some(thinking_out("adaptive", None)), None),
        // Anthropic's lowest effort is `low`.
        Some(Reasoning::Effort(Effort::Minimal)) => (None, Some(Effort::Low.as_str())),
        Some(Reasoning::Effort(effort)) => (None, Some(effort.as_str())),
    };
    let format = match &req.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(OutFormat {
            kind: "json_schema",
            schema: Json::ObjectSchema(ObjectSchema {
                kind: "object",
                properties: None,
            }),
        }),
        Some(ResponseFormat::JsonSchema { schema, .. }) => Some(OutFormat {
            kind: "json_schema",
            schema: Json::Raw(schema),
        }),
    };
    let output_config =
        (effort.is_some() || format.is_some()).then_some(OutOutputConfig { effort, format });

    let body = OutRequest {
        model,
        max_tokens: req.max_output_tokens.unwrap_or(out.default_max_tokens),
        system,
        messages,
        tools,
        tool_choice,
        stop_sequences: &req.stop,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        thinking,
        output_config,
        metadata: req.user.as_deref().map(|user_id| OutMetadata { user_id }),
        stream: req.stream,
    };
    serde_json::to_vec(&body).map_err(|e| Refused::new(None, e.to_string()))
}

fn thinking_out(kind: &'static str, budget_tokens: Option<u64>) -> OutThinking {
    OutThinking {
        kind,
        budget_tokens,
    }
}

fn text_out(text: &TextBlock) -> OutText<'_> {
    OutText {
        kind: "text",
        text: &text.text,
        cache_control: cache_out(text.cache),
    }
}

fn image_out(source: &ImageSource) -> OutSource<'_> {
    match source {
        ImageSource::Url(url) => OutSource::Url { url },
        ImageSource::Base64 { media_type, data } => OutSource::Base64 { media_type, data },
    }
}

/// One block of a user or assistant turn; `None`: dropped (thinking from another API).
fn block_out(block: &Block) -> Result<Option<OutBlock<'_>>, Refused> {
    Ok(Some(match block {
        Block::ToolResult {
            tool_use_id,
            content,
            is_error,
            cache,
        } => OutBlock::ToolResult {
            tool_use_id,
            content: content
                .iter()
                .map(|b| {
                    leaf_block_out(b).ok_or_else(|| {
                        Refused::new(
                            Some("messages"),
                            "a tool result can only hold text, images and documents",
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            is_error: *is_error,
            cache_control: cache_out(*cache),
        },
        Block::ToolUse {
            id,
            name,
            input,
            cache,
        } => OutBlock::ToolUse {
            id,
            name,
            input: tool_input(input),
            cache_control: cache_out(*cache),
        },
        // A signature is only valid where it was issued; the thinking goes with it (4.5).
        Block::Thinking {
            text,
            signature: Some(signature),
        } if signature.origin == Api::AnthropicMessages => OutBlock::Thinking {
            thinking: text,
            signature: &signature.value,
        },
        Block::Thinking { .. } => return Ok(None),
        Block::RedactedThinking { data } if data.origin == Api::AnthropicMessages => {
            OutBlock::RedactedThinking { data: &data.value }
        }
        Block::RedactedThinking { .. } => return Ok(None),
        leaf => leaf_block_out(leaf)
            .ok_or_else(|| Refused::new(Some("messages"), "this content block cannot be sent"))?,
    }))
}

/// Text, image and document: the blocks a tool result may hold.
fn leaf_block_out(block: &Block) -> Option<OutBlock<'_>> {
    Some(match block {
        Block::Text(text) => OutBlock::Text {
            text: &text.text,
            cache_control: cache_out(text.cache),
        },
        Block::Image { source, cache } => OutBlock::Image {
            source: image_out(source),
            cache_control: cache_out(*cache),
        },
        Block::Document {
            media_type,
            data,
            cache,
        } => OutBlock::Document {
            source: OutSource::Base64 { media_type, data },
            cache_control: cache_out(*cache),
        },
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Answers

#[derive(Deserialize)]
struct WireResponse<'a> {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(borrow, default)]
    content: Vec<WireBlock<'a>>,
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    output_tokens_details: Option<WireOutputDetails>,
}

#[derive(Deserialize)]
struct WireOutputDetails {
    thinking_tokens: Option<u64>,
}

impl WireUsage {
    /// Anthropic's `input_tokens` already excludes both cache kinds (docs/providers.md 5).
    fn canonical(&self) -> Usage {
        Usage {
            input: self.input_tokens,
            cache_read: self.cache_read_input_tokens,
            cache_write: self.cache_creation_input_tokens,
            output: self.output_tokens,
            reasoning: self
                .output_tokens_details
                .as_ref()
                .and_then(|d| d.thinking_tokens),
        }
    }
}

/// The inverse of `StopReason::anthropic`; an unknown word is `Other`.
pub fn stop_reason_in(word: &str) -> StopReason {
    match word {
        "end_turn" => StopReason::EndTurn,
        "max_tokens" => StopReason::MaxTokens,
        "stop_sequence" => StopReason::StopSequence,
        "tool_use" => StopReason::ToolUse,
        "pause_turn" => StopReason::PauseTurn,
        "refusal" => StopReason::Refusal,
        "model_context_window_exceeded" => StopReason::ContextWindow,
        _ => StopReason::Other,
    }
}

/// An Anthropic message (a 2xx body) read into the canonical model. Server-tool blocks are
/// skipped: a translated request never asks for them.
pub fn response_in(body: &[u8]) -> Result<Response, String> {
    let wire: WireResponse = serde_json::from_slice(body)
        .map_err(|e| format!("not an Anthropic message: {}", clip(&e.to_string())))?;
    let mut content = Vec::with_capacity(wire.content.len());
    for block in wire.content {
        let missing = |what: &str| format!("a `{}` block has no `{what}`", clip(&block.kind));
        content.push(match block.kind.as_str() {
            "text" => Block::Text(TextBlock {
                text: block.text.ok_or_else(|| missing("text"))?,
                cache: None,
            }),
            "thinking" => Block::Thinking {
                text: block.thinking.ok_or_else(|| missing("thinking"))?,
                signature: block
                    .signature
                    .filter(|s| !s.is_empty())
                    .map(|value| Signature {
                        origin: Api::AnthropicMessages,
                        value,
                    }),
            },
            "redacted_thinking" => Block::RedactedThinking {
                data: Signature {
                    origin: Api::AnthropicMessages,
                    value: block.data.ok_or_else(|| missing("data"))?,
                },
            },
            "tool_use" => Block::ToolUse {
                id: block.id.ok_or_else(|| missing("id"))?,
                name: block.name.ok_or_else(|| missing("name"))?,
                input: block.input.ok_or_else(|| missing("input"))?.to_owned(),
                cache: None,
            },
            _ => continue,
        });
    }
    Ok(Response {
        id: wire.id,
        model: wire.model,
        content,
        stop: wire
            .stop_reason
            .as_deref()
            .map_or(StopReason::Other, stop_reason_in),
        stop_sequence: wire.stop_sequence,
        usage: wire.usage.canonical(),
    })
}

#[derive(Serialize)]
struct OutResponse<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<OutBlock<'a>>,
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
    usage: OutUsage,
}

#[derive(Serialize)]
struct OutUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

impl From<Usage> for OutUsage {
    fn from(u: Usage) -> Self {
        Self {
            input_tokens: u.input.unwrap_or(0),
            cache_creation_input_tokens: u.cache_write.unwrap_or(0),
            cache_read_input_tokens: u.cache_read.unwrap_or(0),
            output_tokens: u.output.unwrap_or(0),
        }
    }
}

/// Whether a signature of `origin` is Claude's own (Anthropic's API, or Claude on Bedrock).
fn claude_signed(origin: Api) -> bool {
    matches!(origin, Api::AnthropicMessages | Api::BedrockConverse)
}

/// A message for an Anthropic client; `model` is the client's public name.
pub fn response_out(resp: &Response, model: &str) -> Vec<u8> {
    let content = resp
        .content
        .iter()
        .filter_map(|block| match block {
            Block::Text(text) => Some(OutBlock::Text {
                text: &text.text,
                cache_control: None,
            }),
            // Another API's signature must never come back labelled as Anthropic's: the
            // client gets the text with an empty signature. Claude on Bedrock signs as
            // Anthropic does, and Bedrock takes those back from Claude's clients.
            Block::Thinking { text, signature } => Some(OutBlock::Thinking {
                thinking: text,
                signature: signature
                    .as_ref()
                    .filter(|s| claude_signed(s.origin))
                    .map_or("", |s| &s.value),
            }),
            Block::RedactedThinking { data } if claude_signed(data.origin) => {
                Some(OutBlock::RedactedThinking { data: &data.value })
            }
            Block::ToolUse {
                id, name, input, ..
            } => Some(OutBlock::ToolUse {
                id,
                name,
                input: tool_input(input),
                cache_control: None,
            }),
            _ => None,
        })
        .collect();
    let body = OutResponse {
        id: &resp.id,
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason: resp.stop.anthropic(),
        stop_sequence: resp.stop_sequence.as_deref(),
        usage: resp.usage.into(),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Deserialize)]
struct WireErrorBody {
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

/// The status Anthropic answers an error type with (docs `api/errors`); for `error` events,
/// which have none of their own.
fn status_of(error_type: &str) -> u16 {
    match error_type {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    }
}

fn kind_of(status: u16, error_type: &str, message: &str) -> ErrorKind {
    if status == 529 || error_type == "overloaded_error" {
        return ErrorKind::Overloaded;
    }
    match status {
        429 => ErrorKind::RateLimited,
        400 if message.starts_with(PROMPT_TOO_LONG) => ErrorKind::ContextLength,
        401 => ErrorKind::Authentication,
        402 => ErrorKind::Billing,
        403 => ErrorKind::Permission,
        404 => ErrorKind::NotFound,
        413 => ErrorKind::RequestTooLarge,
        504 => ErrorKind::Timeout,
        500..=599 => ErrorKind::Server,
        400..=499 => ErrorKind::InvalidRequest,
        // Not an error status: the type says what it was.
        _ if error_type.is_empty() => ErrorKind::Server,
        _ => kind_of(status_of(error_type), error_type, message),
    }
}

fn api_error(status: u16, error_type: &str, message: Option<&str>) -> ApiError {
    // An empty `message` says nothing either (found by the fuzzer): the client gets words.
    let message = match message.filter(|m| !m.is_empty()) {
        Some(m) => super::clip(m, MAX_UPSTREAM_MESSAGE_BYTES).to_owned(),
        None => format!("the upstream answered {status} without an Anthropic error body"),
    };
    ApiError {
        status,
        kind: kind_of(status, error_type, &message),
        message,
        param: None,
        code: None,
    }
}

/// An Anthropic error body (any status, 529 included) read into the canonical model.
pub fn error_in(status: u16, body: &[u8]) -> ApiError {
    let error = serde_json::from_slice::<WireErrorBody>(body)
        .ok()
        .and_then(|b| b.error);
    match error {
        Some(error) => api_error(
            status,
            error.kind.as_deref().unwrap_or(""),
            error.message.as_deref(),
        ),
        None => api_error(status, "", None),
    }
}

/// Anthropic's `error.type` for a kind (docs/providers.md 6.1).
pub fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest | ErrorKind::ContextLength | ErrorKind::ContentFiltered => {
            "invalid_request_error"
        }
        ErrorKind::Authentication => "authentication_error",
        ErrorKind::Permission => "permission_error",
        ErrorKind::NotFound => "not_found_error",
        ErrorKind::RequestTooLarge => "request_too_large",
        ErrorKind::RateLimited | ErrorKind::QuotaExhausted => "rate_limit_error",
        ErrorKind::Billing => "billing_error",
        ErrorKind::Overloaded => "overloaded_error",
        ErrorKind::Timeout => "timeout_error",
        ErrorKind::Server => "api_error",
    }
}

#[derive(Serialize)]
struct OutErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: OutError<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Serialize)]
struct OutError<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

/// An error body for an Anthropic client.
pub fn error_out(err: &ApiError, request_id: &str) -> Vec<u8> {
    let body = OutErrorBody {
        kind: "error",
        error: OutError {
            kind: error_type(err.kind),
            message: &err.message,
        },
        request_id: Some(request_id),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Streams in

/// Every stream event in one flat shape: which fields matter depends on `type`.
#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    message: Option<WireStartMessage>,
    index: Option<u64>,
    content_block: Option<WireStreamBlock>,
    /// `content_block_delta` and `message_delta` both call theirs `delta`.
    delta: Option<WireDelta>,
    usage: Option<WireUsage>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireStartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Deserialize)]
struct WireStreamBlock {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    thinking: Option<String>,
    data: Option<String>,
    id: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
    partial_json: Option<String>,
    thinking: Option<String>,
    signature: Option<String>,
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
}

/// A block the upstream opened: ours, or `None` for one skipped whole (server-tool blocks).
#[derive(Debug, Clone, Copy)]
struct OpenBlock {
    upstream: u64,
    ours: Option<u32>,
    /// The delta type this block takes (`text_delta`, ...); `None` for a skipped block.
    takes: Option<&'static str>,
}

/// Reads an Anthropic stream (the `data` of each server-sent event; its `type` names the
/// event) into canonical events.
///
/// State is bounded: the blocks still open (at most `MAX_OPEN_BLOCKS`), counters, and the stop
/// reason. Block indexes are renumbered contiguously from 0, so skipped blocks leave no gap.
#[derive(Debug, Default)]
pub struct EventsIn {
    open: Vec<OpenBlock>,
    next_index: u32,
    tool_calls: usize,
    stop: Option<(StopReason, Option<String>)>,
    /// `message_start` came: a second one is a broken stream.
    started: bool,
    /// `message_stop` or an error was passed on: nothing follows.
    done: bool,
}

impl EventsIn {
    pub fn new() -> Self {
        Self::default()
    }

    /// One event's data; appends the canonical events it makes.
    pub fn event(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        let event: WireEvent = serde_json::from_slice(data)
            .map_err(|e| format!("not an Anthropic stream event: {}", clip(&e.to_string())))?;
        if self.done {
            return Ok(());
        }
        match event.kind.as_ref() {
            "message_start" => {
                if self.started {
                    return Err("a second `message_start`".into());
                }
                self.started = true;
                let message = event.message.ok_or("`message_start` without `message`")?;
                let usage = message.usage.canonical();
                // The input side only: the output count here is provisional.
                out.push(Event::MessageStart {
                    id: message.id,
                    usage: Usage {
                        input: usage.input,
                        cache_read: usage.cache_read,
                        cache_write: usage.cache_write,
                        output: None,
                        reasoning: None,
                    },
                });
            }
            "content_block_start" => {
                let upstream = event.index.ok_or("`content_block_start` without `index`")?;
                let block = event
                    .content_block
                    .ok_or("`content_block_start` without `content_block`")?;
                self.block_start(upstream, block, out)?;
            }
            "content_block_delta" => {
                let upstream = event.index.ok_or("`content_block_delta` without `index`")?;
                let Some(index) = self.ours(upstream)? else {
                    return Ok(());
                };
                let Some(delta) = event.delta else {
                    return Err("`content_block_delta` without `delta`".into());
                };
                // A delta must fit its block: text into a tool call, or thinking into text,
                // would reach the client as something the model did not write.
                let takes = self.block(upstream)?.takes;
                let fits = |kind: &str| match kind {
                    "signature_delta" => takes == Some("thinking_delta"),
                    kind => takes == Some(kind),
                };
                if let Some(
                    kind @ ("text_delta" | "input_json_delta" | "thinking_delta"
                    | "signature_delta"),
                ) = delta.kind.as_deref()
                    && !fits(kind)
                {
                    return Err(format!(
                        "a {kind} for block {upstream}, which takes {}",
                        takes.unwrap_or("none")
                    ));
                }
                let delta = match delta.kind.as_deref() {
                    Some("text_delta") => delta.text.map(Delta::Text),
                    Some("input_json_delta") => delta.partial_json.map(Delta::ToolArgs),
                    Some("thinking_delta") => delta.thinking.map(Delta::Thinking),
                    Some("signature_delta") => delta.signature.map(Delta::Signature),
                    // citations_delta and whatever comes later carry nothing we translate.
                    _ => None,
                };
                // Empty fragments (the first `input_json_delta` often is one) say nothing.
                if let Some(delta) = delta.filter(|d| !delta_is_empty(d)) {
                    out.push(Event::BlockDelta { index, delta });
                }
            }
            "content_block_stop" => {
                let upstream = event.index.ok_or("`content_block_stop` without `index`")?;
                let at = self
                    .open
                    .iter()
                    .position(|b| b.upstream == upstream)
                    .ok_or_else(|| {
                        format!("`content_block_stop` for block {upstream}, not open")
                    })?;
                if let Some(index) = self.open.remove(at).ours {
                    out.push(Event::BlockStop { index });
                }
            }
            "message_delta" => {
                // Cumulative: the fields present replace earlier ones, never add to them.
                if let Some(usage) = event.usage {
                    out.push(Event::Usage(usage.canonical()));
                }
                if let Some(delta) = event.delta {
                    if let Some(reason) = delta.stop_reason.as_deref() {
                        self.stop = Some((stop_reason_in(reason), delta.stop_sequence));
                    }
                }
            }
            "message_stop" => {
                // Every started block is stopped before `MessageStop`, even if the upstream
                // forgot one.
                for block in std::mem::take(&mut self.open) {
                    if let Some(index) = block.ours {
                        out.push(Event::BlockStop { index });
                    }
                }
                let (stop, stop_sequence) = self.stop.take().unwrap_or((StopReason::Other, None));
                out.push(Event::MessageStop {
                    stop,
                    stop_sequence,
                });
                self.done = true;
            }
            "error" => {
                let (error_type, message) = match &event.error {
                    Some(e) => (e.kind.as_deref().unwrap_or(""), e.message.as_deref()),
                    None => ("", None),
                };
                out.push(Event::Error(api_error(
                    status_of(error_type),
                    error_type,
                    message,
                )));
                self.done = true;
            }
            // `ping`, and event types added later.
            _ => {}
        }
        Ok(())
    }

    fn block_start(
        &mut self,
        upstream: u64,
        block: WireStreamBlock,
        out: &mut Vec<Event>,
    ) -> Result<(), String> {
        if self.open.iter().any(|b| b.upstream == upstream) {
            return Err(format!("block {upstream} started twice"));
        }
        if self.open.len() >= MAX_OPEN_BLOCKS {
            return Err(format!("more than {MAX_OPEN_BLOCKS} blocks open at once"));
        }
        let (kind, first) = match block.kind.as_str() {
            "text" => (BlockKind::Text, block.text.map(Delta::Text)),
            "thinking" => (BlockKind::Thinking, block.thinking.map(Delta::Thinking)),
            "redacted_thinking" => (
                BlockKind::RedactedThinking {
                    data: block.data.unwrap_or_default(),
                },
                None,
            ),
            "tool_use" => {
                if self.tool_calls >= MAX_STREAM_TOOL_CALLS {
                    out.push(Event::Error(ApiError {
                        status: 502,
                        kind: ErrorKind::Server,
                        message: format!(
                            "the upstream answer called more than {MAX_STREAM_TOOL_CALLS} tools"
                        ),
                        param: None,
                        code: None,
                    }));
                    self.done = true;
                    return Ok(());
                }
                self.tool_calls += 1;
                (
                    BlockKind::ToolUse {
                        id: block.id.unwrap_or_default(),
                        name: block.name.unwrap_or_default(),
                    },
                    None,
                )
            }
            // Server-tool blocks and kinds added later: skipped with their deltas and stop.
            _ => {
                self.open.push(OpenBlock {
                    upstream,
                    ours: None,
                    takes: None,
                });
                return Ok(());
            }
        };
        let takes = match kind {
            BlockKind::Text => "text_delta",
            BlockKind::Thinking => "thinking_delta",
            BlockKind::ToolUse { .. } => "input_json_delta",
            BlockKind::RedactedThinking { .. } => "no delta",
        };
        let index = self.next_index;
        self.next_index = index.saturating_add(1);
        self.open.push(OpenBlock {
            upstream,
            ours: Some(index),
            takes: Some(takes),
        });
        out.push(Event::BlockStart { index, kind });
        if let Some(delta) = first.filter(|d| !delta_is_empty(d)) {
            out.push(Event::BlockDelta { index, delta });
        }
        Ok(())
    }

    /// Our index for an open upstream block; `None` for a skipped one.
    fn ours(&self, upstream: u64) -> Result<Option<u32>, String> {
        self.block(upstream).map(|b| b.ours)
    }

    fn block(&self, upstream: u64) -> Result<&OpenBlock, String> {
        self.open
            .iter()
            .find(|b| b.upstream == upstream)
            .ok_or_else(|| format!("a delta for block {upstream}, which is not open"))
    }

    /// The upstream body ended; appends what closes the message.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.done {
            return;
        }
        self.done = true;
        out.push(Event::Error(ApiError {
            status: 502,
            kind: ErrorKind::Server,
            message: "the upstream stream ended before the message was complete".into(),
            param: None,
            code: None,
        }));
    }
}

fn delta_is_empty(delta: &Delta) -> bool {
    match delta {
        Delta::Text(s) | Delta::ToolArgs(s) | Delta::Thinking(s) | Delta::Signature(s) => {
            s.is_empty()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streams out

/// The `data` of one event; `type` is inside it and names the `event:` line too.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutEvent<'a> {
    MessageStart {
        message: OutStartMessage<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: OutStreamBlock<'a>,
    },
    ContentBlockDelta {
        index: u32,
        delta: OutDelta<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: OutMessageDelta<'a>,
        usage: OutUsage,
    },
    MessageStop,
    Error {
        error: OutError<'a>,
    },
}

impl OutEvent<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::MessageStart { .. } => "message_start",
            Self::ContentBlockStart { .. } => "content_block_start",
            Self::ContentBlockDelta { .. } => "content_block_delta",
            Self::ContentBlockStop { .. } => "content_block_stop",
            Self::MessageDelta { .. } => "message_delta",
            Self::MessageStop => "message_stop",
            Self::Error { .. } => "error",
        }
    }
}

#[derive(Serialize)]
struct OutStartMessage<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: [(); 0],
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: OutUsage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutStreamBlock<'a> {
    Text {
        text: &'static str,
    },
    Thinking {
        thinking: &'static str,
        signature: &'static str,
    },
    RedactedThinking {
        data: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: EmptyObject,
    },
}

// The variant names are the wire's words.
#[allow(clippy::enum_variant_names)]
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutDelta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
    ThinkingDelta { thinking: &'a str },
    SignatureDelta { signature: &'a str },
}

#[derive(Serialize)]
struct OutMessageDelta<'a> {
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
}

/// Writes canonical events as an Anthropic stream (`event:` and `data:` lines).
#[derive(Debug)]
pub struct EventsOut {
    model: String,
    usage: Usage,
    started: bool,
    /// `message_stop` or `error` was written: nothing follows.
    ended: bool,
}

impl EventsOut {
    /// `model`: the client's public name.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            usage: Usage::default(),
            started: false,
            ended: false,
        }
    }

    /// Appends the bytes of the server-sent events `event` makes.
    pub fn event(&mut self, event: &Event, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if !self.started && !matches!(event, Event::MessageStart { .. } | Event::Error(_)) {
            // The SDK builds its message from `message_start`: never write a block before it.
            self.start("", out);
        }
        match event {
            Event::MessageStart { id, usage } => {
                self.usage.merge(*usage);
                if !self.started {
                    self.start(id, out);
                }
            }
            Event::BlockStart { index, kind } => {
                let content_block = match kind {
                    BlockKind::Text => OutStreamBlock::Text { text: "" },
                    BlockKind::Thinking => OutStreamBlock::Thinking {
                        thinking: "",
                        signature: "",
                    },
                    BlockKind::RedactedThinking { data } => {
                        OutStreamBlock::RedactedThinking { data }
                    }
                    BlockKind::ToolUse { id, name } => OutStreamBlock::ToolUse {
                        id,
                        name,
                        input: EmptyObject,
                    },
                };
                write_event(
                    out,
                    &OutEvent::ContentBlockStart {
                        index: *index,
                        content_block,
                    },
                );
            }
            Event::BlockDelta { index, delta } => {
                let delta = match delta {
                    Delta::Text(text) => OutDelta::TextDelta { text },
                    Delta::ToolArgs(partial_json) => OutDelta::InputJsonDelta { partial_json },
                    Delta::Thinking(thinking) => OutDelta::ThinkingDelta { thinking },
                    Delta::Signature(signature) => OutDelta::SignatureDelta { signature },
                };
                write_event(
                    out,
                    &OutEvent::ContentBlockDelta {
                        index: *index,
                        delta,
                    },
                );
            }
            Event::BlockStop { index } => {
                write_event(out, &OutEvent::ContentBlockStop { index: *index });
            }
            Event::Usage(usage) => self.usage.merge(*usage),
            Event::MessageStop {
                stop,
                stop_sequence,
            } => {
                write_event(
                    out,
                    &OutEvent::MessageDelta {
                        delta: OutMessageDelta {
                            stop_reason: stop.anthropic(),
                            stop_sequence: stop_sequence.as_deref(),
                        },
                        usage: self.usage.into(),
                    },
                );
                write_event(out, &OutEvent::MessageStop);
                self.ended = true;
            }
            Event::Error(err) => {
                write_event(
                    out,
                    &OutEvent::Error {
                        error: OutError {
                            kind: error_type(err.kind),
                            message: &err.message,
                        },
                    },
                );
                self.ended = true;
            }
        }
    }

    fn start(&mut self, id: &str, out: &mut Vec<u8>) {
        self.started = true;
        write_event(
            out,
            &OutEvent::MessageStart {
                message: OutStartMessage {
                    id,
                    kind: "message",
                    role: "assistant",
                    model: &self.model,
                    content: [],
                    stop_reason: None,
                    stop_sequence: None,
                    usage: self.usage.into(),
                },
            },
        );
    }

    /// The stream is over: appends what is still owed.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.ended = true;
        write_event(
            out,
            &OutEvent::Error {
                error: OutError {
                    kind: "api_error",
                    message: "the upstream stream ended before the message was complete",
                },
            },
        );
    }
}

fn write_event(out: &mut Vec<u8>, event: &OutEvent) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.name().as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Writing into a Vec cannot fail, and these types always serialise.
    let _ = serde_json::to_writer(&mut *out, event);
    out.extend_from_slice(b"\n\n");
}

// ---------------------------------------------------------------------------------------------

fn clip(s: &str) -> &str {
    super::clip(s, MAX_PARSE_ERROR_BYTES)
}

#[cfg(test)]
mod tests {
    //! Fixtures: `tests/fixtures/providers/anthropic/` (sources in its README). Golden files:
    //! `snapshots/*anthropic*`, one per fixture for the globbed tests, so a new case is a new
    //! file. Each golden was read and checked against docs/providers.md 3.1 and 4.

    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use super::*;

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers/anthropic")
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The `data` of each event of an SSE recording; `event:` lines and comments dropped.
    fn sse_data(text: &str) -> Vec<String> {
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

    fn events_in(sse: &[u8]) -> Vec<Event> {
        let mut stream = EventsIn::new();
        let mut out = Vec::new();
        for data in sse_data(std::str::from_utf8(sse).expect("utf-8")) {
            stream.event(data.as_bytes(), &mut out).expect(&data);
        }
        stream.finish(&mut out);
        out
    }

    fn events_out(events: &[Event]) -> String {
        let mut stream = EventsOut::new("public-model");
        let mut out = Vec::new();
        for event in events {
            stream.event(event, &mut out);
        }
        stream.finish(&mut out);
        String::from_utf8(out).expect("utf-8")
    }

    fn pretty(body: &[u8]) -> String {
        let value: serde_json::Value = serde_json::from_slice(body).expect("valid JSON");
        serde_json::to_string_pretty(&value).expect("serialises")
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("valid JSON")
    }

    /// A streamed answer as a client accumulates it.
    #[derive(Debug, Default, PartialEq)]
    struct Accumulated {
        /// Per block: its kind, and its text, thinking or arguments.
        blocks: Vec<(BlockKind, String)>,
        signatures: Vec<String>,
        usage: Usage,
        stop: Option<StopReason>,
        error: Option<ApiError>,
    }

    fn accumulate(events: &[Event]) -> Accumulated {
        let mut acc = Accumulated::default();
        for event in events {
            match event {
                Event::MessageStart { usage, .. } => acc.usage.merge(*usage),
                Event::BlockStart { index, kind } => {
                    assert_eq!(*index as usize, acc.blocks.len(), "indexes contiguous");
                    acc.blocks.push((kind.clone(), String::new()));
                }
                Event::BlockDelta { index, delta } => {
                    let block = &mut acc.blocks[*index as usize].1;
                    match delta {
                        Delta::Text(s) | Delta::ToolArgs(s) | Delta::Thinking(s) => {
                            block.push_str(s)
                        }
                        Delta::Signature(s) => acc.signatures.push(s.clone()),
                    }
                }
                Event::BlockStop { .. } => {}
                Event::Usage(usage) => acc.usage.merge(*usage),
                Event::MessageStop { stop, .. } => acc.stop = Some(*stop),
                Event::Error(e) => acc.error = Some(e.clone()),
            }
        }
        acc
    }

    /// The same answer, from a whole message.
    fn accumulate_response(resp: &Response) -> Accumulated {
        let mut acc = Accumulated {
            usage: resp.usage,
            stop: Some(resp.stop),
            ..Accumulated::default()
        };
        for block in &resp.content {
            acc.blocks.push(match block {
                Block::Text(t) => (BlockKind::Text, t.text.clone()),
                Block::Thinking { text, signature } => {
                    acc.signatures
                        .extend(signature.iter().map(|s| s.value.clone()));
                    (BlockKind::Thinking, text.clone())
                }
                Block::RedactedThinking { data } => (
                    BlockKind::RedactedThinking {
                        data: data.value.clone(),
                    },
                    String::new(),
                ),
                Block::ToolUse {
                    id, name, input, ..
                } => {
                    // Compare arguments as values: the stream's fragments keep the model's
                    // spacing, the recorded message is the SDK's re-serialisation.
                    let value: serde_json::Value =
                        serde_json::from_str(input.get()).expect("object");
                    (
                        BlockKind::ToolUse {
                            id: id.clone(),
                            name: name.clone(),
                        },
                        value.to_string(),
                    )
                }
                other => panic!("unexpected block {other:?}"),
            });
        }
        acc
    }

    fn stream_fixtures() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir())
            .expect("fixtures")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("stream-") && n.ends_with(".sse"))
            .collect();
        names.sort();
        assert!(names.len() >= 8, "stream fixtures found: {names:?}");
        names
    }

    // -- streams in ---------------------------------------------------------------------------

    #[test]
    fn streams_in() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "stream-*.sse",
            |path| {
                let sse = std::fs::read(path).expect("fixture");
                insta::assert_debug_snapshot!(events_in(&sse));
            }
        );
    }

    #[test]
    fn every_stream_is_well_formed() {
        for name in stream_fixtures() {
            let events = events_in(&fixture(&name));
            assert!(
                matches!(events.first(), Some(Event::MessageStart { .. })),
                "{name}: starts with MessageStart"
            );
            let mut open = Vec::new();
            let mut next = 0;
            for (i, event) in events.iter().enumerate() {
                match event {
                    Event::BlockStart { index, .. } => {
                        assert_eq!(*index, next, "{name}: contiguous indexes");
                        next += 1;
                        open.push(*index);
                    }
                    Event::BlockDelta { index, .. } => {
                        assert!(open.contains(index), "{name}: delta on an open block")
                    }
                    Event::BlockStop { index } => {
                        assert!(open.contains(index), "{name}: stop of an open block");
                        open.retain(|i| i != index);
                    }
                    Event::MessageStop { .. } => {
                        assert!(open.is_empty(), "{name}: every BlockStart has a BlockStop");
                        assert_eq!(i + 1, events.len(), "{name}: MessageStop is last");
                    }
                    Event::Error(_) => assert_eq!(i + 1, events.len(), "{name}: Error is last"),
                    Event::MessageStart { .. } => assert_eq!(i, 0, "{name}: one MessageStart"),
                    Event::Usage(_) => {}
                }
            }
            assert!(
                matches!(
                    events.last(),
                    Some(Event::MessageStop { .. } | Event::Error(_))
                ),
                "{name}: ends with MessageStop or Error"
            );
        }
    }

    #[test]
    fn streamed_answer_equals_the_same_answer_as_json() {
        let mut compared = 0;
        for name in stream_fixtures() {
            let json = dir().join(name.replace(".sse", ".json"));
            let Ok(body) = std::fs::read(&json) else {
                continue;
            };
            let streamed = accumulate(&events_in(&fixture(&name)));
            let whole = accumulate_response(&response_in(&body).expect("message"));
            let mut streamed_args = streamed;
            for (kind, text) in &mut streamed_args.blocks {
                if matches!(kind, BlockKind::ToolUse { .. }) {
                    let value: serde_json::Value = serde_json::from_str(text).expect("args");
                    *text = value.to_string();
                }
            }
            assert_eq!(streamed_args, whole, "{name}");
            compared += 1;
        }
        assert!(compared >= 4, "only {compared} streams had a JSON twin");
    }

    #[test]
    fn older_message_delta_keeps_input_from_message_start() {
        // basic_response: message_delta carries output_tokens only.
        let usage = accumulate(&events_in(&fixture("stream-text-basic.sse"))).usage;
        assert_eq!(usage.input, Some(11));
        assert_eq!(
            usage.output,
            Some(6),
            "message_delta replaces the provisional 1"
        );
        assert_eq!(usage.processed(), 17);
    }

    #[test]
    fn newer_message_delta_repeating_input_is_not_counted_twice() {
        let events = events_in(&fixture("stream-json-newer.sse"));
        let usage = accumulate(&events).usage;
        assert_eq!(usage.input, Some(135));
        assert_eq!(usage.cache_read, Some(0));
        assert_eq!(usage.cache_write, Some(0));
        assert_eq!(usage.output, Some(10));
        assert_eq!(usage.prompt(), 135, "input counted once");
        let repeated = events.iter().find_map(|e| match e {
            Event::Usage(u) => Some(*u),
            _ => None,
        });
        assert_eq!(
            repeated.and_then(|u| u.input),
            Some(135),
            "the Usage event carries the repeated field, to be merged, not added"
        );
    }

    #[test]
    fn thinking_stream_keeps_signature_and_thinking_tokens() {
        let acc = accumulate(&events_in(&fixture("stream-thinking.sse")));
        assert_eq!(acc.blocks[0].0, BlockKind::Thinking);
        assert!(acc.blocks[0].1.starts_with("Simple educational question"));
        assert_eq!(
            acc.signatures,
            ["c3ludGhldGljLXNpZ25hdHVyZS1maXh0dXJlLWEtbm90LWEtcmVhbC1zaWduYXR1cmU="]
        );
        assert_eq!(acc.usage.reasoning, Some(67));
        assert_eq!(acc.usage.output, Some(106));
        assert_eq!(acc.stop, Some(StopReason::Refusal));
    }

    #[test]
    fn tool_arguments_stream_without_empty_fragments() {
        let events = events_in(&fixture("stream-tool-use.sse"));
        let fragments: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::BlockDelta {
                    index: 1,
                    delta: Delta::ToolArgs(s),
                } => Some(s.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(fragments.len(), 4, "the empty first fragment is skipped");
        assert_eq!(fragments.concat(), r#"{"location": "Paris"}"#);
    }

    #[test]
    fn server_tool_blocks_are_skipped_and_indexes_renumbered() {
        let events = events_in(&fixture("stream-server-tool.sse"));
        let starts: Vec<(u32, &BlockKind)> = events
            .iter()
            .filter_map(|e| match e {
                Event::BlockStart { index, kind } => Some((*index, kind)),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 2);
        assert_eq!(
            starts[0],
            (0, &BlockKind::Text),
            "upstream index 2 is ours 0"
        );
        assert!(matches!(starts[1], (1, BlockKind::ToolUse { .. })));
        let acc = accumulate(&events);
        assert_eq!(acc.blocks[0].1, "It is sunny.", "citations_delta ignored");
        assert_eq!(acc.usage.prompt(), 3900);
    }

    #[test]
    fn error_event_mid_stream_is_the_last_event() {
        let events = events_in(&fixture("stream-error-overloaded.sse"));
        let Some(Event::Error(err)) = events.last() else {
            panic!("ends with an error: {events:?}");
        };
        assert_eq!(err.kind, ErrorKind::Overloaded);
        assert_eq!(err.status, 529);
        assert_eq!(err.message, "Overloaded");
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Error(_)))
                .count(),
            1,
            "finish() adds nothing after an error"
        );
    }

    #[test]
    fn stream_cut_short_ends_with_a_server_error() {
        let events = events_in(&fixture("stream-truncated.sse"));
        let Some(Event::Error(err)) = events.last() else {
            panic!("ends with an error: {events:?}");
        };
        assert_eq!(err.kind, ErrorKind::Server);
        assert!(err.message.contains("ended before"));
        // And a complete stream gets nothing from finish().
        let complete = events_in(&fixture("stream-text-basic.sse"));
        assert!(matches!(complete.last(), Some(Event::MessageStop { .. })));
    }

    #[test]
    fn tool_calls_past_the_cap_end_the_stream() {
        let mut stream = EventsIn::new();
        let mut out = Vec::new();
        let start = br#"{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":1,"output_tokens":1}}}"#;
        stream.event(start, &mut out).expect("start");
        for i in 0..=MAX_STREAM_TOOL_CALLS {
            let open = format!(
                r#"{{"type":"content_block_start","index":{i},"content_block":{{"type":"tool_use","id":"t{i}","name":"f","input":{{}}}}}}"#
            );
            let close = format!(r#"{{"type":"content_block_stop","index":{i}}}"#);
            stream.event(open.as_bytes(), &mut out).expect("open");
            stream.event(close.as_bytes(), &mut out).expect("close");
        }
        stream.finish(&mut out);
        let starts = out
            .iter()
            .filter(|e| matches!(e, Event::BlockStart { .. }))
            .count();
        assert_eq!(starts, MAX_STREAM_TOOL_CALLS);
        assert!(matches!(out.last(), Some(Event::Error(e)) if e.kind == ErrorKind::Server));
        assert_eq!(stream.open.len(), 0, "state stays bounded");
    }

    #[test]
    fn stream_protocol_errors_are_errors() {
        let mut stream = EventsIn::new();
        let mut out = Vec::new();
        assert!(stream.event(b"not json", &mut out).is_err());
        assert!(
            stream
                .event(
                    br#"{"type":"content_block_delta","index":7,"delta":{"type":"text_delta","text":"x"}}"#,
                    &mut out
                )
                .is_err(),
            "a delta for a block never started"
        );
        assert!(stream.event(br#"{"type":"ping"}"#, &mut out).is_ok());
        assert!(
            stream
                .event(br#"{"type":"some_new_event"}"#, &mut out)
                .is_ok()
        );
        assert!(out.is_empty());
    }

    // -- streams out --------------------------------------------------------------------------

    #[test]
    fn streams_out() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "stream-*.sse",
            |path| {
                let sse = std::fs::read(path).expect("fixture");
                insta::assert_snapshot!(events_out(&events_in(&sse)));
            }
        );
    }

    #[test]
    fn streams_out_read_back_to_the_same_answer() {
        for name in stream_fixtures() {
            let events = events_in(&fixture(&name));
            let written = events_out(&events);
            for chunk in written.split("\n\n").filter(|c| !c.is_empty()) {
                let (event_line, data_line) = chunk.split_once('\n').expect("two lines");
                let event = event_line.strip_prefix("event: ").expect("event line");
                let data = data_line.strip_prefix("data: ").expect("data line");
                let value: serde_json::Value = serde_json::from_str(data).expect("JSON data");
                assert_eq!(value["type"], event, "{name}: `type` names the event");
            }
            let again = events_in(written.as_bytes());
            let (a, b) = (accumulate(&events), accumulate(&again));
            assert_eq!(a.blocks, b.blocks, "{name}");
            assert_eq!(a.signatures, b.signatures, "{name}");
            assert_eq!(a.stop, b.stop, "{name}");
            assert_eq!(a.usage.prompt(), b.usage.prompt(), "{name}");
            assert_eq!(a.usage.output, b.usage.output, "{name}");
            assert_eq!(a.error.map(|e| e.kind), b.error.map(|e| e.kind), "{name}");
        }
    }

    #[test]
    fn stream_out_owes_an_error_when_cut_short() {
        let mut stream = EventsOut::new("m");
        let mut out = Vec::new();
        stream.event(
            &Event::MessageStart {
                id: "msg_1".into(),
                usage: Usage::default(),
            },
            &mut out,
        );
        stream.finish(&mut out);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.ends_with(
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"the upstream stream ended before the message was complete\"}}\n\n"
        ));
        let mut out = Vec::new();
        stream.finish(&mut out);
        assert!(out.is_empty(), "owed once");
    }

    #[test]
    fn stream_out_without_message_start_still_starts_with_one() {
        let text = events_out(&[
            Event::BlockStart {
                index: 0,
                kind: BlockKind::Text,
            },
            Event::BlockDelta {
                index: 0,
                delta: Delta::Text("hi".into()),
            },
            Event::BlockStop { index: 0 },
            Event::Usage(Usage {
                input: Some(3),
                output: Some(1),
                ..Usage::default()
            }),
            Event::MessageStop {
                stop: StopReason::EndTurn,
                stop_sequence: None,
            },
        ]);
        assert!(text.starts_with("event: message_start\n"));
        assert!(text.contains(r#""usage":{"input_tokens":3,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}"#));
        assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }

    // -- answers ------------------------------------------------------------------------------

    #[test]
    fn responses_in() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "message-*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                insta::assert_debug_snapshot!(response_in(&body));
            }
        );
    }

    #[test]
    fn responses_out() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "message-*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                let resp = response_in(&body).expect("message");
                insta::assert_snapshot!(pretty(&response_out(&resp, "public-model")));
            }
        );
    }

    #[test]
    fn cache_tokens_are_not_input_tokens() {
        let resp = response_in(&fixture("message-cache-usage.json")).expect("message");
        assert_eq!(resp.usage.input, Some(21));
        assert_eq!(resp.usage.cache_read, Some(4096));
        assert_eq!(resp.usage.cache_write, Some(188086));
        assert_eq!(resp.usage.prompt(), 21 + 4096 + 188086);
        assert_eq!(resp.stop, StopReason::StopSequence);
        assert_eq!(resp.stop_sequence.as_deref(), Some("###"));
        let out: serde_json::Value =
            serde_json::from_slice(&response_out(&resp, "m")).expect("JSON");
        assert_eq!(out["usage"]["input_tokens"], 21, "never the prompt total");
        assert_eq!(out["usage"]["cache_read_input_tokens"], 4096);
        assert_eq!(out["usage"]["cache_creation_input_tokens"], 188086);
    }

    #[test]
    fn thinking_tokens_are_reasoning_inside_output() {
        let resp = response_in(&fixture("message-thinking.json")).expect("message");
        assert_eq!(resp.usage.output, Some(871));
        assert_eq!(resp.usage.reasoning, Some(812));
        assert_eq!(
            resp.usage.processed(),
            52 + 871,
            "reasoning never added again"
        );
    }

    #[test]
    fn tool_input_bytes_pass_unchanged() {
        let body = br#"{"id":"m","type":"message","role":"assistant","model":"x","content":[{"type":"tool_use","id":"t","name":"f","input":{"b": 1,  "a":[2 ]}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":2}}"#;
        let resp = response_in(body).expect("message");
        let out = String::from_utf8(response_out(&resp, "m")).expect("utf-8");
        assert!(out.contains(r#""input":{"b": 1,  "a":[2 ]}"#), "{out}");
    }

    #[test]
    fn foreign_signatures_never_reach_an_anthropic_client() {
        let resp = Response {
            id: "chatcmpl-1".into(),
            model: "gpt".into(),
            content: vec![
                Block::Thinking {
                    text: "reasoning".into(),
                    signature: Some(Signature {
                        origin: Api::OpenAiChat,
                        value: "opaque".into(),
                    }),
                },
                Block::RedactedThinking {
                    data: Signature {
                        origin: Api::OpenAiChat,
                        value: "opaque".into(),
                    },
                },
                Block::ToolUse {
                    id: "call_1".into(),
                    name: "f".into(),
                    input: raw(r#""not an object""#),
                    cache: None,
                },
            ],
            stop: StopReason::ToolUse,
            stop_sequence: None,
            usage: Usage::default(),
        };
        let out = String::from_utf8(response_out(&resp, "m")).expect("utf-8");
        assert!(!out.contains("opaque"), "{out}");
        assert!(out.contains(r#""signature":"""#));
        assert!(out.contains(r#""input":{}"#));
    }

    #[test]
    fn stop_reasons_read_back() {
        for stop in [
            StopReason::EndTurn,
            StopReason::MaxTokens,
            StopReason::StopSequence,
            StopReason::ToolUse,
            StopReason::Refusal,
            StopReason::ContextWindow,
            StopReason::PauseTurn,
        ] {
            assert_eq!(stop_reason_in(stop.anthropic()), stop);
        }
        assert_eq!(stop_reason_in("something_new"), StopReason::Other);
    }

    // -- errors -------------------------------------------------------------------------------

    #[test]
    fn errors_in() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "error-*",
            |path| {
                let name = path.file_name().and_then(|n| n.to_str()).expect("name");
                let status: u16 = name[6..9].parse().expect("error-<status>-...");
                let body = std::fs::read(path).expect("fixture");
                insta::assert_debug_snapshot!(error_in(status, &body));
            }
        );
    }

    /// Found by the fuzzer: an empty message (beside a field of invalid UTF-8, which serde
    /// skips unread) gave the client an error without words.
    #[test]
    fn an_empty_message_is_no_message() {
        let body = b"{\"error\":{\"message\":\"\",\"code\":\"rate\xf3\xf3limited\"}}";
        let e = error_in(2365, body);
        assert_eq!(e.status, 2365);
        assert!(!e.message.is_empty(), "{e:?}");
        let e = error_in(
            400,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":""}}"#,
        );
        assert!(e.message.contains("400"), "{e:?}");
    }

    #[test]
    fn error_kinds() {
        let body = |t: &str, m: &str| {
            format!(r#"{{"type":"error","error":{{"type":"{t}","message":"{m}"}}}}"#)
        };
        let cases = [
            (529, "overloaded_error", "Overloaded", ErrorKind::Overloaded),
            (500, "overloaded_error", "x", ErrorKind::Overloaded),
            (429, "rate_limit_error", "x", ErrorKind::RateLimited),
            (
                400,
                "invalid_request_error",
                "prompt is too long: 208310 tokens > 200000 maximum",
                ErrorKind::ContextLength,
            ),
            (400, "invalid_request_error", "x", ErrorKind::InvalidRequest),
            (401, "authentication_error", "x", ErrorKind::Authentication),
            (402, "billing_error", "x", ErrorKind::Billing),
            (403, "permission_error", "x", ErrorKind::Permission),
            (404, "not_found_error", "x", ErrorKind::NotFound),
            (413, "request_too_large", "x", ErrorKind::RequestTooLarge),
            (504, "timeout_error", "x", ErrorKind::Timeout),
            (500, "api_error", "x", ErrorKind::Server),
            (503, "api_error", "x", ErrorKind::Server),
            (422, "invalid_request_error", "x", ErrorKind::InvalidRequest),
        ];
        for (status, t, m, kind) in cases {
            let err = error_in(status, body(t, m).as_bytes());
            assert_eq!(err.kind, kind, "{status} {t}");
            assert_eq!(err.status, status);
            assert_eq!(err.message, m);
        }
        assert_eq!(error_in(502, b"").kind, ErrorKind::Server);
        assert_eq!(error_in(418, b"{}").kind, ErrorKind::InvalidRequest);
    }

    #[test]
    fn error_messages_are_clipped_and_never_copied_from_non_json() {
        let long = "é".repeat(5000);
        let err = error_in(
            500,
            format!(r#"{{"type":"error","error":{{"type":"api_error","message":"{long}"}}}}"#)
                .as_bytes(),
        );
        assert!(err.message.len() <= MAX_UPSTREAM_MESSAGE_BYTES);
        assert!(err.message.len() > MAX_UPSTREAM_MESSAGE_BYTES - 4);
        let err = error_in(502, &fixture("error-502-not-json.txt"));
        assert!(!err.message.contains("cloudflare"), "{}", err.message);
        assert_eq!(err.kind, ErrorKind::Server);
    }

    #[test]
    fn error_out_names_the_type_and_request() {
        let cases = [
            (ErrorKind::InvalidRequest, "invalid_request_error"),
            (ErrorKind::ContextLength, "invalid_request_error"),
            (ErrorKind::ContentFiltered, "invalid_request_error"),
            (ErrorKind::Authentication, "authentication_error"),
            (ErrorKind::Permission, "permission_error"),
            (ErrorKind::NotFound, "not_found_error"),
            (ErrorKind::RequestTooLarge, "request_too_large"),
            (ErrorKind::RateLimited, "rate_limit_error"),
            (ErrorKind::QuotaExhausted, "rate_limit_error"),
            (ErrorKind::Billing, "billing_error"),
            (ErrorKind::Overloaded, "overloaded_error"),
            (ErrorKind::Timeout, "timeout_error"),
            (ErrorKind::Server, "api_error"),
        ];
        for (kind, word) in cases {
            let err = ApiError {
                status: 400,
                kind,
                message: "m \"quoted\"".into(),
                param: None,
                code: None,
            };
            let body = error_out(&err, "req_1");
            let expected = format!(
                r#"{{"type":"error","error":{{"type":"{word}","message":"m \"quoted\""}},"request_id":"req_1"}}"#
            );
            assert_eq!(String::from_utf8(body).expect("utf-8"), expected);
        }
        // And what error_out writes, error_in reads back to the same kind.
        let err = error_in(529, &error_out(&error_in(529, b"{}"), "r"));
        assert_eq!(err.kind, ErrorKind::Overloaded);
    }

    // -- requests in --------------------------------------------------------------------------

    #[test]
    fn requests_in() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "request-*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                insta::assert_debug_snapshot!(request_in(&body));
            }
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let param = |name: &str| request_in(&fixture(name)).err().and_then(|r| r.param);
        assert_eq!(param("request-server-tool.json"), Some("tools"));
        assert_eq!(param("request-max-tokens-zero.json"), Some("max_tokens"));
        assert_eq!(param("request-wrong-type.json"), Some("temperature"));
        let refused = |body: &str| request_in(body.as_bytes()).err().map(|r| r.param);
        assert_eq!(refused("{"), Some(None));
        assert_eq!(refused("[]"), Some(None));
        assert_eq!(
            refused(r#"{"model":"m","messages":[]}"#),
            Some(Some("max_tokens"))
        );
        assert_eq!(
            refused(r#"{"model":"m","max_tokens":1,"messages":[{"role":"tool","content":"x"}]}"#),
            Some(Some("messages"))
        );
        assert_eq!(
            refused(
                r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/tiff","data":"x"}}]}]}"#
            ),
            Some(Some("messages"))
        );
        assert_eq!(
            refused(r#"{"model":"m","max_tokens":1,"messages":[],"thinking":{"type":"enabled"}}"#),
            Some(Some("thinking"))
        );
    }

    #[test]
    fn request_in_keeps_what_matters() {
        let req = request_in(&fixture("request-tools-thinking.json")).expect("request");
        assert_eq!(req.parallel_tool_calls, Some(false));
        assert_eq!(req.tool_choice, Some(ToolChoice::Any));
        assert_eq!(req.reasoning, Some(Reasoning::Budget(10000)));
        assert_eq!(req.top_k, Some(40));
        assert_eq!(req.ignored, ["service_tier", "inference_geo"]);
        assert_eq!(
            req.user.as_deref(),
            Some("13803d75-b4b5-4c3e-b2a2-6f21399b021b")
        );
        let Block::ToolUse { input, .. } = &req.messages[1].content[3] else {
            panic!("tool use");
        };
        assert_eq!(
            input.get(),
            r#"{"location": "San Francisco, CA",  "unit": "c"}"#,
            "bytes unchanged"
        );
        let Block::Thinking { signature, .. } = &req.messages[1].content[0] else {
            panic!("thinking");
        };
        assert_eq!(
            signature.as_ref().map(|s| s.origin),
            Some(Api::AnthropicMessages)
        );
    }

    #[test]
    fn anthropic_requests_survive_a_round_trip() {
        for name in [
            "request-tools-thinking.json",
            "request-structured-output-stream.json",
            "request-thinking-disabled-effort.json",
        ] {
            let first = request_in(&fixture(name)).expect("request");
            let body = request_out(
                &first,
                &first.model,
                Out {
                    default_max_tokens: 1,
                },
            )
            .expect("out");
            let second = request_in(&body).expect("read back");
            assert_eq!(
                format!("{:?}", first.system),
                format!("{:?}", second.system)
            );
            assert_eq!(
                format!("{:?}", first.messages),
                format!("{:?}", second.messages),
                "{name}"
            );
            assert_eq!(format!("{:?}", first.tools), format!("{:?}", second.tools));
            if !first.tools.is_empty() {
                // Without tools there is nothing to choose from: no `tool_choice` is sent.
                assert_eq!(first.tool_choice, second.tool_choice, "{name}");
            }
            assert_eq!(first.parallel_tool_calls, second.parallel_tool_calls);
            assert_eq!(first.reasoning, second.reasoning, "{name}");
            assert_eq!(first.max_output_tokens, second.max_output_tokens);
            assert_eq!(
                format!("{:?}", first.response_format),
                format!("{:?}", second.response_format)
            );
            assert_eq!(first.stop, second.stop);
            assert_eq!(first.user, second.user);
            assert_eq!(first.stream, second.stream);
        }
    }

    // -- requests out -------------------------------------------------------------------------

    fn text(s: &str) -> Block {
        Block::Text(TextBlock {
            text: s.into(),
            cache: None,
        })
    }

    fn message(role: Role, content: Vec<Block>) -> Message {
        Message { role, content }
    }

    fn tool_use(id: &str, input: &str) -> Block {
        Block::ToolUse {
            id: id.into(),
            name: "get_weather".into(),
            input: raw(input),
            cache: None,
        }
    }

    fn tool_result(id: &str, out: &str) -> Block {
        Block::ToolResult {
            tool_use_id: id.into(),
            content: vec![text(out)],
            is_error: false,
            cache: None,
        }
    }

    fn weather_tool() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Get the weather".into()),
            input_schema: Some(raw(
                r#"{"type": "object", "properties": {"location": {"type": "string"}}}"#,
            )),
            strict: Some(true),
            cache: None,
        }
    }

    fn out_json(req: &Request) -> String {
        let body = request_out(
            req,
            "claude-upstream",
            Out {
                default_max_tokens: 1024,
            },
        )
        .expect("translated");
        pretty(&body)
    }

    #[test]
    fn request_out_hoists_system_messages() {
        let req = Request {
            model: "public".into(),
            system: vec![TextBlock {
                text: "You are terse.".into(),
                cache: None,
            }],
            messages: vec![
                message(Role::User, vec![text("Hi")]),
                message(Role::System, vec![text("From now on, answer in French.")]),
                message(Role::User, vec![text("What is rain?")]),
                message(Role::Assistant, vec![text("La pluie...")]),
            ],
            max_output_tokens: Some(200),
            ..Request::default()
        };
        insta::assert_snapshot!(out_json(&req));
    }

    #[test]
    fn request_out_parallel_tool_turn() {
        let req = Request {
            model: "public".into(),
            messages: vec![
                message(Role::User, vec![text("Weather in SF and Paris?")]),
                message(
                    Role::Assistant,
                    vec![
                        text("Looking both up."),
                        tool_use("call_1", r#"{"location":"San Francisco"}"#),
                        tool_use("call_2", r#"{"location": "Paris"}"#),
                    ],
                ),
                // OpenAI's shape: one tool message each, then the user's next words.
                message(Role::User, vec![tool_result("call_1", "15C")]),
                message(Role::User, vec![text("And tomorrow?")]),
                message(Role::User, vec![tool_result("call_2", "18C")]),
            ],
            tools: vec![weather_tool()],
            parallel_tool_calls: Some(false),
            stop: vec!["###".into()],
            temperature: Some(0.2),
            top_p: Some(0.9),
            user: Some("user-42".into()),
            stream: true,
            ..Request::default()
        };
        let json = out_json(&req);
        insta::assert_snapshot!(json);
        let body = request_out(
            &req,
            "u",
            Out {
                default_max_tokens: 1,
            },
        )
        .expect("body");
        let body = String::from_utf8(body).expect("utf-8");
        assert!(
            body.contains(r#""input":{"location": "Paris"}"#),
            "raw bytes"
        );
        assert!(body.contains(r#""tool_choice":{"type":"auto","disable_parallel_tool_use":true}"#));
    }

    #[test]
    fn request_out_images_and_documents() {
        let req = Request {
            model: "public".into(),
            messages: vec![message(
                Role::User,
                vec![
                    text("Compare these."),
                    Block::Image {
                        source: ImageSource::Url("https://example.com/a.png".into()),
                        cache: None,
                    },
                    Block::Image {
                        source: ImageSource::Base64 {
                            media_type: "image/jpeg".into(),
                            data: "/9j/4AAQSkZJRg==".into(),
                        },
                        cache: None,
                    },
                    Block::Document {
                        media_type: "application/pdf".into(),
                        data: "JVBERi0xLjcK".into(),
                        cache: None,
                    },
                ],
            )],
            tool_choice: Some(ToolChoice::Tool("get_weather".into())),
            tools: vec![Tool {
                input_schema: None,
                strict: None,
                description: None,
                ..weather_tool()
            }],
            ..Request::default()
        };
        insta::assert_snapshot!(out_json(&req));
    }

    #[test]
    fn request_out_thinking_across_a_tool_turn() {
        let anthropic = |v: &str| Signature {
            origin: Api::AnthropicMessages,
            value: v.into(),
        };
        let openai = |v: &str| Signature {
            origin: Api::OpenAiChat,
            value: v.into(),
        };
        let req = Request {
            model: "public".into(),
            messages: vec![
                message(Role::User, vec![text("Weather in Paris?")]),
                message(
                    Role::Assistant,
                    vec![
                        Block::Thinking {
                            text: "I should call the tool.".into(),
                            signature: Some(anthropic("EqQBCgIYAhIM1gbcDa9GJwZA2b3h")),
                        },
                        Block::RedactedThinking {
                            data: anthropic("EmwKAhgBEgy3va3pzix"),
                        },
                        tool_use("toolu_1", r#"{"location":"Paris"}"#),
                    ],
                ),
                message(Role::User, vec![tool_result("toolu_1", "18C")]),
                // From another API: dropped with their text.
                message(
                    Role::Assistant,
                    vec![
                        Block::Thinking {
                            text: "foreign reasoning".into(),
                            signature: Some(openai("gAAAAA-foreign")),
                        },
                        Block::Thinking {
                            text: "unsigned reasoning".into(),
                            signature: None,
                        },
                        Block::RedactedThinking {
                            data: openai("gAAAAA-foreign-redacted"),
                        },
                        text("It is 18C."),
                    ],
                ),
                message(
                    Role::Assistant,
                    vec![Block::Thinking {
                        text: "only foreign thinking".into(),
                        signature: Some(openai("x")),
                    }],
                ),
                message(Role::User, vec![text("Thanks")]),
            ],
            tools: vec![weather_tool()],
            tool_choice: Some(ToolChoice::Any),
            reasoning: Some(Reasoning::Budget(2048)),
            max_output_tokens: Some(4096),
            ..Request::default()
        };
        let json = out_json(&req);
        assert!(!json.contains("foreign"), "{json}");
        assert!(!json.contains("unsigned"), "{json}");
        insta::assert_snapshot!(json);
    }

    #[test]
    fn request_out_json_schema_and_reasoning() {
        let req = Request {
            model: "public".into(),
            messages: vec![message(Role::User, vec![text("Extract the order ids.")])],
            response_format: Some(ResponseFormat::JsonSchema {
                name: Some("orders".into()),
                schema: raw(r#"{"type":"array","items":{"type":"integer"}}"#),
                strict: Some(true),
            }),
            reasoning: Some(Reasoning::Effort(Effort::XHigh)),
            ..Request::default()
        };
        insta::assert_snapshot!(out_json(&req));
        let req = Request {
            response_format: Some(ResponseFormat::JsonObject),
            reasoning: Some(Reasoning::Adaptive),
            ..req
        };
        insta::assert_snapshot!("request_out_json_object_adaptive", out_json(&req));
    }

    #[test]
    fn request_out_without_max_tokens_sends_the_reservation() {
        let req = Request {
            model: "public".into(),
            messages: vec![message(Role::User, vec![text("Hi")])],
            reasoning: Some(Reasoning::Effort(Effort::Minimal)),
            top_k: Some(5),
            ..Request::default()
        };
        let json = out_json(&req);
        insta::assert_snapshot!(json);
        let value: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(value["max_tokens"], 1024);
        assert_eq!(value["model"], "claude-upstream");
        assert_eq!(value["output_config"]["effort"], "low", "minimal is low");
        let off = Request {
            reasoning: Some(Reasoning::Off),
            ..req
        };
        let value: serde_json::Value = serde_json::from_str(&out_json(&off)).expect("JSON");
        assert_eq!(value["thinking"]["type"], "disabled");
    }

    #[test]
    fn request_out_cache_marks() {
        let five = Some(CacheMark { ttl: None });
        let hour = Some(CacheMark {
            ttl: Some(CacheTtl::OneHour),
        });
        let req = Request {
            model: "public".into(),
            system: vec![
                TextBlock {
                    text: "Instructions".into(),
                    cache: None,
                },
                TextBlock {
                    text: "A long document".into(),
                    cache: hour,
                },
            ],
            messages: vec![
                message(
                    Role::User,
                    vec![Block::Text(TextBlock {
                        text: "Question".into(),
                        cache: five,
                    })],
                ),
                message(
                    Role::Assistant,
                    vec![Block::ToolUse {
                        id: "t1".into(),
                        name: "get_weather".into(),
                        input: raw("[1, 2]"),
                        cache: five,
                    }],
                ),
                message(
                    Role::User,
                    vec![Block::ToolResult {
                        tool_use_id: "t1".into(),
                        content: vec![
                            text("an image of the sky:"),
                            Block::Image {
                                source: ImageSource::Url("https://example.com/sky.png".into()),
                                cache: None,
                            },
                        ],
                        is_error: true,
                        cache: hour,
                    }],
                ),
            ],
            tools: vec![Tool {
                cache: five,
                ..weather_tool()
            }],
            ..Request::default()
        };
        let json = out_json(&req);
        assert!(
            json.contains(r#""input": {}"#),
            "a non-object input becomes {{}}"
        );
        insta::assert_snapshot!(json);
    }

    #[test]
    fn request_out_refuses_what_anthropic_cannot_hold() {
        let req = Request {
            messages: vec![message(
                Role::System,
                vec![Block::Image {
                    source: ImageSource::Url("https://example.com".into()),
                    cache: None,
                }],
            )],
            ..Request::default()
        };
        let refused = request_out(
            &req,
            "m",
            Out {
                default_max_tokens: 1,
            },
        )
        .expect_err("refused");
        assert_eq!(refused.param, Some("messages"));
    }

    // -- never panic --------------------------------------------------------------------------

    proptest! {
        #[test]
        fn parsers_never_panic_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = request_in(&bytes);
            let _ = response_in(&bytes);
            let _ = error_in(400, &bytes);
            let _ = error_in(529, &bytes);
            let mut stream = EventsIn::new();
            let mut out = Vec::new();
            let _ = stream.event(&bytes, &mut out);
            stream.finish(&mut out);
        }

        #[test]
        fn parsers_never_panic_on_json_like_text(
            text in r#"[{}\[\]",:a-z0-9_ ]{0,200}"#,
            kind in prop::sample::select(vec![
                "message_start", "content_block_start", "content_block_delta",
                "content_block_stop", "message_delta", "message_stop", "error", "ping",
            ]),
        ) {
            let event = format!(r#"{{"type":"{kind}","index":0,{text}"#);
            let mut stream = EventsIn::new();
            let mut out = Vec::new();
            let _ = stream.event(event.as_bytes(), &mut out);
            let _ = stream.event(text.as_bytes(), &mut out);
            stream.finish(&mut out);
            let mut events_out = EventsOut::new("m");
            let mut bytes = Vec::new();
            for event in &out {
                events_out.event(event, &mut bytes);
            }
            events_out.finish(&mut bytes);
            let _ = request_in(text.as_bytes());
            let _ = response_in(text.as_bytes());
        }
    }
}
