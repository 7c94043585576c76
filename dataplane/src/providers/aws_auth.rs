//! AWS credentials for the `bedrock` provider: SigV4 request signing and the STS
//! `AssumeRoleWithWebIdentity` exchange (the IRSA / EKS pod-identity pattern), as pure
//! functions. Reading the token file, posting to STS and caching the credentials until they
//! expire are the provider's; nothing here does I/O or reads a clock.
//!
//! ```text
//!  projected token ─► web_identity_request ─► POST sts ─► web_identity_response ─► Credentials
//!  Credentials + request (method, URL, headers, body, now) ─► sign ─► authorization, x-amz-date, ...
//! ```
//!
//! Signing follows AWS's rules for non-S3 services, with `aws-sigv4`'s key derivation: the
//! URL path is taken as already percent-encoded once and encoded again for the canonical
//! request (a model id `…-v1:0` travels as `…-v1%3A0` and is signed as `…-v1%253A0`, as
//! botocore does), the session token is signed, and no `x-amz-content-sha256` header is
//! added. A request's signature is written into one reused buffer (canonical request, then
//! string to sign) and hashed with `ring`; the day's key, ready for HMAC, and the scope are
//! kept per backend in a [`KeyCache`]. Secrets never reach `Debug` output or an error string.

use std::fmt;
use std::time::SystemTime;

use aws_sigv4::sign::v4;
use http::{HeaderName, HeaderValue};

/// Largest STS answer read; a real one is about 1.5 KiB.
const MAX_STS_RESPONSE_BYTES: usize = 64 * 1024;

/// Most of an STS error message copied into an error string.
const MAX_STS_MESSAGE_BYTES: usize = 256;

/// A set of AWS credentials: long-lived keys, or temporary ones from STS (with a session token
/// and an expiry).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    secret_access_key: String,
    pub session_token: Option<String>,
    /// When temporary credentials stop working; `None` for long-lived keys.
    pub expires_at: Option<SystemTime>,
}

impl Credentials {
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
        expires_at: Option<SystemTime>,
    ) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token,
            expires_at,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key id is not a secret (it appears in every Authorization header); the secret
        // key and the session token are.
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The SigV4 headers for one request: `authorization`, `x-amz-date` and, with temporary
/// credentials, `x-amz-security-token`. `url` is the full URL as sent, its path already
/// percent-encoded (a Bedrock model id's `:` as `%3A`), without a query; `headers` are the
/// other headers to sign (`content-type`; `host` is taken from `url` when absent). The
/// values of `authorization` and `x-amz-security-token` are marked sensitive.
///
/// The key derivation is `aws-sigv4`'s own (`sign::v4`); the canonical request is written
/// here, for the one shape the gateway signs (no query), because `aws-sigv4`'s general
/// request signer cost about 6 µs a request, a sixth of the proxy's whole CPU for a Bedrock
/// call (docs/benchmarks.md). The tests below hold it to botocore's signatures, to AWS's
/// SigV4 test suite and, on random requests, to `aws-sigv4`'s signer.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    creds: &Credentials,
    region: &str,
    service: &str,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    now: SystemTime,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    sign_cached(
        &KeyCache::default(),
        creds,
        region,
        service,
        method,
        url,
        headers,
        body,
        now,
    )
}

/// What stays the same for one set of credentials, region and service through a UTC day,
/// kept between requests: the day's signing key (four HMACs to derive) ready for HMAC, the
/// credential scope, the head of the `authorization` value and the session token's header
/// value (checked once, not on every request).
#[derive(Default)]
pub struct KeyCache(arc_swap::ArcSwapOption<CachedKey>);

/// A [`KeyCache`] entry, always `Some`.
type Guard = arc_swap::Guard<Option<std::sync::Arc<CachedKey>>>;

struct CachedKey {
    /// `20240102`: the day the key is for.
    date: [u8; 8],
    access_key_id: String,
    region: String,
    service: String,
    key: ring::hmac::Key,
    /// `20240102/us-east-1/bedrock/aws4_request`
    scope: String,
    /// `AWS4-HMAC-SHA256 Credential=AKID/<scope>, SignedHeaders=`
    authorization_head: String,
    /// `x-amz-security-token`, sensitive.
    token: Option<HeaderValue>,
}

impl CachedKey {
    fn is_for(&self, creds: &Credentials, date: &[u8], region: &str, service: &str) -> bool {
        self.date == date
            && self.access_key_id == creds.access_key_id
            && self.region == region
            && self.service == service
            && self.token.as_ref().map(HeaderValue::as_bytes)
                == creds.session_token.as_deref().map(str::as_bytes)
    }
}

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyCache(<redacted>)")
    }
}

