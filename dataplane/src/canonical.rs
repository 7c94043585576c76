//! The canonical model of a chat call: what every dialect a client speaks and every backend
//! API an upstream speaks is translated into and out of (`translate`).
//!
//! ```text
//!  client bytes ─► dialect in ─► Request ─► backend API out ─► upstream bytes
//!  client bytes ◄─ dialect out ◄─ Response | Event* | ApiError ◄─ backend API in ◄─ upstream
//! ```
//!
//! Values that pass through unchanged (tool schemas, tool arguments) stay JSON text
//! (`RawValue`): a translated body copies those bytes once and never decodes them. Nothing
//! here does I/O; `docs/providers.md` (section 2) is the reference for every field.

use serde_json::value::RawValue;

/// The API that issued an opaque value (a thinking signature). Such a value is only ever
/// sent back to the same API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAiChat,
    AnthropicMessages,
    /// OpenAI Responses: a reasoning item's `encrypted_content`.
    OpenAiResponses,
    /// AWS Bedrock Converse: `reasoningContent` signatures.
    BedrockConverse,
    /// Google Gemini (and Gemini on Vertex AI): `thoughtSignature`.
    Gemini,
}

/// A chat request.
#[derive(Debug, Default)]
pub struct Request {
    /// The client's public model name; the provider writes the upstream one.
    pub model: String,
    /// Leading system (or developer) text, in order.
    pub system: Vec<TextBlock>,
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    /// `None`: the client sent none; the gateway fills it where the backend requires one.
    pub max_output_tokens: Option<u64>,
    pub stop: Vec<String>,
    pub response_format: Option<ResponseFormat>,
    pub reasoning: Option<Reasoning>,
    /// The end user, for the provider's abuse monitoring.
    pub user: Option<String>,
    pub stream: bool,
    /// Whether the client asked to see usage in a stream (OpenAI `include_usage`); the
    /// gateway's meter always gets it.
    pub include_usage: bool,
    /// Fields the client sent that the target cannot carry and that do not change the shape
    /// of the answer; dropped and named in `x-modelgate-ignored-params`.
    pub ignored: Vec<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    /// Only mid-conversation: leading system text goes to `Request::system`.
    System,
}

#[derive(Debug)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Block>,
}

#[derive(Debug)]
pub enum Block {
    Text(TextBlock),
    Image {
        source: ImageSource,
        cache: Option<CacheMark>,
    },
    /// A PDF document.
    Document {
        media_type: String,
        data: String,
        cache: Option<CacheMark>,
    },
    ToolUse {
        id: String,
        name: String,
        /// The arguments: a JSON object, as the model wrote it.
        input: Box<RawValue>,
        cache: Option<CacheMark>,
    },
    ToolResult {
        tool_use_id: String,
        /// Text and image blocks.
        content: Vec<Block>,
        is_error: bool,
        cache: Option<CacheMark>,
    },
    Thinking {
        text: String,
        signature: Option<Signature>,
    },
    RedactedThinking {
        data: Signature,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextBlock {
    pub text: String,
    pub cache: Option<CacheMark>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    Url(String),
    /// `media_type` is one of image/jpeg, image/png, image/gif, image/webp; `data` is base64,
    /// never decoded.
    Base64 {
        media_type: String,
        data: String,
    },
}

/// A prompt-cache breakpoint (Anthropic `cache_control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheMark {
    pub ttl: Option<CacheTtl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheTtl {
    FiveMinutes,
    OneHour,
}

/// An opaque value tied to the API that issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub origin: Api,
    pub value: String,
}

#[derive(Debug)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema object; `None`: the tool takes no arguments.
    pub input_schema: Option<Box<RawValue>>,
    pub strict: Option<bool>,
    pub cache: Option<CacheMark>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    /// The model must call some tool (OpenAI `required`, Anthropic `any`).
    Any,
    None,
    Tool(String),
}

#[derive(Debug)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: Option<String>,
        schema: Box<RawValue>,
        strict: Option<bool>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reasoning {
    Off,
    Effort(Effort),
    /// Anthropic `thinking.budget_tokens`.
    Budget(u64),
    /// Anthropic adaptive thinking: the model decides.
    Adaptive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    Minimal,
    Low,
    Medium,
    High,
    XHigh,
    Max,
}

impl Effort {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minimal => "minimal",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::XHigh => "xhigh",
            Self::Max => "max",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "minimal" => Self::Minimal,
            "low" => Self::Low,
            "medium" => Self::Medium,
            "high" => Self::High,
            "xhigh" => Self::XHigh,
            "max" => Self::Max,
            _ => return None,
        })
    }
}

