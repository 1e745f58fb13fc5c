//! Keeps the HTTP contract documents true: `openapi/durin.yaml` names exactly the routes the
//! gateway serves (checked against `durin::api::ROUTES` and against a running gateway), and
//! `openapi/handler-protocol.yaml` spells the handler protocol's messages as
//! `durin-protocol` serializes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use axum::response::IntoResponse;
use durin::config::Config;
use durin::problem::ApiError;
use durin::store::HandlerProtocol;
use durin::telemetry::traces::TRACEPARENT;
use durin_protocol::{
    AppendRequest, AppendResponse, Completion, Discovery, EntryKind, EntryRef, Failure,
    GatewayFrame, HandlerFrame, HandlerSpec, InvocationRequest, JournalEntry, Outcome, RetryPolicy,
    ServiceKind, ServiceSpec, SignedHeaders, HEADER_PROTOCOL, HEADER_REPLAYED, HEADER_SIGNATURE,
    HEADER_SUSPENDED, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SIGNED_HEADERS,
};
use serde_json::{json, Value as Json};
use serde_yaml_ng::Value as Yaml;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
const SAMPLE_ID: &str = "inv_0193a2b4c5d6e7f8091a2b3c4d5e6f70";
const NO_ROUTE: &str = "urn:durin:problem:no-route";
const METHOD_NOT_ALLOWED: &str = "urn:durin:problem:method-not-allowed";

fn load(name: &str) -> Yaml {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("openapi")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let doc: Yaml = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(
        version.starts_with("3.1"),
        "{name}: expected an OpenAPI 3.1 document, found openapi: {version:?}"
    );
    doc
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Yaml, reference: &str) -> &'a Yaml {
    let pointer = reference
        .strip_prefix("#/")
        .unwrap_or_else(|| panic!("only local references are used, not {reference:?}"));
    let mut node = doc;
    for part in pointer.split('/') {
        let part = part.replace("~1", "/").replace("~0", "~");
        node = node
            .get(part.as_str())
            .unwrap_or_else(|| panic!("$ref {reference:?} does not resolve (no {part:?})"));
    }
    node
}

/// The node itself, or what its `$ref` names.
fn deref<'a>(doc: &'a Yaml, node: &'a Yaml) -> &'a Yaml {
    match node.get("$ref").and_then(Yaml::as_str) {
        Some(reference) => deref(doc, resolve(doc, reference)),
        None => node,
    }
}

fn keys(node: &Yaml) -> BTreeSet<String> {
    node.as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn strings(node: &Yaml) -> BTreeSet<String> {
    node.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every `$ref` in the document resolves.
fn check_references(doc: &Yaml, node: &Yaml) {
    match node {
        Yaml::Mapping(map) => {
            for (key, value) in map {
                if key.as_str() == Some("$ref") {
                    resolve(doc, value.as_str().expect("$ref is a string"));
                } else {
                    check_references(doc, value);
                }
            }
        }
        Yaml::Sequence(items) => items.iter().for_each(|v| check_references(doc, v)),
        _ => {}
    }
}

/// `(METHOD, path)` of every operation in the document.
fn documented_routes(doc: &Yaml) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_mapping().expect("the document has paths");
    let mut routes = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().expect("path keys are strings");
        for method in keys(item) {
            if HTTP_METHODS.contains(&method.as_str()) {
                routes.insert((method.to_uppercase(), path.to_owned()));
            }
        }
    }
    routes
}

fn operation<'a>(doc: &'a Yaml, method: &str, path: &str) -> &'a Yaml {
    &doc["paths"][path][method.to_lowercase().as_str()]
}

/// Names of the parameters `in` `location` (`path`, `query`, `header`) of an operation (its
/// own and its path item's).
fn parameters(doc: &Yaml, method: &str, path: &str, location: &str) -> BTreeSet<String> {
    let item = &doc["paths"][path];
    let op = operation(doc, method, path);
    [&item["parameters"], &op["parameters"]]
        .into_iter()
        .filter_map(Yaml::as_sequence)
        .flatten()
        .map(|p| deref(doc, p))
        .filter(|p| p["in"].as_str() == Some(location))
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// Names of the `in: path` parameters of an operation (its own and its path item's).
fn path_parameters(doc: &Yaml, method: &str, path: &str) -> BTreeSet<String> {
    parameters(doc, method, path, "path")
}

fn placeholders(path: &str) -> BTreeSet<String> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(str::to_owned)
        .collect()
}

fn fill(path: &str) -> String {
    path.replace("{id}", SAMPLE_ID)
        .replace("{service}", "order")
        .replace("{handler}", "process")
        .replace("{name}", "s1")
}

/// Whether the operation documents `status` (exactly, as a range like `4XX`, or `default`).
fn documents_status(doc: &Yaml, method: &str, path: &str, status: u16) -> bool {
    let documented = keys(&operation(doc, method, path)["responses"]);
    let range = format!("{}XX", status / 100);
    documented.contains(&status.to_string())
        || documented.contains(&range)
        || documented.contains("default")
}

