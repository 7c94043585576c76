//! Google Gemini `generateContent` in and out of the canonical model: used by `gemini`
//! (Generative Language API) and `vertex` (Vertex AI, the same JSON at another URL) backends
//! of translated clients. Requests go out; answers, streams and errors come in. The model is
//! in the URL (the provider's), so no body here names it.
//!
//! ```text
//!  Request ─► request_out ─► generateContent body
//!  generateContent answer ─► response_in ─► Response
//!  streamGenerateContent?alt=sse data ─► EventsIn ─► Event*
//!  {"error": {code, message, status, details}} ─► error_in ─► ApiError
//! ```
//!
//! **Thought signatures across turns.** Gemini 2.5 and 3 put an opaque `thoughtSignature` on
//! `functionCall` parts (on the first of parallel calls, on each call of a multi-step turn),
//! and Gemini 3 answers 400 when a `functionCall` in the history comes back without it. No
//! client dialect has a field for it, but every client echoes tool call ids verbatim. So the
//! signature rides in the id the client sees:
//!
//! ```text
//!  <id>_gts_<signature as base64url, unpadded>_<length of that base64url text>
//! ```
//!
//! `<id>` is Gemini's `functionCall.id`, or, when Gemini gives none, one made from the
//! answer's `responseId` and the call's position (`gmcall_<responseId>_<n>`; such ids are not
//! sent back to Gemini, which never issued them). The whole id stays in `[A-Za-z0-9_-]`, what
//! Anthropic and OpenAI clients accept; the trailing length makes it parse back exactly even
//! when `<id>` holds the marker. `request_out` splits the id of each assistant tool call back
//! into `functionCall.id` and the part's `thoughtSignature` (standard base64, as Gemini sent
//! it), and sends a tool result's `functionResponse.id` without the signature. Signatures can
//! be large (Google sets no bound; the SDK has seen SSE lines over 128 KiB), and so can these
//! ids. Thought parts (`thought: true`) become `Thinking` blocks whose signature has origin
//! `Api::Gemini`; only such blocks go back to Gemini, as `{text, thought: true,
//! thoughtSignature}`. A signature on a plain text part (Gemini 3 puts one on the last part of
//! an answer without function calls; returning it is advised, not required) has no canonical
//! place and is dropped.
//!
//! Other choices, documented where they are made: URL images become `fileData` with the type
//! read from the URL's extension; tool results become `functionResponse {name, response:
//! {output | error}}`, the name found from the assistant's call with that id; a prompt blocked
//! by `promptFeedback.blockReason` is a `ContentFilter` answer with no content (Gemini answers
//! it with 200 and usage); `Reasoning` maps to `thinkingConfig` by `ThinkingStyle`. Usage:
//! `input` = `promptTokenCount − cachedContentTokenCount + toolUsePromptTokenCount` (the prompt
//! count includes cached tokens), `output` = `candidatesTokenCount + thoughtsTokenCount` (the
//! candidates count excludes thinking), `reasoning` = `thoughtsTokenCount`. Wire details and
//! sources: `docs/providers.md` 3.6 and `tests/fixtures/providers/gemini/README.md`.

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use super::{MAX_STREAM_TOOL_CALLS, Refused};
use crate::canonical::{
    Api, ApiError, Block, BlockKind, Delta, Effort, ErrorKind, Event, ImageSource, Reasoning,
    Request, Response, ResponseFormat, Role, Signature, StopReason, TextBlock, ToolChoice, Usage,
};

/// The two fragments of Gemini's 400 for a prompt over the context window: "The input token
/// count (N) exceeds the maximum number of tokens allowed (M)." Seen in many recorded
/// answers (google-gemini/gemini-cli issues 4231, 6678, 12214), not documented: the one place
/// to change when Google rewords it.
pub const INPUT_TOO_LONG: [&str; 2] = [
    "input token count",
    "exceeds the maximum number of tokens allowed",
];

/// How Gemini's 400 for a body over its size limit begins ("Request payload size exceeds the
/// limit: N bytes."); community-reported wording.
pub const PAYLOAD_TOO_LARGE: &str = "Request payload size exceeds the limit";

/// Most stop sequences Gemini takes (`generationConfig.stopSequences`: "up to 5").
pub const MAX_STOP_SEQUENCES: usize = 5;

/// Most upstream text copied into an error message.
const MAX_UPSTREAM_MESSAGE_BYTES: usize = 1024;

/// Most of a parser's complaint copied into an error (serde quotes the offending value).
const MAX_PARSE_ERROR_BYTES: usize = 200;

/// Most of a response id used to make tool call ids.
const MAX_ID_SEED_BYTES: usize = 64;

/// The start of a tool call id the gateway made up (Gemini gave none): never sent back.
const GENERATED_ID_PREFIX: &str = "gmcall_";

/// Between a tool call's id and the thought signature it carries (module doc).
const SIGNATURE_MARK: &str = "_gts_";

/// Which `thinkingConfig` field a model takes for a requested reasoning effort.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ThinkingStyle {
    /// `thinkingLevel` (`MINIMAL`, `LOW`, `MEDIUM`, `HIGH`): Gemini 3 and later, where a budget
    /// still works but is discouraged. A budget asked for becomes a level: < 4096 `LOW`,
    /// < 16384 `MEDIUM`, else `HIGH`.
    #[default]
    Level,
    /// `thinkingBudget` in tokens: Gemini 2.5, which has no levels. An effort becomes a budget:
    /// minimal 512, low 1024, medium 8192, high and above 24576 (inside every 2.5 model's range).
    Budget,
}

impl ThinkingStyle {
    /// The style for an upstream model name: `gemini-1*` and `gemini-2*` take budgets, the rest
    /// levels. A name the gateway does not recognise gets levels (the current API's).
    pub fn for_model(model: &str) -> Self {
        let name = model.rsplit('/').next().unwrap_or(model);
        if name.starts_with("gemini-1") || name.starts_with("gemini-2") {
            Self::Budget
        } else {
            Self::Level
        }
    }
}

/// How the request for a Gemini backend is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Out {
    /// `maxOutputTokens` to send when the client gave none (`None`: send none; Gemini has a
    /// model default, so none is required).
    pub max_tokens: Option<u64>,
    /// Levels or budgets for `thinkingConfig` (`ThinkingStyle::for_model`).
    pub thinking: ThinkingStyle,
}

// ---------------------------------------------------------------------------------------------
// Tool call ids

/// A lenient reader for the signatures Gemini sends: standard alphabet, padding optional.
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The same for a signature that arrives URL-safe.
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The id a client sees for a call with `signature` (module doc). A signature that is not
/// base64 cannot ride in an id and is dropped (Gemini always sends base64: it is `bytes`).
fn join_tool_id(base: &str, signature: Option<&str>) -> String {
    let bytes = signature.and_then(|s| {
        STANDARD_LENIENT
            .decode(s)
            .or_else(|_| URL_SAFE_LENIENT.decode(s))
            .ok()
    });
    match bytes {
        Some(bytes) if !bytes.is_empty() => {
            let sig = URL_SAFE_NO_PAD.encode(bytes);
            format!("{base}{SIGNATURE_MARK}{sig}_{}", sig.len())
        }
        _ => base.to_owned(),
    }
}

/// A client's tool call id split into Gemini's id and the signature it carries (standard
/// base64); an id the gateway did not make comes back whole, with no signature.
fn split_tool_id(id: &str) -> (&str, Option<String>) {
    let parsed = (|| {
        let (rest, len) = id.rsplit_once('_')?;
        if len.is_empty() || len.len() > 10 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let len: usize = len.parse().ok()?;
        let start = rest.len().checked_sub(len)?;
        let sig = rest.get(start..)?;
        let base = rest.get(..start)?.strip_suffix(SIGNATURE_MARK)?;
        let bytes = URL_SAFE_NO_PAD.decode(sig).ok()?;
        (!bytes.is_empty()).then(|| (base, STANDARD.encode(bytes)))
    })();
    match parsed {
        Some((base, sig)) => (base, Some(sig)),
        None => (id, None),
    }
}

/// An id for the `n`th call of an answer whose id is `seed`, when Gemini gave the call none:
/// the same for the JSON and the streamed form of one answer.
fn generated_id(seed: &str, n: usize) -> String {
    let mut id = String::with_capacity(GENERATED_ID_PREFIX.len() + MAX_ID_SEED_BYTES + 8);
    id.push_str(GENERATED_ID_PREFIX);
    id.extend(
        seed.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(MAX_ID_SEED_BYTES),
    );
    id.push('_');
    id.push_str(&n.to_string());
    id
}

/// The `id` to send for a call or a result: Gemini's own, never one the gateway made up.
fn sent_id(base: &str) -> Option<&str> {
    (!base.is_empty() && !base.starts_with(GENERATED_ID_PREFIX)).then_some(base)
}

// ---------------------------------------------------------------------------------------------
// Requests out

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutRequest<'a> {
    contents: Vec<OutContent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<OutSystem<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<OutToolConfig<'a>>,
    #[serde(skip_serializing_if = "OutGenerationConfig::is_empty")]
    generation_config: OutGenerationConfig<'a>,
}