/// A whole answer.
#[derive(Debug)]
pub struct Response {
    pub id: String,
    pub model: String,
    /// Text, thinking, redacted thinking and tool use blocks, in the model's order.
    pub content: Vec<Block>,
    pub stop: StopReason,
    pub stop_sequence: Option<String>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
    ContentFilter,
    Refusal,
    ContextWindow,
    PauseTurn,
    Other,
}

impl StopReason {
    /// The OpenAI `finish_reason` word (docs/providers.md 4.3); also what the access log says.
    pub fn openai(self) -> &'static str {
        match self {
            Self::EndTurn | Self::StopSequence | Self::PauseTurn | Self::Other => "stop",
            Self::MaxTokens | Self::ContextWindow => "length",
            Self::ToolUse => "tool_calls",
            Self::ContentFilter | Self::Refusal => "content_filter",
        }
    }

    /// The Anthropic `stop_reason` word.
    pub fn anthropic(self) -> &'static str {
        match self {
            Self::EndTurn | Self::Other => "end_turn",
            Self::MaxTokens => "max_tokens",
            Self::StopSequence => "stop_sequence",
            Self::ToolUse => "tool_use",
            Self::ContentFilter | Self::Refusal => "refusal",
            Self::ContextWindow => "model_context_window_exceeded",
            Self::PauseTurn => "pause_turn",
        }
    }
}

/// One event of a streamed answer. Block indexes are contiguous from 0 in the order blocks
/// start; every started block is stopped before `MessageStop`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    MessageStart {
        id: String,
        /// The input side, if the backend reports it this early (Anthropic does).
        usage: Usage,
    },
    BlockStart {
        index: u32,
        kind: BlockKind,
    },
    BlockDelta {
        index: u32,
        delta: Delta,
    },
    BlockStop {
        index: u32,
    },
    /// Cumulative: a field present replaces the earlier value, a field absent keeps it.
    Usage(Usage),
    MessageStop {
        stop: StopReason,
        stop_sequence: Option<String>,
    },
    /// A failure after the stream began; the last event.
    Error(ApiError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockKind {
    Text,
    Thinking,
    /// The whole block arrives at its start.
    RedactedThinking {
        data: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Text(String),
    /// A fragment of the tool call's arguments (JSON text).
    ToolArgs(String),
    Thinking(String),
    Signature(String),
}

/// Token usage, one model for every backend (docs/providers.md section 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens neither read from nor written to a cache.
    pub input: Option<u64>,
    pub cache_read: Option<u64>,
    pub cache_write: Option<u64>,
    /// All generated tokens, reasoning included.
    pub output: Option<u64>,
    /// Part of `output`, reported for visibility; never added again.
    pub reasoning: Option<u64>,
}

impl Usage {
    /// Fold a later report in: each field present replaces the earlier value.
    pub fn merge(&mut self, later: Usage) {
        let pick = |a: &mut Option<u64>, b: Option<u64>| {
            if b.is_some() {
                *a = b;
            }
        };
        pick(&mut self.input, later.input);
        pick(&mut self.cache_read, later.cache_read);
        pick(&mut self.cache_write, later.cache_write);
        pick(&mut self.output, later.output);
        pick(&mut self.reasoning, later.reasoning);
    }

    /// Every prompt token: uncached input and both cache kinds.
    pub fn prompt(&self) -> u64 {
        self.input
            .unwrap_or(0)
            .saturating_add(self.cache_read.unwrap_or(0))
            .saturating_add(self.cache_write.unwrap_or(0))
    }

    /// Tokens processed: what rate limits and token budgets count.
    pub fn processed(&self) -> u64 {
        self.prompt().saturating_add(self.output.unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// An error answer, in no dialect yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// What an error means; failover decides on it (docs/providers.md 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    Permission,
    NotFound,
    RequestTooLarge,
    RateLimited,
    QuotaExhausted,
    ContextLength,
    ContentFiltered,
    Overloaded,
    Timeout,
    Server,
    Billing,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_usage_replaces_only_what_it_carries() {
        let mut u = Usage {
            input: Some(10),
            cache_read: Some(5),
            output: Some(1),
            ..Usage::default()
        };
        u.merge(Usage {
            output: Some(42),
            ..Usage::default()
        });
        assert_eq!(u.input, Some(10), "input from message_start is kept");
        assert_eq!(u.output, Some(42));
        u.merge(Usage {
            input: Some(10),
            cache_read: Some(5),
            output: Some(43),
            ..Usage::default()
        });
        assert_eq!(u.prompt(), 15, "a repeated input field is not added twice");
        assert_eq!(u.processed(), 58);
    }
}
