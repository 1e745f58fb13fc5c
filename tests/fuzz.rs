//! A property-based test of every route `openapi/durin.yaml` documents, with requests
//! generated from the document itself: each operation's path, query and header parameters
//! and its JSON body are drawn from their schemas (patterns, lengths, enums, bounds,
//! required properties), mixed with borderline and hostile values. The property: Durin
//! answers every request, never with a 5xx of its own (a deployment it cannot reach is the
//! one documented 502), every error is a problem document, and the order workflow still
//! runs afterwards. proptest draws from a fixed seed, so a failure replays, and shrinks a
//! failing request to a small one before it reports it.
//!
//! A second test holds the document to what the code enforces: requests drawn only from
//! the schemas, nothing hostile, are seldom refused with `400 bad-request` (a schema that
//! leaves out a constraint the code checks lets through requests the code refuses).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use durin::config::Config;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Map, Value};
use serde_yaml_ng::Value as Yaml;
use support::{client, register, InProcess, ORDER, ORDER_OUTPUT};
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
    /// `(name, in, schema, example, required)` of each parameter.
    parameters: Vec<(String, String, Value, Option<String>, bool)>,
    /// The JSON schema of the body, when the operation takes JSON.
    body: Option<Value>,
    /// The body's media type and the document's example of it, when the operation takes
    /// something else (a history file): what a conforming request sends.
    raw_body: Option<(String, Vec<u8>)>,
    /// Whether the body is required (`requestBody.required`).
    body_required: bool,
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
        let listeners_of = |servers: &Value| -> Vec<Listener> {
            match servers.as_array() {
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
            }
        };
        let path_listeners = listeners_of(&item["servers"]);
        for (method, operation) in item.as_object().unwrap() {
            let Some(operation) = operation.as_object().filter(|_| method != "servers") else {
                continue;
            };
            // An operation's own `servers` override its path's.
            let listeners = match operation.get("servers") {
                Some(servers) => listeners_of(servers),
                None => path_listeners.clone(),
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
                                p["required"] == true,
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let body = operation
                .get("requestBody")
                .and_then(|b| b["content"].get("application/json"))
                .map(|c| c["schema"].clone());
            let body_required = operation
                .get("requestBody")
                .is_some_and(|b| b["required"] == true);
            let raw_body = operation
                .get("requestBody")
                .and_then(|b| b["content"].as_object())
                .filter(|content| !content.contains_key("application/json"))
                .and_then(|content| {
                    content.iter().find_map(|(media, c)| {
                        c["example"]
                            .as_str()
                            .map(|example| (media.clone(), example.as_bytes().to_vec()))
                    })
                });
            operations.push(Operation {
                listeners: listeners.clone(),
                method: method.to_uppercase(),
                path: path.clone(),
                parameters,
                body,
                body_required,
                raw_body,
            });
        }
    }
    operations
}

