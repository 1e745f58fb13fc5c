//! `durin invocations|workflows|deployments|webhooks|schedules ...`: the admin API (and, for workflows, the
//! main listener) from a shell, with readable tables for people and `--output json` for
//! scripts. Exit codes: 0 done, 1 Durin answered a problem (its type and detail go to
//! stderr), 2 a usage error, 3 Durin could not be reached; `durin replay` adds 4 (a
//! history diverged) and 5 (a history could not be replayed).

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

/// Where Durin is, and how to show what it answers.
#[derive(Args, Clone)]
pub struct Connection {
    /// The admin API.
    #[arg(
        long,
        env = "DURIN_ADMIN_URL",
        default_value = "http://127.0.0.1:9070",
        global = true
    )]
    admin_url: String,
    /// The admin token, when Durin requires one.
    #[arg(long, env = "DURIN_ADMIN_TOKEN", hide_env_values = true, global = true)]
    admin_token: Option<String>,
    /// The main listener (workflows).
    #[arg(
        long,
        env = "DURIN_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Invocations {
    /// The newest invocations (at most `--limit`).
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        handler: Option<String>,
        #[arg(long)]
        deployment: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One invocation.
    Get { id: String },
    /// An invocation's journal.
    Journal { id: String },
    /// An invocation's history (JSON Lines, for `durin replay`), on stdout.
    History { id: String },
    /// Cancel: the handler compensates and ends it.
    Cancel { id: String },
    /// End it at once, no more handler code.
    Terminate {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Run no attempt until resumed.
    Pause { id: String },
    /// Resume a paused invocation, optionally on another deployment.
    Resume {
        id: String,
        #[arg(long)]
        deployment: Option<String>,
    },
    /// Run an invocation that backs off now.
    RetryNow { id: String },
    /// Delete an ended invocation now.
    Purge { id: String },
    /// Keep the journal up to entry `--from` and run again (paused or ended invocations).
    Restart {
        id: String,
        #[arg(long)]
        from: u32,
        /// Makes the restart safe to send again: the same key restarts it once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Apply a verb to the invocations a filter selects.
    Bulk {
        /// cancel, terminate, pause, resume, retry-now or purge.
        verb: String,
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        handler: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        deployment: Option<String>,
        /// Only invocations created longer ago than this ("1h", "7d").
        #[arg(long)]
        older_than: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum Workflows {
    /// The newest runs of workflows (at most `--limit`), over the admin API.
    List {
        /// Only runs of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The latest run of a workflow id.
    Get { workflow: String, id: String },
    /// Every run of a workflow id, oldest first.
    Runs { workflow: String, id: String },
    /// The history of every run of a workflow id (JSON Lines, for `durin replay`), on
    /// stdout.
    History { workflow: String, id: String },
    /// Cancel the latest run.
    Cancel { workflow: String, id: String },
    /// Terminate the latest run.
    Terminate { workflow: String, id: String },
    /// Send a signal (the payload is JSON).
    Signal {
        workflow: String,
        id: String,
        name: String,
        #[arg(default_value = "null")]
        payload: String,
    },
}

#[derive(Subcommand)]
pub enum Deployments {
    /// The registered deployments.
    List,
    /// Register an SDK deployment (Durin asks `GET {url}/discover`).
    Register {
        #[arg(value_name = "URL")]
        deployment: String,
        /// Replay recent journals of its handlers against it first; refuse it when one
        /// diverges.
        #[arg(long)]
        verify: bool,
        /// With `--verify`: invocations per handler to replay.
        #[arg(long, requires = "verify")]
        sample: Option<u32>,
        /// With `--verify`: register it inactive when a run diverges, instead of refusing
        /// it (no new invocation goes to it until `durin deployments activate`).
        #[arg(long, requires = "verify")]
        inactive_on_divergence: bool,
    },
    /// Let new invocations go to a deployment registered inactive.
    Activate {
        #[arg(value_name = "DEPLOYMENT_ID")]
        id: String,
    },
}

#[derive(Subcommand)]
pub enum Webhooks {
    /// The webhook sources and their recent deliveries' outcomes.
    List,
    /// One source: what it declares (its secrets counted, never shown) and its outcomes.
    Show { source: String },
    /// Create or replace a source (`PUT /v1/webhooks/{source}`) from a JSON file holding
    /// its declaration (`scheme`, `secrets`, `routes`…).
    Set {
        source: String,
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// Delete a source and its deliveries; the work they started goes on.
    Delete { source: String },
    /// A source's recent deliveries, newest first.
    Deliveries { source: String },
}

pub async fn webhooks(connection: Connection, command: Webhooks) -> ExitCode {
    let admin = &connection.admin_url;
    let get = |path: String| Call {
        method: reqwest::Method::GET,
        url: format!("{admin}{path}"),
        body: None,
        admin: true,
        idempotency_key: None,
    };
    let at = |method: reqwest::Method, source: &str, body: Option<Value>| Call {
        method,
        url: format!("{admin}/v1/webhooks/{source}"),
        body,
        admin: true,
        idempotency_key: None,
    };
    let (call, show): (Call, fn(&Value)) = match command {
        Webhooks::List => (get("/v1/webhooks".into()), show_sources),
        Webhooks::Show { source } => (at(reqwest::Method::GET, &source, None), show_json),
        Webhooks::Set { source, file } => {
            let declared = std::fs::read(&file)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string())
                });
            match declared {
                Ok(declared) => (at(reqwest::Method::PUT, &source, Some(declared)), show_json),
                Err(e) => {
                    eprintln!("durin: cannot read {} as JSON: {e}", file.display());
                    return ExitCode::from(2);
                }
            }
        }
        Webhooks::Delete { source } => (at(reqwest::Method::DELETE, &source, None), |_| {
            println!("deleted");
        }),
        Webhooks::Deliveries { source } => (
            get(format!("/v1/webhooks/{source}/deliveries")),
            show_deliveries,
        ),
    };
    run(&connection, call, show).await
}

fn show_sources(body: &Value) {
    let rows: Vec<Vec<String>> = body["sources"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let recent = &s["recent"];
            vec![
                text(&s["source"]),
                text(&s["url"]),
                text(&recent["accepted"]),
                text(&recent["duplicate"]),
                text(&recent["ignored"]),
                text(&recent["refused"]),
            ]
        })
        .collect();
    table(
        &[
            "SOURCE",
            "URL",
            "ACCEPTED",
            "DUPLICATE",
            "IGNORED",
            "REFUSED",
        ],
        &rows,
    );
}

fn show_json(body: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string())
    );
}

