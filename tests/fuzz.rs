//! A property-based test of every route `openapi/durin.yaml` documents, with requests
//! generated from the document itself: each operation's path, query and header parameters
//! and its JSON body are drawn from their schemas (patterns, lengths, enums, bounds,
//! required properties), mixed with borderline and hostile values. The property: Durin
//! answers every request, never with a 5xx of its own (a deployment it cannot reach is the
//! one documented 502), every error is a problem document, and the order workflow still
//! runs afterwards. proptest draws from a fixed seed, so a failure replays, and shrinks a
//! failing request to a small one before it reports it.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use durin::config::Config;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Map, Value};
use serde_yaml_ng::Value as Yaml;
use support::{client, register, ORDER, ORDER_OUTPUT};
use tokio_util::sync::CancellationToken;

/// How many requests the property is checked on.
const CASES: u32 = 1500;

/// Values that break naive parsers, path handling and SQL.
const HOSTILE: &[&str] = &[
    "",
    "..",
    "%2e%2e",
    "%00",
    "ünïcode",
    "'; DROP TABLE invocations; --",
    "inv_zz",
    "awk_",
    "0",
    "-1",
    "4294967296",
    "99999999999999999999",
    "wait=soon",
    "Bearer",
];

/// Where a request goes: the main listener, the admin listener or both.
#[derive(Debug, Clone, Copy)]
enum Listener {
    Main,
    Admin,
}

/// One operation of the document, with what is needed to draw requests for it.
#[derive(Debug, Clone)]
struct Operation {
    listeners: Vec<Listener>,
    method: String,
    path: String,
    /// `(name, in, schema, example)` of each parameter.
    parameters: Vec<(String, String, Value, Option<String>)>,
    /// The JSON schema of the body, when the operation takes JSON.
    body: Option<Value>,
}

/// A drawn request.
#[derive(Debug, Clone)]
struct Drawn {
    listener: Listener,
    method: String,
    /// The path with its parameters filled in, and the query.
    target: String,
    headers: Vec<(String, String)>,
    content_type: Option<String>,
    body: Option<Vec<u8>>,
}

/// The document as JSON, every local `$ref` replaced by what it names.
fn document() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi/durin.yaml");
    let yaml: Yaml = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let doc: Value = serde_json::to_value(yaml).unwrap();
    inline(&doc, &doc, 0)
}

