//! Replaying histories against a deployment: each is one attempt marked as a replay, whose
//! every answer comes from the recording, and whose result says whether the deployment's
//! code took the path the recording took.

use std::sync::Arc;

use durin_protocol::{EntryKind, EntryRef, Failure, Outcome, ServiceSpec, REPLAY_PROTOCOL_VERSION};
use serde::Serialize;

use super::history::History;
use super::session::{Replays, Session, Stop};
use crate::engine::Engine;
use crate::ids::InvocationId;
use crate::lifecycle::HandlerAnswer;
use crate::store::{HandlerProtocol, HandlerTarget, InvocationRecord, Status, StoredEntry};

/// The deployment a replay runs against: registered, or only described (discovered).
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its id when registered; empty when it is not.
    pub deployment_id: String,
    pub url: String,
    pub protocol: HandlerProtocol,
    pub services: Vec<ServiceSpec>,
}

impl Candidate {
    fn target(&self, service: &str, handler: &str) -> Option<HandlerTarget> {
        let spec = self
            .services
            .iter()
            .find(|s| s.name == service)?
            .handlers
            .iter()
            .find(|h| h.name == handler)?;
        Some(HandlerTarget {
            deployment_id: self.deployment_id.clone(),
            url: self.url.clone(),
            protocol: self.protocol,
            service: service.to_owned(),
            handler: handler.to_owned(),
            spec: spec.clone(),
        })
    }

    /// Whether it serves `service/handler`.
    pub fn serves(&self, service: &str, handler: &str) -> bool {
        self.target(service, handler).is_some()
    }
}

/// What the replay of one history found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The code took the recorded path, to the recorded end or to where the run is now.
    Replayed,
    /// The code asked for something other than what was recorded.
    Diverged,
    /// The replay could not be made (the handler is not served, failed or unreachable).
    Failed,
}

/// Where a divergence is, with both sides.
#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    pub index: u32,
    pub recorded: String,
    pub requested: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The replay of one history.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub invocation_id: String,
    pub service: String,
    pub handler: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// The recorded status.
    pub status: String,
    /// The recorded entries, input and output included.
    pub entries: usize,
    pub result: Verdict,
    /// For a replayed history: `end` (the handler ended as recorded) or `frontier` (it
    /// reached where the recording stops, and would do `next`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub divergence: Option<Divergence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The patch markers in the recording (the patches its run went through).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<String>,
}

impl Replayed {
    fn of(history: &History) -> Replayed {
        Replayed {
            invocation_id: history.header.invocation_id.clone(),
            service: history.header.service.clone(),
            handler: history.header.handler.clone(),
            workflow_id: history.header.workflow_id.clone(),
            status: history.header.status.clone(),
            entries: history.entries.len(),
            result: Verdict::Failed,
            reached: None,
            next: None,
            divergence: None,
            error: None,
            patches: history.patches(),
        }
    }

    fn failed(mut self, error: String) -> Replayed {
        self.result = Verdict::Failed;
        self.error = Some(error);
        self
    }

    fn reached(mut self, reached: &'static str, next: Option<String>) -> Replayed {
        self.result = Verdict::Replayed;
        self.reached = Some(reached);
        self.next = next;
        self
    }

    fn diverged(mut self, divergence: Divergence) -> Replayed {
        self.result = Verdict::Diverged;
        self.divergence = Some(divergence);
        self
    }
}

/// The replay of every history.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub deployment: ReportDeployment,
    pub replayed: usize,
    pub diverged: usize,
    pub failed: usize,
    pub histories: Vec<Replayed>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportDeployment {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub url: String,
    pub protocol: &'static str,
}

impl Report {
    pub fn new(candidate: &Candidate, histories: Vec<Replayed>) -> Report {
        let count = |verdict| histories.iter().filter(|h| h.result == verdict).count();
        Report {
            deployment: ReportDeployment {
                id: candidate.deployment_id.clone(),
                url: candidate.url.clone(),
                protocol: match candidate.protocol {
                    HandlerProtocol::Sdk { .. } => "sdk",
                    HandlerProtocol::Plain => "plain",
                },
            },
            replayed: count(Verdict::Replayed),
            diverged: count(Verdict::Diverged),
            failed: count(Verdict::Failed),
            histories,
        }
    }
}

/// Replays each history, one after the other, against `candidate`.
pub async fn replay_all(
    engine: &Engine,
    replays: &Replays,
    candidate: &Candidate,
    histories: &[History],
) -> Report {
    let mut results = Vec::with_capacity(histories.len());
    for history in histories {
        results.push(replay(engine, replays, candidate, history).await);
    }
    Report::new(candidate, results)
}

