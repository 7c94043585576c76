//! Google OAuth2 credentials for Vertex AI, the pure parts: a service-account key file read,
//! the signed JWT assertion of the JWT-bearer grant (RFC 7523), the token request's form body,
//! and the token endpoint's (or the GCE/GKE metadata server's) answer read. The provider does
//! the HTTP and caches the token until shortly before `expires_in`.
//!
//! ```text
//!  key file JSON ─► ServiceAccountKey ─► assertion(scope, now) ─► token_request_body
//!      ─► POST token_uri (provider) ─► token_response ─► AccessToken ─► Authorization: Bearer
//!  workload identity: GET metadata server token (provider) ─► token_response ─► AccessToken
//! ```
//!
//! Nothing here does I/O or reads a clock: `now` is passed in. Signing is RSASSA-PKCS1-v1_5
//! with SHA-256 (ring), deterministic; ring takes a random source for blinding only. Keys and
//! tokens never appear in `Debug` output or in error messages.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde::{Deserialize, Serialize};

/// The scope that lets a token call Vertex AI.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The grant type of RFC 7523's JWT-bearer grant.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Google's token endpoint, for a key file that names none.
pub const DEFAULT_TOKEN_URI: &str = modelgate_wire::credentials::GOOGLE_TOKEN_URI;

/// How long an assertion is valid: Google's maximum, one hour.
pub const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// Most of an upstream's error text copied into an error.
const MAX_ERROR_TEXT: usize = 256;

/// A service-account key file (JSON: `type`, `client_email`, `private_key` (PEM PKCS#8),
/// `private_key_id`, `token_uri`). `Debug` shows the account, never the key.
pub struct ServiceAccountKey {
    client_email: String,
    private_key_id: Option<String>,
    token_uri: String,
    key: RsaKeyPair,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

#[derive(Serialize)]
struct JwtHeader<'a> {
    alg: &'static str,
    typ: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
}

#[derive(Serialize)]
struct JwtClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl ServiceAccountKey {
    /// Reads a key file. Errors name what is missing or wrong, never the key's bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        // The operator refuses the same keys with the same words (modelgate_wire).
        let sa = modelgate_wire::credentials::ServiceAccount::parse(bytes)?;
        let key = RsaKeyPair::from_pkcs8(&sa.pkcs8_der).map_err(|e| {
            format!("the service-account 'private_key' is not a usable RSA key: {e}")
        })?;
        Ok(Self {
            client_email: sa.client_email,
            private_key_id: sa.private_key_id,
            token_uri: sa.token_uri,
            key,
        })
    }

    /// Where the assertion is posted (also its audience).
    pub fn token_uri(&self) -> &str {
        &self.token_uri
    }

    pub fn client_email(&self) -> &str {
        &self.client_email
    }

    /// The signed RS256 JWT assertion for the OAuth2 JWT-bearer grant (RFC 7523): header
    /// `{alg: RS256, typ: JWT, kid}`, claims `{iss: client_email, scope, aud: token_uri, iat:
    /// now, exp: now + 3600}`.
    pub fn assertion(&self, scope: &str, now_unix: u64) -> Result<String, String> {
        let header = JwtHeader {
            alg: "RS256",
            typ: "JWT",
            kid: self.private_key_id.as_deref(),
        };
        let claims = JwtClaims {
            iss: &self.client_email,
            scope,
            aud: &self.token_uri,
            iat: now_unix,
            exp: now_unix.saturating_add(ASSERTION_LIFETIME_SECS),
        };
        let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        let claims = serde_json::to_vec(&claims).map_err(|e| e.to_string())?;
        let mut jwt = URL_SAFE_NO_PAD.encode(header);
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims));
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                jwt.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "signing the service-account assertion failed".to_owned())?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(jwt)
    }
}

/// `application/x-www-form-urlencoded` escaping of one value (RFC 3986 unreserved kept).
fn form_escape(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 0xf)]));
        }
    }
}

