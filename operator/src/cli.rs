//! Command line and start-up of the operator.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kube::runtime::events::Reporter;

use crate::controller::{self, Shared, lock};
use crate::tenancy::{self, Authenticator, Mode, Tenancy};
use crate::{leader, server, status, tls};
use modelgate_wire::egress::UpstreamPolicy;

const USAGE: &str = "\
modelgate-operator: compiles ModelRoutes and ApiKeys into snapshots for the proxies

USAGE:
    modelgate-operator [OPTIONS]        (uses KUBECONFIG or the in-cluster config)
OPTIONS:
    --config-listen ADDR     config server for proxies, TLS only [default: 0.0.0.0:8443]
    --admin-listen ADDR      /healthz, /readyz, /metrics [default: 0.0.0.0:8080]
    --namespace NS           where the Lease, the CA Secret and the usage ConfigMap live
                             [default: $POD_NAMESPACE or default] (alias: --lease-namespace)
    --proxy-auth MODE        serviceaccount (TokenReview of the proxies' ServiceAccount
                             tokens) or shared-token (development only) [default: serviceaccount]
    --token-audience AUD     audience proxies' tokens must carry [default: modelgate]
    --token-cache-ttl DUR    how long a verified token is trusted without asking the API
                             server again [default: 60s]
    --token-file FILE        the shared token for --proxy-auth shared-token
                             (or env MODELGATE_PROXY_TOKEN)
    --gateway-serviceaccount NS/NAME
                             proxies with this ServiceAccount are central gateway proxies
                             (repeatable); any other ServiceAccount is a sidecar and receives
                             only its own namespace, when that namespace is labelled
                             modelgate.dev/sidecars=true
    --gateway-namespaces all|K=V[,K=V]
                             namespaces the gateway proxies serve [default: all]
    --ca-secret NAME         Secret holding the config CA [default: modelgate-ca]
    --ca-configmap NAME      ConfigMap with the CA bundle for proxies [default: modelgate-ca]
    --ca-rotation-delay DUR  a new CA is trusted this long before it signs [default: 2m]
    --tls-san NAME|IP        extra name in the config server's certificate (repeatable)
    --allow-upstream RULE    backend hosts allowed (host, *.domain or CIDR; repeatable); when
                             given, every backend URL must match one
    --deny-upstream RULE     more hosts refused, beside the built-in loopback, link-local,
                             and cloud metadata denials (repeatable)
    --service-cidr CIDR      the cluster's Service range, refused as upstream (repeatable)
    --allow-ambient-identity routes may sign with the proxies' own cloud identity (bedrock
                             webIdentity, vertex workloadIdentity); start the proxies with it too
    --identity ID            this replica's name in the Lease [default: $POD_NAME or host-pid]
    --advertise-url URL      this replica's config URL for other replicas
                             [default: https://$POD_IP:<config port> or the bound address]
    --heartbeat DUR          heartbeat interval on proxy streams [default: 5s]
    --stream-max-age DUR     proxies are asked to reconnect (with a fresh token) after about
                             this long [default: 10m]
    --max-streams-per-identity N
                             open config streams one ServiceAccount may hold per replica
                             [default: 1000]
    --lease-duration DUR     leader Lease duration; renewed every fifth of it [default: 15s]
    --addr-file FILE         write the bound addresses as JSON once listening
    --log-format json|text   [default: json]; the filter comes from RUST_LOG [default: info]
";

#[derive(Debug)]
struct Options {
    config_listen: String,
    admin_listen: String,
    token_file: Option<PathBuf>,
    shared_token: bool,
    audience: String,
    token_cache_ttl: Duration,
    gateway_accounts: Vec<String>,
    gateway_namespaces: String,
    ca_secret: String,
    ca_configmap: String,
    ca_rotation_delay: Duration,
    tls_sans: Vec<String>,
    allow_upstream: Vec<String>,
    allow_ambient_identity: bool,
    deny_upstream: Vec<String>,
    identity: Option<String>,
    namespace: Option<String>,
    advertise_url: Option<String>,
    heartbeat: Duration,
    stream_max_age: Duration,
    max_streams_per_identity: u32,
    lease_duration: Duration,
    addr_file: Option<PathBuf>,
    text_logs: bool,
}

fn parse_args(args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
    // `--flag=value` is `--flag value` (how manifests usually spell it).
    let mut args = args.flat_map(|a| match a.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => vec![flag.to_owned(), value.to_owned()],
        _ => vec![a],
    });
    let mut o = Options {
        config_listen: "0.0.0.0:8443".into(),
        admin_listen: "0.0.0.0:8080".into(),
        token_file: None,
        shared_token: false,
        audience: "modelgate".into(),
        token_cache_ttl: tenancy::DEFAULT_ACCEPTED_TTL,
        gateway_accounts: vec![],
        gateway_namespaces: "all".into(),
        ca_secret: "modelgate-ca".into(),
        ca_configmap: "modelgate-ca".into(),
        ca_rotation_delay: Duration::from_secs(120),
        tls_sans: vec![],
        allow_upstream: vec![],
        allow_ambient_identity: false,
        deny_upstream: vec![],
        identity: None,
        namespace: None,
        advertise_url: None,
        heartbeat: Duration::from_secs(5),
        stream_max_age: Duration::from_secs(600),
        max_streams_per_identity: 1000,
        lease_duration: Duration::from_secs(15),
        addr_file: None,
        text_logs: false,
    };
    let duration = |flag: &str, v: String| {
        humantime::parse_duration(&v).with_context(|| format!("{flag} {v:?}"))
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--config-listen" => o.config_listen = value("--config-listen")?,
            "--admin-listen" => o.admin_listen = value("--admin-listen")?,
            "--token-file" => o.token_file = Some(value("--token-file")?.into()),
            "--proxy-auth" => {
                o.shared_token = match value("--proxy-auth")?.as_str() {
                    "serviceaccount" => false,
                    "shared-token" => true,
                    other => {
                        bail!("--proxy-auth must be serviceaccount or shared-token, not {other:?}")
                    }
                }
            }
            "--token-audience" => o.audience = value("--token-audience")?,
            "--token-cache-ttl" => {
                o.token_cache_ttl = duration("--token-cache-ttl", value("--token-cache-ttl")?)?
            }
            "--gateway-serviceaccount" => {
                o.gateway_accounts.push(value("--gateway-serviceaccount")?)
            }
            "--gateway-namespaces" => o.gateway_namespaces = value("--gateway-namespaces")?,
            "--ca-secret" => o.ca_secret = value("--ca-secret")?,
            "--ca-configmap" => o.ca_configmap = value("--ca-configmap")?,
            "--ca-rotation-delay" => {
                o.ca_rotation_delay =
                    duration("--ca-rotation-delay", value("--ca-rotation-delay")?)?
            }
            "--tls-san" => o.tls_sans.push(value("--tls-san")?),
            "--allow-upstream" => o.allow_upstream.push(value("--allow-upstream")?),
            "--allow-ambient-identity" => o.allow_ambient_identity = true,
            "--deny-upstream" | "--service-cidr" => o.deny_upstream.push(value(&a)?),
            "--identity" => o.identity = Some(value("--identity")?),
            "--namespace" | "--lease-namespace" => o.namespace = Some(value(&a)?),
            "--advertise-url" => o.advertise_url = Some(value("--advertise-url")?),
            "--heartbeat" => o.heartbeat = duration("--heartbeat", value("--heartbeat")?)?,
            "--max-streams-per-identity" => {
                let v = value("--max-streams-per-identity")?;
                o.max_streams_per_identity =
                    v.parse().ok().filter(|n| *n > 0).with_context(|| {
                        format!("--max-streams-per-identity {v:?} is not a positive number")
                    })?;
            }
            "--stream-max-age" => {
                o.stream_max_age = duration("--stream-max-age", value("--stream-max-age")?)?
            }
            "--lease-duration" => {
                o.lease_duration = duration("--lease-duration", value("--lease-duration")?)?
            }
            "--addr-file" => o.addr_file = Some(value("--addr-file")?.into()),
            "--log-format" => o.text_logs = value("--log-format")? == "text",
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--version" | "-V" => {
                println!("modelgate-operator {}", env!("CARGO_PKG_VERSION"));
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
    init_logs(opts.text_logs);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "modelgate-operator failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(text: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if text {
        b.init();
    } else {
        b.json().flatten_event(true).with_current_span(false).init();
    }
}

