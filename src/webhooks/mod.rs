//! Webhook ingress: `POST /v1/webhooks/{source}` for the sources the config declares and
//! the admin API sets, kept in the store (so every node serves each, and a restart keeps
//! them).
//! A delivery is verified by its source's scheme (`verify.rs`), its event id and type are
//! read (a header or a JSON pointer into the body), and it is routed to what a caller
//! would have asked for: start a workflow by an id taken from the event, signal one (or
//! signal-with-start), or send to a handler. The route's request is made to the main
//! router itself, with the event id as its `Idempotency-Key` (a start is idempotent by its
//! workflow id), so every rule of those routes holds and a provider's redelivery is
//! answered the same, marked as a duplicate. Durin answers as soon as the work is durable,
//! never after it ran. Each source's recent deliveries are kept in the store for operators.

pub mod verify;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, Request};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::problem::ApiError;
use crate::store::{Store, StoreError, WebhookSourceRow};
use verify::Scheme;

/// How many deliveries each source keeps for operators.
pub const KEPT_DELIVERIES: u32 = 200;
/// How many refused deliveries a source keeps a second, on each node.
pub const KEPT_REFUSALS_PER_SECOND: u32 = 10;

/// A source as the config file (`[[webhooks]]`) or the admin API
/// (`PUT /v1/webhooks/{source}`) declares it. Its `Debug` hides the secrets.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The name in `POST /v1/webhooks/{source}` (the admin API takes it from its path).
    #[serde(default)]
    pub source: String,
    /// `standard-webhooks`, `stripe`, `github`, `slack` or `hmac`.
    pub scheme: String,
    /// Its signing secrets: one, or two while one is rotated.
    pub secrets: Vec<String>,
    /// `hmac`: the header that carries the hex signature, and what precedes it.
    pub header: Option<String>,
    pub prefix: Option<String>,
    /// How far from now a signed timestamp may be (replays are refused): 5 minutes.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub tolerance: Option<Duration>,
    /// Where the event's id is (`/json/pointer` or `header:Name`); each scheme has one.
    pub event_id: Option<String>,
    /// Where the event's type is; each scheme has one.
    pub event_type: Option<String>,
    /// Where events go, the first whose `type` matches.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("source", &self.source)
            .field("scheme", &self.scheme)
            .field("secrets", &format!("{} redacted", self.secrets.len()))
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

/// Where an event goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Only events of this type (absent or `*`: any).
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Start a run of this workflow, whose id is at `id`, with the event as its input.
    pub start: Option<String>,
    /// Send this signal (the event as its payload) to the workflow `workflow` whose id is
    /// at `id`; with `with_start`, start the run if none goes on.
    pub signal: Option<String>,
    pub workflow: Option<String>,
    #[serde(default)]
    pub with_start: bool,
    /// Send the event to this handler (`service/handler`).
    pub send: Option<String>,
    /// Where the workflow id is (`/json/pointer` or `header:Name`).
    pub id: Option<String>,
}

/// Where a value of the event is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Header(String),
    Pointer(String),
}

impl Place {
    fn parse(what: &str, text: &str) -> Result<Place, String> {
        if let Some(name) = text.strip_prefix("header:") {
            return Ok(Place::Header(name.trim().to_ascii_lowercase()));
        }
        if text.starts_with('/') {
            return Ok(Place::Pointer(text.to_owned()));
        }
        Err(format!(
            "{what} {text:?} is neither a JSON pointer (/…) nor header:Name"
        ))
    }

    fn describe(&self) -> String {
        match self {
            Place::Header(name) => format!("header {name}"),
            Place::Pointer(pointer) => format!("JSON pointer {pointer}"),
        }
    }