impl KeyCache {
    /// The cached entry if it is for these credentials and day, else a new one, kept. The
    /// guard borrows the entry without touching its reference count.
    fn key(
        &self,
        creds: &Credentials,
        date: &[u8; 8],
        region: &str,
        service: &str,
        now: SystemTime,
    ) -> Result<Guard, String> {
        let k = self.0.load();
        if k.as_ref()
            .is_some_and(|k| k.is_for(creds, date, region, service))
        {
            return Ok(k);
        }
        drop(k);
        let token = match &creds.session_token {
            // Never echo the value: it is a secret.
            Some(t) => Some(sensitive(HeaderValue::from_str(t).map_err(|_| {
                "the value of `x-amz-security-token` is not a valid header value".to_owned()
            })?)),
            None => None,
        };
        let derived = v4::generate_signing_key(&creds.secret_access_key, now, region, service);
        let day = std::str::from_utf8(date).unwrap_or_default();
        let scope = format!("{day}/{region}/{service}/aws4_request");
        let k = std::sync::Arc::new(CachedKey {
            date: *date,
            access_key_id: creds.access_key_id.clone(),
            region: region.to_owned(),
            service: service.to_owned(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
            authorization_head: format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders=",
                creds.access_key_id
            ),
            scope,
            token,
        });
        self.0.store(Some(k.clone()));
        Ok(arc_swap::Guard::from_inner(Some(k)))
    }
}

fn sensitive(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// Headers signed without a heap allocation; a request with more goes to the heap.
const INLINE_HEADERS: usize = 12;

thread_local! {
    /// The canonical request and the string to sign of this thread's last signature: one
    /// buffer, reused.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
}

/// A scratch buffer grown past this (a long path or many headers) is not kept.
const MAX_KEPT_SCRATCH: usize = 16 * 1024;

/// [`sign`], with what is constant through the day (the signing key, the scope) from, and
/// kept in, `cache`.
#[allow(clippy::too_many_arguments)]
pub fn sign_cached(
    cache: &KeyCache,
    creds: &Credentials,
    region: &str,
    service: &str,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    now: SystemTime,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let rest = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or("cannot sign a request for this URL: no scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if path.contains(['?', '#']) {
        return Err("cannot sign a request for this URL: a query is not signed here".into());
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("cannot sign a request for this URL: a dot segment in its path".into());
    }
    let stamp = amz_date(now);
    let date: &[u8; 8] = stamp.first_chunk().unwrap_or(&[b'0'; 8]);
    let key = cache.key(creds, date, region, service, now)?;
    let Some(key) = key.as_deref() else {
        return Err("no signing key".into());
    };
    // The signed headers: the caller's, `host` unless given, `x-amz-date` and the token.
    // Sorted by lowercase name, stably, so that the values of a name given more than once
    // join in the order given (AWS's rule).
    let stamp_str = std::str::from_utf8(&stamp).unwrap_or_default();
    let token = creds.session_token.as_deref();
    let has_host = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host"));
    let n = headers.len() + usize::from(!has_host) + 1 + usize::from(token.is_some());
    // (name, value, whether the value is signed as it is: those the signer adds)
    let mut inline = [("", "", false); INLINE_HEADERS];
    let mut spilled = Vec::new();
    let signed: &mut [(&str, &str, bool)] = if n <= INLINE_HEADERS {
        &mut inline[..n]
    } else {
        spilled.resize(n, ("", "", false));
        &mut spilled
    };
    let given = headers.iter().map(|&(n, v)| (n, v, false));
    let added = [
        (!has_host).then_some(("host", authority, true)),
        Some(("x-amz-date", stamp_str, true)),
        token.map(|t| ("x-amz-security-token", t, true)),
    ];
    for (slot, h) in signed
        .iter_mut()
        .zip(given.chain(added.into_iter().flatten()))
    {
        *slot = h;
    }
    signed.sort_by(|a, b| lowercase(a.0).cmp(lowercase(b.0)));

    let body_hash = ring::digest::digest(&ring::digest::SHA256, body);
    let signature = SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        // The canonical request.
        buf.extend_from_slice(method.as_bytes());
        buf.push(b'\n');
        // Non-S3 services: the path as sent, percent-encoded once more.
        encode_path(path.as_bytes(), buf);
        buf.extend_from_slice(b"\n\n");
        let mut i = 0;
        while i < signed.len() {
            let name = signed[i].0;
            push_lowercase(name, buf);
            buf.push(b':');
            // A name given more than once: one line, the values joined by commas.
            let mut first = true;
            while i < signed.len() && signed[i].0.eq_ignore_ascii_case(name) {
                if !first {
                    buf.push(b',');
                }
                first = false;
                let (_, v, as_is) = signed[i];
                // Values are signed trimmed, inner runs of whitespace as one space; those
                // the signer adds, as they are.
                if as_is {
                    buf.extend_from_slice(v.as_bytes());
                } else {
                    push_trimmed(v, buf);
                }
                i += 1;
            }
            buf.push(b'\n');
        }
        buf.push(b'\n');
        let names_at = buf.len();
        let mut i = 0;
        while i < signed.len() {
            if i > 0 {
                buf.push(b';');
            }
            let name = signed[i].0;
            push_lowercase(name, buf);
            while i < signed.len() && signed[i].0.eq_ignore_ascii_case(name) {
                i += 1;
            }
        }
        let names = names_at..buf.len();
        buf.push(b'\n');
        push_hex(body_hash.as_ref(), buf);
        let canonical_hash = ring::digest::digest(&ring::digest::SHA256, buf);
        // The string to sign, after the canonical request in the same buffer.
        let to_sign = buf.len();
        buf.extend_from_slice(b"AWS4-HMAC-SHA256\n");
        buf.extend_from_slice(&stamp);
        buf.push(b'\n');
        buf.extend_from_slice(key.scope.as_bytes());
        buf.push(b'\n');
        push_hex(canonical_hash.as_ref(), buf);
        let tag = ring::hmac::sign(&key.key, &buf[to_sign..]);
        // `authorization`, written once into its own exactly sized buffer.
        let head = key.authorization_head.as_bytes();
        let mut auth = Vec::with_capacity(head.len() + names.len() + 12 + 64);
        auth.extend_from_slice(head);
        auth.extend_from_slice(&buf[names]);
        auth.extend_from_slice(b", Signature=");
        push_hex(tag.as_ref(), &mut auth);
        if buf.capacity() > MAX_KEPT_SCRATCH {
            *buf = Vec::with_capacity(1024);
        }
        auth
    });
    let authorization = HeaderValue::from_maybe_shared(bytes::Bytes::from(signature))
        .map_err(|_| "the value of `authorization` is not a valid header value".to_owned())?;
    let amz_date = HeaderValue::from_bytes(&stamp)
        .map_err(|_| "the value of `x-amz-date` is not a valid header value".to_owned())?;
    let mut out = Vec::with_capacity(3);
    out.push((http::header::AUTHORIZATION, sensitive(authorization)));
    out.push((HeaderName::from_static("x-amz-date"), amz_date));
    if let Some(t) = &key.token {
        out.push((HeaderName::from_static("x-amz-security-token"), t.clone()));
    }
    Ok(out)
}

