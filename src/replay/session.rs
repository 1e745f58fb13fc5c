//! A replay under way: the recording a replayed attempt reads instead of the store. A plain
//! handler being replayed calls the context API and the egress as it always does, with the
//! invocation id it was given (the recorded one) and its attempt's token (the replay's own):
//! the token finds the replay, whose recording answers. Nothing is written, and nothing the
//! recording lacks is done: the handler is told to stop there, and the replay notes why.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use durin_protocol::EntryKind;

use crate::ids::InvocationId;
use crate::problem::ApiError;
use crate::store::{NamedCommand, PlainAnswer, PlainCommand, StoredEntry};

/// Why a replay stopped before the handler's own end.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// The handler reached the end of a recording that had not ended (the point where the
    /// run is now): it would do `next`, which the replay does not do.
    Frontier { next: String },
    /// The handler continued its run as new (which the replay does not do).
    ContinuedAsNew,
    /// The handler asked for something other than what was recorded.
    Diverged {
        index: u32,
        recorded: String,
        requested: String,
        detail: Option<String>,
    },
}

/// One replayed attempt of one history.
pub struct Session {
    pub id: InvocationId,
    pub token: String,
    /// The recorded entries after the input, without the output.
    entries: Vec<StoredEntry>,
    /// The recording ended by the handler's own answer: whatever goes beyond it is a
    /// divergence, not its frontier. (An end Durin wrote, a timeout or retries used up,
    /// binds nothing: the code may well go on where the run was cut.)
    ended: bool,
    /// The index of the output, or of the next entry of a recording that had not ended.
    end_index: u32,
    stop: Mutex<Option<Stop>>,
    /// Egress calls per identity (method, URL, body digest) so far, as the egress counts
    /// them for an attempt.
    egress: Mutex<HashMap<(String, String, String), u32>>,
    /// The updates the handler refused in this replay (a refusal is not journaled: the
    /// store knows it, and a replay repeats it).
    refused: Mutex<std::collections::HashSet<String>>,
    /// The positions in `entries` the handler asked for (a recorded entry it never asks
    /// for is a divergence too).
    used: Mutex<std::collections::BTreeSet<usize>>,
    /// Writes per state key so far, as the running attempt counts them.
    state_writes: Mutex<HashMap<String, u32>>,
}

impl Session {
    /// A replay of `entries` (the whole recording, from the input) as `token`; `binding_end`:
    /// the recording ended by the handler's own answer.
    pub fn new(
        id: InvocationId,
        token: String,
        entries: &[StoredEntry],
        binding_end: bool,
    ) -> Session {
        let has_output = entries.last().is_some_and(|e| e.kind == EntryKind::Output);
        let end_index = if has_output {
            entries.len() as u32 - 1
        } else {
            entries.len() as u32
        };
        let ended = has_output && binding_end;
        Session {
            id,
            token,
            entries: entries
                .iter()
                .filter(|e| !matches!(e.kind, EntryKind::Input | EntryKind::Output))
                .cloned()
                .collect(),
            ended,
            end_index,
            stop: Mutex::default(),
            egress: Mutex::default(),
            refused: Mutex::default(),
            used: Mutex::default(),
            state_writes: Mutex::default(),
        }
    }

    /// The recorded entries after the input, without the output.
    pub fn entries(&self) -> &[StoredEntry] {
        &self.entries
    }

    /// Notes that the handler asked for the recorded entry at journal index `index`.
    pub fn use_entry(&self, index: u32) {
        if let Some(position) = self.entries.iter().position(|e| e.index == index) {
            lock(&self.used).insert(position);
        }
    }

    /// The first recorded entry the handler did not ask for (a cancellation, which Durin
    /// wrote, aside), as a report names it.
    pub fn first_unused(&self) -> Option<(u32, String)> {
        let used = lock(&self.used);
        self.entries
            .iter()
            .enumerate()
            .find(|(position, e)| e.kind != EntryKind::Cancel && !used.contains(position))
            .map(|(_, e)| (e.index, describe_entry(e)))
    }

    /// The occurrence of this write of the state `key` in the replay.
    pub fn state_occurrence(&self, key: &str) -> u32 {
        let mut writes = lock(&self.state_writes);
        let n = writes.entry(key.to_owned()).or_default();
        *n += 1;
        *n - 1
    }

    /// Why the handler was stopped, if it was.
    pub fn stopped(&self) -> Option<Stop> {
        lock(&self.stop).clone()
    }

    /// Notes that the handler asked for `requested`, which the recording does not hold,
    /// and returns the answer that stops it. A recorded entry of the same kind and name
    /// that it did not reach (`instead`) makes it a divergence even where the recording had
    /// not ended.
    pub fn beyond(&self, requested: String, instead: Option<(u32, String)>) -> ApiError {
        // A recorded entry it skipped is where it went another way.
        let stop = match instead.or_else(|| self.first_unused()) {
            Some((index, recorded)) => Stop::Diverged {
                index,
                recorded,
                requested: requested.clone(),
                detail: None,
            },
            None if self.ended => Stop::Diverged {
                index: self.end_index,
                recorded: "output (the recorded run ended here)".into(),
                requested: requested.clone(),
                detail: None,
            },
            None => Stop::Frontier {
                next: requested.clone(),
            },
        };
        let diverged = matches!(stop, Stop::Diverged { .. });
        lock(&self.stop).get_or_insert(stop);
        ApiError::Suspended(format!(
            "replay of invocation {}: the recording does not hold {requested}{}; nothing was recorded or sent: stop now",
            self.id,
            if diverged { " (a divergence)" } else { " (its end)" }
        ))
    }

