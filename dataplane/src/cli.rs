//! Command line: run the proxy, check a config, or hash a key.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::watch;

use crate::config::{self, Source};
use crate::control;
use crate::proxy::{Gateway, Settings};
use crate::server;
use crate::source::{self, Runtime};

const USAGE: &str = "\
modelgate-dataplane: the modelgate proxy

USAGE:
    modelgate-dataplane --config FILE [OPTIONS]    run standalone from a YAML or JSON file
    modelgate-dataplane --operator URL [OPTIONS]   follow the operator's config stream
    modelgate-dataplane --check --config FILE      validate a config file and exit
    modelgate-dataplane hash-key [KEY]             print the sha256 a config stores for KEY
                                                   (reads KEY from stdin when omitted)
OPTIONS:
    --listen ADDR            API address (overrides server.listen)
    --admin ADDR             admin address (overrides server.admin)
    --addr-file FILE         write the bound addresses as JSON once listening
    --reload-interval DUR    how often to look for config changes [default: 1s]
    --drain-delay DUR        after SIGTERM, keep accepting (not ready) this long [default: 0s]
    --operator URL           the operator's config server (TLS), e.g.
                             https://modelgate-operator.modelgate.svc:8443; with --config, the
                             file may then hold only the server section
    --operator-ca FILE       PEM bundle of the CA that signs the operator's certificate
                             (the modelgate-ca ConfigMap); read again at every connect
    --operator-token-file F  this proxy's ServiceAccount token (projected, audience modelgate),
                             or the shared development token (or env MODELGATE_PROXY_TOKEN);
                             read again at every connect
    --admin-token-file F     /config answers remote clients that send this Bearer token;
                             without it, /config answers loopback clients only
    --allow-upstream RULE    upstream hosts allowed at connect time (host, *.domain or CIDR;
                             repeatable); an explicit allow wins over the denials
    --deny-upstream RULE     more refused upstream addresses (repeatable), beside the built-in
                             loopback, link-local and cloud metadata ones
    --service-cidr CIDR      the cluster's Service range, refused (repeatable)
                             Following an operator, names resolving to refused addresses are
                             never connected to; standalone, only when one of these is given
    --proxy-id ID            this proxy's name for the operator [default: $POD_NAME or host-pid]
    --usage-interval DUR     how often usage is reported to the operator [default: 2s]
    --workers N              threads serving requests (or env MODELGATE_WORKERS) [default: the
                             CPUs this process may use, cgroup quota included]; with 1, one
                             thread serves everything without work stealing, as nginx's worker
                             does (the cheapest per request on a one-CPU pod)
    --series-grace DUR       how long /metrics keeps the series of a key, route, backend or
                             masking rule the config no longer holds [default: 5m]
    --log-format json|text   [default: json]; the filter comes from RUST_LOG [default: info]
    --otlp-endpoint URL      send OpenTelemetry GenAI traces by OTLP/HTTP to URL (overrides
                             server.tracing.otlpEndpoint), e.g. http://otel-collector:4318
    --trace-sampling RATIO   share of new traces recorded, 0 to 1 (server.tracing.samplingRatio)
                             [default: 1]; a client's traceparent decides for its own trace
    --trace-content          put prompts and answers on spans (server.tracing.captureContent)
    --cache-memory-bytes N   bytes of cached answers kept in memory, all routes together
                             (server.cache.memoryBytes) [default: 67108864]
    --cache-redis URL        a Redis shared by the proxies for cached answers,
                             redis://host:port/db, rediss:// for TLS (server.cache.redis)
    --cache-redis-ca-file F  CAs that may sign the Redis server's certificate, PEM
                             (server.cache.redisCaFile) [default: the Mozilla roots]
    --cache-redis-username U the Redis ACL user (server.cache.redisUsername)
    --cache-redis-password-file F
                             the Redis password, read at each new connection
                             (server.cache.redisPasswordFile)
    --cache-redis-entry-key-file F
                             a secret of 32 bytes or more the proxies share; entries in
                             Redis are sealed with it (server.cache.redisEntryKeyFile)
";

