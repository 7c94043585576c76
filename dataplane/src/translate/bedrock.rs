//! AWS Bedrock Converse in and out of the canonical model, for `bedrock` backends of any
//! client dialect: requests out, answers, errors and streams in. The model id travels in the
//! URL (`path`), never in the body; signing is `providers::aws_auth`'s.
//!
//! ```text
//!  Request ─► request_out ─► Converse / ConverseStream JSON body
//!  Converse JSON ─► response_in(id) ─► Response
//!  status + x-amzn-ErrorType + body ─► error_in ─► ApiError
//!  event-stream bytes ─► FrameDecoder ─► Frame* ─► EventsIn ─► Event*
//! ```
//!
//! ConverseStream answers in AWS's binary event stream (`application/vnd.amazon.eventstream`):
//! length-prefixed messages with typed headers and two CRC32s, split and checked in place
//! by `FrameDecoder` (held to the answers of AWS's `aws-smithy-eventstream` decoder by tests
//! and the fuzz target), each message's JSON payload then read here. Wire
//! shapes: botocore `data/bedrock-runtime/2023-09-30/service-2.json` (docs/providers.md 3.5);
//! the fixtures' README names the source of each case.

use std::ops::Range;

use base64::Engine as _;
use bytes::Bytes;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message as StreamMessage};

use super::{MAX_STREAM_TOOL_CALLS, Refused};
use crate::canonical::{
    Api, ApiError, Block, BlockKind, CacheMark, CacheTtl, Delta, Effort, ErrorKind, Event,
    ImageSource, Reasoning, Request, Response, ResponseFormat, Role, Signature, StopReason,
    TextBlock, ToolChoice, Usage,
};

/// What a Bedrock 400 for a prompt over the model's context window says, lower-cased and
/// matched anywhere in the message: "Input is too long for requested model." (reported from
/// the Converse, InvokeModel and ConverseStream paths alike; AWS documents no wording). The one
/// place to change when a recording says otherwise.
pub const INPUT_TOO_LONG: &str = "input is too long";

/// Claude's own wording, which Bedrock sometimes passes through ("The model returned the
/// following errors: prompt is too long: ...").
const PROMPT_TOO_LONG: &str = "prompt is too long";

/// Most upstream text copied into an error message.
const MAX_UPSTREAM_MESSAGE_BYTES: usize = 1024;

/// Most of a parser's complaint copied into an error.
const MAX_PARSE_ERROR_BYTES: usize = 200;

/// Blocks one stream may hold open at once.
const MAX_OPEN_BLOCKS: usize = MAX_STREAM_TOOL_CALLS;

/// Most bytes of one redacted reasoning block held while its deltas arrive.
const MAX_REDACTED_BYTES: usize = 1024 * 1024;

/// The family of the model behind a Bedrock model id: what `additionalModelRequestFields` may
/// carry and whose thinking signatures it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Anthropic Claude (`anthropic.claude-…`, `us.anthropic.claude-…`, an inference-profile
    /// ARN naming one).
    Anthropic,
    /// Everything else (Amazon Nova, Meta Llama, Mistral, ...), and ARNs that name no model
    /// (application inference profiles, provisioned throughput): only the Converse fields
    /// every model takes are sent.
    Other,
}

impl Family {
    /// The family a model id names.
    pub fn of(model_id: &str) -> Self {
        if model_id.contains("anthropic.") {
            Self::Anthropic
        } else {
            Self::Other
        }
    }
}

/// How the request for a Bedrock backend is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    /// `inferenceConfig.maxTokens` when the client gave none: the gateway's reservation, so
    /// admission reserved exactly what is sent (Claude on Bedrock requires a value).
    pub max_tokens: u64,
    /// The upstream model's family (`Family::of` the model id, unless configured).
    pub family: Family,
}

/// The request path for a model id: `/model/{modelId}/converse` or `…/converse-stream`. The
/// id is percent-encoded as botocore encodes a URI label (everything but `A-Z a-z 0-9 - . _
/// ~`): `anthropic.claude-3-5-sonnet-20240620-v1:0` becomes `…-v1%3A0`, an ARN's `/` `%2F`.
pub fn path(model_id: &str, stream: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut path = String::with_capacity(model_id.len() + 32);
    path.push_str("/model/");
    for &b in model_id.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            path.push(char::from(b));
        } else {
            path.push('%');
            path.push(char::from(HEX[usize::from(b >> 4)]));
            path.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    path.push_str(if stream {
        "/converse-stream"
    } else {
        "/converse"
    });
    path
}

/// The fields of `req` that a Bedrock request drops without changing the shape of the answer:
/// for the proxy to add to `x-modelgate-ignored-params` (request_out cannot: it borrows).
pub fn dropped(req: &Request, out: Out) -> Vec<&'static str> {
    let mut dropped = Vec::new();
    if req.user.is_some() {
        dropped.push("user");
    }
    if req.parallel_tool_calls.is_some() {
        dropped.push("parallel_tool_calls");
    }
    if req.top_k.is_some() && out.family == Family::Other {
        dropped.push("top_k");
    }
    dropped
}

// ---------------------------------------------------------------------------------------------
// Requests out

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutRequest<'a> {
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<OutSystem<'a>>,
    inference_config: OutInference<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<OutToolConfig<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<OutOutputConfig<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    additional_model_request_fields: Option<OutAdditional>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    additional_model_response_field_paths: &'static [&'static str],
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: Vec<OutBlock<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum OutSystem<'a> {
    Text(&'a str),
    CachePoint(OutCachePoint),
}

/// A content block: a union, written as an object with exactly one member.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum OutBlock<'a> {
    Text(&'a str),
    Image(OutImage<'a>),
    Document(OutDocument<'a>),
    ToolUse(OutToolUse<'a>),
    ToolResult(OutToolResult<'a>),
    ReasoningContent(OutReasoning<'a>),
    CachePoint(OutCachePoint),
}

#[derive(Serialize)]
struct OutImage<'a> {
    format: &'static str,
    source: OutBytes<'a>,
}

#[derive(Serialize)]
struct OutDocument<'a> {
    format: &'static str,
    name: String,
    source: OutBytes<'a>,
}

/// `{"bytes": <base64>}`: a blob is base64 text in Converse's JSON.
#[derive(Serialize)]
struct OutBytes<'a> {
    bytes: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutToolUse<'a> {
    tool_use_id: &'a str,
    name: &'a str,
    input: Json<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutToolResult<'a> {
    tool_use_id: &'a str,
    content: Vec<OutResultBlock<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum OutResultBlock<'a> {
    Text(&'a str),
    Image(OutImage<'a>),
    Document(OutDocument<'a>),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum OutReasoning<'a> {
    ReasoningText { text: &'a str, signature: &'a str },
    RedactedContent(&'a str),
}

#[derive(Serialize, Clone, Copy)]
struct OutCachePoint {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutInference<'a> {
    max_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutToolConfig<'a> {
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<OutToolChoice<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum OutTool<'a> {
    ToolSpec(OutToolSpec<'a>),
    CachePoint(OutCachePoint),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutToolSpec<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: OutSchema<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
struct OutSchema<'a> {
    json: Json<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum OutToolChoice<'a> {
    Auto(EmptyObject),
    Any(EmptyObject),
    Tool { name: &'a str },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutOutputConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    text_format: Option<OutTextFormat<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    effort: Option<&'static str>,
}

#[derive(Serialize)]
struct OutTextFormat<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    structure: OutStructure<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutStructure<'a> {
    json_schema: OutJsonSchema<'a>,
}

#[derive(Serialize)]
struct OutJsonSchema<'a> {
    /// The schema as JSON *text*: Converse's `JsonSchemaDefinition.schema` is a string.
    schema: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// `additionalModelRequestFields`: passed by Bedrock to the model as its own request fields
/// (for Claude, the Messages API's `thinking` and `top_k`).
#[derive(Serialize)]
struct OutAdditional {
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<OutThinking>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
}

#[derive(Serialize)]
struct OutThinking {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_tokens: Option<u64>,
}

/// JSON written into a body: the client's or model's bytes as they came, or `{}`, or the
/// schema of a tool that takes no arguments.
#[derive(Serialize)]
#[serde(untagged)]
enum Json<'a> {
    Raw(&'a RawValue),
    EmptyObject(EmptyObject),
    NoArguments(NoArguments),
}

struct EmptyObject;

impl Serialize for EmptyObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
}

/// `{"type":"object","properties":{}}`
struct NoArguments;

impl Serialize for NoArguments {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("type", "object")?;
        map.serialize_entry("properties", &EmptyObject)?;
        map.end()
    }
}

/// A tool call's arguments: always an object on the wire (Converse's `input` is a document,
/// Claude refuses anything but an object).
fn tool_input(raw: &RawValue) -> Json<'_> {
    if raw.get().trim_start().starts_with('{') {
        Json::Raw(raw)
    } else {
        Json::EmptyObject(EmptyObject)
    }
}

fn cache_point(mark: CacheMark) -> OutCachePoint {
    OutCachePoint {
        kind: "default",
        ttl: mark.ttl.map(|ttl| match ttl {
            CacheTtl::FiveMinutes => "5m",
            CacheTtl::OneHour => "1h",
        }),
    }
}

fn image_format(media_type: &str) -> Option<&'static str> {
    Some(match media_type {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        _ => return None,
    })
}

/// What a budget asks for, as an effort, for models that take no budget (the same steps as
/// for OpenAI-shaped backends, docs/providers.md 4.2).
fn effort_of_budget(budget: u64) -> Effort {
    if budget < 4096 {
        Effort::Low
    } else if budget < 16384 {
        Effort::Medium
    } else {
        Effort::High
    }
}

/// Writes blocks, numbering documents (Converse requires a `name` on each).
struct Writer {
    family: Family,
    documents: usize,
}

impl Writer {
    fn image<'a>(&self, source: &'a ImageSource) -> Result<OutImage<'a>, Refused> {
        match source {
            ImageSource::Url(_) => Err(Refused::new(
                Some("messages"),
                "Bedrock takes images as bytes only: send the image as base64 (a data: URL) \
                 instead of a link",
            )),
            ImageSource::Base64 { media_type, data } => Ok(OutImage {
                format: image_format(media_type).ok_or_else(|| {
                    Refused::new(
                        Some("messages"),
                        "Bedrock takes png, jpeg, gif and webp images only",
                    )
                })?,
                source: OutBytes { bytes: data },
            }),
        }
    }

    fn document<'a>(
        &mut self,
        media_type: &str,
        data: &'a str,
    ) -> Result<OutDocument<'a>, Refused> {
        if media_type != "application/pdf" {
            return Err(Refused::new(
                Some("messages"),
                "only PDF documents can be sent to Bedrock",
            ));
        }
        self.documents += 1;
        Ok(OutDocument {
            format: "pdf",
            // Letters, digits, single spaces, hyphens, parentheses and brackets only; unique
            // within the request.
            name: format!("document-{}", self.documents),
            source: OutBytes { bytes: data },
        })
    }

    /// Whether an opaque value may be sent to this backend: Bedrock's own always; one labelled
    /// Anthropic's to a Claude model, since the gateway labels every signature an OpenAI client
    /// sends back as Anthropic's (it cannot tell where the client got it) and Claude on
    /// Bedrock signs the same way as Anthropic's API. A signature Anthropic's API really issued
    /// makes Bedrock answer 400, passed on: the same answer as the thinking block missing.
    fn takes(&self, signature: &Signature) -> bool {
        match signature.origin {
            Api::BedrockConverse => true,
            Api::AnthropicMessages => self.family == Family::Anthropic,
            _ => false,
        }
    }

    /// One block of a user or assistant turn, with the cache point that follows it; `None`:
    /// dropped (thinking with another API's signature, or none).
    fn block<'a>(
        &mut self,
        block: &'a Block,
    ) -> Result<Option<(OutBlock<'a>, Option<OutCachePoint>)>, Refused> {
        Ok(Some(match block {
            Block::Text(text) => (OutBlock::Text(&text.text), text.cache.map(cache_point)),
            Block::Image { source, cache } => {
                (OutBlock::Image(self.image(source)?), cache.map(cache_point))
            }
            Block::Document {
                media_type,
                data,
                cache,
            } => (
                OutBlock::Document(self.document(media_type, data)?),
                cache.map(cache_point),
            ),
            Block::ToolUse {
                id,
                name,
                input,
                cache,
            } => (
                OutBlock::ToolUse(OutToolUse {
                    tool_use_id: id,
                    name,
                    input: tool_input(input),
                }),
                cache.map(cache_point),
            ),
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
                cache,
            } => {
                let mut blocks = Vec::with_capacity(content.len());
                for b in content {
                    blocks.push(match b {
                        Block::Text(t) => OutResultBlock::Text(&t.text),
                        Block::Image { source, .. } => OutResultBlock::Image(self.image(source)?),
                        Block::Document {
                            media_type, data, ..
                        } => OutResultBlock::Document(self.document(media_type, data)?),
                        _ => {
                            return Err(Refused::new(
                                Some("messages"),
                                "a tool result can only hold text, images and documents",
                            ));
                        }
                    });
                }
                (
                    OutBlock::ToolResult(OutToolResult {
                        tool_use_id,
                        content: blocks,
                        // Sent only for errors: other models than Claude may not take it.
                        status: is_error.then_some("error"),
                    }),
                    cache.map(cache_point),
                )
            }
            Block::Thinking {
                text,
                signature: Some(signature),
            } if self.takes(signature) => (
                OutBlock::ReasoningContent(OutReasoning::ReasoningText {
                    text,
                    signature: &signature.value,
                }),
                None,
            ),
            Block::Thinking { .. } => return Ok(None),
            Block::RedactedThinking { data } if self.takes(data) => (
                OutBlock::ReasoningContent(OutReasoning::RedactedContent(&data.value)),
                None,
            ),
            Block::RedactedThinking { .. } => return Ok(None),
        }))
    }
}

