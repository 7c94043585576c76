//! Data masking: a route's rules applied to prompt text before it leaves the gateway and,
//! when the route asks, to answer text (streamed answers too).
//!
//! ```text
//!  text ─► RegexSet (one pass over all rules) ─► rules that matched: Regex::find_at
//!       ─► validators (Luhn, IBAN mod 97, SSN ranges, IP octets) drop false positives
//!       ─► overlaps: the first rule in the list wins ─► redact / mask / block
//!  request body: only the prompt's string values are spliced, every other byte kept
//!  answer stream: StreamMasker holds back a bounded tail, so a match split across events
//!                 is still found; MaskedStream rewrites the client dialect's text deltas
//! ```
//!
//! The matched text is never logged and never a metric label: callers see rule names and
//! counts ([`Tally`]) only.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use modelgate_wire::{MaskAction, MaskingSpec};
use regex::{Regex, RegexSet};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::metrics::{Metrics, RuleSeries};
use crate::request::Endpoint;
use crate::stream::{BoxError, MeteredStream};
use crate::translate::Dialect;

/// The most text a stream masker holds back for a match that may still be completing;
/// a custom pattern that can match more than this is masked in pieces of at least this size.
pub const MAX_HOLD: usize = 1024;
/// Bytes of context either side of a match that validators and `\b` look at.
const LOOK: usize = 8;
/// A stream masker never holds more than this, whatever its rules.
const HARD_HOLD: usize = 64 * 1024;

/// A built-in detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Detector {
    Email,
    Phone,
    CreditCard,
    Iban,
    Ssn,
    Ipv4,
    Ipv6,
    ApiKey,
}

impl Detector {
    fn of(name: &str) -> Option<Self> {
        Some(match name {
            "email" => Self::Email,
            "phone" => Self::Phone,
            "credit-card" => Self::CreditCard,
            "iban" => Self::Iban,
            "ssn" => Self::Ssn,
            "ipv4" => Self::Ipv4,
            "ipv6" => Self::Ipv6,
            "api-key" => Self::ApiKey,
            _ => return None,
        })
    }

    /// Candidates, each bounded in length; the validator decides. ASCII word boundaries and
    /// digits only (`(?-u)`), so the DFA handles every pattern.
    fn pattern(self) -> &'static str {
        match self {
            Self::Email => {
                r"(?-u)[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63}){0,3}\.[A-Za-z]{2,24}\b"
            }
            // International (`+` and a country code, then groups of 1–5 digits, one may be
            // in parentheses: +44 20 7946 0958, +49 (0)30 1234567, +81 3-1234-5678), or
            // North American 3-3-4 without one.
            Self::Phone => {
                r"(?-u)\+[1-9][0-9]{0,2}(?:[ .\-]?(?:\([0-9]{1,4}\)|[0-9]{1,5})){1,6}\b|(?:\([0-9]{3}\)|\b[0-9]{3})[ .\-]?[0-9]{3}[ .\-]?[0-9]{4}\b"
            }
            Self::CreditCard => r"(?-u)\b[0-9](?:[ \-]?[0-9]){12,18}\b",
            Self::Iban => r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
            Self::Ssn => r"(?-u)\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",
            Self::Ipv4 => r"(?-u)\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b",
            Self::Ipv6 => r"(?-u)[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}",
            Self::ApiKey => {
                r"(?-u)\b(?:sk-[A-Za-z0-9_\-]{20,200}|sk_live_[A-Za-z0-9]{24,99}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,99}|github_pat_[A-Za-z0-9_]{22,99}|xox[abprs]-[A-Za-z0-9\-]{10,200}|AIza[0-9A-Za-z_\-]{35})\b"
            }
        }
    }

    /// The default replacement: `[EMAIL]`, `[CREDIT_CARD]`.
    fn label(self) -> &'static str {
        match self {
            Self::Email => "[EMAIL]",
            Self::Phone => "[PHONE]",
            Self::CreditCard => "[CREDIT_CARD]",
            Self::Iban => "[IBAN]",
            Self::Ssn => "[SSN]",
            Self::Ipv4 => "[IPV4]",
            Self::Ipv6 => "[IPV6]",
            Self::ApiKey => "[API_KEY]",
        }
    }

    /// Whether a candidate at `m` in `hay` is the real thing.
    fn valid(self, hay: &str, m: Range<usize>) -> bool {
        let text = &hay[m.clone()];
        let before = hay[..m.start].chars().next_back();
        let after = hay[m.end..].chars().next();
        match self {
            Self::Email | Self::ApiKey => true,
            // E.164 allows 15 digits at most; with a country code 8 are the fewest that make
            // a number (small countries), without one the 10 of 3-3-4.
            Self::Phone => {
                let digits = text.bytes().filter(u8::is_ascii_digit).count();
                let fewest = if text.starts_with('+') { 8 } else { 10 };
                (fewest..=15).contains(&digits)
                    && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '+')
            }
            Self::CreditCard => luhn(text),
            Self::Iban => iban(text),
            Self::Ssn => ssn(text),
            Self::Ipv4 => {
                // Not a piece of a version number or a longer dotted run.
                let dotted_after = after == Some('.')
                    && hay[m.end + 1..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_digit());
                ipv4(text) && before != Some('.') && !dotted_after
            }
            Self::Ipv6 => {
                let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == ':');
                !word(before) && !word(after) && before != Some('.') && ipv6(text)
            }
        }
    }
}