#[derive(Debug, Default)]
struct Options {
    config: Option<PathBuf>,
    listen: Option<String>,
    admin: Option<String>,
    addr_file: Option<PathBuf>,
    reload_interval: Option<Duration>,
    drain_delay: Duration,
    operator: Option<String>,
    operator_token_file: Option<PathBuf>,
    operator_ca: Option<PathBuf>,
    allow_upstream: Vec<String>,
    deny_upstream: Vec<String>,
    allow_ambient_identity: bool,
    admin_token_file: Option<PathBuf>,
    proxy_id: Option<String>,
    usage_interval: Option<Duration>,
    series_grace: Option<Duration>,
    workers: Option<usize>,
    otlp_endpoint: Option<String>,
    trace_sampling: Option<f64>,
    trace_content: bool,
    cache_memory_bytes: Option<u64>,
    cache_redis: Option<String>,
    cache_redis_ca_file: Option<String>,
    cache_redis_username: Option<String>,
    cache_redis_password_file: Option<String>,
    cache_redis_entry_key_file: Option<String>,
    check: bool,
    text_logs: bool,
    hash_key: Option<Option<String>>,
}

fn workers(v: &str) -> anyhow::Result<usize> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => bail!("must be a number of threads from 1 to 1024, not {v:?}"),
    }
}

/// One thread for one worker (a current-thread runtime: no work stealing, no wake-ups across
/// threads), else a multi-threaded runtime with that many workers.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    b.enable_all().build()
}

fn parse_args(args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
    // `--flag=value` is `--flag value` (how manifests usually spell it).
    let mut args = args.flat_map(|a| match a.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => vec![flag.to_owned(), value.to_owned()],
        _ => vec![a],
    });
    let mut o = Options::default();
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--config" | "-c" => o.config = Some(value("--config")?.into()),
            "--listen" => o.listen = Some(value("--listen")?),
            "--admin" => o.admin = Some(value("--admin")?),
            "--addr-file" => o.addr_file = Some(value("--addr-file")?.into()),
            "--reload-interval" => {
                let v = value("--reload-interval")?;
                o.reload_interval = Some(
                    humantime::parse_duration(&v)
                        .with_context(|| format!("--reload-interval {v:?}"))?,
                );
            }
            "--drain-delay" => {
                let v = value("--drain-delay")?;
                o.drain_delay = humantime::parse_duration(&v)
                    .with_context(|| format!("--drain-delay {v:?}"))?;
            }
            "--operator" => o.operator = Some(value("--operator")?),
            "--operator-token-file" => {
                o.operator_token_file = Some(value("--operator-token-file")?.into())
            }
            "--operator-ca" => o.operator_ca = Some(value("--operator-ca")?.into()),
            "--allow-upstream" => o.allow_upstream.push(value("--allow-upstream")?),
            "--allow-ambient-identity" => o.allow_ambient_identity = true,
            "--deny-upstream" | "--service-cidr" => o.deny_upstream.push(value(&a)?),
            "--admin-token-file" => o.admin_token_file = Some(value("--admin-token-file")?.into()),
            "--proxy-id" => o.proxy_id = Some(value("--proxy-id")?),
            "--usage-interval" => {
                let v = value("--usage-interval")?;
                o.usage_interval = Some(
                    humantime::parse_duration(&v)
                        .with_context(|| format!("--usage-interval {v:?}"))?,
                );
            }
            "--series-grace" => {
                let v = value("--series-grace")?;
                o.series_grace = Some(
                    humantime::parse_duration(&v)
                        .with_context(|| format!("--series-grace {v:?}"))?,
                );
            }
            "--workers" => o.workers = Some(workers(&value("--workers")?).context("--workers")?),
            "--log-format" => match value("--log-format")?.as_str() {
                "json" => o.text_logs = false,
                "text" => o.text_logs = true,
                other => bail!("--log-format must be json or text, not {other:?}"),
            },
            "--otlp-endpoint" => o.otlp_endpoint = Some(value("--otlp-endpoint")?),
            "--trace-sampling" => {
                let v = value("--trace-sampling")?;
                match v.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => o.trace_sampling = Some(r),
                    _ => bail!("--trace-sampling must be a ratio from 0 to 1, not {v:?}"),
                }
            }
            "--trace-content" => o.trace_content = true,
            "--cache-memory-bytes" => {
                let v = value("--cache-memory-bytes")?;
                o.cache_memory_bytes = Some(v.trim().parse::<u64>().with_context(|| {
                    format!("--cache-memory-bytes must be a number of bytes, not {v:?}")
                })?);
            }
            "--cache-redis" => o.cache_redis = Some(value("--cache-redis")?),
            "--cache-redis-ca-file" => {
                o.cache_redis_ca_file = Some(value("--cache-redis-ca-file")?);
            }
            "--cache-redis-username" => {
                o.cache_redis_username = Some(value("--cache-redis-username")?);
            }
            "--cache-redis-password-file" => {
                o.cache_redis_password_file = Some(value("--cache-redis-password-file")?);
            }
            "--cache-redis-entry-key-file" => {
                o.cache_redis_entry_key_file = Some(value("--cache-redis-entry-key-file")?);
            }
            "--check" => o.check = true,
            "hash-key" => o.hash_key = Some(args.next()),
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--version" | "-V" => {
                println!("modelgate-dataplane {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(o)
}

