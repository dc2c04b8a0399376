//! `meridian`: parse the command line, set up logging, load and validate the configuration,
//! run the node, map failure to an exit code. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meridian_node::App;
use meridian_node::config::{self, ProcessEnv};

mod admin_cli;
mod dev_cluster;

use admin_cli::AdminCommand;

/// mimalloc: the request path allocates many small, short-lived buffers across threads, where
/// glibc's allocator showed up as ~15% of the node's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Meridian: a distributed LLM router"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[allow(clippy::large_enum_variant)] // parsed once per run: size is irrelevant
#[derive(Subcommand)]
enum Command {
    /// Run a node. Without --config, runs the embedded default (demo model on 127.0.0.1:8080).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (with MERIDIAN_… overrides applied) and exit.
    CheckConfig { file: PathBuf },
    /// The cluster's certificates (a CA, and one certificate per node, for mutual TLS).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// For trying Meridian on one machine.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Operator commands against a node's admin API.
    Admin {
        #[arg(long, default_value = "http://127.0.0.1:50052")]
        addr: String,
        /// The admin token (default: read from --token-file).
        #[arg(long, env = "MERIDIAN_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The node's token file, when --token is not given.
        #[arg(long, default_value = "./meridian-data/admin.token")]
        token_file: PathBuf,
        /// The CA certificate that signed the admin API's TLS certificate (for an `https://`
        /// address; the cluster's `ca.crt` when the node serves it with `tls_from_cluster`).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// The name the admin API's certificate must hold (default: the address's host; a
        /// node's cluster certificate names `node-<id>.meridian`).
        #[arg(long)]
        tls_name: Option<String>,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// A local cluster in one command: certificates, configs and N nodes on 127.0.0.1 serving
    /// the demo model, with an admin token and an API key printed; Ctrl-C stops them all.
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// Where the certificates, configs, data and logs go (kept between runs).
        #[arg(long, default_value = "./meridian-dev-cluster")]
        dir: PathBuf,
        /// Node N listens on HTTP BASE+N, gRPC BASE+100+N, admin BASE+200+N, Raft BASE+300+2N.
        #[arg(long, default_value_t = 18000)]
        port_base: u16,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the cluster CA: its certificate `ca.crt` in DIR, its private key apart at CA_KEY
    /// (default: beside DIR, `DIR-ca.key`), never in DIR — DIR goes to the nodes, the CA key
    /// stays with whoever issues certificates. Never overwrites.
    Init {
        #[arg(long, default_value = "./meridian-certs")]
        dir: PathBuf,
        #[arg(long)]
        ca_key: Option<PathBuf>,
    },
    /// Issue node NODE's certificate (`node-NODE.crt`, `.key`) into DIR, signed with the CA key
    /// at CA_KEY (default: `DIR-ca.key`).
    Issue {
        node: u64,
        #[arg(long, default_value = "./meridian-certs")]
        dir: PathBuf,
        #[arg(long)]
        ca_key: Option<PathBuf>,
        /// Extra DNS names or IP addresses the certificate is valid for (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Before any thread: it clears the protocol's variables from the environment.
    meridian_node::handover::capture();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(meridian_node::logs::Stderr)
        .init();
    if let Err(e) = meridian_node::skew::follow_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => serve(config).await,
        Command::CheckConfig { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let c = config::load(Some(&text), &ProcessEnv)?;
            println!(
                "{}: ok ({} provider(s), {} model(s))",
                file.display(),
                c.providers.len(),
                c.providers.iter().map(|p| p.models.len()).sum::<usize>()
            );
            Ok(())
        }
        Command::Certs { command } => {
            match command {
                CertsCommand::Init { dir, ca_key } => {
                    let ca_key =
                        ca_key.unwrap_or_else(|| meridian_cluster::certs::ca_key_beside(&dir));
                    meridian_cluster::certs::init_ca(&dir, &ca_key)?;
                    println!(
                        "cluster CA certificate written to {}; its private key to {} (mode 0600). \
                         Give the nodes {} (ca.crt and each node's own node-N files); keep the \
                         CA key off them: `certs issue` needs it, a node never does.",
                        dir.join("ca.crt").display(),
                        ca_key.display(),
                        dir.display()
                    );
                }
                CertsCommand::Issue {
                    node,
                    dir,
                    ca_key,
                    hosts,
                } => {
                    let ca_key =
                        ca_key.unwrap_or_else(|| meridian_cluster::certs::ca_key_beside(&dir));
                    meridian_cluster::certs::issue(&dir, &ca_key, node, &hosts)?;
                    println!(
                        "certificate for {} written to {}",
                        meridian_cluster::certs::node_name(node),
                        dir.display()
                    );
                }
            }
            Ok(())
        }
        Command::Admin {
            addr,
            token,
            token_file,
            ca_cert,
            tls_name,
            command,
        } => {
            let tls = admin_cli::Tls { ca_cert, tls_name };
            admin_cli::run(addr, token, token_file, tls, command).await
        }
        Command::Dev {
            command:
                DevCommand::Cluster {
                    nodes,
                    dir,
                    port_base,
                },
        } => dev_cluster::run(nodes, dir, port_base).await,
    }
}

async fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    let text = match &path {
        Some(p) => Some(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        None => None,
    };
    let config = config::load(text.as_deref(), &ProcessEnv)?;
    let mut app = App::build(config).await?;
    if let Some(p) = &path {
        app.reload_from(p.clone());
    }
    // Secrets made at this start come first, then the readiness line (scripts read the bound
    // addresses from it, and may stop reading there).
    // Printed only to a person at a terminal: output a service manager keeps (a journal, a log
    // file) would keep them. Otherwise they are in files only this user can read.
    let first = app.first_start();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let admin_token_file = app.data_dir().join("admin.token");
    if let Some(token) = &first.admin_token {
        if terminal {
            println!("admin token (saved in the data directory as admin.token): {token}");
        } else {
            println!(
                "admin token made and saved in {} (readable by this user only; not printed: standard output is not a terminal)",
                admin_token_file.display()
            );
        }
    }
    if let Some(key) = &first.dev_key {
        if terminal {
            println!(
                "development API key for tenant `dev` (shown once, not stored): {key}\n  try: curl -s http://{}/v1/chat/completions -H 'content-type: application/json' \
                 -H 'authorization: Bearer {key}' \
                 -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'",
                app.http_addr()
            );
        } else {
            let saved = meridian_node::app::save_secret(app.data_dir(), "dev.key", key)
                .with_context(|| "cannot write the development API key to the data directory")?;
            println!(
                "development API key for tenant `dev` written to {} (readable by this user only; not printed: standard output is not a terminal)",
                saved.display()
            );
        }
    } else if path.is_none() {
        println!(
            "requests need an API key: `meridian admin key create dev` makes one (the development key was shown on first start)"
        );
    }
    // The readiness line: tests and scripts read the bound addresses from it.
    println!(
        "meridian ready http={} grpc={} admin={}",
        app.http_addr(),
        app.grpc_addr(),
        app.admin_addr()
    );
    app.run(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the node with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
