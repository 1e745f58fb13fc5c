//! OpenTelemetry traces: the real `durin` binary exports to a small OTLP/HTTP (JSON)
//! receiver this test runs. One invocation with a caller's `traceparent`, three attempts
//! (a retry, a suspension on a child, the end), a step, an egress call and a child: every
//! span is in the caller's trace and hangs under the right parent, and the handler, the
//! downstream and the child got the `traceparent` of the span they belong under.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{json, Value};
use support::*;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Spans as the receiver got them, and the `traceparent` headers each party got.
#[derive(Clone, Default)]
struct Seen {
    spans: Arc<Mutex<Vec<Value>>>,
    headers: Arc<Mutex<HashMap<&'static str, Vec<String>>>>,
}

impl Seen {
    fn note(&self, who: &'static str, headers: &HeaderMap) {
        let value = headers
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        self.headers
            .lock()
            .unwrap()
            .entry(who)
            .or_default()
            .push(value);
    }

    fn got(&self, who: &str) -> Vec<String> {
        self.headers
            .lock()
            .unwrap()
            .get(who)
            .cloned()
            .unwrap_or_default()
    }
}

/// A route that notes the `traceparent` it got as `who`'s and answers `answer`.
fn noting(seen: &Seen, who: &'static str, answer: &'static str) -> axum::routing::MethodRouter {
    let seen = seen.clone();
    post(move |headers: HeaderMap| {
        let seen = seen.clone();
        async move {
            seen.note(who, &headers);
            answer
        }
    })
}