#[derive(Serialize)]
struct OutSystem<'a> {
    parts: Vec<OutPart<'a>>,
}

#[derive(Serialize)]
struct OutContent<'a> {
    role: &'static str,
    parts: Vec<OutPart<'a>>,
}

/// One part: exactly one of the data fields is set (Gemini's `Part` is a union), plus the
/// thought flag and signature where they belong.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct OutPart<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inline_data: Option<OutBlob<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_data: Option<OutFileData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<OutFunctionCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_response: Option<OutFunctionResponse<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought_signature: Option<Cow<'a, str>>,
    /// A function response, or media from a tool result: these open their turn.
    #[serde(skip)]
    answers_a_call: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutBlob<'a> {
    mime_type: &'a str,
    data: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutFileData<'a> {
    mime_type: &'static str,
    file_uri: &'a str,
}

#[derive(Serialize)]
struct OutFunctionCall<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    name: &'a str,
    args: Json<'a>,
}

#[derive(Serialize)]
struct OutFunctionResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    name: &'a str,
    response: OutResult<'a>,
}

/// `{"output": text}` or `{"error": text}`: the keys Gemini's `FunctionResponse.response`
/// names for a function's output and its failure.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum OutResult<'a> {
    Output(Cow<'a, str>),
    Error(Cow<'a, str>),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutTool<'a> {
    function_declarations: Vec<OutFunction<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    /// Any JSON schema, passed as it came (`parameters` takes only Google's OpenAPI subset).
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<&'a RawValue>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutToolConfig<'a> {
    function_calling_config: OutCallingConfig<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutCallingConfig<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_function_names: Option<[&'a str; 1]>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct OutGenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_config: Option<OutThinking>,
}

impl OutGenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.top_k.is_none()
            && self.max_output_tokens.is_none()
            && self.stop_sequences.is_empty()
            && self.response_mime_type.is_none()
            && self.thinking_config.is_none()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutThinking {
    #[serde(skip_serializing_if = "Option::is_none")]
    include_thoughts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_budget: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_level: Option<&'static str>,
}

/// JSON written into a body: the model's or client's bytes, or `{}`.
#[derive(Serialize)]
#[serde(untagged)]
enum Json<'a> {
    Raw(&'a RawValue),
    EmptyObject(EmptyObject),
}

struct EmptyObject;

impl Serialize for EmptyObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
}

/// A call's arguments: Gemini's `args` is an object; anything else becomes `{}`.
fn args_out(raw: &RawValue) -> Json<'_> {
    if raw.get().trim_start().starts_with('{') {
        Json::Raw(raw)
    } else {
        Json::EmptyObject(EmptyObject)
    }
}

fn refuse(message: impl Into<String>) -> Refused {
    Refused::new(Some("messages"), message)
}

/// The fields of `req` a Gemini backend drops: to be named in `x-modelgate-ignored-params`
/// with the client's own (`request_out` takes the request by reference and cannot add them).
/// `user`: Gemini has no end-user field. `parallel_tool_calls: false`: Gemini has no switch.
pub fn ignored(req: &Request) -> Vec<&'static str> {
    let mut names = Vec::new();
    if req.user.is_some() {
        names.push("user");
    }
    if req.parallel_tool_calls == Some(false) {
        names.push("parallel_tool_calls");
    }
    names
}

/// The generateContent body for a Gemini or Vertex backend (the model goes in the URL).
///
/// Refused (400 naming the field): a tool result whose call is not in the request (Gemini
/// needs the function's name), an image URL that is not `http(s)://` or `gs://` or whose
/// type its extension does not say, a system message holding more than text, more than
/// `MAX_STOP_SEQUENCES` stop sequences. Dropped: thinking not signed by Gemini, redacted
/// thinking, cache marks, `strict`, and what `ignored` names.
pub fn request_out(req: &Request, out: Out) -> Result<Vec<u8>, Refused> {
    let mut system: Vec<OutPart> = req
        .system
        .iter()
        .filter(|t| !t.text.is_empty())
        .map(|t| text_part(&t.text))
        .collect();
    let mut contents: Vec<OutContent> = Vec::with_capacity(req.messages.len());
    // Each assistant call's function name, by the id the client echoed and by Gemini's id.
    let mut calls: HashMap<&str, &str> = HashMap::new();
    for message in &req.messages {
        let role = match message.role {
            Role::System => {
                // Gemini's system instruction is top level: hoisted, in order.
                for block in &message.content {
                    let Block::Text(text) = block else {
                        return Err(refuse("a system message can only hold text"));
                    };
                    if !text.text.is_empty() {
                        system.push(text_part(&text.text));
                    }
                }
                continue;
            }
            Role::User => "user",
            Role::Assistant => "model",
        };
        let mut parts = Vec::with_capacity(message.content.len());
        for block in &message.content {
            block_out(block, &mut calls, &mut parts)?;
        }
        if parts.is_empty() {
            continue;
        }
        // Consecutive turns of one role become one content.
        match contents.last_mut() {
            Some(last) if last.role == role => last.parts.append(&mut parts),
            _ => contents.push(OutContent { role, parts }),
        }
    }
    for content in &mut contents {
        if content.role == "user" {
            // Function responses open the turn that answers the calls, all together, then
            // the media of those results, then the rest (stable: order kept within each).
            content
                .parts
                .sort_by_key(|p| (p.function_response.is_none(), !p.answers_a_call));
        }
    }

    if req.stop.len() > MAX_STOP_SEQUENCES {
        return Err(Refused::new(
            Some("stop_sequences"),
            format!(
                "a Gemini backend takes at most {MAX_STOP_SEQUENCES} stop sequences, not {}",
                req.stop.len()
            ),
        ));
    }

    let tools: Vec<OutTool> = if req.tools.is_empty() {
        Vec::new()
    } else {
        vec![OutTool {
            function_declarations: req
                .tools
                .iter()
                .map(|tool| OutFunction {
                    name: &tool.name,
                    description: tool.description.as_deref(),
                    parameters_json_schema: tool.input_schema.as_deref(),
                })
                .collect(),
        }]
    };
    let tool_config = match &req.tool_choice {
        // A choice means nothing without functions to choose from.
        _ if tools.is_empty() => None,
        None => None,
        Some(choice) => Some(OutToolConfig {
            function_calling_config: match choice {
                ToolChoice::Auto => calling("AUTO", None),
                ToolChoice::Any => calling("ANY", None),
                ToolChoice::None => calling("NONE", None),
                ToolChoice::Tool(name) => calling("ANY", Some([name.as_str()])),
            },
        }),
    };

    let (response_mime_type, response_json_schema) = match &req.response_format {
        None | Some(ResponseFormat::Text) => (None, None),
        Some(ResponseFormat::JsonObject) => (Some("application/json"), None),
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            (Some("application/json"), Some(&**schema))
        }
    };

    let body = OutRequest {
        contents,
        system_instruction: (!system.is_empty()).then_some(OutSystem { parts: system }),
        tools,
        tool_config,
        generation_config: OutGenerationConfig {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            max_output_tokens: req.max_output_tokens.or(out.max_tokens),
            stop_sequences: &req.stop,
            response_mime_type,
            response_json_schema,
            thinking_config: req.reasoning.map(|r| thinking_out(r, out.thinking)),
        },
    };
    serde_json::to_vec(&body).map_err(|e| Refused::new(None, e.to_string()))
}

fn calling<'a>(mode: &'static str, names: Option<[&'a str; 1]>) -> OutCallingConfig<'a> {
    OutCallingConfig {
        mode,
        allowed_function_names: names,
    }
}

/// `Reasoning` as `thinkingConfig`. Off: a budget of 0 (models that cannot stop thinking,
/// Gemini 2.5 Pro and 3 Pro, answer 400, passed on). Anything else asks for the thoughts
/// (`includeThoughts`), which come back as thinking blocks. Adaptive: the model's dynamic
/// thinking (`thinkingBudget: -1`, or no level at all, whose default is dynamic).
fn thinking_out(reasoning: Reasoning, style: ThinkingStyle) -> OutThinking {
    let level = |l: &'static str| OutThinking {
        include_thoughts: Some(true),
        thinking_budget: None,
        thinking_level: Some(l),
    };
    let budget = |b: i64| OutThinking {
        include_thoughts: Some(true),
        thinking_budget: Some(b),
        thinking_level: None,
    };
    match (reasoning, style) {
        (Reasoning::Off, _) => OutThinking {
            include_thoughts: None,
            thinking_budget: Some(0),
            thinking_level: None,
        },
        (Reasoning::Adaptive, ThinkingStyle::Level) => OutThinking {
            include_thoughts: Some(true),
            thinking_budget: None,
            thinking_level: None,
        },
        (Reasoning::Adaptive, ThinkingStyle::Budget) => budget(-1),
        (Reasoning::Effort(effort), ThinkingStyle::Level) => level(match effort {
            Effort::Minimal => "MINIMAL",
            Effort::Low => "LOW",
            Effort::Medium => "MEDIUM",
            Effort::High | Effort::XHigh | Effort::Max => "HIGH",
        }),
        (Reasoning::Effort(effort), ThinkingStyle::Budget) => budget(match effort {
            Effort::Minimal => 512,
            Effort::Low => 1024,
            Effort::Medium => 8192,
            Effort::High | Effort::XHigh | Effort::Max => 24576,
        }),
        (Reasoning::Budget(n), ThinkingStyle::Level) => level(match n {
            0..4096 => "LOW",
            4096..16384 => "MEDIUM",
            _ => "HIGH",
        }),
        (Reasoning::Budget(n), ThinkingStyle::Budget) => {
            budget(i64::try_from(n).unwrap_or(i64::MAX))
        }
    }
}