/// The Luhn checksum of a card number (13 to 19 digits, spaces and dashes ignored).
pub fn luhn(text: &str) -> bool {
    let digits: Vec<u32> = text.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d = d * 2;
                if d > 9 { d - 9 } else { d }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// The ISO 13616 check: the country and check digits moved to the end, letters as 10..35,
/// the number mod 97 is 1.
pub fn iban(text: &str) -> bool {
    let s: Vec<u8> = text.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&s.len()) || !s.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in s[4..].iter().chain(&s[..4]) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// A US SSN `AAA-GG-SSSS` as the SSA issues them: no area 000, 666 or 900-999, no group
/// 00, no serial 0000.
pub fn ssn(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    let [area, group, serial] = parts.as_slice() else {
        return false;
    };
    let n = |s: &str| s.parse::<u32>().ok();
    matches!((n(area), n(group), n(serial)),
        (Some(a), Some(g), Some(s)) if a != 0 && a != 666 && a < 900 && g != 0 && s != 0)
}

/// Four octets of at most 255.
pub fn ipv4(text: &str) -> bool {
    let octets: Vec<&str> = text.split('.').collect();
    octets.len() == 4
        && octets
            .iter()
            .all(|o| !o.is_empty() && o.len() <= 3 && o.parse::<u16>().is_ok_and(|v| v <= 255))
}

/// A full or `::`-compressed IPv6 address with at least three groups written out (so that
/// `::1` or a `a::b` path separator is left alone).
pub fn ipv6(text: &str) -> bool {
    let groups = text.split(':').filter(|g| !g.is_empty()).count();
    groups >= 3 && text.parse::<std::net::Ipv6Addr>().is_ok()
}

/// A match and the index of its rule.
type Hit = (Range<usize>, usize);

/// One compiled rule.
struct Rule {
    name: String,
    detector: Option<Detector>,
    regex: Regex,
    action: MaskAction,
    keep_last: usize,
    replacement: String,
    /// Its metric handles, resolved at its first match; holding them keeps them in
    /// `/metrics` while this rule's snapshot is alive.
    series: OnceLock<Arc<RuleSeries>>,
}

impl Rule {
    fn series(&self, metrics: &Metrics, route: &str) -> &RuleSeries {
        self.series
            .get_or_init(|| metrics.masking_rule(route, &self.name))
    }
}

/// Where a masking rule stopped a request: its name, never the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub rule: String,
}

/// Matches per rule, in the rules' order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(Vec<u64>);

impl Tally {
    fn add(&mut self, rule: usize) {
        if self.0.len() <= rule {
            self.0.resize(rule + 1, 0);
        }
        self.0[rule] += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Whether the text is a prompt or an answer, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Prompt,
    Answer,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::Answer => "answer",
        }
    }
}

/// A route's masking rules compiled: one `RegexSet` over all of them for the first pass,
/// and each rule's own `Regex` for the rules that set says matched.
pub struct Masker {
    rules: Vec<Rule>,
    set: RegexSet,
    /// The longest text a match (and the context its checks read) can span, bounded.
    reach: usize,
    /// Whether answers are masked too.
    pub answers: bool,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .field("answers", &self.answers)
            .finish()
    }
}

/// The longest text `pattern` can match, capped at [`MAX_HOLD`].
fn max_len(pattern: &str) -> usize {
    regex_syntax::Parser::new()
        .parse(pattern)
        .ok()
        .and_then(|h| h.properties().maximum_len())
        .map_or(MAX_HOLD, |n| n.min(MAX_HOLD))
}

impl Masker {
    /// Compiles checked rules (`modelgate_wire::check` has refused bad ones; a rule that
    /// still fails is an error naming it).
    pub fn new(spec: &MaskingSpec) -> Result<Self, String> {
        let mut rules = Vec::with_capacity(spec.rules.len());
        for r in &spec.rules {
            let (detector, regex) = match (&r.detector, &r.pattern) {
                (Some(d), None) => {
                    let d = Detector::of(d)
                        .ok_or_else(|| format!("rule {}: unknown detector", r.name))?;
                    let re =
                        Regex::new(d.pattern()).map_err(|e| format!("rule {}: {e}", r.name))?;
                    (Some(d), re)
                }
                (None, Some(p)) => (
                    None,
                    modelgate_wire::check::compile_mask_pattern(p)
                        .map_err(|e| format!("rule {}: pattern {e}", r.name))?,
                ),
                _ => {
                    return Err(format!(
                        "rule {}: needs one of detector and pattern",
                        r.name
                    ));
                }
            };
            let replacement = r.replacement.clone().unwrap_or_else(|| match detector {
                Some(d) => d.label().to_owned(),
                None => format!("[{}]", r.name.to_uppercase().replace(['-', '.'], "_")),
            });
            rules.push(Rule {
                name: r.name.clone(),
                detector,
                regex,
                action: r.action,
                keep_last: r
                    .keep_last
                    .unwrap_or(modelgate_wire::DEFAULT_MASK_KEEP_LAST)
                    as usize,
                replacement,
                series: OnceLock::new(),
            });
        }
        let set = regex::RegexSetBuilder::new(rules.iter().map(|r| r.regex.as_str()))
            .size_limit(modelgate_wire::MASK_PATTERN_SIZE_LIMIT * 8)
            .dfa_size_limit(modelgate_wire::MASK_PATTERN_SIZE_LIMIT * 8)
            .build()
            .map_err(|e| format!("the rules together do not compile: {e}"))?;
        let reach = rules
            .iter()
            .map(|r| max_len(r.regex.as_str()))
            .max()
            .unwrap_or(0)
            + LOOK;
        Ok(Self {
            rules,
            set,
            reach,
            answers: spec.answers,
        })
    }

    /// Every candidate of every rule in `hay[from..]` (validated or not: a stream masker
    /// cuts only where none spans) and the accepted, validated, non-overlapping matches,
    /// sorted by start, each with its rule.
    fn scan(&self, hay: &str, from: usize) -> (Vec<Range<usize>>, Vec<Hit>) {
        let mut raw = Vec::new();
        let mut found: Vec<Hit> = Vec::new();
        if from >= hay.len() {
            return (raw, found);
        }
        for i in self.set.matches_at(hay, from).iter() {
            let rule = &self.rules[i];
            let mut at = from;
            while at <= hay.len() {
                let Some(m) = rule.regex.find_at(hay, at) else {
                    break;
                };
                if m.is_empty() {
                    // Patterns are checked never to match empty text; step on regardless.
                    at = m.end() + hay[m.end()..].chars().next().map_or(1, char::len_utf8);
                    continue;
                }
                raw.push(m.range());
                if rule.detector.is_none_or(|d| d.valid(hay, m.range())) {
                    found.push((m.range(), i));
                }
                at = m.end();
            }
        }
        // The first rule in the list wins an overlap: rules in order, each match kept if it
        // overlaps nothing kept so far.
        let mut kept: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for (m, i) in found {
            let before = kept.range(..m.end).next_back();
            if before.is_some_and(|(_, (end, _))| *end > m.start) {
                continue;
            }
            kept.insert(m.start, (m.end, i));
        }
        let accepted = kept.into_iter().map(|(s, (e, i))| (s..e, i)).collect();
        (raw, accepted)
    }