/// The form body for the token request (`Content-Type: application/x-www-form-urlencoded`):
/// `grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=...`.
pub fn token_request_body(assertion: &str) -> String {
    let mut body = String::with_capacity(assertion.len() + 80);
    body.push_str("grant_type=");
    form_escape(JWT_BEARER_GRANT, &mut body);
    body.push_str("&assertion=");
    form_escape(assertion, &mut body);
    body
}

/// A bearer token; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The token itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// An OAuth2 access token and how long it lives from the moment it was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub token: Token,
    pub expires_in: u64,
}

#[derive(Deserialize)]
struct WireToken {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    token_type: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// An OAuth2 token answer (`{"access_token", "expires_in", "token_type"}`), from the token
/// endpoint or the GCE/GKE metadata server. An error answer (`{"error",
/// "error_description"}`) or anything else is `Err`; no error ever carries a token.
pub fn token_response(body: &[u8]) -> Result<AccessToken, String> {
    let wire: WireToken = serde_json::from_slice(body)
        .map_err(|_| "the token endpoint's answer is not a JSON object".to_owned())?;
    if let Some(error) = wire.error.filter(|e| !e.is_empty()) {
        let clip = |s: &str| crate::translate::clip(s, MAX_ERROR_TEXT).to_owned();
        return Err(match wire.error_description.filter(|d| !d.is_empty()) {
            Some(description) => format!(
                "the token endpoint refused: {}: {}",
                clip(&error),
                clip(&description)
            ),
            None => format!("the token endpoint refused: {}", clip(&error)),
        });
    }
    let token = wire
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or("the token endpoint's answer has no 'access_token'")?;
    if let Some(kind) = &wire.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(format!(
            "the token endpoint answered a '{}' token, not a bearer token",
            crate::translate::clip(kind, 32)
        ));
    }
    let expires_in = match wire.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        // Some servers quote it.
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or("the token endpoint's answer has no whole 'expires_in'")?;
    Ok(AccessToken {
        token: Token(token),
        expires_in,
    })
}

#[cfg(test)]
mod tests {
    //! The key is a throwaway generated for these tests
    //! (`openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`), in
    //! `tests/fixtures/providers/gemini/test-only-service-account*`; its public half
    //! (`openssl rsa -RSAPublicKey_out -outform DER`) checks signatures independently of ring's
    //! key pair. Checked once by hand, outside the suite, with `google.auth.jwt.decode`
    //! (google-auth 2.63.0, cryptography 50.0.2, in a throwaway venv): header and claims
    //! decoded and the signature verified against the key's certificate.

    use std::path::Path;