fn inline(doc: &Value, node: &Value, depth: u32) -> Value {
    assert!(depth < 32, "a $ref cycle in the document");
    match node {
        Value::Object(map) => match map.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference.strip_prefix('#').unwrap();
                inline(doc, doc.pointer(pointer).unwrap(), depth + 1)
            }
            None => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), inline(doc, v, depth)))
                    .collect(),
            ),
        },
        Value::Array(items) => Value::Array(items.iter().map(|v| inline(doc, v, depth)).collect()),
        other => other.clone(),
    }
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let listeners: Vec<Listener> = match item["servers"].as_array() {
            Some(servers) => servers
                .iter()
                .map(|s| {
                    if s["url"].as_str().unwrap().ends_with(":9070") {
                        Listener::Admin
                    } else {
                        Listener::Main
                    }
                })
                .collect(),
            None => vec![Listener::Main],
        };
        for (method, operation) in item.as_object().unwrap() {
            let Some(operation) = operation.as_object().filter(|_| method != "servers") else {
                continue;
            };
            let parameters = operation
                .get("parameters")
                .and_then(Value::as_array)
                .map(|params| {
                    params
                        .iter()
                        .map(|p| {
                            (
                                p["name"].as_str().unwrap().to_owned(),
                                p["in"].as_str().unwrap().to_owned(),
                                p["schema"].clone(),
                                p["example"].as_str().map(str::to_owned),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let body = operation
                .get("requestBody")
                .and_then(|b| b["content"].get("application/json"))
                .map(|c| c["schema"].clone());
            operations.push(Operation {
                listeners: listeners.clone(),
                method: method.to_uppercase(),
                path: path.clone(),
                parameters,
                body,
            });
        }
    }
    operations
}

/// Strings that a schema accepts (its pattern, or its length bounds), or not quite.
fn string_for(schema: &Value) -> BoxedStrategy<String> {
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        return proptest::sample::select(values).boxed();
    }
    let min = schema["minLength"].as_u64().unwrap_or(0) as usize;
    let max = schema["maxLength"].as_u64().unwrap_or(64) as usize;
    let valid = match schema["pattern"].as_str() {
        Some(pattern) => {
            let pattern = pattern.trim_start_matches('^').trim_end_matches('$');
            proptest::string::string_regex(pattern)
                .unwrap()
                // Within the length bound (a pattern alone may draw longer strings).
                .prop_map(move |s| s.chars().take(max).collect())
                .boxed()
        }
        None => proptest::string::string_regex(&format!("[a-z0-9_.-]{{{min},{max}}}"))
            .unwrap()
            .boxed(),
    };
    prop_oneof![
        12 => valid,
        2 => proptest::sample::select(HOSTILE).prop_map(str::to_owned),
        1 => "\\PC{0,300}",
        1 => (max + 1..max + 40).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

/// JSON values a schema describes, with now and then a value of the wrong type.
fn json_for(schema: &Value, depth: u32) -> BoxedStrategy<Value> {
    let typed = match schema["type"].clone() {
        Value::String(t) => Some(t),
        // `[integer, 'null']`: one of them.
        Value::Array(types) => types.first().and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    if let Some(constant) = schema.get("const") {
        return Just(constant.clone()).boxed();
    }
    let right = match typed.as_deref() {
        Some("object") if depth < 4 => {
            let properties: Vec<(String, Value, bool)> = schema["properties"]
                .as_object()
                .map(|p| {
                    let required: Vec<&str> = schema["required"]
                        .as_array()
                        .map(|r| r.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    p.iter()
                        .map(|(k, v)| (k.clone(), v.clone(), required.contains(&k.as_str())))
                        .collect()
                })
                .unwrap_or_default();
            let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = properties
                .into_iter()
                .map(|(name, schema, required)| {
                    let value = json_for(&schema, depth + 1);
                    let present = if required { 0.95 } else { 0.5 };
                    proptest::option::weighted(present, value.prop_map(move |v| (name.clone(), v)))
                        .boxed()
                })
                .collect();
            fields
                .prop_map(|fields| Value::Object(fields.into_iter().flatten().collect()))
                .boxed()
        }
        Some("array") if depth < 4 => {
            proptest::collection::vec(json_for(&schema["items"], depth + 1), 0..4)
                .prop_map(Value::Array)
                .boxed()
        }
        Some("string") if schema["format"] == "uri" => proptest::sample::select(vec![
            "http://127.0.0.1:1",
            "http://[::1]:1/x",
            "ftp://127.0.0.1",
            "not a url",
        ])
        .prop_map(|s| json!(s))
        .boxed(),
        Some("string") => string_for(schema).prop_map(Value::String).boxed(),
        Some("integer") => {
            let min = schema["minimum"].as_i64().unwrap_or(i64::MIN);
            let max = schema["maximum"].as_i64().unwrap_or(i64::MAX);
            prop_oneof![min..=max, any::<i64>()]
                .prop_map(|n| json!(n))
                .boxed()
        }
        Some("number") => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f))
            .boxed(),
        Some("boolean") => any::<bool>().prop_map(|b| json!(b)).boxed(),
        _ => match schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
            Some(choices) if depth < 4 => {
                let choices: Vec<BoxedStrategy<Value>> =
                    choices.iter().map(|c| json_for(c, depth + 1)).collect();
                proptest::strategy::Union::new(choices).boxed()
            }
            _ => any_json(),
        },
    };
    prop_oneof![9 => right, 1 => any_json()].boxed()
}

/// Any JSON value, nested a little.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(json!(-1.5e300)),
        "\\PC{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
    .boxed()
}

fn url_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Requests for one operation: every parameter drawn from its schema (a header or a query
/// parameter is sent or not), a body drawn from the body's schema, or garbage.
fn requests(operation: Operation) -> BoxedStrategy<Drawn> {
    let values: Vec<BoxedStrategy<Option<String>>> = operation
        .parameters
        .iter()
        .map(|(_, location, schema, example)| {
            let value = match schema["type"].as_str() {
                Some("integer") => json_for(schema, 0)
                    .prop_map(|v| v.to_string().trim_matches('"').to_owned())
                    .boxed(),
                _ => string_for(schema),
            };
            // The document's example names what exists (the order service, its handler).
            let value = match example {
                Some(example) => prop_oneof![1 => Just(example.clone()), 2 => value].boxed(),
                None => value,
            };
            if location == "path" {
                value.prop_map(Some).boxed()
            } else {
                proptest::option::of(value).boxed()
            }
        })
        .collect();
    let body: BoxedStrategy<Option<Vec<u8>>> = match &operation.body {
        Some(schema) => prop_oneof![
            8 => json_for(schema, 0).prop_map(|v| Some(serde_json::to_vec(&v).unwrap())),
            1 => Just(Some(b"{not json".to_vec())),
            1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Some),
        ]
        .boxed(),
        None => proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)).boxed(),
    };
    let content_type = proptest::option::weighted(
        0.8,
        proptest::sample::select(vec![
            "application/json",
            "application/json",
            "application/json",
            "text/plain",
            "application/x+json",
            "text/json; charset=\"x\"",
        ]),
    );
    let listener = proptest::sample::select(operation.listeners.clone());
    (values, body, content_type, listener)
        .prop_map(move |(values, body, content_type, listener)| {
            let mut target = operation.path.clone();
            let mut query = Vec::new();
            let mut headers = Vec::new();
            for ((name, location, _, _), value) in operation.parameters.iter().zip(values) {
                let Some(value) = value else { continue };
                match location.as_str() {
                    "path" => target = target.replace(&format!("{{{name}}}"), &url_escape(&value)),
                    "query" => query.push(format!("{name}={}", url_escape(&value))),
                    _ => headers.push((name.clone(), value)),
                }
            }
            if !query.is_empty() {
                target = format!("{target}?{}", query.join("&"));
            }
            Drawn {
                listener,
                method: operation.method.clone(),
                target,
                headers,
                content_type: content_type.map(str::to_owned),
                body: (operation.method != "GET").then_some(body).flatten(),
            }
        })
        .boxed()
}

