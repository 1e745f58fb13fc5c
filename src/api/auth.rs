//! Callers you can trust, on every route of the main listener, in one place: who the
//! request comes from (`crate::auth`), which verb the route is and on which target, and
//! whether the caller's grants allow it. A caller outside its grants gets `403` whether
//! or not what it named exists; an answer hands `idempotency_key` and `last_error` only to
//! a caller who may `read` the target. Awakeables (their token), webhooks (their
//! signature), the context API (the attempt token) and `/health` keep their own checks.

use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::auth::{Refusal, Verb};
use crate::problem::ApiError;

/// What a route is, for the grants.
enum Route {
    /// Checked otherwise (or open).
    Own,
    /// `verbs` on a service's handler named in the path.
    Handler(&'static [Verb]),
    /// `verbs` on the workflow named in the path.
    Workflow(&'static [Verb]),
    /// `verbs` on the invocation the path's `id` names.
    Invocation(&'static [Verb]),
    /// `verbs` on every handler of the service named in the path.
    Service(&'static [Verb]),
}

fn route(method: &Method, path: &str) -> Route {
    use Verb::*;
    if path == "/health"
        || path.starts_with("/v1/awakeables/")
        || path.starts_with("/v1/contexts/")
        || path.starts_with("/v1/webhooks/")
    {
        return Route::Own;
    }
    // axum answers HEAD with the GET handler: a read too.
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/v1/call/{service}/{handler}" | "/v1/send/{service}/{handler}" => Route::Handler(&[Call]),
        "/v1/invocations/{id}" => Route::Invocation(&[Read]),
        "/v1/services/{service}/keys/{key}" => Route::Service(&[Read]),
        "/v1/invocations/{id}/signals/{name}" => Route::Invocation(&[Signal]),
        "/v1/invocations/{id}/queries/{name}" => Route::Invocation(&[Query]),
        "/v1/invocations/{id}/cancel" => Route::Invocation(&[Cancel]),
        "/v1/workflows/{workflow}/{id}" if get => Route::Workflow(&[Read]),
        "/v1/workflows/{workflow}/{id}" => Route::Workflow(&[Start]),
        "/v1/workflows/{workflow}/{id}/runs" => Route::Workflow(&[Read]),
        "/v1/workflows/{workflow}/{id}/cancel" => Route::Workflow(&[Cancel]),
        "/v1/workflows/{workflow}/{id}/signal-with-start" => Route::Workflow(&[Start, Signal]),
        "/v1/workflows/{workflow}/{id}/signals/{name}" => Route::Workflow(&[Signal]),
        "/v1/workflows/{workflow}/{id}/queries/{name}" => Route::Workflow(&[Query]),
        "/v1/workflows/{workflow}/{id}/updates/{name}"
        | "/v1/workflows/{workflow}/{id}/updates/{name}/{update_id}" => Route::Workflow(&[Update]),
        // A route this table does not know is refused to every caller but an open one, so
        // that a new route is never open by mistake.
        _ => Route::Handler(&[]),
    }
}

fn param<'a>(params: &'a RawPathParams, name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The middleware: 401 without credentials that hold, 403 outside the grants.
pub async fn authorize(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    params: RawPathParams,
    request: Request,
    next: Next,
) -> Response {
    let internal = request
        .extensions()
        .get::<crate::http::InternalRequest>()
        .is_some();
    // `webhook:` keys are the webhook ingress's: nobody else may take (or collide with)
    // a provider's event id.
    let webhook_key = request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|key| key.starts_with("webhook:"));
    if webhook_key && !internal {
        return ApiError::BadRequest(
            "Idempotency-Key values starting with \"webhook:\" are kept for webhook deliveries; use another key".into(),
        )
        .into_response();
    }
    let Some(matched) = matched else {
        // The route layer runs only on matched routes; anything else is refused.
        if state.auth.enabled() && !internal {
            return ApiError::NotAllowed("this request matches no route a caller may use".into())
                .into_response();
        }
        return next.run(request).await;
    };
    let route = route(request.method(), matched.as_str());
    if internal || matches!(route, Route::Own) || !state.auth.enabled() {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let access = match state.auth.authenticate(authorization) {
        Ok(access) => access,
        Err(refusal) => {
            let detail = refusal.to_string();
            if let Refusal::Invalid(reason) = &refusal {
                tracing::info!(path = %matched.as_str(), %reason, "credentials refused");
            }
            return ApiError::Unauthenticated(detail).into_response();
        }
    };
    let (verbs, target) = match target(&state, &route, &params).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let (service, handler) = match &target {
        Some((service, handler)) => (service.as_str(), handler.as_str()),
        None => ("", ""),
    };
    let allowed = !verbs.is_empty()
        && target.is_some()
        && verbs
            .iter()
            .all(|verb| access.allows(*verb, service, handler));
    // A target that does not exist is told only to a caller who may act on everything.
    let untold = target.is_none()
        && !verbs.is_empty()
        && verbs.iter().all(|verb| access.allows_everywhere(*verb));
    if !allowed && !untold {
        tracing::info!(
            caller = access.name(),
            path = %matched.as_str(),
            "request outside the caller's grants"
        );
        // The same words whether or not the target exists, and whichever service an
        // invocation id names: a refusal tells nothing the caller may not read.
        let needed: Vec<&str> = verbs.iter().map(|verb| verb.as_str()).collect();
        return ApiError::NotAllowed(format!(
            "{} may not do this: it needs the grant {} on what it names",
            access.name(),
            needed.join(" and ")
        ))
        .into_response();
    }
    let may_read = access.allows(Verb::Read, service, handler);
    super::views::scoped(may_read, next.run(request)).await
}

/// The verbs a route needs and the `(service, handler)` it acts on; `None` when its
/// invocation does not exist (or the id is not one).
async fn target(
    state: &AppState,
    route: &Route,
    params: &RawPathParams,
) -> Result<(&'static [Verb], Option<(String, String)>), Response> {
    Ok(match route {
        Route::Own => (&[], None),
        Route::Handler(verbs) => (
            verbs,
            param(params, "service")
                .zip(param(params, "handler"))
                .map(|(s, h)| (s.to_owned(), h.to_owned())),
        ),
        Route::Service(verbs) => (
            verbs,
            param(params, "service").map(|s| (s.to_owned(), "*".to_owned())),
        ),
        Route::Workflow(verbs) => (
            verbs,
            param(params, "workflow")
                .map(|w| (w.to_owned(), super::workflows::RUN_HANDLER.to_owned())),
        ),
        Route::Invocation(verbs) => {
            let id = param(params, "id").and_then(|id| crate::ids::InvocationId::parse(id).ok());
            let record = match id {
                Some(id) => match state.store.get_invocation(&id).await {
                    Ok(record) => record,
                    Err(e) => return Err(ApiError::from(e).into_response()),
                },
                None => None,
            };
            (verbs, record.map(|record| (record.service, record.handler)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route added to the main listener without its verbs here is refused to every
    /// caller; this names it.
    #[test]
    fn every_route_of_the_main_listener_says_what_it_needs() {
        for (method, path) in super::super::ROUTES {
            let method: Method = method.parse().unwrap_or(Method::GET);
            match route(&method, path) {
                Route::Own => {}
                Route::Handler(verbs)
                | Route::Workflow(verbs)
                | Route::Invocation(verbs)
                | Route::Service(verbs) => {
                    assert!(!verbs.is_empty(), "{method} {path} needs no verb");
                }
            }
        }
    }
}