/// Registers the plain handlers `handlers` of `service` at `url`.
async fn register_plain(admin: &str, url: &str, service: &str, handlers: &[&str]) {
    let handlers: Vec<Value> = handlers.iter().map(|h| json!({"name": h})).collect();
    let registered = client()
        .post(format!("{admin}/v1/deployments"))
        .json(&json!({"url": url, "services": [{"name": service, "handlers": handlers}]}))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

/// A string attribute of an OTLP/JSON span.
fn attribute(span: &Value, key: &str) -> Option<String> {
    let value = &span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?["value"];
    value["stringValue"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| match &value["intValue"] {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
}

fn text(span: &Value, key: &str) -> String {
    span[key].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocations_spans_form_one_trace_under_its_callers_span() {
    let seen = Seen::default();

    // The OTLP receiver: every span of every export request.
    let receiver = serve(axum::Router::new().route(
        "/v1/traces",
        post({
            let seen = seen.clone();
            move |body: axum::body::Bytes| {
                let seen = seen.clone();
                async move {
                    let request: Value = serde_json::from_slice(&body).unwrap();
                    let mut spans = seen.spans.lock().unwrap();
                    for resource in request["resourceSpans"].as_array().unwrap() {
                        for scope in resource["scopeSpans"].as_array().unwrap() {
                            spans.extend(scope["spans"].as_array().unwrap().iter().cloned());
                        }
                    }
                    StatusCode::OK
                }
            }
        }),
    ))
    .await;
    let downstream = serve(axum::Router::new().route(
        "/charge",
        noting(&seen, "downstream", r#"{"charged":true}"#),
    ))
    .await;

    let home = GatewayHome::new();
    let (mut gateway, egress) = home.start_with_egress(
        None,
        None,
        &["--egress-allow", "127.0.0.1", "--otlp-endpoint", &receiver],
    );
    let (url, admin) = (gateway.url.clone(), gateway.admin.clone());

    // The handler: a step, a call through the egress, then a failure (attempt 1); a child
    // call that suspends (attempt 2); the answer (attempt 3).
    let attempts = Arc::new(AtomicU32::new(0));
    let handler = serve(
        axum::Router::new()
            .route(
                "/traced/run",
                post({
                    let (seen, url, egress, downstream, attempts) = (
                        seen.clone(),
                        url.clone(),
                        egress.clone(),
                        downstream.clone(),
                        Arc::clone(&attempts),
                    );
                    move |headers: HeaderMap| {
                        let (seen, url, egress, downstream) = (
                            seen.clone(),
                            url.clone(),
                            egress.clone(),
                            downstream.clone(),
                        );
                        let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            seen.note("handler", &headers);
                            let header = |name: &str| headers[name].to_str().unwrap().to_owned();
                            let id = header("durin-invocation-id");
                            let durin = |request: reqwest::RequestBuilder| {
                                request
                                    .header("durin-invocation-id", &id)
                                    .header("durin-attempt", header("durin-attempt"))
                                    .header("durin-attempt-token", header("durin-attempt-token"))
                            };
                            let step =
                                durin(client().post(format!("{url}/v1/contexts/{id}/steps/pick")))
                                    .json(&json!("blue"))
                                    .send()
                                    .await
                                    .unwrap();
                            assert_eq!(step.status(), 200);
                            let target = downstream.trim_start_matches("http://");
                            let charged =
                                durin(client().post(format!("{egress}/http/{target}/charge")))
                                    .body("{}")
                                    .send()
                                    .await
                                    .unwrap();
                            assert_eq!(charged.status(), 200);
                            if attempt == 1 {
                                return (StatusCode::INTERNAL_SERVER_ERROR, "try again".to_owned());
                            }
                            let child = durin(
                                client().post(format!("{url}/v1/contexts/{id}/calls/kid")),
                            )
                            .json(&json!({"service": "traced", "handler": "child", "input": {}}))
                            .send()
                            .await
                            .unwrap();
                            if child.headers().contains_key("durin-suspended") {
                                return (StatusCode::SERVICE_UNAVAILABLE, String::new());
                            }
                            (StatusCode::OK, json!({"done": true}).to_string())
                        }
                    }
                }),
            )
            .route("/traced/child", noting(&seen, "child", r#""ok""#)),
    )
    .await;
    register_plain(&admin, &handler, "traced", &["run", "child"]).await;

    let response = client()
        .post(format!("{url}/v1/call/traced/run"))
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let id = response.headers()["durin-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    // A stop flushes the spans still buffered.
    assert!(gateway.terminate(Duration::from_secs(10)).success());

    let spans = seen.spans.lock().unwrap().clone();
    let dump = || serde_json::to_string_pretty(&spans).unwrap();
    assert!(
        spans.iter().all(|s| text(s, "traceId") == CALLER_TRACE),
        "every span is in the caller's trace: {}",
        dump()
    );
    let nanos = |span: &Value, key: &str| -> u128 {
        match &span[key] {
            Value::String(s) => s.parse().unwrap(),
            Value::Number(n) => u128::from(n.as_u64().unwrap()),
            other => panic!("{key}: {other}"),
        }
    };
    for span in &spans {
        let (start, end) = (
            nanos(span, "startTimeUnixNano"),
            nanos(span, "endTimeUnixNano"),
        );
        assert!(start > 0 && start <= end, "times of {span}");
    }
    let of = |invocation: &str| -> Vec<&Value> {
        spans
            .iter()
            .filter(|s| attribute(s, "durin.invocation_id").as_deref() == Some(invocation))
            .collect()
    };
    let named = |spans: &[&Value], name: &str| -> Vec<Value> {
        spans
            .iter()
            .filter(|s| s["name"] == name)
            .map(|s| (*s).clone())
            .collect()
    };
    let ours = of(&id);
    let invocation = named(&ours, "invoke traced/run");
    assert_eq!(invocation.len(), 1, "{}", dump());
    let invocation = &invocation[0];
    assert_eq!(text(invocation, "parentSpanId"), CALLER_SPAN);
    assert_eq!(attribute(invocation, "durin.status").unwrap(), "completed");

    // Three attempts under the invocation, each ended as it did; the handler got each
    // attempt's span as its parent.
    let mut attempt_spans = Vec::new();
    for (n, outcome) in [(1, "backing-off"), (2, "suspended"), (3, "completed")] {
        let found = named(&ours, &format!("attempt {n}"));
        assert_eq!(found.len(), 1, "attempt {n}: {}", dump());
        let span = found[0].clone();
        assert_eq!(text(&span, "parentSpanId"), text(invocation, "spanId"));
        assert_eq!(attribute(&span, "durin.outcome").unwrap(), outcome);
        attempt_spans.push(span);
    }
    let expected: Vec<String> = attempt_spans
        .iter()
        .map(|s| format!("00-{CALLER_TRACE}-{}-01", text(s, "spanId")))
        .collect();
    assert_eq!(seen.got("handler"), expected);

    // The entries each attempt appended, under that attempt.
    let under = |parent: &Value| -> Vec<String> {
        let mut names: Vec<String> = ours
            .iter()
            .filter(|s| text(s, "parentSpanId") == text(parent, "spanId"))
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    let target = downstream.trim_start_matches("http://");
    assert_eq!(
        under(&attempt_spans[0]),
        vec![
            "egress POST".to_owned(),
            format!("egress POST {downstream}/charge"),
            "step pick".to_owned(),
        ],
        "{}",
        dump()
    );
    assert_eq!(
        under(&attempt_spans[1]),
        vec!["call kid".to_owned(), "egress POST".to_owned()]
    );
    assert_eq!(
        under(&attempt_spans[2]),
        vec!["egress POST".to_owned(), "output".to_owned()]
    );

    // The downstream was called once, by attempt 1's egress span; later attempts' calls
    // were answered from the journal.
    let egress_spans = named(&ours, "egress POST");
    let outcomes: Vec<String> = attempt_spans
        .iter()
        .map(|attempt| {
            let span = egress_spans
                .iter()
                .find(|s| text(s, "parentSpanId") == text(attempt, "spanId"))
                .unwrap();
            attribute(span, "durin.egress.outcome").unwrap()
        })
        .collect();
    assert_eq!(outcomes, ["recorded", "replayed", "replayed"]);
    let first_call = egress_spans
        .iter()
        .find(|s| text(s, "parentSpanId") == text(&attempt_spans[0], "spanId"))
        .unwrap();
    assert_eq!(
        seen.got("downstream"),
        vec![format!(
            "00-{CALLER_TRACE}-{}-01",
            text(first_call, "spanId")
        )],
        "downstream at {target}"
    );

    // The child's invocation hangs under the attempt that called it, and its handler got
    // its own attempt's span.
    let child_invocation = spans
        .iter()
        .find(|s| s["name"] == "invoke traced/child")
        .unwrap_or_else(|| panic!("no child span: {}", dump()));
    assert_eq!(
        text(child_invocation, "parentSpanId"),
        text(&attempt_spans[1], "spanId")
    );
    let child_id = attribute(child_invocation, "durin.invocation_id").unwrap();
    let child_attempt = named(&of(&child_id), "attempt 1");
    assert_eq!(child_attempt.len(), 1);
    assert_eq!(
        text(&child_attempt[0], "parentSpanId"),
        text(child_invocation, "spanId")
    );
    assert_eq!(
        seen.got("child"),
        vec![format!(
            "00-{CALLER_TRACE}-{}-01",
            text(&child_attempt[0], "spanId")
        )]
    );
}

/// Without a collector configured, handlers get no `traceparent` from Durin.
#[tokio::test]
async fn without_a_collector_no_trace_context_is_made_up() {
    let seen = Seen::default();
    let server = InProcess::start(|_| {}).await;
    let handler =
        serve(axum::Router::new().route("/quiet/run", noting(&seen, "handler", r#""ok""#))).await;
    register_plain(&server.admin, &handler, "quiet", &["run"]).await;
    let response = client()
        .post(format!("{}/v1/call/quiet/run", server.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(seen.got("handler"), vec![String::new()]);
    server.stop().await;
}
