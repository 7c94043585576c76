//! The snapshot loader: arbitrary bytes as the operator's JSON and as a standalone file.
//!
//! The same bytes go both ways the proxy reads a snapshot: as the JSON `SnapshotSpec` of the
//! operator's stream (`Source::Operator`), and as a config file (`ConfigFile::parse`, YAML by
//! serde-saphyr or JSON, then `file_snapshot` with the file's SHA-256, `Source::File`). Each
//! parse that succeeds is compiled: `Ok`, or an error listing at least one problem. A second
//! compile against the first result (the reload path, sharing unchanged keys) agrees.
//!
//! Credential files named by the input, a route's backends' and its shadow candidate's, are
//! not opened (a fuzzer could name `/dev/zero`): each is replaced by a scratch file holding
//! the named path as its content, so reading, trimming and checking a credential still sees
//! fuzzer-chosen bytes.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::config::{self, ConfigFile, SnapshotSpec, Source};
use modelgate_dataplane::snapshot::StateRegistry;
use modelgate_dataplane::source::file_snapshot;
use sha2::Digest;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = serde_json::from_slice::<SnapshotSpec>(data) {
        compile(spec, Source::Operator);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        match ConfigFile::parse(text) {
            Ok(file) => {
                let digest: [u8; 32] = sha2::Sha256::digest(data).into();
                let spec = file_snapshot(file, &digest);
                assert!(
                    spec.version.is_some(),
                    "a file's snapshot always has a version"
                );
                compile(spec, Source::File);
            }
            Err(e) => assert!(!e.problems.is_empty() && !e.to_string().is_empty()),
        }
    }
});

fn compile(mut spec: SnapshotSpec, source: Source) {
    // Shadow candidates name credential files too.
    for b in spec.routes.iter_mut().flat_map(|r| {
        let shadow = r.shadow.as_mut().map(|s| &mut s.backend);
        r.backends.iter_mut().chain(shadow)
    }) {
        if let Some(c) = b.credentials.as_mut()
            && let Some(file) = c.file.as_mut()
        {
            *file = scratch(file);
        }
    }
    let keys = spec.keys.len();
    let registry = StateRegistry::default();
    match config::compile(spec.clone(), source, &registry, None) {
        Ok(first) => {
            assert_eq!(first.keys.len(), keys);
            serde_json::from_str::<serde_json::Value>(&first.routes_summary)
                .expect("the routes summary is JSON");
            let again = config::compile(spec, source, &registry, Some(&first))
                .expect("a snapshot that compiled compiles again");
            assert_eq!(again.version, first.version);
            assert_eq!(again.keys.len(), keys);
        }
        Err(e) => {
            assert!(!e.problems.is_empty(), "an error names its problems");
            assert!(e.problems.iter().all(|p| !p.is_empty()));
            let _ = e.to_string();
            // Deterministic: the same spec is refused again.
            assert!(config::compile(spec, source, &registry, None).is_err());
        }
    }
}

/// A scratch file holding `named` (the path the input asked for) as its content.
fn scratch(named: &str) -> String {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("modelgate-fuzz-credential-{}", std::process::id()))
    });
    std::fs::write(path, named).expect("write the scratch credential");
    path.to_string_lossy().into_owned()
}