/// A turn being written: its role, and each block with the cache point that follows it.
type Turn<'a> = (&'static str, Vec<(OutBlock<'a>, Option<OutCachePoint>)>);

/// The Converse (or ConverseStream: the same body) request for a Bedrock backend.
///
/// Refused (400): URL images, images other than png/jpeg/gif/webp, documents other than PDF,
/// non-text system content. Dropped: thinking signed by another API, `parallel_tool_calls`,
/// `user`, and for models other than Claude `top_k` (`dropped` names them).
pub fn request_out(req: &Request, out: Out) -> Result<Vec<u8>, Refused> {
    let mut writer = Writer {
        family: out.family,
        documents: 0,
    };
    let mut system: Vec<OutSystem> = Vec::with_capacity(req.system.len());
    for text in &req.system {
        system_text(&mut system, text);
    }

    // Per turn: each block with the cache point that follows it, so that reordering a user
    // turn (tool results first) keeps each point behind its block.
    let mut turns: Vec<Turn> = Vec::with_capacity(req.messages.len());
    let mut tool_blocks = false;
    for message in &req.messages {
        let role = match message.role {
            Role::System => {
                // Converse's system prompt is top level: hoisted, in order.
                for block in &message.content {
                    let Block::Text(text) = block else {
                        return Err(Refused::new(
                            Some("messages"),
                            "a system message can only hold text",
                        ));
                    };
                    system_text(&mut system, text);
                }
                continue;
            }
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let mut content = Vec::with_capacity(message.content.len());
        for block in &message.content {
            tool_blocks |= matches!(block, Block::ToolUse { .. } | Block::ToolResult { .. });
            if let Some(b) = writer.block(block)? {
                content.push(b);
            }
        }
        if content.is_empty() {
            // Nothing Bedrock can take (only another API's thinking, or no content).
            continue;
        }
        // Converse wants roles to alternate: consecutive turns of one role become one.
        match turns.last_mut() {
            Some((last, blocks)) if *last == role => blocks.append(&mut content),
            _ => turns.push((role, content)),
        }
    }
    let messages = turns
        .into_iter()
        .map(|(role, mut blocks)| {
            if role == "user" {
                // Tool results open the turn that answers the tool calls (stable sort).
                blocks.sort_by_key(|(b, _)| !matches!(b, OutBlock::ToolResult(_)));
            }
            let mut content = Vec::with_capacity(blocks.len());
            for (block, point) in blocks {
                content.push(block);
                if let Some(point) = point {
                    content.push(OutBlock::CachePoint(point));
                }
            }
            OutMessage { role, content }
        })
        .collect();

    let tool_config = tool_config(req, tool_blocks);

    let mut thinking = None;
    let mut effort = None;
    match (req.reasoning, out.family) {
        (None, _) => {}
        // Converse's own field; its lowest word is `low`.
        (Some(Reasoning::Effort(Effort::Minimal)), _) => effort = Some(Effort::Low.as_str()),
        (Some(Reasoning::Effort(e)), _) => effort = Some(e.as_str()),
        (Some(Reasoning::Budget(n)), Family::Anthropic) => {
            thinking = Some(OutThinking {
                kind: "enabled",
                budget_tokens: Some(n),
            })
        }
        (Some(Reasoning::Budget(n)), Family::Other) => effort = Some(effort_of_budget(n).as_str()),
        (Some(Reasoning::Adaptive), Family::Anthropic) => {
            thinking = Some(OutThinking {
                kind: "adaptive",
                budget_tokens: None,
            })
        }
        (Some(Reasoning::Off), Family::Anthropic) => {
            thinking = Some(OutThinking {
                kind: "disabled",
                budget_tokens: None,
            })
        }
        // Other models reason as they are built to; nothing to switch.
        (Some(Reasoning::Adaptive | Reasoning::Off), Family::Other) => {}
    }
    let text_format = match &req.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(OutTextFormat {
            kind: "json_schema",
            structure: OutStructure {
                json_schema: OutJsonSchema {
                    schema: r#"{"type":"object"}"#,
                    name: None,
                },
            },
        }),
        Some(ResponseFormat::JsonSchema { name, schema, .. }) => Some(OutTextFormat {
            kind: "json_schema",
            structure: OutStructure {
                json_schema: OutJsonSchema {
                    schema: schema.get(),
                    name: name.as_deref(),
                },
            },
        }),
    };
    let output_config = (text_format.is_some() || effort.is_some()).then_some(OutOutputConfig {
        text_format,
        effort,
    });
    let top_k = req.top_k.filter(|_| out.family == Family::Anthropic);
    let additional =
        (thinking.is_some() || top_k.is_some()).then_some(OutAdditional { thinking, top_k });

    let body = OutRequest {
        messages,
        system,
        inference_config: OutInference {
            max_tokens: req.max_output_tokens.unwrap_or(out.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            stop_sequences: &req.stop,
        },
        tool_config,
        output_config,
        additional_model_request_fields: additional,
        // Claude says which sequence stopped it; Converse passes it on only when asked.
        additional_model_response_field_paths: if out.family == Family::Anthropic
            && !req.stop.is_empty()
        {
            &["/stop_sequence"]
        } else {
            &[]
        },
    };
    serde_json::to_vec(&body).map_err(|e| Refused::new(None, e.to_string()))
}

fn system_text<'a>(system: &mut Vec<OutSystem<'a>>, text: &'a TextBlock) {
    // Converse refuses an empty system text (`NonEmptyString`).
    if !text.text.is_empty() {
        system.push(OutSystem::Text(&text.text));
    }
    if let Some(mark) = text.cache {
        system.push(OutSystem::CachePoint(cache_point(mark)));
    }
}

/// `toolConfig`. Converse has no "none" choice: with `ToolChoice::None` the tools are left
/// out, unless the history holds tool calls or results, which Converse takes only with a
/// `toolConfig` (then the tools go without a choice, and the model may still call one: a
/// documented loss).
fn tool_config(req: &Request, tool_blocks: bool) -> Option<OutToolConfig<'_>> {
    if req.tools.is_empty() || (req.tool_choice == Some(ToolChoice::None) && !tool_blocks) {
        return None;
    }
    let mut tools = Vec::with_capacity(req.tools.len());
    for tool in &req.tools {
        tools.push(OutTool::ToolSpec(OutToolSpec {
            name: &tool.name,
            description: tool.description.as_deref().filter(|d| !d.is_empty()),
            input_schema: OutSchema {
                json: match &tool.input_schema {
                    Some(schema) => Json::Raw(schema),
                    None => Json::NoArguments(NoArguments),
                },
            },
            strict: tool.strict,
        }));
        if let Some(mark) = tool.cache {
            tools.push(OutTool::CachePoint(cache_point(mark)));
        }
    }
    let tool_choice = match &req.tool_choice {
        None | Some(ToolChoice::None) => None,
        Some(ToolChoice::Auto) => Some(OutToolChoice::Auto(EmptyObject)),
        Some(ToolChoice::Any) => Some(OutToolChoice::Any(EmptyObject)),
        Some(ToolChoice::Tool(name)) => Some(OutToolChoice::Tool { name }),
    };
    Some(OutToolConfig { tools, tool_choice })
}

// ---------------------------------------------------------------------------------------------
// Answers

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse<'a> {
    #[serde(borrow)]
    output: Option<WireOutput<'a>>,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: WireUsage,
    #[serde(borrow)]
    additional_model_response_fields: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireOutput<'a> {
    #[serde(borrow)]
    message: Option<WireMessage<'a>>,
}

#[derive(Deserialize)]
struct WireMessage<'a> {
    #[serde(borrow, default)]
    content: Vec<WireBlock<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireBlock<'a> {
    text: Option<String>,
    #[serde(borrow)]
    tool_use: Option<WireToolUse<'a>>,
    reasoning_content: Option<WireReasoning>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireToolUse<'a> {
    tool_use_id: String,
    name: String,
    #[serde(borrow)]
    input: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireReasoning {
    reasoning_text: Option<WireReasoningText>,
    redacted_content: Option<String>,
}

