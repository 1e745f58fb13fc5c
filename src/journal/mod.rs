//! Journal entry kinds: what each one means when a handler appends it.
//!
//! Each kind is checked here and turned into the value to record and the [`Effect`] the
//! store carries out in the same transaction as the append (a timer to arm, a buffered
//! signal to take, durable state to set). The logic returns data; only the store writes.
//! Commands whose result arrives later (`sleep`, `signal`, `awakeable`) get a completion
//! from the store; `awakeable.rs` makes and checks the tokens that resolve them; `child.rs`
//! checks `call` and `send`, which start another invocation.

pub mod append;
pub mod awakeable;
pub mod child;
pub mod completion;
pub mod plain;
pub mod signal;
pub mod sleep;
mod state;
pub mod update;

use durin_protocol::EntryKind;
use serde_json::Value;

use crate::store::Effect;

/// The longest delay of a retry, a timer or a delayed start: a year and a day.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 60 * 60);

/// The longest entry name (a step, a signal, a state key).
pub const MAX_NAME_BYTES: usize = 256;

/// What an append records: its value (as the gateway stores it) and its effect.
#[derive(Debug)]
pub struct Planned {
    pub value: Option<Value>,
    pub effect: Effect,
}

/// Checks an entry a handler appends and plans its recording. `now_ms` is the gateway's
/// clock, from which a relative sleep is measured.
pub fn plan(
    kind: EntryKind,
    name: Option<&str>,
    value: Option<Value>,
    has_failure: bool,
    now_ms: i64,
) -> Result<Planned, String> {
    if !kind.appendable() {
        return Err(format!(
            "entries of kind {} are written by the gateway, not appended by handlers",
            kind.as_str()
        ));
    }
    if let Some(name) = name {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(format!("entry names must be 1 to {MAX_NAME_BYTES} bytes"));
        }
    }
    let needs_name = matches!(
        kind,
        EntryKind::Step
            | EntryKind::Signal
            | EntryKind::State
            | EntryKind::Patch
            | EntryKind::Update
            | EntryKind::UpdateResult
    );
    if needs_name && name.is_none() {
        return Err(format!("a {} entry needs a name", kind.as_str()));
    }
    if kind == EntryKind::Signal {
        // A wait for a name no one can send to would wait forever.
        crate::ids::parse_name("signal", name.unwrap_or_default())?;
    }
    if has_failure && !matches!(kind, EntryKind::Step | EntryKind::UpdateResult) {
        return Err(format!("a {} entry carries no failure", kind.as_str()));
    }
    match kind {
        EntryKind::Step if value.is_some() && has_failure => {
            Err("a step entry carries a value or a failure, not both".into())
        }
        // A step whose result is JSON null arrives without a value (serde reads `null` as
        // none): it is recorded as null.
        EntryKind::Step if !has_failure => Ok(Planned {
            value: Some(value.unwrap_or(Value::Null)),
            effect: Effect::None,
        }),
        EntryKind::Sleep => sleep::plan(value, now_ms),
        EntryKind::Signal | EntryKind::Awakeable => {
            if value.is_some() {
                return Err(format!(
                    "a {} entry carries no value: its result arrives as a completion",
                    kind.as_str()
                ));
            }
            let effect = if kind == EntryKind::Signal {
                Effect::SignalWait {
                    take_buffered: false,
                }
            } else {
                Effect::None
            };
            Ok(Planned {
                value: None,
                effect,
            })
        }
        EntryKind::State => state::plan(name.unwrap_or_default(), value),
        EntryKind::Patch if value.is_some() => Err("a patch entry carries no value".into()),
        EntryKind::Update => {
            let id = value
                .as_ref()
                .and_then(|v| v["id"].as_str())
                .filter(|id| id.starts_with("upd_"))
                .ok_or("an update entry's value is {\"id\": \"upd_...\", \"input\": ...}")?
                .to_owned();
            Ok(Planned {
                value,
                effect: Effect::UpdateAccepted { id },
            })
        }
        // The failure, when there is one, is the caller's to add (see `Effect::UpdateDone`).
        EntryKind::UpdateResult => Ok(Planned {
            effect: Effect::UpdateDone {
                id: name.unwrap_or_default().to_owned(),
                result: (!has_failure)
                    .then(|| serde_json::to_vec(value.as_ref().unwrap_or(&Value::Null)))
                    .transpose()
                    .map_err(|e| e.to_string())?,
                failure: None,
            },
            value: if has_failure {
                None
            } else {
                Some(value.unwrap_or(Value::Null))
            },
        }),
        // Planned by `child::plan`, with the target the caller resolves.
        EntryKind::Call | EntryKind::Send => Err(format!(
            "a {} entry is planned with child::plan",
            kind.as_str()
        )),
        _ => Ok(Planned {
            value,
            effect: Effect::None,
        }),
    }
}

