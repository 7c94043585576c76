//! Anthropic Messages in and out of the canonical model: used by Anthropic clients of a
//! translated backend (requests in, answers and streams out) and by `anthropic` backends of
//! translated clients (requests out, answers and streams in).

use super::Refused;
use crate::canonical::{ApiError, Event, Request, Response};

/// How the request for an Anthropic backend is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    /// `max_tokens` to send when the request has none (Anthropic requires it): the request's
    /// output reservation, so admission reserved exactly what is sent.
    pub default_max_tokens: u64,
}

/// An Anthropic Messages request body read into the canonical model.
pub fn request_in(body: &[u8]) -> Result<Request, Refused> {
    let _ = body;
    unimplemented!()
}

/// The request body for an Anthropic backend, `model` being the upstream's name.
pub fn request_out(req: &Request, model: &str, out: Out) -> Result<Vec<u8>, Refused> {
    let _ = (req, model, out);
    unimplemented!()
}

/// An Anthropic message (a 2xx body) read into the canonical model.
pub fn response_in(body: &[u8]) -> Result<Response, String> {
    let _ = body;
    unimplemented!()
}

/// A message for an Anthropic client; `model` is the client's public name.
pub fn response_out(resp: &Response, model: &str) -> Vec<u8> {
    let _ = (resp, model);
    unimplemented!()
}

/// An Anthropic error body (any status, 529 included) read into the canonical model.
pub fn error_in(status: u16, body: &[u8]) -> ApiError {
    let _ = (status, body);
    unimplemented!()
}

/// An error body for an Anthropic client.
pub fn error_out(err: &ApiError, request_id: &str) -> Vec<u8> {
    let _ = (err, request_id);
    unimplemented!()
}

/// Reads an Anthropic stream (the `data` of each server-sent event; its `type` names the
/// event) into canonical events.
#[derive(Debug, Default)]
pub struct EventsIn {}

impl EventsIn {
    pub fn new() -> Self {
        Self::default()
    }

    /// One event's data; appends the canonical events it makes.
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

/// Writes canonical events as an Anthropic stream (`event:` and `data:` lines).
#[derive(Debug)]
pub struct EventsOut {}

impl EventsOut {
    /// `model`: the client's public name.
    pub fn new(model: &str) -> Self {
        let _ = model;
        unimplemented!()
    }

    /// Appends the bytes of the server-sent events `event` makes.
    pub fn event(&mut self, event: &Event, out: &mut Vec<u8>) {
        let _ = (event, out);
        unimplemented!()
    }

    /// The stream is over: appends what is still owed.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let _ = out;
        unimplemented!()
    }
}