#[derive(Deserialize)]
struct WireReasoningText {
    #[serde(default)]
    text: String,
    signature: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_write_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Bedrock's `inputTokens` excludes both cache kinds, as Anthropic's `input_tokens` does:
    /// AWS's prompt-caching examples have `totalTokens = inputTokens + outputTokens +
    /// cacheReadInputTokens + cacheWriteInputTokens`, and third-party gateways read it so
    /// (docs/providers.md 3.5, 10). Each answer is checked against its own `totalTokens`: when
    /// that equals `inputTokens + outputTokens` although cache tokens were reported, the
    /// input included them and they are taken out, so no cache token is counted twice.
    fn canonical(self) -> Usage {
        let cached = self
            .cache_read_input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_write_input_tokens.unwrap_or(0));
        let input = match (self.input_tokens, self.output_tokens, self.total_tokens) {
            (Some(input), Some(output), Some(total))
                if cached > 0 && input >= cached && total == input.saturating_add(output) =>
            {
                Some(input - cached)
            }
            (input, ..) => input,
        };
        Usage {
            input,
            cache_read: self.cache_read_input_tokens,
            cache_write: self.cache_write_input_tokens,
            output: self.output_tokens,
            // Converse does not report reasoning tokens apart.
            reasoning: None,
        }
    }
}

/// Converse's `stopReason` in canonical words; an unknown word is `Other`.
pub fn stop_reason_in(word: &str) -> StopReason {
    match word {
        "end_turn" => StopReason::EndTurn,
        "tool_use" => StopReason::ToolUse,
        "max_tokens" => StopReason::MaxTokens,
        "stop_sequence" => StopReason::StopSequence,
        "guardrail_intervened" | "content_filtered" => StopReason::ContentFilter,
        "model_context_window_exceeded" => StopReason::ContextWindow,
        // malformed_model_output, malformed_tool_use, and words added later.
        _ => StopReason::Other,
    }
}

/// The stop sequence Claude reports through `additionalModelResponseFields`, if asked for.
fn stop_sequence_of(fields: Option<&RawValue>) -> Option<String> {
    #[derive(Deserialize)]
    struct Fields {
        stop_sequence: Option<String>,
    }
    serde_json::from_str::<Fields>(fields?.get())
        .ok()?
        .stop_sequence
}

/// A Converse answer (a 2xx body) read into the canonical model. Converse has no response id:
/// `id` is the gateway's. Blocks other than text, reasoning and tool use (citations, images)
/// are skipped.
pub fn response_in(body: &[u8], id: &str) -> Result<Response, String> {
    let wire: WireResponse = serde_json::from_slice(body).map_err(|e| {
        format!(
            "not a Converse answer: {}",
            super::clip(&e.to_string(), MAX_PARSE_ERROR_BYTES)
        )
    })?;
    let blocks = wire
        .output
        .and_then(|o| o.message)
        .map(|m| m.content)
        .unwrap_or_default();
    let mut content = Vec::with_capacity(blocks.len());
    for block in blocks {
        if let Some(text) = block.text {
            content.push(Block::Text(TextBlock { text, cache: None }));
        } else if let Some(tool) = block.tool_use {
            content.push(Block::ToolUse {
                id: tool.tool_use_id,
                name: tool.name,
                input: tool.input.to_owned(),
                cache: None,
            });
        } else if let Some(reasoning) = block.reasoning_content {
            if let Some(r) = reasoning.reasoning_text {
                content.push(Block::Thinking {
                    text: r.text,
                    signature: r
                        .signature
                        .filter(|s| !s.is_empty())
                        .map(|value| Signature {
                            origin: Api::BedrockConverse,
                            value,
                        }),
                });
            } else if let Some(value) = reasoning.redacted_content {
                content.push(Block::RedactedThinking {
                    data: Signature {
                        origin: Api::BedrockConverse,
                        value,
                    },
                });
            }
        }
    }
    let stop = wire
        .stop_reason
        .as_deref()
        .map_or(StopReason::Other, stop_reason_in);
    Ok(Response {
        id: id.to_owned(),
        // Converse does not name the model; the client's public name is written out anyway.
        model: String::new(),
        content,
        stop,
        stop_sequence: stop_sequence_of(wire.additional_model_response_fields)
            .filter(|_| stop == StopReason::StopSequence),
        usage: wire.usage.canonical(),
    })
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Deserialize)]
struct WireError {
    #[serde(alias = "Message")]
    message: Option<String>,
    #[serde(rename = "__type")]
    kind: Option<String>,
}

/// An exception's bare name: `ThrottlingException:http://internal.amazon.com/coral/…` and
/// `com.amazon.bedrock#ThrottlingException` are both `ThrottlingException`.
fn exception_name(raw: &str) -> &str {
    let name = raw.split(':').next().unwrap_or(raw);
    name.rsplit('#').next().unwrap_or(name).trim()
}

/// The status AWS answers an exception with (service-2.json `error.httpStatusCode`), for
/// stream exceptions, which carry none of their own.
fn status_of(name: &str) -> u16 {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    if is("ThrottlingException") || is("ModelNotReadyException") {
        429
    } else if is("ValidationException") || is("ServiceQuotaExceededException") {
        400
    } else if is("AccessDeniedException") {
        403
    } else if is("ResourceNotFoundException") {
        404
    } else if is("ModelTimeoutException") {
        408
    } else if is("ModelErrorException") || is("ModelStreamErrorException") {
        424
    } else if is("ServiceUnavailableException") {
        503
    } else {
        500
    }
}

fn context_overflow(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains(INPUT_TOO_LONG) || lower.contains(PROMPT_TOO_LONG)
}

/// What an error means (docs/providers.md 6.3), by exception name first, then by status.
fn kind_of(status: u16, name: &str, message: &str) -> ErrorKind {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    if is("ThrottlingException") {
        ErrorKind::RateLimited
    } else if is("ServiceQuotaExceededException") {
        // "Your request exceeds the service quota for your account": not a rate, so the same
        // backend is not asked again for this request (a 400 that failover must still read).
        ErrorKind::QuotaExhausted
    } else if is("ValidationException") {
        if context_overflow(message) {
            ErrorKind::ContextLength
        } else {
            ErrorKind::InvalidRequest
        }
    } else if is("AccessDeniedException") {
        ErrorKind::Permission
    } else if is("UnrecognizedClientException")
        || is("InvalidSignatureException")
        || is("ExpiredTokenException")
        || is("IncompleteSignatureException")
        || is("MissingAuthenticationTokenException")
    {
        ErrorKind::Authentication
    } else if is("ResourceNotFoundException") {
        ErrorKind::NotFound
    } else if is("ModelNotReadyException") || is("ServiceUnavailableException") {
        ErrorKind::Overloaded
    } else if is("ModelTimeoutException") {
        ErrorKind::Timeout
    } else if is("InternalServerException")
        || is("ModelErrorException")
        || is("ModelStreamErrorException")
    {
        ErrorKind::Server
    } else {
        match status {
            400 if context_overflow(message) => ErrorKind::ContextLength,
            401 => ErrorKind::Authentication,
            403 => ErrorKind::Permission,
            404 => ErrorKind::NotFound,
            408 => ErrorKind::Timeout,
            413 => ErrorKind::RequestTooLarge,
            429 => ErrorKind::RateLimited,
            503 => ErrorKind::Overloaded,
            400..=499 => ErrorKind::InvalidRequest,
            _ => ErrorKind::Server,
        }
    }
}

fn api_error(status: u16, name: &str, message: Option<&str>) -> ApiError {
    let message = match message {
        Some(m) => super::clip(m, MAX_UPSTREAM_MESSAGE_BYTES).to_owned(),
        None if name.is_empty() => {
            format!("the upstream answered {status} without a Bedrock error body")
        }
        None => format!(
            "the upstream answered {status} {}",
            super::clip(name, MAX_PARSE_ERROR_BYTES)
        ),
    };
    ApiError {
        status,
        kind: kind_of(status, name, &message),
        message,
        param: None,
        code: None,
    }
}

/// A Bedrock error answer read into the canonical model: `error_type` is the
/// `x-amzn-ErrorType` header if present; the body is `{"message": ...}`, sometimes with
/// `__type` naming the exception when the header does not.
pub fn error_in(status: u16, error_type: Option<&str>, body: &[u8]) -> ApiError {
    let wire = serde_json::from_slice::<WireError>(body).ok();
    let name = error_type
        .or_else(|| wire.as_ref().and_then(|w| w.kind.as_deref()))
        .map(exception_name)
        .unwrap_or("");
    api_error(
        status,
        name,
        wire.as_ref().and_then(|w| w.message.as_deref()),
    )
}

// ---------------------------------------------------------------------------------------------
// Event-stream frames

/// What kind of event-stream message a frame is (its `:message-type` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Event,
    /// A modelled exception (`throttlingException`, ...), JSON payload `{"message"}`.
    Exception,
    /// A protocol error, named by `:error-code` and `:error-message` headers.
    Error,
}

/// One event-stream message, its CRCs checked; it borrows the decoder's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: FrameKind,
    /// `:event-type`, `:exception-type` or `:error-code`.
    pub name: &'a str,
    /// `:error-message` of an error frame.
    pub message: Option<&'a str>,
    pub payload: &'a [u8],
}

/// Splits the event stream into messages and checks them, in place: prelude (total and
/// header lengths, their CRC-32), typed headers, payload, message CRC-32, as AWS's
/// `aws-smithy-eventstream` reads them (`frame::read_message_from`; the unit tests and the
/// `translate_stream_bedrock` fuzz target hold the two to the same answers). Nothing is
/// copied or allocated per message: a frame's strings and payload are slices of the buffer.
/// Holds at most one message (bounded by `max_message`) plus the chunk that completed it; a
/// message announcing more than `max_message` bytes is an error before its bytes are waited
/// for.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Where the next message starts in `buf`; the bytes before it were handed out.
    at: usize,
    max_message: usize,
    /// A broken message was seen: the stream cannot be resynchronised.
    failed: bool,
}

/// Prelude: total length, headers length, prelude CRC (4 bytes each).
const PRELUDE_BYTES: usize = 12;
/// The smallest message: prelude and message CRC (4).
const MIN_MESSAGE_BYTES: usize = PRELUDE_BYTES + 4;

impl FrameDecoder {
    pub fn new(max_message: usize) -> Self {
        Self {
            buf: Vec::new(),
            at: 0,
            max_message,
            failed: false,
        }
    }

