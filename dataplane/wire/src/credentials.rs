//! Credentials that are documents rather than one key: AWS keys as `credential_process`
//! prints them, and a Google service-account key file. Read here, once, for both sides: the
//! operator refuses a route whose Secret holds a malformed one (with a status a person can
//! act on) before it reaches any proxy, and the proxy reads the same fields to sign with.
//! Errors name what is missing or wrong, never the secret's bytes.

use std::fmt;

use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

/// The token endpoint a key file names none: Google's.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// Static AWS keys.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for AwsKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKeys")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl AwsKeys {
    /// JSON with `AccessKeyId`, `SecretAccessKey` and optionally `SessionToken` (AWS's
    /// `credential_process` output; `Version` and `Expiration` may be there too).
    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Keys {
            access_key_id: String,
            secret_access_key: String,
            #[serde(default)]
            session_token: Option<String>,
        }
        let k: Keys = serde_json::from_str(text).map_err(|_| {
            "the credential must be JSON with AccessKeyId and SecretAccessKey (and optionally SessionToken), as AWS's credential_process prints it".to_owned()
        })?;
        if k.access_key_id.is_empty() || k.secret_access_key.is_empty() {
            return Err(
                "the credential's AccessKeyId and SecretAccessKey must not be empty".into(),
            );
        }
        if !k.access_key_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("the credential's AccessKeyId must be letters and digits".into());
        }
        Ok(Self {
            access_key_id: k.access_key_id,
            secret_access_key: k.secret_access_key,
            session_token: k.session_token.filter(|t| !t.is_empty()),
        })
    }
}

/// A Google service-account key file, its RSA key checked usable.
#[derive(Clone)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: Option<String>,
    pub token_uri: String,
    /// The private key, PKCS#8 DER.
    pub pkcs8_der: Vec<u8>,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl ServiceAccount {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct KeyFile {
            #[serde(rename = "type")]
            kind: Option<String>,
            client_email: Option<String>,
            private_key: Option<String>,
            private_key_id: Option<String>,
            token_uri: Option<String>,
        }
        let file: KeyFile = serde_json::from_slice(bytes).map_err(|e| {
            // serde's message can quote a value; only its position is kept.
            format!(
                "the service-account key is not JSON of the expected shape (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        match file.kind.as_deref() {
            Some("service_account") => {}
            Some(other) => {
                let shown: String = other.chars().take(64).collect();
                return Err(format!(
                    "the key file is of type '{shown}', not 'service_account'"
                ));
            }
            None => return Err("the key file has no 'type' (want 'service_account')".into()),
        }
        let client_email = file
            .client_email
            .filter(|e| !e.is_empty())
            .ok_or("the service-account key has no 'client_email'")?;
        let pem = file
            .private_key
            .filter(|k| !k.is_empty())
            .ok_or("the service-account key has no 'private_key'")?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
            "the service-account 'private_key' is not a PEM PKCS#8 key (BEGIN PRIVATE KEY)"
                .to_owned()
        })?;
        ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| {
            format!("the service-account 'private_key' is not a usable RSA key: {e}")
        })?;
        let token_uri = file
            .token_uri
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_owned());
        if !token_uri_allowed(&token_uri) {
            return Err("the service-account 'token_uri' must be an https URL".into());
        }
        Ok(Self {
            client_email,
            private_key_id: file.private_key_id.filter(|k| !k.is_empty()),
            token_uri,
            pkcs8_der: der.secret_pkcs8_der().to_vec(),
        })
    }
}

/// Whether a token endpoint may receive assertions: HTTPS, or plain HTTP to this machine
/// (test endpoints). An assertion is a credential for an hour.
pub fn token_uri_allowed(uri: &str) -> bool {
    let lower = uri.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return true;
    }
    let Some(rest) = lower.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// What a document credential for `provider` must be, checked without keeping it.
pub fn check_document(provider: &crate::ProviderKind, text: &str) -> Result<(), String> {
    match provider {
        crate::ProviderKind::Bedrock => AwsKeys::parse(text).map(drop),
        crate::ProviderKind::Vertex => ServiceAccount::parse(text.as_bytes()).map(drop),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_keys_are_read_and_never_shown() {
        let k = AwsKeys::parse(
            r#"{"Version":1,"AccessKeyId":"AKIDEXAMPLE","SecretAccessKey":"hunter2","SessionToken":"tok"}"#,
        )
        .unwrap();
        assert_eq!(k.access_key_id, "AKIDEXAMPLE");
        let shown = format!("{k:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok\""),
            "{shown}"
        );
        let err = AwsKeys::parse("AKID:hunter2").unwrap_err();
        assert!(
            err.contains("AccessKeyId") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(AwsKeys::parse(r#"{"AccessKeyId":"","SecretAccessKey":"x"}"#).is_err());
    }

    #[test]
    fn a_service_account_key_needs_its_fields_and_a_real_key() {
        let err = ServiceAccount::parse(br#"{"type":"authorized_user"}"#).unwrap_err();
        assert!(err.contains("authorized_user"), "{err}");
        let err = ServiceAccount::parse(
            br#"{"type":"service_account","client_email":"a@b","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}"#,
        )
        .unwrap_err();
        assert!(err.contains("private_key"), "{err}");
        assert!(!err.contains("AAAA"), "{err}");
        assert!(token_uri_allowed("http://127.0.0.1:9/token"));
        assert!(!token_uri_allowed("http://evil.example/token"));
    }
}