/// The entries an outcome carried (version 5), checked and planned as appends of the
/// attempt whose token is `token`. Only kinds that start nothing may travel so: a command
/// must be durable before the handler waits for it.
pub fn plan_trailing(
    requests: Vec<durin_protocol::AppendRequest>,
    token: Option<&str>,
    now_ms: i64,
) -> Result<Vec<crate::store::NewEntry>, String> {
    requests
        .into_iter()
        .map(|request| {
            let index = request.index;
            if !matches!(
                request.kind,
                EntryKind::Step
                    | EntryKind::Now
                    | EntryKind::Uuid
                    | EntryKind::Random
                    | EntryKind::State
                    | EntryKind::Patch
            ) {
                return Err(format!(
                    "entry {index} ({}) came with the outcome; only step, now, uuid, random, state and patch entries may",
                    request.kind.as_str()
                ));
            }
            let planned = plan(
                request.kind,
                request.name.as_deref(),
                request.value,
                request.failure.is_some(),
                now_ms,
            )
            .map_err(|why| format!("entry {index}, which came with the outcome: {why}"))?;
            Ok(crate::store::NewEntry {
                index: Some(index),
                kind: request.kind,
                name: request.name,
                value: planned
                    .value
                    .map(|value| serde_json::to_vec(&value).unwrap_or_default()),
                content_type: Some("application/json".into()),
                failure: request.failure,
                token: token.map(str::to_owned),
                effect: planned.effect,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_are_checked_and_planned() {
        let now = 1_000;
        let sleep = plan(
            EntryKind::Sleep,
            None,
            Some(json!({"duration_ms": 500})),
            false,
            now,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sleep.effect, Effect::Timer { wake_at_ms: 1_500 });
        assert_eq!(sleep.value, Some(json!({"wake_at_ms": 1_500})));
        assert!(plan(
            EntryKind::Sleep,
            None,
            Some(json!({"duration_ms": -1})),
            false,
            now
        )
        .is_err());
        assert!(plan(EntryKind::Signal, None, None, false, now).is_err());
        assert!(plan(
            EntryKind::Signal,
            Some("approve"),
            Some(json!(1)),
            false,
            now
        )
        .is_err());
        let set = plan(
            EntryKind::State,
            Some("k"),
            Some(json!({"set": 7})),
            false,
            now,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            set.effect,
            Effect::State {
                key: "k".into(),
                value: Some(b"7".to_vec())
            }
        );
        assert!(plan(EntryKind::State, Some("k"), Some(json!(7)), false, now).is_err());
        assert!(plan(EntryKind::Output, None, None, false, now).is_err());
        let unit =
            plan(EntryKind::Step, Some("s"), None, false, now).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(unit.value, Some(Value::Null));
        assert!(plan(EntryKind::Step, Some("s"), Some(json!(1)), true, now).is_err());
        assert!(plan(EntryKind::Unknown, None, None, false, now).is_err());
    }
}