    /// The value there, as text.
    fn read(&self, headers: &HeaderMap, body: Option<&Value>) -> Option<String> {
        match self {
            Place::Header(name) => headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            Place::Pointer(pointer) => match body?.pointer(pointer)? {
                Value::String(text) => Some(text.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            },
        }
    }
}

/// What a route does.
#[derive(Debug, Clone)]
enum Action {
    Start {
        workflow: String,
    },
    Signal {
        workflow: String,
        signal: String,
        with_start: bool,
    },
    Send {
        target: String,
    },
}

#[derive(Debug, Clone)]
struct Route {
    event_type: Option<String>,
    action: Action,
    id: Option<Place>,
}

/// A source, checked.
pub struct Source {
    name: String,
    scheme: Scheme,
    keys: Vec<Vec<u8>>,
    tolerance_s: i64,
    event_id: Option<Place>,
    event_type: Option<Place>,
    routes: Vec<Route>,
}

/// One delivery, as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub at_ms: i64,
    /// `accepted`, `duplicate`, `ignored` (no route for its type) or `refused`.
    pub outcome: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Source {
    /// Checks a declared source.
    pub fn new(config: &SourceConfig) -> Result<Source, String> {
        let name = crate::ids::parse_name("webhook source", &config.source)?;
        let what = |text: String| format!("webhook source {name:?}: {text}");
        let scheme = match config.scheme.as_str() {
            "standard-webhooks" => Scheme::StandardWebhooks,
            "stripe" => Scheme::Stripe,
            "github" => Scheme::Github,
            "slack" => Scheme::Slack,
            "hmac" => Scheme::Hmac {
                header: config
                    .header
                    .clone()
                    .ok_or_else(|| what("the hmac scheme needs `header`".into()))?,
                prefix: config.prefix.clone().unwrap_or_default(),
            },
            other => {
                return Err(what(format!(
                    "unknown scheme {other:?} (standard-webhooks, stripe, github, slack or hmac)"
                )))
            }
        };
        if !matches!(scheme, Scheme::Hmac { .. })
            && (config.header.is_some() || config.prefix.is_some())
        {
            return Err(what("`header` and `prefix` are for the hmac scheme".into()));
        }
        if config.secrets.is_empty() || config.secrets.len() > 2 {
            return Err(what(
                "`secrets` holds one secret, or two while one is rotated".into(),
            ));
        }
        let keys = scheme.keys(&config.secrets).map_err(what)?;
        let (default_id, default_type) = match scheme {
            Scheme::StandardWebhooks => (Some("header:webhook-id"), Some("/type")),
            Scheme::Stripe => (Some("/id"), Some("/type")),
            Scheme::Github => (
                Some("header:x-github-delivery"),
                Some("header:x-github-event"),
            ),
            Scheme::Slack => (Some("/event_id"), Some("/event/type")),
            Scheme::Hmac { .. } => (None, None),
        };
        let place = |what_: &str, given: &Option<String>, default: Option<&str>| {
            given
                .as_deref()
                .or(default)
                .map(|text| Place::parse(what_, text))
                .transpose()
                .map_err(&what)
        };
        let event_id = place("event_id", &config.event_id, default_id)?;
        let event_type = place("event_type", &config.event_type, default_type)?;
        let routes = config
            .routes
            .iter()
            .map(|route| Route::new(route).map_err(&what))
            .collect::<Result<Vec<_>, _>>()?;
        if routes.is_empty() {
            return Err(what("it has no route: where would its events go?".into()));
        }
        Ok(Source {
            name,
            scheme,
            keys,
            tolerance_s: config
                .tolerance
                .unwrap_or(Duration::from_secs(300))
                .as_secs() as i64,
            event_id,
            event_type,
            routes,
        })
    }
}

impl Route {
    fn new(config: &RouteConfig) -> Result<Route, String> {
        let actions = [
            config.start.is_some(),
            config.signal.is_some(),
            config.send.is_some(),
        ];
        if actions.iter().filter(|a| **a).count() != 1 {
            return Err("a route does one of `start`, `signal` or `send`".into());
        }
        let id = config
            .id
            .as_deref()
            .map(|text| Place::parse("id", text))
            .transpose()?;
        let action = if let Some(workflow) = &config.start {
            Action::Start {
                workflow: crate::ids::parse_name("workflow", workflow)?,
            }
        } else if let Some(signal) = &config.signal {
            let workflow = config
                .workflow
                .as_deref()
                .ok_or("a `signal` route names its `workflow`")?;
            Action::Signal {
                workflow: crate::ids::parse_name("workflow", workflow)?,
                signal: crate::ids::parse_name("signal", signal)?,
                with_start: config.with_start,
            }
        } else {
            let target = config.send.clone().unwrap_or_default();
            let Some((service, handler)) = target.split_once('/') else {
                return Err(format!("`send` is service/handler, not {target:?}"));
            };
            crate::ids::parse_name("service", service)?;
            crate::ids::parse_name("handler", handler)?;
            Action::Send { target }
        };
        match (&action, &id) {
            (Action::Send { .. }, Some(_)) => {
                return Err("a `send` route takes no `id`".into());
            }
            (Action::Start { .. } | Action::Signal { .. }, None) => {
                return Err("a route to a workflow says where its `id` is".into());
            }
            _ => {}
        }
        if config.with_start && config.signal.is_none() {
            return Err("`with_start` is for a `signal` route".into());
        }
        Ok(Route {
            event_type: config.event_type.clone().filter(|t| t != "*"),
            action,
            id,
        })
    }
}

/// Who set a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The admin API or the CLI.
    Api,
    /// The config file: changed and removed only there.
    Config,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Api => "api",
            Origin::Config => "config",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("no webhook source is named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("webhook source {0:?} is declared in the config file: change or remove it there")]
    Managed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks the sources a config file declares (before anything starts).
pub fn check(configs: &[SourceConfig]) -> Result<(), String> {
    let mut names = HashSet::new();
    for config in configs {
        let source = Source::new(config)?;
        if !names.insert(source.name) {
            return Err(format!(
                "webhook source {:?} is declared twice",
                config.source
            ));
        }
    }
    Ok(())
}

/// The webhook sources (in the store), and the main router their deliveries are routed
/// through (set once it is built, since it serves the webhook route itself, and dropped
/// when the server stops, since it holds these).
pub struct Webhooks {
    store: Arc<dyn Store>,
    /// Sources built from their stored declaration, by name, with that declaration (a
    /// changed one is built again, however soon it changed).
    built: Mutex<HashMap<String, (String, Arc<Source>)>>,
    /// Per source, the second (Unix) and how many refused deliveries were kept in it.
    refusals: Mutex<HashMap<String, (i64, u32)>>,
    router: Mutex<Option<Router>>,
}

impl Webhooks {
    pub fn new(store: Arc<dyn Store>) -> Webhooks {
        Webhooks {
            store,
            built: Mutex::default(),
            refusals: Mutex::default(),
            router: Mutex::default(),
        }
    }

    fn router(&self) -> std::sync::MutexGuard<'_, Option<Router>> {
        self.router.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The main router, once built.
    pub fn serve_through(&self, router: Router) {
        *self.router() = Some(router);
    }

    /// Drops the main router (the server stopped).
    pub fn stop(&self) {
        self.router().take();
    }

    /// Every source, by name.
    pub async fn sources(&self) -> Result<Vec<WebhookSourceRow>, WebhookError> {
        Ok(self.store.list_webhook_sources().await?)
    }

    /// Source `name`'s row.
    pub async fn source(&self, name: &str) -> Result<WebhookSourceRow, WebhookError> {
        self.store
            .get_webhook_source(name)
            .await?
            .ok_or_else(|| WebhookError::NotFound(name.to_owned()))
    }

    /// Up to `limit` of source `name`'s latest deliveries, newest first.
    pub async fn deliveries(&self, name: &str, limit: u32) -> Result<Vec<Delivery>, WebhookError> {
        let rows = self.store.webhook_deliveries(name, limit).await?;
        Ok(rows
            .iter()
            .filter_map(|row| serde_json::from_str(row).ok())
            .collect())
    }

    /// Creates or replaces source `name` (`config.source` is set to it): whether it is
    /// new. A source the config declares is changed only by the config (whose sync
    /// takes over an API source of the same name).
    pub async fn set(
        &self,
        name: &str,
        mut config: SourceConfig,
        origin: Origin,
        now_ms: i64,
    ) -> Result<bool, WebhookError> {
        if !config.source.is_empty() && config.source != name {
            return Err(WebhookError::Invalid(format!(
                "the body names source {:?}, the path {name:?}",
                config.source
            )));
        }
        config.source = name.to_owned();
        Source::new(&config).map_err(WebhookError::Invalid)?;
        let text =
            serde_json::to_string(&config).map_err(|e| WebhookError::Invalid(e.to_string()))?;
        let name = name.to_owned();
        let set = self
            .store
            .write(&format!("webhook:{name}"), move |tx| {
                Box::pin(async move {
                    let existing = tx.lock_webhook_source(&name).await?;
                    if origin == Origin::Api
                        && existing.as_ref().is_some_and(|row| row.origin == "config")
                    {
                        return Ok(None);
                    }
                    let row = WebhookSourceRow {
                        created_at_ms: existing.as_ref().map_or(now_ms, |row| row.created_at_ms),
                        name,
                        origin: origin.as_str().into(),
                        config: text,
                        updated_at_ms: now_ms,
                    };
                    tx.put_webhook_source(&row).await?;
                    Ok(Some(existing.is_none()))
                })
            })
            .await?;
        set.ok_or_else(|| WebhookError::Managed(config.source))
    }

    /// Deletes source `name` and its deliveries (the work they started goes on).
    pub async fn delete(&self, name: &str, origin: Origin) -> Result<(), WebhookError> {
        let source = name.to_owned();
        let deleted = self
            .store
            .write(&format!("webhook:{name}"), move |tx| {
                Box::pin(async move {
                    match tx.lock_webhook_source(&source).await? {
                        None => Ok(None),
                        Some(row) if origin == Origin::Api && row.origin == "config" => {
                            Ok(Some(false))
                        }
                        Some(_) => Ok(Some(tx.delete_webhook_source(&source).await?)),
                    }
                })
            })
            .await?;
        match deleted {
            None => Err(WebhookError::NotFound(name.to_owned())),
            Some(false) => Err(WebhookError::Managed(name.to_owned())),
            Some(true) => Ok(()),
        }
    }

    /// Makes the store's config-declared sources what `configs` says: each is set (taking
    /// over an API source of the same name), and those no longer in it deleted.
    pub async fn sync_config(
        &self,
        configs: &[SourceConfig],
        now_ms: i64,
    ) -> Result<(), WebhookError> {
        for config in configs {
            self.set(
                &config.source.clone(),
                config.clone(),
                Origin::Config,
                now_ms,
            )
            .await?;
        }
        for row in self.store.list_webhook_sources().await? {
            if row.origin == "config" && !configs.iter().any(|c| c.source == row.name) {
                // Another node starting with the same config may have deleted it first.
                match self.delete(&row.name, Origin::Config).await {
                    Ok(()) | Err(WebhookError::NotFound(_)) => {}
                    Err(error) => return Err(error),
                }
                tracing::info!(source = %row.name, "webhook source removed from the config: deleted");
            }
        }
        Ok(())
    }

    /// Source `name`, built from its stored declaration (again only when it changed).
    async fn built(&self, name: &str) -> Result<Arc<Source>, ApiError> {
        let row = self
            .store
            .get_webhook_source(name)
            .await
            .map_err(|e| ApiError::Storage(format!("the webhook source could not be read: {e}")))?
            .ok_or_else(|| ApiError::NotFound(format!("no webhook source is named {name:?}")))?;
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((config, source)) = built.get(name) {
            if *config == row.config {
                return Ok(Arc::clone(source));
            }
        }
        let source = serde_json::from_str::<SourceConfig>(&row.config)
            .map_err(|e| e.to_string())
            .and_then(|config| Source::new(&config))
            .map_err(|e| ApiError::Storage(format!("webhook source {name:?} as stored: {e}")))?;
        let source = Arc::new(source);
        built.insert(name.to_owned(), (row.config, Arc::clone(&source)));
        Ok(source)
    }

    /// Keeps a delivery for operators; a store that cannot take it is logged, and the
    /// delivery's own answer stands. Refused ones beyond [`KEPT_REFUSALS_PER_SECOND`] a
    /// second per source (anyone may post forgeries) are only logged, so that they cost
    /// no write.
    async fn note(&self, source: &str, delivery: Delivery) {
        if delivery.outcome == "refused" {
            let second = delivery.at_ms.div_euclid(1000);
            let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
            let kept = refusals.entry(source.to_owned()).or_insert((second, 0));
            if kept.0 != second {
                *kept = (second, 0);
            }
            if kept.1 >= KEPT_REFUSALS_PER_SECOND {
                return;
            }
            kept.1 += 1;
        }
        let Ok(text) = serde_json::to_string(&delivery) else {
            return;
        };
        let name = source.to_owned();
        let written = self
            .store
            .write(&format!("webhook:{source}"), move |tx| {
                Box::pin(async move {
                    tx.insert_webhook_delivery(&name, &text, KEPT_DELIVERIES)
                        .await
                })
            })
            .await;
        if let Err(error) = written {
            tracing::warn!(source, %error, "a webhook delivery could not be kept for operators");
        }
    }

    /// Takes a delivery: verified, read, routed; answered once the work is durable, and
    /// kept for operators.
    pub async fn deliver(
        &self,
        name: &str,
        headers: &HeaderMap,
        body: Bytes,
        now_ms: i64,
    ) -> Result<Response, ApiError> {
        let source = self.built(name).await?;
        let noted = Mutex::new(None);
        let answer = self.take(&source, &noted, headers, body, now_ms).await;
        let noted = noted.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(delivery) = noted {
            self.note(&source.name, delivery).await;
        }
        answer
    }

    /// [`Webhooks::deliver`], the delivery to keep for operators put in `noted`.
    async fn take(
        &self,
        source: &Source,
        noted: &Mutex<Option<Delivery>>,
        headers: &HeaderMap,
        body: Bytes,
        now_ms: i64,
    ) -> Result<Response, ApiError> {
        let name = source.name.as_str();
        let note = |delivery: Delivery| {
            *noted.lock().unwrap_or_else(|e| e.into_inner()) = Some(delivery);
        };
        let refuse = |status: u16, reason: String, event_id: Option<String>| {
            note(Delivery {
                at_ms: now_ms,
                outcome: "refused".into(),
                status,
                event_id,
                event_type: None,
                invocation_id: None,
                reason: Some(reason),
            });
        };
        if let Err(refused) =
            source
                .scheme
                .verify(&source.keys, headers, &body, now_ms, source.tolerance_s)
        {
            tracing::warn!(source = %source.name, reason = %refused, "webhook delivery refused");
            refuse(401, refused.to_string(), None);
            return Err(ApiError::WebhookRefused(format!(
                "webhook source {name:?}: {refused}"
            )));
        }
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        // Slack checks the endpoint with a challenge, which it expects back.
        if matches!(source.scheme, Scheme::Slack)
            && json
                .as_ref()
                .is_some_and(|j| j["type"] == "url_verification")
        {
            let challenge = json.as_ref().map(|j| j["challenge"].clone());
            return Ok(axum::Json(json!({ "challenge": challenge })).into_response());
        }
        let malformed = |reason: String, event_id: Option<String>| {
            refuse(400, reason.clone(), event_id);
            ApiError::BadRequest(format!("webhook source {name:?}: {reason}"))
        };
        let needs_json = [&source.event_id, &source.event_type]
            .into_iter()
            .flatten()
            .chain(source.routes.iter().filter_map(|r| r.id.as_ref()))
            .any(|place| matches!(place, Place::Pointer(_)));
        if needs_json && json.is_none() {
            return Err(malformed("the event is not JSON".into(), None));
        }
        let event_id = match &source.event_id {
            Some(place) => Some(place.read(headers, json.as_ref()).ok_or_else(|| {
                malformed(
                    format!("the event has no id at its {}", place.describe()),
                    None,
                )
            })?),
            None => None,
        };
        let event_type = source
            .event_type
            .as_ref()
            .and_then(|place| place.read(headers, json.as_ref()));
        let Some(route) = source.routes.iter().find(|route| {
            route
                .event_type
                .as_ref()
                .is_none_or(|t| Some(t) == event_type.as_ref())
        }) else {
            note(Delivery {
                at_ms: now_ms,
                outcome: "ignored".into(),
                status: 200,
                event_id,
                event_type: event_type.clone(),
                invocation_id: None,
                reason: Some("no route takes events of this type".into()),
            });
            return Ok(
                axum::Json(json!({ "ignored": true, "event_type": event_type })).into_response(),
            );
        };
        let workflow_id = match &route.id {
            Some(place) => Some(place.read(headers, json.as_ref()).ok_or_else(|| {
                malformed(
                    format!("the event has no workflow id at its {}", place.describe()),
                    event_id.clone(),
                )
            })?),
            None => None,
        };
        // An id the scheme does not sign (a header of GitHub's, none at all) could be
        // changed by whoever replays a captured delivery: such deliveries are told apart
        // by their signed body instead.
        let signed_id = match &source.event_id {
            Some(Place::Pointer(_)) => true,
            Some(Place::Header(name)) => {
                matches!(source.scheme, Scheme::StandardWebhooks) && name == "webhook-id"
            }
            None => false,
        };
        let usable = |id: &str| {
            !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic())
        };
        let dedup_key = match &event_id {
            Some(id) if signed_id && usable(id) => id.clone(),
            _ => {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(&body);
                format!("sha256-{}", crate::http::hex(&digest[..16]))
            }
        };
        let request = route_request(
            route,
            workflow_id.as_deref(),
            Some(dedup_key.as_str()),
            &source.name,
            headers,
            body,
        )
        .map_err(|reason| malformed(reason, event_id.clone()))?;
        let router = self
            .router()
            .clone()
            .ok_or_else(|| ApiError::ShuttingDown("Durin is starting or stopping".into()))?;
        let answer = router
            .oneshot(request)
            .await
            .unwrap_or_else(|never| match never {});
        let status = answer.status();
        let replayed = answer
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let (parts, body) = answer.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let answered: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        // A signal (with start or not) says whether it was one; a start or a send is
        // replayed when it was.
        let duplicate = match route.action {
            Action::Signal { .. } => answered["duplicate"] == true,
            _ => replayed,
        };
        note(Delivery {
            at_ms: now_ms,
            outcome: match (status.is_success(), duplicate) {
                (true, true) => "duplicate",
                (true, false) => "accepted",
                (false, _) => "refused",
            }
            .into(),
            status: status.as_u16(),
            event_id,
            event_type,
            invocation_id: answered["invocation_id"].as_str().map(str::to_owned),
            reason: (!status.is_success())
                .then(|| answered["detail"].as_str().unwrap_or_default().to_owned()),
        });
        let mut response = Response::from_parts(parts, Body::from(bytes));
        if status.is_success() {
            response.headers_mut().insert(
                "durin-webhook-duplicate",
                HeaderValue::from_static(if duplicate { "true" } else { "false" }),
            );
        }
        Ok(response)
    }
}

/// The request a caller would have sent for `route`.
fn route_request(
    route: &Route,
    workflow_id: Option<&str>,
    event_id: Option<&str>,
    source: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Body>, String> {
    // A path segment: everything but the unreserved characters percent-encoded.
    let escape = |text: &str| {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let id = workflow_id.map(escape).unwrap_or_default();
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (path, body, json_body) = match &route.action {
        Action::Start { workflow } => (format!("/v1/workflows/{workflow}/{id}"), body, false),
        Action::Signal {
            workflow,
            signal,
            with_start: false,
        } => (
            format!("/v1/workflows/{workflow}/{id}/signals/{signal}"),
            body,
            false,
        ),
        Action::Signal {
            workflow,
            signal,
            with_start: true,
        } => {
            let both = json!({ "input": event, "signal": { "name": signal, "payload": event } });
            (
                format!("/v1/workflows/{workflow}/{id}/signal-with-start"),
                Bytes::from(serde_json::to_vec(&both).map_err(|e| e.to_string())?),
                true,
            )
        }
        Action::Send { target } => (format!("/v1/send/{target}"), body, false),
    };
    let mut request = Request::builder().method(Method::POST).uri(path);
    request = request.header(
        axum::http::header::CONTENT_TYPE,
        if json_body {
            HeaderValue::from_static("application/json")
        } else {
            content_type
        },
    );
    // A start is idempotent by its workflow id; the others by the event's id.
    if let (Some(event_id), false) = (event_id, matches!(route.action, Action::Start { .. })) {
        let key = format!("webhook:{source}:{event_id}");
        request = request.header("idempotency-key", key);
    }
    if let Some(traceparent) = headers.get("traceparent") {
        request = request.header("traceparent", traceparent.clone());
    }
    request = request.extension(crate::http::InternalRequest);
    request.body(Body::from(body)).map_err(|e| e.to_string())
}
