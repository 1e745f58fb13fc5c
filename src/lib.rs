//! Durin: a durable-execution gateway for plain HTTP services.
//!
//! [`run`] is the whole gateway: `main` and the tests both call it with a bound listener and
//! a shutdown token. See ARCHITECTURE.md for the map of the modules.

pub mod api;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod egress;
pub mod engine;
pub mod http;
pub mod ids;
pub mod journal;
pub mod keys;
pub mod lifecycle;
pub mod problem;
pub mod registry;
pub mod replay;
pub mod schedules;
pub mod server;
pub mod signing;
pub mod store;
pub mod telemetry;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::engine::{Engine, EngineConfig};
use crate::journal::awakeable::AwakeableKey;
use crate::store::Store;

/// How often expired idempotency keys and ended invocations are forgotten.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Ended invocations purged in one transaction.
const PURGE_BATCH: u32 = 500;

/// The gateway's two listeners: callers and handlers on `api`, operators on `admin`.
pub struct Listeners {
    pub api: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both addresses of `config`.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let bind = |address| async move {
            durin_sdk::bind(address)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))
        };
        Ok(Listeners {
            api: bind(config.listen).await?,
            admin: bind(config.admin_listen).await?,
        })
    }
}

/// Runs the gateway on `listeners` until `shutdown` is cancelled, then drains.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve(config, listeners, shutdown, None).await
}

/// [`run`] with the clock of the caller's choice (tests move a manual clock by hand).
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<()> {
    serve(config, listeners, shutdown, Some(clock)).await
}

