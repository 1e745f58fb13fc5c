//! Configuration: defaults, then the TOML file, then environment variables and flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use durin_protocol::RetryPolicy;
use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where the admin API listens (deployments, invocation lists, journals, resume).
    pub admin_listen: SocketAddr,
    /// A token the admin API requires (`Authorization: Bearer`); none when unset.
    pub admin_token: Option<Secret>,
    /// `sqlite:PATH` (the default is `sqlite:durin.db`).
    pub database_url: String,
    /// How handlers reach this gateway; `http://{listen address}` when unset.
    pub advertised_url: Option<String>,
    /// How long an `Idempotency-Key` keeps naming its invocation after the invocation ended.
    pub idempotency_retention: Duration,
    /// How long a journal may grow (entries and bytes); an invocation is warned about from
    /// 80 % of either.
    pub journal_limits: crate::store::JournalLimits,
    /// How long an ended invocation (its journal, state and workflow id) is kept.
    pub retention: Duration,
    /// How long `POST /v1/call` waits for the invocation to end before it answers `202` with
    /// its `Location`.
    pub call_wait: Duration,
    /// The largest request body the gateway accepts.
    pub max_body_bytes: usize,
    /// Retry policy of handlers that declare none.
    pub retry_policy: RetryPolicy,
    /// Bound on one attempt of handlers that declare none.
    pub start_to_close: Duration,
    /// Bound on a whole invocation (from its creation; a workflow run's execution timeout)
    /// of handlers that declare none; none by default.
    pub schedule_to_close: Option<Duration>,
    /// Bound on how late an attempt may start after it was due, for handlers that declare
    /// none; none by default.
    pub schedule_to_start: Option<Duration>,
    /// Heartbeat timeout of handlers that declare none; none by default.
    pub heartbeat_timeout: Option<Duration>,
    /// What an invocation whose retry policy is used up does: fail (the default), or
    /// pause for an operator to fix the cause and resume it.
    pub on_retries_exhausted: RetriesExhausted,
    /// How long a graceful shutdown waits for attempts in flight.
    pub drain_timeout: Duration,
    /// How long a client has to send a request's head, on every listener; also the
    /// longest a keep-alive connection stays idle.
    pub header_read_timeout: Duration,
    /// How long a request body may stop flowing before the request is cut.
    pub body_read_timeout: Duration,
    /// Attempts that run at once on this node (an eighth kept for invocations under way);
    /// new first attempts beyond it wait their turn, in arrival order.
    pub max_concurrent_attempts: usize,
    /// First attempts of new invocations that may wait for a slot, each with its caller's
    /// request held open; past it, a caller that would wait gets a 503 with `Retry-After`.
    pub max_queued_attempts: usize,
    /// Invocations waiting in the store for their first attempt (status `pending`: sends
    /// created due because the queue was full, children, next runs); past it, a caller
    /// that does not wait (`send`, a start without `Prefer: wait`) gets a 503 too.
    pub max_pending_starts: u64,
    /// Deployments registered at start.
    pub deployments: Vec<DeploymentConfig>,
    /// Webhook sources (`POST /v1/webhooks/{source}`).
    pub webhooks: Vec<crate::webhooks::SourceConfig>,
    /// Who may call the main listener, and what each caller may do; off unless keys or a
    /// JWT issuer are given.
    pub auth: crate::auth::AuthConfig,
    /// Schedules by id (`[schedules.nightly]`), set at start; the config manages them.
    pub schedules: std::collections::BTreeMap<String, crate::schedules::ScheduleSpec>,
    /// Where the egress proxy listens; no egress when unset.
    pub egress_listen: Option<SocketAddr>,
    /// Hosts the egress may call (`host`, `host:port`, `*.domain`); empty allows any public
    /// host. Internal addresses are called only when named (not through `*.domain`).
    pub egress_allow: Vec<String>,
    /// Retries of one outbound call through the egress.
    pub egress_retry_policy: RetryPolicy,
    /// Bound on one try of an outbound call.
    pub egress_call_timeout: Duration,
    /// A PEM file of extra root certificates the egress trusts for HTTPS targets (a private
    /// CA), beside the bundled public roots.
    pub egress_ca_file: Option<PathBuf>,
    /// Base URL of an OTLP/HTTP collector (`http://collector:4318`) to export traces to;
    /// none exports nothing.
    pub otlp_endpoint: Option<String>,
    /// This node's name among the nodes of one PostgreSQL database; by default its
    /// advertised URL. A node restarted under the same id takes its unfinished attempts
    /// back at once.
    pub node_id: Option<String>,
    /// How long an attempt a node claimed stays its own without a renewal (PostgreSQL):
    /// the longest another node waits to take over the work of a node that died.
    pub lease: Duration,
    /// Writer connections of a node on PostgreSQL, each group-committing the writes of the
    /// invocations whose ids hash to it: fewer make larger batches (fewer commits, less
    /// database CPU per invocation), more let a database with more cores write in parallel.
    pub database_writers: usize,
}