    /// Notes that the handler would continue its run as new here, and returns the answer
    /// that stops it.
    pub fn continue_as_new(&self) -> ApiError {
        lock(&self.stop).get_or_insert(Stop::ContinuedAsNew);
        ApiError::Suspended(format!(
            "replay of invocation {}: the run would continue as new here; nothing was recorded: stop now",
            self.id
        ))
    }

    /// A plain handler's command, answered from the recording as `journal::plain` answers
    /// it from the journal: found by kind, name, key and occurrence; a wait gets the
    /// command that completed first. A command the recording does not hold, or a wait for
    /// which nothing had arrived, stops the handler.
    pub fn plain(&self, command: &PlainCommand) -> Result<PlainAnswer, ApiError> {
        let mut entries = Vec::with_capacity(command.commands.len());
        for named in &command.commands {
            match self.find(named) {
                Some((position, entry)) => {
                    lock(&self.used).insert(position);
                    entries.push((entry.clone(), true));
                }
                // What it lacks is never done: also a read (of a step) stops the handler,
                // so that it does not do the step's work instead.
                None => return Err(self.beyond(describe_named(named), None)),
            }
        }
        let cancel_seq = self
            .entries
            .iter()
            .find(|e| e.kind == EntryKind::Cancel)
            .and_then(|e| e.completion.as_ref().map(|c| c.seq));
        let before_cancel = |e: &StoredEntry| {
            e.completion
                .as_ref()
                .is_some_and(|c| cancel_seq.is_none_or(|seq| c.seq < seq))
        };
        let cancelled = command.suspend
            && cancel_seq.is_some()
            && !entries.iter().any(|(e, _)| before_cancel(e));
        if command.suspend && !cancelled && entries.iter().all(|(e, _)| e.completion.is_none()) {
            let waits = command
                .commands
                .iter()
                .map(describe_named)
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(self.beyond(format!("the completion of {waits}"), None));
        }
        Ok(PlainAnswer {
            entries,
            suspended: false,
            cancelled,
        })
    }

    fn find(&self, named: &NamedCommand) -> Option<(usize, &StoredEntry)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.kind == named.kind
                    && e.name.as_deref() == Some(named.name.as_str())
                    && named
                        .key
                        .as_deref()
                        .is_none_or(|key| e.value.as_deref() == Some(key))
            })
            .nth(named.occurrence as usize)
    }

    /// Notes that the handler refused `update_id` (nothing is written).
    pub fn refuse_update(&self, update_id: &str) {
        lock(&self.refused).insert(update_id.to_owned());
    }

    /// Whether the handler refused `update_id` in this replay.
    pub fn refused(&self, update_id: &str) -> bool {
        lock(&self.refused).contains(update_id)
    }

    /// The occurrence of this egress call (method, URL, body digest) in the replay.
    pub fn egress_occurrence(&self, identity: &(String, String, String)) -> u32 {
        let mut seen = lock(&self.egress);
        let n = seen.entry(identity.clone()).or_default();
        *n += 1;
        *n - 1
    }

    /// How many calls of `identity` the replay has made.
    pub fn egress_seen(&self, identity: &(String, String, String)) -> u32 {
        lock(&self.egress).get(identity).copied().unwrap_or(0)
    }
}

/// A recorded entry as a report names it: `step "charge"`, `egress POST http://…`.
pub fn describe_entry(entry: &StoredEntry) -> String {
    match &entry.name {
        Some(name) if entry.kind == EntryKind::Egress => format!("egress {name}"),
        Some(name) => format!("{} {name:?}", entry.kind.as_str()),
        None => entry.kind.as_str().to_owned(),
    }
}

fn describe_named(named: &NamedCommand) -> String {
    let what = format!("{} {:?}", named.kind.as_str(), named.name);
    if named.occurrence > 0 {
        format!("{what} (write {})", named.occurrence + 1)
    } else {
        what
    }
}

/// The replays under way, by invocation id and token.
#[derive(Default)]
pub struct Replays {
    sessions: Mutex<HashMap<(InvocationId, String), Arc<Session>>>,
}

impl Replays {
    /// The replay this call belongs to, if it is one.
    pub fn find(&self, id: &InvocationId, token: &str) -> Option<Arc<Session>> {
        let sessions = lock(&self.sessions);
        if sessions.is_empty() {
            return None;
        }
        sessions.get(&(id.clone(), token.to_owned())).cloned()
    }

    /// Opens `session` until the returned guard is dropped.
    pub fn open(&self, session: Arc<Session>) -> Open<'_> {
        let key = (session.id.clone(), session.token.clone());
        lock(&self.sessions).insert(key.clone(), session);
        Open { replays: self, key }
    }
}

/// A replay's session, open while this lives.
pub struct Open<'a> {
    replays: &'a Replays,
    key: (InvocationId, String),
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        lock(&self.replays.sessions).remove(&self.key);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