/// Replays one history: one attempt, answered from the recording.
pub async fn replay(
    engine: &Engine,
    replays: &Replays,
    candidate: &Candidate,
    history: &History,
) -> Replayed {
    let result = Replayed::of(history);
    let header = &history.header;
    let Some(target) = candidate.target(&header.service, &header.handler) else {
        return result.failed(format!(
            "the deployment at {} does not serve {}/{}",
            candidate.url, header.service, header.handler
        ));
    };
    if let HandlerProtocol::Sdk { version } = target.protocol {
        if version < REPLAY_PROTOCOL_VERSION {
            return result.failed(format!(
                "the deployment speaks protocol version {version}; replaying without side effects needs version {REPLAY_PROTOCOL_VERSION} (a newer SDK)"
            ));
        }
    }
    let id = match InvocationId::parse(&header.invocation_id) {
        Ok(id) => id,
        Err(error) => return result.failed(format!("the history's invocation id: {error}")),
    };
    if header.attempts == u32::MAX {
        return result.failed("the history's attempts are out of range".into());
    }
    let token = crate::lifecycle::claim::attempt_token();
    let record = attempt_record(history, id.clone(), token.clone(), &target);
    let session = Arc::new(Session::new(
        id,
        token,
        &history.entries,
        history.handler_ended(),
    ));
    // An SDK gets the output too when the handler ended the run: code that asks for more
    // there diverges at it, and a patch check there takes the old branch. An end Durin
    // wrote is left out: the code may go on where the run was cut.
    let journal: Vec<StoredEntry> = history
        .entries
        .iter()
        .filter(|e| e.kind != EntryKind::Output || history.handler_ended())
        .cloned()
        .collect();
    let answer = {
        let _open = replays.open(Arc::clone(&session));
        engine.replay_handler(&record, &target, journal).await
    };
    let plain = target.protocol == HandlerProtocol::Plain;
    judge(history, &session, answer, plain, result)
}

/// The attempt a replay makes: the recorded invocation's next, with a token of its own.
fn attempt_record(
    history: &History,
    id: InvocationId,
    token: String,
    target: &HandlerTarget,
) -> InvocationRecord {
    let header = &history.header;
    let cancelled_at = history
        .entries
        .iter()
        .find(|e| e.kind == EntryKind::Cancel)
        .map(|e| e.at_ms);
    InvocationRecord {
        id,
        service: header.service.clone(),
        handler: header.handler.clone(),
        deployment_id: target.deployment_id.clone(),
        status: Status::Running,
        attempt: header.attempts.saturating_add(1),
        failures: 0,
        position_failures: 0,
        journal_len: history.entries.len() as u32,
        journal_bytes: 0,
        next_run_at_ms: None,
        last_error: None,
        failure: None,
        idempotency_key: None,
        created_at_ms: header.created_at_ms,
        modified_at_ms: header.created_at_ms,
        completed_at_ms: None,
        attempt_token: Some(token),
        workflow_id: header.workflow_id.clone(),
        waiting_for: Vec::new(),
        cancel_requested_at_ms: cancelled_at,
        parent_invocation_id: None,
        parent_index: None,
        deadline_ms: None,
        scheduled_at_ms: None,
        heartbeat_at_ms: None,
        traceparent: None,
        key: None,
    }
}

fn describe(entry: &EntryRef) -> String {
    match &entry.name {
        Some(name) => format!("{} {name:?}", entry.kind.as_str()),
        None => entry.kind.as_str().to_owned(),
    }
}

/// The recorded end, as a divergence report names it.
fn recorded_end(output: &StoredEntry) -> String {
    match &output.failure {
        Some(failure) => format!(
            "failure {} {}: {}",
            failure.status,
            failure.error_type.as_deref().unwrap_or("-"),
            failure.message
        ),
        None => format!(
            "output {}",
            crate::http::snippet(output.value.as_deref().unwrap_or_default())
        ),
    }
}

/// Whether the recorded run was failing where it stood: backing off, or failed by Durin
/// when its retries were used up.
fn recorded_failing(history: &History) -> bool {
    match history.header.status.as_str() {
        "backing-off" => true,
        "failed" => !history.handler_ended(),
        _ => false,
    }
}