pub fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(key) = &opts.hash_key {
        let raw = match key {
            Some(k) => k.clone(),
            None => {
                let mut s = String::new();
                if std::io::stdin().read_to_string(&mut s).is_err() {
                    eprintln!("error: cannot read the key from stdin");
                    return ExitCode::from(2);
                }
                s.trim().to_owned()
            }
        };
        println!("{}", config::hash_key(&raw));
        return ExitCode::SUCCESS;
    }
    init_logs(opts.text_logs);
    let workers = match opts.workers {
        Some(n) => n,
        None => match std::env::var("MODELGATE_WORKERS") {
            Ok(v) => match workers(&v) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("error: MODELGATE_WORKERS: {e:#}");
                    return ExitCode::from(2);
                }
            },
            Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
    };
    let runtime = match runtime(workers) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "modelgate-dataplane failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Operational logs through `tracing` (rare events); the per-request access log has its
/// own batched writer (`accesslog`), on unless RUST_LOG turns `modelgate::access` off.
fn init_logs(text: bool) {
    use tracing_subscriber::EnvFilter;
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let access_off = directives.split(',').any(|d| {
        let d = d.trim();
        d == "modelgate::access=off" || matches!(d, "off" | "error" | "warn")
    });
    if !access_off {
        crate::accesslog::enable();
    }
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if text {
        b.init();
    } else {
        b.json().flatten_event(true).with_current_span(false).init();
    }
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let (path, digest, file) = match (&opts.config, &opts.operator) {
        (Some(path), _) => {
            let (digest, file) = source::read_config(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (Some(path.clone()), digest, file)
        }
        (None, Some(_)) => (None, [0; 32], config::ConfigFile::default()),
        (None, None) => bail!(
            "--config FILE or --operator URL is required (try --config examples/standalone.yaml)\n\n{USAGE}"
        ),
    };
    if opts.check {
        let path = path.context("--check needs --config")?;
        let spec = source::file_snapshot(file, &digest);
        let v = config::compile(spec, Source::File, &Default::default(), None)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .version;
        println!("{}: valid (version {v})", path.display());
        return Ok(());
    }
    let operator = match &opts.operator {
        None => None,
        Some(url) => {
            if !file.routes.is_empty() || !file.keys.is_empty() {
                bail!(
                    "with --operator, routes and keys come from the operator; the config file may hold only the server section"
                );
            }
            if !url.starts_with("https://") {
                bail!(
                    "--operator {url:?}: the config stream is TLS only; use https://<operator>:<port>"
                );
            }
            Some(control::Operator {
                url: url.clone(),
                token_file: opts.operator_token_file.clone(),
                token_env: match &opts.operator_token_file {
                    Some(_) => None,
                    None => Some(std::env::var("MODELGATE_PROXY_TOKEN").context(
                        "set --operator-token-file (or MODELGATE_PROXY_TOKEN) to talk to the operator",
                    )?),
                },
                ca_file: opts.operator_ca.clone().context(
                    "--operator-ca FILE is required: the config stream is TLS and the proxy verifies the operator",
                )?,
                connection: Default::default(),
                proxy_id: opts.proxy_id.clone().unwrap_or_else(default_proxy_id),
                idle_timeout: Duration::from_secs(20),
                usage_interval: opts.usage_interval.unwrap_or(Duration::from_secs(2)),
            })
        }
    };
    let mut server_spec = file.server.clone();
    if let Some(e) = &opts.otlp_endpoint {
        server_spec.tracing.otlp_endpoint = Some(e.clone());
    }
    if let Some(r) = opts.trace_sampling {
        server_spec.tracing.sampling_ratio = r;
    }
    if opts.trace_content {
        server_spec.tracing.capture_content = true;
    }
    if let Some(n) = opts.cache_memory_bytes {
        server_spec.cache.memory_bytes = n;
    }
    if let Some(url) = &opts.cache_redis {
        server_spec.cache.redis = Some(url.clone()).filter(|u| !u.is_empty());
    }
    let given = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    if opts.cache_redis_ca_file.is_some() {
        server_spec.cache.redis_ca_file = given(&opts.cache_redis_ca_file);
    }
    if opts.cache_redis_username.is_some() {
        server_spec.cache.redis_username = given(&opts.cache_redis_username);
    }
    if opts.cache_redis_password_file.is_some() {
        server_spec.cache.redis_password_file = given(&opts.cache_redis_password_file);
    }
    if opts.cache_redis_entry_key_file.is_some() {
        server_spec.cache.redis_entry_key_file = given(&opts.cache_redis_entry_key_file);
    }
    let duration = |what: &str, v: &str| {
        humantime::parse_duration(v)
            .with_context(|| format!("server.{what} {v:?} is not a duration"))
    };
    let header_timeout = duration("headerReadTimeout", &server_spec.header_read_timeout)?;
    let drain = duration("drainTimeout", &server_spec.drain_timeout)?;
    // Following an operator, tenants' routes decide where requests go: the egress policy
    // always applies. Standalone, the file's author is the admin: only when asked.
    let egress =
        (operator.is_some() || !opts.allow_upstream.is_empty() || !opts.deny_upstream.is_empty())
            .then(|| crate::egress::UpstreamPolicy::new(&opts.allow_upstream, &opts.deny_upstream))
            .transpose()
            .map_err(|e| anyhow::anyhow!("upstream policy: {e}"))?
            .map(Arc::new);
    let mut gateway = Gateway::new(Settings {
        egress,
        max_body_bytes: server_spec.max_body_bytes,
        default_max_tokens: server_spec.default_max_tokens,
        max_stream_event_bytes: usize::try_from(server_spec.max_stream_event_bytes)
            .unwrap_or(usize::MAX)
            .max(1024),
        series_grace: opts.series_grace.unwrap_or(crate::metrics::SERIES_GRACE),
    });
    let redis = match &server_spec.cache.redis {
        None => None,
        Some(url) => {
            let timeout = duration("cache.redisTimeout", &server_spec.cache.redis_timeout)?;
            let config = crate::cache::RedisConfig {
                ca_file: server_spec.cache.redis_ca_file.clone().map(Into::into),
                username: server_spec.cache.redis_username.clone(),
                password_file: server_spec
                    .cache
                    .redis_password_file
                    .clone()
                    .map(Into::into),
                entry_key_file: server_spec
                    .cache
                    .redis_entry_key_file
                    .clone()
                    .map(Into::into),
                ..crate::cache::RedisConfig::parse(url, timeout)
                    .map_err(|e| anyhow::anyhow!("server.cache.redis: {e}"))?
            };
            let (tls, auth, sealed) = (
                config.tls,
                config.password_file.is_some(),
                config.entry_key_file.is_some(),
            );
            tracing::info!(redis = %config.addr, tls, auth, sealed, "response cache: shared tier in Redis");
            Some(
                crate::cache::Redis::new(config, modelgate_wire::MAX_CACHE_ENTRY_BYTES as usize)
                    .map_err(|e| anyhow::anyhow!("server.cache: {e}"))?,
            )
        }
    };
    gateway.cache = Arc::new(crate::cache::Store::new(
        server_spec.cache.memory_bytes,
        redis,
        &gateway.metrics.cache,
    ));
    gateway.tracing = crate::traces::Tracing::start(&server_spec.tracing, gateway.metrics.clone())
        .map_err(|e| anyhow::anyhow!("server.tracing: {e}"))?
        .map(Arc::new);
    if let (Some(_), Some(e)) = (&gateway.tracing, &server_spec.tracing.otlp_endpoint) {
        tracing::info!(
            endpoint = %e,
            sampling_ratio = server_spec.tracing.sampling_ratio,
            capture_content = server_spec.tracing.capture_content,
            "OpenTelemetry traces on"
        );
    }
    let tracer = gateway.tracing.clone();
    let gateway = Arc::new(gateway);
    // Standalone, the file's author is the admin; following an operator, a tenant's route may
    // sign with the pod's own cloud identity only when the admin said so.
    gateway.live.registry.ambient_identity.store(
        operator.is_none() || opts.allow_ambient_identity,
        std::sync::atomic::Ordering::Relaxed,
    );
    let source_name = match (&operator, &path) {
        (Some(op), _) => format!("operator:{}", op.url),
        (None, Some(p)) => format!("file:{}", p.display()),
        (None, None) => String::new(),
    };
    let rt = Arc::new(Runtime::new(gateway.clone(), source_name));
    if operator.is_none()
        && let Some(path) = &path
    {
        rt.apply(source::file_snapshot(file, &digest), Source::File)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }

    let api = server::bind(opts.listen.as_deref().unwrap_or(&server_spec.listen), "API").await?;
    let admin = server::bind(opts.admin.as_deref().unwrap_or(&server_spec.admin), "admin").await?;
    let (api_addr, admin_addr) = (api.local_addr()?, admin.local_addr()?);
    tracing::info!(api = %api_addr, admin = %admin_addr, "modelgate-dataplane listening");
    if let Some(f) = &opts.addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({"api": api_addr, "admin": admin_addr}).to_string(),
        )?;
        std::fs::rename(&tmp, f)?;
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(crate::accesslog::flusher());
    match (operator, path) {
        (Some(op), _) => {
            tokio::spawn(control::follow(rt.clone(), op.clone()));
            tokio::spawn(control::report_usage(rt.clone(), op));
        }
        (None, Some(path)) => {
            tokio::spawn(source::watch_file(
                rt.clone(),
                path,
                opts.reload_interval.unwrap_or(Duration::from_secs(1)),
                digest,
                server_spec.clone(),
            ));
        }
        (None, None) => {}
    }
    let admin_token = opts
        .admin_token_file
        .as_deref()
        .map(read_admin_token)
        .transpose()?;
    let admin_task = tokio::spawn(server::serve_admin(
        admin,
        rt.clone(),
        admin_token,
        stop_rx.clone(),
    ));
    let (api_stop_tx, api_stop_rx) = watch::channel(false);
    let api_task = tokio::spawn(server::serve_api(
        api,
        gateway,
        server_spec.max_connections.max(1) as usize,
        header_timeout,
        drain,
        api_stop_rx,
    ));

    shutdown_signal().await;
    tracing::info!("shutdown requested");
    rt.draining.store(true, Ordering::Relaxed);
    if !opts.drain_delay.is_zero() {
        tracing::info!(
            delay_s = opts.drain_delay.as_secs_f64(),
            "not ready; still accepting while endpoints update"
        );
        tokio::time::sleep(opts.drain_delay).await;
    }
    let _ = api_stop_tx.send(true);
    let drain_started = std::time::Instant::now();
    let _ = api_task.await;
    if let Some(t) = tracer {
        // What the drain left, and a second at least, for the last spans.
        let left = drain.saturating_sub(drain_started.elapsed());
        t.shutdown(left.max(Duration::from_secs(1))).await;
    }
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    crate::accesslog::flush();
    Ok(())
}