    /// What replaces `text` matched by rule `i` (block in an answer redacts).
    fn replacement<'a>(&'a self, i: usize, text: &str) -> Cow<'a, str> {
        let rule = &self.rules[i];
        match rule.action {
            MaskAction::Mask => {
                let n = text.chars().count();
                if n <= rule.keep_last {
                    return Cow::Owned("*".repeat(n));
                }
                let mut out = "*".repeat(n - rule.keep_last);
                out.extend(text.chars().skip(n - rule.keep_last));
                Cow::Owned(out)
            }
            MaskAction::Redact | MaskAction::Block | MaskAction::Unknown => {
                Cow::Borrowed(&rule.replacement)
            }
        }
    }

    /// `hay[from..to]` with the accepted matches replaced; `hits` sorted by start.
    fn apply(&self, hay: &str, from: usize, to: usize, hits: &[Hit], tally: &mut Tally) -> String {
        let mut out = String::with_capacity(to - from);
        let mut at = from;
        for (m, i) in hits {
            out.push_str(&hay[at..m.start]);
            out.push_str(&self.replacement(*i, &hay[m.clone()]));
            tally.add(*i);
            at = m.end;
        }
        out.push_str(&hay[at..to]);
        out
    }

    /// An answer's text masked (a `block` rule redacts: an answer under way cannot be
    /// refused). Borrowed when nothing matched.
    pub fn mask<'t>(&self, text: &'t str, tally: &mut Tally) -> Cow<'t, str> {
        let (_, hits) = self.scan(text, 0);
        if hits.is_empty() {
            return Cow::Borrowed(text);
        }
        Cow::Owned(self.apply(text, 0, text.len(), &hits, tally))
    }

    /// A prompt's text masked, or the first `block` rule that matched it.
    pub fn mask_prompt<'t>(
        &self,
        text: &'t str,
        tally: &mut Tally,
    ) -> Result<Cow<'t, str>, Blocked> {
        let (_, hits) = self.scan(text, 0);
        if let Some((_, i)) = hits
            .iter()
            .find(|(_, i)| self.rules[*i].action == MaskAction::Block)
        {
            return Err(Blocked {
                rule: self.rules[*i].name.clone(),
            });
        }
        if hits.is_empty() {
            return Ok(Cow::Borrowed(text));
        }
        Ok(Cow::Owned(self.apply(text, 0, text.len(), &hits, tally)))
    }

    /// Counts into the metrics, one series per rule that matched.
    pub fn record(&self, metrics: &Metrics, route: &str, direction: Direction, tally: &Tally) {
        for (i, n) in tally.0.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let Some(rule) = self.rules.get(i) else {
                continue;
            };
            rule.series(metrics, route)
                .matches(action_label(rule.action, direction), direction.as_str())
                .inc_by(*n);
        }
    }

    /// A `block` counted where it stopped a prompt.
    pub fn record_block(&self, metrics: &Metrics, route: &str, blocked: &Blocked) {
        if let Some(rule) = self.rules.iter().find(|r| r.name == blocked.rule) {
            rule.series(metrics, route)
                .matches("block", Direction::Prompt.as_str())
                .inc();
        }
    }

    /// The rules' names, in order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The request body with every prompt text of `endpoint`'s dialect masked, the other
    /// bytes as the client sent them; `None` when nothing matched.
    pub fn mask_request(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        tally: &mut Tally,
    ) -> Result<Option<Bytes>, Blocked> {
        let Ok(text) = std::str::from_utf8(body) else {
            return Ok(None);
        };
        let Ok(top) = serde_json::from_str::<Entries<'_>>(text) else {
            return Ok(None);
        };
        let mut strings = Vec::new();
        for (k, v) in &top.0 {
            let prompt = match endpoint {
                Endpoint::Chat => k == "messages",
                Endpoint::Completions => k == "prompt",
                Endpoint::Embeddings => k == "input",
                Endpoint::Messages | Endpoint::CountTokens => k == "messages" || k == "system",
                Endpoint::Responses => k == "input" || k == "instructions",
            };
            if prompt {
                content(v, 0, &mut strings);
            }
        }
        let mut splices: Vec<(Range<usize>, String)> = Vec::new();
        for raw in strings {
            let Ok(s) = serde_json::from_str::<Cow<'_, str>>(raw.get()) else {
                continue;
            };
            if let Cow::Owned(masked) = self.mask_prompt(&s, tally)? {
                let json = serde_json::to_string(&masked).unwrap_or_default();
                splices.push((span(text, raw), json));
            }
        }
        Ok(splice(body, splices))
    }

    /// A whole answer body with its text masked (every string under `content`, `text` or
    /// `output_text`, in any dialect); `None` when nothing matched.
    pub fn mask_answer_body(&self, body: &[u8], tally: &mut Tally) -> Option<Bytes> {
        let text = std::str::from_utf8(body).ok()?;
        let top = serde_json::from_str::<&RawValue>(text).ok()?;
        let mut strings = Vec::new();
        answer_texts(top, false, 0, &mut strings);
        let mut splices = Vec::new();
        for raw in strings {
            let Ok(s) = serde_json::from_str::<Cow<'_, str>>(raw.get()) else {
                continue;
            };
            if let Cow::Owned(masked) = self.mask(&s, tally) {
                splices.push((
                    span(text, raw),
                    serde_json::to_string(&masked).unwrap_or_default(),
                ));
            }
        }
        splice(body, splices)
    }
}

fn action_label(action: MaskAction, direction: Direction) -> &'static str {
    match (action, direction) {
        (MaskAction::Mask, _) => "mask",
        (MaskAction::Block, Direction::Prompt) => "block",
        _ => "redact",
    }
}

/// `body` with the ranges replaced; `None` when there are none.
fn splice(body: &[u8], mut splices: Vec<(Range<usize>, String)>) -> Option<Bytes> {
    if splices.is_empty() {
        return None;
    }
    splices.sort_by_key(|(r, _)| r.start);
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    for (r, new) in splices {
        if r.start < at || r.end > body.len() {
            continue;
        }
        out.extend_from_slice(&body[at..r.start]);
        out.extend_from_slice(new.as_bytes());
        at = r.end;
    }
    out.extend_from_slice(&body[at..]);
    Some(Bytes::from(out))
}

/// Where a raw value borrowed from `text` lies in it.
fn span(text: &str, raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr().addr().wrapping_sub(text.as_ptr().addr());
    start..start + raw.get().len()
}

/// How deep prompt and answer structures are followed.
const MAX_DEPTH: usize = 16;