#[test]
fn gateway_document_names_exactly_the_routes() {
    let doc = load("durin.yaml");
    check_references(&doc, &doc);

    let set = |list: &[(&str, &str)]| -> BTreeSet<(String, String)> {
        list.iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect()
    };
    let (main, admin) = (set(durin::api::ROUTES), set(durin::api::ADMIN_ROUTES));
    assert_eq!(
        main.len(),
        durin::api::ROUTES.len(),
        "ROUTES lists a route twice"
    );
    assert_eq!(
        admin.len(),
        durin::api::ADMIN_ROUTES.len(),
        "ADMIN_ROUTES lists a route twice"
    );
    let routes: BTreeSet<(String, String)> = main.union(&admin).cloned().collect();
    let documented = documented_routes(&doc);
    // Which listener serves a path is documented: the admin paths name the admin listener
    // (port 9070) in their `servers`, the main listener's paths do not override it, and a
    // path on both names both; an operation's own `servers` override its path's.
    for (method, path) in &routes {
        let item = &doc["paths"][path.as_str()];
        let own = &item[method.to_ascii_lowercase().as_str()]["servers"];
        let servers: BTreeSet<String> = own
            .as_sequence()
            .or_else(|| item["servers"].as_sequence())
            .map(|s| {
                s.iter()
                    .filter_map(|server| server["url"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_else(|| ["http://127.0.0.1:8080".to_owned()].into());
        let route = (method.clone(), path.clone());
        let expected: BTreeSet<String> = [
            main.contains(&route)
                .then(|| "http://127.0.0.1:8080".to_owned()),
            admin
                .contains(&route)
                .then(|| "http://127.0.0.1:9070".to_owned()),
        ]
        .into_iter()
        .flatten()
        .collect();
        assert_eq!(
            servers, expected,
            "{method} {path}: the documented listeners"
        );
    }
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&routes).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "openapi/durin.yaml and durin::api::ROUTES disagree.\n\
         In ROUTES but missing from openapi/durin.yaml: {undocumented:?}\n\
         In openapi/durin.yaml but missing from ROUTES: {unserved:?}"
    );

    for (method, path) in &routes {
        let op = operation(&doc, method, path);
        assert!(
            op["responses"].as_mapping().is_some_and(|r| !r.is_empty()),
            "{method} {path} documents no response"
        );
        assert!(
            op["operationId"].as_str().is_some(),
            "{method} {path} has no operationId"
        );
        assert_eq!(
            path_parameters(&doc, method, path),
            placeholders(path),
            "{method} {path}: the documented path parameters differ from the placeholders"
        );
    }
}

#[tokio::test]
async fn gateway_serves_every_documented_route() {
    let doc = load("durin.yaml");
    let problem_schema = &doc["components"]["schemas"]["Problem"];
    let problem_fields = keys(&problem_schema["properties"]);
    let problem_types = strings(&problem_schema["properties"]["type"]["enum"]);

    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        database_url: format!("sqlite:{}", dir.path().join("durin.db").display()),
        ..Config::default()
    };
    let listeners = durin::Listeners {
        api: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let main = format!("http://{}", listeners.api.local_addr().unwrap());
    let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(durin::run(config, listeners, shutdown.clone()));
    let http = reqwest::Client::new();

    // Every route on its listener, plus requests that must be refused by the router, so
    // that the check below is known to be able to fail: among them every admin-only route
    // on the main listener (whoever reaches it must not register a deployment or read a
    // journal).
    let on =
        |base: &String, list: &[(&str, &str)]| -> Vec<(String, String, String, Option<&str>)> {
            list.iter()
                .map(|(m, p)| (base.clone(), m.to_string(), p.to_string(), None))
                .collect()
        };
    let mut requests = on(&main, durin::api::ROUTES);
    requests.extend(on(&admin, durin::api::ADMIN_ROUTES));
    requests.push((
        main.clone(),
        "GET".into(),
        "/v1/nope".into(),
        Some(NO_ROUTE),
    ));
    requests.push((
        main.clone(),
        "DELETE".into(),
        "/health".into(),
        Some(METHOD_NOT_ALLOWED),
    ));
    for (method, path) in durin::api::ADMIN_ROUTES {
        if !durin::api::ROUTES.contains(&(method, path)) {
            // A path the main listener serves with another method refuses this one.
            let shared_path = durin::api::ROUTES.iter().any(|(_, p)| p == path);
            requests.push((
                main.clone(),
                method.to_string(),
                path.to_string(),
                Some(if shared_path {
                    METHOD_NOT_ALLOWED
                } else {
                    NO_ROUTE
                }),
            ));
        }
    }

    for (base, method, path, refusal) in requests {
        let url = format!("{base}{}", fill(&path));
        let mut request = http.request(method.parse().unwrap(), &url);
        if method == "POST" {
            request = request.json(&json!({}));
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                shutdown.cancel();
                let ended = server.await;
                panic!("{method} {path}: no answer ({e}); the gateway ended with {ended:?}");
            }
        };
        let status = response.status().as_u16();
        let is_problem = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/problem+json"));
        let source = response
            .headers()
            .get("durin-error-source")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.text().await.unwrap();
        let problem_type = if is_problem {
            let problem: Json = serde_json::from_str(&body).unwrap_or_else(|e| {
                panic!("{method} {path}: problem body is not JSON ({e}): {body}")
            });
            let fields: BTreeSet<String> = problem.as_object().unwrap().keys().cloned().collect();
            for required in ["type", "title", "status", "detail", "retryable"] {
                assert!(
                    fields.contains(required),
                    "{method} {path}: problem without {required:?}: {body}"
                );
            }
            assert!(
                fields.is_subset(&problem_fields),
                "{method} {path}: problem fields {fields:?} are not all documented in Problem: {body}"
            );
            assert_eq!(problem["status"], json!(status), "{method} {path}: {body}");
            assert!(
                source.as_deref() == Some("gateway") || source.as_deref() == Some("handler"),
                "{method} {path}: problem without Durin-Error-Source: {body}"
            );
            let problem_type = problem["type"].as_str().unwrap_or_default().to_owned();
            assert!(
                problem_types.contains(&problem_type),
                "{method} {path}: problem type {problem_type:?} is not in the Problem schema's enum"
            );
            Some(problem_type)
        } else {
            None
        };

        match refusal {
            Some(expected) => assert_eq!(
                problem_type.as_deref(),
                Some(expected),
                "{method} {path} is not a route, yet the gateway answered {status}: {body}"
            ),
            None => {
                assert!(
                    problem_type.as_deref() != Some(NO_ROUTE)
                        && problem_type.as_deref() != Some(METHOD_NOT_ALLOWED),
                    "{method} {path} is in ROUTES and openapi/durin.yaml but the gateway's router does not serve it: {status} {body}"
                );
                assert!(
                    documents_status(&doc, &method, &path, status),
                    "{method} {path} answered {status}, which openapi/durin.yaml does not document for it: {body}"
                );
            }
        }
    }

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// The property names of `schema` equal the keys of `sample` (a value with every optional
/// field set), so every field is documented under its wire name and nothing else is.
fn assert_fields(doc: &Yaml, schema: &str, sample: &Json) {
    let documented = keys(&doc["components"]["schemas"][schema]["properties"]);
    let serialized: BTreeSet<String> = sample
        .as_object()
        .unwrap_or_else(|| panic!("sample of {schema} is not an object"))
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        documented, serialized,
        "schema {schema}: documented properties (left) differ from the serialized fields (right)"
    );
}

fn samples() -> Vec<(&'static str, Json)> {
    let policy = RetryPolicy {
        maximum_attempts: Some(5),
        non_retryable_error_types: vec!["CardDeclined".into()],
        ..RetryPolicy::default()
    };
    let failure = Failure {
        status: 402,
        error_type: Some("CardDeclined".into()),
        message: "declined".into(),
    };
    let handler = HandlerSpec {
        name: "process".into(),
        path: Some("/order/process".into()),
        retry_policy: Some(policy.clone()),
        start_to_close: Some(std::time::Duration::from_secs(30)),
        schedule_to_close: Some(std::time::Duration::from_secs(3600)),
        schedule_to_start: Some(std::time::Duration::from_secs(60)),
        heartbeat_timeout: Some(std::time::Duration::from_secs(10)),
        key: Some(durin_protocol::KeySpec::pointer("/customer").limit(2)),
    };
    let service = ServiceSpec {
        name: "order".into(),
        kind: ServiceKind::Service,
        handlers: vec![handler.clone()],
    };
    let entry = JournalEntry {
        index: 1,
        kind: EntryKind::Step,
        name: Some("charge".into()),
        value: Some(json!(1)),
        failure: Some(failure.clone()),
        attempt: 1,
        at_ms: 1,
        completion: Some(Completion {
            seq: 1,
            value: Some(json!("approve")),
            failure: Some(failure.clone()),
            at_ms: 2,
        }),
    };
    vec![
        ("RetryPolicy", value(&policy)),
        ("Failure", value(&failure)),
        ("HandlerSpec", value(&handler)),
        ("ServiceSpec", value(&service)),
        (
            "Discovery",
            value(&Discovery {
                protocol: PROTOCOL_VERSION,
                services: vec![service.clone()],
            }),
        ),
        ("JournalEntry", value(&entry)),
        (
            "InvocationRequest",
            value(&InvocationRequest {
                protocol: PROTOCOL_VERSION,
                invocation_id: SAMPLE_ID.into(),
                attempt: 1,
                attempt_token: "0123456789abcdef0123456789abcdef".into(),
                service: "order".into(),
                handler: "process".into(),
                input: json!({}),
                journal: vec![entry],
                position_failures: 0,
                context_url: "http://127.0.0.1:8080/v1/contexts/x".into(),
                suggest_continue_as_new: true,
                heartbeat_details: Some(json!({"done": 3})),
                position_since_ms: Some(1_764_438_000_000),
                updates: vec![durin_protocol::PendingUpdate {
                    id: "upd_0193a2b4c5d6e7f8091a2b3c4d5e6f70".into(),
                    name: "add".into(),
                    input: json!(5),
                }],
                replay: true,
                key_state: Some(serde_json::Map::from_iter([(
                    "balance".to_owned(),
                    json!(3),
                )])),
            }),
        ),
        (
            "AppendRequest",
            value(&AppendRequest {
                index: 1,
                kind: EntryKind::Step,
                name: Some("charge".into()),
                value: Some(json!(1)),
                failure: Some(failure),
                awaited: true,
            }),
        ),
        (
            "AppendResponse",
            value(&AppendResponse {
                index: 1,
                at_ms: 1,
                value: Some(json!({"wake_at_ms": 5})),
                completion: Some(Completion {
                    seq: 1,
                    value: None,
                    failure: None,
                    at_ms: 5,
                }),
                suggest_continue_as_new: true,
            }),
        ),
        (
            "EntryRef",
            value(&EntryRef {
                kind: EntryKind::Step,
                name: Some("charge".into()),
            }),
        ),
    ]
}

/// Version 6's lines: each sample has one property, the documented ones are the samples'
/// (no more, no fewer), and what each carries is its schema's.
#[test]
fn stream_frames_match_the_wire_types() {
    let doc = load("handler-protocol.yaml");
    let frames: Vec<(&str, Json)> = vec![
        (
            "HandlerFrame",
            value(&HandlerFrame::Append(AppendRequest {
                index: 2,
                kind: EntryKind::Step,
                name: Some("charge".into()),
                value: Some(json!(1)),
                failure: Some(Failure {
                    status: 402,
                    error_type: None,
                    message: "declined".into(),
                }),
                awaited: true,
            })),
        ),
        (
            "HandlerFrame",
            value(&HandlerFrame::Outcome(Outcome::Suspend {
                waiting_for: vec![2],
                wake_at_ms: None,
            })),
        ),
        (
            "GatewayFrame",
            value(&GatewayFrame::Appended(AppendResponse {
                index: 2,
                at_ms: 1,
                value: Some(json!({"wake_at_ms": 5})),
                completion: Some(Completion {
                    seq: 1,
                    value: None,
                    failure: None,
                    at_ms: 5,
                }),
                suggest_continue_as_new: true,
            })),
        ),
        // A refusal as the gateway sends it: the problem document of the context API.
        (
            "GatewayFrame",
            json!({ "refused": durin::problem::ApiError::Conflict("stale".into()).problem() }),
        ),
    ];
    let mut seen: std::collections::BTreeMap<&str, BTreeSet<String>> = Default::default();
    for (schema, sample) in &frames {
        let object = sample.as_object().expect("a frame is an object");
        assert_eq!(
            object.len(),
            1,
            "{schema}: a frame has one property: {sample}"
        );
        let (name, carried) = object.iter().next().expect("one property");
        let reference = doc["components"]["schemas"][*schema]["properties"][name.as_str()]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{schema}.{name} is not documented as a $ref"));
        let inner = reference
            .strip_prefix("#/components/schemas/")
            .expect("a local schema");
        if inner != "Outcome" {
            assert_fields(&doc, inner, carried);
        }
        seen.entry(*schema).or_default().insert(name.clone());
    }
    for (schema, names) in seen {
        assert_eq!(
            keys(&doc["components"]["schemas"][schema]["properties"]),
            names,
            "{schema}: documented properties (left) differ from the frames (right)"
        );
    }
}

fn value<T: serde::Serialize>(sample: &T) -> Json {
    serde_json::to_value(sample).expect("protocol types serialize")
}

/// One value of every outcome; the match makes a new variant a compile error here.
fn outcome_samples() -> Vec<Outcome> {
    let samples = vec![
        Outcome::Output {
            output: json!(1),
            entries: vec![AppendRequest {
                index: 3,
                kind: EntryKind::Step,
                name: Some("charge".into()),
                value: Some(json!({"charge_id": "ch_1"})),
                failure: None,
                awaited: false,
            }],
        },
        Outcome::Failure {
            failure: Failure {
                status: 500,
                error_type: Some("Boom".into()),
                message: "boom".into(),
            },
            entries: vec![AppendRequest {
                index: 2,
                kind: EntryKind::Step,
                name: Some("charge".into()),
                value: None,
                failure: Some(Failure {
                    status: 402,
                    error_type: Some("CardDeclined".into()),
                    message: "declined".into(),
                }),
                awaited: false,
            }],
        },
        Outcome::Retry {
            error: "boom".into(),
            error_type: Some("Boom".into()),
            retry_after_ms: Some(5),
            step: Some("charge".into()),
        },
        Outcome::Suspend {
            waiting_for: vec![3, 4],
            wake_at_ms: Some(1),
        },
        Outcome::NonDeterminism {
            index: 3,
            recorded: EntryRef {
                kind: EntryKind::Step,
                name: Some("reserve".into()),
            },
            requested: EntryRef {
                kind: EntryKind::Step,
                name: Some("charge".into()),
            },
            detail: Some("the value does not fit".into()),
        },
        Outcome::ContinueAsNew {
            input: json!({"cycle": 2}),
        },
        Outcome::ReplayEnd {
            index: 4,
            next: EntryRef {
                kind: EntryKind::Step,
                name: Some("notify".into()),
            },
        },
    ];
    let mut seen = [false; 7];
    for sample in &samples {
        let slot = match sample {
            Outcome::Output { .. } => 0,
            Outcome::Failure { .. } => 1,
            Outcome::Retry { .. } => 2,
            Outcome::Suspend { .. } => 3,
            Outcome::NonDeterminism { .. } => 4,
            Outcome::ContinueAsNew { .. } => 5,
            Outcome::ReplayEnd { .. } => 6,
        };
        seen[slot] = true;
    }
    assert!(seen.iter().all(|s| *s), "a sample is missing an outcome");
    samples
}

/// Every entry kind; the match makes a new variant a compile error here.
fn entry_kinds() -> Vec<EntryKind> {
    let kinds = vec![
        EntryKind::Input,
        EntryKind::Step,
        EntryKind::Now,
        EntryKind::Uuid,
        EntryKind::Random,
        EntryKind::Egress,
        EntryKind::Output,
        EntryKind::Sleep,
        EntryKind::Signal,
        EntryKind::Awakeable,
        EntryKind::State,
        EntryKind::Cancel,
        EntryKind::Call,
        EntryKind::Send,
        EntryKind::Patch,
        EntryKind::Update,
        EntryKind::UpdateResult,
    ];
    for kind in &kinds {
        match kind {
            EntryKind::Input
            | EntryKind::Step
            | EntryKind::Now
            | EntryKind::Uuid
            | EntryKind::Random
            | EntryKind::Egress
            | EntryKind::Output
            | EntryKind::Sleep
            | EntryKind::Signal
            | EntryKind::Awakeable
            | EntryKind::State
            | EntryKind::Cancel
            | EntryKind::Call
            | EntryKind::Send
            | EntryKind::Patch
            | EntryKind::Update
            | EntryKind::UpdateResult => {}
            // Never stored or sent: what a reader makes of a kind it does not know.
            EntryKind::Unknown => {}
        }
    }
    kinds
}

#[test]
fn handler_protocol_document_matches_the_wire_types() {
    let doc = load("handler-protocol.yaml");
    check_references(&doc, &doc);
    let schemas = &doc["components"]["schemas"];

    // Outcome: discriminator mapping, the variants' `outcome` constants and serde's tags.
    let outcome = &schemas["Outcome"];
    assert_eq!(
        outcome["discriminator"]["propertyName"].as_str(),
        Some("outcome")
    );
    let mapping = outcome["discriminator"]["mapping"]
        .as_mapping()
        .expect("Outcome has a discriminator mapping");
    let one_of: BTreeSet<String> = outcome["oneOf"]
        .as_sequence()
        .expect("Outcome is a oneOf")
        .iter()
        .map(|v| {
            v["$ref"]
                .as_str()
                .expect("oneOf entries are $refs")
                .to_owned()
        })
        .collect();
    let mapped: BTreeSet<String> = mapping
        .values()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        one_of, mapped,
        "Outcome: oneOf and the discriminator mapping differ"
    );
    let mut documented = BTreeSet::new();
    for (tag, reference) in mapping {
        let tag = tag.as_str().unwrap().to_owned();
        let variant = resolve(&doc, reference.as_str().unwrap());
        let constant = variant["properties"]["outcome"]["const"].as_str();
        assert_eq!(
            constant,
            Some(tag.as_str()),
            "the variant mapped from {tag:?} has outcome const {constant:?}"
        );
        documented.insert(tag);
    }
    let mut tags = BTreeSet::new();
    for sample in outcome_samples() {
        let json = serde_json::to_value(&sample).unwrap();
        let tag = json["outcome"].as_str().unwrap().to_owned();
        let reference = mapping
            .get(tag.as_str())
            .and_then(Yaml::as_str)
            .unwrap_or_else(|| panic!("outcome {tag:?} is not documented"));
        let schema = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{reference:?} is not under #/components/schemas"));
        assert_fields(&doc, schema, &json);
        tags.insert(tag);
    }
    assert_eq!(
        documented, tags,
        "Outcome variants documented (left) differ from durin_protocol::Outcome's tags (right)"
    );

    // EntryKind: the documented enum, the expected list and serde agree.
    let expected: BTreeSet<String> = [
        "input",
        "step",
        "now",
        "uuid",
        "random",
        "egress",
        "output",
        "sleep",
        "signal",
        "awakeable",
        "state",
        "cancel",
        "call",
        "send",
        "patch",
        "update",
        "update_result",
    ]
    .map(str::to_owned)
    .into();
    let serialized: BTreeSet<String> = entry_kinds()
        .iter()
        .map(|k| {
            serde_json::to_value(k)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(serialized, expected, "EntryKind serializes differently");
    assert_eq!(
        strings(&schemas["EntryKind"]["enum"]),
        expected,
        "handler-protocol.yaml EntryKind enum"
    );
    assert_eq!(
        strings(&load("durin.yaml")["components"]["schemas"]["EntryKind"]["enum"]),
        expected,
        "durin.yaml EntryKind enum"
    );

    // Every message's fields, under their wire names.
    for (schema, sample) in samples() {
        assert_fields(&doc, schema, &sample);
    }

    // RetryPolicy defaults as documented are the defaults of the type.
    let defaults = serde_json::to_value(RetryPolicy::default()).unwrap();
    let properties = &schemas["RetryPolicy"]["properties"];
    for (field, value) in defaults.as_object().unwrap() {
        let documented: Json =
            serde_json::to_value(&properties[field.as_str()]["default"]).unwrap();
        assert_eq!(
            &documented, value,
            "RetryPolicy.{field}: documented default differs from RetryPolicy::default()"
        );
    }

    // The invocation request's headers: exactly those the code sends. `SignedHeaders` is
    // what `src/engine/invoke.rs` fills in and sends (the non-empty ones), besides the
    // signature and, with traces on, `traceparent`. Built with every field (no `..`), so
    // a header added to it fails to compile here until it is listed and documented.
    let every = SignedHeaders {
        invocation_id: SAMPLE_ID,
        attempt: "2",
        attempt_token: "5f0c3a9e8b7d4e21a6c1f0b2d3e4a5b6",
        cancelled: "true",
        protocol: "4",
        replay: "true",
        workflow_id: "order-42",
    };
    let carried: Vec<&str> = every.carried().into_iter().map(|(name, _)| name).collect();
    assert_eq!(
        carried, SIGNED_HEADERS,
        "SignedHeaders::carried sends what SIGNED_HEADERS lists"
    );
    // Sent on every request to a deployment of this protocol: a first attempt of a plain
    // service call, not cancelled nor replayed, carries exactly these.
    let always = SignedHeaders {
        workflow_id: "",
        cancelled: "",
        replay: "",
        ..every
    };
    let invoke = &doc["paths"]["/{service}/{handler}"]["post"];
    let header_parameters = |required: Option<bool>| -> BTreeSet<String> {
        invoke["parameters"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| deref(&doc, p))
            .filter(|p| p["in"].as_str() == Some("header"))
            .filter(|p| required.is_none_or(|r| p["required"].as_bool() == Some(r)))
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let expected_headers: BTreeSet<String> = SIGNED_HEADERS
        .into_iter()
        .chain([HEADER_SIGNATURE, TRACEPARENT])
        .map(str::to_owned)
        .collect();
    assert_eq!(
        header_parameters(None),
        expected_headers,
        "the invocation request's headers: handler-protocol.yaml (left) and the code (right)"
    );
    let required: BTreeSet<String> = always
        .carried()
        .into_iter()
        .map(|(name, _)| name)
        .chain([HEADER_SIGNATURE])
        .map(str::to_owned)
        .collect();
    assert_eq!(
        header_parameters(Some(true)),
        required,
        "the invocation request's headers sent on every request are the required ones"
    );
    let protocol = &schemas["Discovery"]["properties"]["protocol"];
    assert_eq!(
        (protocol["minimum"].as_u64(), protocol["maximum"].as_u64()),
        (
            Some(u64::from(MIN_PROTOCOL_VERSION)),
            Some(u64::from(PROTOCOL_VERSION))
        ),
        "Discovery.protocol: the versions the gateway speaks"
    );
}

#[test]
fn shared_schemas_of_the_gateway_document_match_the_wire_types() {
    let doc = load("durin.yaml");
    let protocols: BTreeSet<String> = (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION)
        .map(|version| HandlerProtocol::Sdk { version })
        .chain([HandlerProtocol::Plain])
        .map(|p| {
            // A new protocol is a compile error here.
            match p {
                HandlerProtocol::Sdk { .. } | HandlerProtocol::Plain => p.to_text(),
            }
        })
        .collect();
    assert_eq!(
        strings(&doc["components"]["schemas"]["Deployment"]["properties"]["protocol"]["enum"]),
        protocols,
        "durin.yaml Deployment.protocol enum differs from HandlerProtocol"
    );
    let shared = [
        "RetryPolicy",
        "Failure",
        "HandlerSpec",
        "ServiceSpec",
        "AppendRequest",
        "AppendResponse",
    ];
    for (schema, sample) in samples() {
        if shared.contains(&schema) {
            assert_fields(&doc, schema, &sample);
        }
    }
    let defaults = serde_json::to_value(RetryPolicy::default()).unwrap();
    let properties = &doc["components"]["schemas"]["RetryPolicy"]["properties"];
    for (field, value) in defaults.as_object().unwrap() {
        let documented: Json =
            serde_json::to_value(&properties[field.as_str()]["default"]).unwrap();
        assert_eq!(
            &documented, value,
            "durin.yaml RetryPolicy.{field}: documented default differs from RetryPolicy::default()"
        );
    }
}

/// One error of every kind; the match makes a new variant a compile error here.
fn api_errors() -> Vec<ApiError> {
    let errors = vec![
        ApiError::BadRequest("bad".into()),
        ApiError::NotFound("missing".into()),
        ApiError::NoRoute {
            method: "GET".into(),
            path: "/nope".into(),
        },
        ApiError::MethodNotAllowed {
            method: "DELETE".into(),
            path: "/health".into(),
        },
        ApiError::PayloadTooLarge { limit: 1 },
        ApiError::UnsupportedMediaType("text/plain".into()),
        ApiError::Forbidden("not in the allow-list".into()),
        ApiError::Unauthenticated("no credentials".into()),
        ApiError::NotAllowed("outside its grants".into()),
        ApiError::IdempotencyKeyReused {
            key: "order-42".into(),
        },
        ApiError::Conflict("stale".into()),
        ApiError::Deployment {
            detail: "down".into(),
            retryable: true,
        },
        ApiError::InvocationFailed {
            status: 422,
            error_type: Some("CardDeclined".into()),
            message: "declined".into(),
            invocation_id: SAMPLE_ID.into(),
        },
        ApiError::InvocationPaused {
            invocation_id: SAMPLE_ID.into(),
            reason: "non-determinism".into(),
        },
        ApiError::Downstream("no answer".into()),
        ApiError::Storage("gone".into()),
        ApiError::ShuttingDown("stopping".into()),
        ApiError::Overloaded {
            detail: "too much waits".into(),
            retry_after: std::time::Duration::from_secs(1),
        },
        ApiError::WorkflowConflict {
            detail: "another input".into(),
            invocation_id: SAMPLE_ID.into(),
        },
        ApiError::UnknownQuery {
            detail: "no such state".into(),
            known: vec!["status".into()],
        },
        ApiError::Suspended("waits".into()),
        ApiError::Unauthorized,
        ApiError::JournalFull("full".into()),
        ApiError::InvocationState {
            detail: "ended".into(),
            invocation_id: SAMPLE_ID.into(),
        },
        ApiError::Cancelled("cancelled".into()),
        ApiError::Update {
            refused: true,
            status: 422,
            error_type: Some("Invalid".into()),
            message: "no".into(),
            update_id: "upd_0193a2b4c5d6e7f8091a2b3c4d5e6f70".into(),
        },
        ApiError::Update {
            refused: false,
            status: 500,
            error_type: None,
            message: "failed".into(),
            update_id: "upd_0193a2b4c5d6e7f8091a2b3c4d5e6f70".into(),
        },
        ApiError::DeploymentDiverged {
            detail: "1 of the 2 recorded runs replayed diverge".into(),
            report: json!({"replayed": 1, "diverged": 1, "failed": 0}),
        },
        ApiError::WebhookRefused("the signature does not match".into()),
    ];
    for error in &errors {
        match error {
            ApiError::BadRequest(_)
            | ApiError::NotFound(_)
            | ApiError::NoRoute { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::UnsupportedMediaType(_)
            | ApiError::Forbidden(_)
            | ApiError::Unauthenticated(_)
            | ApiError::NotAllowed(_)
            | ApiError::IdempotencyKeyReused { .. }
            | ApiError::Conflict(_)
            | ApiError::Deployment { .. }
            | ApiError::InvocationFailed { .. }
            | ApiError::InvocationPaused { .. }
            | ApiError::Downstream(_)
            | ApiError::Storage(_)
            | ApiError::ShuttingDown(_)
            | ApiError::Overloaded { .. }
            | ApiError::WorkflowConflict { .. }
            | ApiError::UnknownQuery { .. }
            | ApiError::Suspended(_)
            | ApiError::Unauthorized
            | ApiError::JournalFull(_)
            | ApiError::InvocationState { .. }
            | ApiError::Cancelled(_)
            | ApiError::Update { .. }
            | ApiError::DeploymentDiverged { .. }
            | ApiError::WebhookRefused(_) => {}
        }
    }
    errors
}

/// Every problem the code can produce (the egress's included, which no route of the main
/// listener shows) has a documented type, appears in the table of problem types with its
/// status, and uses only documented fields.
#[tokio::test]
async fn every_problem_the_code_produces_is_documented() {
    let doc = load("durin.yaml");
    let problem_schema = &doc["components"]["schemas"]["Problem"];
    let problem_fields = keys(&problem_schema["properties"]);
    let problem_types = strings(&problem_schema["properties"]["type"]["enum"]);
    let description = doc["info"]["description"].as_str().unwrap_or_default();
    let mut produced = BTreeSet::new();
    for error in api_errors() {
        let response = error.into_response();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let problem: Json = serde_json::from_slice(&body).unwrap();
        let problem_type = problem["type"].as_str().unwrap().to_owned();
        assert!(
            problem_types.contains(&problem_type),
            "problem type {problem_type:?} is not in the Problem schema's enum"
        );
        let fields: BTreeSet<String> = problem.as_object().unwrap().keys().cloned().collect();
        assert!(
            fields.is_subset(&problem_fields),
            "{problem_type}: fields {fields:?} are not all documented in Problem"
        );
        let slug = problem_type.trim_start_matches("urn:durin:problem:");
        let row = description
            .lines()
            .find(|line| line.starts_with(&format!("| `{slug}` |")))
            .unwrap_or_else(|| panic!("{problem_type} has no row in the table of problem types"));
        let documented_status = row.split('|').nth(2).unwrap_or_default();
        assert!(
            documented_status.contains(&status.to_string())
                || documented_status.contains("handler's"),
            "{problem_type}: answered {status}, the table says {documented_status:?}"
        );
        produced.insert(problem_type);
    }
    assert_eq!(
        produced, problem_types,
        "the Problem schema's enum (right) names types the code never produces (left)"
    );
}

/// Whether the concrete or templated `path` fits the template `route` (`{…}` matches any
/// one segment, on either side).
fn fits(route: &str, path: &str) -> bool {
    let (route, path): (Vec<&str>, Vec<&str>) =
        (route.split('/').collect(), path.split('/').collect());
    route.len() == path.len()
        && route
            .iter()
            .zip(&path)
            .all(|(r, p)| r == p || r.starts_with('{') || p.starts_with('{'))
}

/// The names of the query parameters a query string gives (`timeout=1h&key=k`: `timeout`,
/// `key`).
fn query_names(query: &str) -> BTreeSet<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, _)| name.to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

/// Every query parameter that `text` gives anywhere (`?key=K`, `&timeout=1h`).
fn query_names_in(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices(['?', '&']) {
        let name: String = text[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && text[at + 1 + name.len()..].starts_with('=') {
            found.insert(name);
        }
    }
    found
}

/// Every `METHOD /v1/...` that `text` names, with the query parameters it gives there.
fn named_routes(text: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut found: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for method in ["GET", "POST", "PUT", "DELETE"] {
        let needle = format!("{method} /v1/");
        let mut rest = text;
        while let Some(at) = rest.find(&needle) {
            let named: String = rest[at + method.len() + 1..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !matches!(c, '`' | ')' | ',' | '"'))
                .collect();
            let named = named.trim_end_matches('.');
            let (path, query) = named.split_once('?').unwrap_or((named, ""));
            found
                .entry((method.to_owned(), path.to_owned()))
                .or_default()
                .extend(query_names(query));
            rest = &rest[at + needle.len()..];
        }
    }
    found
}

/// The context API paths that `text` names with a query but no method or prefix
/// (`signals/approve?key=approve-2`, `f"signals/cancel?timeout=..."`): each path, under
/// `/v1/contexts/{id}/`, with the query parameters given there.
fn relative_context_queries(text: &str) -> Vec<(String, BTreeSet<String>)> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices('?') {
        let path: String = text[..at]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '{' | '}' | '-' | '_'))
            .collect::<Vec<char>>()
            .into_iter()
            .rev()
            .collect();
        let query: String = text[at + 1..]
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, '`' | ')' | ',' | '"' | '\''))
            .collect();
        let names = query_names(&query);
        if path.contains('/') && !path.starts_with('/') && !names.is_empty() {
            found.push((format!("/v1/contexts/{{id}}/{path}"), names));
        }
    }
    found
}

