//! Translators between the dialects clients speak, the APIs backends speak, and the
//! canonical model (`canonical`). Same dialect on both sides never comes here: the body passes
//! through with the model spliced (`request.rs`, `stream.rs`).
//!
//! ```text
//!  OpenAI chat body ─► openai_chat::request_in ─┐            ┌► anthropic::request_out ─► Anthropic body
//!  Anthropic body ──► anthropic::request_in ───┴► Request ──┴► openai_chat::request_out ─► OpenAI body
//!  answers, streams and errors come back the same way: *_in to canonical, *_out from it
//! ```
//!
//! Every function is pure, bytes to bytes: no sockets, clocks, config lookups or
//! credentials; what a translator needs (the upstream model, the `max_tokens` to send) is
//! passed in. Streams are translated event by event with bounded state, never buffered whole.

pub mod anthropic;
pub mod openai_chat;

/// A request body that cannot be read, or that asks for what the target cannot express.
/// Answered with 400 in the client's dialect, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// The offending field, as the client spelled it (`n`, `logprobs`, `messages`...).
    pub param: Option<&'static str>,
    pub message: String,
}

impl Refused {
    pub fn new(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

/// Most tool calls one streamed answer may open; past it the stream ends with an error.
pub const MAX_STREAM_TOOL_CALLS: usize = 128;
