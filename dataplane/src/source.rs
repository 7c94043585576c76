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
    applier: Applier,
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread that reads, validates and swaps in snapshots, one at a time, off the runtime.
/// It runs at a lower CPU priority (nice 10), so that on a busy core requests get the larger
/// share, while a snapshot still gets about a tenth of the core and completes under full
/// load (a key revocation must not wait for a quiet moment). Schedulers that do not preempt
/// on wake-up (EEVDF) still let a request wait for the thread's slice: docs/benchmarks.md.
struct Applier {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

/// Nice value of the apply thread (0 is normal, 19 the lowest priority).
const APPLY_NICE: i32 = 10;

impl Applier {
    fn new() -> Self {
        Self {
            jobs: Mutex::new(None),
        }
    }

    /// Run `f` on the apply thread (started at first use) and wait for it.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let sender = jobs.get_or_insert_with(spawn_apply_thread);
            if let Err(std::sync::mpsc::SendError(job)) = sender.send(job) {
                // The thread is gone (it cannot panic out of a job, but be sure): start anew.
                let fresh = spawn_apply_thread();
                let _ = fresh.send(job);
                *jobs = Some(fresh);
            }
        }
        rx.await.ok()
    }
}

fn spawn_apply_thread() -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new()
        .name("modelgate-apply".into())
        .spawn(move || {
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), APPLY_NICE) {
                tracing::debug!(error = %e, "could not lower the apply thread's priority");
            }
            for job in rx {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    tracing::error!("a config apply job panicked; the last good snapshot stays");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the config apply thread");
    }
    tx
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
            applier: Applier::new(),
        }
    }

    /// Run `f` on the apply thread and wait for it: work on a large snapshot (reading a
    /// message of tens of MB) that must not stall the threads serving requests.
    pub async fn off_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        self.applier.run(f).await
    }

    /// Validate and swap in a snapshot on the apply thread: a snapshot with 100k keys takes
    /// a couple of hundred milliseconds to validate, which must not stall requests.
    pub async fn apply_off_runtime(
        self: &Arc<Self>,
        spec: SnapshotSpec,
        source: Source,
    ) -> Result<String, ConfigError> {
        let rt = self.clone();
        match self.off_runtime(move || rt.apply(spec, source)).await {
            Some(r) => r,
            None => Err(ConfigError::single("", "snapshot apply task failed")),
        }
    }

    /// Validate and swap in a snapshot; on error the current one stays.
    pub fn apply(&self, spec: SnapshotSpec, source: Source) -> Result<String, ConfigError> {
        let gw = &self.gateway;
        let routes = spec.routes.len();
        let previous = gw.live.load();
        let result = config::compile(spec, source, &gw.live.registry, previous.as_deref());
        drop(previous);
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_attempt = Some(now_rfc3339());
        match result {
            Ok(snapshot) => {
                let version = snapshot.version.clone();
                let keys = snapshot.keys.len();
                // Requests still holding the old snapshot keep it alive; otherwise it is
                // freed here, on the apply thread, off the runtime.
                drop(gw.live.store(snapshot));
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
            "cache": self.gateway.cache.describe(),
            "snapshot": snapshot.as_ref().map(|s| {
                let routes: serde_json::Value =
                    serde_json::from_str(&s.routes_summary).unwrap_or_default();
                serde_json::json!({
                    "version": s.version,
                    "routes": routes,
                    "keys": s.keys.describe(KEYS_SHOWN),
                    "keysTotal": s.keys.len(),
                })
            }),
        })
    }
}

/// A file's snapshot; without a `version` in the file, the start of the file's SHA-256
/// names it (the digest is at hand, so the parsed file is not serialized again to hash it).
pub fn file_snapshot(file: ConfigFile, digest: &[u8; 32]) -> SnapshotSpec {
    let mut spec = file.into_snapshot();
    if spec.version.is_none() {
        spec.version = Some(digest[..8].iter().map(|b| format!("{b:02x}")).collect());
    }
    spec
}

/// Read and parse a config file; returns its SHA-256 (what the watcher compares) with it.
pub fn read_config(path: &Path) -> Result<([u8; 32], ConfigFile), ConfigError> {
    use sha2::Digest;
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::single("", format!("cannot read {}: {e}", path.display())))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ConfigError::single("", format!("{} is not UTF-8", path.display())))?;
    let file = ConfigFile::parse(text)?;
    Ok((sha2::Sha256::digest(&bytes).into(), file))
}

/// What a file looks like from its metadata: a change in any of these means "read it".
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    // Follows symlinks, so a Kubernetes ConfigMap's swapped `..data` link shows as a change.
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// Poll `path` every `interval` (and on SIGHUP) and apply what changed. Only metadata is
/// read on the runtime; reading, parsing and validating a changed file happen on a
/// blocking thread, so a large snapshot never stalls requests.
pub async fn watch_file(
    rt: Arc<Runtime>,
    path: PathBuf,
    interval: Duration,
    initial: [u8; 32],
    server: ServerSpec,
) {
    // A digest, not the file: a snapshot file can be many megabytes.
    let mut last = initial;
    let mut last_stamp = stamp(&path);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut last_read_error: Option<String> = None;
    loop {
        let mut forced = false;
        #[cfg(unix)]
        {
            match hup.as_mut() {
                Some(h) => {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = h.recv() => {
                            tracing::info!("SIGHUP: reloading config");
                            forced = true;
                        }
                    }
                }
                None => tokio::time::sleep(interval).await,
            }
        }
        #[cfg(not(unix))]
        tokio::time::sleep(interval).await;

        let now_stamp = stamp(&path);
        if !forced && now_stamp.is_some() && now_stamp == last_stamp {
            continue;
        }
        last_stamp = now_stamp;
        let (rt2, path2, server2) = (rt.clone(), path.clone(), server.clone());
        let outcome = rt
            .applier
            .run(move || load_changed(&rt2, &path2, &server2, last))
            .await;
        match outcome {
            Some(Ok(Some(digest))) => {
                last = digest;
                last_read_error = None;
            }
            Some(Ok(None)) => last_read_error = None,
            Some(Err(msg)) => {
                if last_read_error.as_deref() != Some(&msg) {
                    tracing::error!(path = %path.display(), error = %msg, "cannot read config file; keeping the last good snapshot");
                    last_read_error = Some(msg);
                }
            }
            None => tracing::error!("config reload task failed"),
        }
    }
}

/// Read the file; when its content changed, parse and apply it. Returns the new digest
/// (None when the content is unchanged), or a read error.
fn load_changed(
    rt: &Runtime,
    path: &Path,
    server: &ServerSpec,
    last: [u8; 32],
) -> Result<Option<[u8; 32]>, String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    if digest == last {
        return Ok(None);
    }
    let parsed = std::str::from_utf8(&bytes)
        .map_err(|_| ConfigError::single("", "config file is not UTF-8"))
        .and_then(ConfigFile::parse);
    drop(bytes);
    match parsed {
        Ok(file) => {
            if file.server != *server {
                tracing::warn!(
                    "the server section changed; listener settings apply after a restart"
                );
            }
            let _ = rt.apply(file_snapshot(file, &digest), Source::File);
        }
        Err(e) => {
            rt.gateway.metrics.record_reload(None, false);
            let mut status = rt.status.lock().unwrap_or_else(|e| e.into_inner());
            status.last_error = Some(e.to_string());
            status.last_attempt = Some(now_rfc3339());
            tracing::error!(error = %e, "config file does not parse; keeping the last good snapshot");
        }
    }
    Ok(Some(digest))
}