/// A prompt value: a string, an array of strings or parts, or a part (an object whose
/// `text`, `output` or nested `content` is prompt text: chat content parts, Anthropic
/// blocks and tool results, Responses items).
fn content<'a>(v: &'a RawValue, depth: usize, out: &mut Vec<&'a RawValue>) {
    if depth > MAX_DEPTH {
        return;
    }
    match v.get().as_bytes().first() {
        Some(b'"') => out.push(v),
        Some(b'[') => {
            if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(v.get()) {
                for item in items {
                    content(item, depth + 1, out);
                }
            }
        }
        Some(b'{') => {
            if let Ok(obj) = serde_json::from_str::<Entries<'_>>(v.get()) {
                for (k, x) in obj.0 {
                    match k.as_str() {
                        "text" | "output" if x.get().starts_with('"') => out.push(x),
                        "content" => content(x, depth + 1, out),
                        _ => {}
                    }
                }
            }
        }
        _ => {}
    }
}

/// Answer text anywhere in `v`: strings under `content`, `text`, `output_text`, `delta`
/// (when `text_key` says `v` is the value of such a key).
fn answer_texts<'a>(v: &'a RawValue, text_key: bool, depth: usize, out: &mut Vec<&'a RawValue>) {
    if depth > MAX_DEPTH * 2 {
        return;
    }
    match v.get().as_bytes().first() {
        Some(b'"') if text_key => out.push(v),
        Some(b'[') => {
            if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(v.get()) {
                for item in items {
                    answer_texts(item, text_key, depth + 1, out);
                }
            }
        }
        Some(b'{') => {
            if let Ok(obj) = serde_json::from_str::<Entries<'_>>(v.get()) {
                for (k, x) in obj.0 {
                    let text = matches!(k.as_str(), "content" | "text" | "output_text");
                    answer_texts(x, text, depth + 1, out);
                }
            }
        }
        _ => {}
    }
}

/// A JSON object's entries in order, repeats kept, values borrowed raw.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v: &'de RawValue = map.next_value()?;
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Masks text that arrives in pieces exactly as if it had come whole: it emits only text
/// no later piece can change (before a point no candidate spans, and at least the longest
/// match before the end) and holds back the rest, at most about twice the longest match.
pub struct StreamMasker {
    masker: Arc<Masker>,
    /// Already emitted context (`..ctx`), then text held back.
    buf: String,
    ctx: usize,
}

impl StreamMasker {
    pub fn new(masker: Arc<Masker>) -> Self {
        Self {
            masker,
            buf: String::new(),
            ctx: 0,
        }
    }

    /// Bytes held back.
    pub fn held(&self) -> usize {
        self.buf.len() - self.ctx
    }

    /// Takes a piece, returns the masked text that is final.
    pub fn push(&mut self, text: &str, tally: &mut Tally) -> String {
        self.buf.push_str(text);
        let reach = self.masker.reach;
        let len = self.buf.len();
        if len < self.ctx + reach + 1 {
            return String::new();
        }
        let mut safe = floor_boundary(&self.buf, len - reach);
        let (raw, hits) = self.masker.scan(&self.buf, self.ctx);
        if self.held() <= HARD_HOLD {
            // Back to a point no candidate spans.
            loop {
                let spanning = raw
                    .iter()
                    .filter(|r| r.start < safe && safe < r.end)
                    .map(|r| r.start)
                    .min();
                match spanning {
                    Some(s) => safe = s,
                    None => break,
                }
            }
        }
        if safe <= self.ctx {
            return String::new();
        }
        let done: Vec<_> = hits.into_iter().filter(|(m, _)| m.end <= safe).collect();
        let out = self.masker.apply(&self.buf, self.ctx, safe, &done, tally);
        let keep_from = floor_boundary(&self.buf, safe.saturating_sub(LOOK));
        self.buf.drain(..keep_from);
        self.ctx = safe - keep_from;
        out
    }