fn show_deliveries(body: &Value) {
    let rows: Vec<Vec<String>> = body["deliveries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|d| {
            vec![
                text(&d["at_ms"]),
                text(&d["outcome"]),
                text(&d["status"]),
                text(&d["event_id"]),
                text(&d["event_type"]),
                text(&d["invocation_id"]),
                shorten(&text(&d["reason"]), 60),
            ]
        })
        .collect();
    table(
        &[
            "AT_MS",
            "OUTCOME",
            "STATUS",
            "EVENT",
            "TYPE",
            "INVOCATION",
            "REASON",
        ],
        &rows,
    );
}

#[derive(Subcommand)]
pub enum Schedules {
    /// The schedules: when each fires, what it starts, its next fire and its counts.
    List,
    /// One schedule: what it says, its next fires, its running runs and its recent fires.
    Show { id: String },
    /// Create or replace a schedule (`PUT /v1/schedules/{id}`).
    Set(SetSchedule),
    /// Delete a schedule; the runs it started go on.
    Delete { id: String },
    /// Fire no more until unpaused (fires that fall meanwhile are not made up).
    Pause {
        id: String,
        /// Why it is paused, shown with the schedule.
        #[arg(long)]
        note: Option<String>,
    },
    /// Fire again, from now on.
    Unpause {
        id: String,
        #[arg(long)]
        note: Option<String>,
    },
    /// Fire once now.
    Trigger {
        id: String,
        /// The overlap policy of this fire [default: the schedule's].
        #[arg(long, value_enum)]
        overlap: Option<OverlapPolicy>,
    },
    /// Fire every fire time of a past range, each under its own workflow id (a fire that
    /// ran already is not run again).
    Backfill {
        id: String,
        /// The range's start, RFC 3339 (`2026-12-05T03:00:00Z`).
        #[arg(long)]
        from: String,
        /// The range's end (included), RFC 3339.
        #[arg(long)]
        to: String,
        /// The overlap policy of these fires [default: allow_all].
        #[arg(long, value_enum)]
        overlap: Option<OverlapPolicy>,
    },
}

