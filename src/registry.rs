//! Deployment registration: asks a deployment what it serves and records it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use durin_protocol::{Discovery, ServiceKind, ServiceSpec, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use crate::clock::Clock;
use crate::ids::parse_name;
use crate::problem::ApiError;
use crate::store::{
    DeploymentRecord, HandlerProtocol, HandlerTarget, NewDeployment, Store, StoreResult,
};

const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_DISCOVERY_BYTES: usize = 1024 * 1024;

/// Checks that `url` is an absolute http(s) URL with no query or fragment, and returns it
/// without a trailing slash.
pub fn parse_deployment_url(url: &str) -> Result<String, ApiError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ApiError::BadRequest(format!("deployment url {url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ApiError::BadRequest(format!(
            "deployment url {url:?} must be an http:// or https:// URL with a host"
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ApiError::BadRequest(format!(
            "deployment url {url:?} must not have a query or a fragment"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// How long the newest deployment of a handler is taken from the cache; another node may
/// register a newer one.
const LATEST_TTL: Duration = Duration::from_secs(1);

/// Handler targets, cached in front of the store. A deployment never changes, so a pinned
/// target is cached for good; which deployment is the newest for a handler changes when one
/// is registered, so that answer is dropped at every local registration and kept at most
/// [`LATEST_TTL`].
#[derive(Default)]
pub struct Targets {
    pinned: Mutex<HashMap<(String, String, String), HandlerTarget>>,
    latest: Mutex<HashMap<(String, String), (HandlerTarget, Instant)>>,
}

impl Targets {
    /// The handler in the newest deployment that serves it.
    pub async fn latest(
        &self,
        store: &dyn Store,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        let key = (service.to_owned(), handler.to_owned());
        if let Some((target, at)) = lock(&self.latest).get(&key) {
            if at.elapsed() < LATEST_TTL {
                return Ok(Some(target.clone()));
            }
        }
        let found = store.latest_handler(service, handler).await?;
        if let Some(target) = &found {
            lock(&self.latest).insert(key, (target.clone(), Instant::now()));
        }
        Ok(found)
    }

    /// The handler in one given deployment.
    pub async fn pinned(
        &self,
        store: &dyn Store,
        deployment_id: &str,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        let key = (
            deployment_id.to_owned(),
            service.to_owned(),
            handler.to_owned(),
        );
        if let Some(target) = lock(&self.pinned).get(&key) {
            return Ok(Some(target.clone()));
        }
        let found = store
            .deployment_handler(deployment_id, service, handler)
            .await?;
        if let Some(target) = &found {
            lock(&self.pinned).insert(key, target.clone());
        }
        Ok(found)
    }

    /// Forgets which deployment is the newest for each handler (one was registered or
    /// activated).
    pub fn forget_latest(&self) {
        lock(&self.latest).clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a deployment. With `inline` services it is a plain HTTP deployment, declared
/// here; without, Durin asks `GET {url}/discover` and it speaks the handler protocol.
pub async fn register(
    store: &dyn Store,
    targets: &Targets,
    clock: &dyn Clock,
    http: &reqwest::Client,
    url: &str,
    inline: Option<Vec<ServiceSpec>>,
) -> Result<(DeploymentRecord, bool), ApiError> {
    let described = describe(http, url, inline).await?;
    record(store, targets, clock, described, true).await
}

/// Records a deployment [`describe`] described, `active` or not (new invocations go only
/// to active deployments). Registering the newest deployment at its URL again changes
/// nothing, except that registering it active activates it.
pub async fn record(
    store: &dyn Store,
    targets: &Targets,
    clock: &dyn Clock,
    (url, protocol, services): (String, HandlerProtocol, Vec<ServiceSpec>),
    active: bool,
) -> Result<(DeploymentRecord, bool), ApiError> {
    let deployment = NewDeployment {
        url,
        protocol,
        services,
        now_ms: clock.now_ms(),
        active,
    };
    let registered = store.register_deployment(deployment).await?;
    targets.forget_latest();
    Ok(registered)
}

/// What a deployment at `url` serves and how it is called: its inline services (plain),
/// or its discovery document (SDK), checked, without recording anything.
pub async fn describe(
    http: &reqwest::Client,
    url: &str,
    inline: Option<Vec<ServiceSpec>>,
) -> Result<(String, HandlerProtocol, Vec<ServiceSpec>), ApiError> {
    let url = parse_deployment_url(url)?;
    let (protocol, services) = match inline {
        Some(services) => {
            validate_services(&services).map_err(ApiError::BadRequest)?;
            (HandlerProtocol::Plain, services)
        }
        None => {
            let discovery = discover(http, &url).await?;
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&discovery.protocol) {
                return Err(ApiError::Deployment {
                    detail: format!(
                        "{url}/discover speaks protocol version {}, this gateway speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
                        discovery.protocol
                    ),
                    retryable: false,
                });
            }
            validate_services(&discovery.services).map_err(|detail| ApiError::Deployment {
                detail: format!("{url}/discover: {detail}"),
                retryable: false,
            })?;
            let version = discovery.protocol;
            (HandlerProtocol::Sdk { version }, discovery.services)
        }
    };
    Ok((url, protocol, services))
}

async fn discover(http: &reqwest::Client, url: &str) -> Result<Discovery, ApiError> {
    let endpoint = format!("{url}/discover");
    let unreachable = |e: reqwest::Error| ApiError::Deployment {
        detail: format!("GET {endpoint} failed: {e}"),
        retryable: true,
    };
    let mut response = http
        .get(&endpoint)
        .timeout(DISCOVERY_TIMEOUT)
        .send()
        .await
        .map_err(unreachable)?;
    if !response.status().is_success() {
        return Err(ApiError::Deployment {
            detail: format!("GET {endpoint} answered {}", response.status()),
            retryable: response.status().is_server_error(),
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_DISCOVERY_BYTES {
            return Err(ApiError::Deployment {
                detail: format!("GET {endpoint} answered more than {MAX_DISCOVERY_BYTES} bytes"),
                retryable: false,
            });
        }
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::Deployment {
        detail: format!("GET {endpoint} answered something that is not a discovery document: {e}"),
        retryable: false,
    })
}

fn validate_services(services: &[ServiceSpec]) -> Result<(), String> {
    if services.is_empty() {
        return Err("the deployment declares no service".into());
    }
    let mut seen = HashSet::new();
    for service in services {
        parse_name("service", &service.name)?;
        if !seen.insert(service.name.as_str()) {
            return Err(format!("service {:?} is declared twice", service.name));
        }
        // A key's places are the service's: its handlers that hold keys agree on how many.
        let mut limits = service
            .handlers
            .iter()
            .filter_map(|h| h.key.as_ref().filter(|k| !k.shared).map(|k| k.limit));
        if let Some(first) = limits.next() {
            if let Some(other) = limits.find(|l| *l != first) {
                return Err(format!(
                    "service {}: its keyed handlers share each key's places, so they declare one key.limit, not {first} and {other}",
                    service.name
                ));
            }
        }
        let mut handlers = HashSet::new();
        for handler in &service.handlers {
            parse_name("handler", &handler.name)?;
            if !handlers.insert(handler.name.as_str()) {
                return Err(format!(
                    "handler {}/{} is declared twice",
                    service.name, handler.name
                ));
            }
            if let Some(path) = &handler.path {
                if !path.starts_with('/') {
                    return Err(format!(
                        "handler {}/{}: path {path:?} must start with '/'",
                        service.name, handler.name
                    ));
                }
            }
            if let Some(key) = &handler.key {
                if service.kind == ServiceKind::Workflow {
                    return Err(format!(
                        "handler {}/{}: a workflow's runs are one per workflow id already; key is for services",
                        service.name, handler.name
                    ));
                }
                key.validate()
                    .map_err(|e| format!("handler {}/{}: {e}", service.name, handler.name))?;
            }
            if let Some(policy) = &handler.retry_policy {
                policy.validate().map_err(|e| {
                    format!(
                        "handler {}/{}: retry_policy: {e}",
                        service.name, handler.name
                    )
                })?;
            }
        }
    }
    Ok(())
}
