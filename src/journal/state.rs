//! `state`: durable key-value state of an invocation, set and cleared by journal entries.
//! The store keeps the latest value of each key beside the journal, so that a query reads
//! one row without calling the handler and without writing anything.

use serde_json::Value;

use super::Planned;
use crate::store::Effect;

pub(super) fn plan(key: &str, value: Option<Value>) -> Result<Planned, String> {
    let bad = || "a state entry's value is {\"set\": V} or {\"clear\": true}".to_owned();
    let Some(Value::Object(op)) = &value else {
        return Err(bad());
    };
    let state = match (op.get("set"), op.get("clear"), op.len()) {
        (Some(set), None, 1) => Some(serde_json::to_vec(set).map_err(|e| e.to_string())?),
        (None, Some(Value::Bool(true)), 1) => None,
        _ => return Err(bad()),
    };
    Ok(Planned {
        value,
        effect: Effect::State {
            key: key.to_owned(),
            value: state,
        },
    })
}