/// `durin schedules set`: a schedule from options, or from a file.
#[derive(Args)]
#[command(group(
    clap::ArgGroup::new("when")
        .args(["cron", "every", "file"])
        .required(true)
))]
pub struct SetSchedule {
    id: String,
    /// A JSON file holding the whole schedule (the body of `PUT /v1/schedules/{id}`),
    /// sent as it is.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "cron", "time_zone", "every", "offset", "workflow", "input", "overlap",
            "catchup_window", "jitter", "paused", "note",
        ]
    )]
    file: Option<std::path::PathBuf>,
    /// A cron expression (five fields, or six with seconds first; `@daily`).
    #[arg(long, value_name = "EXPR")]
    cron: Option<String>,
    /// The IANA time zone the cron expression is read in [default: UTC].
    #[arg(long, value_name = "TZ", requires = "cron")]
    time_zone: Option<String>,
    /// Or a fixed interval (`15m`): fires at its multiples since the Unix epoch.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    every: Option<std::time::Duration>,
    /// With `--every`: fires this much after each multiple.
    #[arg(long, value_name = "DURATION", requires = "every", value_parser = humantime::parse_duration)]
    offset: Option<std::time::Duration>,
    /// The workflow each fire starts a run of.
    #[arg(long, value_name = "NAME", required_unless_present = "file")]
    workflow: Option<String>,
    /// The runs' input (JSON).
    #[arg(long, value_name = "JSON")]
    input: Option<String>,
    /// What a fire does while an earlier fire's run has not ended [default: skip].
    #[arg(long, value_enum)]
    overlap: Option<OverlapPolicy>,
    /// Fires missed for longer than this (Durin down) are not made up [default: 24h].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    catchup_window: Option<std::time::Duration>,
    /// Delay each fire by up to this much.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    jitter: Option<std::time::Duration>,
    /// Set it paused.
    #[arg(long)]
    paused: bool,
    /// A note shown with the schedule.
    #[arg(long)]
    note: Option<String>,
}

/// A schedule's overlap policy.
#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum OverlapPolicy {
    Skip,
    BufferOne,
    AllowAll,
    CancelOther,
}

impl OverlapPolicy {
    fn as_str(self) -> &'static str {
        use crate::schedules::Overlap;
        match self {
            OverlapPolicy::Skip => Overlap::Skip,
            OverlapPolicy::BufferOne => Overlap::BufferOne,
            OverlapPolicy::AllowAll => Overlap::AllowAll,
            OverlapPolicy::CancelOther => Overlap::CancelOther,
        }
        .as_str()
    }
}

impl SetSchedule {
    /// The body of the `PUT`: the file's bytes as they are, or the spec the options say
    /// (an exit code 2 when one is not what it should be).
    fn body(&self) -> Result<(Vec<u8>, &'static str), ExitCode> {
        if let Some(file) = &self.file {
            return std::fs::read(file)
                .map(|bytes| (bytes, "application/json"))
                .map_err(|e| {
                    eprintln!("durin: cannot read {}: {e}", file.display());
                    ExitCode::from(2)
                });
        }
        let duration = |d: &std::time::Duration| humantime::format_duration(*d).to_string();
        let mut start = json!({ "workflow": self.workflow });
        if let Some(input) = &self.input {
            match serde_json::from_str::<Value>(input) {
                Ok(input) => start["input"] = input,
                Err(e) => {
                    eprintln!("durin: the input is not JSON: {e}");
                    return Err(ExitCode::from(2));
                }
            }
        }
        let mut spec = serde_json::Map::new();
        for (key, value) in [
            ("cron", self.cron.clone()),
            ("time_zone", self.time_zone.clone()),
            ("every", self.every.as_ref().map(duration)),
            ("offset", self.offset.as_ref().map(duration)),
            ("overlap", self.overlap.map(|o| o.as_str().to_owned())),
            ("catchup_window", self.catchup_window.as_ref().map(duration)),
            ("jitter", self.jitter.as_ref().map(duration)),
            ("note", self.note.clone()),
        ] {
            if let Some(value) = value {
                spec.insert(key.into(), value.into());
            }
        }
        if self.paused {
            spec.insert("paused".into(), true.into());
        }
        spec.insert("start".into(), start);
        Ok((
            Value::Object(spec).to_string().into_bytes(),
            "application/json",
        ))
    }
}

impl Call {
    /// A call to the admin API at `path`.
    fn admin_api(
        connection: &Connection,
        method: reqwest::Method,
        path: String,
        body: Option<Value>,
    ) -> Call {
        Call {
            method,
            url: format!("{}{path}", connection.admin_url),
            body,
            admin: true,
            idempotency_key: None,
        }
    }
}

/// Prints a schedule command's answer (its status, and its JSON) for people.
type ShowAnswer = Box<dyn FnOnce(reqwest::StatusCode, &Value)>;