    /// Appends bytes as they came off the wire, cut anywhere.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.failed {
            return;
        }
        if self.at > 0 {
            // What was handed out is no longer borrowed: keep only an unfinished message.
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole message, `None` until its last byte has been pushed.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, String> {
        if self.failed {
            return Err("the event stream broke earlier".into());
        }
        let rest = &self.buf[self.at..];
        let Some(total) = be_u32(rest, 0) else {
            return Ok(None);
        };
        let total = total as usize;
        if total < MIN_MESSAGE_BYTES {
            return self.fail(format!("an event-stream message announces {total} bytes"));
        }
        if total > self.max_message {
            return self.fail(format!(
                "an event-stream message of {total} bytes is over the limit of {} bytes",
                self.max_message
            ));
        }
        let Some(message) = rest.get(..total) else {
            return Ok(None);
        };
        if let Err(e) = check_message(message) {
            return self.fail(e);
        }
        let at = match frame_at(message) {
            Ok(at) => at,
            Err(e) => return self.fail(e),
        };
        let start = self.at;
        self.at += total;
        Ok(Some(at.frame(&self.buf[start..start + total])))
    }

    fn fail<T>(&mut self, error: String) -> Result<T, String> {
        self.failed = true;
        self.buf = Vec::new();
        self.at = 0;
        Err(error)
    }
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// The two CRCs of a whole message (`message.len()` is its announced total, at least
/// `MIN_MESSAGE_BYTES`) and that its headers fit in it.
fn check_message(message: &[u8]) -> Result<(), String> {
    let total = message.len();
    let header_len = be_u32(message, 4).unwrap_or(u32::MAX) as usize;
    let prelude_crc = be_u32(message, 8).unwrap_or_default();
    if crc32fast::hash(&message[..8]) != prelude_crc {
        return Err("a broken event-stream message: the prelude's checksum does not match".into());
    }
    if header_len > total - MIN_MESSAGE_BYTES {
        return Err(format!(
            "a broken event-stream message: {header_len} bytes of headers in a message of {total}"
        ));
    }
    let message_crc = be_u32(message, total - 4).unwrap_or_default();
    if crc32fast::hash(&message[..total - 4]) != message_crc {
        return Err("a broken event-stream message: the message's checksum does not match".into());
    }
    Ok(())
}

/// Where a checked message's frame lies in it.
struct FrameAt {
    kind: FrameKind,
    name: Range<usize>,
    message: Option<Range<usize>>,
    payload: Range<usize>,
}

impl FrameAt {
    fn frame(self, message: &[u8]) -> Frame<'_> {
        // Both ranges were read as UTF-8 by `read_header`.
        let text = |r: Range<usize>| std::str::from_utf8(&message[r]).unwrap_or_default();
        Frame {
            kind: self.kind,
            name: text(self.name),
            message: self.message.map(text),
            payload: &message[self.payload],
        }
    }
}

/// Reads the headers of a message `check_message` passed. Header values of every type are
/// read (and must be whole); the frame is made of the string headers it needs.
fn frame_at(message: &[u8]) -> Result<FrameAt, String> {
    let end = PRELUDE_BYTES + be_u32(message, 4).unwrap_or_default() as usize;
    let mut at = PRELUDE_BYTES;
    // `:message-type`, `:event-type`, `:exception-type`, `:error-code`, `:error-message`.
    // The first header of a name counts, and only when its value is a string.
    let mut found: [Option<Option<Range<usize>>>; 5] = Default::default();
    while at < end {
        let (name, value, next) = read_header(&message[..end], at)
            .ok_or("a broken event-stream message: a header is cut short or of no known type")?;
        at = next;
        let slot = match &message[name] {
            b":message-type" => 0,
            b":event-type" => 1,
            b":exception-type" => 2,
            b":error-code" => 3,
            b":error-message" => 4,
            _ => continue,
        };
        found[slot].get_or_insert(value);
    }
    let [
        message_type,
        event_type,
        exception_type,
        error_code,
        error_message,
    ] = found.map(Option::flatten);
    let message_type = message_type.ok_or("an event-stream message without `:message-type`")?;
    let message_type = std::str::from_utf8(&message[message_type]).unwrap_or_default();
    let (kind, name, header) = match message_type {
        "event" => (FrameKind::Event, event_type, ":event-type"),
        "exception" => (FrameKind::Exception, exception_type, ":exception-type"),
        "error" => (FrameKind::Error, error_code, ":error-code"),
        other => {
            return Err(format!(
                "an event-stream message of type {:?}",
                super::clip(other, 64)
            ));
        }
    };
    Ok(FrameAt {
        kind,
        name: name.ok_or_else(|| format!("a {message_type} without `{header}`"))?,
        message: error_message,
        payload: end..message.len() - 4,
    })
}

/// The header at `at` of `b` (the message up to its headers' end): its name, its value when
/// that is a string (other types are skipped), and where the next one starts; `None` when it
/// is cut short, not UTF-8 where it must be, or of an unknown type.
fn read_header(b: &[u8], at: usize) -> Option<(Range<usize>, Option<Range<usize>>, usize)> {
    let name_len = *b.get(at)? as usize;
    let name = at + 1..at + 1 + name_len;
    std::str::from_utf8(b.get(name.clone())?).ok()?;
    let value_type = *b.get(name.end)?;
    let value_at = name.end + 1;
    let fixed = |n: usize| (value_at + n <= b.len()).then_some((name.clone(), None, value_at + n));
    match value_type {
        0 | 1 => fixed(0),
        2 => fixed(1),
        3 => fixed(2),
        4 => fixed(4),
        5 | 8 => fixed(8),
        9 => fixed(16),
        6 | 7 => {
            let len = u16::from_be_bytes(b.get(value_at..value_at + 2)?.try_into().ok()?) as usize;
            let value = value_at + 2..value_at + 2 + len;
            let bytes = b.get(value.clone())?;
            let next = value.end;
            if value_type == 7 {
                std::str::from_utf8(bytes).ok()?;
                Some((name, Some(value), next))
            } else {
                Some((name, None, next))
            }
        }
        _ => None,
    }
}