    /// The rest, masked: the text has ended.
    pub fn finish(&mut self, tally: &mut Tally) -> String {
        let (_, hits) = self.masker.scan(&self.buf, self.ctx);
        let out = self
            .masker
            .apply(&self.buf, self.ctx, self.buf.len(), &hits, tally);
        self.buf.clear();
        self.ctx = 0;
        out
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// An answer stream in the client's dialect with its text masked on the way: the text
/// deltas of each choice or content block go through a [`StreamMasker`]; what it holds back
/// is added to the block's last delta, or sent in a delta of its own before the block ends.
/// Events without text pass as they came.
pub struct MaskedStream<B = MeteredStream> {
    inner: Box<B>,
    masker: Arc<Masker>,
    dialect: Dialect,
    /// Bytes of an event not complete yet.
    partial: Vec<u8>,
    /// Per choice (OpenAI), content block (Anthropic) or output part (Responses).
    texts: HashMap<String, StreamMasker>,
    /// The last OpenAI chunk's `id`, `created`, `model` and `object`, for a chunk of its own.
    template: Option<serde_json::Value>,
    ready: VecDeque<Bytes>,
    ended: bool,
    tally: Tally,
    metrics: Arc<Metrics>,
    route: String,
}

impl<B> MaskedStream<B> {
    pub fn new(
        inner: Box<B>,
        masker: Arc<Masker>,
        dialect: Dialect,
        metrics: Arc<Metrics>,
        route: String,
    ) -> Self {
        Self {
            inner,
            masker,
            dialect,
            partial: Vec::new(),
            texts: HashMap::new(),
            template: None,
            ready: VecDeque::new(),
            ended: false,
            tally: Tally::default(),
            metrics,
            route,
        }
    }

    fn text(&mut self, key: String) -> &mut StreamMasker {
        let masker = self.masker.clone();
        self.texts
            .entry(key)
            .or_insert_with(|| StreamMasker::new(masker))
    }

    /// Complete events out of `partial`, each rewritten.
    fn events(&mut self) {
        while let Some((end, sep)) = event_end(&self.partial) {
            let event: Vec<u8> = self.partial.drain(..end + sep).collect();
            let out = self.event(&event);
            self.ready.push_back(out);
        }
    }

    /// One event (its blank line included), rewritten if it carries text.
    fn event(&mut self, event: &[u8]) -> Bytes {
        let Ok(text) = std::str::from_utf8(event) else {
            return Bytes::copy_from_slice(event);
        };
        let mut name = None;
        let mut data = None;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("data:") {
                if data.is_some() {
                    // Multi-line data is not how any dialect writes its deltas.
                    return Bytes::copy_from_slice(event);
                }
                data = Some(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        let Some(data) = data else {
            return Bytes::copy_from_slice(event);
        };
        if data.trim() == "[DONE]" {
            let mut out = self.flush_openai();
            out.extend_from_slice(event);
            return Bytes::from(out);
        }
        let Ok(mut json) = serde_json::from_str::<serde_json::Value>(data) else {
            return Bytes::copy_from_slice(event);
        };
        let (changed, before) = match self.dialect {
            Dialect::Anthropic => self.anthropic(&mut json),
            Dialect::OpenAiResponses => self.responses(&mut json),
            _ => (self.openai(&mut json), Vec::new()),
        };
        let mut out = before;
        if !changed {
            out.extend_from_slice(event);
            return Bytes::from(out);
        }
        if let Some(name) = name {
            out.extend_from_slice(format!("event: {name}\n").as_bytes());
        }
        out.extend_from_slice(format!("data: {json}\n\n").as_bytes());
        Bytes::from(out)
    }

    /// An OpenAI chunk: each choice's `delta.content` (chat) or `text` (completions) masked;
    /// a choice that finishes gets what was held back.
    fn openai(&mut self, json: &mut serde_json::Value) -> bool {
        let mut changed = false;
        let Some(choices) = json.get_mut("choices").and_then(|c| c.as_array_mut()) else {
            return false;
        };
        let mut pieces = Vec::new();
        for (n, choice) in choices.iter().enumerate() {
            let index = choice
                .get("index")
                .and_then(|i| i.as_u64())
                .unwrap_or(n as u64);
            let finished = choice.get("finish_reason").is_some_and(|f| !f.is_null());
            let (field, text) = match choice.get("delta") {
                Some(d) => ("delta", d.get("content").and_then(|c| c.as_str())),
                None => ("text", choice.get("text").and_then(|c| c.as_str())),
            };
            pieces.push((n, index, finished, field, text.map(str::to_owned)));
        }
        let mut tally = std::mem::take(&mut self.tally);
        for (n, index, finished, field, text) in pieces {
            let key = format!("openai/{index}");
            let mut out = match &text {
                Some(t) => self.text(key.clone()).push(t, &mut tally),
                None => String::new(),
            };
            if finished {
                out.push_str(&self.text(key).finish(&mut tally));
            }
            if text.as_deref() == Some(out.as_str()) || (text.is_none() && out.is_empty()) {
                continue;
            }
            changed = true;
            let choice = &mut choices[n];
            if field == "delta" {
                if let Some(d) = choice.get_mut("delta").and_then(|d| d.as_object_mut()) {
                    d.insert("content".into(), out.into());
                }
            } else if let Some(c) = choice.as_object_mut() {
                c.insert("text".into(), out.into());
            }
        }
        self.tally = tally;
        if let Some(obj) = json.as_object() {
            let mut t = serde_json::Map::new();
            for k in ["id", "object", "created", "model"] {
                if let Some(v) = obj.get(k) {
                    t.insert(k.into(), v.clone());
                }
            }
            self.template = Some(t.into());
        }
        changed
    }

    /// Chunks with whatever every OpenAI choice still holds back (before `[DONE]` or the end).
    fn flush_openai(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut tally = std::mem::take(&mut self.tally);
        let mut keys: Vec<String> = self.texts.keys().cloned().collect();
        keys.sort();
        for key in keys {
            let Some(index) = key
                .strip_prefix("openai/")
                .and_then(|i| i.parse::<u64>().ok())
            else {
                continue;
            };
            let rest = self.text(key).finish(&mut tally);
            if rest.is_empty() {
                continue;
            }
            let mut chunk = self
                .template
                .clone()
                .unwrap_or_else(|| serde_json::json!({"object": "chat.completion.chunk"}));
            let choice = if chunk.get("object").and_then(|o| o.as_str()) == Some("text_completion")
            {
                serde_json::json!({"index": index, "text": rest, "finish_reason": null})
            } else {
                serde_json::json!({"index": index, "delta": {"content": rest}, "finish_reason": null})
            };
            chunk["choices"] = serde_json::json!([choice]);
            out.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
        }
        self.tally = tally;
        out
    }

    /// An Anthropic event: `text_delta`s masked per block; a block's held-back text is sent
    /// in a delta of its own before its `content_block_stop`.
    fn anthropic(&mut self, json: &mut serde_json::Value) -> (bool, Vec<u8>) {
        let kind = json.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let index = json.get("index").and_then(|i| i.as_u64()).unwrap_or(0);
        let key = format!("anthropic/{index}");
        let mut tally = std::mem::take(&mut self.tally);
        let result = match kind {
            "content_block_delta" => {
                let text = json
                    .get("delta")
                    .filter(|d| d.get("type").and_then(|t| t.as_str()) == Some("text_delta"))
                    .and_then(|d| d.get("text"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned);
                match text {
                    Some(t) => {
                        let out = self.text(key).push(&t, &mut tally);
                        let changed = out != t;
                        json["delta"]["text"] = out.into();
                        (changed, Vec::new())
                    }
                    None => (false, Vec::new()),
                }
            }
            "content_block_stop" => {
                let rest = self.text(key).finish(&mut tally);
                let before = if rest.is_empty() {
                    Vec::new()
                } else {
                    let delta = serde_json::json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": rest}});
                    format!("event: content_block_delta\ndata: {delta}\n\n").into_bytes()
                };
                (false, before)
            }
            "content_block_start" => (self.whole(json, &mut tally), Vec::new()),
            _ => (false, Vec::new()),
        };
        self.tally = tally;
        result
    }

    /// A Responses event: `response.output_text.delta`s masked per part; the held-back text
    /// goes in a delta of its own before the part's `.done`; whole texts in `.done` and
    /// `response.completed` events are masked whole (the same result as the deltas).
    fn responses(&mut self, json: &mut serde_json::Value) -> (bool, Vec<u8>) {
        let kind = json
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_owned();
        let part = |j: &serde_json::Value| {
            format!(
                "responses/{}/{}",
                j.get("output_index").and_then(|i| i.as_u64()).unwrap_or(0),
                j.get("content_index").and_then(|i| i.as_u64()).unwrap_or(0)
            )
        };
        let mut tally = std::mem::take(&mut self.tally);
        let result = match kind.as_str() {
            "response.output_text.delta" => {
                match json
                    .get("delta")
                    .and_then(|d| d.as_str())
                    .map(str::to_owned)
                {
                    Some(t) => {
                        let out = self.text(part(json)).push(&t, &mut tally);
                        let changed = out != t;
                        json["delta"] = out.into();
                        (changed, Vec::new())
                    }
                    None => (false, Vec::new()),
                }
            }
            "response.output_text.done" => {
                let rest = self.text(part(json)).finish(&mut tally);
                let before = if rest.is_empty() {
                    Vec::new()
                } else {
                    let mut delta =
                        serde_json::json!({"type": "response.output_text.delta", "delta": rest});
                    for k in ["item_id", "output_index", "content_index"] {
                        if let Some(v) = json.get(k) {
                            delta[k] = v.clone();
                        }
                    }
                    format!("event: response.output_text.delta\ndata: {delta}\n\n").into_bytes()
                };
                // Counted once, in the deltas.
                let changed = self.whole(json, &mut Tally::default());
                (changed, before)
            }
            _ => (self.whole(json, &mut Tally::default()), Vec::new()),
        };
        self.tally = tally;
        result
    }

    /// Every answer text in an event masked whole.
    fn whole(&self, json: &mut serde_json::Value, tally: &mut Tally) -> bool {
        let body = json.to_string();
        match self.masker.mask_answer_body(body.as_bytes(), tally) {
            Some(b) => match serde_json::from_slice(&b) {
                Ok(v) => {
                    *json = v;
                    true
                }
                Err(_) => false,
            },
            None => false,
        }
    }

    /// The stream ended: the rest of an unfinished event, and all held-back text.
    fn end(&mut self) {
        if !self.partial.is_empty() {
            let mut event = std::mem::take(&mut self.partial);
            event.extend_from_slice(b"\n\n");
            let out = self.event(&event);
            self.ready.push_back(out);
        }
        let mut tail = Vec::new();
        match self.dialect {
            Dialect::Anthropic | Dialect::OpenAiResponses => {
                // Blocks that never saw their end: their text, masked, is dropped rather
                // than sent unchecked in a shape the client cannot place.
                let mut tally = std::mem::take(&mut self.tally);
                for m in self.texts.values_mut() {
                    m.finish(&mut tally);
                }
                self.tally = tally;
            }
            _ => tail = self.flush_openai(),
        }
        if !tail.is_empty() {
            self.ready.push_back(Bytes::from(tail));
        }
    }
}

/// Where the first event in `buf` ends: its length and the blank line's.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, 2));
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

impl<B> Drop for MaskedStream<B> {
    fn drop(&mut self) {
        self.masker
            .record(&self.metrics, &self.route, Direction::Answer, &self.tally);
    }
}

impl<B> Body for MaskedStream<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.ready.pop_front() {
                if b.is_empty() {
                    continue;
                }
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(this.inner.as_mut()).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.ended = true;
                    this.end();
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.partial.extend_from_slice(&data);
                        this.events();
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_wire::MaskRuleSpec;

    fn rule(
        name: &str,
        detector: Option<&str>,
        pattern: Option<&str>,
        action: MaskAction,
    ) -> MaskRuleSpec {
        MaskRuleSpec {
            name: name.into(),
            detector: detector.map(Into::into),
            pattern: pattern.map(Into::into),
            action,
            keep_last: None,
            replacement: None,
        }
    }

    /// Every built-in detector, redacting, in the list's order.
    pub(super) fn all_detectors() -> Masker {
        let rules = modelgate_wire::MASK_DETECTORS
            .iter()
            .map(|d| rule(d, Some(d), None, MaskAction::Redact))
            .collect();
        Masker::new(&MaskingSpec {
            rules,
            answers: true,
        })
        .unwrap()
    }

    fn masked(m: &Masker, text: &str) -> String {
        m.mask(text, &mut Tally::default()).into_owned()
    }

    #[test]
    fn validators() {
        assert!(luhn("4111 1111 1111 1111"));
        assert!(luhn("5500-0000-0000-0004"));
        assert!(luhn("378282246310005"));
        assert!(!luhn("4111 1111 1111 1112"));
        assert!(!luhn("1234567812345678"));
        assert!(!luhn("4111"), "too short");
        assert!(iban("GB82 WEST 1234 5698 7654 32"));
        assert!(iban("DE89370400440532013000"));
        assert!(!iban("GB82 WEST 1234 5698 7654 33"));
        assert!(!iban("DE89370400440532013001"));
        assert!(ssn("123-45-6789"));
        for bad in [
            "000-45-6789",
            "666-45-6789",
            "900-45-6789",
            "123-00-6789",
            "123-45-0000",
        ] {
            assert!(!ssn(bad), "{bad}");
        }
        assert!(ipv4("192.168.1.1"));
        assert!(ipv4("255.255.255.255"));
        assert!(!ipv4("256.1.1.1"));
        assert!(!ipv4("1.2.3"));
        assert!(ipv6("2001:db8:85a3::8a2e:370:7334"));
        assert!(ipv6("fe80:0:0:0:202:b3ff:fe1e:8329"));
        assert!(!ipv6("::1"), "too few groups written out");
        assert!(!ipv6("12:30:45"), "a time of day");
    }

    #[test]
    fn every_detector_redacts_and_near_misses_stay() {
        let m = all_detectors();
        for (text, want) in [
            ("mail jane.doe@example.com now", "mail [EMAIL] now"),
            ("call +1 415-555-0132 today", "call [PHONE] today"),
            ("call (415) 555-0132", "call [PHONE]"),
            ("call +44 20 7946 0958.", "call [PHONE]."),
            ("ruf +49 (0)30 1234567 an", "ruf [PHONE] an"),
            ("appelez +33 1 23 45 67 89", "appelez [PHONE]"),
            ("+81 3-1234-5678 Tokyo", "[PHONE] Tokyo"),
            ("+91 98765 43210", "[PHONE]"),
            ("+3546112345", "[PHONE]"),
            ("card 4111 1111 1111 1111.", "card [CREDIT_CARD]."),
            ("card 4111111111111111", "card [CREDIT_CARD]"),
            ("iban GB82 WEST 1234 5698 7654 32 ok", "iban [IBAN] ok"),
            ("ssn 123-45-6789", "ssn [SSN]"),
            ("host 10.0.0.12:8080", "host [IPV4]:8080"),
            ("host 2001:db8:85a3::8a2e:370:7334 up", "host [IPV6] up"),
            (
                "key sk-proj-abcdefghijklmnopqrstuvwxyz012345",
                "key [API_KEY]",
            ),
            ("aws AKIAIOSFODNN7EXAMPLE", "aws [API_KEY]"),
        ] {
            assert_eq!(masked(&m, text), want, "{text}");
        }
        for near in [
            "order 1234567812345678 (fails Luhn)",
            "iban GB82 WEST 1234 5698 7654 33",
            "ssn 000-12-3456 and 666-12-3456",
            "version 1.2.3.4.5 and 300.1.1.1",
            "std::net::Ipv6Addr at 12:30:45",
            "sk-short",
            "no@tld",
            "score +12 34 (seven digits with the code)",
            "x+49 30 1234567 (glued to a word)",
            "+1234567890123456 (sixteen digits)",
        ] {
            assert_eq!(masked(&m, near), near);
        }
    }

    #[test]
    fn mask_keeps_the_last_characters_and_the_first_rule_wins() {
        let mut card = rule("card", Some("credit-card"), None, MaskAction::Mask);
        card.keep_last = Some(4);
        let custom = rule("digits", None, Some("[0-9]{4}"), MaskAction::Redact);
        let m = Masker::new(&MaskingSpec {
            rules: vec![card, custom],
            answers: false,
        })
        .unwrap();
        let mut tally = Tally::default();
        assert_eq!(
            m.mask("pay 4111111111111111 ref 2024", &mut tally),
            "pay ************1111 ref [DIGITS]"
        );
        assert_eq!(tally.0, vec![1, 1]);
    }

    #[test]
    fn block_names_the_rule_and_never_the_text() {
        let m = Masker::new(&MaskingSpec {
            rules: vec![
                rule("mail", Some("email"), None, MaskAction::Redact),
                rule("no-cards", Some("credit-card"), None, MaskAction::Block),
            ],
            answers: false,
        })
        .unwrap();
        let mut tally = Tally::default();
        let err = m
            .mask_prompt("a@b.io pays with 4111 1111 1111 1111", &mut tally)
            .unwrap_err();
        assert_eq!(err.rule, "no-cards");
        assert!(!format!("{err:?}").contains("4111"));
        assert_eq!(m.mask_prompt("a@b.io", &mut tally).unwrap(), "[EMAIL]");
    }

    #[test]
    fn request_bodies_keep_every_byte_but_the_prompt_text() {
        let m = all_detectors();
        let body = br#"{"model":"m", "messages":[{"role":"user","content":"to a@b.io"},{"role":"user","content":[{"type":"text","text":"ip 10.1.2.3"},{"type":"image_url","image_url":{"url":"a@b.io"}}]}],"user":"a@b.io"}"#;
        let out = m
            .mask_request(Endpoint::Chat, body, &mut Tally::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m", "messages":[{"role":"user","content":"to [EMAIL]"},{"role":"user","content":[{"type":"text","text":"ip [IPV4]"},{"type":"image_url","image_url":{"url":"a@b.io"}}]}],"user":"a@b.io"}"#
        );
        let anthropic = br#"{"model":"m","system":[{"type":"text","text":"ops a@b.io"}],"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"ssn 123-45-6789"}]}]}"#;
        let out = m
            .mask_request(Endpoint::Messages, anthropic, &mut Tally::default())
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["system"][0]["text"], "ops [EMAIL]");
        assert_eq!(v["messages"][0]["content"][0]["content"], "ssn [SSN]");
        let responses = br#"{"model":"m","instructions":"mail a@b.io","input":[{"role":"user","content":[{"type":"input_text","text":"\u0061@b.io"}]}]}"#;
        let out = m
            .mask_request(Endpoint::Responses, responses, &mut Tally::default())
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["instructions"], "mail [EMAIL]");
        assert_eq!(
            v["input"][0]["content"][0]["text"], "[EMAIL]",
            "escapes decoded"
        );
        assert!(
            m.mask_request(
                Endpoint::Chat,
                br#"{"model":"m","messages":[]}"#,
                &mut Tally::default()
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn answer_bodies_in_every_dialect() {
        let m = all_detectors();
        for body in [
            r#"{"choices":[{"message":{"role":"assistant","content":"a@b.io"}}]}"#,
            r#"{"content":[{"type":"text","text":"a@b.io"}]}"#,
            r#"{"output":[{"content":[{"type":"output_text","text":"a@b.io"}]}]}"#,
        ] {
            let out = m
                .mask_answer_body(body.as_bytes(), &mut Tally::default())
                .unwrap();
            let out = std::str::from_utf8(&out).unwrap();
            assert_eq!(out, body.replace("a@b.io", "[EMAIL]"));
        }
    }

    const SAMPLE: &str = "Hi, I am jane.doe@example.com; card 4111 1111 1111 1111 and \
        4111111111111112, IBAN GB82 WEST 1234 5698 7654 32, ssn 123-45-6789, phone +44 20 \
        7946 0958 or (415) 555-0132, hosts 192.168.10.200 and 2001:db8::8a2e:370:7334, key \
        sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX12 — ünïcödé ✓ done. version 1.2.3.4.5 at 12:30:45";

    fn streamed(m: &Arc<Masker>, pieces: &[&str]) -> String {
        let mut s = StreamMasker::new(m.clone());
        let mut tally = Tally::default();
        let mut out = String::new();
        for p in pieces {
            out.push_str(&s.push(p, &mut tally));
            assert!(
                s.held() <= 2 * m.reach + p.len() + LOOK,
                "held {}",
                s.held()
            );
        }
        out.push_str(&s.finish(&mut tally));
        out
    }

    #[test]
    fn a_text_split_at_every_offset_masks_like_the_whole() {
        let m = Arc::new(all_detectors());
        let whole = masked(&m, SAMPLE);
        assert!(
            whole.contains("[EMAIL]")
                && whole.contains("[CREDIT_CARD]")
                && whole.contains("[IBAN]")
        );
        assert!(whole.contains("4111111111111112"), "{whole}");
        for at in 0..=SAMPLE.len() {
            if !SAMPLE.is_char_boundary(at) {
                continue;
            }
            let (a, b) = SAMPLE.split_at(at);
            assert_eq!(streamed(&m, &[a, b]), whole, "split at {at}");
        }
        // And in pieces of every size.
        for size in 1..12 {
            let mut pieces = Vec::new();
            let mut rest = SAMPLE;
            while !rest.is_empty() {
                let mut n = size.min(rest.len());
                while !rest.is_char_boundary(n) {
                    n += 1;
                }
                let (a, b) = rest.split_at(n);
                pieces.push(a);
                rest = b;
            }
            assert_eq!(streamed(&m, &pieces), whole, "pieces of {size}");
        }
        // A long text is emitted as it goes, with a bounded tail held back.
        let mut s = StreamMasker::new(m.clone());
        let mut tally = Tally::default();
        let mut out = 0;
        for _ in 0..100 {
            out += s.push(SAMPLE, &mut tally).len();
        }
        assert!(out > 0 && s.held() <= 2 * m.reach + SAMPLE.len());
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A stream body of the given chunks.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    const SECRET: &str =
        "write to jane.doe@example.com or call (415) 555-0132, card 4111111111111111. Bye";
    const MASKED: &str = "write to [EMAIL] or call [PHONE], card [CREDIT_CARD]. Bye";

    /// The events of `events`, sent in chunks of `size` bytes, through a masked stream.
    async fn run(dialect: Dialect, events: &str, size: usize) -> (String, Metrics) {
        let masker = Arc::new(super::tests::all_detectors());
        let chunks = events
            .as_bytes()
            .chunks(size)
            .map(Bytes::copy_from_slice)
            .collect();
        let metrics = Arc::new(Metrics::new());
        let s = MaskedStream::new(
            Box::new(Chunks(chunks)),
            masker,
            dialect,
            metrics.clone(),
            "default/r".into(),
        );
        let out = s.collect().await.unwrap().to_bytes();
        let metrics = Arc::try_unwrap(metrics).ok().unwrap();
        (String::from_utf8(out.to_vec()).unwrap(), metrics)
    }

    fn pieces(text: &str, n: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        chars.chunks(n).map(|c| c.iter().collect()).collect()
    }

    fn data(out: &str) -> Vec<serde_json::Value> {
        out.split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn openai_chunks_carry_the_masked_text_and_stay_valid() {
        let mut events = String::new();
        for p in pieces(SECRET, 3) {
            let chunk = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": null}]});
            events.push_str(&format!("data: {chunk}\n\n"));
        }
        events.push_str("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
        for size in [1, 7, 4096] {
            let (out, metrics) = run(Dialect::OpenAiChat, &events, size).await;
            let text: String = data(&out)
                .iter()
                .filter_map(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            assert_eq!(text, MASKED, "chunks of {size}");
            assert!(out.ends_with("data: [DONE]\n\n"));
            for c in data(&out) {
                assert_eq!(c["object"], "chat.completion.chunk");
            }
            drop(metrics);
        }
        // The stream ended without a finish or [DONE]: the rest is still sent, masked.
        let cut: String = events.split("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},").next().unwrap().into();
        let (out, _) = run(Dialect::OpenAiChat, &cut, 5).await;
        let text: String = data(&out)
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, MASKED);
    }

    #[tokio::test]
    async fn anthropic_text_deltas_are_masked_per_block() {
        let mut events = String::from(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"content\":[]}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        );
        for p in pieces(SECRET, 3) {
            let d = serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}});
            events.push_str(&format!("event: content_block_delta\ndata: {d}\n\n"));
        }
        events.push_str("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        let (out, metrics) = run(Dialect::Anthropic, &events, 11).await;
        let evs = data(&out);
        let text: String = evs
            .iter()
            .filter(|e| e["type"] == "content_block_delta")
            .filter_map(|e| e["delta"]["text"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, MASKED);
        let stop = evs
            .iter()
            .position(|e| e["type"] == "content_block_stop")
            .unwrap();
        assert!(
            evs[stop + 1..]
                .iter()
                .all(|e| e["type"] != "content_block_delta")
        );
        assert!(out.contains("event: content_block_delta\ndata: "));
        let text = metrics.encode_prometheus();
        assert!(
            text.contains(r#"modelgate_masking_total{route="default/r",rule="email",action="redact",direction="answer"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn responses_deltas_and_final_texts_are_masked_alike() {
        let mut events = String::new();
        for p in pieces(SECRET, 4) {
            let d = serde_json::json!({"type": "response.output_text.delta", "item_id": "i", "output_index": 0, "content_index": 0, "delta": p});
            events.push_str(&format!("event: response.output_text.delta\ndata: {d}\n\n"));
        }
        let done = serde_json::json!({"type": "response.output_text.done", "item_id": "i", "output_index": 0, "content_index": 0, "text": SECRET});
        let completed = serde_json::json!({"type": "response.completed", "response": {"output": [{"type": "message", "content": [{"type": "output_text", "text": SECRET}]}]}});
        events.push_str(&format!("event: response.output_text.done\ndata: {done}\n\nevent: response.completed\ndata: {completed}\n\n"));
        let (out, metrics) = run(Dialect::OpenAiResponses, &events, 9).await;
        let evs = data(&out);
        let text: String = evs
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .filter_map(|e| e["delta"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, MASKED);
        let done = evs
            .iter()
            .find(|e| e["type"] == "response.output_text.done")
            .unwrap();
        assert_eq!(done["text"], MASKED);
        let completed = evs
            .iter()
            .find(|e| e["type"] == "response.completed")
            .unwrap();
        assert_eq!(
            completed["response"]["output"][0]["content"][0]["text"],
            MASKED
        );
        assert!(!out.contains("jane.doe"));
        drop(metrics);
    }
}

/// `cargo test -p modelgate-dataplane --release --lib mask::bench -- --ignored --nocapture`
#[cfg(test)]
mod bench {
    use super::*;
    use modelgate_wire::MaskRuleSpec;

    #[test]
    #[ignore = "a timing, run in release by hand"]
    fn masking_a_4kb_prompt_with_20_rules() {
        let mut rules: Vec<MaskRuleSpec> = modelgate_wire::MASK_DETECTORS
            .iter()
            .map(|d| MaskRuleSpec {
                name: (*d).into(),
                detector: Some((*d).into()),
                pattern: None,
                action: MaskAction::Redact,
                keep_last: None,
                replacement: None,
            })
            .collect();
        for i in 0..12 {
            rules.push(MaskRuleSpec {
                name: format!("custom-{i}"),
                detector: None,
                pattern: Some(format!(r"\bPROJ{i}-[0-9]{{4,8}}\b")),
                action: MaskAction::Redact,
                keep_last: None,
                replacement: None,
            });
        }
        assert_eq!(rules.len(), 20);
        let m = Masker::new(&MaskingSpec {
            rules,
            answers: false,
        })
        .unwrap();
        let filler = "The quarterly report covers revenue, churn and the roadmap for next year. ";
        let mut clean = String::new();
        while clean.len() < 4096 {
            clean.push_str(filler);
        }
        clean.truncate(4096);
        let mut dirty = clean.clone();
        dirty.replace_range(1000..1040, "mail jane@example.com card 4111111111111111 ");
        dirty.truncate(4096);
        for (what, text) in [("no match", &clean), ("two matches", &dirty)] {
            let body = serde_json::to_vec(&serde_json::json!({
                "model": "m", "messages": [{"role": "user", "content": text}]
            }))
            .unwrap();
            let n = 2000;
            for _ in 0..100 {
                let _ = m.mask_request(Endpoint::Chat, &body, &mut Tally::default());
            }
            let start = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(
                    m.mask_request(Endpoint::Chat, &body, &mut Tally::default())
                        .ok(),
                );
            }
            let per = start.elapsed() / n;
            println!("masking a 4 KB chat prompt with 20 rules ({what}): {per:?} per request");
        }
    }
}
