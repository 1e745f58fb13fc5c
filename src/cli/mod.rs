//! The `durin` command line.

pub mod admin_client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "durin",
    version,
    about = "Durable-execution gateway for plain HTTP services"
)]
struct Cli {
    /// How logs are written to stderr: `text` for people, `json` (one object per line,
    /// the invocation, attempt, service and handler as fields) for log shippers.
    #[arg(long, global = true, env = "DURIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by `DURIN_LOG` (default `info`); colours only on a terminal.
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("DURIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Invocations, over the admin API.
    Invocations {
        #[command(flatten)]
        connection: admin_client::Connection,
        #[command(subcommand)]
        command: admin_client::Invocations,
    },
    /// Workflows by id.
    Workflows {
        #[command(flatten)]
        connection: admin_client::Connection,
        #[command(subcommand)]
        command: admin_client::Workflows,
    },
    /// Deployments, over the admin API.
    Deployments {
        #[command(flatten)]
        connection: admin_client::Connection,
        #[command(subcommand)]
        command: admin_client::Deployments,
    },
    /// Webhook sources and their deliveries, over the admin API.
    Webhooks {
        #[command(flatten)]
        connection: admin_client::Connection,
        #[command(subcommand)]
        command: admin_client::Webhooks,
    },
    /// Schedules (workflow runs on a cron expression or an interval), over the admin API.
    Schedules {
        #[command(flatten)]
        connection: admin_client::Connection,
        #[command(subcommand)]
        command: admin_client::Schedules,
    },
    /// Replay recorded histories against a deployment, with no side effect, through the
    /// admin API: exit code 0 when all replayed, 4 when one diverged, 5 when one failed.
    Replay(admin_client::Replay),
}

#[derive(Args)]
struct DatabaseArgs {
    /// Database URL, e.g. `sqlite:durin.db` [default: sqlite:durin.db]
    #[arg(long, env = "DURIN_DATABASE_URL")]
    database: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "DURIN_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "DURIN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address of the admin API (deployments, invocations, journals) [default:
    /// 127.0.0.1:9070]
    #[arg(long, env = "DURIN_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// A token the admin API requires as `Authorization: Bearer TOKEN`.
    #[arg(long, env = "DURIN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// URL at which handlers reach this gateway [default: http://{listen}]
    #[arg(long, env = "DURIN_ADVERTISED_URL")]
    advertised_url: Option<String>,
    /// Address of the egress proxy, through which plain handlers make durable calls.
    #[arg(long, env = "DURIN_EGRESS_LISTEN")]
    egress_listen: Option<SocketAddr>,
    /// A host the egress may call (`host`, `host:port` or `*.domain`); repeat for more.
    /// Without any, the egress calls any public host for a running attempt; internal
    /// addresses (loopback, private, link-local) only when named here.
    #[arg(long, env = "DURIN_EGRESS_ALLOW", value_delimiter = ',')]
    egress_allow: Vec<String>,
    /// PEM file of extra root certificates the egress trusts for HTTPS targets.
    #[arg(long, env = "DURIN_EGRESS_CA_FILE")]
    egress_ca_file: Option<PathBuf>,
    /// Base URL of an OTLP/HTTP collector (e.g. `http://127.0.0.1:4318`) to send traces to
    /// (JSON, to `/v1/traces`); without one, no trace is exported.
    #[arg(long, env = "DURIN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// This node's name among the nodes of one PostgreSQL database [default: its
    /// advertised URL]; a node restarted under the same id takes its attempts back at once.
    #[arg(long, env = "DURIN_NODE_ID")]
    node_id: Option<String>,
    /// Attempts that run at once on this node [default: 256]
    #[arg(long, env = "DURIN_MAX_CONCURRENT_ATTEMPTS")]
    max_concurrent_attempts: Option<usize>,
    /// New first attempts that may wait for a slot with their callers' requests open;
    /// past it, callers that wait get a 503 with Retry-After [default: 10000]
    #[arg(long, env = "DURIN_MAX_QUEUED_ATTEMPTS")]
    max_queued_attempts: Option<usize>,
    #[command(flatten)]
    database: DatabaseArgs,
}

impl DatabaseArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(url) = &self.database {
            config.database_url = url.clone();
        }
        Ok(config)
    }
}

/// Entry point of the `durin` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("durin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Invocations {
            connection,
            command,
        } => runtime.block_on(admin_client::invocations(connection, command)),
        Command::Workflows {
            connection,
            command,
        } => runtime.block_on(admin_client::workflows(connection, command)),
        Command::Deployments {
            connection,
            command,
        } => runtime.block_on(admin_client::deployments(connection, command)),
        Command::Replay(command) => runtime.block_on(admin_client::replay(command)),
        Command::Webhooks {
            connection,
            command,
        } => runtime.block_on(admin_client::webhooks(connection, command)),
        Command::Schedules {
            connection,
            command,
        } => runtime.block_on(admin_client::schedules(connection, command)),
        command => match runtime.block_on(run_command(command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("durin: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => {
            let config = args.config()?;
            crate::store::migrate(&config.database_url).await?;
            println!("migrations applied to {}", config.database_url);
            Ok(())
        }
        Command::Serve(args) => {
            let mut config = args.database.config()?;
            if let Some(listen) = args.listen {
                config.listen = listen;
            }
            if let Some(address) = args.admin_listen {
                config.admin_listen = address;
            }
            if let Some(token) = args.admin_token {
                config.admin_token = Some(token.into());
            }
            if let Some(url) = args.advertised_url {
                config.advertised_url = Some(url);
            }
            if let Some(address) = args.egress_listen {
                config.egress_listen = Some(address);
            }
            if !args.egress_allow.is_empty() {
                config.egress_allow = args.egress_allow;
            }
            if let Some(endpoint) = args.otlp_endpoint {
                config.otlp_endpoint = Some(endpoint);
            }
            if let Some(n) = args.max_concurrent_attempts {
                config.max_concurrent_attempts = n.max(1);
            }
            if let Some(n) = args.max_queued_attempts {
                config.max_queued_attempts = n;
            }
            if let Some(node_id) = args.node_id {
                config.node_id = Some(node_id);
            }
            if let Some(file) = args.egress_ca_file {
                config.egress_ca_file = Some(file);
            }
            let listeners = crate::Listeners::bind(&config).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            crate::run(config, listeners, shutdown).await
        }
        Command::Invocations { .. }
        | Command::Workflows { .. }
        | Command::Deployments { .. }
        | Command::Replay(_)
        | Command::Webhooks { .. }
        | Command::Schedules { .. } => {
            anyhow::bail!("not a server command")
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
