//! Command line and start-up of the operator.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use kube::runtime::events::Reporter;

use crate::controller::{self, Shared};
use crate::{leader, server, status};

const USAGE: &str = "\
modelgate-operator: compiles ModelRoutes and ApiKeys into snapshots for the proxies

USAGE:
    modelgate-operator [OPTIONS]        (uses KUBECONFIG or the in-cluster config)
OPTIONS:
    --config-listen ADDR     config server for proxies [default: 0.0.0.0:8443]
    --admin-listen ADDR      /healthz, /readyz, /metrics [default: 0.0.0.0:8080]
    --token-file FILE        the proxies' shared token (or env MODELGATE_PROXY_TOKEN)
    --identity ID            this replica's name in the Lease [default: $POD_NAME or host-pid]
    --lease-namespace NS     where the Lease lives [default: $POD_NAMESPACE or default]
    --advertise-url URL      this replica's config URL for other replicas
                             [default: http://$POD_IP:<config port> or the bound address]
    --heartbeat DUR          heartbeat interval on proxy streams [default: 5s]
    --lease-duration DUR     leader Lease duration; renewed every fifth of it [default: 15s]
    --addr-file FILE         write the bound addresses as JSON once listening
    --log-format json|text   [default: json]; the filter comes from RUST_LOG [default: info]
";

#[derive(Debug)]
struct Options {
    config_listen: String,
    admin_listen: String,
    token_file: Option<PathBuf>,
    identity: Option<String>,
    lease_namespace: Option<String>,
    advertise_url: Option<String>,
    heartbeat: Duration,
    lease_duration: Duration,
    addr_file: Option<PathBuf>,
    text_logs: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
    let mut o = Options {
        config_listen: "0.0.0.0:8443".into(),
        admin_listen: "0.0.0.0:8080".into(),
        token_file: None,
        identity: None,
        lease_namespace: None,
        advertise_url: None,
        heartbeat: Duration::from_secs(5),
        lease_duration: Duration::from_secs(15),
        addr_file: None,
        text_logs: false,
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--config-listen" => o.config_listen = value("--config-listen")?,
            "--admin-listen" => o.admin_listen = value("--admin-listen")?,
            "--token-file" => o.token_file = Some(value("--token-file")?.into()),
            "--identity" => o.identity = Some(value("--identity")?),
            "--lease-namespace" => o.lease_namespace = Some(value("--lease-namespace")?),
            "--advertise-url" => o.advertise_url = Some(value("--advertise-url")?),
            "--heartbeat" => {
                let v = value("--heartbeat")?;
                o.heartbeat =
                    humantime::parse_duration(&v).with_context(|| format!("--heartbeat {v:?}"))?;
            }
            "--lease-duration" => {
                let v = value("--lease-duration")?;
                o.lease_duration = humantime::parse_duration(&v)
                    .with_context(|| format!("--lease-duration {v:?}"))?;
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
            .context("set --token-file or MODELGATE_PROXY_TOKEN: proxies authenticate with it")?,
    };
    let token = token.trim().to_owned();
    if token.len() < 16 {
        bail!("the proxy token must be at least 16 characters");
    }
    Ok(token)
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let token = read_token(&opts)?;
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (KUBECONFIG or in-cluster config)")?;
    controller::preflight(&client).await?;

    let identity = opts
        .identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| {
            let host =
                std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "operator".into());
            format!("{}-{}", host.trim(), std::process::id())
        });
    let shared = Shared::new(token, identity.clone());
    let config = bind(&opts.config_listen, "config").await?;
    let admin = bind(&opts.admin_listen, "admin").await?;
    let (config_addr, admin_addr) = (config.local_addr()?, admin.local_addr()?);
    let url = opts
        .advertise_url
        .clone()
        .unwrap_or_else(|| match std::env::var("POD_IP") {
            Ok(ip) => format!("http://{ip}:{}", config_addr.port()),
            Err(_) => format!("http://{config_addr}"),
        });
    let namespace = opts
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".into());
    tracing::info!(config = %config_addr, admin = %admin_addr, identity = %identity, lease_namespace = %namespace, "modelgate-operator starting");
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
    tokio::spawn(server::serve_config(config, shared.clone(), opts.heartbeat));
    tokio::spawn(server::serve_admin(admin, shared.clone()));
    tokio::spawn(server::sync_to_leader(shared.clone()));
    tokio::spawn(status::run(
        shared.clone(),
        client.clone(),
        Reporter {
            controller: "modelgate-operator".into(),
            instance: Some(identity.clone()),
        },
    ));
    tokio::spawn(leader::run(
        shared.clone(),
        client,
        leader::Election {
            name: "modelgate-operator".into(),
            namespace,
            identity,
            url,
            duration: opts.lease_duration,
            renew: (opts.lease_duration / 5).max(Duration::from_millis(200)),
        },
    ));
    shutdown_signal().await;
    tracing::info!("shutting down");
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
