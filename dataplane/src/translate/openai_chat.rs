//! OpenAI Chat Completions in and out of the canonical model: used by OpenAI clients of a
//! translated backend (answers and streams out) and by `openai`, `azure-openai` and
//! `openai-compatible` backends of translated clients (requests out, answers and streams in).

use serde::Deserialize;

use super::Refused;
use crate::canonical::{ApiError, Event, Request, Response, Usage};

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

/// An OpenAI chat request body read into the canonical model. Refuses what no other backend
/// API can express (`n` > 1, `logprobs`, audio input...), naming the field.
pub fn request_in(body: &[u8]) -> Result<Request, Refused> {
    let _ = body;
    unimplemented!()
}

/// The request body for an OpenAI-shaped backend, `model` being the upstream's name.
pub fn request_out(req: &Request, model: &str, out: Out) -> Result<Vec<u8>, Refused> {
    let _ = (req, model, out);
    unimplemented!()
}

/// An OpenAI chat completion (a 2xx body) read into the canonical model.
pub fn response_in(body: &[u8]) -> Result<Response, String> {
    let _ = body;
    unimplemented!()
}

/// A chat completion for an OpenAI client; `model` is the client's public name.
pub fn response_out(resp: &Response, model: &str, created: u64) -> Vec<u8> {
    let _ = (resp, model, created);
    unimplemented!()
}

/// An OpenAI-shaped error body (any status) read into the canonical model.
pub fn error_in(status: u16, body: &[u8]) -> ApiError {
    let _ = (status, body);
    unimplemented!()
}

/// An error body for an OpenAI client.
pub fn error_out(err: &ApiError) -> Vec<u8> {
    let _ = err;
    unimplemented!()
}

/// Reads an OpenAI chat stream (the `data` of each server-sent event) into canonical events.
#[derive(Debug, Default)]
pub struct EventsIn {}

impl EventsIn {
    pub fn new() -> Self {
        Self::default()
    }

    /// One event's data (`[DONE]` included); appends the canonical events it makes.
    pub fn event(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        let _ = (data, out);
        unimplemented!()
    }

    /// The upstream body ended; appends what closes the message.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        let _ = out;
        unimplemented!()
    }
}

/// Writes canonical events as an OpenAI chat stream (`data:` lines, `[DONE]` last).
#[derive(Debug)]
pub struct EventsOut {}

impl EventsOut {
    /// `model`: the client's public name; `include_usage`: the client asked for the usage
    /// chunk.
    pub fn new(model: &str, created: u64, include_usage: bool) -> Self {
        let _ = (model, created, include_usage);
        unimplemented!()
    }

    /// Appends the bytes of the server-sent events `event` makes.
    pub fn event(&mut self, event: &Event, out: &mut Vec<u8>) {
        let _ = (event, out);
        unimplemented!()
    }

    /// The stream is over: appends what is still owed (`[DONE]`).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let _ = out;
        unimplemented!()
    }
}