fn read_admin_token(file: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read --admin-token-file {}", file.display()))?;
    let token = token.trim().to_owned();
    if token.len() < 16 {
        bail!("the admin token must be at least 16 characters");
    }
    Ok(token)
}

fn default_proxy_id() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "proxy".into());
        format!("{}-{}", host.trim(), std::process::id())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags_and_rejects_unknown_ones() {
        let o = parse_args(
            [
                "--config",
                "f.yaml",
                "--listen=127.0.0.1:0",
                "--reload-interval",
                "200ms",
                "--series-grace=1s",
            ]
            .into_iter()
            .map(String::from),
        )
        .unwrap();
        assert_eq!(o.config.unwrap(), PathBuf::from("f.yaml"));
        assert_eq!(
            o.listen.as_deref(),
            Some("127.0.0.1:0"),
            "--flag=value works"
        );
        assert_eq!(o.reload_interval, Some(Duration::from_millis(200)));
        assert_eq!(o.series_grace, Some(Duration::from_secs(1)));
        assert!(parse_args(["--series-grace", "soon"].into_iter().map(String::from)).is_err());
        assert!(parse_args(["--bogus"].into_iter().map(String::from)).is_err());
        assert!(parse_args(["--config"].into_iter().map(String::from)).is_err());
    }

    #[test]
    fn workers_are_a_thread_count() {
        let args = |a: &[&str]| parse_args(a.iter().map(|s| s.to_string()));
        assert_eq!(args(&["--workers", "1"]).unwrap().workers, Some(1));
        assert_eq!(args(&["--workers=4"]).unwrap().workers, Some(4));
        for bad in ["0", "-1", "two", "100000"] {
            let e = format!("{:#}", args(&["--workers", bad]).unwrap_err());
            assert!(e.contains("--workers: must be a number of threads"), "{e}");
        }
        // One worker: a current-thread runtime still runs spawned tasks.
        let rt = runtime(1).unwrap();
        assert_eq!(
            rt.block_on(async { tokio::spawn(async { 7 }).await.unwrap() }),
            7
        );
    }
}