/// RFC 3986's unreserved characters and `/`, which a path keeps as they are.
fn path_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/')
}

/// `path` percent-encoded (upper-case hex), runs of safe bytes copied whole.
fn encode_path(path: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut rest = path;
    while !rest.is_empty() {
        let run = rest
            .iter()
            .position(|&b| !path_safe(b))
            .unwrap_or(rest.len());
        out.extend_from_slice(&rest[..run]);
        if let Some(&b) = rest.get(run) {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
            rest = &rest[run + 1..];
        } else {
            rest = &[];
        }
    }
}

fn lowercase(name: &str) -> impl Iterator<Item = u8> + '_ {
    name.bytes().map(|b| b.to_ascii_lowercase())
}

fn push_lowercase(name: &str, out: &mut Vec<u8>) {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
    } else {
        out.extend_from_slice(name.as_bytes());
    }
}

/// A header value as SigV4 signs it: trimmed, each inner run of whitespace one space.
fn push_trimmed(value: &str, out: &mut Vec<u8>) {
    for (i, word) in value.split_ascii_whitespace().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(word.as_bytes());
    }
}

/// Lower-case hex of `bytes`, written straight into `out`.
fn push_hex(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

/// `x-amz-date` (`20240102T030405Z`), in UTC; its first eight bytes are the scope's date.
fn amz_date(now: SystemTime) -> [u8; 16] {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut out = *b"00000000T000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(4, 2, month);
    put(6, 2, day);
    put(9, 2, rem / 3600);
    put(11, 2, rem % 3600 / 60);
    put(13, 2, rem % 60);
    out
}

/// The form body of an STS `AssumeRoleWithWebIdentity` call (POST, `content-type:
/// application/x-www-form-urlencoded`, unsigned: the token is the credential).
pub fn web_identity_request(role_arn: &str, session_name: &str, token: &str) -> String {
    let mut body = String::from("Action=AssumeRoleWithWebIdentity&Version=2011-06-15");
    for (name, value) in [
        ("RoleArn", role_arn),
        ("RoleSessionName", session_name),
        ("WebIdentityToken", token),
    ] {
        body.push('&');
        body.push_str(name);
        body.push('=');
        form_encode(value, &mut body);
    }
    body
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn form_encode(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// An STS answer read: the credentials of an `AssumeRoleWithWebIdentityResponse`, or the
/// `Code` and `Message` of an `ErrorResponse` as the error. No XML parser: only these few
/// elements are looked up, and their text is unescaped.
pub fn web_identity_response(body: &[u8]) -> Result<Credentials, String> {
    if body.len() > MAX_STS_RESPONSE_BYTES {
        return Err(format!(
            "the STS answer is larger than {MAX_STS_RESPONSE_BYTES} bytes"
        ));
    }
    let text = std::str::from_utf8(body).map_err(|_| "the STS answer is not UTF-8".to_owned())?;
    if text.contains("<ErrorResponse") {
        let error = element(text, "Error").unwrap_or(text);
        let code = element(error, "Code").map(unescape);
        let message = element(error, "Message").map(unescape);
        let code = code.as_deref().unwrap_or("an unnamed error");
        let message = message.as_deref().unwrap_or("");
        return Err(format!(
            "STS answered {}: {}",
            crate::translate::clip(code, 64),
            crate::translate::clip(message, MAX_STS_MESSAGE_BYTES)
        ));
    }
    let creds = element(text, "Credentials")
        .ok_or("the STS answer has no <Credentials> and is not an <ErrorResponse>")?;
    let field = |name: &str| {
        element(creds, name)
            .map(unescape)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("the STS answer has no <{name}>"))
    };
    let access_key_id = field("AccessKeyId")?;
    let secret_access_key = field("SecretAccessKey")?;
    let session_token = field("SessionToken")?;
    let expiration = field("Expiration")?;
    let expires_at = humantime::parse_rfc3339_weak(&expiration)
        .map_err(|_| "the STS <Expiration> is not an ISO 8601 time".to_owned())?;
    Ok(Credentials {
        access_key_id,
        secret_access_key,
        session_token: Some(session_token),
        expires_at: Some(expires_at),
    })
}

/// The text between `<name>` (or `<name attr=…>`) and `</name>`, first occurrence.
fn element<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}");
    let close = format!("</{name}>");
    let mut from = 0;
    loop {
        let at = from + text.get(from..)?.find(&open)?;
        let after = at + open.len();
        let rest = text.get(after..)?;
        // `<Credentials>` must not match `<CredentialsExtra>`.
        match rest.chars().next()? {
            '>' | ' ' | '\t' | '\r' | '\n' => {
                let start = after + rest.find('>')? + 1;
                let end = start + text.get(start..)?.find(&close)?;
                return text.get(start..end);
            }
            _ => from = after,
        }
    }
}