    use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    use serde_json::Value;

    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/providers/gemini")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn key() -> ServiceAccountKey {
        ServiceAccountKey::from_json(&fixture("test-only-service-account.json")).expect("key")
    }

    fn part(jwt: &str, i: usize) -> Value {
        let text = jwt.split('.').nth(i).expect("part");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(text).expect("base64url")).expect("json")
    }

    #[test]
    fn the_assertion_is_an_rs256_jwt_with_googles_claims() {
        let key = key();
        assert_eq!(key.token_uri(), "https://oauth2.googleapis.com/token");
        let jwt = key
            .assertion(CLOUD_PLATFORM_SCOPE, 1_790_000_000)
            .expect("signed");
        assert_eq!(jwt.split('.').count(), 3);
        let header = part(&jwt, 0);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], "0123456789abcdef0123456789abcdef01234567");
        let claims = part(&jwt, 1);
        assert_eq!(
            claims["iss"],
            "test-only@modelgate-test-only.iam.gserviceaccount.com"
        );
        assert_eq!(claims["scope"], CLOUD_PLATFORM_SCOPE);
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        assert_eq!(claims["iat"], 1_790_000_000_u64);
        assert_eq!(claims["exp"], 1_790_003_600_u64);

        let (signed, signature) = jwt.rsplit_once('.').expect("signature");
        let signature = URL_SAFE_NO_PAD.decode(signature).expect("base64url");
        let public = fixture("test-only-service-account-key.pub.der");
        let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public);
        verifier
            .verify(signed.as_bytes(), &signature)
            .expect("verifies with the key's public half");
        let mut tampered = signed.as_bytes().to_vec();
        tampered[10] ^= 1;
        assert!(verifier.verify(&tampered, &signature).is_err());
        assert_eq!(
            jwt,
            key.assertion(CLOUD_PLATFORM_SCOPE, 1_790_000_000)
                .expect("signed"),
            "PKCS#1 v1.5 is deterministic: same input, same assertion"
        );
    }

    #[test]
    fn debug_never_shows_the_key_or_the_token() {
        let shown = format!("{:?}", key());
        assert!(shown.contains("test-only@"), "{shown}");
        assert!(
            !shown.contains("PRIVATE KEY") && !shown.contains("MII"),
            "{shown}"
        );
        let token = token_response(
            br#"{"access_token":"ya29.secret","expires_in":3599,"token_type":"Bearer"}"#,
        )
        .expect("token");
        assert_eq!(token.token.expose(), "ya29.secret");
        assert_eq!(token.expires_in, 3599);
        assert!(!format!("{token:?}").contains("ya29"));
    }

    #[test]
    fn bad_key_files_say_what_is_wrong_without_the_key() {
        let mut file: Value =
            serde_json::from_slice(&fixture("test-only-service-account.json")).expect("json");
        let cases: [(&str, Value, &str); 5] = [
            (
                "type",
                Value::from("authorized_user"),
                "not 'service_account'",
            ),
            ("client_email", Value::Null, "client_email"),
            (
                "private_key",
                Value::from(
                    "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
                ),
                "PKCS#8",
            ),
            (
                "private_key",
                Value::from(
                    "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
                ),
                "PKCS#8",
            ),
            (
                "token_uri",
                Value::from("http://evil.example/token"),
                "https",
            ),
        ];
        for (field, value, want) in cases {
            let original = file[field].clone();
            file[field] = value;
            let err = ServiceAccountKey::from_json(file.to_string().as_bytes()).expect_err(field);
            assert!(err.contains(want), "{field}: {err}");
            assert!(!err.contains("MII"), "{field}: no key bytes in {err}");
            file[field] = original;
        }
        file["token_uri"] = Value::from("http://127.0.0.1:8089/token");
        assert!(ServiceAccountKey::from_json(file.to_string().as_bytes()).is_ok());
        let err = ServiceAccountKey::from_json(b"{\"private_key\": \"-----BEGIN").expect_err("cut");
        assert!(err.contains("line 1"), "{err}");
        assert!(
            !err.contains("BEGIN"),
            "serde's quote of the value is not kept: {err}"
        );
    }

    #[test]
    fn the_token_request_is_a_form_body() {
        assert_eq!(
            token_request_body("aaa.bbb.c-_"),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=aaa.bbb.c-_"
        );
    }

    #[test]
    fn token_answers_and_refusals() {
        // The metadata server's shape (GCE/GKE workload identity) is the same.
        let token =
            token_response(br#"{"access_token":"t","expires_in":"1800","token_type":"bearer"}"#)
                .expect("quoted expires_in");
        assert_eq!(token.expires_in, 1800);
        let err = token_response(
            br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
        )
        .expect_err("refused");
        assert_eq!(
            err,
            "the token endpoint refused: invalid_grant: Invalid JWT Signature."
        );
        for body in [
            &br#"{"access_token":"ya29.secret","token_type":"Bearer"}"#[..],
            br#"{"access_token":"ya29.secret","expires_in":3600,"token_type":"MAC"}"#,
            br#"{"access_token":"","expires_in":3600}"#,
            b"ya29.secret",
            b"<html>",
        ] {
            let err = token_response(body).expect_err("not a token");
            assert!(!err.contains("ya29"), "never echoes a token: {err}");
        }
    }
}
