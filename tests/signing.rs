//! Durin's signature on its requests to handlers, end to end (the gateway in-process, real
//! handlers on port 0): it covers every `Durin-*` header a handler acts on, so a request
//! Durin sent cannot be replayed as a cancellation or with another attempt's token. A plain
//! handler checks it as `openapi/plain-http.md` says; the Rust SDK refuses such a request.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use durin_protocol::{
    HEADER_ATTEMPT_TOKEN, HEADER_CANCELLED, HEADER_SIGNATURE, HEADER_WORKFLOW_ID,
};
use durin_sdk::{Context, Endpoint, HandlerError, Service};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::{json, Value};
use support::{client, eventually, get_json, InProcess};

/// A request as a handler received it.
#[derive(Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Received>>>;

/// Serves `router` on 127.0.0.1:0 in this process; returns its URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

/// Durin's public key, as its admin API serves it.
async fn durin_key(admin: &str) -> VerifyingKey {
    let key = get_json(&format!("{admin}/v1/signing-key")).await;
    let public = key["public_key"].as_str().unwrap();
    let bytes: [u8; 32] = STANDARD
        .decode(public.trim_start_matches("ed25519:"))
        .unwrap()
        .try_into()
        .unwrap();
    VerifyingKey::from_bytes(&bytes).unwrap()
}

/// Whether `request` (with `headers` as its headers) carries Durin's valid signature,
/// checked as `openapi/plain-http.md` tells a plain handler to.
fn signed_by_durin(key: &VerifyingKey, request: &Received, headers: &HeaderMap) -> bool {
    let Some(signature) = headers.get(HEADER_SIGNATURE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let fields: HashMap<&str, &str> = signature
        .split(',')
        .filter_map(|part| part.trim().split_once('='))
        .collect();
    let (Some(t), Some(v3)) = (fields.get("t"), fields.get("v3")) else {
        return false;
    };
    let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(v3).unwrap()).unwrap();
    // Every Durin-* header but the signature, whatever its name.
    let signed: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("durin-") && *name != HEADER_SIGNATURE)
        .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
        .collect();
    let message =
        durin_protocol::signed_message(t.parse().unwrap(), &request.path, &signed, &request.body);
    key.verify(&message, &signature).is_ok()
}

/// `request`'s headers, changed by `change`.
fn altered(request: &Received, change: impl FnOnce(&mut HeaderMap)) -> HeaderMap {
    let mut headers = request.headers.clone();
    change(&mut headers);
    headers
}