/// One message encoded as the event stream does (prelude, headers, payload, CRCs), for tests
/// and the mock. `message_type` is `event`, `exception` or `error`; `event_type` the event or
/// exception type, or for an error its code (the payload then being its message).
pub fn encode_frame(message_type: &str, event_type: &str, payload: &[u8]) -> Vec<u8> {
    let string = |name: &'static str, value: &str| {
        Header::new(name, HeaderValue::String(value.to_owned().into()))
    };
    let mut message = StreamMessage::new(Bytes::copy_from_slice(payload))
        .add_header(string(":message-type", message_type));
    message = match message_type {
        "error" => message
            .add_header(string(":error-code", event_type))
            .add_header(string(":error-message", &String::from_utf8_lossy(payload))),
        "exception" => message
            .add_header(string(":exception-type", event_type))
            .add_header(string(":content-type", "application/json")),
        _ => message
            .add_header(string(":event-type", event_type))
            .add_header(string(":content-type", "application/json")),
    };
    let mut out = Vec::new();
    // Fails only for a header value over 32 KiB; the caller gets nothing then.
    if write_message_to(&message, &mut out).is_err() {
        out.clear();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Streams in

/// Every ConverseStream event payload in one flat shape: which fields matter depends on the
/// frame's event type. Bedrock pads payloads with a `p` member, ignored like any other.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStreamEvent<'a> {
    content_block_index: Option<u64>,
    start: Option<WireStart>,
    delta: Option<WireStreamDelta>,
    stop_reason: Option<String>,
    usage: Option<WireUsage>,
    #[serde(borrow)]
    additional_model_response_fields: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStart {
    tool_use: Option<WireToolUseStart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireToolUseStart {
    tool_use_id: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStreamDelta {
    text: Option<String>,
    tool_use: Option<WireToolUseDelta>,
    reasoning_content: Option<WireReasoningDelta>,
}

#[derive(Deserialize)]
struct WireToolUseDelta {
    #[serde(default)]
    input: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireReasoningDelta {
    text: Option<String>,
    signature: Option<String>,
    redacted_content: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenKind {
    Text,
    Thinking,
    ToolUse,
    /// A block this translation skips (tool results, images), with its deltas and stop.
    Skipped,
}

#[derive(Debug)]
struct OpenBlock {
    upstream: u64,
    /// `None` for a skipped block or a redacted one not written yet.
    ours: Option<u32>,
    kind: OpenKind,
}

/// A redacted reasoning block being collected: its deltas are base64 pieces, joined as bytes
/// and written as one `RedactedThinking` block at its stop.
#[derive(Debug)]
struct Redacted {
    upstream: u64,
    bytes: Vec<u8>,
}

/// Reads ConverseStream frames into canonical events.
///
/// Converse sends no `contentBlockStart` for text and reasoning blocks: the first delta of an
/// unknown block index opens it. Converse's `messageStop` comes before `metadata` (the usage):
/// the stop is held (one word and an optional sequence) until `metadata` or the end of the
/// body, so `MessageStop` stays the last event. State is bounded: open blocks (at most
/// `MAX_OPEN_BLOCKS`), one redacted block (at most `MAX_REDACTED_BYTES`), counters.
#[derive(Debug)]
pub struct EventsIn {
    id: String,
    open: Vec<OpenBlock>,
    redacted: Option<Redacted>,
    next_index: u32,
    tool_calls: usize,
    stop: Option<(StopReason, Option<String>)>,
    /// `metadata` came before `messageStop`.
    usage_seen: bool,
    started: bool,
    /// `MessageStop` or an error was written: nothing follows.
    done: bool,
}

impl EventsIn {
    /// `id`: the gateway's request id, as the message id (Converse has none).
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            open: Vec::new(),
            redacted: None,
            next_index: 0,
            tool_calls: 0,
            stop: None,
            usage_seen: false,
            started: false,
            done: false,
        }
    }

    /// One decoded frame; appends the canonical events it makes.
    pub fn event(&mut self, frame: &Frame, out: &mut Vec<Event>) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        match frame.kind {
            FrameKind::Exception => {
                let wire = serde_json::from_slice::<WireError>(frame.payload).ok();
                let name = exception_name(frame.name);
                let message = wire.as_ref().and_then(|w| w.message.as_deref());
                self.start(out);
                out.push(Event::Error(api_error(status_of(name), name, message)));
                self.done = true;
                return Ok(());
            }
            FrameKind::Error => {
                let name = exception_name(frame.name);
                self.start(out);
                out.push(Event::Error(api_error(
                    status_of(name),
                    name,
                    frame.message,
                )));
                self.done = true;
                return Ok(());
            }
            FrameKind::Event => {}
        }
        let event: WireStreamEvent = serde_json::from_slice(frame.payload).map_err(|e| {
            format!(
                "not a ConverseStream `{}` event: {}",
                super::clip(frame.name, 64),
                super::clip(&e.to_string(), MAX_PARSE_ERROR_BYTES)
            )
        })?;
        if self.stop.is_some() && frame.name != "metadata" {
            // After `messageStop` only the usage is awaited.
            return Ok(());
        }
        match frame.name {
            "messageStart" => {
                if self.started {
                    return Err("a second `messageStart`".into());
                }
                self.start(out);
            }
            "contentBlockStart" => {
                self.start(out);
                let upstream = event
                    .content_block_index
                    .ok_or("`contentBlockStart` without `contentBlockIndex`")?;
                if self.is_open(upstream) {
                    return Err(format!("block {upstream} started twice"));
                }
                match event.start.and_then(|s| s.tool_use) {
                    Some(tool) => {
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
                        self.open_block(
                            upstream,
                            OpenKind::ToolUse,
                            Some(BlockKind::ToolUse {
                                id: tool.tool_use_id,
                                name: tool.name,
                            }),
                            out,
                        )?;
                    }
                    // Tool-result and image starts, and kinds added later.
                    None => self.open_block(upstream, OpenKind::Skipped, None, out)?,
                }
            }
            "contentBlockDelta" => {
                self.start(out);
                let upstream = event
                    .content_block_index
                    .ok_or("`contentBlockDelta` without `contentBlockIndex`")?;
                let delta = event.delta.ok_or("`contentBlockDelta` without `delta`")?;
                self.delta(upstream, delta, out)?;
            }
            "contentBlockStop" => {
                let upstream = event
                    .content_block_index
                    .ok_or("`contentBlockStop` without `contentBlockIndex`")?;
                self.stop_block(upstream, out);
            }
            "messageStop" => {
                self.start(out);
                self.close_all(out);
                let stop = event
                    .stop_reason
                    .as_deref()
                    .map_or(StopReason::Other, stop_reason_in);
                let sequence = stop_sequence_of(event.additional_model_response_fields)
                    .filter(|_| stop == StopReason::StopSequence);
                self.stop = Some((stop, sequence));
                if self.usage_seen {
                    self.message_stop(out);
                }
            }
            "metadata" => {
                self.start(out);
                if let Some(usage) = event.usage {
                    out.push(Event::Usage(usage.canonical()));
                }
                self.usage_seen = true;
                if self.stop.is_some() {
                    self.message_stop(out);
                }
            }
            // Event types added later.
            _ => {}
        }
        Ok(())
    }

    /// The upstream body ended: a held stop is written (without usage if `metadata` never
    /// came); otherwise the answer was cut short.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.done {
            return;
        }
        if self.stop.is_some() {
            self.message_stop(out);
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

    fn start(&mut self, out: &mut Vec<Event>) {
        if !self.started {
            self.started = true;
            out.push(Event::MessageStart {
                id: self.id.clone(),
                usage: Usage::default(),
            });
        }
    }

    fn is_open(&self, upstream: u64) -> bool {
        self.open.iter().any(|b| b.upstream == upstream)
            || self
                .redacted
                .as_ref()
                .is_some_and(|r| r.upstream == upstream)
    }

    fn open_block(
        &mut self,
        upstream: u64,
        kind: OpenKind,
        start: Option<BlockKind>,
        out: &mut Vec<Event>,
    ) -> Result<(), String> {
        if self.open.len() >= MAX_OPEN_BLOCKS {
            return Err(format!("more than {MAX_OPEN_BLOCKS} blocks open at once"));
        }
        let ours = start.map(|start| {
            let index = self.next_index;
            self.next_index = index.saturating_add(1);
            out.push(Event::BlockStart { index, kind: start });
            index
        });
        self.open.push(OpenBlock {
            upstream,
            ours,
            kind,
        });
        Ok(())
    }

    fn delta(
        &mut self,
        upstream: u64,
        delta: WireStreamDelta,
        out: &mut Vec<Event>,
    ) -> Result<(), String> {
        let (wants, value) = if let Some(text) = delta.text {
            (OpenKind::Text, Delta::Text(text))
        } else if let Some(tool) = delta.tool_use {
            (OpenKind::ToolUse, Delta::ToolArgs(tool.input))
        } else if let Some(reasoning) = delta.reasoning_content {
            if let Some(data) = reasoning.redacted_content {
                return self.redacted_delta(upstream, &data);
            } else if let Some(text) = reasoning.text {
                (OpenKind::Thinking, Delta::Thinking(text))
            } else if let Some(signature) = reasoning.signature {
                (OpenKind::Thinking, Delta::Signature(signature))
            } else {
                return Ok(());
            }
        } else {
            // Citations, tool-result and image deltas carry nothing translated.
            return Ok(());
        };
        if self
            .redacted
            .as_ref()
            .is_some_and(|r| r.upstream == upstream)
        {
            return Err(format!(
                "a text or tool delta for redacted block {upstream}"
            ));
        }
        let at = match self.open.iter().position(|b| b.upstream == upstream) {
            Some(at) => at,
            None => {
                // Converse starts text and reasoning blocks with their first delta.
                let start = match wants {
                    OpenKind::Text => BlockKind::Text,
                    OpenKind::Thinking => BlockKind::Thinking,
                    _ => {
                        return Err(format!(
                            "a toolUse delta for block {upstream}, never started"
                        ));
                    }
                };
                self.open_block(upstream, wants, Some(start), out)?;
                self.open.len() - 1
            }
        };
        let block = self.open.get(at).ok_or("a block opened and not found")?;
        if block.kind == OpenKind::Skipped {
            return Ok(());
        }
        if block.kind != wants {
            return Err(format!(
                "a {wants:?} delta for block {upstream}, which is {:?}",
                block.kind
            ));
        }
        let empty = matches!(&value, Delta::Text(s) | Delta::ToolArgs(s) | Delta::Thinking(s) | Delta::Signature(s) if s.is_empty());
        if let (Some(index), false) = (block.ours, empty) {
            out.push(Event::BlockDelta {
                index,
                delta: value,
            });
        }
        Ok(())
    }

    fn redacted_delta(&mut self, upstream: u64, data: &str) -> Result<(), String> {
        if self.open.iter().any(|b| b.upstream == upstream) {
            return Err(format!(
                "redacted content for block {upstream}, which is not redacted"
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|_| "redacted content that is not base64".to_owned())?;
        match &mut self.redacted {
            Some(r) if r.upstream == upstream => {
                if r.bytes.len().saturating_add(bytes.len()) > MAX_REDACTED_BYTES {
                    return Err(format!(
                        "a redacted reasoning block over {MAX_REDACTED_BYTES} bytes"
                    ));
                }
                r.bytes.extend_from_slice(&bytes);
            }
            Some(r) => {
                return Err(format!(
                    "redacted block {upstream} began while block {} was still open",
                    r.upstream
                ));
            }
            None => {
                self.redacted = Some(Redacted { upstream, bytes });
            }
        }
        Ok(())
    }

    /// Writes a collected redacted block whole: start and stop.
    fn flush_redacted(&mut self, out: &mut Vec<Event>) {
        if let Some(r) = self.redacted.take() {
            let index = self.next_index;
            self.next_index = index.saturating_add(1);
            out.push(Event::BlockStart {
                index,
                kind: BlockKind::RedactedThinking {
                    data: base64::engine::general_purpose::STANDARD.encode(&r.bytes),
                },
            });
            out.push(Event::BlockStop { index });
        }
    }

    fn stop_block(&mut self, upstream: u64, out: &mut Vec<Event>) {
        if self
            .redacted
            .as_ref()
            .is_some_and(|r| r.upstream == upstream)
        {
            self.flush_redacted(out);
            return;
        }
        // A stop for a block never seen is an empty text block Converse did not start.
        if let Some(at) = self.open.iter().position(|b| b.upstream == upstream)
            && let Some(index) = self.open.remove(at).ours
        {
            out.push(Event::BlockStop { index });
        }
    }

    fn close_all(&mut self, out: &mut Vec<Event>) {
        for block in std::mem::take(&mut self.open) {
            if let Some(index) = block.ours {
                out.push(Event::BlockStop { index });
            }
        }
        self.flush_redacted(out);
    }

    fn message_stop(&mut self, out: &mut Vec<Event>) {
        self.close_all(out);
        let (stop, stop_sequence) = self.stop.take().unwrap_or((StopReason::Other, None));
        out.push(Event::MessageStop {
            stop,
            stop_sequence,
        });
        self.done = true;
    }
}

// ---------------------------------------------------------------------------------------------
#[cfg(test)]
mod tests {
    //! Fixtures: `tests/fixtures/providers/bedrock/` (sources in its README); request cases
    //! reuse the OpenAI and Anthropic request fixtures through their `request_in`. Golden
    //! files: `snapshots/*bedrock*`, one per fixture, so a new case is a new file.

    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use super::*;
    use crate::canonical::{Message, Tool};

    const OTHER: Out = Out {
        max_tokens: 1024,
        family: Family::Other,
    };
    const CLAUDE: Out = Out {
        max_tokens: 1024,
        family: Family::Anthropic,
    };

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers/bedrock")
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn pretty(body: &[u8]) -> String {
        let value: serde_json::Value = serde_json::from_slice(body).expect("valid JSON");
        serde_json::to_string_pretty(&value).expect("serialises")
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("valid JSON")
    }

    fn out_json(req: &Request, out: Out) -> serde_json::Value {
        serde_json::from_slice(&request_out(req, out).expect("writes")).expect("JSON")
    }

    fn written(result: Result<Vec<u8>, Refused>) -> String {
        match result {
            Ok(body) => pretty(&body),
            Err(r) => format!("refused ({:?}): {}", r.param, r.message),
        }
    }

    /// A recorded stream: `[message-type, event-type, payload]` per message, encoded.
    fn encoded(name: &str) -> Vec<u8> {
        let messages: Vec<(String, String, serde_json::Value)> =
            serde_json::from_slice(&fixture(name)).expect(name);
        let mut bytes = Vec::new();
        for (kind, event, payload) in messages {
            bytes.extend(encode_frame(&kind, &event, payload.to_string().as_bytes()));
        }
        bytes
    }

    /// Feeds `bytes` in chunks of `size` through the decoder and the reader.
    fn events_in(bytes: &[u8], size: usize) -> Vec<Event> {
        let mut decoder = FrameDecoder::new(64 * 1024);
        let mut stream = EventsIn::new("req-1");
        let mut out = Vec::new();
        for chunk in bytes.chunks(size) {
            decoder.push(chunk);
            while let Some(frame) = decoder.next_frame().expect("frames") {
                stream.event(&frame, &mut out).expect("events");
            }
        }
        stream.finish(&mut out);
        out
    }

    fn stream_fixtures() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir())
            .expect("fixtures")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("stream-") && n.ends_with(".events.json"))
            .collect();
        names.sort();
        assert!(names.len() >= 7, "stream fixtures found: {names:?}");
        names
    }

    // -- requests -----------------------------------------------------------------------------

    #[test]
    fn requests_from_openai_clients() {
        insta::glob!(
            "../../tests/fixtures/providers/openai/requests",
            "*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                let text = match super::super::openai_chat::request_in(&body) {
                    Ok(req) => written(request_out(&req, OTHER)),
                    Err(r) => format!("refused by openai_chat::request_in: {}", r.message),
                };
                insta::assert_snapshot!(text);
            }
        );
    }

    #[test]
    fn requests_from_anthropic_clients() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "request-*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                let text = match super::super::anthropic::request_in(&body) {
                    Ok(req) => written(request_out(&req, CLAUDE)),
                    Err(r) => format!("refused by anthropic::request_in: {}", r.message),
                };
                insta::assert_snapshot!(text);
            }
        );
    }

    /// The richest request fixtures hold URL images, which Bedrock refuses: the same requests
    /// without them, to see every other block written.
    #[test]
    fn requests_without_url_images() {
        fn strip(req: &mut Request) {
            for m in &mut req.messages {
                m.content.retain(|b| {
                    !matches!(
                        b,
                        Block::Image {
                            source: ImageSource::Url(_),
                            ..
                        }
                    )
                });
            }
        }
        let mut req = super::super::anthropic::request_in(
            &std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/providers/anthropic/request-tools-thinking.json"),
            )
            .unwrap(),
        )
        .unwrap();
        strip(&mut req);
        insta::assert_snapshot!(
            "anthropic_tools_thinking",
            written(request_out(&req, CLAUDE))
        );
        let mut req = super::super::openai_chat::request_in(
            &std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/providers/openai/requests/images.json"),
            )
            .unwrap(),
        )
        .unwrap();
        strip(&mut req);
        insta::assert_snapshot!("openai_images", written(request_out(&req, OTHER)));
    }

    fn text(s: &str) -> Block {
        Block::Text(TextBlock {
            text: s.into(),
            cache: None,
        })
    }

    fn message(role: Role, content: Vec<Block>) -> Message {
        Message { role, content }
    }

    fn signed(origin: Api) -> Block {
        Block::Thinking {
            text: "think".into(),
            signature: Some(Signature {
                origin,
                value: "sig".into(),
            }),
        }
    }

    #[test]
    fn url_images_and_other_documents_are_refused() {
        let req = Request {
            messages: vec![message(
                Role::User,
                vec![Block::Image {
                    source: ImageSource::Url("https://example.com/cat.png".into()),
                    cache: None,
                }],
            )],
            ..Request::default()
        };
        let err = request_out(&req, OTHER).unwrap_err();
        assert_eq!(err.param, Some("messages"));
        assert!(err.message.contains("bytes"), "{}", err.message);

        let req = Request {
            messages: vec![message(
                Role::User,
                vec![Block::Document {
                    media_type: "text/plain".into(),
                    data: "aGk=".into(),
                    cache: None,
                }],
            )],
            ..Request::default()
        };
        assert_eq!(
            request_out(&req, OTHER).unwrap_err().param,
            Some("messages")
        );
    }

    #[test]
    fn cache_marks_become_cache_points_after_their_blocks() {
        let mark = Some(CacheMark {
            ttl: Some(CacheTtl::OneHour),
        });
        let req = Request {
            system: vec![TextBlock {
                text: "You are terse.".into(),
                cache: Some(CacheMark { ttl: None }),
            }],
            messages: vec![
                message(
                    Role::Assistant,
                    vec![Block::ToolUse {
                        id: "t1".into(),
                        name: "get_weather".into(),
                        input: raw(r#"{"city":"Paris"}"#),
                        cache: None,
                    }],
                ),
                message(
                    Role::User,
                    vec![
                        Block::Text(TextBlock {
                            text: "and now?".into(),
                            cache: mark,
                        }),
                        Block::ToolResult {
                            tool_use_id: "t1".into(),
                            content: vec![text("18C")],
                            is_error: true,
                            cache: Some(CacheMark { ttl: None }),
                        },
                    ],
                ),
            ],
            tools: vec![Tool {
                name: "get_weather".into(),
                description: None,
                input_schema: None,
                strict: Some(true),
                cache: Some(CacheMark { ttl: None }),
            }],
            ..Request::default()
        };
        let body = out_json(&req, CLAUDE);
        assert_eq!(
            body["system"],
            serde_json::json!([{"text": "You are terse."}, {"cachePoint": {"type": "default"}}])
        );
        // Tool results first; each cache point stays behind its own block.
        assert_eq!(
            body["messages"][1]["content"],
            serde_json::json!([
                {"toolResult": {"toolUseId": "t1", "content": [{"text": "18C"}], "status": "error"}},
                {"cachePoint": {"type": "default"}},
                {"text": "and now?"},
                {"cachePoint": {"type": "default", "ttl": "1h"}}
            ])
        );
        assert_eq!(
            body["toolConfig"],
            serde_json::json!({"tools": [
                {"toolSpec": {"name": "get_weather",
                              "inputSchema": {"json": {"type": "object", "properties": {}}},
                              "strict": true}},
                {"cachePoint": {"type": "default"}}
            ]})
        );
    }

    fn tool_request(choice: ToolChoice, history: bool) -> Request {
        let mut messages = vec![message(Role::User, vec![text("weather?")])];
        if history {
            messages.push(message(
                Role::Assistant,
                vec![Block::ToolUse {
                    id: "t1".into(),
                    name: "get_weather".into(),
                    input: raw("{}"),
                    cache: None,
                }],
            ));
            messages.push(message(
                Role::User,
                vec![Block::ToolResult {
                    tool_use_id: "t1".into(),
                    content: vec![text("sunny")],
                    is_error: false,
                    cache: None,
                }],
            ));
        }
        Request {
            messages,
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("Weather for a city".into()),
                input_schema: Some(raw(
                    r#"{"type":"object","properties":{"city":{"type":"string"}}}"#,
                )),
                strict: None,
                cache: None,
            }],
            tool_choice: Some(choice),
            parallel_tool_calls: Some(false),
            ..Request::default()
        }
    }

    #[test]
    fn tool_choices() {
        let choice = |c, history| out_json(&tool_request(c, history), OTHER)["toolConfig"].clone();
        assert_eq!(
            choice(ToolChoice::Auto, false)["toolChoice"],
            serde_json::json!({"auto": {}})
        );
        assert_eq!(
            choice(ToolChoice::Any, false)["toolChoice"],
            serde_json::json!({"any": {}})
        );
        assert_eq!(
            choice(ToolChoice::Tool("get_weather".into()), false)["toolChoice"],
            serde_json::json!({"tool": {"name": "get_weather"}})
        );
        // No "none" in Converse: no tools at all, unless the history needs a toolConfig.
        assert_eq!(choice(ToolChoice::None, false), serde_json::Value::Null);
        let with_history = choice(ToolChoice::None, true);
        assert!(with_history["tools"].is_array());
        assert_eq!(with_history["toolChoice"], serde_json::Value::Null);
        // parallel_tool_calls has no Converse field: dropped and named.
        let req = tool_request(ToolChoice::Auto, false);
        assert_eq!(dropped(&req, OTHER), vec!["parallel_tool_calls"]);
    }

    #[test]
    fn reasoning_by_family() {
        let req = |reasoning| Request {
            messages: vec![message(Role::User, vec![text("hi")])],
            reasoning: Some(reasoning),
            top_k: Some(40),
            ..Request::default()
        };
        let claude = out_json(&req(Reasoning::Budget(2048)), CLAUDE);
        assert_eq!(
            claude["additionalModelRequestFields"],
            serde_json::json!({"thinking": {"type": "enabled", "budget_tokens": 2048}, "top_k": 40})
        );
        let other = out_json(&req(Reasoning::Budget(20000)), OTHER);
        assert_eq!(other["outputConfig"], serde_json::json!({"effort": "high"}));
        assert_eq!(
            other["additionalModelRequestFields"],
            serde_json::Value::Null
        );
        assert_eq!(dropped(&req(Reasoning::Off), OTHER), vec!["top_k"]);
        assert!(dropped(&req(Reasoning::Off), CLAUDE).is_empty());
        assert_eq!(
            out_json(&req(Reasoning::Effort(Effort::Minimal)), CLAUDE)["outputConfig"],
            serde_json::json!({"effort": "low"})
        );
        assert_eq!(
            out_json(&req(Reasoning::Adaptive), CLAUDE)["additionalModelRequestFields"]["thinking"],
            serde_json::json!({"type": "adaptive"})
        );
        assert_eq!(
            out_json(&req(Reasoning::Off), CLAUDE)["additionalModelRequestFields"]["thinking"],
            serde_json::json!({"type": "disabled"})
        );
        assert_eq!(
            out_json(&req(Reasoning::Off), OTHER).get("outputConfig"),
            None
        );
    }

    #[test]
    fn json_schema_goes_as_schema_text() {
        let req = Request {
            messages: vec![message(Role::User, vec![text("hi")])],
            response_format: Some(ResponseFormat::JsonSchema {
                name: Some("answer".into()),
                schema: raw(r#"{"type":"object","properties":{"n":{"type":"integer"}}}"#),
                strict: Some(true),
            }),
            ..Request::default()
        };
        let body = out_json(&req, OTHER);
        assert_eq!(
            body["outputConfig"]["textFormat"],
            serde_json::json!({"type": "json_schema", "structure": {"jsonSchema": {
                "schema": r#"{"type":"object","properties":{"n":{"type":"integer"}}}"#,
                "name": "answer"}}})
        );
    }

    #[test]
    fn signatures_only_where_they_are_valid() {
        let req = Request {
            messages: vec![
                message(Role::User, vec![text("q")]),
                message(
                    Role::Assistant,
                    vec![
                        signed(Api::BedrockConverse),
                        signed(Api::AnthropicMessages),
                        signed(Api::Gemini),
                        Block::Thinking {
                            text: "unsigned".into(),
                            signature: None,
                        },
                        Block::RedactedThinking {
                            data: Signature {
                                origin: Api::OpenAiResponses,
                                value: "x".into(),
                            },
                        },
                        text("a"),
                    ],
                ),
            ],
            ..Request::default()
        };
        let count = |out: Out| {
            out_json(&req, out)["messages"][1]["content"]
                .as_array()
                .map_or(0, |c| {
                    c.iter()
                        .filter(|b| b.get("reasoningContent").is_some())
                        .count()
                })
        };
        assert_eq!(count(CLAUDE), 2, "Bedrock's and (for Claude) Anthropic's");
        assert_eq!(count(OTHER), 1, "Bedrock's only");
    }

    #[test]
    fn turns_alternate_and_system_messages_are_hoisted() {
        let req = Request {
            system: vec![TextBlock {
                text: String::new(),
                cache: None,
            }],
            messages: vec![
                message(Role::User, vec![text("one")]),
                message(Role::System, vec![text("be brief")]),
                message(Role::User, vec![text("two")]),
                message(Role::Assistant, vec![signed(Api::Gemini)]),
                message(Role::User, vec![text("three")]),
            ],
            stop: vec!["END".into()],
            ..Request::default()
        };
        let body = out_json(&req, CLAUDE);
        assert_eq!(body["system"], serde_json::json!([{"text": "be brief"}]));
        assert_eq!(
            body["messages"],
            serde_json::json!([{"role": "user", "content": [
                {"text": "one"}, {"text": "two"}, {"text": "three"}]}])
        );
        assert_eq!(body["inferenceConfig"]["maxTokens"], 1024);
        assert_eq!(
            body["inferenceConfig"]["stopSequences"],
            serde_json::json!(["END"])
        );
        assert_eq!(
            body["additionalModelResponseFieldPaths"],
            serde_json::json!(["/stop_sequence"])
        );
        assert_eq!(
            out_json(&req, OTHER).get("additionalModelResponseFieldPaths"),
            None
        );
    }

    #[test]
    fn model_ids_are_percent_encoded_in_the_path() {
        assert_eq!(
            path("anthropic.claude-3-5-sonnet-20240620-v1:0", false),
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
        );
        // As botocore's percent_encode writes an inference-profile ARN.
        assert_eq!(
            path(
                "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-7-sonnet-20250219-v1:0",
                true
            ),
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse-stream"
        );
        assert_eq!(
            Family::of("us.anthropic.claude-sonnet-4-20250514-v1:0"),
            Family::Anthropic
        );
        assert_eq!(Family::of("amazon.nova-pro-v1:0"), Family::Other);
    }

    // -- answers ------------------------------------------------------------------------------

    #[test]
    fn responses_in() {
        insta::glob!(
            "../../tests/fixtures/providers/bedrock",
            "converse-*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                insta::assert_debug_snapshot!(response_in(&body, "req-1"));
            }
        );
    }

    #[test]
    fn cache_tokens_are_not_input_tokens() {
        // totalTokens = input + output + cache: inputTokens is already uncached.
        let usage = response_in(&fixture("converse-cache-usage.json"), "r")
            .unwrap()
            .usage;
        assert_eq!(
            (
                usage.input,
                usage.cache_read,
                usage.cache_write,
                usage.output
            ),
            (Some(24), Some(3184), Some(0), Some(17))
        );
        assert_eq!(usage.processed(), 3225, "equals Bedrock's totalTokens");
        // totalTokens = input + output: inputTokens included the cache write; taken out.
        let usage = response_in(&fixture("converse-cache-usage-inclusive.json"), "r")
            .unwrap()
            .usage;
        assert_eq!((usage.input, usage.cache_write), (Some(24), Some(1129)));
        assert_eq!(usage.processed(), 1156, "equals Bedrock's totalTokens");
    }

    #[test]
    fn stop_reasons_read() {
        for (word, stop) in [
            ("end_turn", StopReason::EndTurn),
            ("tool_use", StopReason::ToolUse),
            ("max_tokens", StopReason::MaxTokens),
            ("stop_sequence", StopReason::StopSequence),
            ("guardrail_intervened", StopReason::ContentFilter),
            ("content_filtered", StopReason::ContentFilter),
            ("model_context_window_exceeded", StopReason::ContextWindow),
            ("malformed_tool_use", StopReason::Other),
            ("something_new", StopReason::Other),
        ] {
            assert_eq!(stop_reason_in(word), stop, "{word}");
        }
    }

    #[test]
    fn broken_answers_are_errors() {
        assert!(response_in(b"not json", "r").is_err());
        assert!(
            response_in(
                br#"{"output":{"message":{"content":[{"toolUse":{"name":"x"}}]}}}"#,
                "r"
            )
            .is_err()
        );
        let empty = response_in(b"{}", "r").expect("nothing is still an answer");
        assert!(empty.content.is_empty());
        assert_eq!(empty.stop, StopReason::Other);
    }

    // -- errors -------------------------------------------------------------------------------

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ErrorCase {
        status: u16,
        error_type: Option<String>,
        body: String,
    }

    fn error_case(path: &Path) -> ApiError {
        let case: ErrorCase =
            serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("case");
        error_in(
            case.status,
            case.error_type.as_deref(),
            case.body.as_bytes(),
        )
    }

    #[test]
    fn errors_in() {
        insta::glob!(
            "../../tests/fixtures/providers/bedrock",
            "error-*.json",
            |path| {
                insta::assert_debug_snapshot!(error_case(path));
            }
        );
    }

    #[test]
    fn error_kinds() {
        for (file, kind) in [
            ("error-429-throttling.json", ErrorKind::RateLimited),
            ("error-400-input-too-long.json", ErrorKind::ContextLength),
            ("error-400-validation.json", ErrorKind::InvalidRequest),
            ("error-400-quota.json", ErrorKind::QuotaExhausted),
            ("error-403-access-denied.json", ErrorKind::Permission),
            (
                "error-403-invalid-signature.json",
                ErrorKind::Authentication,
            ),
            ("error-403-expired-token.json", ErrorKind::Authentication),
            ("error-404-not-found.json", ErrorKind::NotFound),
            ("error-408-model-timeout.json", ErrorKind::Timeout),
            ("error-424-model-error.json", ErrorKind::Server),
            ("error-429-model-not-ready.json", ErrorKind::Overloaded),
            ("error-500-internal.json", ErrorKind::Server),
            ("error-503-unavailable.json", ErrorKind::Overloaded),
            ("error-502-not-json.json", ErrorKind::Server),
        ] {
            assert_eq!(error_case(&dir().join(file)).kind, kind, "{file}");
        }
        // Without a name, the status decides; a long message is clipped.
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(5000));
        let e = error_in(413, None, long.as_bytes());
        assert_eq!(e.kind, ErrorKind::RequestTooLarge);
        assert_eq!(e.message.len(), MAX_UPSTREAM_MESSAGE_BYTES);
        assert_eq!(error_in(503, None, b"").kind, ErrorKind::Overloaded);
    }

    // -- event-stream frames ------------------------------------------------------------------

    #[test]
    fn frames_round_trip_at_any_boundary() {
        let mut bytes = encode_frame("event", "messageStart", br#"{"role":"assistant"}"#);
        bytes.extend(encode_frame(
            "exception",
            "throttlingException",
            br#"{"message":"slow"}"#,
        ));
        bytes.extend(encode_frame("error", "InternalFailure", b"broken"));
        for size in 1..=bytes.len() {
            let mut decoder = FrameDecoder::new(1024);
            let mut frames = Vec::new();
            for chunk in bytes.chunks(size) {
                decoder.push(chunk);
                while let Some(f) = decoder.next_frame().expect("frame") {
                    frames.push(OwnedFrame::of(&f));
                }
            }
            assert_eq!(frames.len(), 3, "chunk size {size}");
            assert_eq!(frames[0].kind, FrameKind::Event);
            assert_eq!(frames[0].name, "messageStart");
            assert_eq!(&frames[0].payload[..], br#"{"role":"assistant"}"#);
            assert_eq!(frames[1].kind, FrameKind::Exception);
            assert_eq!(frames[1].name, "throttlingException");
            assert_eq!(frames[2].kind, FrameKind::Error);
            assert_eq!(frames[2].message.as_deref(), Some("broken"));
        }
    }

    /// A decoded frame kept past the decoder's next push.
    #[derive(Debug, PartialEq)]
    struct OwnedFrame {
        kind: FrameKind,
        name: String,
        message: Option<String>,
        payload: Vec<u8>,
    }

    impl OwnedFrame {
        fn of(f: &Frame<'_>) -> Self {
            Self {
                kind: f.kind,
                name: f.name.to_owned(),
                message: f.message.map(str::to_owned),
                payload: f.payload.to_vec(),
            }
        }
    }

    #[test]
    fn broken_frames_are_errors_and_stay_broken() {
        let good = encode_frame("event", "messageStart", br#"{"role":"assistant"}"#);

        let mut corrupt = good.clone();
        let last = corrupt.len() - 6;
        corrupt[last] ^= 0xff; // a payload byte: the message CRC no longer matches
        let mut d = FrameDecoder::new(1024);
        d.push(&corrupt);
        assert!(d.next_frame().is_err());
        d.push(&good);
        assert!(
            d.next_frame().is_err(),
            "no resynchronising after a broken message"
        );

        let mut d = FrameDecoder::new(good.len() - 1);
        d.push(&good[..4]);
        let err = d.next_frame().unwrap_err();
        assert!(err.contains("over the limit"), "{err}");

        let mut d = FrameDecoder::new(1024);
        d.push(&[0, 0, 0, 3, 1, 2, 3, 4]);
        assert!(d.next_frame().is_err());

        let mut d = FrameDecoder::new(1024);
        d.push(&good[..good.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
    }

    // -- streams ------------------------------------------------------------------------------

    #[test]
    fn streams_in() {
        insta::glob!(
            "../../tests/fixtures/providers/bedrock",
            "stream-*.events.json",
            |path| {
                let name = path.file_name().and_then(|n| n.to_str()).expect("name");
                insta::assert_debug_snapshot!(events_in(&encoded(name), 7));
            }
        );
    }

    /// The seeds of the `translate_stream_bedrock` fuzz target (`fuzz/corpus/`): each stream
    /// fixture encoded here, after the target's header (client byte, then flags, chunk seed,
    /// timeout as `fuzz_targets/common/translate_stream.rs` reads them). The committed files
    /// must be what this writes; `MODELGATE_WRITE_FUZZ_SEEDS=1` rewrites them.
    #[test]
    fn fuzz_seeds_are_the_encoded_stream_fixtures() {
        let corpus =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/translate_stream_bedrock");
        let write = std::env::var_os("MODELGATE_WRITE_FUZZ_SEEDS").is_some();
        // (suffix, client: 0 OpenAI chat, 1 Anthropic, 2 Responses (| 0x80: lines), header)
        let variants: [(&str, u8, [u8; 3]); 6] = [
            ("chat", 0, [0, 0, 0]),
            ("chat.usage-cut13", 0, [0x61, 7, 0]),
            ("anthropic.cut5", 1, [0x40, 3, 0]),
            ("responses.usage-cut13", 2, [0x61, 7, 0]),
            ("lines.anthropic", 0x81, [0, 0, 0]),
            ("lines.responses.cut5", 0x82, [0x40, 3, 0]),
        ];
        for name in stream_fixtures() {
            let stream = encoded(&name);
            // The target's other form (client byte | 0x80): one line per message,
            // `message-type event-type payload`, framed by the target itself.
            let messages: Vec<(String, String, serde_json::Value)> =
                serde_json::from_slice(&fixture(&name)).expect("fixture");
            let lines = messages
                .iter()
                .map(|(kind, event, payload)| format!("{kind} {event} {payload}"))
                .collect::<Vec<_>>()
                .join("\n");
            let stem = name.trim_end_matches(".events.json");
            for (suffix, client, header) in variants {
                let mut seed = vec![client];
                seed.extend(header);
                if client & 0x80 == 0 {
                    seed.extend(&stream);
                } else {
                    seed.extend(lines.as_bytes());
                }
                let path = corpus.join(format!("{stem}.{suffix}.bin"));
                if write {
                    std::fs::create_dir_all(&corpus).expect("corpus directory");
                    std::fs::write(&path, &seed).expect("seed written");
                } else {
                    let committed = std::fs::read(&path).unwrap_or_else(|e| {
                        panic!(
                            "{}: {e} (MODELGATE_WRITE_FUZZ_SEEDS=1 writes it)",
                            path.display()
                        )
                    });
                    assert!(committed == seed, "{} is stale", path.display());
                }
            }
        }
    }

    #[test]
    fn any_chunking_gives_the_same_events() {
        for name in stream_fixtures() {
            let bytes = encoded(&name);
            let whole = events_in(&bytes, bytes.len());
            for size in [1, 2, 3, 5, 13, 64] {
                assert_eq!(events_in(&bytes, size), whole, "{name}, chunks of {size}");
            }
        }
    }

    #[test]
    fn every_stream_is_well_formed() {
        for name in stream_fixtures() {
            let events = events_in(&encoded(&name), 11);
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

    /// The answer a client accumulates from events: blocks (kind, text), signatures, usage,
    /// stop.
    type Accumulated = (
        Vec<(BlockKind, String)>,
        Vec<String>,
        Usage,
        Option<StopReason>,
    );

    fn accumulate(events: &[Event]) -> Accumulated {
        let mut blocks: Vec<(BlockKind, String)> = Vec::new();
        let mut signatures = Vec::new();
        let mut usage = Usage::default();
        let mut stop = None;
        for event in events {
            match event {
                Event::BlockStart { kind, .. } => blocks.push((kind.clone(), String::new())),
                Event::BlockDelta { index, delta } => match delta {
                    Delta::Signature(s) => signatures.push(s.clone()),
                    Delta::Text(s) | Delta::ToolArgs(s) | Delta::Thinking(s) => {
                        blocks[*index as usize].1.push_str(s)
                    }
                },
                Event::Usage(u) => usage.merge(*u),
                Event::MessageStop { stop: s, .. } => stop = Some(*s),
                _ => {}
            }
        }
        (blocks, signatures, usage, stop)
    }

    #[test]
    fn streamed_answer_equals_the_same_answer_as_json() {
        for (stream, whole) in [
            ("stream-text.events.json", "converse-text.json"),
            ("stream-tool-use.events.json", "converse-tool-use.json"),
            ("stream-reasoning.events.json", "converse-reasoning.json"),
            (
                "stream-cache-usage.events.json",
                "converse-cache-usage.json",
            ),
        ] {
            let (mut blocks, signatures, usage, stop) = accumulate(&events_in(&encoded(stream), 5));
            for (kind, args) in &mut blocks {
                if matches!(kind, BlockKind::ToolUse { .. }) {
                    let v: serde_json::Value = serde_json::from_str(args).expect(stream);
                    *args = v.to_string();
                }
            }
            let resp = response_in(&fixture(whole), "req-1").expect(whole);
            let (want, want_signatures, want_usage, want_stop) =
                accumulate(&super::super::events_of(&resp));
            let want: Vec<(BlockKind, String)> = want
                .into_iter()
                .map(|(kind, args)| match kind {
                    BlockKind::ToolUse { .. } => {
                        let v: serde_json::Value = serde_json::from_str(&args).expect(whole);
                        (kind, v.to_string())
                    }
                    _ => (kind, args),
                })
                .collect();
            assert_eq!(blocks, want, "{stream}");
            assert_eq!(signatures, want_signatures, "{stream}");
            assert_eq!(usage, want_usage, "{stream}");
            assert_eq!(stop, want_stop, "{stream}");
        }
    }

    #[test]
    fn message_stop_waits_for_the_usage() {
        let bytes = encoded("stream-text.events.json");
        let mut decoder = FrameDecoder::new(4096);
        decoder.push(&bytes);
        let mut stream = EventsIn::new("req-1");
        let mut out = Vec::new();
        let mut kinds = Vec::new();
        while let Some(frame) = decoder.next_frame().unwrap() {
            out.clear();
            stream.event(&frame, &mut out).unwrap();
            kinds.push((frame.name.to_owned(), out.len()));
        }
        // messageStop writes nothing; metadata writes the usage, then the stop.
        assert_eq!(kinds[4], ("messageStop".into(), 0));
        assert!(matches!(
            out.as_slice(),
            [Event::Usage(_), Event::MessageStop { .. }]
        ));
    }

    #[test]
    fn stream_exceptions_have_their_kind() {
        let events = events_in(&encoded("stream-throttled.events.json"), 9);
        let Some(Event::Error(e)) = events.last() else {
            panic!("{events:?}")
        };
        assert_eq!((e.status, e.kind), (429, ErrorKind::RateLimited));
        for (name, status, kind) in [
            ("validationException", 400, ErrorKind::InvalidRequest),
            ("modelStreamErrorException", 424, ErrorKind::Server),
            ("serviceUnavailableException", 503, ErrorKind::Overloaded),
            ("internalServerException", 500, ErrorKind::Server),
            ("modelTimeoutException", 408, ErrorKind::Timeout),
        ] {
            let bytes = encode_frame("exception", name, br#"{"message":"m"}"#);
            let events = events_in(&bytes, 4);
            assert!(
                matches!(events.as_slice(), [Event::MessageStart { .. }, Event::Error(e)]
                    if e.status == status && e.kind == kind),
                "{name}: {events:?}"
            );
        }
        let bytes = encode_frame(
            "exception",
            "validationException",
            br#"{"message":"Input is too long for requested model."}"#,
        );
        let events = events_in(&bytes, 100);
        assert!(
            matches!(events.last(), Some(Event::Error(e)) if e.kind == ErrorKind::ContextLength)
        );
    }

    #[test]
    fn stream_protocol_errors_are_errors() {
        let read = |frames: &[(&str, &str)]| {
            let mut stream = EventsIn::new("r");
            let mut out = Vec::new();
            let mut result = Ok(());
            for (name, payload) in frames {
                let frame = Frame {
                    kind: FrameKind::Event,
                    name,
                    message: None,
                    payload: payload.as_bytes(),
                };
                result = result.and(stream.event(&frame, &mut out));
            }
            result
        };
        assert!(read(&[("messageStart", "not json")]).is_err());
        assert!(read(&[("messageStart", "{}"), ("messageStart", "{}")]).is_err());
        assert!(read(&[("contentBlockDelta", r#"{"delta":{"text":"x"}}"#)]).is_err());
        assert!(
            read(&[(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"toolUse":{"input":"{"}}}"#
            )])
            .is_err(),
            "tool arguments for a block never started"
        );
        assert!(
            read(&[
                (
                    "contentBlockDelta",
                    r#"{"contentBlockIndex":0,"delta":{"text":"x"}}"#
                ),
                (
                    "contentBlockDelta",
                    r#"{"contentBlockIndex":0,"delta":{"reasoningContent":{"text":"y"}}}"#
                ),
            ])
            .is_err(),
            "thinking into a text block"
        );
        assert!(
            read(&[(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"reasoningContent":{"redactedContent":"%%%"}}}"#
            )])
            .is_err()
        );
        assert!(
            read(&[
                ("somethingNew", "{}"),
                ("contentBlockStop", r#"{"contentBlockIndex":9}"#)
            ])
            .is_ok()
        );
    }

    #[test]
    fn tool_calls_past_the_cap_end_the_stream() {
        let mut stream = EventsIn::new("r");
        let mut out = Vec::new();
        for i in 0..=MAX_STREAM_TOOL_CALLS {
            let payload = format!(
                r#"{{"contentBlockIndex":{i},"start":{{"toolUse":{{"toolUseId":"t{i}","name":"f"}}}}}}"#
            );
            let frame = Frame {
                kind: FrameKind::Event,
                name: "contentBlockStart",
                message: None,
                payload: payload.as_bytes(),
            };
            stream.event(&frame, &mut out).unwrap();
            let index = format!(r#"{{"contentBlockIndex":{i}}}"#);
            let stop = Frame {
                kind: FrameKind::Event,
                name: "contentBlockStop",
                message: None,
                payload: index.as_bytes(),
            };
            stream.event(&stop, &mut out).unwrap();
        }
        assert!(matches!(out.last(), Some(Event::Error(e)) if e.status == 502));
    }

    /// What AWS's own decoder (`aws_smithy_eventstream::frame::read_message_from`) makes of
    /// one message, in `FrameDecoder`'s terms: `None` where it refuses the bytes or they are
    /// not a frame the gateway reads.
    fn aws_frame(bytes: &[u8]) -> Option<OwnedFrame> {
        let m = aws_smithy_eventstream::frame::read_message_from(bytes).ok()?;
        let header = |name: &str| {
            m.headers()
                .iter()
                .find(|h| h.name().as_str() == name)
                .and_then(|h| h.value().as_string().ok())
                .map(|s| s.as_str().to_owned())
        };
        let (kind, name) = match header(":message-type")?.as_str() {
            "event" => (FrameKind::Event, ":event-type"),
            "exception" => (FrameKind::Exception, ":exception-type"),
            "error" => (FrameKind::Error, ":error-code"),
            _ => return None,
        };
        Some(OwnedFrame {
            kind,
            name: header(name)?,
            message: header(":error-message"),
            payload: m.payload().to_vec(),
        })
    }

    fn our_frame(bytes: &[u8]) -> Option<OwnedFrame> {
        let mut d = FrameDecoder::new(1 << 20);
        d.push(bytes);
        d.next_frame().ok().flatten().map(|f| OwnedFrame::of(&f))
    }

    /// A message with headers of every type the format has, written by AWS's crate.
    fn message_with(headers: Vec<(String, HeaderValue)>, payload: &[u8]) -> Vec<u8> {
        let mut m = StreamMessage::new(Bytes::copy_from_slice(payload));
        for (name, value) in headers {
            m = m.add_header(Header::new(name, value));
        }
        let mut out = Vec::new();
        write_message_to(&m, &mut out).expect("writes");
        out
    }

    fn header_value() -> impl Strategy<Value = HeaderValue> {
        prop_oneof![
            any::<bool>().prop_map(HeaderValue::Bool),
            any::<i8>().prop_map(HeaderValue::Byte),
            any::<i16>().prop_map(HeaderValue::Int16),
            any::<i32>().prop_map(HeaderValue::Int32),
            any::<i64>().prop_map(HeaderValue::Int64),
            proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| HeaderValue::ByteArray(Bytes::from(b))),
            "(event|exception|error|messageStart|metadata|x|)"
                .prop_map(|s| HeaderValue::String(s.into())),
            any::<i64>().prop_map(|ms| HeaderValue::Timestamp(
                aws_smithy_types::DateTime::from_millis(ms / 1000)
            )),
            any::<u128>().prop_map(HeaderValue::Uuid),
        ]
    }

    proptest! {
        /// Whole messages with headers of every type, as written, then with one byte
        /// changed (and then with their checksums made right): the in-place decoder reads
        /// each exactly as AWS's decoder does.
        #[test]
        fn the_decoder_reads_messages_as_aws_s_decoder_does(
            headers in proptest::collection::vec(
                ("(:message-type|:event-type|:exception-type|:error-code|:error-message|:content-type|x)", header_value()),
                0..6,
            ),
            payload in proptest::collection::vec(any::<u8>(), 0..40),
            flip in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        ) {
            let mut bytes = message_with(headers, &payload);
            prop_assert_eq!(our_frame(&bytes), aws_frame(&bytes));
            if let Some((at, mask)) = flip {
                let at = at.index(bytes.len());
                bytes[at] ^= mask;
                prop_assert_eq!(our_frame(&bytes), aws_frame(&bytes));
                // The same change with both checksums made right again, so that the
                // lengths, names, types and values are what is read.
                if at >= 8 {
                    let crc = crc32fast::hash(&bytes[..8]).to_be_bytes();
                    bytes[8..12].copy_from_slice(&crc);
                }
                let end = bytes.len() - 4;
                let crc = crc32fast::hash(&bytes[..end]).to_be_bytes();
                bytes[end..].copy_from_slice(&crc);
                prop_assert_eq!(our_frame(&bytes), aws_frame(&bytes));
            }
        }

        #[test]
        fn the_decoder_refuses_what_aws_s_decoder_refuses(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            prop_assert_eq!(our_frame(&bytes), aws_frame(&bytes));
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), size in 1usize..32) {
            let mut d = FrameDecoder::new(128);
            for chunk in bytes.chunks(size) {
                d.push(chunk);
                while let Ok(Some(_)) = d.next_frame() {}
            }
        }

        #[test]
        fn readers_never_panic(payload in ".{0,200}", name in "(messageStart|contentBlockStart|contentBlockDelta|contentBlockStop|messageStop|metadata|x)") {
            let _ = response_in(payload.as_bytes(), "r");
            let _ = error_in(400, Some(&name), payload.as_bytes());
            let mut stream = EventsIn::new("r");
            let mut out = Vec::new();
            let frame = Frame { kind: FrameKind::Event, name: &name, message: None, payload: payload.as_bytes() };
            let _ = stream.event(&frame, &mut out);
            stream.finish(&mut out);
        }
    }
}