fn text_part(text: &str) -> OutPart<'_> {
    OutPart {
        text: Some(text),
        ..OutPart::default()
    }
}

/// The parts of one canonical block, appended to `parts`. `calls` learns each assistant call
/// and answers each tool result's function name.
fn block_out<'a>(
    block: &'a Block,
    calls: &mut HashMap<&'a str, &'a str>,
    parts: &mut Vec<OutPart<'a>>,
) -> Result<(), Refused> {
    match block {
        Block::ToolUse {
            id, name, input, ..
        } => {
            let (base, signature) = split_tool_id(id);
            calls.insert(id, name);
            calls.entry(base).or_insert(name);
            parts.push(OutPart {
                function_call: Some(OutFunctionCall {
                    id: sent_id(base),
                    name,
                    args: args_out(input),
                }),
                thought_signature: signature.map(Cow::Owned),
                ..OutPart::default()
            });
        }
        Block::ToolResult {
            tool_use_id,
            content,
            is_error,
            ..
        } => {
            let (base, _) = split_tool_id(tool_use_id);
            let name = calls
                .get(tool_use_id.as_str())
                .or_else(|| calls.get(base))
                .ok_or_else(|| {
                    refuse(format!(
                        "the tool result for call '{}' answers no earlier assistant tool call \
                         with that id in this request; a Gemini backend needs the call's \
                         function name",
                        super::clip(tool_use_id, 64)
                    ))
                })?;
            let mut texts = content.iter().filter_map(|b| match b {
                Block::Text(t) => Some(t.text.as_str()),
                _ => None,
            });
            let text = match (texts.next(), texts.next()) {
                (None, _) => Cow::Borrowed(""),
                (Some(one), None) => Cow::Borrowed(one),
                (Some(_), Some(_)) => Cow::Owned(
                    content
                        .iter()
                        .filter_map(|b| match b {
                            Block::Text(t) => Some(t.text.as_str()),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
            };
            parts.push(OutPart {
                function_response: Some(OutFunctionResponse {
                    id: sent_id(base),
                    name,
                    response: if *is_error {
                        OutResult::Error(text)
                    } else {
                        OutResult::Output(text)
                    },
                }),
                answers_a_call: true,
                ..OutPart::default()
            });
            // Images and documents of a result follow it as parts of the same turn: every
            // Gemini model takes those, not all take media inside a function response.
            for leaf in content {
                match leaf {
                    Block::Text(_) => {}
                    Block::Image { .. } | Block::Document { .. } => {
                        block_out(leaf, calls, parts)?;
                        if let Some(media) = parts.last_mut() {
                            media.answers_a_call = true;
                        }
                    }
                    _ => {
                        return Err(refuse(
                            "a tool result can only hold text, images and documents",
                        ));
                    }
                }
            }
        }
        Block::Text(TextBlock { text, .. }) => {
            // Gemini refuses an empty text part.
            if !text.is_empty() {
                parts.push(text_part(text));
            }
        }
        Block::Image { source, .. } => parts.push(image_out(source)?),
        Block::Document {
            media_type, data, ..
        } => parts.push(OutPart {
            inline_data: Some(OutBlob {
                mime_type: media_type,
                data,
            }),
            ..OutPart::default()
        }),
        // A signature is only valid where it was issued; the thinking goes with it.
        Block::Thinking {
            text,
            signature: Some(signature),
        } if signature.origin == Api::Gemini => parts.push(OutPart {
            text: Some(text),
            thought: Some(true),
            thought_signature: Some(Cow::Borrowed(&signature.value)),
            ..OutPart::default()
        }),
        Block::Thinking { .. } | Block::RedactedThinking { .. } => {}
    }
    Ok(())
}

/// A base64 image as `inlineData`; a URL as `fileData`, which needs the type: read from the
/// URL's extension (Gemini fetches public `http(s)` URLs, Vertex also `gs://` objects; the
/// gateway itself never fetches).
fn image_out(source: &ImageSource) -> Result<OutPart<'_>, Refused> {
    Ok(match source {
        ImageSource::Base64 { media_type, data } => OutPart {
            inline_data: Some(OutBlob {
                mime_type: media_type,
                data,
            }),
            ..OutPart::default()
        },
        ImageSource::Url(url) => {
            let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
            if !(lower.starts_with("https://")
                || lower.starts_with("http://")
                || lower.starts_with("gs://"))
            {
                return Err(refuse(
                    "a Gemini backend takes image URLs with http, https or gs only; send other \
                     images as base64 data",
                ));
            }
            let Some(mime_type) = image_type_of(url) else {
                return Err(refuse(
                    "a Gemini backend needs the type of an image URL, read from its extension \
                     (.png, .jpg, .jpeg, .webp, .gif, .heic, .heif); send this image as base64 \
                     data instead",
                ));
            };
            OutPart {
                file_data: Some(OutFileData {
                    mime_type,
                    file_uri: url,
                }),
                ..OutPart::default()
            }
        }
    })
}

/// The media type an image URL's extension names (query and fragment ignored).
fn image_type_of(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let (_, ext) = path.rsplit_once('.')?;
    if ext.contains('/') {
        return None;
    }
    Some(match ext.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "heif" => "image/heif",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Answers and stream chunks (the same shape: each chunk is a partial answer)

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse<'a> {
    #[serde(default, borrow)]
    candidates: Option<Vec<WireCandidate<'a>>>,
    prompt_feedback: Option<WirePromptFeedback>,
    usage_metadata: Option<WireUsage>,
    model_version: Option<String>,
    response_id: Option<String>,
    /// Only in a stream: a failure after the stream began.
    error: Option<WireError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate<'a> {
    #[serde(default, borrow)]
    content: Option<WireContent<'a>>,
    finish_reason: Option<String>,
    index: Option<u64>,
}

#[derive(Deserialize)]
struct WireContent<'a> {
    #[serde(default, borrow)]
    parts: Option<Vec<WirePart<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePart<'a> {
    text: Option<String>,
    thought: Option<bool>,
    thought_signature: Option<String>,
    #[serde(borrow)]
    function_call: Option<WireFunctionCall<'a>>,
}

#[derive(Deserialize)]
struct WireFunctionCall<'a> {
    id: Option<String>,
    name: Option<String>,
    #[serde(borrow)]
    args: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePromptFeedback {
    block_reason: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    prompt_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    tool_use_prompt_token_count: Option<u64>,
}

impl WireUsage {
    /// docs/providers.md 5: the prompt count includes cached tokens, the candidates count
    /// excludes thinking. Explicit caches are written outside the call: no `cache_write`.
    fn canonical(&self) -> Usage {
        let input = match (self.prompt_token_count, self.tool_use_prompt_token_count) {
            (None, None) => None,
            (prompt, tools) => Some(
                prompt
                    .unwrap_or(0)
                    .saturating_sub(self.cached_content_token_count.unwrap_or(0))
                    .saturating_add(tools.unwrap_or(0)),
            ),
        };
        let output = match (self.candidates_token_count, self.thoughts_token_count) {
            (None, None) => None,
            (c, t) => Some(c.unwrap_or(0).saturating_add(t.unwrap_or(0))),
        };
        Usage {
            input,
            cache_read: self.cached_content_token_count,
            cache_write: None,
            output,
            reasoning: self.thoughts_token_count,
        }
    }
}

/// A `finishReason` read; `tool_calls`: the candidate called a function (Gemini says `STOP`).
pub fn stop_reason_in(word: &str, tool_calls: bool) -> StopReason {
    match word {
        "STOP" if tool_calls => StopReason::ToolUse,
        // A stop sequence also ends with STOP; Gemini does not say which one matched.
        "STOP" => StopReason::EndTurn,
        "MAX_TOKENS" => StopReason::MaxTokens,
        // Safety-type blocks: an OpenAI client sees `content_filter`, an Anthropic one `refusal`.
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => StopReason::ContentFilter,
        // LANGUAGE, OTHER, MALFORMED_FUNCTION_CALL, UNEXPECTED_TOOL_CALL, TOO_MANY_TOOL_CALLS,
        // IMAGE_OTHER, NO_IMAGE, FINISH_REASON_UNSPECIFIED and words added later.
        _ if tool_calls => StopReason::ToolUse,
        _ => StopReason::Other,
    }
}

/// The first candidate (a translated request never asks for more).
fn first_candidate<'a, 'b>(
    candidates: &'b mut Option<Vec<WireCandidate<'a>>>,
) -> Option<&'b mut WireCandidate<'a>> {
    let candidates = candidates.as_mut()?;
    let at = candidates
        .iter()
        .position(|c| c.index.unwrap_or(0) == 0)
        .unwrap_or(0);
    candidates.get_mut(at)
}

fn not_gemini(what: &str, e: &serde_json::Error) -> String {
    format!("not a Gemini {what}: {}", clip(&e.to_string()))
}

fn nonempty(id: Option<String>) -> Option<String> {
    id.filter(|s| !s.is_empty())
}

/// A generateContent answer (a 2xx body) read into the canonical model. `id`: the gateway's
/// request id, the answer's id when Gemini sends no `responseId`. Parts other than text,
/// thoughts and function calls (inline data, executable code...) are skipped: a translated
/// request never asks for them.
pub fn response_in(body: &[u8], id: &str) -> Result<Response, String> {
    let mut wire: WireResponse =
        serde_json::from_slice(body).map_err(|e| not_gemini("answer", &e))?;
    let id = nonempty(wire.response_id.take()).unwrap_or_else(|| id.to_owned());
    let blocked = wire
        .prompt_feedback
        .as_ref()
        .is_some_and(|f| f.block_reason.is_some());
    let usage = wire.usage_metadata.unwrap_or_default().canonical();
    let mut content = Vec::new();
    let mut stop = if blocked {
        // No candidate: the prompt itself was blocked. Answered as a filtered answer with no
        // content, which both client dialects have words for, and its usage is metered.
        StopReason::ContentFilter
    } else {
        StopReason::Other
    };
    if let Some(candidate) = first_candidate(&mut wire.candidates) {
        let mut calls = 0;
        let parts = candidate
            .content
            .take()
            .and_then(|c| c.parts)
            .unwrap_or_default();
        for part in parts {
            if let Some(call) = part.function_call {
                let base = nonempty(call.id).unwrap_or_else(|| generated_id(&id, calls));
                calls += 1;
                content.push(Block::ToolUse {
                    id: join_tool_id(&base, part.thought_signature.as_deref()),
                    name: call.name.unwrap_or_default(),
                    input: call.args.map_or_else(empty_args, ToOwned::to_owned),
                    cache: None,
                });
            } else if part.thought == Some(true) {
                content.push(Block::Thinking {
                    text: part.text.unwrap_or_default(),
                    signature: nonempty(part.thought_signature).map(gemini_signature),
                });
            } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                content.push(Block::Text(TextBlock { text, cache: None }));
            }
        }
        if let Some(reason) = candidate.finish_reason.as_deref() {
            stop = stop_reason_in(reason, calls > 0);
        } else if calls > 0 {
            stop = StopReason::ToolUse;
        }
    }
    Ok(Response {
        id,
        model: wire.model_version.unwrap_or_default(),
        content,
        stop,
        stop_sequence: None,
        usage,
    })
}

fn gemini_signature(value: String) -> Signature {
    Signature {
        origin: Api::Gemini,
        value,
    }
}

fn empty_args() -> Box<RawValue> {
    // `{}` always parses; the default (`null`) is never reached.
    RawValue::from_string("{}".to_owned()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Deserialize)]
struct WireErrorBody {
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireError {
    /// The HTTP status, repeated.
    code: Option<i64>,
    message: Option<String>,
    /// The google.rpc code name: `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`...
    status: Option<String>,
    details: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireDetail {
    #[serde(rename = "@type")]
    kind: Option<String>,
    /// `google.rpc.ErrorInfo`.
    reason: Option<String>,
    /// `google.rpc.QuotaFailure`.
    violations: Option<Vec<WireViolation>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireViolation {
    quota_id: Option<String>,
}

/// What an error's `details` say beyond its status.
#[derive(Debug, Default, Clone, Copy)]
struct Details {
    /// A `QuotaFailure` names a daily quota (a `quotaId` like
    /// `GenerateRequestsPerDayPerProjectPerModel-FreeTier`): waiting a minute does not help,
    /// so the 429 is `QuotaExhausted`, not `RateLimited`.
    daily_quota: bool,
    /// An `ErrorInfo` with reason `API_KEY_INVALID`: the Gemini API answers a bad key with 400
    /// `INVALID_ARGUMENT`; it is the gateway's credential, not the client's request.
    key_invalid: bool,
}

fn details_of(details: Option<&RawValue>) -> Details {
    let Some(details) = details else {
        return Details::default();
    };
    let Ok(details) = serde_json::from_str::<Vec<WireDetail>>(details.get()) else {
        return Details::default();
    };
    let is = |d: &WireDetail, kind: &str| d.kind.as_deref().is_some_and(|k| k.ends_with(kind));
    Details {
        daily_quota: details
            .iter()
            .filter(|d| is(d, "google.rpc.QuotaFailure"))
            .flat_map(|d| d.violations.iter().flatten())
            .any(|v| v.quota_id.as_deref().is_some_and(|q| q.contains("PerDay"))),
        key_invalid: details.iter().any(|d| {
            is(d, "google.rpc.ErrorInfo") && d.reason.as_deref() == Some("API_KEY_INVALID")
        }),
    }
}

/// The HTTP status Google answers a code name with; for stream errors without a status.
fn status_of(code_name: &str) -> u16 {
    match code_name {
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => 400,
        "UNAUTHENTICATED" => 401,
        "PERMISSION_DENIED" => 403,
        "NOT_FOUND" => 404,
        "ABORTED" | "ALREADY_EXISTS" => 409,
        "RESOURCE_EXHAUSTED" => 429,
        "CANCELLED" => 499,
        "UNIMPLEMENTED" => 501,
        "UNAVAILABLE" => 503,
        "DEADLINE_EXCEEDED" => 504,
        _ => 500,
    }
}

fn kind_of(status: u16, code_name: &str, message: &str, details: Details) -> ErrorKind {
    let daily = details.daily_quota;
    if details.key_invalid {
        return ErrorKind::Authentication;
    }
    let by_name = match code_name {
        "UNAUTHENTICATED" => Some(ErrorKind::Authentication),
        "PERMISSION_DENIED" => Some(ErrorKind::Permission),
        "NOT_FOUND" => Some(ErrorKind::NotFound),
        "RESOURCE_EXHAUSTED" if daily => Some(ErrorKind::QuotaExhausted),
        "RESOURCE_EXHAUSTED" => Some(ErrorKind::RateLimited),
        "UNAVAILABLE" => Some(ErrorKind::Overloaded),
        "DEADLINE_EXCEEDED" => Some(ErrorKind::Timeout),
        "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => Some(ErrorKind::Server),
        _ => None,
    };
    if let Some(kind) = by_name {
        return kind;
    }
    if INPUT_TOO_LONG.iter().all(|p| message.contains(p)) {
        return ErrorKind::ContextLength;
    }
    if message.starts_with(PAYLOAD_TOO_LARGE) {
        return ErrorKind::RequestTooLarge;
    }
    match status {
        401 => ErrorKind::Authentication,
        403 => ErrorKind::Permission,
        404 => ErrorKind::NotFound,
        413 => ErrorKind::RequestTooLarge,
        429 if daily => ErrorKind::QuotaExhausted,
        429 => ErrorKind::RateLimited,
        503 => ErrorKind::Overloaded,
        504 => ErrorKind::Timeout,
        400..=499 => ErrorKind::InvalidRequest,
        _ => ErrorKind::Server,
    }
}

fn api_error(status: u16, error: Option<&WireError>) -> ApiError {
    let code_name = error
        .and_then(|e| e.status.as_deref())
        .filter(|s| !s.is_empty() && s.len() <= 64);
    let message = match error.and_then(|e| e.message.as_deref()) {
        Some(m) if !m.is_empty() => super::clip(m, MAX_UPSTREAM_MESSAGE_BYTES).to_owned(),
        _ => format!("the upstream answered {status} without a Google error body"),
    };
    let details = details_of(error.and_then(|e| e.details.as_deref()));
    ApiError {
        status,
        kind: kind_of(status, code_name.unwrap_or(""), &message, details),
        message,
        param: None,
        code: code_name.map(str::to_owned),
    }
}

/// Google's error envelope (`{"error": {code, message, status, details}}`, also inside a
/// one-element array as the non-SSE stream endpoint sends it) read into the canonical model.
pub fn error_in(status: u16, body: &[u8]) -> ApiError {
    let error = serde_json::from_slice::<WireErrorBody>(body)
        .ok()
        .or_else(|| {
            serde_json::from_slice::<Vec<WireErrorBody>>(body)
                .ok()
                .and_then(|v| v.into_iter().next())
        })
        .and_then(|b| b.error);
    api_error(status, error.as_ref())
}

// ---------------------------------------------------------------------------------------------
// Streams in

/// The text-like block open in a stream: at most one at a time (calls arrive whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    /// `signed`: its signature came; the next thought opens a new block.
    Thinking {
        signed: bool,
    },
}

/// Reads a `streamGenerateContent?alt=sse` stream (the `data` of each event, a partial
/// GenerateContentResponse) into canonical events.
///
/// Text parts extend an open text block, thought parts an open thinking block (one closes
/// when the other kind starts); a function call arrives whole: start, its arguments as one
/// fragment, stop. The finish reason comes in the last chunk(s); usage is cumulative in
/// any chunk. Gemini ends the body without a closing event, so `MessageStop` is written by
/// `finish` once a finish reason (or a prompt block) was seen. State is bounded: one open
/// block, counters, the stop reason.
#[derive(Debug)]
pub struct EventsIn {
    /// The gateway's request id, until a chunk's `responseId` replaces it.
    id: String,
    started: bool,
    open: Option<(u32, Open)>,
    next_index: u32,
    tool_calls: usize,
    finish: Option<String>,
    blocked: bool,
    /// `MessageStop` or an error was passed on: nothing follows.
    done: bool,
}

impl EventsIn {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            started: false,
            open: None,
            next_index: 0,
            tool_calls: 0,
            finish: None,
            blocked: false,
            done: false,
        }
    }

    /// One chunk's data; appends the canonical events it makes.
    pub fn event(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        let mut chunk: WireResponse =
            serde_json::from_slice(data).map_err(|e| not_gemini("stream chunk", &e))?;
        if self.done {
            return Ok(());
        }
        if let Some(error) = &chunk.error {
            let status = error
                .code
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..=599).contains(c))
                .unwrap_or_else(|| status_of(error.status.as_deref().unwrap_or("")));
            out.push(Event::Error(api_error(status, Some(error))));
            self.done = true;
            return Ok(());
        }
        let usage = chunk.usage_metadata.map(|u| u.canonical());
        if !self.started {
            self.started = true;
            if let Some(id) = nonempty(chunk.response_id.take()) {
                self.id = id;
            }
            out.push(Event::MessageStart {
                id: self.id.clone(),
                // The input side, as Anthropic's `message_start` gives it.
                usage: usage.map_or_else(Usage::default, |u| Usage {
                    input: u.input,
                    cache_read: u.cache_read,
                    ..Usage::default()
                }),
            });
        }
        if chunk
            .prompt_feedback
            .as_ref()
            .is_some_and(|f| f.block_reason.is_some())
        {
            self.blocked = true;
        }
        if let Some(candidate) = first_candidate(&mut chunk.candidates) {
            let parts = candidate
                .content
                .take()
                .and_then(|c| c.parts)
                .unwrap_or_default();
            for part in parts {
                self.part(part, out);
                if self.done {
                    return Ok(());
                }
            }
            if let Some(reason) = candidate.finish_reason.take() {
                self.finish = Some(reason);
            }
        }
        if let Some(usage) = usage {
            out.push(Event::Usage(usage));
        }
        Ok(())
    }

    fn part(&mut self, part: WirePart, out: &mut Vec<Event>) {
        if let Some(call) = part.function_call {
            self.close(out);
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
                return;
            }
            let base = nonempty(call.id).unwrap_or_else(|| generated_id(&self.id, self.tool_calls));
            self.tool_calls += 1;
            let index = self.start(
                BlockKind::ToolUse {
                    id: join_tool_id(&base, part.thought_signature.as_deref()),
                    name: call.name.unwrap_or_default(),
                },
                out,
            );
            let args = match call.args {
                Some(raw) => raw.get().to_owned(),
                None => "{}".to_owned(),
            };
            out.push(Event::BlockDelta {
                index,
                delta: Delta::ToolArgs(args),
            });
            out.push(Event::BlockStop { index });
        } else if part.thought == Some(true) {
            let index = match self.open {
                Some((index, Open::Thinking { signed: false })) => index,
                _ => {
                    self.close(out);
                    let index = self.start(BlockKind::Thinking, out);
                    self.open = Some((index, Open::Thinking { signed: false }));
                    index
                }
            };
            if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                out.push(Event::BlockDelta {
                    index,
                    delta: Delta::Thinking(text),
                });
            }
            if let Some(signature) = nonempty(part.thought_signature) {
                out.push(Event::BlockDelta {
                    index,
                    delta: Delta::Signature(signature),
                });
                self.open = Some((index, Open::Thinking { signed: true }));
            }
        } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
            // A signature on a text part is dropped (module doc).
            let index = match self.open {
                Some((index, Open::Text)) => index,
                _ => {
                    self.close(out);
                    let index = self.start(BlockKind::Text, out);
                    self.open = Some((index, Open::Text));
                    index
                }
            };
            out.push(Event::BlockDelta {
                index,
                delta: Delta::Text(text),
            });
        }
    }

    fn start(&mut self, kind: BlockKind, out: &mut Vec<Event>) -> u32 {
        let index = self.next_index;
        self.next_index = index.saturating_add(1);
        out.push(Event::BlockStart { index, kind });
        index
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((index, _)) = self.open.take() {
            out.push(Event::BlockStop { index });
        }
    }

    /// The upstream body ended; appends what closes the message: `MessageStop` after a
    /// finish reason or a blocked prompt, else an error (the stream was cut short).
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.done {
            return;
        }
        self.done = true;
        let stop = match (&self.finish, self.blocked) {
            (_, true) => StopReason::ContentFilter,
            (Some(reason), false) => stop_reason_in(reason, self.tool_calls > 0),
            (None, false) => {
                out.push(Event::Error(ApiError {
                    status: 502,
                    kind: ErrorKind::Server,
                    message: "the upstream stream ended before the answer was complete".into(),
                    param: None,
                    code: None,
                }));
                return;
            }
        };
        self.close(out);
        out.push(Event::MessageStop {
            stop,
            stop_sequence: None,
        });
    }
}