/// What the handler's answer, and where the replay stopped it, say of the recording.
fn judge(
    history: &History,
    session: &Session,
    answer: HandlerAnswer,
    plain: bool,
    result: Replayed,
) -> Replayed {
    // The recorded end binds only when the handler gave it.
    let output = history.output().filter(|_| history.handler_ended());
    let end_index = history
        .output()
        .map_or(history.entries.len() as u32, |o| o.index);
    let cancelling = history.entries.iter().any(|e| e.kind == EntryKind::Cancel);
    // The handler ended with `ended`: as recorded, or not. A plain handler must also have
    // asked for every recorded entry on its way.
    let ended = |result: Replayed, same: bool, ended: String| {
        if let Some((index, recorded)) = session.first_unused().filter(|_| plain) {
            return result.diverged(Divergence {
                index,
                recorded,
                requested: ended,
                detail: None,
            });
        }
        match output {
            Some(output) if !same => result.diverged(Divergence {
                index: end_index,
                recorded: recorded_end(output),
                requested: ended,
                detail: None,
            }),
            _ => result.reached("end", None),
        }
    };
    let continued = history.header.status == Status::Continued.as_str();
    match session.stopped() {
        Some(Stop::Frontier { next }) => return result.reached("frontier", Some(next)),
        Some(Stop::ContinuedAsNew) => return ended(result, continued, "continue as new".into()),
        Some(Stop::Diverged {
            index,
            recorded,
            requested,
            detail,
        }) => {
            return result.diverged(Divergence {
                index,
                recorded,
                requested,
                detail,
            })
        }
        None => {}
    }
    // The handler went beyond the recording (`requested`): its frontier, unless the
    // recording had ended.
    let beyond = |result: Replayed, requested: String| match output {
        Some(output) => result.diverged(Divergence {
            index: end_index,
            recorded: recorded_end(output),
            requested,
            detail: None,
        }),
        None => result.reached("frontier", Some(requested)),
    };
    match answer {
        HandlerAnswer::Outcome(Outcome::NonDeterminism {
            index,
            recorded,
            requested,
            detail,
        }) => result.diverged(Divergence {
            index,
            // The recorded end says what it was.
            recorded: match history.output() {
                Some(end) if recorded.kind == EntryKind::Output => recorded_end(end),
                _ => describe(&recorded),
            },
            requested: describe(&requested),
            detail,
        }),
        HandlerAnswer::Outcome(Outcome::ReplayEnd { next, .. }) => beyond(result, describe(&next)),
        HandlerAnswer::Outcome(Outcome::Suspend { waiting_for, .. }) => beyond(
            result,
            format!("a wait for the commands at {waiting_for:?}, none of which completed"),
        ),
        HandlerAnswer::Outcome(Outcome::Output { output: value, .. }) => {
            let same = output.is_some_and(|o| {
                o.failure.is_none() && crate::http::json_value(o.value.as_deref()) == value
            });
            ended(result, same, format!("output {value}"))
        }
        HandlerAnswer::Outcome(Outcome::Failure { failure, .. }) => {
            // A cancelled run ends as the engine ends it (`lifecycle::decide`).
            let same = output.and_then(|o| o.failure.as_ref()).is_some_and(|f| {
                let cancelled = |f: &Failure| f.error_type.as_deref() == Some("Cancelled");
                (f.status == failure.status && f.error_type == failure.error_type)
                    || (cancelling && cancelled(f) && cancelled(&failure))
            });
            ended(
                result,
                same,
                format!(
                    "failure {} {}: {}",
                    failure.status,
                    failure.error_type.as_deref().unwrap_or("-"),
                    failure.message
                ),
            )
        }
        HandlerAnswer::Outcome(Outcome::ContinueAsNew { .. }) => {
            ended(result, continued, "continue as new".into())
        }
        HandlerAnswer::Output(body, _) => {
            let same = output.is_some_and(|o| {
                o.failure.is_none() && o.value.as_deref().unwrap_or_default() == body
            });
            ended(
                result,
                same,
                format!("output {}", crate::http::snippet(&body)),
            )
        }
        HandlerAnswer::Terminal(failure, _) => {
            // After a cancellation any 4xx of a plain handler ends it as cancelled.
            let same = output.and_then(|o| o.failure.as_ref()).is_some_and(|f| {
                if cancelling {
                    f.error_type.as_deref() == Some("Cancelled")
                } else {
                    f.status == failure.status
                }
            });
            ended(
                result,
                same,
                format!("failure {}: {}", failure.status, failure.message),
            )
        }
        // A run that was failing when it was recorded (backing off, or failed when its
        // retries were used up) fails again where it stood: that is where it is.
        HandlerAnswer::Outcome(Outcome::Retry { error, .. }) if recorded_failing(history) => result
            .reached(
                "frontier",
                Some(format!("a retry: the handler failed: {error}")),
            ),
        HandlerAnswer::Retry(retryable) if recorded_failing(history) => {
            result.reached("frontier", Some(format!("a retry: {}", retryable.error)))
        }
        HandlerAnswer::Outcome(Outcome::Retry { error, .. }) => {
            result.failed(format!("the handler failed: {error}"))
        }
        HandlerAnswer::Retry(retryable) => result.failed(retryable.error),
        HandlerAnswer::RequestTooLarge { bytes, .. } => result.failed(format!(
            "the deployment refused a request of {bytes} bytes as too large (413)"
        )),
    }
}