/// Strings that a schema accepts (its pattern, or its length bounds), or, unless
/// `conforming`, now and then not quite.
fn string_for(schema: &Value, conforming: bool) -> BoxedStrategy<String> {
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
    if conforming {
        return valid
            .prop_filter("within minLength", move |s: &String| {
                s.chars().count() >= min
            })
            .boxed();
    }
    prop_oneof![
        12 => valid,
        2 => proptest::sample::select(HOSTILE).prop_map(str::to_owned),
        1 => "\\PC{0,300}",
        1 => (max + 1..max + 40).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

/// The schemas an object schema with `oneOf` (or `anyOf`) stands for, one per choice: the
/// object's own properties and requirements with the choice's added, without the
/// properties that only the other choices require (so that a value drawn from it matches
/// exactly one choice, as "exactly one of `a` and `b`" means). `allOf` is merged the same
/// way.
fn object_choices(schema: &Value) -> Vec<Value> {
    let mut base = schema.as_object().cloned().unwrap_or_default();
    // Conditionals in `allOf` are taken one at a time, in their order.
    if !base.contains_key("if") {
        if let Some(Value::Array(all)) = base.get_mut("allOf") {
            if let Some(at) = all.iter().position(|part| part.get("if").is_some()) {
                let conditional = all.remove(at);
                for keyword in ["if", "then"] {
                    base.insert(keyword.into(), conditional[keyword].clone());
                }
                return object_choices(&Value::Object(base));
            }
        }
    }
    // `if: {required: [a]}, then: S`: either `a` is there and S holds, or `a` is not there
    // (unless it is required already).
    if let (Some(condition), Some(then)) = (base.remove("if"), base.remove("then")) {
        let required_already = condition["required"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|name| {
                base.get("required")
                    .and_then(Value::as_array)
                    .is_some_and(|r| r.contains(name))
            });
        let base = Value::Object(base);
        if required_already {
            return object_choices(&merge(&base, &then));
        }
        let with = merge(
            &merge(&base, &then),
            &json!({"required": condition["required"]}),
        );
        let mut without = base.clone();
        for name in condition["required"].as_array().into_iter().flatten() {
            if let (Some(properties), Some(name)) =
                (without["properties"].as_object_mut(), name.as_str())
            {
                properties.remove(name);
            }
        }
        return [with, without].iter().flat_map(object_choices).collect();
    }
    let choices = base
        .remove("oneOf")
        .or_else(|| base.remove("anyOf"))
        .and_then(|c| c.as_array().cloned())
        .unwrap_or_else(|| vec![json!({})]);
    if let Some(all) = base.remove("allOf").and_then(|a| a.as_array().cloned()) {
        for part in all {
            base = merge(&Value::Object(base), &part)
                .as_object()
                .cloned()
                .unwrap();
        }
    }
    let required_by = |choice: &Value| -> Vec<String> {
        choice["required"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let base = Value::Object(base);
    let own = required_by(&base);
    choices
        .iter()
        .map(|choice| {
            let mut merged = merge(&base, choice);
            let mine = required_by(choice);
            let named = |name: &str| choice["properties"].get(name).is_some();
            for other in choices.iter().flat_map(required_by) {
                if !mine.contains(&other) && !own.contains(&other) && !named(&other) {
                    if let Some(properties) = merged["properties"].as_object_mut() {
                        properties.remove(&other);
                    }
                }
            }
            merged
        })
        .collect()
}

/// `base` with the properties and requirements of `more` added (and its other keywords).
fn merge(base: &Value, more: &Value) -> Value {
    let mut merged = base.as_object().cloned().unwrap_or_default();
    for (key, value) in more.as_object().into_iter().flatten() {
        match key.as_str() {
            "properties" => {
                let properties = merged
                    .entry("properties")
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .unwrap();
                for (name, schema) in value.as_object().into_iter().flatten() {
                    properties.insert(name.clone(), schema.clone());
                }
            }
            "required" => {
                let required = merged
                    .entry("required")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .unwrap();
                required.extend(value.as_array().into_iter().flatten().cloned());
            }
            "description" => {}
            _ => {
                merged.insert(key.clone(), value.clone());
            }
        }
    }
    Value::Object(merged)
}

/// Values whose constraint no schema keyword can state (their `description`s state it in
/// words): conforming requests draw them, wherever a property or a parameter of that
/// name appears, from this narrower schema, which keeps the constraint. Only a schema
/// that states what it can is narrowed (a string with a pattern, an integer), so that a
/// pattern the document leaves out is still found.
fn narrowed(name: &str, schema: &Value) -> Option<Value> {
    if schema.get("pattern").is_none() && schema["type"] != "integer" {
        return None;
    }
    Some(match name {
        // A durable timer (a sleep, a signal wait's timeout) lasts at most a year and a
        // day: a pattern cannot bound the sum of a humantime duration's parts. 999 hours
        // is less.
        "duration" | "timeout" => {
            json!({"type": "string", "pattern": "^[1-9][0-9]{0,2} ?(ms|s|m|h)$"})
        }
        // An instant at most a year and a day after the gateway's clock, which a schema
        // cannot name: these are all in the past (they fire at once).
        "wake_at_ms" => json!({"type": "integer", "maximum": 1_700_000_000_000_i64}),
        // A retry policy's `maximum_interval` must not be shorter than its
        // `initial_interval` (1 s and 100 s when absent), which relates two properties:
        // initial ones under a second, maximum ones of a second or more.
        "initial_interval" => json!({"type": "string", "pattern": "^[1-9][0-9]{0,2}ms$"}),
        // A schedule's offset and jitter must be shorter than its interval (1 s or more).
        "offset" | "jitter" => json!({"type": "string", "pattern": "^[1-9][0-9]{0,2}ms$"}),
        // A key's debounce lasts 1 ms to a day, and its bound at least as long, bounds a
        // pattern cannot state: debounces under a second, bounds of a minute or more; a
        // rate's period likewise.
        "debounce" => json!({"type": "string", "pattern": "^[1-9][0-9]{0,2}ms$"}),
        "debounce_max" => json!({"type": "string", "pattern": "^[1-9][0-9]?m$"}),
        "period" => json!({"type": "string", "pattern": "^[1-9][0-9]{0,2}(ms|s|m)$"}),
        // A time zone is a name the IANA database knows, which a pattern cannot list.
        "time_zone" => {
            json!({"type": "string", "enum": ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]})
        }
        "maximum_interval" => json!({"type": "string", "pattern": "^[1-9][0-9]{0,2}s$"}),
        // Not a constraint: a deployment's URL is asked for `/discover` when it comes
        // without services, and a drawn host would be looked up and connected to (for up
        // to 10 s). Loopback hosts answer at once; the paths and ports still vary.
        "url" | "deployment" => json!({
            "type": "string",
            "pattern": "^https?://(127[.]0[.]0[.]1|localhost|\\[::1\\]):[1-9][0-9]{0,3}(/[a-z0-9._~-]{1,12}){0,3}/?$"
        }),
        _ => return None,
    })
}

/// JSON values a schema describes, with, unless `conforming`, now and then a value of the
/// wrong type.
fn json_for(schema: &Value, depth: u32, conforming: bool) -> BoxedStrategy<Value> {
    let typed = match schema["type"].clone() {
        Value::String(t) => Some(t),
        // `[integer, 'null']`: one of them.
        Value::Array(types) => types.first().and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    if let Some(constant) = schema.get("const") {
        return Just(constant.clone()).boxed();
    }
    if conforming {
        if let Some(values) = schema["enum"].as_array() {
            return proptest::sample::select(values.clone()).boxed();
        }
        let combined = ["oneOf", "anyOf", "allOf", "if"]
            .iter()
            .any(|k| schema.get(*k).is_some());
        if combined && (typed.as_deref() == Some("object") || schema.get("properties").is_some()) {
            let choices: Vec<BoxedStrategy<Value>> = object_choices(schema)
                .iter()
                .map(|choice| json_for(choice, depth, true))
                .collect();
            return proptest::strategy::Union::new(choices).boxed();
        }
    }
    // Deep enough for every body the document describes, when conforming.
    let deep = if conforming { 12 } else { 4 };
    let right = match typed.as_deref() {
        Some("object") if depth < deep => {
            let properties: Vec<(String, Value, bool)> = schema["properties"]
                .as_object()
                .map(|p| {
                    let required: Vec<&str> = schema["required"]
                        .as_array()
                        .map(|r| r.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    p.iter()
                        // `false`: the property must not be there.
                        .filter(|(_, v)| !(conforming && **v == Value::Bool(false)))
                        .map(|(k, v)| {
                            let v = match conforming.then(|| narrowed(k, v)).flatten() {
                                Some(narrower) => narrower,
                                None => v.clone(),
                            };
                            (k.clone(), v, required.contains(&k.as_str()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = properties
                .into_iter()
                .map(|(name, schema, required)| {
                    let value = json_for(&schema, depth + 1, conforming);
                    let value = value.prop_map(move |v| (name.clone(), v));
                    match (required, conforming) {
                        (true, true) => value.prop_map(Some).boxed(),
                        (true, false) => proptest::option::weighted(0.95, value).boxed(),
                        (false, _) => proptest::option::weighted(0.5, value).boxed(),
                    }
                })
                .collect();
            fields
                .prop_map(|fields| Value::Object(fields.into_iter().flatten().collect()))
                .boxed()
        }
        Some("array") if depth < deep => {
            let items = json_for(&schema["items"], depth + 1, conforming);
            if conforming {
                let min = schema["minItems"].as_u64().unwrap_or(0) as usize;
                let max = schema["maxItems"].as_u64().map_or(min + 3, |m| m as usize);
                proptest::collection::vec(items, min..=max.min(min + 3))
            } else {
                proptest::collection::vec(items, 0..4)
            }
            .prop_map(Value::Array)
            .boxed()
        }
        Some("string") if schema["format"] == "uri" => {
            let mut urls = vec!["http://127.0.0.1:1", "http://[::1]:1/x"];
            if !conforming {
                urls.extend(["ftp://127.0.0.1", "not a url"]);
            }
            proptest::sample::select(urls)
                .prop_map(|s| json!(s))
                .boxed()
        }
        Some("string") => string_for(schema, conforming)
            .prop_map(Value::String)
            .boxed(),
        Some("integer") if conforming => {
            let (low, high) = match schema["format"].as_str() {
                Some("int32") => (i64::from(i32::MIN), i64::from(i32::MAX)),
                _ => (i64::MIN, i64::MAX),
            };
            let min = schema["minimum"].as_i64().unwrap_or(low).max(low);
            let max = schema["maximum"].as_i64().unwrap_or(high).min(high);
            let min = schema["exclusiveMinimum"]
                .as_i64()
                .map_or(min, |m| min.max(m + 1));
            let max = schema["exclusiveMaximum"]
                .as_i64()
                .map_or(max, |m| max.min(m - 1));
            (min..=max).prop_map(|n| json!(n)).boxed()
        }
        Some("integer") => {
            let min = schema["minimum"].as_i64().unwrap_or(i64::MIN);
            let max = schema["maximum"].as_i64().unwrap_or(i64::MAX);
            prop_oneof![min..=max, any::<i64>()]
                .prop_map(|n| json!(n))
                .boxed()
        }
        Some("number") if conforming && schema.get("minimum").is_some() => {
            let min = schema["minimum"].as_f64().unwrap();
            let max = schema["maximum"].as_f64().unwrap_or(1e15);
            (min..=max).prop_map(|f| json!(f)).boxed()
        }
        Some("number") => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f))
            .boxed(),
        Some("boolean") => any::<bool>().prop_map(|b| json!(b)).boxed(),
        _ => match schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
            Some(choices) if depth < deep => {
                let choices: Vec<BoxedStrategy<Value>> = choices
                    .iter()
                    .map(|c| json_for(c, depth + 1, conforming))
                    .collect();
                proptest::strategy::Union::new(choices).boxed()
            }
            _ => any_json(),
        },
    };
    if conforming {
        return right;
    }
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
/// parameter is sent or not), a body drawn from the body's schema, or garbage. With
/// `conforming`, only requests the document allows: required parameters always, values
/// that match their schemas, and a JSON body that matches the body's schema (or none, when
/// the body is optional).
fn requests(operation: Operation, conforming: bool) -> BoxedStrategy<Drawn> {
    let values: Vec<BoxedStrategy<Option<String>>> = operation
        .parameters
        .iter()
        .map(|(name, location, schema, example, required)| {
            let narrower = conforming.then(|| narrowed(name, schema)).flatten();
            let schema = narrower.as_ref().unwrap_or(schema);
            let value = match schema["type"].as_str() {
                Some("integer") => json_for(schema, 0, conforming)
                    .prop_map(|v| v.to_string().trim_matches('"').to_owned())
                    .boxed(),
                Some("boolean") if conforming => {
                    proptest::sample::select(vec!["true".to_owned(), "false".to_owned()]).boxed()
                }
                _ => string_for(schema, conforming),
            };
            // The document's example names what exists (the order service, its handler).
            let value = match example {
                Some(example) => prop_oneof![1 => Just(example.clone()), 2 => value].boxed(),
                None => value,
            };
            if location == "path" || (conforming && *required) {
                value.prop_map(Some).boxed()
            } else {
                proptest::option::of(value).boxed()
            }
        })
        .collect();
    let body: BoxedStrategy<Option<Vec<u8>>> = match (&operation.body, conforming) {
        (Some(schema), false) => prop_oneof![
            8 => json_for(schema, 0, false).prop_map(|v| Some(serde_json::to_vec(&v).unwrap())),
            1 => Just(Some(b"{not json".to_vec())),
            1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Some),
        ]
        .boxed(),
        (None, false) => {
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)).boxed()
        }
        (Some(schema), true) => {
            let json = json_for(schema, 0, true).prop_map(|v| serde_json::to_vec(&v).unwrap());
            if operation.body_required {
                json.prop_map(Some).boxed()
            } else {
                proptest::option::weighted(0.8, json).boxed()
            }
        }
        (None, true) => Just(operation.raw_body.clone().map(|(_, body)| body)).boxed(),
    };
    let content_type = if conforming {
        // Set below, with the body.
        Just(None).boxed()
    } else {
        proptest::option::weighted(
            0.8,
            proptest::sample::select(vec![
                "application/json",
                "application/json",
                "application/json",
                "text/plain",
                "application/x+json",
                "text/json; charset=\"x\"",
            ]),
        )
        .boxed()
    };
    let listener = proptest::sample::select(operation.listeners.clone());
    (values, body, content_type, listener)
        .prop_map(move |(values, body, content_type, listener)| {
            let mut target = operation.path.clone();
            let mut query = Vec::new();
            let mut headers = Vec::new();
            for ((name, location, _, _, _), value) in operation.parameters.iter().zip(values) {
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
            let body = (operation.method != "GET").then_some(body).flatten();
            let raw_type = operation.raw_body.as_ref().map(|(media, _)| media.as_str());
            let content_type = match conforming {
                true => body
                    .as_ref()
                    .map(|_| raw_type.unwrap_or("application/json")),
                false => content_type,
            };
            Drawn {
                listener,
                method: operation.method.clone(),
                target,
                headers,
                content_type: content_type.map(str::to_owned),
                body,
            }
        })
        .boxed()
}

/// Serves the order example in this process and registers it with the gateway at `admin`.
async fn serve_order(admin: &str) {
    let order = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let order_url = format!("http://{}", order.local_addr().unwrap());
    let args = order_example::Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        step_delay_ms: 0,
        downstream: None,
        step_retry_initial_ms: 20,
        reserve_first: false,
    };
    tokio::spawn(order_example::endpoint(args).serve(order));
    register(admin, &order_url).await;
}

/// Sends `drawn` to the listener it names, leaving out a header value no HTTP client can
/// send (`skip_unsendable`) or failing on it; answers its URL and Durin's response.
async fn send(
    http: &reqwest::Client,
    main: &str,
    admin: &str,
    drawn: &Drawn,
    skip_unsendable: bool,
) -> Result<(String, reqwest::Response), String> {
    let base = match drawn.listener {
        Listener::Main => main,
        Listener::Admin => admin,
    };
    let url = format!("{base}{}", drawn.target);
    let mut request = http.request(drawn.method.parse().unwrap(), &url);
    for (name, value) in &drawn.headers {
        match reqwest::header::HeaderValue::from_str(value) {
            Ok(value) => request = request.header(name, value),
            // A value no HTTP client can send is not a request Durin can get.
            Err(_) if skip_unsendable => {}
            Err(e) => return Err(format!("{} {url}: no answer: {name}: {e}", drawn.method)),
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
    Ok((url, response))
}

/// Sends one request; `Err` says how the property failed.
async fn check(
    http: &reqwest::Client,
    main: &str,
    admin: &str,
    drawn: &Drawn,
) -> Result<(), String> {
    let (url, response) = send(http, main, admin, drawn, true).await?;
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

    runtime.block_on(serve_order(&admin));

    let doc = document();
    let operations = operations(&doc);
    assert!(
        operations.len() >= durin::api::ROUTES.len(),
        "the document lists every route"
    );
    let strategy =
        proptest::strategy::Union::new(operations.into_iter().map(|o| requests(o, false)));
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

/// How many schema-conforming requests are drawn for each operation.
const CONFORMING_CASES: usize = 100;

/// The share of its conforming requests (in percent) an operation may refuse with `400
/// bad-request` before the test fails. Not zero, because a few constraints cannot be
/// stated in a schema and are not narrowed by [`narrowed`] (names unique within a list,
/// members of a `first` that name the same command), so a conforming draw may still
/// break one now and then. Small, because a constraint the document leaves out is
/// broken by far more draws than that: an optional property or parameter is drawn in half
/// of the requests, a required one in all of them, and a value drawn freely from a type
/// (any string, any integer) almost never meets an unstated pattern, enum or bound.
const MAX_REFUSED_PERCENT: usize = 10;

/// The status a conforming request got and, when it was `400 bad-request`, the problem's
/// detail.
async fn bad_request(
    http: &reqwest::Client,
    gateway: &InProcess,
    drawn: &Drawn,
) -> Result<(u16, Option<String>), String> {
    let (_, response) = send(http, &gateway.url, &gateway.admin, drawn, false).await?;
    let status = response.status().as_u16();
    if status != 400 {
        return Ok((status, None));
    }
    let problem: Value = response.json().await.unwrap_or_default();
    // Only Durin's own refusal counts: a handler's failure with status 400 is the
    // invocation's outcome, not a refusal of the request.
    if problem["type"] != "urn:durin:problem:bad-request" {
        return Ok((status, None));
    }
    let detail = problem["detail"].as_str().unwrap_or_default().to_owned();
    Ok((status, Some(detail)))
}

/// A drawn request, as a line of a report.
fn describe(drawn: &Drawn) -> String {
    let mut line = format!("{} {}", drawn.method, drawn.target);
    for (name, value) in &drawn.headers {
        line.push_str(&format!("\n      {name}: {value}"));
    }
    if let Some(body) = &drawn.body {
        line.push_str(&format!("\n      body: {}", String::from_utf8_lossy(body)));
    }
    line
}

/// The other side of the fuzz test above: requests that conform to `openapi/durin.yaml`
/// (every value drawn from its schema, nothing hostile) are not refused as malformed. A
/// `400 bad-request` for one of them means the code enforces a constraint the document
/// does not state. Answers about state (`404` for an invocation or a workflow that does
/// not exist, `409`, `422`, ...) are what such requests may get and are not counted; only
/// `400 bad-request` is "the document allowed it, the code refused it".
#[test]
fn requests_that_conform_to_the_openapi_document_are_not_refused_as_malformed() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gateway = runtime.block_on(async {
        let gateway =
            InProcess::start(|config| config.call_wait = Duration::from_millis(500)).await;
        serve_order(&gateway.admin).await;
        gateway
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    let doc = document();
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for operation in operations(&doc) {
        let name = format!("{} {}", operation.method, operation.path);
        let strategy = requests(operation, true);
        let mut refused = 0;
        let mut example = None;
        let started = std::time::Instant::now();
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for _ in 0..CONFORMING_CASES {
            let drawn = strategy.new_tree(&mut runner).unwrap().current();
            let answer = runtime.block_on(bad_request(&http, &gateway, &drawn));
            let (status, refusal) = answer.unwrap();
            *statuses.entry(status).or_default() += 1;
            if let Some(detail) = refusal {
                refused += 1;
                example.get_or_insert((drawn, detail));
            }
        }
        let statuses: Vec<String> = statuses
            .iter()
            .map(|(status, n)| format!("{status}x{n}"))
            .collect();
        report.push(format!(
            "{refused:>3}/{CONFORMING_CASES} {name}  [{}; {} ms]",
            statuses.join(" "),
            started.elapsed().as_millis()
        ));
        if let Some((drawn, detail)) =
            example.filter(|_| refused * 100 > MAX_REFUSED_PERCENT * CONFORMING_CASES)
        {
            failures.push(format!(
                "{name}: {refused} of {CONFORMING_CASES} conforming requests refused with 400, e.g.\n    {}\n    -> {detail}",
                describe(&drawn)
            ));
        }
    }
    println!("conforming requests refused with 400 bad-request, per operation:");
    for line in &report {
        println!("  {line}");
    }
    runtime.block_on(gateway.stop());
    assert!(
        failures.is_empty(),
        "openapi/durin.yaml allows requests the gateway refuses as malformed (more than {MAX_REFUSED_PERCENT} %):\n{}",
        failures.join("\n")
    );
}
