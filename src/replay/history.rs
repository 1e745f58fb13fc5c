//! A history: the journal of one invocation as a self-contained file, JSON Lines. Its first
//! line names the invocation (`{"history": {...}}`), each following line is one journal
//! entry with its completion (`{"entry": {...}}`), from the input (index 0) to the output
//! when it ended. A file may hold several histories (a workflow's runs), each from its own
//! `history` line. Values that are JSON on one line (as every SDK value is) are written as
//! they are; other bytes (a plain handler's form input, JSON over several lines) as
//! base64, so that a replay sends exactly what was recorded.

use base64::Engine as _;
use durin_protocol::{EntryKind, Failure};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::store::{InvocationRecord, StoredCompletion, StoredEntry};

/// The version of the format, written in every `history` line.
pub const FORMAT: u32 = 1;

/// The invocation a history recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// The format's version ([`FORMAT`]).
    pub format: u32,
    pub invocation_id: String,
    pub service: String,
    pub handler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// The deployment the recording ran on.
    pub deployment_id: String,
    /// Its status when it was exported (`completed`, `suspended`, ...).
    pub status: String,
    /// The attempts it had made.
    pub attempts: u32,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at_ms: Option<i64>,
}

/// One invocation's recording.
#[derive(Debug, Clone)]
pub struct History {
    pub header: Header,
    /// Every entry, in index order, from the input.
    pub entries: Vec<StoredEntry>,
}

/// Bytes as they are written: as they are when they are JSON on one line (so that the
/// file stays JSON Lines and the bytes come back exactly), otherwise base64.
type Written = (Option<Box<RawValue>>, Option<String>);

