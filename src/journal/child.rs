//! `call` and `send`: another handler started with the entry, in the same transaction, so
//! that it starts exactly once. A `call` is a command: the child's end completes it with
//! the child's output or failure. A `send` is one-way and may be delayed (a durable
//! scheduled start).

use std::time::Duration;

use durin_protocol::EntryKind;
use serde_json::Value;

use crate::ids::parse_name;

/// The longest a `send` may be delayed (a year and a day, as a sleep).
const MAX_DELAY: Duration = crate::lifecycle::MAX_DELAY;

/// A child invocation an entry asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildRequest {
    pub service: String,
    pub handler: String,
    pub input: Value,
    /// How long after now it starts (zero for a `call`).
    pub delay: Duration,
    /// A child workflow: the workflow id its run takes (the handler is `run`).
    pub workflow_id: Option<String>,
    pub parent_close: ParentClose,
}

pub use crate::store::ParentClose;

/// Checks a `call` or `send` entry: `name` is `"service/handler"`, `value`
/// `{"input": V}` with, for a `send`, an optional `"delay_ms"`.
pub fn plan(
    kind: EntryKind,
    name: Option<&str>,
    value: Option<Value>,
) -> Result<ChildRequest, String> {
    let what = kind.as_str();
    let (service, handler) = name
        .and_then(|n| n.split_once('/'))
        .ok_or_else(|| format!("a {what} entry is named \"service/handler\""))?;
    let service = parse_name("service", service)?;
    let handler = parse_name("handler", handler)?;
    let mut fields = match value.unwrap_or(Value::Null) {
        Value::Object(fields) => fields,
        Value::Null => Default::default(),
        _ => return Err(format!("a {what} entry's value is {{\"input\": ...}}")),
    };
    let input = fields.remove("input").unwrap_or(Value::Null);
    let workflow_id = match fields.remove("workflow_id") {
        None => None,
        Some(Value::String(id)) if handler == "run" => Some(crate::ids::parse_workflow_id(&id)?),
        Some(Value::String(_)) => {
            return Err("a child workflow runs the handler \"run\" of its workflow".into())
        }
        Some(_) => return Err("workflow_id is a string".into()),
    };
    let parent_close = match fields.remove("parent_close") {
        None if kind == EntryKind::Call => ParentClose::Cancel,
        None => ParentClose::Abandon,
        Some(Value::String(policy)) => ParentClose::parse(&policy).ok_or_else(|| {
            format!("parent_close is terminate, cancel or abandon, not {policy:?}")
        })?,
        Some(_) => return Err("parent_close is a string".into()),
    };
    let delay = match fields.remove("delay_ms") {
        None => Duration::ZERO,
        Some(_) if kind == EntryKind::Call => {
            return Err("a call starts at once; delay a send instead".into())
        }
        Some(delay) => delay
            .as_u64()
            .map(Duration::from_millis)
            .filter(|d| *d <= MAX_DELAY)
            .ok_or_else(|| {
                "delay_ms is a whole number of milliseconds up to a year and a day".to_owned()
            })?,
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(format!("a {what} entry's value has no field {unknown:?}"));
    }
    Ok(ChildRequest {
        service,
        handler,
        input,
        delay,
        workflow_id,
        parent_close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_and_sends_name_a_handler_and_carry_an_input() {
        let call = plan(
            EntryKind::Call,
            Some("order/process"),
            Some(json!({"input": 1})),
        );
        assert_eq!(
            call,
            Ok(ChildRequest {
                service: "order".into(),
                handler: "process".into(),
                input: json!(1),
                delay: Duration::ZERO,
                workflow_id: None,
                parent_close: ParentClose::Cancel,
            })
        );
        let send = plan(
            EntryKind::Send,
            Some("email/send"),
            Some(json!({"input": null, "delay_ms": 1500})),
        );
        assert_eq!(send.map(|s| s.delay), Ok(Duration::from_millis(1500)));
        let child = plan(
            EntryKind::Call,
            Some("billing/run"),
            Some(json!({"workflow_id": "acct-1", "parent_close": "abandon"})),
        );
        assert_eq!(
            child.map(|c| (c.workflow_id, c.parent_close)),
            Ok((Some("acct-1".into()), ParentClose::Abandon))
        );
        for (kind, name, value) in [
            (EntryKind::Call, Some("order"), json!({})),
            (EntryKind::Call, Some("9/x"), json!({})),
            (EntryKind::Call, None, json!({})),
            (EntryKind::Call, Some("a/b"), json!({"delay_ms": 5})),
            (EntryKind::Send, Some("a/b"), json!({"delay_ms": -5})),
            (EntryKind::Send, Some("a/b"), json!({"inputs": 5})),
            (EntryKind::Send, Some("a/b"), json!([1])),
            (EntryKind::Call, Some("a/b"), json!({"workflow_id": "w"})),
            (
                EntryKind::Call,
                Some("a/run"),
                json!({"workflow_id": "x/y"}),
            ),
            (
                EntryKind::Call,
                Some("a/run"),
                json!({"parent_close": "explode"}),
            ),
        ] {
            assert!(
                plan(kind, name, Some(value.clone())).is_err(),
                "{name:?} {value}"
            );
        }
    }
}