/// XML text with its entities replaced (the five named ones and numeric references); an
/// unknown or broken entity is kept as written.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let replaced = tail.find(';').filter(|&end| end <= 12).and_then(|end| {
            let entity = &tail[1..end];
            let c = match entity {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                _ => {
                    let code = if let Some(hex) = entity
                        .strip_prefix("#x")
                        .or_else(|| entity.strip_prefix("#X"))
                    {
                        u32::from_str_radix(hex, 16).ok()?
                    } else {
                        entity.strip_prefix('#')?.parse().ok()?
                    };
                    char::from_u32(code)?
                }
            };
            Some((c, end + 1))
        });
        match replaced {
            Some((c, len)) => {
                out.push(c);
                rest = &tail[len..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    //! Signatures were computed with botocore 1.44.8 (`SigV4Auth(creds, "bedrock",
    //! "us-east-1").add_auth(...)` on an `AWSRequest` with the same method, URL, body and
    //! `content-type`, the clock fixed at 2024-01-02T03:04:05Z), whose canonical request shows
    //! the path `/model/anthropic.claude-3-5-sonnet-20240620-v1%253A0/converse`.

    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const URL: &str = "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse";
    const BODY: &[u8] = br#"{"messages":[{"role":"user","content":[{"text":"Hello"}]}]}"#;
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLETOKEN//////////wEaCXVzLWVhc3QtMSJHMEUCIQ";

    fn now() -> SystemTime {
        // 2024-01-02T03:04:05Z
        UNIX_EPOCH + Duration::from_secs(1_704_164_645)
    }

    fn header<'a>(headers: &'a [(HeaderName, HeaderValue)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    #[test]
    fn signature_matches_botocore_with_a_colon_in_the_model_id() {
        let creds = Credentials::new("AKIDEXAMPLE", SECRET, None, None);
        let headers = sign(
            &creds,
            "us-east-1",
            "bedrock",
            "POST",
            URL,
            &[("content-type", "application/json")],
            BODY,
            now(),
        )
        .expect("signs");
        assert_eq!(header(&headers, "x-amz-date"), Some("20240102T030405Z"));
        assert_eq!(
            header(&headers, "authorization"),
            Some(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240102/us-east-1/bedrock/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date, \
                 Signature=2685de46a3ab5aa3395fecd07f9c46fb6277ae7eea08df164d14a084b00bd96e"
            )
        );
        assert_eq!(header(&headers, "x-amz-security-token"), None);
        assert_eq!(header(&headers, "x-amz-content-sha256"), None);
        let auth = headers.iter().find(|(n, _)| n == "authorization");
        assert!(auth.is_some_and(|(_, v)| v.is_sensitive()));
    }

    #[test]
    fn session_token_is_signed_and_sent() {
        let creds = Credentials::new("AKIDEXAMPLE", SECRET, Some(TOKEN.into()), Some(now()));
        let url = URL.replace("/converse", "/converse-stream");
        let headers = sign(
            &creds,
            "us-east-1",
            "bedrock",
            "POST",
            &url,
            &[("content-type", "application/json")],
            BODY,
            now(),
        )
        .expect("signs");
        assert_eq!(
            header(&headers, "authorization"),
            Some(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240102/us-east-1/bedrock/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, \
                 Signature=b70d59013588bd5cf19cc479e8a325fd54d772a41832303bb1b36002a6466308"
            )
        );
        assert_eq!(header(&headers, "x-amz-security-token"), Some(TOKEN));
        let token = headers.iter().find(|(n, _)| n == "x-amz-security-token");
        assert!(token.is_some_and(|(_, v)| v.is_sensitive()));
    }

    #[test]
    fn dates_are_utc_civil_dates_and_queries_and_dot_segments_are_refused() {
        let at = |secs: u64| amz_date(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(&at(0), b"19700101T000000Z");
        // 2024-02-29T23:59:59Z, then the next second.
        assert_eq!(&at(1_709_251_199), b"20240229T235959Z");
        assert_eq!(&at(1_709_251_200), b"20240301T000000Z");
        assert_eq!(&at(4_102_444_800), b"21000101T000000Z");
        assert_eq!(&at(1_704_164_645), b"20240102T030405Z");
        let creds = Credentials::new("AKIDEXAMPLE", SECRET, None, None);
        for url in [format!("{URL}?a=b"), URL.replace("/model/", "/model/../")] {
            let err = sign(
                &creds,
                "us-east-1",
                "bedrock",
                "POST",
                &url,
                &[],
                BODY,
                now(),
            )
            .unwrap_err();
            assert!(err.contains("cannot sign"), "{err}");
        }
    }

    #[test]
    fn a_cached_key_signs_as_a_fresh_one_and_is_replaced_next_day_or_with_new_keys() {
        let cache = KeyCache::default();
        let creds = Credentials::new("AKIDEXAMPLE", SECRET, None, None);
        let other = Credentials::new("AKIDOTHER", "another-secret", None, None);
        let day = Duration::from_secs(86_400);
        for (creds, at) in [
            (&creds, now()),
            (&creds, now()),
            (&creds, now() + day),
            (&other, now() + day),
            (&creds, now() + day),
        ] {
            let args = |c| (c, "us-east-1", "bedrock", "POST", URL, &[][..], BODY, at);
            let (c, r, s, m, u, h, b, t) = args(creds);
            assert_eq!(
                sign_cached(&cache, c, r, s, m, u, h, b, t).unwrap(),
                sign(c, r, s, m, u, h, b, t).unwrap()
            );
        }
    }

    #[test]
    fn a_different_body_or_path_changes_the_signature() {
        let creds = Credentials::new("AKIDEXAMPLE", SECRET, None, None);
        let sig = |url: &str, body: &[u8]| {
            let h = sign(
                &creds,
                "us-east-1",
                "bedrock",
                "POST",
                url,
                &[],
                body,
                now(),
            )
            .unwrap();
            header(&h, "authorization").unwrap().to_owned()
        };
        let base = sig(URL, BODY);
        assert_ne!(base, sig(URL, b"{}"));
        // The unencoded `:` is a different canonical path than `%3A`.
        assert_ne!(base, sig(&URL.replace("%3A", ":"), BODY));
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let creds = Credentials::new("AKIDEXAMPLE", SECRET, Some(TOKEN.into()), None);
        let debug = format!("{creds:?}");
        assert!(debug.contains("AKIDEXAMPLE"));
        assert!(!debug.contains(SECRET) && !debug.contains(TOKEN), "{debug}");

        // A token that cannot be a header value: the error does not echo it.
        let bad = Credentials::new("AKIDEXAMPLE", SECRET, Some("tok\nen-secret".into()), None);
        let err = sign(&bad, "us-east-1", "bedrock", "POST", URL, &[], BODY, now());
        if let Err(e) = err {
            assert!(!e.contains("secret") && !e.contains(SECRET), "{e}");
        }
        let err = sign(
            &creds,
            "us-east-1",
            "bedrock",
            "POST",
            "not a url",
            &[],
            BODY,
            now(),
        )
        .unwrap_err();
        assert!(!err.contains(SECRET) && !err.contains(TOKEN), "{err}");
    }

    /// Cases of AWS's SigV4 test suite (`aws-signing-test-suite/v4` in `aws-sigv4`'s
    /// package) that have no query and no dot segment: the request (`x-amz-date` left to
    /// the signer) and the suite's `authorization`. Their paths hold only unreserved
    /// characters, so signing them encoded once more changes nothing, except
    /// `double-url-encode`, which is that rule's own case.
    #[test]
    fn signatures_match_aws_s_test_suite() {
        const SUITE: &str =
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, ";
        const STS_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";
        let suite_time = UNIX_EPOCH + Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        let host = [("Host", "example.amazonaws.com")];
        /// Name, method, path, headers, session token, the end of `authorization`.
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            Option<&'a str>,
            &'a str,
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("get-vanilla", "GET", "/", &host, None,
             "SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
            ("post-vanilla", "POST", "/", &host, None,
             "SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
            ("post-header-key-case (host from the URL)", "POST", "/", &[], None,
             "SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
            ("post-header-key-sort", "POST", "/", &[("My-Header1", "value1"), ("Host", "example.amazonaws.com")], None,
             "SignedHeaders=host;my-header1;x-amz-date, Signature=c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c"),
            ("post-header-value-case", "POST", "/", &[("Host", "example.amazonaws.com"), ("My-Header1", "VALUE1")], None,
             "SignedHeaders=host;my-header1;x-amz-date, Signature=cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d"),
            ("get-header-value-trim", "GET", "/", &[("Host", "example.amazonaws.com"), ("My-Header1", " value1"), ("My-Header2", " \"a   b   c\"")], None,
             "SignedHeaders=host;my-header1;my-header2;x-amz-date, Signature=acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"),
            ("get-header-value-order", "GET", "/", &[("Host", "example.amazonaws.com"), ("My-Header1", "value4"), ("My-Header1", "value1"), ("My-Header1", "value3"), ("My-Header1", "value2")], None,
             "SignedHeaders=host;my-header1;x-amz-date, Signature=08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01"),
            ("get-header-key-duplicate", "GET", "/", &[("Host", "example.amazonaws.com"), ("My-Header1", "value2"), ("My-Header1", "value2"), ("My-Header1", "value1")], None,
             "SignedHeaders=host;my-header1;x-amz-date, Signature=c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea"),
            ("get-unreserved", "GET", "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", &host, None,
             "SignedHeaders=host;x-amz-date, Signature=07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f"),
            ("get-slash-unnormalized", "GET", "//", &host, None,
             "SignedHeaders=host;x-amz-date, Signature=c88bcd3d312d75078c0cd961d6deae3f4c754924b01669efcfcb439fd5e5b76e"),
            ("get-slashes-unnormalized", "GET", "//example//", &host, None,
             "SignedHeaders=host;x-amz-date, Signature=87cca117541a147f6df867677d98a7d80dff226d2bfca9e4ffa899665623c7e5"),
            ("get-vanilla-with-session-token", "GET", "/", &host, Some("6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"),
             "SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"),
            ("post-sts-header-before", "POST", "/", &host, Some(STS_TOKEN),
             "SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"),
        ];
        for &(name, method, path, headers, token, want) in cases {
            let creds = Credentials::new("AKIDEXAMPLE", SECRET, token.map(str::to_owned), None);
            let url = format!("https://example.amazonaws.com{path}");
            let signed = sign(
                &creds,
                "us-east-1",
                "service",
                method,
                &url,
                headers,
                b"",
                suite_time,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                header(&signed, "authorization"),
                Some(format!("{SUITE}{want}").as_str()),
                "{name}"
            );
            assert_eq!(
                header(&signed, "x-amz-date"),
                Some("20150830T123600Z"),
                "{name}"
            );
            assert_eq!(header(&signed, "x-amz-security-token"), token, "{name}");
        }
        // double-url-encode: a path already percent-encoded once, signed encoded twice.
        let creds = Credentials::new("AKIDEXAMPLE", SECRET, None, None);
        let signed = sign(
            &creds,
            "us-east-2",
            "lambda",
            "POST",
            "https://lambda.us-east-2.amazonaws.com/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-west-2%3A892717189312%3Afunction%3Amy-rusty-fun/invocations",
            &[],
            b"",
            UNIX_EPOCH + Duration::from_secs(1_620_747_645), // 2021-05-11T15:40:45Z
        )
        .unwrap();
        assert_eq!(
            header(&signed, "authorization"),
            Some(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20210511/us-east-2/lambda/aws4_request, \
                 SignedHeaders=host;x-amz-date, \
                 Signature=4b93abbcc68be32bd64c18e2c71150660ab4c29bbd6c32a383a7517a88fc1804"
            )
        );
    }

    /// `aws-sigv4`'s general request signer (default settings: non-S3, the path encoded
    /// twice, the session token signed, no `x-amz-content-sha256`): AWS's own implementation.
    #[allow(clippy::too_many_arguments)]
    fn aws_sigv4_authorization(
        creds: &Credentials,
        region: &str,
        service: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        now: SystemTime,
    ) -> String {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings};
        let identity = aws_credential_types::Credentials::new(
            creds.access_key_id.clone(),
            creds.secret_access_key.clone(),
            creds.session_token.clone(),
            None,
            "test",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(service)
            .time(now)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let request = SignableRequest::new(
            method,
            url,
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let (instructions, _) = aws_sigv4::http_request::sign(request, &params)
            .unwrap()
            .into_parts();
        instructions
            .headers()
            .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.to_owned())
            .unwrap()
    }

    /// A path segment as a URL carries it: unreserved and sub-delimiter characters, `:`,
    /// `@` and percent-escapes; never `.` or `..`.
    fn segment() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        proptest::collection::vec(
            prop_oneof!["[A-Za-z0-9._~:@!$&'()*+,;=-]", "%[0-9A-F]{2}",],
            1..12,
        )
        .prop_map(|parts| parts.concat())
        .prop_filter("no dot segment", |s| s != "." && s != "..")
    }

    proptest::proptest! {
        /// Random requests signed here and by `aws-sigv4`: the same `authorization`, byte for
        /// byte (method, host, path, header names in any case and order, a name given twice,
        /// values with runs of spaces, body, credentials with and without a token, any day).
        #[test]
        fn signatures_match_aws_sigv4_on_random_requests(
            method in "GET|POST|PUT|DELETE",
            host in "[a-z][a-z0-9-]{0,20}(\\.[a-z0-9-]{1,12}){0,3}(:[1-9][0-9]{3})?",
            segments in proptest::collection::vec(segment(), 0..5),
            trailing_slash in proptest::bool::ANY,
            headers in proptest::collection::vec(
                ("(x-amz-meta-|X-Custom-|content-|accept)[a-zA-Z0-9]{0,6}", "[ ]{0,2}[!-~]{1,8}([ ]{1,3}[!-~]{1,8}){0,3}[ ]{0,2}"),
                0..6,
            ),
            repeat_first in proptest::bool::ANY,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            access_key_id in "A[A-Z0-9]{15,19}",
            secret in "[A-Za-z0-9/+]{40}",
            token in proptest::option::of("[A-Za-z0-9/+=]{16,600}"),
            region in "(us|eu|ap)-[a-z]{4,9}-[1-3]",
            service in "bedrock|lambda|[a-z][a-z0-9-]{1,14}",
            secs in 0u64..4_102_444_800,
        ) {
            let mut path = String::new();
            for s in &segments {
                path.push('/');
                path.push_str(s);
            }
            if trailing_slash || path.is_empty() {
                path.push('/');
            }
            let url = format!("https://{host}{path}");
            let mut headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            if repeat_first && let Some(&(n, _)) = headers.first() {
                headers.push((n, "again"));
            }
            let creds = Credentials::new(access_key_id, secret, token, None);
            let now = UNIX_EPOCH + Duration::from_secs(secs);
            let cache = KeyCache::default();
            let ours = sign_cached(&cache, &creds, &region, &service, &method, &url, &headers, &body, now)
                .unwrap();
            let theirs = aws_sigv4_authorization(&creds, &region, &service, &method, &url, &headers, &body, now);
            proptest::prop_assert_eq!(header(&ours, "authorization"), Some(theirs.as_str()));
            // The same again with the cached key.
            let again = sign_cached(&cache, &creds, &region, &service, &method, &url, &headers, &body, now)
                .unwrap();
            proptest::prop_assert_eq!(ours, again);
        }
    }

    #[test]
    fn web_identity_request_is_a_form_body() {
        let body = web_identity_request(
            "arn:aws:iam::123456789012:role/modelgate",
            "modelgate-pod 1",
            "eyJhbGciOi.J9+/=",
        );
        assert_eq!(
            body,
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15\
             &RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fmodelgate\
             &RoleSessionName=modelgate-pod%201&WebIdentityToken=eyJhbGciOi.J9%2B%2F%3D"
        );
    }

    /// The shape of the AssumeRoleWithWebIdentity example in the STS API reference.
    const STS_OK: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:modelgate:gateway</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/modelgate/pod</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:pod</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE&amp;more</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2014-10-24T23:00:23Z</Expiration>
      <AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <Provider>arn:aws:iam::123456789012:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;

    #[test]
    fn web_identity_response_gives_temporary_credentials() {
        let creds = web_identity_response(STS_OK.as_bytes()).expect("credentials");
        assert_eq!(creds.access_key_id, "ASgeIAIOSFODNN7EXAMPLE");
        assert_eq!(
            creds.session_token.as_deref(),
            Some("AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE&more")
        );
        assert_eq!(
            creds.secret_access_key,
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
        );
        assert_eq!(
            creds.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_414_191_623))
        );
        // Fractional seconds are ISO 8601 too.
        let frac = STS_OK.replace("23:00:23Z", "23:00:23.500Z");
        let creds = web_identity_response(frac.as_bytes()).expect("credentials");
        assert_eq!(
            creds.expires_at,
            Some(UNIX_EPOCH + Duration::from_millis(1_414_191_623_500))
        );
    }

    #[test]
    fn web_identity_errors_name_code_and_message() {
        let body = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error>
    <Type>Sender</Type>
    <Code>InvalidIdentityToken</Code>
    <Message>Token audience &quot;x&quot; &#x3C;not&#60; allowed</Message>
  </Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
</ErrorResponse>"#;
        let err = web_identity_response(body.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            "STS answered InvalidIdentityToken: Token audience \"x\" <not< allowed"
        );
    }

    #[test]
    fn broken_sts_answers_are_errors_without_secrets() {
        for (body, want) in [
            ("", "no <Credentials>"),
            ("<html>502</html>", "no <Credentials>"),
            (
                "<Credentials><AccessKeyId>A</AccessKeyId></Credentials>",
                "no <SecretAccessKey>",
            ),
            (
                "<Credentials><AccessKeyId>A</AccessKeyId><SecretAccessKey>S3CR3T</SecretAccessKey>\
                 <SessionToken>T0K3N</SessionToken><Expiration>tomorrow</Expiration></Credentials>",
                "not an ISO 8601",
            ),
            ("<Credentials><AccessKeyId>A", "no <Credentials>"),
        ] {
            let err = web_identity_response(body.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
            assert!(!err.contains("S3CR3T") && !err.contains("T0K3N"), "{err}");
        }
        let big = vec![b' '; MAX_STS_RESPONSE_BYTES + 1];
        assert!(web_identity_response(&big).is_err());
        assert!(web_identity_response(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn unescape_handles_entities_and_leaves_broken_ones() {
        assert_eq!(unescape("a&amp;b&lt;&gt;&quot;&apos;"), "a&b<>\"'");
        assert_eq!(unescape("&#65;&#x42;&#X43;"), "ABC");
        assert_eq!(
            unescape("& &bogus; &#xZZ; &#1114112; &"),
            "& &bogus; &#xZZ; &#1114112; &"
        );
        assert_eq!(unescape("é&amp;ü"), "é&ü");
    }

    proptest::proptest! {
        #[test]
        fn sts_reader_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = web_identity_response(&body);
        }

        #[test]
        fn unescape_never_panics(text in ".{0,64}") {
            let _ = unescape(&text);
        }
    }
}

#[cfg(test)]
mod bench {
    //! Timing loop, run by hand in release:
    //! `cargo test -p modelgate-dataplane --release --lib aws_auth::bench -- --ignored --nocapture`.
    //! One Converse request signed as `bedrock::Upstream::request` signs it (host,
    //! content-type and accept; the day's key cached), with static keys and with a session
    //! token. `MODELGATE_ROUNDS` sets the rounds (default 100,000); best of five.

    use std::hint::black_box;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const URL: &str = "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse";
    /// The small chat body of `tests/src/bin/bench.rs`, as Converse JSON.
    const BODY: &[u8] = br#"{"messages":[{"role":"user","content":[{"text":"Say hello in one short sentence, please."}]}],"system":[{"text":"You are a terse assistant."}],"inferenceConfig":{"maxTokens":64}}"#;

    #[test]
    #[ignore = "a timing loop"]
    fn signing_a_converse_request() {
        let rounds = crate::timing::rounds();
        let now = UNIX_EPOCH + Duration::from_secs(1_704_164_645);
        let headers = [
            ("host", "bedrock-runtime.us-east-1.amazonaws.com"),
            ("content-type", "application/json"),
            ("accept", "application/json"),
        ];
        for (what, creds) in [
            (
                "static keys",
                Credentials::new(
                    "AKIDEXAMPLE",
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                    None,
                    None,
                ),
            ),
            (
                "session token",
                Credentials::new(
                    "ASIAEXAMPLE",
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                    Some(
                        "IQoJb3JpZ2luX2VjEXAMPLETOKEN//////////wEaCXVzLWVhc3QtMSJHMEUCIQ"
                            .repeat(12),
                    ),
                    None,
                ),
            ),
        ] {
            let cache = KeyCache::default();
            let sign = || {
                black_box(
                    sign_cached(
                        &cache,
                        &creds,
                        "us-east-1",
                        "bedrock",
                        "POST",
                        black_box(URL),
                        &headers,
                        black_box(BODY),
                        now,
                    )
                    .unwrap(),
                );
            };
            for _ in 0..rounds / 10 {
                sign();
            }
            let ns = crate::timing::best_of_five(rounds, &|| {
                sign();
            });
            println!(
                "SigV4, one Converse request ({} byte body, {what}): {:.2} µs per request",
                BODY.len(),
                ns / 1e3
            );
        }
    }
}
