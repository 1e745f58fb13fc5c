//! Callers you can trust: the gateway in-process with `[auth]` on (API keys, JWTs signed
//! HS256 and ES256), the order example (its approval workflow) registered. Every route of
//! the main listener is refused without credentials, a caller outside its grants gets 403
//! whether or not what it named exists, answers show `idempotency_key` and `last_error`
//! only to readers, and the handlers' context API keeps working under it.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use durin::auth::{ApiKeyConfig, AuthConfig, JwtConfig};
use serde_json::{json, Value};
use support::{client, eventually, register, InProcess};

const OPS: &str = "ops-key-0123456789abcdef";
const STARTER: &str = "starter-key-0123456789abcdef";
const READER: &str = "reader-key-0123456789abcdef";
const SENDER: &str = "sender-key-0123456789abcdef";
const CANCELLER: &str = "canceller-key-0123456789abcdef";
const GITHUB_SECRET: &str = "github-secret";
const HS_SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";

fn key(name: &str, key: &str, grants: &[&str]) -> ApiKeyConfig {
    ApiKeyConfig {
        name: name.into(),
        sha256: None,
        key: Some(key.into()),
        grants: grants.iter().map(|g| (*g).to_owned()).collect(),
    }
}

struct World {
    gateway: InProcess,
    es256_private: String,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let es256 = rcgen::KeyPair::generate().unwrap();
    let public = dir.path().join("es256.pem");
    std::fs::write(&public, es256.public_key_pem()).unwrap();
    let auth = AuthConfig {
        api_keys: vec![
            key("ops", OPS, &["*:*"]),
            key(
                "starter",
                STARTER,
                &["start:approval", "signal:approval", "query:approval"],
            ),
            key("reader", READER, &["read:approval"]),
            key("sender", SENDER, &["call:order/*"]),
            key("canceller", CANCELLER, &["cancel:approval"]),
        ],
        jwt: Some(JwtConfig {
            hs256_secret: Some(HS_SECRET.into()),
            rs256_public_key: None,
            es256_public_key: Some(public),
            jwks_file: None,
            issuer: Some("https://issuer.example".into()),
            audience: Some("durin".into()),
            grants_claim: "scope".into(),
        }),
    };
    let github = durin::webhooks::SourceConfig {
        source: "github".into(),
        scheme: "github".into(),
        secrets: vec![GITHUB_SECRET.into()],
        header: None,
        prefix: None,
        tolerance: None,
        event_id: None,
        event_type: None,
        routes: vec![durin::webhooks::RouteConfig {
            event_type: None,
            start: Some("approval".into()),
            signal: None,
            workflow: None,
            with_start: false,
            send: None,
            id: Some("/request".into()),
        }],
    };
    let gateway = InProcess::start(move |config| {
        config.auth = auth;
        config.webhooks = vec![github];
    })
    .await;
    let handler = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handler_url = format!("http://{}", handler.local_addr().unwrap());
    let args = order_example::Args {
        listen: handler.local_addr().unwrap(),
        step_delay_ms: 0,
        downstream: None,
        step_retry_initial_ms: 10,
        reserve_first: false,
    };
    tokio::spawn(order_example::endpoint(args).serve(handler));
    register(&gateway.admin, &handler_url).await;
    World {
        gateway,
        es256_private: es256.serialize_pem(),
        _dir: dir,
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

impl World {
    fn es256(&self, claims: Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_pem(self.es256_private.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let url = format!("{}{path}", self.gateway.url);
        let mut request = client().request(method.parse().unwrap(), url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, headers)
    }
}

fn approval(request: &str) -> Value {
    json!({"request": request, "deadline_secs": 3600})
}

#[tokio::test]
async fn callers_are_held_to_their_grants_on_every_route() {
    let w = world().await;

    // No credentials, or credentials that do not hold: 401, and nothing is started.
    let (status, problem, headers) = w
        .send(
            "POST",
            "/v1/workflows/approval/w1",
            None,
            Some(approval("r1")),
        )
        .await;
    assert_eq!(status, 401, "{problem}");
    assert_eq!(problem["type"], "urn:durin:problem:unauthenticated");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, _, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/w1",
            Some("not-a-key"),
            Some(approval("r1")),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _, _) = w
        .send("GET", "/v1/workflows/approval/w1", Some(OPS), None)
        .await;
    assert_eq!(status, 404, "nothing was started");

    // The starter starts, signals and queries; the run goes on through the context API
    // (the handler's own token), which credentials do not gate.
    let (status, started, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/w1",
            Some(STARTER),
            Some(approval("r1")),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let run_id = started["invocation_id"].as_str().unwrap().to_owned();
    let (status, _, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/w1/signals/cancel",
            Some(STARTER),
            Some(json!("no")),
        )
        .await;
    assert_eq!(status, 202);
    let query = "/v1/workflows/approval/w1/queries/is_cancelled".to_owned();
    eventually(Duration::from_secs(20), "the signal taken", || {
        let query = query.clone();
        let w = &w;
        async move {
            let (status, value, _) = w.send("GET", &query, Some(STARTER), None).await;
            (status == 200 && value == json!(true)).then_some(())
        }
    })
    .await;

    // Outside its grants, the same answer whether or not the target exists.
    for path in ["/v1/workflows/approval/w1", "/v1/workflows/approval/nope"] {
        let (status, problem, _) = w.send("GET", path, Some(STARTER), None).await;
        assert_eq!(status, 403, "{path}: {problem}");
        assert_eq!(problem["type"], "urn:durin:problem:forbidden");
    }
    let (status, _, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/w1/cancel",
            Some(STARTER),
            None,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _, _) = w
        .send(
            "POST",
            "/v1/workflows/tally/w1",
            Some(STARTER),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 403, "approval only");
    let mut refusals = Vec::new();
    for id in [run_id.as_str(), "inv_0000000000000000000000000000000f"] {
        let (status, problem, _) = w
            .send("GET", &format!("/v1/invocations/{id}"), Some(STARTER), None)
            .await;
        assert_eq!(status, 403, "{id}");
        refusals.push(problem);
        let (status, _, _) = w
            .send("GET", &format!("/v1/invocations/{id}"), Some(READER), None)
            .await;
        assert_eq!(status, if id == run_id { 200 } else { 403 }, "{id}");
    }
    assert_eq!(
        refusals[0], refusals[1],
        "a refusal says nothing of what exists"
    );
    // HEAD is a read.
    let (status, _, _) = w
        .send("HEAD", "/v1/workflows/approval/w1", Some(STARTER), None)
        .await;
    assert_eq!(status, 403);
    // A caller who may read everything is told what does not exist.
    let (status, _, _) = w
        .send(
            "GET",
            "/v1/invocations/inv_0000000000000000000000000000000f",
            Some(OPS),
            None,
        )
        .await;
    assert_eq!(status, 404);

    // The reader reads; it may not start.
    let (status, view, _) = w
        .send("GET", "/v1/workflows/approval/w1", Some(READER), None)
        .await;
    assert_eq!(status, 200, "{view}");
    let (status, _, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/w2",
            Some(READER),
            Some(approval("r2")),
        )
        .await;
    assert_eq!(status, 403);

    // idempotency_key is shown only to who may read: the sender may call order/* but not
    // read what it started; ops may.
    let response = client()
        .post(format!("{}/v1/send/order/process", w.gateway.url))
        .bearer_auth(SENDER)
        .header("idempotency-key", "order-a")
        .json(&json!({"order_id": "a", "customer_id": "c", "amount_cents": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let sent: Value = response.json().await.unwrap();
    let location = sent["location"].as_str().unwrap().to_owned();
    let (status, _, _) = w.send("GET", &location, Some(SENDER), None).await;
    assert_eq!(status, 403);
    let (status, view, _) = w.send("GET", &location, Some(OPS), None).await;
    assert_eq!(status, 200);
    assert_eq!(view["idempotency_key"], "order-a", "{view}");

    // A problem quotes an invocation's last error only to who may read it: a run paused
    // by an operator, then cancelled by a caller who may cancel but not read.
    let (status, started, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/w4",
            Some(OPS),
            Some(approval("r4")),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let w4 = started["invocation_id"].as_str().unwrap().to_owned();
    let admin = w.gateway.admin.clone();
    eventually(Duration::from_secs(20), "w4 waiting", || {
        let url = format!("{admin}/v1/invocations/{w4}");
        async move {
            let view: Value = client().get(url).send().await.ok()?.json().await.ok()?;
            (view["status"] == "suspended").then_some(())
        }
    })
    .await;
    let paused = client()
        .post(format!("{}/v1/invocations/{w4}/pause", w.gateway.admin))
        .send()
        .await
        .unwrap();
    assert!(paused.status().is_success(), "{}", paused.status());
    let (status, problem, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/w4/cancel",
            Some(CANCELLER),
            None,
        )
        .await;
    assert_eq!(status, 409, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(!detail.contains("paused by an operator"), "{detail}");
    let (status, problem, _) = w
        .send("POST", "/v1/workflows/approval/w4/cancel", Some(OPS), None)
        .await;
    assert_eq!(status, 409, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("paused by an operator"),
        "{problem}"
    );
    let (status, _, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/w3",
            Some(SENDER),
            Some(approval("r3")),
        )
        .await;
    assert_eq!(status, 403);

    // `webhook:` keys belong to the webhook ingress.
    let response = client()
        .post(format!("{}/v1/send/order/process", w.gateway.url))
        .bearer_auth(OPS)
        .header("idempotency-key", "webhook:stripe:evt_1")
        .json(&json!({"order_id": "x", "customer_id": "c", "amount_cents": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // The admin listener keeps its own token (none here) and sees everything.
    let view: Value = client()
        .get(format!("{}/v1/invocations/{run_id}", w.gateway.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["id"], run_id);
}

#[tokio::test]
async fn jwts_carry_their_grants_in_scope() {
    let w = world().await;
    let good = json!({
        "sub": "ci-pipeline", "iss": "https://issuer.example", "aud": "durin",
        "exp": now_secs() + 300, "scope": "openid start:approval read:approval"
    });
    let hs = hs256(good.clone());
    let (status, started, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/j1",
            Some(&hs),
            Some(approval("j1")),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let es = w.es256(good.clone());
    let (status, view, _) = w
        .send("GET", "/v1/workflows/approval/j1", Some(&es), None)
        .await;
    assert_eq!(status, 200, "{view}");
    let (status, _, _) = w
        .send(
            "POST",
            "/v1/workflows/approval/j1/signals/cancel",
            Some(&es),
            Some(json!("x")),
        )
        .await;
    assert_eq!(status, 403, "scope has no signal");

    let mut expired = good.clone();
    expired["exp"] = json!(now_secs() - 3600);
    let mut stranger = good.clone();
    stranger["aud"] = json!("someone-else");
    let mut elsewhere = good.clone();
    elsewhere["iss"] = json!("https://evil.example");
    let mut no_audience = good.clone();
    no_audience.as_object_mut().unwrap().remove("aud");
    let mut no_issuer = good.clone();
    no_issuer.as_object_mut().unwrap().remove("iss");
    let mut not_yet = good.clone();
    not_yet["nbf"] = json!(now_secs() + 3600);
    for (what, token) in [
        ("expired", hs256(expired)),
        ("another audience", hs256(stranger)),
        ("another issuer", w.es256(elsewhere)),
        ("no audience", hs256(no_audience)),
        ("no issuer", w.es256(no_issuer)),
        ("not valid yet", hs256(not_yet)),
    ] {
        let (status, problem, _) = w
            .send("GET", "/v1/workflows/approval/j1", Some(&token), None)
            .await;
        assert_eq!(status, 401, "{what}: {problem}");
    }
    // Signed with a key Durin does not know.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &good,
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!").unwrap(),
    )
    .unwrap();
    let (status, _, _) = w
        .send("GET", "/v1/workflows/approval/j1", Some(&forged), None)
        .await;
    assert_eq!(status, 401);
}

/// A webhook delivery carries no caller credentials: its signature lets it in, and the
/// start it asks for goes through under auth.
#[tokio::test]
async fn a_signed_webhook_passes_without_caller_credentials() {
    use hmac::Mac;
    let w = world().await;
    let body = serde_json::to_vec(&approval("from-github")).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let signature = format!("sha256={}", durin::http::hex(&mac.finalize().into_bytes()));
    let response = client()
        .post(format!("{}/v1/webhooks/github", w.gateway.url))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "d-1")
        .header("x-hub-signature-256", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let (status, view, _) = w
        .send("GET", "/v1/workflows/approval/from-github", Some(OPS), None)
        .await;
    assert_eq!(status, 200, "{view}");
}