/// A plain handler gets `Durin-Cancelled: true` under Durin's signature once its invocation
/// is cancelled: both requests verify as they came, while the first replayed with
/// `Durin-Cancelled` added, the second with it removed, or either with the other's attempt
/// token, do not. The signature is of version 3 (`v1=` and `v2=` are no longer sent). A
/// workflow's run is told its workflow id, under the signature too.
#[tokio::test]
async fn a_plain_handler_tells_durins_cancellation_from_a_replay_made_one() {
    let gateway = InProcess::start(|_| {}).await;
    let key = durin_key(&gateway.admin).await;
    let log: Log = Arc::default();
    let received = Arc::clone(&log);
    let handler = serve(axum::Router::new().route(
        "/job/run",
        axum::routing::post(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let cancelled = headers.get(HEADER_CANCELLED).is_some();
            received.lock().unwrap().push(Received {
                path: uri.path().to_owned(),
                headers,
                body,
            });
            async move {
                if cancelled {
                    // Compensated: a 4xx ends the invocation cancelled.
                    (StatusCode::CONFLICT, [("retry-after", "0")], "cancelled")
                } else {
                    // Not now: retried in an hour, unless something happens first.
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "3600")],
                        "later",
                    )
                }
            }
        }),
    ))
    .await;
    let services = json!([{"name": "job", "handlers": [{"name": "run"}]}]);
    let response = client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&json!({"url": handler, "services": services}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let response = client()
        .post(format!("{}/v1/send/job/run", gateway.url))
        .header("content-type", "application/json")
        .body(r#"{"job": 7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["invocation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view_url = format!("{}/v1/invocations/{id}", gateway.url);
    eventually(
        Duration::from_secs(10),
        "the first attempt to back off",
        || {
            let view_url = view_url.clone();
            async move { (get_json(&view_url).await["status"] == "backing-off").then_some(()) }
        },
    )
    .await;
    let response = client()
        .post(format!("{}/v1/invocations/{id}/cancel", gateway.url))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let view = support::wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "cancelled", "{view}");

    let requests = log.lock().unwrap().clone();
    assert_eq!(
        requests.len(),
        2,
        "one attempt before the cancel, one after"
    );
    let (first, second) = (&requests[0], &requests[1]);
    assert_eq!(first.headers.get(HEADER_CANCELLED), None);
    assert_eq!(second.headers[HEADER_CANCELLED], "true");
    for request in [first, second] {
        let signature = request.headers[HEADER_SIGNATURE].to_str().unwrap();
        assert!(
            signature.starts_with("t=")
                && signature.contains(",v3=")
                && !signature.contains("v1=")
                && !signature.contains("v2="),
            "{signature}"
        );
        assert!(signed_by_durin(&key, request, &request.headers));
    }
    let made_a_cancellation = altered(first, |h| {
        h.insert(HEADER_CANCELLED, HeaderValue::from_static("true"));
    });
    assert!(!signed_by_durin(&key, first, &made_a_cancellation));
    let cancellation_removed = altered(second, |h| {
        h.remove(HEADER_CANCELLED);
    });
    assert!(!signed_by_durin(&key, second, &cancellation_removed));
    let other_token = altered(first, |h| {
        h.insert(
            HEADER_ATTEMPT_TOKEN,
            second.headers[HEADER_ATTEMPT_TOKEN].clone(),
        );
    });
    assert!(!signed_by_durin(&key, first, &other_token));
    let other_token = altered(second, |h| {
        h.insert(
            HEADER_ATTEMPT_TOKEN,
            first.headers[HEADER_ATTEMPT_TOKEN].clone(),
        );
    });
    assert!(!signed_by_durin(&key, second, &other_token));
    assert_eq!(
        first.headers.get(HEADER_WORKFLOW_ID),
        None,
        "not a workflow"
    );
    let added = altered(first, |h| {
        h.insert("durin-anything", HeaderValue::from_static("x"));
    });
    assert!(
        !signed_by_durin(&key, first, &added),
        "a Durin-* header added"
    );

    // A workflow's run: its id comes signed.
    let response = client()
        .post(format!("{}/v1/workflows/job/w-7", gateway.url))
        .json(&json!({"job": 8}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let run = eventually(Duration::from_secs(10), "the run's first attempt", || {
        let log = Arc::clone(&log);
        async move { log.lock().unwrap().get(2).cloned() }
    })
    .await;
    assert_eq!(run.headers[HEADER_WORKFLOW_ID], "w-7");
    assert!(signed_by_durin(&key, &run, &run.headers));
    let other_workflow = altered(&run, |h| {
        h.insert(HEADER_WORKFLOW_ID, HeaderValue::from_static("w-8"));
    });
    assert!(!signed_by_durin(&key, &run, &other_workflow));
    let no_workflow = altered(&run, |h| {
        h.remove(HEADER_WORKFLOW_ID);
    });
    assert!(!signed_by_durin(&key, &run, &no_workflow));
    gateway.stop().await;
}

/// Sends `request` again to `url` (its path there) with `headers`.
async fn replay(url: &str, request: &Received, headers: HeaderMap) -> (StatusCode, String) {
    let response = client()
        .post(format!("{url}{}", request.path))
        .headers(headers)
        .body(request.body.clone())
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

/// An SDK deployment that checks Durin's signature runs Durin's request; the same request
/// replayed to it (captured on the way) is refused with 401 once it is made a cancellation
/// or carries another attempt token, or a second one. As it came, it still passes within
/// the signature's 5 minutes: the signature does not make a request single-use.
#[tokio::test]
async fn the_sdk_refuses_durins_request_replayed_as_a_cancellation_or_with_another_token() {
    let gateway = InProcess::start(|_| {}).await;
    let public_key = get_json(&format!("{}/v1/signing-key", gateway.admin)).await["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let endpoint = Endpoint::new()
        .service(
            Service::new("greet").handler("hi", |_ctx: Context, name: Value| async move {
                Ok::<_, HandlerError>(format!("hello {name}"))
            }),
        )
        .verify_signatures(&public_key)
        .unwrap()
        // The proxy reads each request whole before it passes it on: nothing streams
        // through it.
        .streaming(false);
    let deployment = serve(endpoint.router()).await;
    // In front of it, a proxy that keeps what Durin sends.
    let log: Log = Arc::default();
    let captured = Arc::clone(&log);
    let target = deployment.clone();
    let proxy = serve(axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (captured, target) = (Arc::clone(&captured), target.clone());
            async move {
                if method == Method::POST {
                    captured.lock().unwrap().push(Received {
                        path: uri.path().to_owned(),
                        headers: headers.clone(),
                        body: body.clone(),
                    });
                }
                let mut headers = headers;
                headers.remove("host");
                let response = client()
                    .request(method, format!("{target}{uri}"))
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                (response.status(), response.bytes().await.unwrap())
            }
        },
    ))
    .await;
    support::register(&gateway.admin, &proxy).await;
    let response = client()
        .post(format!("{}/v1/call/greet/hi", gateway.url))
        .header("content-type", "application/json")
        .body(r#""ada""#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), r#"hello "ada""#);

    let request = log.lock().unwrap()[0].clone();
    let (status, text) = replay(&deployment, &request, request.headers.clone()).await;
    assert_eq!(status, StatusCode::OK, "the genuine request: {text}");
    let cases = [
        (
            "made a cancellation",
            altered(&request, |h| {
                h.insert(HEADER_CANCELLED, HeaderValue::from_static("true"));
            }),
            "does not verify",
        ),
        (
            "another token",
            altered(&request, |h| {
                h.insert(HEADER_ATTEMPT_TOKEN, HeaderValue::from_static("0123abcd"));
            }),
            "does not verify",
        ),
        (
            "a second token",
            altered(&request, |h| {
                h.append(HEADER_ATTEMPT_TOKEN, HeaderValue::from_static("0123abcd"));
            }),
            "more than once",
        ),
    ];
    for (case, headers, why) in cases {
        let (status, text) = replay(&deployment, &request, headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {text}");
        assert!(text.contains(why), "{case}: {text:?} does not say {why:?}");
    }
    gateway.stop().await;
}