/// Runs the gateway with `clock`, or by default the store's database clock (PostgreSQL:
/// every node compares due times with the database's clock) or the system's.
async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    clock: Option<Arc<dyn Clock>>,
) -> anyhow::Result<()> {
    if config
        .admin_token
        .as_ref()
        .is_some_and(|token| token.expose().trim().is_empty())
    {
        anyhow::bail!("the admin token is empty: give a real one, or none to leave the admin API open to whoever reaches its listener");
    }
    let Listeners {
        api: listener,
        admin: admin_listener,
    } = listeners;
    let local = listener.local_addr()?;
    let advertised_url = config.advertised_url.clone().unwrap_or_else(|| {
        let host = if local.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            local.ip().to_string()
        };
        format!("http://{host}:{}", local.port())
    });
    // A node is named by its advertised URL unless told otherwise: restarted on the same
    // address, it takes its own unfinished attempts back at once.
    let node = store::NodeOptions {
        node_id: config
            .node_id
            .clone()
            .unwrap_or_else(|| advertised_url.clone()),
        lease: config.lease,
        writers: config.database_writers,
    };
    // A source that cannot work stops Durin before anything starts.
    webhooks::check(&config.webhooks).map_err(|e| anyhow::anyhow!("the config's webhooks: {e}"))?;
    let auth = Arc::new(
        auth::Authenticator::new(&config.auth)
            .map_err(|e| anyhow::anyhow!("the config's auth: {e}"))?,
    );
    if !auth.enabled() && !local.ip().is_loopback() {
        tracing::warn!(
            listen = %local,
            "the main listener is reachable beyond this machine and no caller needs credentials: anyone who reaches it may start, signal and cancel any workflow; declare [auth] api_keys or jwt in the config"
        );
    }
    let store = store::open(&config.database_url, config.journal_limits, node)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", config.database_url))?;
    let clock: Arc<dyn Clock> = clock
        .or_else(|| store.database_clock())
        .unwrap_or_else(|| Arc::new(SystemClock));
    // The config's webhook sources are the store's (the admin API sets others).
    let webhooks = Arc::new(webhooks::Webhooks::new(Arc::clone(&store)));
    webhooks
        .sync_config(&config.webhooks, clock.now_ms())
        .await
        .map_err(|e| anyhow::anyhow!("the config's webhooks: {e}"))?;
    let targets = Arc::new(registry::Targets::default());
    let egress_calls = Arc::new(egress::EgressCalls::default());
    let state_cursors = Arc::new(api::StateCursors::default());
    let replays = Arc::new(replay::Replays::default());
    let awakeables = AwakeableKey::new(store.gateway_secret("awakeables").await?);
    let signer = Arc::new(
        signing::RequestSigner::new(&store.gateway_secret("signing").await?)
            .map_err(|e| anyhow::anyhow!("the signing key: {e}"))?,
    );
    // Metrics are recorded from the start (the recorder is the process's).
    telemetry::handle();
    let traces = match &config.otlp_endpoint {
        Some(endpoint) => telemetry::traces::Traces::otlp(endpoint)
            .map_err(|e| anyhow::anyhow!("the OTLP endpoint {endpoint}: {e}"))?,
        None => telemetry::traces::Traces::off(),
    };
    let timeouts = lifecycle::timeouts::TimeoutDefaults {
        schedule_to_close: config.schedule_to_close,
        schedule_to_start: config.schedule_to_start,
        heartbeat: config.heartbeat_timeout,
    };
    let engine = Arc::new(Engine::new(
        Arc::clone(&store),
        Arc::clone(&clock),
        EngineConfig {
            advertised_url: advertised_url.clone(),
            default_retry_policy: config.retry_policy.clone(),
            default_start_to_close: config.start_to_close,
            admission: engine::AdmissionLimits {
                max_concurrent_attempts: config.max_concurrent_attempts,
                max_queued_attempts: config.max_queued_attempts,
                max_pending_starts: config.max_pending_starts,
            },
            journal_limits: config.journal_limits,
            timeouts,
            pause_when_exhausted: config.on_retries_exhausted == config::RetriesExhausted::Pause,
            traces: traces.clone(),
        },
        Arc::clone(&targets),
        vec![
            Arc::clone(&egress_calls) as Arc<dyn engine::AttemptObserver>,
            Arc::clone(&state_cursors) as Arc<dyn engine::AttemptObserver>,
        ],
        engine::EngineKeys {
            awakeables: awakeables.clone(),
            signer: Arc::clone(&signer),
        },
        shutdown.child_token(),
    ));
    // Discovery follows no redirect: a deployment is registered at the URL it was given.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    for deployment in &config.deployments {
        tokio::spawn(register_until_done(
            Arc::clone(&store),
            Arc::clone(&targets),
            Arc::clone(&clock),
            http.clone(),
            deployment.clone(),
            shutdown.clone(),
        ));
    }
    let recovered = engine.recover().await?;
    if recovered > 0 {
        tracing::info!(recovered, "attempts cut short by the last stop run again");
    }
    let schedules = Arc::new(schedules::Schedules::new(
        Arc::clone(&store),
        Arc::clone(&engine),
        Arc::clone(&targets),
        Arc::clone(&clock),
        timeouts,
    ));
    schedules
        .sync_config(&config.schedules)
        .await
        .map_err(|e| anyhow::anyhow!("the config's schedules: {e}"))?;
    let scheduler = engine.start_scheduler();
    tokio::spawn(Arc::clone(&schedules).run(shutdown.clone()));
    let deadlines = engine.start_deadlines();
    let cluster_events = engine.start_cluster_events();
    tokio::spawn(purge(
        Arc::clone(&store),
        Arc::clone(&clock),
        // An ended invocation is kept at least as long as its idempotency key names it.
        i64::try_from(
            config
                .retention
                .max(config.idempotency_retention)
                .as_millis(),
        )
        .unwrap_or(i64::MAX),
        shutdown.clone(),
    ));
    // Cancelled after the drain; the servers stop then, waiting callers get a 503.
    let server_stop = CancellationToken::new();
    let read_timeouts = server::ReadTimeouts {
        header: config.header_read_timeout,
        body: config.body_read_timeout,
    };
    let egress_server = match config.egress_listen {
        Some(address) => {
            let listener = durin_sdk::bind(address)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {address} for the egress: {e}"))?;
            let extra_roots = match &config.egress_ca_file {
                Some(file) => {
                    let pem = std::fs::read(file).map_err(|e| {
                        anyhow::anyhow!("cannot read egress_ca_file {}: {e}", file.display())
                    })?;
                    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                        anyhow::anyhow!("egress_ca_file {} is not PEM: {e}", file.display())
                    })?
                }
                None => Vec::new(),
            };
            let egress = Arc::new(egress::Egress::new(
                Arc::clone(&store),
                Arc::clone(&clock),
                Arc::clone(&engine),
                egress_calls,
                Arc::clone(&replays),
                egress::EgressConfig {
                    allow: config.egress_allow.clone(),
                    max_body_bytes: config.max_body_bytes,
                    retry_policy: config.egress_retry_policy.clone(),
                    call_timeout: config.egress_call_timeout,
                    extra_roots,
                },
            )?);
            println!(
                "durin egress listening on http://{}",
                listener.local_addr()?
            );
            // Attempts draining at a shutdown still need the egress: it stops with the
            // main server, after the drain.
            Some(tokio::spawn(server::serve(
                listener,
                egress.router(),
                read_timeouts,
                server_stop.clone(),
            )))
        }
        None => None,
    };
    // The server outlives the drivers during a shutdown: attempts in flight still need the
    // context API to finish. Callers waiting on an invocation are answered 503 when it stops.
    let state = api::AppState::new(api::Shared {
        store,
        targets,
        engine: Arc::clone(&engine),
        clock,
        awakeables,
        signer: Arc::clone(&signer),
        state_cursors,
        replays,
        webhooks: Arc::clone(&webhooks),
        schedules,
        auth,
        http,
        idempotency_retention: config.idempotency_retention,
        call_wait: config.call_wait,
        journal_limits: config.journal_limits,
        timeouts,
        max_body_bytes: config.max_body_bytes,
        stopping: server_stop.clone(),
    });
    engine.set_stream_appender(Arc::new(api::context::StreamAppends::new(&state)));
    // Tests and scripts read these lines to learn the ports when listening on port 0; the
    // admin line comes first.
    println!("durin signing key ed25519:{}", signer.public_key());
    println!(
        "durin admin listening on http://{}",
        admin_listener.local_addr()?
    );
    println!("durin listening on http://{local} (advertised as {advertised_url})");
    let admin_server = tokio::spawn(server::serve(
        admin_listener,
        api::admin_router(
            state.clone(),
            config.admin_token.as_ref().map(|t| t.expose().to_owned()),
        ),
        read_timeouts,
        server_stop.clone(),
    ));
    let main_router = api::router(state);
    // A webhook is served as the request a caller would have sent, by this router.
    webhooks.serve_through(main_router.clone());
    let server = tokio::spawn(server::serve(
        listener,
        main_router,
        read_timeouts,
        server_stop.clone(),
    ));
    shutdown.cancelled().await;
    engine.drain(config.drain_timeout).await;
    scheduler.await?;
    deadlines.await?;
    if let Some(cluster_events) = cluster_events {
        cluster_events.await?;
    }
    server_stop.cancel();
    server.await?;
    admin_server.await?;
    webhooks.stop();
    if let Some(egress_server) = egress_server {
        egress_server.await?;
    }
    // The last spans go out before the process ends (the exporter blocks on its thread).
    if traces.enabled() {
        tokio::task::spawn_blocking(move || traces.shutdown()).await?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Registers a deployment of the config file, trying again while it cannot be reached (it
/// may start after the gateway).
async fn register_until_done(
    store: Arc<dyn Store>,
    targets: Arc<registry::Targets>,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    deployment: config::DeploymentConfig,
    shutdown: CancellationToken,
) {
    let url = &deployment.url;
    let mut pause = Duration::from_millis(250);
    loop {
        let inline = deployment.services.clone();
        match registry::register(&*store, &targets, &*clock, &http, url, inline).await {
            Ok((deployment, _)) => {
                tracing::info!(%url, id = %deployment.id, "deployment registered");
                return;
            }
            Err(error) if error.is_retryable() => {
                tracing::warn!(%url, %error, "deployment not reachable yet; trying again");
            }
            Err(error) => {
                tracing::error!(%url, %error, "deployment refused");
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Forgets, every [`PURGE_INTERVAL`], the idempotency keys whose retention ended and the
/// ended invocations older than `retention_ms`.
async fn purge(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    retention_ms: i64,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PURGE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        match store.purge_idempotency_keys(clock.now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(n, "forgot expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "could not purge idempotency keys"),
        }
        // Ended invocations past their retention, a batch per transaction so that the
        // writer is never held long.
        let cutoff = clock.now_ms().saturating_sub(retention_ms);
        loop {
            match store.purge_ended(cutoff, PURGE_BATCH).await {
                Ok(n) if n == u64::from(PURGE_BATCH) => continue,
                Ok(0) => break,
                Ok(n) => {
                    tracing::debug!(n, "purged ended invocations");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not purge ended invocations");
                    break;
                }
            }
        }
    }
}
