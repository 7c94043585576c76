//! Config sources: where snapshots come from and how they are applied.
//!
//! Standalone mode reads a YAML or JSON file and polls it (plus SIGHUP) for changes; a change
//! is validated and swapped in atomically, an invalid one is logged, counted and ignored so
//! the last good snapshot keeps serving. Polling, rather than inotify, also follows the
//! symlink swaps Kubernetes does for mounted ConfigMaps. The operator stream (a later
//! source) feeds the same `apply`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::config::{self, ConfigError, ConfigFile, ServerSpec, SnapshotSpec, Source};
use crate::proxy::Gateway;

#[derive(Debug, Default, Clone)]
struct Status {
    source: String,
    loaded_at: Option<String>,
    last_error: Option<String>,
    last_attempt: Option<String>,
}

/// `/config` lists at most this many keys (all of them are counted).
const KEYS_SHOWN: usize = 1000;

/// The running proxy: its gateway plus what the admin port reports.
pub struct Runtime {
    pub gateway: Arc<Gateway>,
    pub draining: AtomicBool,
    status: Mutex<Status>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Runtime {
    pub fn new(gateway: Arc<Gateway>, source: String) -> Self {
        Self {
            gateway,
            draining: AtomicBool::new(false),
            status: Mutex::new(Status {
                source,
                ..Status::default()
            }),
        }
    }

    /// Validate and swap in a snapshot; on error the current one stays.
    pub fn apply(&self, spec: &SnapshotSpec, source: Source) -> Result<String, ConfigError> {
        let gw = &self.gateway;
        let result = config::compile(spec, source, &gw.live.registry);
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_attempt = Some(now_rfc3339());
        match result {
            Ok(snapshot) => {
                let version = snapshot.version.clone();
                let (routes, keys) = (spec.routes.len(), snapshot.keys.len());
                gw.live.store(snapshot);
                gw.metrics.record_reload(Some(&version), true);
                status.loaded_at = status.last_attempt.clone();
                status.last_error = None;
                tracing::info!(version = %version, routes, keys, "config snapshot applied");
                Ok(version)
            }
            Err(e) => {
                gw.metrics.record_reload(None, false);
                status.last_error = Some(e.to_string());
                let keeping = gw.live.load().map(|s| s.version.clone());
                tracing::error!(error = %e, keeping = keeping.as_deref().unwrap_or("none"), "config snapshot rejected; keeping the last good one");
                Err(e)
            }
        }
    }

    /// What `/config` shows.
    pub fn describe(&self) -> serde_json::Value {
        let status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let snapshot = self.gateway.live.load();
        serde_json::json!({
            "version": snapshot.as_ref().map(|s| s.version.clone()),
            "source": status.source,
            "loadedAt": status.loaded_at,
            "lastAttempt": status.last_attempt,
            "lastError": status.last_error,
            "snapshot": snapshot.as_ref().map(|s| {
                let mut summary = s.summary.clone();
                summary["keys"] = serde_json::Value::Array(s.keys.describe(KEYS_SHOWN));
                summary["keysTotal"] = serde_json::json!(s.keys.len());
                summary
            }),
        })
    }
}

pub fn read_config(path: &Path) -> Result<(Vec<u8>, ConfigFile), ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::single("", format!("cannot read {}: {e}", path.display())))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ConfigError::single("", format!("{} is not UTF-8", path.display())))?;
    let file = ConfigFile::parse(text)?;
    Ok((bytes, file))
}

/// Poll `path` every `interval` (and on SIGHUP) and apply what changed.
pub async fn watch_file(
    rt: Arc<Runtime>,
    path: PathBuf,
    interval: Duration,
    initial: Vec<u8>,
    server: ServerSpec,
) {
    use sha2::Digest;
    // A digest, not the file: a snapshot file can be many megabytes.
    let mut last: [u8; 32] = sha2::Sha256::digest(&initial).into();
    drop(initial);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut last_read_error: Option<String> = None;
    loop {
        #[cfg(unix)]
        {
            match hup.as_mut() {
                Some(h) => {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = h.recv() => tracing::info!("SIGHUP: reloading config"),
                    }
                }
                None => tokio::time::sleep(interval).await,
            }
        }
        #[cfg(not(unix))]
        tokio::time::sleep(interval).await;

        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                let msg = e.to_string();
                if last_read_error.as_deref() != Some(&msg) {
                    tracing::error!(path = %path.display(), error = %msg, "cannot read config file; keeping the last good snapshot");
                    last_read_error = Some(msg);
                }
                continue;
            }
        };
        last_read_error = None;
        let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
        if digest == last {
            continue;
        }
        last = digest;
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|_| ConfigError::single("", "config file is not UTF-8"))
            .and_then(ConfigFile::parse);
        match parsed {
            Ok(file) => {
                if file.server != server {
                    tracing::warn!(
                        "the server section changed; listener settings apply after a restart"
                    );
                }
                let _ = rt.apply(&file.into_snapshot(), Source::File);
            }
            Err(e) => {
                rt.gateway.metrics.record_reload(None, false);
                let mut status = rt.status.lock().unwrap_or_else(|e| e.into_inner());
                status.last_error = Some(e.to_string());
                status.last_attempt = Some(now_rfc3339());
                tracing::error!(error = %e, "config file does not parse; keeping the last good snapshot");
            }
        }
    }
}
