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
