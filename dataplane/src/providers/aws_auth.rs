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
//! Signing follows AWS's rules for non-S3 services, with `aws-sigv4`'s key derivation and
//! signature: the URL path is taken as already percent-encoded once and encoded again for
//! the canonical request (a model id `…-v1:0` travels as `…-v1%3A0` and is signed as
//! `…-v1%253A0`, as botocore does), the session token is signed, and no
//! `x-amz-content-sha256` header is added. Secrets never reach
//! `Debug` output or an error string.

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
/// The key derivation and the signature are `aws-sigv4`'s own (`sign::v4`); the canonical
/// request is written here, for the one shape the gateway signs (a POST without a query),
/// because `aws-sigv4`'s general request signer cost about 6 µs a request, a sixth of the
/// proxy's whole CPU for a Bedrock call (docs/benchmarks.md). The tests below hold it to
/// botocore's signatures.
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

/// The day's signing key of one set of credentials, kept between requests: it changes at
/// midnight UTC and with the credentials, and deriving it is four HMACs.
#[derive(Default)]
pub struct KeyCache(arc_swap::ArcSwapOption<CachedKey>);

struct CachedKey {
    /// Date, access key id, region and service the key is for.
    scope: (String, String, String, String),
    key: Vec<u8>,
}

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyCache(<redacted>)")
    }
}

impl KeyCache {
    fn key(
        &self,
        creds: &Credentials,
        date: &str,
        region: &str,
        service: &str,
        now: SystemTime,
    ) -> std::sync::Arc<CachedKey> {
        if let Some(k) = self.0.load_full()
            && k.scope.0 == date
            && k.scope.1 == creds.access_key_id
            && k.scope.2 == region
            && k.scope.3 == service
        {
            return k;
        }
        let key = v4::generate_signing_key(&creds.secret_access_key, now, region, service);
        let k = std::sync::Arc::new(CachedKey {
            scope: (
                date.to_owned(),
                creds.access_key_id.clone(),
                region.to_owned(),
                service.to_owned(),
            ),
            key: key.as_ref().to_vec(),
        });
        self.0.store(Some(k.clone()));
        k
    }
}

/// [`sign`], with the signing key from (and kept in) `cache`.
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
    use sha2::Digest;
    use std::fmt::Write;
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
    let (amz_date, date) = amz_date(now);
    // Canonical headers: lowercase names, trimmed values with inner runs of spaces as one,
    // sorted by name.
    let mut signed: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| {
            (
                n.to_ascii_lowercase(),
                v.split_ascii_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    if !signed.iter().any(|(n, _)| n == "host") {
        signed.push(("host".into(), authority.to_owned()));
    }
    signed.push(("x-amz-date".into(), amz_date.clone()));
    if let Some(t) = &creds.session_token {
        signed.push(("x-amz-security-token".into(), t.clone()));
    }
    signed.sort();
    let mut canonical = String::with_capacity(256 + path.len() * 2);
    canonical.push_str(method);
    canonical.push('\n');
    // Non-S3 services: the path as sent, percent-encoded once more.
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            canonical.push(char::from(b));
        } else {
            let _ = write!(canonical, "%{b:02X}");
        }
    }
    canonical.push_str("\n\n");
    for (n, v) in &signed {
        let _ = writeln!(canonical, "{n}:{v}");
    }
    canonical.push('\n');
    let names: Vec<&str> = signed.iter().map(|(n, _)| n.as_str()).collect();
    let names = names.join(";");
    canonical.push_str(&names);
    canonical.push('\n');
    canonical.push_str(&hex(&sha2::Sha256::digest(body)));
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&sha2::Sha256::digest(canonical.as_bytes()))
    );
    let key = cache.key(creds, &date, region, service, now);
    let signature = v4::calculate_signature(&key.key, to_sign.as_bytes());
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={names}, Signature={signature}",
        creds.access_key_id
    );
    let value = |v: &str, sensitive: bool, what: &str| {
        // Never echo the value: it may be the session token.
        let mut v = HeaderValue::from_str(v)
            .map_err(|_| format!("the value of `{what}` is not a valid header value"))?;
        v.set_sensitive(sensitive);
        Ok::<_, String>(v)
    };
    let mut out = vec![
        (
            http::header::AUTHORIZATION,
            value(&authorization, true, "authorization")?,
        ),
        (
            HeaderName::from_static("x-amz-date"),
            value(&amz_date, false, "x-amz-date")?,
        ),
    ];
    if let Some(t) = &creds.session_token {
        out.push((
            HeaderName::from_static("x-amz-security-token"),
            value(t, true, "x-amz-security-token")?,
        ));
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// `x-amz-date` (`20240102T030405Z`) and the scope's date (`20240102`), in UTC.
fn amz_date(now: SystemTime) -> (String, String) {
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
    let date = format!("{year:04}{month:02}{day:02}");
    let time = format!("{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
    (format!("{date}T{time}Z"), date)
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
        assert_eq!(at(0), ("19700101T000000Z".into(), "19700101".into()));
        // 2024-02-29T23:59:59Z, then the next second.
        assert_eq!(at(1_709_251_199).0, "20240229T235959Z");
        assert_eq!(at(1_709_251_200).0, "20240301T000000Z");
        assert_eq!(at(4_102_444_800).0, "21000101T000000Z");
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
    use std::time::{Duration, Instant, UNIX_EPOCH};

    use super::*;

    const URL: &str = "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse";
    /// The small chat body of `tests/src/bin/bench.rs`, as Converse JSON.
    const BODY: &[u8] = br#"{"messages":[{"role":"user","content":[{"text":"Say hello in one short sentence, please."}]}],"system":[{"text":"You are a terse assistant."}],"inferenceConfig":{"maxTokens":64}}"#;

    #[test]
    #[ignore = "a timing loop"]
    fn signing_a_converse_request() {
        let rounds = std::env::var("MODELGATE_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(100_000);
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
            let ns = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..rounds {
                        sign();
                    }
                    start.elapsed().as_nanos() as f64 / rounds as f64
                })
                .fold(f64::MAX, f64::min);
            println!(
                "SigV4, one Converse request ({} byte body, {what}): {:.2} µs per request",
                BODY.len(),
                ns / 1e3
            );
        }
    }
}