fn read_token(opts: &Options) -> anyhow::Result<String> {
    let token = match &opts.token_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --token-file {}", f.display()))?,
        None => std::env::var("MODELGATE_PROXY_TOKEN")
            .context("--proxy-auth shared-token needs --token-file or MODELGATE_PROXY_TOKEN")?,
    };
    let token = token.trim().to_owned();
    if token.len() < 16 {
        bail!("the proxy token must be at least 16 characters");
    }
    Ok(token)
}

fn tenancy(opts: &Options) -> anyhow::Result<Tenancy> {
    let mut accounts = BTreeSet::new();
    for a in &opts.gateway_accounts {
        let (ns, name) = a
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
            .with_context(|| format!("--gateway-serviceaccount {a:?} is not NAMESPACE/NAME"))?;
        accounts.insert((ns.to_owned(), name.to_owned()));
    }
    let gateway_scope = tenancy::parse_selector(&opts.gateway_namespaces)
        .map_err(|e| anyhow::anyhow!("--gateway-namespaces: {e}"))?;
    Ok(Tenancy {
        gateway_accounts: accounts,
        gateway_scope,
    })
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tenancy = tenancy(&opts)?;
    // Parse the admin's rules before anything else: a typo fails at start.
    UpstreamPolicy::new(&opts.allow_upstream, &opts.deny_upstream)
        .map_err(|e| anyhow::anyhow!("upstream policy: {e}"))?;
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (KUBECONFIG or in-cluster config)")?;
    let mut deny = opts.deny_upstream.clone();
    deny.extend(controller::service_ranges(&client).await);
    let policy = UpstreamPolicy::new(&opts.allow_upstream, &deny)
        .map_err(|e| anyhow::anyhow!("upstream policy: {e}"))?;
    let namespace = opts
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".into());
    controller::preflight(&client, &namespace).await?;
    let auth = if opts.shared_token {
        tracing::warn!(
            "proxies authenticate with a shared token (--proxy-auth shared-token): every proxy that has it receives every namespace; use only for development"
        );
        Authenticator::new(Mode::SharedToken(read_token(&opts)?))
    } else {
        Authenticator::with_cache_ttl(
            Mode::ServiceAccount {
                client: client.clone(),
                audience: opts.audience.clone(),
            },
            opts.token_cache_ttl,
        )
    };

    let identity = opts
        .identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| {
            let host =
                std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "operator".into());
            format!("{}-{}", host.trim(), std::process::id())
        });
    let shared = Shared::new(auth, tenancy, identity.clone());
    lock(&shared.index).policy = policy;
    lock(&shared.index).ambient_identity = opts.allow_ambient_identity;
    let config = bind(&opts.config_listen, "config").await?;
    let admin = bind(&opts.admin_listen, "admin").await?;
    let (config_addr, admin_addr) = (config.local_addr()?, admin.local_addr()?);
    let pod_ip = std::env::var("POD_IP").ok();
    let url = opts.advertise_url.clone().unwrap_or_else(|| match &pod_ip {
        Some(ip) => format!("https://{ip}:{}", config_addr.port()),
        None => format!("https://{config_addr}"),
    });

    // The config port is TLS only; its certificate comes from the CA in the Secret.
    let pki = tls::Pki {
        namespace: namespace.clone(),
        secret: opts.ca_secret.clone(),
        configmap: opts.ca_configmap.clone(),
        rotation_delay: opts.ca_rotation_delay,
    };
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    sans.extend(pod_ip.clone());
    if !config_addr.ip().is_unspecified() {
        sans.push(config_addr.ip().to_string());
    }
    sans.extend(opts.tls_sans.iter().cloned());
    sans.sort();
    sans.dedup();
    let ca = tls::load_or_create(&client, &pki)
        .await
        .context("cannot read or create the config CA Secret")?;
    let tls =
        Arc::new(tls::Tls::new(ca, sans).context("cannot issue the config server certificate")?);

    tracing::info!(config = %config_addr, admin = %admin_addr, identity = %identity, namespace = %namespace, "modelgate-operator starting");
    if let Some(f) = &opts.addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({"config": config_addr, "admin": admin_addr}).to_string(),
        )?;
        std::fs::rename(&tmp, f)?;
    }

    controller::spawn_watchers(&shared, &client);
    tokio::spawn(controller::compile_loop(shared.clone()));
    tokio::spawn(controller::tick(shared.clone()));
    tokio::spawn(server::serve_config(
        config,
        shared.clone(),
        tls.clone(),
        server::Streams {
            heartbeat: opts.heartbeat,
            max_age: opts.stream_max_age.max(Duration::from_secs(1)),
            max_per_identity: opts.max_streams_per_identity,
        },
    ));
    tokio::spawn(server::serve_admin(admin, shared.clone()));
    tokio::spawn(server::sync_to_leader(shared.clone(), tls.clone()));
    tokio::spawn(tls::run(shared.clone(), client.clone(), tls.clone(), pki));
    tokio::spawn(status::follow_usage(
        shared.clone(),
        client.clone(),
        namespace.clone(),
    ));
    tokio::spawn(status::run(
        shared.clone(),
        client.clone(),
        Reporter {
            controller: "modelgate-operator".into(),
            instance: Some(identity.clone()),
        },
        namespace.clone(),
    ));
    let election = leader::Election {
        name: "modelgate-operator".into(),
        namespace,
        identity,
        url,
        duration: opts.lease_duration,
        renew: (opts.lease_duration / 5).max(Duration::from_millis(200)),
    };
    let elector = tokio::spawn(leader::run(
        shared.clone(),
        client.clone(),
        election.clone(),
    ));
    shutdown_signal().await;
    tracing::info!("shutting down");
    elector.abort();
    if shared
        .leader
        .swap(false, std::sync::atomic::Ordering::Relaxed)
    {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), leader::release(client, &election)).await;
    }
    Ok(())
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what} port"))
}

async fn shutdown_signal() {
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
