//! The contract between modelgate's operator and its proxies: the snapshot as it travels,
//! the rules a snapshot must satisfy, and the few definitions both sides must agree on
//! (budget periods, the upstream policy, how a raw key is hashed).
//!
//! ```text
//!  operator: CRDs ──build──► SnapshotSpec ──check──► JSON line ──stream──► proxy
//!  proxy:    JSON line ──parse (tolerant)──► SnapshotSpec ──check + compile──► runtime tables
//!  file:     YAML ──parse (strict)──► SnapshotSpec ──check + compile──► runtime tables
//! ```
//!
//! Serde types and pure functions only: no runtime, no sockets. The proxy's request path
//! never sees these types; its `config::compile` builds its own tables from them.
//!
//! Version skew: a proxy may be older than its operator during a rolling upgrade. A snapshot
//! read from the stream tolerates fields it does not know ([`parse_tolerant`] reports them
//! so the proxy can log them), and an enum value it does not know becomes `Unknown`, which
//! [`check`] refuses with a message that says to upgrade the proxy. A file is read strictly:
//! an unknown field there is a typo, and the file's author is told where.
#![forbid(unsafe_code)]

pub mod check;
pub mod clock;
pub mod credentials;
pub mod egress;
pub mod spec;

pub use check::{ConfigError, Source, check};
pub use spec::*;

/// Parse JSON into `T`, collecting the paths of fields `T` does not know instead of failing
/// on them (a newer operator may send fields this proxy predates).
pub fn parse_tolerant<'de, T: serde::Deserialize<'de>>(
    json: &'de [u8],
) -> Result<(T, Vec<String>), serde_json::Error> {
    let mut ignored = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(json);
    let value = serde_ignored::deserialize(&mut de, |path| ignored.push(readable(&path)))?;
    de.end()?;
    Ok((value, ignored))
}

/// Deserialize with any serde deserializer, noting the path of every field `T` does not
/// know in `unknown` (the deserializer's own errors keep their positions).
pub fn deserialize_noting_unknown<'de, T, D>(
    de: D,
    unknown: &mut Vec<String>,
) -> Result<T, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    serde_ignored::deserialize(de, |path| unknown.push(readable(&path)))
}

/// A field's path as a person writes it: `routes.0.retries.backoff`, without the `?` that
/// marks an optional value.
fn readable(path: &serde_ignored::Path<'_>) -> String {
    path.to_string()
        .split('.')
        .filter(|part| *part != "?")
        .collect::<Vec<_>>()
        .join(".")
}

/// Refuse the fields [`deserialize_noting_unknown`] noted, each with its path (for files a
/// person wrote, where an unknown field is a typo).
pub fn refuse_unknown(unknown: Vec<String>) -> Result<(), ConfigError> {
    if unknown.is_empty() {
        return Ok(());
    }
    Err(ConfigError {
        problems: unknown
            .into_iter()
            .map(|p| format!("{p}: unknown field (check its spelling and indentation)"))
            .collect(),
    })
}

/// Hex SHA-256 of a raw key, as a snapshot carries it.
pub fn hash_key(raw: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(raw.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The 32 bytes of a key hash written as 64 hex digits (optionally `sha256:`-prefixed).
pub fn parse_key_hash(text: &str) -> Option<[u8; 32]> {
    let text = text.strip_prefix("sha256:").unwrap_or(text);
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Compare a presented secret with the expected one in constant time (for equal lengths).
pub fn same_token(presented: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    presented.len() == expected.len() && bool::from(presented.ct_eq(expected))
}

/// OpenMetrics names a counter family without `_total` in `# HELP`/`# TYPE`; the classic
/// Prometheus text format names it as its samples are named, and has no `# UNIT` or `# EOF`.
/// Both binaries expose the classic format, so one scrape config serves both.
pub fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + counters.len() * 16);
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_keys_like_sha256sum() {
        // printf 'sk-test' | sha256sum
        let h = hash_key("sk-test");
        assert_eq!(h.len(), 64);
        assert_eq!(parse_key_hash(&h).map(|b| b.len()), Some(32));
        assert_eq!(parse_key_hash(&format!("sha256:{h}")), parse_key_hash(&h));
        assert!(parse_key_hash("abc").is_none());
        assert!(parse_key_hash(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn a_newer_operators_fields_are_tolerated_and_reported() {
        let json = br#"{"version":"v9","futureKnob":{"a":1},"routes":[{"name":"r","model":"m",
            "cacheTtl":"5m","backends":[{"name":"b","provider":"mock","shadowShare":0.1}]}],
            "keys":[]}"#;
        let (spec, ignored): (SnapshotSpec, _) = parse_tolerant(json).unwrap();
        assert_eq!(spec.routes[0].backends[0].name, "b");
        assert_eq!(
            ignored,
            vec![
                "futureKnob".to_owned(),
                "routes.0.cacheTtl".to_owned(),
                "routes.0.backends.0.shadowShare".to_owned()
            ]
        );
        check(&spec, Source::Operator).unwrap();
    }

    #[test]
    fn a_newer_operators_enum_values_are_refused_with_a_clear_message() {
        let json = br#"{"routes":[{"name":"r","model":"m","strategy":"fastest-token",
            "backends":[{"name":"b","provider":"vertex-ai"}]}]}"#;
        let (spec, _): (SnapshotSpec, _) = parse_tolerant(json).unwrap();
        let err = check(&spec, Source::Operator).unwrap_err().to_string();
        assert!(
            err.contains("strategy is not known to this proxy version"),
            "{err}"
        );
        assert!(
            err.contains("provider is not known to this proxy version"),
            "{err}"
        );
    }

    #[test]
    fn strict_reading_names_every_unknown_field() {
        let json = r#"{"routes":[{"name":"r","model":"m","modle":"x","backends":[]}],"kyes":[]}"#;
        let mut unknown = Vec::new();
        let _: SnapshotSpec =
            deserialize_noting_unknown(&mut serde_json::Deserializer::from_str(json), &mut unknown)
                .unwrap();
        let err = refuse_unknown(unknown).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(
            err.problems[0].starts_with("routes.0.modle: unknown field"),
            "{err}"
        );
        assert!(err.problems[1].starts_with("kyes: unknown field"), "{err}");
    }

    #[test]
    fn classic_text_names_counters_with_total() {
        let om =
            "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total 1\n# EOF\n";
        let text = openmetrics_to_prometheus(om);
        assert!(text.contains("# TYPE a_requests_total counter"));
        assert!(!text.contains("# EOF"));
    }
}