pub async fn schedules(connection: Connection, command: Schedules) -> ExitCode {
    use reqwest::Method;
    let call = |method: Method, path: String, body: Option<Value>| {
        Call::admin_api(&connection, method, path, body)
    };
    let at = |id: &str, verb: &str| format!("/v1/schedules/{id}{verb}");
    let (call, raw, show): (Call, _, ShowAnswer) = match command {
        Schedules::List => (
            call(Method::GET, "/v1/schedules".into(), None),
            None,
            Box::new(|_, body| show_schedules(body)),
        ),
        Schedules::Show { id } => (
            call(Method::GET, at(&id, ""), None),
            None,
            Box::new(|_, body| show_schedule(body)),
        ),
        Schedules::Set(set) => {
            let raw = match set.body() {
                Ok(raw) => raw,
                Err(code) => return code,
            };
            let id = set.id;
            (
                call(Method::PUT, at(&id, ""), None),
                Some(raw),
                Box::new(move |status, body| {
                    let done = if status == reqwest::StatusCode::CREATED {
                        "created"
                    } else {
                        "replaced"
                    };
                    println!("schedule {id} {done}");
                    show_next_fire(body);
                }),
            )
        }
        Schedules::Delete { id } => (
            call(Method::DELETE, at(&id, ""), None),
            None,
            Box::new(move |_, _| println!("schedule {id} deleted")),
        ),
        Schedules::Pause { id, note } => (
            call(
                Method::POST,
                at(&id, "/pause"),
                Some(json!({ "note": note })),
            ),
            None,
            Box::new(move |_, _| println!("schedule {id} paused")),
        ),
        Schedules::Unpause { id, note } => (
            call(
                Method::POST,
                at(&id, "/unpause"),
                Some(json!({ "note": note })),
            ),
            None,
            Box::new(move |_, body| {
                println!("schedule {id} unpaused");
                show_next_fire(body);
            }),
        ),
        Schedules::Trigger { id, overlap } => (
            call(
                Method::POST,
                at(&id, "/trigger"),
                Some(json!({ "overlap": overlap.map(OverlapPolicy::as_str) })),
            ),
            None,
            Box::new(|_, body| show_fires(&body["fires"])),
        ),
        Schedules::Backfill {
            id,
            from,
            to,
            overlap,
        } => (
            call(
                Method::POST,
                at(&id, "/backfill"),
                Some(json!({
                    "from": from,
                    "to": to,
                    "overlap": overlap.map(OverlapPolicy::as_str),
                })),
            ),
            None,
            Box::new(|_, body| show_fires(&body["fires"])),
        ),
    };
    let (status, bytes) = match send(&connection, call, raw).await {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if status.is_client_error() || status.is_server_error() {
        return problem(&connection, status, &bytes);
    }
    // A deletion answers 204, with no body: nothing to print for scripts.
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    match connection.output {
        Output::Json if body.is_null() => {}
        Output::Json => println!("{body:#}"),
        Output::Table => show(status, &body),
    }
    ExitCode::SUCCESS
}

/// When a schedule fires: `cron EXPR [TZ]` or `every DUR [+OFFSET]`.
fn schedule_when(spec: &Value) -> String {
    if let Some(cron) = spec["cron"].as_str() {
        match spec["time_zone"].as_str() {
            Some(zone) => format!("cron {cron} {zone}"),
            None => format!("cron {cron}"),
        }
    } else {
        match spec["offset"].as_str() {
            Some(offset) => format!("every {} +{offset}", text(&spec["every"])),
            None => format!("every {}", text(&spec["every"])),
        }
    }
}

fn yes_no(value: &Value) -> String {
    if value.as_bool().unwrap_or(false) {
        "yes".into()
    } else {
        "no".into()
    }
}

fn show_schedules(body: &Value) {
    let rows: Vec<Vec<String>> = body["schedules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let counts = &s["counts"];
            vec![
                text(&s["id"]),
                text(&s["source"]),
                schedule_when(&s["spec"]),
                text(&s["spec"]["start"]["workflow"]),
                text(&s["spec"]["overlap"]),
                yes_no(&s["paused"]),
                text(&s["next_fires"][0]),
                format!(
                    "{}/{}/{}",
                    text(&counts["started"]),
                    text(&counts["skipped"]),
                    text(&counts["missed"])
                ),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "SOURCE",
            "WHEN",
            "WORKFLOW",
            "OVERLAP",
            "PAUSED",
            "NEXT FIRE",
            "STARTED/SKIPPED/MISSED",
        ],
        &rows,
    );
}

/// A schedule: what it says and its state as `key  value` lines, then its recent fires.
fn show_schedule(view: &Value) {
    let spec = &view["spec"];
    let list = |value: &Value| {
        value
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(text)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let counts = &view["counts"];
    let lines = [
        ("id", text(&view["id"])),
        ("source", text(&view["source"])),
        ("when", schedule_when(spec)),
        ("workflow", text(&spec["start"]["workflow"])),
        ("input", shorten(&spec["start"]["input"].to_string(), 200)),
        ("overlap", text(&spec["overlap"])),
        ("catchup window", text(&spec["catchup_window"])),
        ("jitter", text(&spec["jitter"])),
        ("paused", yes_no(&view["paused"])),
        ("note", text(&view["note"])),
        ("next fires", list(&view["next_fires"])),
        ("running", list(&view["running"])),
        ("buffered", text(&view["buffered"])),
        (
            "fires",
            format!(
                "{} started, {} skipped, {} missed",
                text(&counts["started"]),
                text(&counts["skipped"]),
                text(&counts["missed"])
            ),
        ),
        ("last error", text(&view["last_error"])),
        ("created", text(&view["created_at"])),
        ("updated", text(&view["updated_at"])),
    ];
    let width = lines.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    for (key, value) in lines.iter().filter(|(_, value)| !value.is_empty()) {
        println!("{key:width$}  {value}");
    }
    println!();
    println!("recent fires:");
    show_fires(&view["recent"]);
}

/// Fires (a trigger's, a backfill's or a schedule's recent ones) as a table.
fn show_fires(fires: &Value) {
    let rows: Vec<Vec<String>> = fires
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|f| {
            vec![
                text(&f["fire_time"]),
                text(&f["outcome"]),
                text(&f["workflow_id"]),
                text(&f["by"]),
                text(&f["at"]),
                shorten(&text(&f["detail"]), 60),
            ]
        })
        .collect();
    table(
        &["FIRE TIME", "OUTCOME", "WORKFLOW ID", "BY", "AT", "DETAIL"],
        &rows,
    );
}

/// The next fire of a schedule's view (or that it is paused).
fn show_next_fire(view: &Value) {
    if view["paused"].as_bool().unwrap_or(false) {
        println!("paused: no fire until unpaused");
    } else if let Some(next) = view["next_fires"][0].as_str() {
        println!("next fire {next}");
    }
}

/// `durin replay`: replays history files against a deployment, through Durin's admin API.
#[derive(Args)]
pub struct Replay {
    #[command(flatten)]
    connection: Connection,
    /// A history file (from `durin invocations history` or `workflows history`); may be
    /// given several times.
    #[arg(long, required = true)]
    history: Vec<std::path::PathBuf>,
    /// The deployment's URL: a registered one, or an SDK deployment Durin can discover.
    #[arg(long)]
    deployment: String,
}

/// What a command asks of Durin.
struct Call {
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
    admin: bool,
    /// Sent as `Idempotency-Key`.
    idempotency_key: Option<String>,
}

pub async fn invocations(connection: Connection, command: Invocations) -> ExitCode {
    let admin = &connection.admin_url;
    let post = |path: String, body: Value| Call {
        method: reqwest::Method::POST,
        url: format!("{admin}{path}"),
        body: Some(body),
        admin: true,
        idempotency_key: None,
    };
    let get = |path: String| Call {
        method: reqwest::Method::GET,
        url: format!("{admin}{path}"),
        body: None,
        admin: true,
        idempotency_key: None,
    };
    let (call, show): (Call, fn(&Value)) = match command {
        Invocations::List {
            status,
            service,
            handler,
            deployment,
            limit,
        } => {
            let query = list_query(&[
                ("status", status),
                ("service", service),
                ("handler", handler),
                ("deployment_id", deployment),
                ("limit", Some(limit.to_string())),
            ]);
            (get(format!("/v1/invocations?{query}")), show_list)
        }
        Invocations::Get { id } => (get(format!("/v1/invocations/{id}")), show_object),
        Invocations::Journal { id } => (get(format!("/v1/invocations/{id}/journal")), show_journal),
        Invocations::History { id } => {
            return export(&connection, get(format!("/v1/invocations/{id}/history"))).await
        }
        Invocations::Cancel { id } => (
            post(format!("/v1/invocations/{id}/cancel"), json!(null)),
            show_object,
        ),
        Invocations::Terminate { id, reason } => {
            let body = reason.map_or(json!(null), |r| json!({ "reason": r }));
            (
                post(format!("/v1/invocations/{id}/terminate"), body),
                show_object,
            )
        }
        Invocations::Pause { id } => (
            post(format!("/v1/invocations/{id}/pause"), json!(null)),
            show_object,
        ),
        Invocations::Resume { id, deployment } => {
            let body = deployment.map_or(json!({}), |d| json!({ "deployment_id": d }));
            (
                post(format!("/v1/invocations/{id}/resume"), body),
                show_object,
            )
        }
        Invocations::RetryNow { id } => (
            post(format!("/v1/invocations/{id}/retry-now"), json!(null)),
            show_object,
        ),
        Invocations::Purge { id } => (
            post(format!("/v1/invocations/{id}/purge"), json!(null)),
            show_object,
        ),
        Invocations::Restart {
            id,
            from,
            idempotency_key,
        } => (
            Call {
                idempotency_key,
                ..post(
                    format!("/v1/invocations/{id}/restart"),
                    json!({ "from": from }),
                )
            },
            show_object,
        ),
        Invocations::Bulk {
            verb,
            service,
            handler,
            status,
            deployment,
            older_than,
        } => {
            let mut filter = serde_json::Map::new();
            for (key, value) in [
                ("service", service),
                ("handler", handler),
                ("status", status),
                ("deployment_id", deployment),
                ("older_than", older_than),
            ] {
                if let Some(value) = value {
                    filter.insert(key.into(), value.into());
                }
            }
            (
                post(
                    format!("/v1/invocations/bulk/{verb}"),
                    Value::Object(filter),
                ),
                show_object,
            )
        }
    };
    run(&connection, call, show).await
}

pub async fn workflows(connection: Connection, command: Workflows) -> ExitCode {
    let (main, admin) = (&connection.url, &connection.admin_url);
    let call =
        |method: reqwest::Method, base: &str, path: String, body: Option<Value>, is_admin| Call {
            method,
            url: format!("{base}{path}"),
            body,
            admin: is_admin,
            idempotency_key: None,
        };
    let (call, show): (Call, fn(&Value)) = match command {
        Workflows::List {
            workflow,
            status,
            limit,
        } => {
            let query = list_query(&[
                ("workflows_only", Some("true".into())),
                ("service", workflow),
                ("status", status),
                ("limit", Some(limit.to_string())),
            ]);
            (
                call(
                    reqwest::Method::GET,
                    admin,
                    format!("/v1/invocations?{query}"),
                    None,
                    true,
                ),
                show_runs,
            )
        }
        Workflows::Get { workflow, id } => (
            call(
                reqwest::Method::GET,
                main,
                format!("/v1/workflows/{workflow}/{id}"),
                None,
                false,
            ),
            show_object,
        ),
        Workflows::Runs { workflow, id } => (
            call(
                reqwest::Method::GET,
                main,
                format!("/v1/workflows/{workflow}/{id}/runs"),
                None,
                false,
            ),
            show_list,
        ),
        Workflows::History { workflow, id } => {
            let call = call(
                reqwest::Method::GET,
                admin,
                format!("/v1/workflows/{workflow}/{id}/history"),
                None,
                true,
            );
            return export(&connection, call).await;
        }
        Workflows::Cancel { workflow, id } => (
            call(
                reqwest::Method::POST,
                main,
                format!("/v1/workflows/{workflow}/{id}/cancel"),
                Some(json!(null)),
                false,
            ),
            show_object,
        ),
        Workflows::Terminate { workflow, id } => (
            call(
                reqwest::Method::POST,
                admin,
                format!("/v1/workflows/{workflow}/{id}/terminate"),
                Some(json!(null)),
                true,
            ),
            show_object,
        ),
        Workflows::Signal {
            workflow,
            id,
            name,
            payload,
        } => {
            let payload = match serde_json::from_str(&payload) {
                Ok(payload) => payload,
                Err(e) => {
                    eprintln!("durin: the payload is not JSON: {e}");
                    return ExitCode::from(2);
                }
            };
            (
                call(
                    reqwest::Method::POST,
                    main,
                    format!("/v1/workflows/{workflow}/{id}/signals/{name}"),
                    Some(payload),
                    false,
                ),
                show_object,
            )
        }
    };
    run(&connection, call, show).await
}

pub async fn deployments(connection: Connection, command: Deployments) -> ExitCode {
    let admin = &connection.admin_url;
    let (call, show): (Call, fn(&Value)) = match command {
        Deployments::List => (
            Call {
                method: reqwest::Method::GET,
                url: format!("{admin}/v1/deployments"),
                body: None,
                admin: true,
                idempotency_key: None,
            },
            show_deployments,
        ),
        Deployments::Register {
            deployment,
            verify,
            sample,
            inactive_on_divergence,
        } => {
            let mut body = json!({ "url": deployment });
            if verify {
                let mut options = json!({
                    "on_divergence": if inactive_on_divergence { "inactive" } else { "refuse" }
                });
                if let Some(sample) = sample {
                    options["sample"] = json!(sample);
                }
                body["verify"] = options;
            }
            (
                Call {
                    method: reqwest::Method::POST,
                    url: format!("{admin}/v1/deployments"),
                    body: Some(body),
                    admin: true,
                    idempotency_key: None,
                },
                show_object,
            )
        }
        Deployments::Activate { id } => (
            Call {
                method: reqwest::Method::POST,
                url: format!("{admin}/v1/deployments/{id}/activate"),
                body: Some(json!(null)),
                admin: true,
                idempotency_key: None,
            },
            show_object,
        ),
    };
    run(&connection, call, show).await
}

/// Sends `call` (with `raw`, a body of its own type, instead of its JSON one) and returns
/// the answer's status and bytes, or the exit code of Durin out of reach.
async fn send(
    connection: &Connection,
    call: Call,
    raw: Option<(Vec<u8>, &'static str)>,
) -> Result<(reqwest::StatusCode, Vec<u8>), ExitCode> {
    let client = reqwest::Client::new();
    let mut request = client.request(call.method, &call.url);
    if call.admin {
        if let Some(token) = &connection.admin_token {
            request = request.bearer_auth(token);
        }
    }
    if let Some(body) = &call.body {
        request = request.json(body);
    }
    if let Some((bytes, content_type)) = raw {
        request = request
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes);
    }
    if let Some(key) = &call.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.map_err(|e| {
        eprintln!("durin: cannot reach {}: {e}", call.url);
        ExitCode::from(3)
    })?;
    let status = response.status();
    match response.bytes().await {
        Ok(bytes) => Ok((status, bytes.to_vec())),
        Err(e) => {
            eprintln!("durin: the answer of {} could not be read: {e}", call.url);
            Err(ExitCode::from(3))
        }
    }
}

/// A problem Durin answered: on stderr (and stdout for scripts), exit code 1.
fn problem(connection: &Connection, status: reqwest::StatusCode, body: &[u8]) -> ExitCode {
    let body: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    if connection.output == Output::Json {
        println!("{body:#}");
    }
    eprintln!(
        "durin: {status}: {} ({})",
        body["detail"].as_str().unwrap_or("no detail"),
        body["type"].as_str().unwrap_or("no type")
    );
    ExitCode::from(1)
}

/// Sends `call`, prints the answer (`show` for a table), and says how it went.
async fn run(connection: &Connection, call: Call, show: fn(&Value)) -> ExitCode {
    let (status, bytes) = match send(connection, call, None).await {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if status.is_client_error() || status.is_server_error() {
        return problem(connection, status, &bytes);
    }
    let body: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    match connection.output {
        Output::Json => println!("{body:#}"),
        Output::Table => show(&body),
    }
    ExitCode::SUCCESS
}

/// Sends `call` and writes the answer (a history file) to stdout as it came.
async fn export(connection: &Connection, call: Call) -> ExitCode {
    use std::io::Write;
    let (status, bytes) = match send(connection, call, None).await {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if status.is_client_error() || status.is_server_error() {
        return problem(connection, status, &bytes);
    }
    match std::io::stdout().write_all(&bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("durin: cannot write the history: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `durin replay`: 0 when every history replayed, 4 when one diverged, 5 when one could
/// not be replayed (and none diverged).
pub async fn replay(command: Replay) -> ExitCode {
    let mut text = Vec::new();
    for file in &command.history {
        match std::fs::read(file) {
            Ok(bytes) => {
                text.extend_from_slice(&bytes);
                if !bytes.ends_with(b"\n") {
                    text.push(b'\n');
                }
            }
            Err(e) => {
                eprintln!("durin: cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        }
    }
    let connection = &command.connection;
    let query = list_query(&[("deployment", Some(command.deployment.clone()))]);
    let call = Call {
        method: reqwest::Method::POST,
        url: format!("{}/v1/replays?{query}", connection.admin_url),
        body: None,
        admin: true,
        idempotency_key: None,
    };
    let (status, bytes) = match send(connection, call, Some((text, "application/jsonl"))).await {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if !status.is_success() {
        return problem(connection, status, &bytes);
    }
    let report: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    match connection.output {
        Output::Json => println!("{report:#}"),
        Output::Table => show_report(&report),
    }
    if report["diverged"].as_u64().unwrap_or(0) > 0 {
        ExitCode::from(4)
    } else if report["failed"].as_u64().unwrap_or(0) > 0 {
        ExitCode::from(5)
    } else {
        ExitCode::SUCCESS
    }
}

/// A replay report: one row per history, then the divergences with both sides.
fn show_report(report: &Value) {
    let histories = report["histories"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = histories
        .iter()
        .map(|h| {
            let detail = match h["result"].as_str() {
                Some("replayed") => match h["next"].as_str() {
                    Some(next) => format!("{} (next: {next})", text(&h["reached"])),
                    None => text(&h["reached"]),
                },
                Some("diverged") => format!("at entry {}", text(&h["divergence"]["index"])),
                _ => text(&h["error"]),
            };
            vec![
                text(&h["invocation_id"]),
                format!("{}/{}", text(&h["service"]), text(&h["handler"])),
                text(&h["status"]),
                text(&h["result"]),
                shorten(&detail, 80),
            ]
        })
        .collect();
    table(
        &["INVOCATION", "HANDLER", "RECORDED", "RESULT", "WHERE"],
        &rows,
    );
    for h in histories.iter().filter(|h| h["result"] == "diverged") {
        let d = &h["divergence"];
        println!();
        println!(
            "{} diverged at entry {}:",
            text(&h["invocation_id"]),
            text(&d["index"])
        );
        println!("  recorded:  {}", text(&d["recorded"]));
        println!("  requested: {}", text(&d["requested"]));
        if !d["detail"].is_null() {
            println!("  detail:    {}", text(&d["detail"]));
        }
        if let Some(patches) = h["patches"].as_array() {
            let names: Vec<String> = patches.iter().map(text).collect();
            println!("  patches in the recording: {}", names.join(", "));
        }
    }
    println!(
        "\n{} replayed, {} diverged, {} failed (deployment {})",
        text(&report["replayed"]),
        text(&report["diverged"]),
        text(&report["failed"]),
        text(&report["deployment"]["url"])
    );
}

/// A list of invocations (`invocations` or `runs`) as a table.
fn show_list(body: &Value) {
    let items = body["invocations"]
        .as_array()
        .or(body["runs"].as_array())
        .cloned()
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                text(&i["id"]),
                format!("{}/{}", text(&i["service"]), text(&i["handler"])),
                text(&i["status"]),
                text(&i["attempt"]),
                text(&i["created_at"]),
            ]
        })
        .collect();
    table(&["ID", "HANDLER", "STATUS", "ATTEMPT", "CREATED"], &rows);
}

/// Runs of workflows: the workflow and its id first.
fn show_runs(body: &Value) {
    let rows: Vec<Vec<String>> = body["invocations"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| {
            vec![
                text(&i["service"]),
                text(&i["workflow_id"]),
                text(&i["id"]),
                text(&i["status"]),
                text(&i["created_at"]),
            ]
        })
        .collect();
    table(
        &["WORKFLOW", "WORKFLOW ID", "RUN", "STATUS", "CREATED"],
        &rows,
    );
}

/// A query string of the parameters that are set, encoded.
fn list_query(pairs: &[(&str, Option<String>)]) -> String {
    let Ok(mut query) = reqwest::Url::parse("http://query/") else {
        return String::new();
    };
    {
        let mut builder = query.query_pairs_mut();
        for (name, value) in pairs {
            if let Some(value) = value {
                builder.append_pair(name, value);
            }
        }
    }
    query.query().unwrap_or_default().to_owned()
}

fn show_journal(body: &Value) {
    let rows: Vec<Vec<String>> = body["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let value = if e["failure"].is_null() {
                e["value"].to_string()
            } else {
                format!("failure: {}", e["failure"])
            };
            vec![
                text(&e["index"]),
                text(&e["kind"]),
                text(&e["name"]),
                text(&e["attempt"]),
                text(&e["at"]),
                shorten(&value, 60),
            ]
        })
        .collect();
    table(&["INDEX", "KIND", "NAME", "ATTEMPT", "AT", "VALUE"], &rows);
}

fn show_deployments(body: &Value) {
    let rows: Vec<Vec<String>> = body["deployments"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|d| {
            let services: Vec<String> = d["services"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|s| text(&s["name"]))
                .collect();
            vec![
                text(&d["id"]),
                text(&d["url"]),
                text(&d["protocol"]),
                services.join(","),
            ]
        })
        .collect();
    table(&["ID", "URL", "PROTOCOL", "SERVICES"], &rows);
}

/// An object as `key: value` lines.
fn show_object(body: &Value) {
    match body.as_object() {
        Some(map) => {
            let width = map.keys().map(String::len).max().unwrap_or(0);
            for (key, value) in map {
                println!("{key:width$}  {}", shorten(&text(value), 200));
            }
        }
        None => println!("{}", text(body)),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}
