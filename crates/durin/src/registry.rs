//! Deployment registration: asks a deployment what it serves and records it.

use std::collections::HashSet;
use std::time::Duration;

use durin_protocol::{Discovery, ServiceSpec, PROTOCOL_VERSION};

use crate::clock::Clock;
use crate::ids::parse_name;
use crate::problem::ApiError;
use crate::store::{DeploymentRecord, HandlerProtocol, NewDeployment, Store};

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

/// Calls `GET {url}/discover`, checks the answer and records the deployment.
pub async fn register(
    store: &dyn Store,
    clock: &dyn Clock,
    http: &reqwest::Client,
    url: &str,
) -> Result<(DeploymentRecord, bool), ApiError> {
    let url = parse_deployment_url(url)?;
    let discovery = discover(http, &url).await?;
    if discovery.protocol != PROTOCOL_VERSION {
        return Err(ApiError::Deployment {
            detail: format!(
                "{url}/discover speaks protocol version {}, this gateway speaks {PROTOCOL_VERSION}",
                discovery.protocol
            ),
            retryable: false,
        });
    }
    validate_services(&discovery.services).map_err(|detail| ApiError::Deployment {
        detail: format!("{url}/discover: {detail}"),
        retryable: false,
    })?;
    let deployment = NewDeployment {
        url,
        protocol: HandlerProtocol::Sdk,
        services: discovery.services,
        now_ms: clock.now_ms(),
    };
    Ok(store.register_deployment(deployment).await?)
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