/// What an invocation whose retry policy is used up does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetriesExhausted {
    /// It fails (its caller gets the last error).
    #[default]
    Fail,
    /// It pauses: an operator fixes the cause and resumes it.
    Pause,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9070)),
            admin_token: None,
            database_url: "sqlite:durin.db".into(),
            advertised_url: None,
            idempotency_retention: Duration::from_secs(24 * 60 * 60),
            call_wait: Duration::from_secs(60),
            retention: Duration::from_secs(7 * 24 * 60 * 60),
            journal_limits: crate::store::JournalLimits::default(),
            max_body_bytes: 1024 * 1024,
            retry_policy: RetryPolicy::default(),
            start_to_close: Duration::from_secs(60),
            schedule_to_close: None,
            schedule_to_start: None,
            heartbeat_timeout: None,
            on_retries_exhausted: RetriesExhausted::Fail,
            drain_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            max_concurrent_attempts: 256,
            max_queued_attempts: 10_000,
            max_pending_starts: 100_000,
            deployments: Vec::new(),
            webhooks: Vec::new(),
            auth: crate::auth::AuthConfig::default(),
            schedules: std::collections::BTreeMap::new(),
            egress_listen: None,
            egress_allow: Vec::new(),
            egress_retry_policy: RetryPolicy {
                initial_interval: Duration::from_millis(100),
                maximum_interval: Duration::from_secs(2),
                maximum_attempts: Some(3),
                ..RetryPolicy::default()
            },
            egress_call_timeout: Duration::from_secs(30),
            egress_ca_file: None,
            otlp_endpoint: None,
            node_id: None,
            lease: Duration::from_secs(10),
            database_writers: crate::store::NodeOptions::default().writers,
        }
    }
}

/// A secret from the configuration: its `Debug` form never shows it, so that logging a
/// configuration leaks nothing.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(secret: &str) -> Secret {
        Secret(secret.to_owned())
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Secret {
        Secret(secret)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub url: String,
    /// Plain HTTP services declared inline (no `/discover`).
    #[serde(default)]
    pub services: Option<Vec<durin_protocol::ServiceSpec>>,
}

/// The TOML file; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    admin_token: Option<String>,
    database: Option<String>,
    advertised_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    idempotency_retention: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    call_wait: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retention: Option<Duration>,
    max_journal_entries: Option<u32>,
    max_journal_bytes: Option<i64>,
    max_body_bytes: Option<usize>,
    retry_policy: Option<RetryPolicy>,
    #[serde(default, with = "humantime_serde")]
    start_to_close: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    schedule_to_close: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    schedule_to_start: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    heartbeat_timeout: Option<Duration>,
    on_retries_exhausted: Option<RetriesExhausted>,
    #[serde(default, with = "humantime_serde")]
    drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    body_read_timeout: Option<Duration>,
    max_concurrent_attempts: Option<usize>,
    max_queued_attempts: Option<usize>,
    max_pending_starts: Option<u64>,
    #[serde(default)]
    deployments: Vec<DeploymentConfig>,
    #[serde(default)]
    webhooks: Vec<crate::webhooks::SourceConfig>,
    #[serde(default)]
    schedules: std::collections::BTreeMap<String, crate::schedules::ScheduleSpec>,
    #[serde(default)]
    auth: crate::auth::AuthConfig,
    egress_listen: Option<SocketAddr>,
    egress_allow: Option<Vec<String>>,
    egress_retry_policy: Option<RetryPolicy>,
    #[serde(default, with = "humantime_serde")]
    egress_call_timeout: Option<Duration>,
    egress_ca_file: Option<PathBuf>,
    otlp_endpoint: Option<String>,
    node_id: Option<String>,
    #[serde(default, with = "humantime_serde")]
    lease: Option<Duration>,
    database_writers: Option<usize>,
}