/// Sends one request; `Err` says how the property failed.
async fn check(
    http: &reqwest::Client,
    main: &str,
    admin: &str,
    drawn: &Drawn,
) -> Result<(), String> {
    let base = match drawn.listener {
        Listener::Main => main,
        Listener::Admin => admin,
    };
    let url = format!("{base}{}", drawn.target);
    let mut request = http.request(drawn.method.parse().unwrap(), &url);
    for (name, value) in &drawn.headers {
        // A value no HTTP client can send is not a request Durin can get.
        if let Ok(value) = reqwest::header::HeaderValue::from_str(value) {
            request = request.header(name, value);
        }
    }
    if let Some(content_type) = &drawn.content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(body) = &drawn.body {
        request = request.body(body.clone());
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("{} {url}: no answer: {e}", drawn.method))?;
    let status = response.status().as_u16();
    let is_problem = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    let body = response.text().await.unwrap_or_default();
    if status < 400 {
        return Ok(());
    }
    if !is_problem {
        return Err(format!(
            "{} {url}: {status} is not a problem: {body}",
            drawn.method
        ));
    }
    let problem: Value =
        serde_json::from_str(&body).map_err(|e| format!("{url}: problem is not JSON: {e}"))?;
    if status >= 500 && problem["type"] != "urn:durin:problem:deployment-unusable" {
        return Err(format!(
            "{} {url}: Durin failed: {status} {body}",
            drawn.method
        ));
    }
    Ok(())
}

#[test]
fn requests_drawn_from_the_openapi_document_get_problems_never_a_crash() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        database_url: format!("sqlite:{}", dir.path().join("durin.db").display()),
        call_wait: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let (listeners, main, admin) = runtime.block_on(async {
        let listeners = durin::Listeners {
            api: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let main = format!("http://{}", listeners.api.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        (listeners, main, admin)
    });
    let shutdown = CancellationToken::new();
    let server = runtime.spawn(durin::run(config, listeners, shutdown.clone()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    runtime.block_on(async {
        let order = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let order_url = format!("http://{}", order.local_addr().unwrap());
        let args = order_example::Args {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            step_delay_ms: 0,
            downstream: None,
            step_retry_initial_ms: 20,
        };
        tokio::spawn(order_example::endpoint(args).serve(order));
        register(&admin, &order_url).await;
    });

    let doc = document();
    let operations = operations(&doc);
    assert!(
        operations.len() >= durin::api::ROUTES.len(),
        "the document lists every route"
    );
    let strategy = proptest::strategy::Union::new(operations.into_iter().map(requests));
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig {
            cases: CASES,
            failure_persistence: None,
            ..RunnerConfig::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let result = runner.run(&strategy, |drawn| {
        runtime
            .block_on(check(&http, &main, &admin, &drawn))
            .map_err(TestCaseError::fail)
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }

    // Durin still serves: the order workflow runs.
    runtime.block_on(async {
        let done = client()
            .post(format!("{main}/v1/call/order/process"))
            .header("content-type", "application/json")
            .body(ORDER)
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 200);
        assert_eq!(done.json::<Value>().await.unwrap(), ORDER_OUTPUT);
        shutdown.cancel();
        server.await.unwrap().unwrap();
    });
}