fn clip(s: &str) -> &str {
    super::clip(s, MAX_PARSE_ERROR_BYTES)
}

#[cfg(test)]
mod tests {
    //! Fixtures: `tests/fixtures/providers/gemini/` (sources in its README), and the OpenAI and
    //! Anthropic request fixtures read by their own `request_in` and written here. Golden
    //! files: `snapshots/*gemini*`, one per fixture for the globbed tests, so a new case is a
    //! new file. Each golden was read and checked against docs/providers.md 3.6 and the module
    //! doc.

    use std::path::{Path, PathBuf};

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::canonical::{Message, Tool};
    use crate::translate::{anthropic, openai_chat};

    /// The signature on the first call of `response-function-call-signed.json` (standard
    /// base64 with `+`, `/` and padding-free length, as Gemini writes it).
    const SIG_A: &str = "++++IHN5bnRoZXRpYyB0aG91Z2h0IHNpZ25hdHVyZSBBLCBub3QgcmVhbCD//j8+";
    const SIG_B: &str = "+vsgc3ludGhldGljIHRob3VnaHQgc2lnbmF0dXJlIEIgKHRoaW5raW5nKSD+/z4+";

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers/gemini")
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The `data` of each event of an SSE recording.
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
        let mut stream = EventsIn::new("gw-req-1");
        let mut out = Vec::new();
        for data in sse_data(std::str::from_utf8(sse).expect("utf-8")) {
            stream.event(data.as_bytes(), &mut out).expect(&data);
        }
        stream.finish(&mut out);
        out
    }

    fn pretty(body: &[u8]) -> String {
        let value: Value = serde_json::from_slice(body).expect("valid JSON");
        serde_json::to_string_pretty(&value).expect("serialises")
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("valid JSON")
    }

    fn body_of(req: &Request, out: Out) -> Value {
        serde_json::from_slice(&request_out(req, out).expect("request_out")).expect("JSON")
    }

    fn text(s: &str) -> Block {
        Block::Text(TextBlock {
            text: s.into(),
            cache: None,
        })
    }

    fn user(content: Vec<Block>) -> Message {
        Message {
            role: Role::User,
            content,
        }
    }

    fn assistant(content: Vec<Block>) -> Message {
        Message {
            role: Role::Assistant,
            content,
        }
    }

    /// A streamed answer as a client accumulates it.
    #[derive(Debug, Default, PartialEq)]
    struct Accumulated {
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
                Block::ToolUse {
                    id, name, input, ..
                } => {
                    let value: Value = serde_json::from_str(input.get()).expect("object");
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
        assert!(names.len() >= 6, "stream fixtures found: {names:?}");
        names
    }

    fn is_id_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_' || c == '-'
    }

    // -- answers --------------------------------------------------------------------------------

    #[test]
    fn responses_in() {
        insta::glob!(
            "../../tests/fixtures/providers/gemini",
            "response-*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                insta::assert_debug_snapshot!(response_in(&body, "gw-req-1"));
            }
        );
    }

    #[test]
    fn cached_tokens_are_counted_once_and_thoughts_are_output() {
        let cached = response_in(&fixture("response-cached-tokens.json"), "x").expect("answer");
        assert_eq!(
            cached.usage.input,
            Some(250),
            "promptTokenCount includes the cache"
        );
        assert_eq!(cached.usage.cache_read, Some(10000));
        assert_eq!(cached.usage.cache_write, None);
        assert_eq!(cached.usage.prompt(), 10250);
        assert_eq!(cached.usage.processed(), 10260, "equals totalTokenCount");

        let thinking = response_in(&fixture("response-thinking.json"), "x").expect("answer");
        assert_eq!(thinking.usage.output, Some(11 + 295));
        assert_eq!(thinking.usage.reasoning, Some(295));
        assert_eq!(thinking.usage.processed(), 318, "equals totalTokenCount");
    }

    #[test]
    fn tool_use_answers_stop_for_tools_and_carry_the_signature_in_the_id() {
        let resp =
            response_in(&fixture("response-function-call-signed.json"), "gw").expect("answer");
        assert_eq!(resp.stop, StopReason::ToolUse, "Gemini says STOP");
        assert_eq!(resp.id, "ZbLVaIa9Ms2NqtsPkICp2QE");
        let ids: Vec<&str> = resp
            .content
            .iter()
            .filter_map(|b| match b {
                Block::ToolUse { id, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids[0].starts_with("gmcall_ZbLVaIa9Ms2NqtsPkICp2QE_0_gts_"));
        assert_eq!(
            ids[1], "gmcall_ZbLVaIa9Ms2NqtsPkICp2QE_1",
            "parallel: unsigned"
        );
        assert!(ids.iter().all(|id| id.chars().all(is_id_char)));
        assert_eq!(
            split_tool_id(ids[0]),
            ("gmcall_ZbLVaIa9Ms2NqtsPkICp2QE_0", Some(SIG_A.to_owned()))
        );
        assert_eq!(split_tool_id(ids[1]), (ids[1], None));
    }

    #[test]
    fn a_blocked_prompt_is_a_filtered_answer_with_usage() {
        let resp = response_in(&fixture("response-prompt-blocked.json"), "gw").expect("answer");
        assert_eq!(resp.stop, StopReason::ContentFilter);
        assert!(resp.content.is_empty());
        assert_eq!(resp.usage.input, Some(17));
        assert_eq!(resp.stop.openai(), "content_filter");
        let safety = response_in(&fixture("response-safety.json"), "gw").expect("answer");
        assert_eq!(safety.stop, StopReason::ContentFilter);
        let json = openai_chat::response_out(&resp, "m", 0);
        let v: Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
    }

    #[test]
    fn the_gateway_id_stands_in_when_gemini_sends_none() {
        let resp = response_in(&fixture("response-max-tokens.json"), "gw-req-9").expect("ok");
        assert_eq!(resp.id, "gw-req-9");
        assert_eq!(resp.stop, StopReason::MaxTokens);
    }

    #[test]
    fn stop_reasons_read() {
        for (word, calls, want) in [
            ("STOP", false, StopReason::EndTurn),
            ("STOP", true, StopReason::ToolUse),
            ("MAX_TOKENS", true, StopReason::MaxTokens),
            ("SAFETY", false, StopReason::ContentFilter),
            ("RECITATION", false, StopReason::ContentFilter),
            ("BLOCKLIST", false, StopReason::ContentFilter),
            ("PROHIBITED_CONTENT", false, StopReason::ContentFilter),
            ("SPII", false, StopReason::ContentFilter),
            ("IMAGE_SAFETY", false, StopReason::ContentFilter),
            ("MALFORMED_FUNCTION_CALL", false, StopReason::Other),
            ("LANGUAGE", false, StopReason::Other),
            ("SOMETHING_NEW", false, StopReason::Other),
        ] {
            assert_eq!(stop_reason_in(word, calls), want, "{word}");
        }
    }

    // -- streams --------------------------------------------------------------------------------

    #[test]
    fn streams_in() {
        insta::glob!(
            "../../tests/fixtures/providers/gemini",
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
            let Ok(body) = std::fs::read(dir().join(name.replace(".sse", ".json"))) else {
                continue;
            };
            let mut streamed = accumulate(&events_in(&fixture(&name)));
            for (kind, text) in &mut streamed.blocks {
                if matches!(kind, BlockKind::ToolUse { .. }) {
                    let value: Value = serde_json::from_str(text).expect("args");
                    *text = value.to_string();
                }
            }
            let whole = accumulate_response(&response_in(&body, "gw-req-1").expect("answer"));
            assert_eq!(streamed, whole, "{name}");
            compared += 1;
        }
        assert!(compared >= 4, "only {compared} streams had a JSON twin");
    }

    #[test]
    fn a_mid_stream_error_is_the_last_event() {
        let events = events_in(&fixture("stream-error-unavailable.sse"));
        let Some(Event::Error(err)) = events.last() else {
            panic!("ends with an error: {events:?}");
        };
        assert_eq!((err.status, err.kind), (503, ErrorKind::Overloaded));
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Error(_)))
                .count(),
            1
        );
    }

    #[test]
    fn a_stream_cut_short_ends_with_a_server_error() {
        let events = events_in(&fixture("stream-truncated.sse"));
        let Some(Event::Error(err)) = events.last() else {
            panic!("ends with an error: {events:?}");
        };
        assert_eq!(err.kind, ErrorKind::Server);
        assert!(err.message.contains("ended before"));
    }

    #[test]
    fn tool_calls_past_the_cap_end_the_stream() {
        let mut stream = EventsIn::new("gw");
        let mut out = Vec::new();
        for _ in 0..=MAX_STREAM_TOOL_CALLS {
            let chunk = br#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{}}}]}}]}"#;
            stream.event(chunk, &mut out).expect("chunk");
        }
        stream.finish(&mut out);
        let starts = out
            .iter()
            .filter(|e| matches!(e, Event::BlockStart { .. }))
            .count();
        assert_eq!(starts, MAX_STREAM_TOOL_CALLS);
        assert!(matches!(out.last(), Some(Event::Error(e)) if e.kind == ErrorKind::Server));
    }

    #[test]
    fn thinking_then_text_then_a_signed_thought_open_new_blocks() {
        let mut stream = EventsIn::new("gw");
        let mut out = Vec::new();
        for chunk in [
            r#"{"candidates":[{"content":{"parts":[{"text":"a","thought":true}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"b","thought":true,"thoughtSignature":"c2ln"}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"c","thought":true}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"d"},{"text":"e"}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"f","thought":true}]}, "finishReason":"STOP"}]}"#,
        ] {
            stream.event(chunk.as_bytes(), &mut out).expect(chunk);
        }
        stream.finish(&mut out);
        let acc = accumulate(&out);
        let blocks: Vec<(&BlockKind, &str)> =
            acc.blocks.iter().map(|(k, t)| (k, t.as_str())).collect();
        assert_eq!(
            blocks,
            [
                (&BlockKind::Thinking, "ab"),
                (&BlockKind::Thinking, "c"),
                (&BlockKind::Text, "de"),
                (&BlockKind::Thinking, "f"),
            ]
        );
        assert_eq!(acc.signatures, ["c2ln"]);
        assert_eq!(acc.stop, Some(StopReason::EndTurn));
    }

    #[test]
    fn stream_protocol_errors_are_errors() {
        let mut stream = EventsIn::new("gw");
        let mut out = Vec::new();
        assert!(stream.event(b"not json", &mut out).is_err());
        assert!(stream.event(b"[]", &mut out).is_err());
        assert!(
            stream.event(b"{}", &mut out).is_ok(),
            "an empty chunk says nothing"
        );
        assert!(matches!(out.as_slice(), [Event::MessageStart { .. }]));
    }

    // -- errors ---------------------------------------------------------------------------------

    /// The status in an error fixture's name (`error-429-...`).
    fn status_of_name(path: &Path) -> u16 {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        name.split('-')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status")
    }

    #[test]
    fn errors_in() {
        insta::glob!("../../tests/fixtures/providers/gemini", "error-*", |path| {
            let body = std::fs::read(path).expect("fixture");
            insta::assert_debug_snapshot!(error_in(status_of_name(path), &body));
        });
    }

    #[test]
    fn error_kinds() {
        for (name, kind) in [
            ("error-400-invalid-argument.json", ErrorKind::InvalidRequest),
            ("error-400-token-limit.json", ErrorKind::ContextLength),
            ("error-400-api-key-invalid.json", ErrorKind::Authentication),
            ("error-401-unauthenticated.json", ErrorKind::Authentication),
            ("error-403-permission-denied.json", ErrorKind::Permission),
            ("error-404-not-found.json", ErrorKind::NotFound),
            ("error-429-rate-limit.json", ErrorKind::RateLimited),
            ("error-429-daily-quota.json", ErrorKind::QuotaExhausted),
            (
                "error-429-vertex-resource-exhausted.json",
                ErrorKind::RateLimited,
            ),
            ("error-500-internal.json", ErrorKind::Server),
            ("error-502-not-json.txt", ErrorKind::Server),
            ("error-503-unavailable.json", ErrorKind::Overloaded),
            ("error-504-deadline-exceeded.json", ErrorKind::Timeout),
        ] {
            let err = error_in(status_of_name(Path::new(name)), &fixture(name));
            assert_eq!(err.kind, kind, "{name}");
        }
        let err = error_in(400, br#"{"error":{"code":400,"message":"Request payload size exceeds the limit: 20971520 bytes.","status":"INVALID_ARGUMENT"}}"#);
        assert_eq!(err.kind, ErrorKind::RequestTooLarge);
    }

    #[test]
    fn a_context_overflow_reaches_an_openai_client_as_context_length_exceeded() {
        let err = error_in(400, &fixture("error-400-token-limit.json"));
        let body: Value = serde_json::from_slice(&openai_chat::error_out(&err)).expect("json");
        assert_eq!(body["error"]["code"], "context_length_exceeded");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("The input token count"))
        );
    }

    // -- requests out ---------------------------------------------------------------------------

    #[test]
    fn openai_requests_out() {
        insta::glob!(
            "../../tests/fixtures/providers/openai/requests",
            "*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                let out = Out {
                    max_tokens: Some(1024),
                    thinking: ThinkingStyle::Level,
                };
                let written = openai_chat::request_in(&body)
                    .and_then(|req| request_out(&req, out).map(|b| (pretty(&b), ignored(&req))));
                insta::assert_snapshot!(match written {
                    Ok((body, ignored)) => format!("ignored: {ignored:?}\n{body}"),
                    Err(refused) => format!("refused: {refused:?}"),
                });
            }
        );
    }

    #[test]
    fn anthropic_requests_out() {
        insta::glob!(
            "../../tests/fixtures/providers/anthropic",
            "request-*.json",
            |path| {
                let body = std::fs::read(path).expect("fixture");
                let out = Out {
                    max_tokens: None,
                    thinking: ThinkingStyle::Budget,
                };
                let written = anthropic::request_in(&body)
                    .and_then(|req| request_out(&req, out).map(|b| (pretty(&b), ignored(&req))));
                insta::assert_snapshot!(match written {
                    Ok((body, ignored)) => format!("ignored: {ignored:?}\n{body}"),
                    Err(refused) => format!("refused: {refused:?}"),
                });
            }
        );
    }

    #[test]
    fn reasoning_maps_to_levels_or_budgets() {
        let config = |reasoning, thinking| {
            let req = Request {
                reasoning: Some(reasoning),
                messages: vec![user(vec![text("hi")])],
                ..Request::default()
            };
            body_of(
                &req,
                Out {
                    max_tokens: None,
                    thinking,
                },
            )["generationConfig"]["thinkingConfig"]
                .clone()
        };
        use ThinkingStyle::{Budget, Level};
        for (reasoning, style, want) in [
            (Reasoning::Off, Level, json!({"thinkingBudget": 0})),
            (Reasoning::Off, Budget, json!({"thinkingBudget": 0})),
            (Reasoning::Adaptive, Level, json!({"includeThoughts": true})),
            (
                Reasoning::Adaptive,
                Budget,
                json!({"includeThoughts": true, "thinkingBudget": -1}),
            ),
            (
                Reasoning::Effort(Effort::Minimal),
                Level,
                json!({"includeThoughts": true, "thinkingLevel": "MINIMAL"}),
            ),
            (
                Reasoning::Effort(Effort::XHigh),
                Level,
                json!({"includeThoughts": true, "thinkingLevel": "HIGH"}),
            ),
            (
                Reasoning::Effort(Effort::Medium),
                Budget,
                json!({"includeThoughts": true, "thinkingBudget": 8192}),
            ),
            (
                Reasoning::Budget(2048),
                Level,
                json!({"includeThoughts": true, "thinkingLevel": "LOW"}),
            ),
            (
                Reasoning::Budget(10000),
                Level,
                json!({"includeThoughts": true, "thinkingLevel": "MEDIUM"}),
            ),
            (
                Reasoning::Budget(10000),
                Budget,
                json!({"includeThoughts": true, "thinkingBudget": 10000}),
            ),
        ] {
            assert_eq!(config(reasoning, style), want, "{reasoning:?} {style:?}");
        }
        let none = body_of(
            &Request {
                messages: vec![user(vec![text("hi")])],
                ..Request::default()
            },
            Out::default(),
        );
        assert!(none.get("generationConfig").is_none(), "{none}");
        assert_eq!(ThinkingStyle::for_model("gemini-2.5-pro"), Budget);
        assert_eq!(
            ThinkingStyle::for_model("publishers/google/models/gemini-2.0-flash"),
            Budget
        );
        assert_eq!(ThinkingStyle::for_model("gemini-3-pro-preview"), Level);
    }

    #[test]
    fn request_out_rules() {
        let req = Request {
            system: vec![TextBlock {
                text: "Be brief.".into(),
                cache: None,
            }],
            messages: vec![
                user(vec![text("a")]),
                Message {
                    role: Role::System,
                    content: vec![text("Now in French.")],
                },
                user(vec![
                    text("b"),
                    Block::Image {
                        source: ImageSource::Url("https://example.com/cat.JPG?size=2".into()),
                        cache: None,
                    },
                    Block::Image {
                        source: ImageSource::Url("gs://bucket/dog.webp".into()),
                        cache: None,
                    },
                ]),
                assistant(vec![
                    Block::Thinking {
                        text: "from another API".into(),
                        signature: Some(Signature {
                            origin: Api::AnthropicMessages,
                            value: "anthropic-sig".into(),
                        }),
                    },
                    Block::Thinking {
                        text: "mine".into(),
                        signature: Some(gemini_signature(SIG_B.into())),
                    },
                    Block::ToolUse {
                        id: "toolu_01".into(),
                        name: "lookup".into(),
                        input: raw("[1]"),
                        cache: None,
                    },
                ]),
                user(vec![
                    text("and also"),
                    Block::ToolResult {
                        tool_use_id: "toolu_01".into(),
                        content: vec![
                            text("line 1"),
                            Block::Image {
                                source: ImageSource::Base64 {
                                    media_type: "image/png".into(),
                                    data: "iVBORw0KGgo=".into(),
                                },
                                cache: None,
                            },
                            text("line 2"),
                        ],
                        is_error: true,
                        cache: None,
                    },
                ]),
            ],
            tools: vec![
                Tool {
                    name: "lookup".into(),
                    description: Some("Look it up".into()),
                    input_schema: Some(raw(
                        r#"{"type":"object","properties":{"q":{"type":["string","null"]}},"$defs":{}}"#,
                    )),
                    strict: Some(true),
                    cache: None,
                },
                Tool {
                    name: "now".into(),
                    description: None,
                    input_schema: None,
                    strict: None,
                    cache: None,
                },
            ],
            tool_choice: Some(ToolChoice::Tool("lookup".into())),
            parallel_tool_calls: Some(false),
            temperature: Some(0.2),
            top_p: Some(0.9),
            top_k: Some(40),
            max_output_tokens: Some(300),
            stop: vec!["END".into()],
            response_format: Some(ResponseFormat::JsonSchema {
                name: Some("answer".into()),
                schema: raw(r#"{"type":"object","properties":{"x":{"type":"integer"}}}"#),
                strict: Some(true),
            }),
            user: Some("user-42".into()),
            ..Request::default()
        };
        let body = request_out(
            &req,
            Out {
                max_tokens: Some(1024),
                thinking: ThinkingStyle::Level,
            },
        )
        .expect("written");
        insta::assert_snapshot!("request_out_rules", pretty(&body));
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v["systemInstruction"]["parts"].as_array().map(Vec::len),
            Some(2)
        );
        let contents = v["contents"].as_array().expect("contents");
        assert_eq!(
            contents.len(),
            3,
            "user turns merged around the hoisted system text"
        );
        assert_eq!(
            contents[1]["parts"][0],
            json!({"text": "mine", "thought": true, "thoughtSignature": SIG_B}),
            "only Gemini's thinking goes back"
        );
        assert_eq!(contents[1]["parts"][1]["functionCall"]["args"], json!({}));
        assert_eq!(contents[1]["parts"][1]["functionCall"]["id"], "toolu_01");
        let turn = contents[2]["parts"].as_array().expect("parts");
        assert_eq!(
            turn[0]["functionResponse"],
            json!({"id": "toolu_01", "name": "lookup", "response": {"error": "line 1\nline 2"}}),
            "the response opens the turn"
        );
        assert!(
            turn[1].get("inlineData").is_some(),
            "the result's image follows it"
        );
        assert_eq!(turn[2], json!({"text": "and also"}));
        assert_eq!(
            contents[0]["parts"][2]["fileData"],
            json!({"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.JPG?size=2"})
        );
        assert_eq!(
            v["generationConfig"]["maxOutputTokens"], 300,
            "the client's wins"
        );
        assert!(!String::from_utf8_lossy(&body).contains("user-42"));
        assert_eq!(ignored(&req), ["user", "parallel_tool_calls"]);
    }

    #[test]
    fn refusals_name_the_field() {
        let with = |messages: Vec<Message>| Request {
            messages,
            ..Request::default()
        };
        let orphan = with(vec![user(vec![Block::ToolResult {
            tool_use_id: "call_gone".into(),
            content: vec![text("x")],
            is_error: false,
            cache: None,
        }])]);
        let refused = request_out(&orphan, Out::default()).expect_err("orphan result");
        assert_eq!(refused.param, Some("messages"));
        assert!(refused.message.contains("call_gone"), "{}", refused.message);

        for url in ["https://example.com/image", "ftp://example.com/a.png"] {
            let req = with(vec![user(vec![Block::Image {
                source: ImageSource::Url(url.into()),
                cache: None,
            }])]);
            let refused = request_out(&req, Out::default()).expect_err(url);
            assert_eq!(refused.param, Some("messages"), "{url}");
        }

        let stops = Request {
            stop: (0..6).map(|i| i.to_string()).collect(),
            ..with(vec![user(vec![text("x")])])
        };
        let refused = request_out(&stops, Out::default()).expect_err("six stops");
        assert_eq!(refused.param, Some("stop_sequences"));
    }

    #[test]
    fn without_tools_no_tool_config_is_sent() {
        let req = Request {
            messages: vec![user(vec![text("x")])],
            tool_choice: Some(ToolChoice::None),
            ..Request::default()
        };
        let v = body_of(&req, Out::default());
        assert!(
            v.get("toolConfig").is_none() && v.get("tools").is_none(),
            "{v}"
        );
    }

    // -- thought signatures across turns --------------------------------------------------------

    /// The second turn's Gemini body, whichever client carried the ids.
    fn assert_second_turn_carries_the_signature(body: &Value) {
        let contents = body["contents"].as_array().expect("contents");
        let model = contents
            .iter()
            .find(|c| c["role"] == "model")
            .expect("a model turn");
        let parts = model["parts"].as_array().expect("parts");
        let calls: Vec<&Value> = parts
            .iter()
            .filter(|p| p.get("functionCall").is_some())
            .collect();
        assert_eq!(calls.len(), 2, "{model}");
        assert_eq!(calls[0]["thoughtSignature"], SIG_A, "restored exactly");
        assert!(
            calls[0]["functionCall"].get("id").is_none(),
            "made-up ids stay home"
        );
        assert!(calls[1].get("thoughtSignature").is_none());
        assert_eq!(calls[0]["functionCall"]["args"]["location"], "Paris");
        let results: Vec<&Value> = contents
            .iter()
            .filter(|c| c["role"] == "user")
            .flat_map(|c| c["parts"].as_array().into_iter().flatten())
            .filter_map(|p| p.get("functionResponse"))
            .collect();
        assert_eq!(results.len(), 2);
        assert!(
            results
                .iter()
                .all(|r| r["name"] == "get_weather" && r.get("id").is_none())
        );
        assert!(
            !body.to_string().contains("_gts_"),
            "no id with a signature leaks"
        );
    }

    #[test]
    fn signatures_survive_an_openai_client_round_trip() {
        let resp =
            response_in(&fixture("response-function-call-signed.json"), "gw").expect("answer");
        let answer: Value =
            serde_json::from_slice(&openai_chat::response_out(&resp, "public", 0)).expect("json");
        let message = answer["choices"][0]["message"].clone();
        let ids: Vec<String> = message["tool_calls"]
            .as_array()
            .expect("tool_calls")
            .iter()
            .map(|c| c["id"].as_str().expect("id").to_owned())
            .collect();
        let next = json!({
            "model": "public",
            "messages": [
                {"role": "user", "content": "Weather in Paris and London?"},
                message,
                {"role": "tool", "tool_call_id": ids[0], "content": "18C"},
                {"role": "tool", "tool_call_id": ids[1], "content": "15C"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}],
        });
        let req = openai_chat::request_in(next.to_string().as_bytes()).expect("request_in");
        assert_second_turn_carries_the_signature(&body_of(&req, Out::default()));
    }

    #[test]
    fn signatures_survive_an_anthropic_client_round_trip() {
        let resp =
            response_in(&fixture("response-function-call-signed.json"), "gw").expect("answer");
        let answer: Value =
            serde_json::from_slice(&anthropic::response_out(&resp, "public")).expect("json");
        assert_eq!(answer["stop_reason"], "tool_use");
        let content = answer["content"].clone();
        let ids: Vec<String> = content
            .as_array()
            .expect("content")
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .map(|b| b["id"].as_str().expect("id").to_owned())
            .collect();
        let next = json!({
            "model": "public",
            "max_tokens": 1024,
            "messages": [
                {"role": "user", "content": "Weather in Paris and London?"},
                {"role": "assistant", "content": content},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": ids[0], "content": "18C"},
                    {"type": "tool_result", "tool_use_id": ids[1], "content": "15C"},
                ]},
            ],
        });
        let req = anthropic::request_in(next.to_string().as_bytes()).expect("request_in");
        assert_second_turn_carries_the_signature(&body_of(&req, Out::default()));
    }

    #[test]
    fn a_streamed_call_gives_the_same_id_as_the_json_answer() {
        let events = events_in(&fixture("stream-function-call.sse"));
        let streamed: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                Event::BlockStart {
                    kind: BlockKind::ToolUse { id, .. },
                    ..
                } => Some(id.clone()),
                _ => None,
            })
            .collect();
        let whole =
            response_in(&fixture("response-function-call-signed.json"), "gw").expect("answer");
        let ids: Vec<String> = whole
            .content
            .iter()
            .filter_map(|b| match b {
                Block::ToolUse { id, .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(streamed, ids);
    }

    #[test]
    fn gemini_ids_go_back_with_their_signature() {
        let resp =
            response_in(&fixture("response-function-call-vertex-ids.json"), "gw").expect("ok");
        let Some(Block::ToolUse { id, .. }) = resp.content.get(1) else {
            panic!("{resp:?}");
        };
        let id = id.clone();
        let req = Request {
            messages: vec![
                user(vec![text("q")]),
                assistant(resp.content),
                user(vec![Block::ToolResult {
                    tool_use_id: id,
                    content: vec![text("r")],
                    is_error: false,
                    cache: None,
                }]),
            ],
            ..Request::default()
        };
        let v = body_of(&req, Out::default());
        let call = &v["contents"][1]["parts"][1];
        assert_eq!(call["functionCall"]["id"], "fc_8a3b1c");
        assert_eq!(call["thoughtSignature"], SIG_A);
        assert_eq!(
            v["contents"][2]["parts"][0]["functionResponse"]["id"],
            "fc_8a3b1c"
        );
    }

    // -- tool call ids and hostile input --------------------------------------------------------

    #[test]
    fn ids_that_look_signed_but_are_not_stay_whole() {
        for id in [
            "call_abc",
            "_gts__0",
            "x_gts_AAAA_9",
            "x_gts_!!!!_4",
            "x_gts_AAAA_99999999999999999999",
            "é_gts_é_2",
            "",
        ] {
            assert_eq!(split_tool_id(id), (id, None), "{id:?}");
        }
    }

    proptest! {
        #[test]
        fn a_signed_id_splits_back_exactly(
            base in "[A-Za-z0-9_-]{0,40}",
            sig in proptest::collection::vec(any::<u8>(), 1..300),
        ) {
            let standard = STANDARD.encode(&sig);
            let id = join_tool_id(&base, Some(&standard));
            prop_assert!(id.chars().all(is_id_char));
            prop_assert_eq!(split_tool_id(&id), (base.as_str(), Some(standard)));
        }

        #[test]
        fn splitting_any_id_never_panics(id in "\\PC{0,80}") {
            let _ = split_tool_id(&id);
        }

        #[test]
        fn parsers_never_panic_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = response_in(&bytes, "gw");
            let _ = error_in(400, &bytes);
            let _ = error_in(429, &bytes);
            let mut stream = EventsIn::new("gw");
            let mut out = Vec::new();
            let _ = stream.event(&bytes, &mut out);
            stream.finish(&mut out);
        }

        #[test]
        fn parsers_never_panic_on_json_like_text(
            text in r#"[{}\[\]",:a-zA-Z0-9_ ]{0,200}"#,
            key in prop::sample::select(vec![
                "candidates", "content", "parts", "functionCall", "text", "thought",
                "thoughtSignature", "finishReason", "usageMetadata", "promptFeedback", "error",
            ]),
        ) {
            let chunk = format!(r#"{{"{key}":{text}"#);
            let _ = response_in(chunk.as_bytes(), "gw");
            let _ = error_in(400, chunk.as_bytes());
            let mut stream = EventsIn::new("gw");
            let mut out = Vec::new();
            let _ = stream.event(chunk.as_bytes(), &mut out);
            let _ = stream.event(text.as_bytes(), &mut out);
            stream.finish(&mut out);
        }
    }
}
