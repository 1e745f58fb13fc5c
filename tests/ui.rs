//! The web UI in a real browser: headless Chromium (Debian's `chromium`), driven over the
//! DevTools protocol, against the real `durin` binary and the order example. It lists the
//! invocations, opens one and reads its timeline, then pauses and resumes a waiting
//! workflow with the page's buttons, and checks through the API that each click did it.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Headless Chromium with its DevTools endpoint on a port of its own.
struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--remote-debugging-port=0",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            // Its singleton socket goes in the temporary directory, and a killed Chromium
            // leaves it: in the profile, it goes with the profile.
            .env("TMPDIR", profile.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (the Debian package `chromium`) must be installed for this test");
        // Chromium writes the port it chose into its profile.
        let started = Instant::now();
        let port = loop {
            let file = profile.path().join("DevToolsActivePort");
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|text| text.lines().next().and_then(|p| p.trim().parse().ok()))
            {
                break port;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromium did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Browser {
            child,
            profile,
            port,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Chromium's other processes outlive the first by a moment and may still write
        // into the profile: its removal is tried again until they are gone.
        let path = self.profile.path();
        let deadline = Instant::now() + Duration::from_secs(5);
        while path.exists() && Instant::now() < deadline {
            if std::fs::remove_dir_all(path).is_err() || path.exists() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One page of the browser, spoken to over its DevTools websocket.
struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Page {
    async fn open(browser: &Browser) -> Page {
        let targets: Vec<Value> = client()
            .get(format!("http://127.0.0.1:{}/json/list", browser.port))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = targets.iter().find(|t| t["type"] == "page").unwrap();
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Page { socket, next: 1 }
    }

    /// Runs a DevTools command and returns its result.
    async fn command(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(message)).await.unwrap();
        loop {
            let message = self.socket.next().await.unwrap().unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is true.
    async fn until(&mut self, expression: &str, what: &str) {
        let started = Instant::now();
        while self.eval(expression).await != json!(true) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_shows_the_timeline_and_its_buttons_pause_and_resume() {
    if !(require("chromium") && require_store()) {
        return;
    }
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let handler = start_order(None, &[]);
    register(&gateway.admin, &handler.url).await;
    let order = send_order(&gateway.url, ORDER).await;
    wait_final(&gateway.url, &order).await;
    let started: Value = client()
        .post(format!("{}/v1/workflows/approval/ui-1", gateway.url))
        .json(&json!({"request": "ui-1", "deadline_secs": 3600}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let waiting = started["invocation_id"].as_str().unwrap().to_owned();
    let status = |id: String| {
        let url = format!("{}/v1/invocations/{id}", gateway.url);
        async move { get_json(&url).await["status"].as_str().unwrap().to_owned() }
    };
    eventually(Duration::from_secs(10), "the workflow to wait", || async {
        (status(waiting.clone()).await == "suspended").then_some(())
    })
    .await;

    let browser = Browser::start();
    let mut page = Page::open(&browser).await;
    page.command(
        "Page.navigate",
        json!({"url": format!("{}/ui", gateway.admin)}),
    )
    .await;
    // The list, then a click on the order: its timeline, step by step.
    page.until(
        &format!("document.querySelector('tr.row[data-id=\"{order}\"]') !== null"),
        "the order in the list",
    )
    .await;
    page.eval(&format!(
        "document.querySelector('tr.row[data-id=\"{order}\"]').click()"
    ))
    .await;
    page.until(
        "document.querySelectorAll('#timeline li.entry').length === 5",
        "the order's timeline",
    )
    .await;
    let steps = page
        .eval("[...document.querySelectorAll('#timeline li[data-kind=step]')].map(e => e.dataset.name)")
        .await;
    assert_eq!(
        steps,
        json!(["charge_payment", "reserve_inventory", "send_confirmation"])
    );

    // The waiting workflow: pause it with its button, then resume it.
    page.eval(&format!("location.hash = '#/invocations/{waiting}'"))
        .await;
    page.until(
        "document.getElementById('verb-pause') !== null",
        "the pause button",
    )
    .await;
    page.eval("document.getElementById('verb-pause').click()")
        .await;
    page.until(
        "document.querySelector('.card .status').textContent === 'paused'",
        "the page to show it paused",
    )
    .await;
    assert_eq!(status(waiting.clone()).await, "paused");
    page.eval("document.getElementById('verb-resume').click()")
        .await;
    page.until(
        "document.querySelector('.card .status').textContent === 'suspended'",
        "the page to show it waiting again",
    )
    .await;
    assert_eq!(status(waiting.clone()).await, "suspended");
    let timeline = page
        .eval("document.getElementById('timeline').textContent")
        .await;
    assert!(
        timeline
            .as_str()
            .unwrap()
            .contains("wait for signal cancel"),
        "{timeline}"
    );
}

/// Sets the value of the input `id` in the page.
async fn fill(page: &mut Page, id: &str, value: &str) {
    page.eval(&format!(
        "document.getElementById('{id}').value = {}",
        json!(value)
    ))
    .await;
}

/// The timeline as a picture: a lane per attempt with a dot per entry, waits as spans (open
/// while they wait), a workflow's runs chained across continue-as-new; a replay against a
/// build that reorders two steps rings the entry where it diverged, and the deployments
/// page refuses that build when it is registered with verification, showing the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_is_drawn_and_a_replay_rings_where_new_code_diverges() {
    if !(require("chromium") && require_store()) {
        return;
    }
    let home = GatewayHome::new();
    let gateway = home.start(None);
    // The charge fails twice first: the order takes three attempts.
    let downstream = Downstream::start(&[("charge_payment", 2)]).await;
    let handler = start_order(
        None,
        &[
            "--downstream",
            &downstream.url,
            "--step-retry-initial-ms",
            "20",
        ],
    );
    register(&gateway.admin, &handler.url).await;
    let reordered = start_order(None, &["--reserve-first"]);
    let order = send_order(&gateway.url, ORDER).await;
    wait_final(&gateway.url, &order).await;
    let start = |workflow: &str, id: &str, input: Value| {
        let url = format!("{}/v1/workflows/{workflow}/{id}", gateway.url);
        async move {
            let started: Value = client()
                .post(url)
                .json(&input)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            started["invocation_id"].as_str().unwrap().to_owned()
        }
    };
    let waiting = start(
        "approval",
        "ui-2",
        json!({"request": "ui-2", "deadline_secs": 3600}),
    )
    .await;
    // A tally that continues as new after one signal: two runs of one workflow id.
    let first_run = start("tally", "ui-3", json!({"per_run": 1})).await;
    let signalled = client()
        .post(format!(
            "{}/v1/workflows/tally/ui-3/signals/add",
            gateway.url
        ))
        .json(&json!({"key": "a"}))
        .send()
        .await
        .unwrap();
    assert!(signalled.status().is_success());
    let runs = eventually(Duration::from_secs(10), "the second run", || async {
        let runs = get_json(&format!("{}/v1/workflows/tally/ui-3/runs", gateway.url)).await;
        let ids: Vec<String> = runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        (ids.len() == 2).then_some(ids)
    })
    .await;
    assert_eq!(runs[0], first_run);
    eventually(Duration::from_secs(10), "the approval to wait", || async {
        let view = get_json(&format!("{}/v1/invocations/{waiting}", gateway.url)).await;
        (view["status"] == "suspended").then_some(())
    })
    .await;

    let browser = Browser::start();
    let mut page = Page::open(&browser).await;
    page.command(
        "Page.navigate",
        json!({"url": format!("{}/ui#/invocations/{order}", gateway.admin)}),
    )
    .await;
    page.until(
        "document.getElementById('timeline-picture') !== null",
        "the order's picture",
    )
    .await;
    // Durin's lane (the input) and one per attempt, the two that failed recording
    // nothing; a dot per entry, no wait.
    let drawn = page
        .eval(
            "(() => { const p = document.getElementById('timeline-picture'); \
             return [p.dataset.lanes, p.dataset.waits, p.querySelectorAll('circle.dot').length, \
             [...p.querySelectorAll('g.attempt.empty')].map(g => g.dataset.attempt)]; })()",
        )
        .await;
    assert_eq!(drawn, json!(["4", "0", 5, ["1", "2"]]));

    // Replayed against the build that reserves first: diverged at entry 1, ringed.
    fill(&mut page, "replay-deployment", &reordered.url).await;
    page.eval("document.getElementById('replay-run').click()")
        .await;
    page.until(
        "document.getElementById('replay-result') !== null",
        "the replay's result",
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('replay-result').textContent")
            .await,
        json!("diverged")
    );
    let report = page
        .eval("document.getElementById('replay-report').textContent")
        .await;
    let report = report.as_str().unwrap();
    assert!(
        report.contains("recorded: step \"charge_payment\""),
        "{report}"
    );
    assert!(
        report.contains("requested: step \"reserve_inventory\""),
        "{report}"
    );
    assert_eq!(
        page.eval("[...document.querySelectorAll('#timeline-picture circle.diverged')].map(c => c.dataset.index)")
            .await,
        json!(["1"])
    );
    // Against the code that recorded it: replayed, nothing ringed.
    fill(&mut page, "replay-deployment", &handler.url).await;
    page.eval("document.getElementById('replay-run').click()")
        .await;
    page.until(
        "document.getElementById('replay-result') !== null && document.getElementById('replay-result').textContent === 'replayed'",
        "the replay against the recording's code",
    )
    .await;
    assert_eq!(
        page.eval("document.querySelectorAll('#timeline-picture circle.diverged').length")
            .await,
        json!(0)
    );

    // The waiting approval: its timer and its signal wait are open spans.
    page.eval(&format!("location.hash = '#/invocations/{waiting}'"))
        .await;
    page.until(
        "document.getElementById('timeline-picture') !== null && document.getElementById('timeline-picture').dataset.waits === '2'",
        "the approval's waits",
    )
    .await;
    assert_eq!(
        page.eval("document.querySelectorAll('#timeline-picture rect.wait.open').length")
            .await,
        json!(2)
    );

    // The first tally run links to the next one.
    page.eval(&format!("location.hash = '#/invocations/{first_run}'"))
        .await;
    page.until(
        &format!(
            "document.querySelector('#runs a[data-run=\"{}\"]') !== null",
            runs[1]
        ),
        "the link to the next run",
    )
    .await;

    // The deployments page refuses the reordered build, with the report.
    page.eval("location.hash = '#/deployments'").await;
    page.until(
        "document.getElementById('register-url') !== null",
        "the registration form",
    )
    .await;
    fill(&mut page, "register-url", &reordered.url).await;
    page.eval("document.getElementById('register-run').click()")
        .await;
    page.until(
        "document.getElementById('register-refused') !== null",
        "the refusal",
    )
    .await;
    let diverged = page
        .eval("document.querySelectorAll('#register-result tr[data-result=diverged]').length")
        .await;
    assert!(diverged.as_u64().unwrap() >= 1, "{diverged}");
    let deployments = get_json(&format!("{}/v1/deployments", gateway.admin)).await;
    assert_eq!(deployments["deployments"].as_array().unwrap().len(), 1);

    // Kept inactive instead, then activated with its button.
    page.eval("document.getElementById('register-inactive').checked = true")
        .await;
    page.eval("document.getElementById('register-run').click()")
        .await;
    page.until(
        "document.getElementById('register-done') !== null",
        "the inactive registration",
    )
    .await;
    let kept =
        get_json(&format!("{}/v1/deployments", gateway.admin)).await["deployments"][1].clone();
    assert_eq!(kept["active"], false, "{kept}");
    let button = format!("activate-{}", kept["id"].as_str().unwrap());
    page.until(
        &format!("document.getElementById('{button}') !== null"),
        "the activate button",
    )
    .await;
    page.eval(&format!(
        "window.confirm = () => true; document.getElementById('{button}').click()"
    ))
    .await;
    eventually(Duration::from_secs(10), "the activation", || async {
        let listed = get_json(&format!("{}/v1/deployments", gateway.admin)).await;
        (listed["deployments"][1]["active"] == true).then_some(())
    })
    .await;
}

/// The webhooks page lists each source's deliveries: an accepted one linked to the
/// invocation it started, and a refused one with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhooks_page_lists_each_sources_deliveries() {
    if !(require("chromium") && require_store()) {
        return;
    }
    let home = GatewayHome::new();
    let config = std::fs::read_to_string(home.config()).unwrap();
    std::fs::write(
        home.config(),
        format!(
            "{config}\n[[webhooks]]\nsource = \"github\"\nscheme = \"github\"\nsecrets = [\"gh\"]\n\n[[webhooks.routes]]\nsend = \"order/process\"\n"
        ),
    )
    .unwrap();
    let gateway = home.start(None);
    let handler = start_order(None, &[]);
    register(&gateway.admin, &handler.url).await;
    let body = ORDER.as_bytes().to_vec();
    let deliver = |signature: String| {
        client()
            .post(format!("{}/v1/webhooks/github", gateway.url))
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", "d-7")
            .header("x-hub-signature-256", signature)
            .body(body.clone())
            .send()
    };
    let accepted: Value = deliver(durin::webhooks::verify::sign::github("gh", &body))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let invocation = accepted["invocation_id"].as_str().unwrap().to_owned();
    let refused = deliver("sha256=00".into()).await.unwrap();
    assert_eq!(refused.status(), 401);

    let browser = Browser::start();
    let mut page = Page::open(&browser).await;
    page.command(
        "Page.navigate",
        json!({"url": format!("{}/ui#/webhooks", gateway.admin)}),
    )
    .await;
    page.until(
        "document.querySelectorAll('[data-source=github] tr[data-outcome]').length === 2",
        "the two deliveries",
    )
    .await;
    let rows = page
        .eval(
            "[...document.querySelectorAll('[data-source=github] tr[data-outcome]')].map(r => r.dataset.outcome)",
        )
        .await;
    assert_eq!(rows, json!(["refused", "accepted"]));
    let link = page
        .eval("document.querySelector('[data-source=github] tr[data-outcome=accepted] a').textContent")
        .await;
    assert_eq!(link, json!(invocation));
    let reason = page
        .eval("document.querySelector('[data-source=github] tr[data-outcome=refused]').textContent")
        .await;
    assert!(
        reason.as_str().unwrap().contains("does not match"),
        "{reason}"
    );
}

/// The schedules page shows each schedule: what it fires and when (its next fire times in
/// UTC), whether it is paused and why, and what became of its fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedules_page_shows_each_schedules_next_fires_and_state() {
    if !(require("chromium") && require_store()) {
        return;
    }
    let home = GatewayHome::new();
    let gateway = home.start(None);
    for (id, spec) in [
        (
            "nightly",
            json!({"cron": "0 3 * * *", "time_zone": "Europe/Berlin", "start": {"workflow": "report"}}),
        ),
        (
            "sweep",
            json!({"every": "15m", "start": {"workflow": "sweep"}, "paused": true, "note": "maintenance"}),
        ),
    ] {
        let set = client()
            .put(format!("{}/v1/schedules/{id}", gateway.admin))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(set.status(), 201, "{}", set.text().await.unwrap());
    }
    let nightly = get_json(&format!("{}/v1/schedules/nightly", gateway.admin)).await;
    let next = nightly["next_fires"][0].as_str().unwrap().to_owned();

    let browser = Browser::start();
    let mut page = Page::open(&browser).await;
    page.command(
        "Page.navigate",
        json!({"url": format!("{}/ui#/schedules", gateway.admin)}),
    )
    .await;
    page.until(
        "document.querySelectorAll('[data-schedule]').length === 2",
        "the two schedules",
    )
    .await;
    let shown = page
        .eval("document.querySelector('[data-schedule=nightly] .next').textContent")
        .await;
    assert!(shown.as_str().unwrap().starts_with(&next), "{shown} {next}");
    let heading = page
        .eval("document.querySelector('[data-schedule=nightly] h3').textContent")
        .await;
    assert!(
        heading
            .as_str()
            .unwrap()
            .contains("0 3 * * * (Europe/Berlin)"),
        "{heading}"
    );
    let paused = page
        .eval("document.querySelector('[data-schedule=sweep] [data-paused]').textContent")
        .await;
    assert_eq!(paused, json!("paused: maintenance"));
}
