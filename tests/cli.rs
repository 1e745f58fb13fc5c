//! The `durin` command line against a running Durin (the real binary, and the order
//! example): tables for people, JSON for scripts, and exit codes that say what happened.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::*;

fn durin(gateway: &Proc, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_durin"))
        .args(args)
        .args(["--admin-url", &gateway.admin, "--url", &gateway.url])
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_lists_reads_and_acts_with_exit_codes_that_say_what_happened() {
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let handler = start_order(None, &[]);

    // Register through the command line.
    let registered = durin(&gateway, &["deployments", "register", &handler.url]);
    assert!(registered.status.success(), "{registered:?}");
    let listed = durin(&gateway, &["deployments", "list"]);
    assert!(stdout(&listed).starts_with("ID"), "{}", stdout(&listed));
    assert!(stdout(&listed).contains(&handler.url));

    let id = send_order(&gateway.url, ORDER).await;
    wait_final(&gateway.url, &id).await;

    // A table for people, JSON for scripts.
    let table = durin(&gateway, &["invocations", "list"]);
    assert!(table.status.success());
    let text = stdout(&table);
    assert!(text.lines().next().unwrap().starts_with("ID"), "{text}");
    assert!(
        text.contains(&id) && text.contains("order/process"),
        "{text}"
    );
    let json = durin(&gateway, &["invocations", "get", &id, "--output", "json"]);
    let view: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(view["status"], "completed");
    let journal = durin(&gateway, &["invocations", "journal", &id]);
    assert!(
        stdout(&journal).contains("charge_payment"),
        "{}",
        stdout(&journal)
    );

    // A workflow: started, signalled and read through the command line.
    let started = client()
        .post(format!("{}/v1/workflows/approval/cli-1", gateway.url))
        .json(&serde_json::json!({"request": "cli-1", "deadline_secs": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    eventually(
        std::time::Duration::from_secs(10),
        "the run to wait",
        || async {
            let out = durin(
                &gateway,
                &["workflows", "get", "approval", "cli-1", "--output", "json"],
            );
            let view: Value = serde_json::from_slice(&out.stdout).ok()?;
            (view["status"] == "suspended").then_some(())
        },
    )
    .await;
    // Workflows are listed by their id; a filter keeps the order out of the list.
    let runs = durin(&gateway, &["workflows", "list", "--workflow", "approval"]);
    assert!(runs.status.success(), "{runs:?}");
    let text = stdout(&runs);
    assert!(text.starts_with("WORKFLOW"), "{text}");
    assert!(
        text.contains("approval") && text.contains("cli-1"),
        "{text}"
    );
    assert!(!text.contains(&id), "an order is no workflow: {text}");
    let none = durin(
        &gateway,
        &[
            "workflows",
            "list",
            "--workflow",
            "order",
            "--output",
            "json",
        ],
    );
    let none: Value = serde_json::from_slice(&none.stdout).unwrap();
    assert_eq!(none["invocations"], serde_json::json!([]));
    let orders = durin(
        &gateway,
        &[
            "invocations",
            "list",
            "--service",
            "order",
            "--output",
            "json",
        ],
    );
    let orders: Value = serde_json::from_slice(&orders.stdout).unwrap();
    let listed: Vec<&str> = orders["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [id.as_str()]);

    let signal = durin(
        &gateway,
        &[
            "workflows",
            "signal",
            "approval",
            "cli-1",
            "cancel",
            "\"no\"",
        ],
    );
    assert!(signal.status.success(), "{signal:?}");
    eventually(
        std::time::Duration::from_secs(10),
        "the run to end",
        || async {
            let out = durin(
                &gateway,
                &["workflows", "get", "approval", "cli-1", "--output", "json"],
            );
            let view: Value = serde_json::from_slice(&out.stdout).ok()?;
            (view["status"] == "completed").then_some(())
        },
    )
    .await;

    // Exit codes: 1 for a problem Durin answered, 2 for bad usage, 3 when unreachable.
    let unknown = durin(
        &gateway,
        &["invocations", "get", "inv_0193a2b4c5d6e7f8091a2b3c4d5e6f70"],
    );
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not-found"));
    // A restart sent twice with one key restarts once.
    let restart = |gateway: &Proc| {
        let out = durin(
            gateway,
            &[
                "invocations",
                "restart",
                &id,
                "--from",
                "1",
                "--idempotency-key",
                "cli-restart-1",
                "--output",
                "json",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["restart"].clone()
    };
    assert_eq!(restart(&gateway), "done");
    wait_final(&gateway.url, &id).await;
    assert_eq!(restart(&gateway), "already-restarted");
    let cannot = durin(&gateway, &["invocations", "purge", &id, "--output", "json"]);
    assert_eq!(
        cannot.status.code(),
        Some(0),
        "an ended invocation is purged: {cannot:?}"
    );
    let again = durin(&gateway, &["invocations", "purge", &id]);
    assert_eq!(again.status.code(), Some(1));
    let usage = durin(&gateway, &["invocations", "explode"]);
    assert_eq!(usage.status.code(), Some(2));
    let unreachable = Command::new(env!("CARGO_BIN_EXE_durin"))
        .args(["invocations", "list", "--admin-url", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(3), "{unreachable:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_set_listed_shown_paused_fired_backfilled_and_deleted_from_the_command_line()
{
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let handler = start_order(None, &[]);
    let registered = durin(&gateway, &["deployments", "register", &handler.url]);
    assert!(registered.status.success(), "{registered:?}");
    let json = |args: &[&str]| {
        let out = durin(&gateway, &[args, &["--output", "json"]].concat());
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };

    // Set from options: created, then replaced (from a file, sent as it is).
    let input = r#"{"request": "cli-schedule", "deadline_secs": 3600}"#;
    let set = durin(
        &gateway,
        &[
            "schedules",
            "set",
            "cli-hourly",
            "--every",
            "1h",
            "--workflow",
            "approval",
            "--input",
            input,
            "--overlap",
            "allow_all",
        ],
    );
    assert!(set.status.success(), "{set:?}");
    assert!(
        stdout(&set).contains("schedule cli-hourly created"),
        "{set:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spec.json");
    std::fs::write(
        &file,
        format!(r#"{{"every": "1h", "start": {{"workflow": "approval", "input": {input}}}}}"#),
    )
    .unwrap();
    let replaced = durin(
        &gateway,
        &[
            "schedules",
            "set",
            "cli-hourly",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert!(replaced.status.success(), "{replaced:?}");
    assert!(
        stdout(&replaced).contains("schedule cli-hourly replaced"),
        "{replaced:?}"
    );

    // Listed and shown: a table for people, the view for scripts.
    let list = durin(&gateway, &["schedules", "list"]);
    assert!(list.status.success(), "{list:?}");
    let text = stdout(&list);
    assert!(text.starts_with("ID"), "{text}");
    let row = text.lines().find(|l| l.starts_with("cli-hourly")).unwrap();
    for cell in ["api", "every 1h", "approval", "skip", "no", "0/0/0"] {
        assert!(row.contains(cell), "{cell} in {row}");
    }
    let listed = json(&["schedules", "list"]);
    assert_eq!(listed["schedules"][0]["id"], "cli-hourly");
    let show = durin(&gateway, &["schedules", "show", "cli-hourly"]);
    assert!(show.status.success(), "{show:?}");
    let text = stdout(&show);
    assert!(
        text.contains("every 1h") && text.contains("cli-schedule") && text.contains("FIRE TIME"),
        "{text}"
    );
    let view = json(&["schedules", "show", "cli-hourly"]);
    assert_eq!(view["spec"]["start"]["workflow"], "approval");
    assert_eq!(view["next_fires"].as_array().unwrap().len(), 5);

    // Paused with a note, and unpaused.
    let pause = durin(
        &gateway,
        &["schedules", "pause", "cli-hourly", "--note", "maintenance"],
    );
    assert!(pause.status.success(), "{pause:?}");
    let view = json(&["schedules", "show", "cli-hourly"]);
    assert_eq!(view["paused"], true);
    assert_eq!(view["note"], "maintenance");
    assert_eq!(view["next_fires"], serde_json::json!([]));
    assert!(stdout(&durin(&gateway, &["schedules", "show", "cli-hourly"])).contains("maintenance"));
    let view = json(&["schedules", "unpause", "cli-hourly"]);
    assert_eq!(view["paused"], false);

    // Triggered: one fire now, which starts a run.
    let trigger = durin(&gateway, &["schedules", "trigger", "cli-hourly"]);
    assert!(trigger.status.success(), "{trigger:?}");
    let text = stdout(&trigger);
    assert!(text.starts_with("FIRE TIME"), "{text}");
    assert!(
        text.lines().nth(1).unwrap().contains("started")
            && text.contains("cli-hourly-")
            && text.contains("trigger"),
        "{text}"
    );

    // Backfilled: the two hourly fires of a past two-hour range, each its own run.
    let hour = 3_600_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let to = now / hour * hour - hour;
    let from = to - hour;
    let (from, to) = (
        durin::schedules::spec::rfc3339(from),
        durin::schedules::spec::rfc3339(to),
    );
    let backfill = json(&[
        "schedules",
        "backfill",
        "cli-hourly",
        "--from",
        &from,
        "--to",
        &to,
    ]);
    let fires: Vec<(&str, &str)> = backfill["fires"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["outcome"].as_str().unwrap(),
                f["workflow_id"].as_str().unwrap(),
            )
        })
        .collect();
    let (first, second) = (format!("cli-hourly-{from}"), format!("cli-hourly-{to}"));
    assert_eq!(
        fires,
        [("started", first.as_str()), ("started", second.as_str())]
    );
    // Again, as a table: those fires ran already.
    let again = durin(
        &gateway,
        &[
            "schedules",
            "backfill",
            "cli-hourly",
            "--from",
            &from,
            "--to",
            &to,
        ],
    );
    assert!(again.status.success(), "{again:?}");
    let text = stdout(&again);
    assert!(
        text.contains("already_started") && text.contains(&first) && text.contains(&second),
        "{text}"
    );
    let view = json(&["schedules", "show", "cli-hourly"]);
    assert!(view["counts"]["started"].as_u64().unwrap() >= 3, "{view:#}");
    let text = stdout(&durin(&gateway, &["schedules", "show", "cli-hourly"]));
    assert!(text.contains("backfill") && text.contains(&first), "{text}");

    // Deleted: gone, and a second delete is a problem.
    let delete = durin(&gateway, &["schedules", "delete", "cli-hourly"]);
    assert!(delete.status.success(), "{delete:?}");
    assert!(stdout(&delete).contains("schedule cli-hourly deleted"));
    let gone = durin(&gateway, &["schedules", "show", "cli-hourly"]);
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not-found"));
    assert_eq!(
        json(&["schedules", "list"])["schedules"],
        serde_json::json!([])
    );

    // A bad cron expression: the problem's detail on stderr, exit code 1.
    let bad = durin(
        &gateway,
        &[
            "schedules",
            "set",
            "cli-bad",
            "--cron",
            "* * *",
            "--workflow",
            "approval",
        ],
    );
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("not a cron expression"), "{stderr}");
}

/// Webhook sources from the command line: set from a JSON file (the secret never printed),
/// shown, refused with a non-zero exit when it cannot work, and deleted.
#[tokio::test]
async fn webhook_sources_are_set_shown_and_deleted_from_the_command_line() {
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("source.json");
    std::fs::write(
        &file,
        r#"{"scheme": "github", "secrets": ["cli-secret"], "routes": [{"send": "order/process"}]}"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let set = durin(&gateway, &["webhooks", "set", "gh", "--file", file]);
    assert!(set.status.success(), "{set:?}");
    assert!(!stdout(&set).contains("cli-secret"), "{set:?}");
    let shown = durin(&gateway, &["webhooks", "show", "gh"]);
    assert!(shown.status.success(), "{shown:?}");
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["declared"]["secrets"], 1, "{shown}");
    assert_eq!(shown["declared"]["scheme"], "github", "{shown}");
    let listed = durin(&gateway, &["webhooks", "list"]);
    assert!(stdout(&listed).contains("/v1/webhooks/gh"), "{listed:?}");

    std::fs::write(
        dir.path().join("bad.json"),
        r#"{"scheme": "github", "secrets": [], "routes": []}"#,
    )
    .unwrap();
    let bad = dir.path().join("bad.json");
    let refused = durin(
        &gateway,
        &["webhooks", "set", "gh", "--file", bad.to_str().unwrap()],
    );
    assert!(!refused.status.success(), "{refused:?}");
    let kept = durin(&gateway, &["webhooks", "show", "gh"]);
    let kept: Value = serde_json::from_slice(&kept.stdout).unwrap();
    assert_eq!(
        kept["declared"]["routes"][0]["send"], "order/process",
        "{kept}"
    );
    let deleted = durin(&gateway, &["webhooks", "delete", "gh"]);
    assert!(deleted.status.success(), "{deleted:?}");
    let gone = durin(&gateway, &["webhooks", "show", "gh"]);
    assert!(!gone.status.success(), "{gone:?}");
}