impl Config {
    /// Defaults overlaid with the file at `path`, if any.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut config = Config::default();
        let Some(path) = path else {
            return Ok(config);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        let file: ConfigFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {} is invalid: {e}", path.display()))?;
        if let Some(v) = file.listen {
            config.listen = v;
        }
        if let Some(v) = file.admin_listen {
            config.admin_listen = v;
        }
        if let Some(v) = file.admin_token {
            config.admin_token = Some(Secret(v));
        }
        if let Some(v) = file.database {
            config.database_url = v;
        }
        if let Some(v) = file.advertised_url {
            config.advertised_url = Some(v);
        }
        if let Some(v) = file.idempotency_retention {
            config.idempotency_retention = v;
        }
        if let Some(v) = file.call_wait {
            config.call_wait = v;
        }
        if let Some(v) = file.retention {
            config.retention = v;
        }
        if let Some(v) = file.max_journal_entries {
            config.journal_limits.max_entries = v.max(2);
        }
        if let Some(v) = file.max_journal_bytes {
            config.journal_limits.max_bytes = v.max(1);
        }
        if let Some(v) = file.max_body_bytes {
            config.max_body_bytes = v;
        }
        if let Some(v) = file.retry_policy {
            v.validate().map_err(|e| {
                anyhow::anyhow!("config file {}: retry_policy: {e}", path.display())
            })?;
            config.retry_policy = v;
        }
        if let Some(v) = file.start_to_close {
            config.start_to_close = v;
        }
        if let Some(v) = file.schedule_to_close {
            config.schedule_to_close = Some(v);
        }
        if let Some(v) = file.schedule_to_start {
            config.schedule_to_start = Some(v);
        }
        if let Some(v) = file.heartbeat_timeout {
            config.heartbeat_timeout = Some(v);
        }
        if let Some(v) = file.on_retries_exhausted {
            config.on_retries_exhausted = v;
        }
        if let Some(v) = file.drain_timeout {
            config.drain_timeout = v;
        }
        if let Some(v) = file.header_read_timeout {
            config.header_read_timeout = v;
        }
        if let Some(v) = file.body_read_timeout {
            config.body_read_timeout = v;
        }
        if let Some(v) = file.max_concurrent_attempts {
            config.max_concurrent_attempts = v.max(1);
        }
        if let Some(v) = file.max_queued_attempts {
            config.max_queued_attempts = v;
        }
        if let Some(v) = file.max_pending_starts {
            config.max_pending_starts = v;
        }
        config.deployments = file.deployments;
        config.webhooks = file.webhooks;
        config.schedules = file.schedules;
        config.auth = file.auth;
        if let Some(v) = file.egress_listen {
            config.egress_listen = Some(v);
        }
        if let Some(v) = file.egress_allow {
            config.egress_allow = v;
        }
        if let Some(v) = file.egress_retry_policy {
            v.validate().map_err(|e| {
                anyhow::anyhow!("config file {}: egress_retry_policy: {e}", path.display())
            })?;
            config.egress_retry_policy = v;
        }
        if let Some(v) = file.egress_call_timeout {
            config.egress_call_timeout = v;
        }
        if let Some(v) = file.egress_ca_file {
            config.egress_ca_file = Some(v);
        }
        if let Some(v) = file.otlp_endpoint {
            config.otlp_endpoint = Some(v);
        }
        if let Some(v) = file.node_id {
            config.node_id = Some(v);
        }
        if let Some(v) = file.lease {
            if v < Duration::from_secs(1) {
                anyhow::bail!("config file {}: lease must be at least 1s", path.display());
            }
            config.lease = v;
        }
        if let Some(v) = file.database_writers {
            if !(1..=64).contains(&v) {
                anyhow::bail!(
                    "config file {}: database_writers must be between 1 and 64",
                    path.display()
                );
            }
            config.database_writers = v;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_in_a_debug_print() {
        let config = Config {
            admin_token: Some("hunter2".into()),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("durin.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:9999"
idempotency_retention = "1h"
start_to_close = "5s"
[retry_policy]
initial_interval = "200ms"
maximum_attempts = 3
[[deployments]]
url = "http://127.0.0.1:9080"
"#,
        )
        .unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.idempotency_retention, Duration::from_secs(3600));
        assert_eq!(config.retry_policy.maximum_attempts, Some(3));
        assert_eq!(config.retry_policy.backoff_coefficient, 2.0);
        assert_eq!(config.deployments[0].url, "http://127.0.0.1:9080");

        std::fs::write(&path, "database_writers = 0\n").unwrap();
        let error = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(error.contains("database_writers"), "{error}");

        std::fs::write(&path, "listn = \"127.0.0.1:1\"\n").unwrap();
        let error = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(error.contains("listn"), "{error}");
    }

    /// The example in README.md is a valid configuration.
    #[test]
    fn the_readme_example_loads() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("The config file")
            .and_then(|i| readme[i..].find("```toml").map(|j| i + j + "```toml".len()))
            .expect("README.md has a TOML config example");
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("durin.toml");
        std::fs::write(&path, block).unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.egress_listen.unwrap().port(), 8081);
        assert_eq!(config.egress_retry_policy.maximum_attempts, Some(3));
        assert_eq!(config.deployments.len(), 2);
        assert!(config.deployments[1].services.is_some());
        assert!(crate::auth::Authenticator::new(&config.auth)
            .unwrap()
            .enabled());
        let nightly = &config.schedules["nightly-approval"];
        nightly.check().unwrap();
        assert_eq!(nightly.start.workflow, "approval");
    }

    #[test]
    fn the_example_configs_load() {
        let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        for file in ["durin.toml", "python/durin.toml"] {
            let path = std::path::Path::new(examples).join(file);
            let config = Config::load(Some(&path)).unwrap();
            assert_eq!(config.deployments.len(), 1, "{file}");
        }
    }
}
