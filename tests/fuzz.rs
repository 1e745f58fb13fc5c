//! Requests generated from the routes `openapi/durin.yaml` documents, with path parameters,
//! headers and bodies drawn from valid, borderline and hostile values: Durin answers every
//! one without a 5xx of its own (a deployment it cannot reach is the one documented 502)
//! and without dying, every error is a problem document, and the order workflow still runs
//! afterwards. The draws come from a fixed seed, so a failure replays.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use durin::config::Config;
use serde_json::{json, Value};
use support::{client, register, ORDER, ORDER_OUTPUT};
use tokio_util::sync::CancellationToken;

/// A small deterministic generator (xorshift), so that a failing draw can be replayed.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn text(&mut self) -> String {
        let pool = [
            "order",
            "process",
            "approval",
            "run",
            "a",
            "9bad",
            "x.y-z_1",
            "%2e%2e",
            "..",
            "ünïcode",
            "inv_0193a2b4c5d6e7f8091a2b3c4d5e6f70",
            "inv_zz",
            "awk_0193a2b4c5d6e7f8091a2b3c4d5e6f70000000010000000000000000000000000000000000",
            "awk_",
            "%00",
            "'; DROP TABLE invocations; --",
        ];
        match self.below(4) {
            0 => "x".repeat(1 + self.below(300)),
            1 => format!("{}-{}", self.pick(&pool), self.next() % 1000),
            _ => self.pick(&pool).to_owned(),
        }
    }

    fn json(&mut self, depth: u32) -> Value {
        match (self.below(9), depth) {
            (0, _) => Value::Null,
            (1, _) => json!(self.next() as i64),
            (2, _) => json!(-1.5e300),
            (3, _) => json!(self.text()),
            (4, d) if d < 3 => Value::Array((0..self.below(4)).map(|_| self.json(d + 1)).collect()),
            (5, d) if d < 3 => {
                let mut map = serde_json::Map::new();
                for key in [
                    "url",
                    "services",
                    "input",
                    "signal",
                    "name",
                    "payload",
                    "message",
                    "status",
                    "duration",
                    "duration_ms",
                    "wake_at_ms",
                    "index",
                    "kind",
                    "value",
                    "deployment_id",
                    "set",
                    "clear",
                ] {
                    if self.below(3) == 0 {
                        map.insert(key.to_owned(), self.json(d + 1));
                    }
                }
                Value::Object(map)
            }
            (6, _) => {
                json!({"url": self.pick(&["http://127.0.0.1:1", "ftp://x", "http://[::1]:0", "not a url"])})
            }
            (7, _) => {
                json!({"index": self.next() % 5, "kind": self.pick(&["step", "sleep", "signal", "awakeable", "state", "output", "teleport"]), "name": self.text()})
            }
            _ => json!(true),
        }
    }

    fn body(&mut self) -> Vec<u8> {
        match self.below(6) {
            0 => Vec::new(),
            1 => b"{not json".to_vec(),
            2 => vec![0xff, 0xfe, 0x00],
            _ => serde_json::to_vec(&self.json(0)).unwrap(),
        }
    }
}

/// The path with each `{placeholder}` replaced by a drawn value, percent-encoded.
fn fill(path: &str, draw: &mut Draw) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let value = draw.text();
        out.push_str(&url_escape(&value));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_get_problems_never_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        database_url: format!("sqlite:{}", dir.path().join("durin.db").display()),
        call_wait: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let listeners = durin::Listeners {
        api: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let main = format!("http://{}", listeners.api.local_addr().unwrap());
    let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(durin::run(config, listeners, shutdown.clone()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    let routes: Vec<(&str, &str, &str)> = durin::api::ROUTES
        .iter()
        .map(|(m, p)| (main.as_str(), *m, *p))
        .chain(
            durin::api::ADMIN_ROUTES
                .iter()
                .map(|(m, p)| (admin.as_str(), *m, *p)),
        )
        .collect();
    let mut draw = Draw(0x5eed_d041_2026);
    for round in 0..1500 {
        let (base, method, path) = routes[draw.below(routes.len())];
        let url = format!("{base}{}", fill(path, &mut draw));
        let mut request = http.request(method.parse().unwrap(), &url);
        for (name, values) in [
            (
                "content-type",
                &[
                    "application/json",
                    "text/plain",
                    "application/x+json",
                    "text/json; charset=\"x\"",
                ][..],
            ),
            (
                "prefer",
                &[
                    "wait=1",
                    "wait=soon",
                    "respond-async",
                    "wait=99999999999999999999",
                ][..],
            ),
            ("idempotency-key", &["k", "key with space", "k-2"][..]),
            ("durin-attempt", &["1", "0", "-1", "4294967296", "x"][..]),
            ("durin-attempt-token", &["guess", ""][..]),
            ("authorization", &["Bearer x", ""][..]),
        ] {
            if draw.below(3) == 0 {
                request = request.header(name, draw.pick(values));
            }
        }
        if method != "GET" {
            request = request.body(draw.body());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {method} {url}: no answer: {e}"));
        let status = response.status().as_u16();
        let is_problem = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/problem+json"));
        let body = response.text().await.unwrap();
        if status >= 400 {
            assert!(
                is_problem,
                "round {round}: {method} {url}: {status} is not a problem: {body}"
            );
            let problem: Value = serde_json::from_str(&body).unwrap();
            if status >= 500 {
                assert!(
                    problem["type"] == "urn:durin:problem:deployment-unusable",
                    "round {round}: {method} {url}: Durin failed: {status} {body}"
                );
            }
        }
    }

    // Durin still serves: the order workflow runs.
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
}