/// The rows of the context calls' table of `plain-http.md` §5: `(method, path under
/// /v1/contexts/{id}/, its answer cell, its "may suspend" cell, the query parameters its
/// call cell gives)`.
fn context_calls(text: &str) -> Vec<(String, String, String, String, BTreeSet<String>)> {
    text.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | `METHOD path` ... | body | answer | may suspend |
            let call = cells.get(1)?.strip_prefix('`')?;
            let (method, rest) = call.split_once(' ')?;
            if !["GET", "POST", "PUT", "DELETE"].contains(&method) || cells.len() < 6 {
                return None;
            }
            let path = rest.split(['`', '?']).next()?.to_owned();
            Some((
                method.to_owned(),
                path,
                cells[3].to_owned(),
                cells[4].to_owned(),
                query_names_in(cells[1]),
            ))
        })
        .collect()
}

/// `openapi/plain-http.md` (the plain contract in prose), `durin.yaml` and the code agree:
/// every route the prose names is documented and served; every context call of its table is
/// too, answering what the table says (`200`, or `204` where it says so) and, when the table
/// says it may suspend, documenting the `409` that carries `Durin-Suspended`; every
/// `Durin-*` header the prose names is documented in the YAML documents; and every header
/// Durin sends to a plain handler or answers it with is named in the prose.
#[test]
fn the_plain_contract_agrees_with_the_gateway_document_and_the_code() {
    let prose = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi/plain-http.md"),
    )
    .unwrap();
    let doc = load("durin.yaml");
    let documented = documented_routes(&doc);
    let served: Vec<(&str, &str)> = durin::api::ROUTES
        .iter()
        .chain(durin::api::ADMIN_ROUTES)
        .copied()
        .collect();
    let find = |method: &str, path: &str| -> String {
        assert!(
            served.iter().any(|(m, r)| *m == method && fits(r, path)),
            "plain-http.md names {method} {path}, which Durin does not serve"
        );
        documented
            .iter()
            .find(|(m, r)| m == method && fits(r, path))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| {
                panic!("plain-http.md names {method} {path}, which durin.yaml does not document")
            })
    };
    // Each query parameter the prose gives on a route is one of the operation's.
    let declares = |method: &str, route: &str, names: &BTreeSet<String>| {
        let declared = parameters(&doc, method, route, "query");
        for name in names {
            assert!(
                declared.contains(name),
                "plain-http.md gives {method} {route} the query parameter {name:?}, which \
                 durin.yaml does not declare (it declares {declared:?})"
            );
        }
    };
    // `POST {gateway}/v1/contexts/...`: the gateway's address left out.
    let named = named_routes(&prose.replace("{gateway}", ""));
    assert!(named.len() >= 10, "too few routes found: {named:?}");
    for ((method, path), names) in &named {
        let route = find(method, path);
        declares(method, &route, names);
    }
    assert!(
        named.values().any(|names| names.contains("timeout")),
        "the query of `POST /v1/contexts/{{id}}/signals/{{name}}?timeout=1h` was not read"
    );

    let calls = context_calls(&prose);
    assert!(calls.len() >= 14, "the context calls' table: {calls:?}");
    assert!(
        calls.iter().any(|call| call.4.contains("key")),
        "the table's `(optionally `?key=K`)` was not read: {calls:?}"
    );
    for (method, path, answer, suspends, names) in &calls {
        let route = find(method, &format!("/v1/contexts/{{id}}/{path}"));
        declares(method, &route, names);
        let status = if answer.contains("`204`") { 204 } else { 200 };
        assert!(
            documents_status(&doc, method, &route, status),
            "{method} {route}: the table answers {status}, durin.yaml does not document it"
        );
        if suspends.starts_with("yes") {
            let conflict = deref(&doc, &operation(&doc, method, &route)["responses"]["409"]);
            assert!(
                !keys(&conflict["headers"]).is_empty()
                    && conflict["headers"]["Durin-Suspended"].is_mapping(),
                "{method} {route} may suspend: its 409 must carry Durin-Suspended"
            );
        }
    }

    // A context path named with a query but no method (`signals/approve?key=approve-2`):
    // some operation on that route declares each parameter.
    let relative = relative_context_queries(&prose);
    assert!(
        relative.len() >= 2,
        "relative context queries: {relative:?}"
    );
    for (path, names) in &relative {
        let operations: Vec<&(String, String)> =
            documented.iter().filter(|(_, r)| fits(r, path)).collect();
        assert!(
            !operations.is_empty(),
            "plain-http.md names {path}, which durin.yaml does not document"
        );
        for name in names {
            assert!(
                operations
                    .iter()
                    .any(|(m, r)| parameters(&doc, m, r, "query").contains(name)),
                "plain-http.md gives {path} the query parameter {name:?}, which no operation \
                 of durin.yaml on that route declares"
            );
        }
    }

    let yaml_text = ["durin.yaml", "handler-protocol.yaml"]
        .map(|name| {
            std::fs::read_to_string(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("openapi")
                    .join(name),
            )
            .unwrap()
            .to_ascii_lowercase()
        })
        .join("\n");
    let mut headers = BTreeSet::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("Durin-") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if name.len() > "Durin-".len() && !name.ends_with('-') {
            headers.insert(name.to_ascii_lowercase());
        }
        rest = &rest[at + "Durin-".len()..];
    }
    for header in &headers {
        assert!(
            yaml_text.contains(header.as_str()),
            "plain-http.md names the header {header}, which neither YAML document does"
        );
    }
    // What Durin sends a plain handler: every signed header but `Durin-Protocol` (plain
    // handlers speak no protocol version), and its signature.
    let sent_to_plain: Vec<&str> = SIGNED_HEADERS
        .into_iter()
        .filter(|name| *name != HEADER_PROTOCOL)
        .chain([HEADER_SIGNATURE])
        .collect();
    assert!(sent_to_plain.contains(&durin_protocol::HEADER_REPLAY));
    for sent in sent_to_plain
        .iter()
        .chain(&[HEADER_SUSPENDED, HEADER_REPLAYED])
    {
        assert!(
            headers.contains(*sent),
            "Durin sends or answers {sent}, which plain-http.md does not name"
        );
    }

    // registerDeployment says what a plain handler gets, and how it answers a suspension
    // (plain-http.md §3: `202` with `Durin-Suspended: true`).
    let register = operation(&doc, "POST", "/v1/deployments")["description"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    for sent in &sent_to_plain {
        assert!(
            register.contains(sent),
            "registerDeployment does not say that a plain handler gets {sent}"
        );
    }
    let suspended = format!("{HEADER_SUSPENDED}: true");
    assert!(
        prose.to_ascii_lowercase().contains(&suspended)
            && register.contains(&suspended)
            && register.contains("`202`"),
        "registerDeployment does not say that a suspended plain handler answers `202` with \
         `Durin-Suspended: true`, as plain-http.md §3 does"
    );
}