fn write_bytes(bytes: Option<&[u8]>) -> Written {
    let Some(bytes) = bytes else {
        return (None, None);
    };
    // `null` would read back as no value, and a raw value loses surrounding whitespace.
    let one_line = std::str::from_utf8(bytes)
        .ok()
        .filter(|text| !text.contains(['\n', '\r']) && text.trim() == *text && *text != "null")
        .and_then(|text| RawValue::from_string(text.to_owned()).ok());
    match one_line {
        Some(value) => (Some(value), None),
        None => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

fn read_bytes(what: &str, (value, base64): Written) -> Result<Option<Vec<u8>>, String> {
    match (value, base64) {
        (Some(_), Some(_)) => Err(format!("{what} has both value and value_base64")),
        (Some(value), None) => Ok(Some(value.get().as_bytes().to_vec())),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map(Some)
            .map_err(|e| format!("{what}: value_base64 is not base64: {e}")),
        (None, None) => Ok(None),
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryLine {
    index: u32,
    kind: EntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure: Option<Failure>,
    attempt: u32,
    at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    completion: Option<CompletionLine>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CompletionLine {
    seq: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure: Option<Failure>,
    at_ms: i64,
}

/// One line of a history file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    History(Header),
    Entry(EntryLine),
}

impl History {
    /// The history of `record`, whose journal is `entries`.
    pub fn of(record: &InvocationRecord, entries: Vec<StoredEntry>) -> History {
        History {
            header: Header {
                format: FORMAT,
                invocation_id: record.id.to_string(),
                service: record.service.clone(),
                handler: record.handler.clone(),
                workflow_id: record.workflow_id.clone(),
                deployment_id: record.deployment_id.clone(),
                status: record.status.to_string(),
                attempts: record.attempt,
                created_at_ms: record.created_at_ms,
                completed_at_ms: record.completed_at_ms,
            },
            entries,
        }
    }

    /// The history as JSON Lines, each line ending with `\n`.
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        let mut push = |line: &Line| {
            // Plain data: serializing it cannot fail.
            out.push_str(&serde_json::to_string(line).unwrap_or_default());
            out.push('\n');
        };
        push(&Line::History(self.header.clone()));
        for entry in &self.entries {
            let (value, value_base64) = write_bytes(entry.value.as_deref());
            push(&Line::Entry(EntryLine {
                index: entry.index,
                kind: entry.kind,
                name: entry.name.clone(),
                value,
                value_base64,
                content_type: entry.content_type.clone(),
                failure: entry.failure.clone(),
                attempt: entry.attempt,
                at_ms: entry.at_ms,
                completion: entry.completion.as_ref().map(|c| {
                    let (value, value_base64) = write_bytes(c.value.as_deref());
                    CompletionLine {
                        seq: c.seq,
                        value,
                        value_base64,
                        failure: c.failure.clone(),
                        at_ms: c.at_ms,
                    }
                }),
            }));
        }
        out
    }

    /// Every history in `text` (JSON Lines; blank lines are skipped), or what is wrong
    /// with it, naming the line.
    pub fn parse_all(text: &str) -> Result<Vec<History>, String> {
        let mut histories: Vec<History> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let at = n + 1;
            if line.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(line).map_err(|e| format!("line {at}: {e}"))?;
            match line {
                Line::History(header) => {
                    if header.format != FORMAT {
                        return Err(format!(
                            "line {at}: history format {} is not known (this Durin reads {FORMAT})",
                            header.format
                        ));
                    }
                    histories.push(History {
                        header,
                        entries: Vec::new(),
                    });
                }
                Line::Entry(entry) => {
                    let Some(history) = histories.last_mut() else {
                        return Err(format!(
                            "line {at}: an entry before any history line (a history starts with {{\"history\": ...}})"
                        ));
                    };
                    let expected = history.entries.len() as u32;
                    if entry.index != expected {
                        return Err(format!(
                            "line {at}: entry {} where entry {expected} was expected (entries are dense, in order)",
                            entry.index
                        ));
                    }
                    if (entry.index == 0) != (entry.kind == EntryKind::Input) {
                        return Err(format!(
                            "line {at}: entry 0, and only entry 0, is the input"
                        ));
                    }
                    let what = format!("line {at}");
                    history.entries.push(StoredEntry {
                        index: entry.index,
                        kind: entry.kind,
                        name: entry.name,
                        value: read_bytes(&what, (entry.value, entry.value_base64))?,
                        content_type: entry.content_type,
                        failure: entry.failure,
                        attempt: entry.attempt,
                        at_ms: entry.at_ms,
                        completion: match entry.completion {
                            Some(c) => Some(StoredCompletion {
                                seq: c.seq,
                                value: read_bytes(&what, (c.value, c.value_base64))?,
                                failure: c.failure,
                                at_ms: c.at_ms,
                            }),
                            None => None,
                        },
                    });
                }
            }
        }
        if let Some(empty) = histories.iter().find(|h| h.entries.is_empty()) {
            return Err(format!(
                "the history of {} has no entries (not even its input)",
                empty.header.invocation_id
            ));
        }
        Ok(histories)
    }

    /// The output entry, when the recording ended.
    pub fn output(&self) -> Option<&StoredEntry> {
        self.entries
            .last()
            .filter(|entry| entry.kind == EntryKind::Output)
    }

    /// Whether the recording ended by the handler's own answer (see [`handler_end`]): code
    /// that goes beyond it then diverges; beyond an end Durin wrote it only goes on.
    pub fn handler_ended(&self) -> bool {
        self.output()
            .is_some_and(|output| handler_end(&self.header.status, output.failure.as_ref()))
    }

    /// The patch markers the recording holds: the patches its run went through.
    pub fn patches(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::Patch)
            .filter_map(|e| e.name.clone())
            .collect()
    }
}

/// Whether an end with `status` (and `failure`) is the handler's own answer: an output, a
/// continue-as-new, a cancellation it answered, or a failure it answered (a `4xx` but
/// `429`). A `5xx` or `429` failure (its retries used up), a timeout and a termination are
/// Durin's: the run was cut where it stood.
pub fn handler_end(status: &str, failure: Option<&Failure>) -> bool {
    match status {
        "completed" | "continued" | "cancelled" => true,
        "failed" => failure.is_some_and(|f| {
            (400..500).contains(&f.status)
                && f.status != 429
                && !f
                    .error_type
                    .as_deref()
                    .is_some_and(|t| t.ends_with("Timeout"))
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u32, kind: EntryKind, value: Option<&[u8]>) -> StoredEntry {
        StoredEntry {
            index,
            kind,
            name: (index > 0).then(|| format!("e{index}")),
            value: value.map(<[u8]>::to_vec),
            content_type: None,
            failure: None,
            attempt: 1,
            at_ms: 10,
            completion: None,
        }
    }

    #[test]
    fn a_history_comes_back_byte_for_byte() {
        let header = Header {
            format: FORMAT,
            invocation_id: "inv_1".into(),
            service: "order".into(),
            handler: "process".into(),
            workflow_id: None,
            deployment_id: "dep_1".into(),
            status: "completed".into(),
            attempts: 2,
            created_at_ms: 1,
            completed_at_ms: Some(9),
        };
        let mut waited = entry(2, EntryKind::Sleep, Some(br#"{"wake_at_ms":5}"#));
        waited.completion = Some(StoredCompletion {
            seq: 1,
            value: None,
            failure: None,
            at_ms: 5,
        });
        let history = History {
            header,
            entries: vec![
                // Not JSON, JSON on two lines, null and JSON with a space around it: all
                // base64; JSON with spaces inside as it is.
                entry(0, EntryKind::Input, Some(b"amount=5")),
                entry(1, EntryKind::Step, Some(b"{ \"z\": 1,\n \"a\": 2 }")),
                waited,
                entry(3, EntryKind::Step, Some(b"null")),
                entry(4, EntryKind::Step, Some(b" 7")),
                entry(5, EntryKind::Step, Some(b"{ \"b\": 1, \"a\": 2 }")),
                entry(6, EntryKind::Output, Some(br#"{"ok":true}"#)),
            ],
        };
        let text = history.to_jsonl();
        assert!(text.contains(r#""value":{"ok":true}"#), "{text}");
        assert!(text.contains(r#""value":{ "b": 1, "a": 2 }"#), "{text}");
        assert_eq!(text.matches("value_base64").count(), 4, "{text}");
        assert_eq!(text.lines().count(), 8, "{text}");
        let again = History::parse_all(&format!("{text}\n{text}")).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].entries, history.entries);
        assert_eq!(again[1].header.invocation_id, "inv_1");
        assert!(again[0].output().is_some());
    }

    #[test]
    fn a_broken_history_says_which_line() {
        let header = r#"{"history":{"format":1,"invocation_id":"inv_1","service":"s","handler":"h","deployment_id":"d","status":"running","attempts":1,"created_at_ms":1}}"#;
        let input = r#"{"entry":{"index":0,"kind":"input","attempt":1,"at_ms":1}}"#;
        let gap = r#"{"entry":{"index":2,"kind":"step","name":"a","attempt":1,"at_ms":1}}"#;
        let error = History::parse_all(&format!("{header}\n{input}\n{gap}")).unwrap_err();
        assert!(error.starts_with("line 3:"), "{error}");
        let error = History::parse_all(input).unwrap_err();
        assert!(error.contains("before any history line"), "{error}");
        let error = History::parse_all(header).unwrap_err();
        assert!(error.contains("no entries"), "{error}");
        let error = History::parse_all("{\"entry\": 3}").unwrap_err();
        assert!(error.starts_with("line 1:"), "{error}");
    }
}
