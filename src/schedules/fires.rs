//! A schedule's state and what a look at it decides, with no store: which fires are due,
//! which were missed, and what each one does under the overlap policy. The rule in
//! `rule.rs` carries the decisions out in one transaction.

use serde::{Deserialize, Serialize};

use super::spec::{fire_workflow_id, Overlap, ScheduleSpec, Timing};

/// The recent fires a schedule keeps, newest last.
pub const RECENT: usize = 20;
/// The most fires one look deals with; the rest wait for the next look, at once.
pub const MAX_FIRES_PER_LOOK: usize = 1_000;
/// How often a schedule whose fire waits for a run to end looks again.
pub const BUFFER_POLL_MS: i64 = 1_000;
/// The most runs of earlier fires a schedule follows (to see when they end).
pub const MAX_RUNNING: usize = 32;
/// Missed fires counted one by one before the rest are skipped over uncounted.
const MAX_MISSED_COUNTED: u64 = 10_000;

/// Where a schedule is, stored beside its spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    #[serde(default)]
    pub paused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Every fire up to this time (nominal, in ms) has been dealt with.
    pub through_ms: i64,
    /// A fire that waits for the running run to end (`buffer_one`, `cancel_other`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffered_ms: Option<i64>,
    /// Workflow ids this schedule started whose runs were not yet seen ended.
    #[serde(default)]
    pub running: Vec<String>,
    #[serde(default)]
    pub counts: Counts,
    #[serde(default)]
    pub recent: Vec<FireRecord>,
    /// Why the last look could not start a fire (no deployment serves the workflow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The fires recorded since this state was read (all of them, also past [`RECENT`]).
    #[serde(skip)]
    pub fresh: Vec<FireRecord>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub started: u64,
    pub skipped: u64,
    pub missed: u64,
}

/// One fire and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FireRecord {
    /// The fire's time (before jitter).
    pub nominal_ms: i64,
    /// When it was dealt with.
    pub at_ms: i64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How it came: `schedule`, `trigger` or `backfill`.
    pub by: By,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A new run started.
    Started,
    /// The fire's workflow id names a run already (a second look, a backfill again).
    AlreadyStarted,
    /// Skipped: an earlier fire's run had not ended (or a fire waited already).
    Skipped,
    /// Waits for the running run to end.
    Buffered,
    /// Older than the catch-up window when Durin looked.
    Missed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum By {
    Schedule,
    Trigger,
    Backfill,
}

/// What a look decided, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Start the fire's run (under [`fire_workflow_id`]).
    Start { nominal_ms: i64, by: By },
    /// Ask the runs (workflow ids) to cancel.
    Cancel(Vec<String>),
}

impl ScheduleState {
    /// A new schedule: it fires after `now_ms`.
    pub fn new(spec: &ScheduleSpec, now_ms: i64) -> ScheduleState {
        ScheduleState {
            paused: spec.paused.unwrap_or(false),
            note: spec.note.clone(),
            through_ms: now_ms,
            created_ms: now_ms,
            updated_ms: now_ms,
            ..ScheduleState::default()
        }
    }

    /// Records a fire, keeping the newest [`RECENT`].
    pub fn record(&mut self, record: FireRecord) {
        match record.outcome {
            Outcome::Started => self.counts.started += 1,
            Outcome::Skipped => self.counts.skipped += 1,
            Outcome::Missed => self.counts.missed += 1,
            Outcome::AlreadyStarted | Outcome::Buffered => {}
        }
        self.fresh.push(record.clone());
        self.recent.push(record);
        if self.recent.len() > RECENT {
            let extra = self.recent.len() - RECENT;
            self.recent.drain(..extra);
        }
    }
}

/// A schedule seen by a look: its id, spec, timing and the policy that applies.
pub struct Look<'a> {
    pub id: &'a str,
    pub spec: &'a ScheduleSpec,
    pub timing: &'a Timing,
    pub now_ms: i64,
}

impl Look<'_> {
    /// The fires due by now (and the one that waited, once nothing runs), each decided
    /// by the overlap policy. `state.running` must hold only runs that have not ended.
    /// Returns the steps and when the schedule is next due (`None`: never, or paused
    /// with nothing waiting).
    pub fn due(&self, state: &mut ScheduleState) -> (Vec<Step>, Option<i64>) {
        let mut steps = Vec::new();
        if let Some(buffered) = state.buffered_ms {
            if state.running.is_empty() {
                state.buffered_ms = None;
                steps.push(self.start(state, buffered, By::Schedule));
            }
        }
        let mut more = false;
        if !state.paused {
            self.skip_missed(state);
            let window = self.spec.catchup_window_ms();
            let mut dealt = 0;
            while let Some(next) = self.timing.next_after(state.through_ms) {
                let due_at = next.saturating_add(self.spec.jitter_ms(self.id, next));
                if due_at > self.now_ms {
                    break;
                }
                if dealt == MAX_FIRES_PER_LOOK {
                    more = true;
                    break;
                }
                dealt += 1;
                state.through_ms = next;
                if self.now_ms.saturating_sub(due_at) > window {
                    self.missed(state, next);
                } else {
                    steps.extend(self.fire(state, next, self.spec.overlap, By::Schedule));
                }
            }
        }
        let due = if more {
            Some(self.now_ms)
        } else {
            self.next_due(state)
        };
        (steps, due)
    }

    /// When the schedule is next looked at: its next fire (after jitter), or sooner while
    /// a fire waits for a run to end; `None` when paused with nothing waiting.
    pub fn next_due(&self, state: &ScheduleState) -> Option<i64> {
        let mut due = if state.paused {
            None
        } else {
            self.timing
                .next_after(state.through_ms)
                .map(|next| next.saturating_add(self.spec.jitter_ms(self.id, next)))
        };
        if state.buffered_ms.is_some() {
            let poll = self.now_ms.saturating_add(BUFFER_POLL_MS);
            due = Some(due.map_or(poll, |due| due.min(poll)));
        }
        due
    }

    /// Skips over the fires that are older than the catch-up window by far, counting
    /// them, without deciding each.
    fn skip_missed(&self, state: &mut ScheduleState) {
        let horizon = self
            .now_ms
            .saturating_sub(self.spec.catchup_window_ms())
            .saturating_sub(self.max_jitter_ms());
        let mut missed = 0u64;
        let mut first = None;
        while let Some(next) = self.timing.next_after(state.through_ms) {
            if next >= horizon {
                break;
            }
            first.get_or_insert(next);
            missed += 1;
            state.through_ms = next;
            if missed == MAX_MISSED_COUNTED {
                state.through_ms = horizon - 1;
                break;
            }
        }
        if let Some(first) = first {
            state.counts.missed += missed - 1;
            let detail = format!(
                "{missed}{} fires from {} were missed: Durin was not running, or the schedule could not fire, for longer than the catch-up window",
                if missed == MAX_MISSED_COUNTED { " or more" } else { "" },
                super::spec::rfc3339(first),
            );
            state.record(FireRecord {
                nominal_ms: state.through_ms,
                at_ms: self.now_ms,
                outcome: Outcome::Missed,
                workflow_id: None,
                detail: Some(detail),
                by: By::Schedule,
            });
        }
    }

    fn max_jitter_ms(&self) -> i64 {
        self.spec
            .jitter
            .map(|j| i64::try_from(j.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn missed(&self, state: &mut ScheduleState, nominal_ms: i64) {
        state.record(FireRecord {
            nominal_ms,
            at_ms: self.now_ms,
            outcome: Outcome::Missed,
            workflow_id: None,
            detail: Some("older than the catch-up window when Durin looked".into()),
            by: By::Schedule,
        });
    }

    /// One fire under `overlap`: started, skipped, or waiting (with the running runs
    /// asked to cancel for `cancel_other`).
    pub fn fire(
        &self,
        state: &mut ScheduleState,
        nominal_ms: i64,
        overlap: Overlap,
        by: By,
    ) -> Vec<Step> {
        if state.running.is_empty() {
            return vec![self.start(state, nominal_ms, by)];
        }
        let running = state.running.join(", ");
        let skip = |state: &mut ScheduleState, nominal_ms: i64, detail: String| {
            state.record(FireRecord {
                nominal_ms,
                at_ms: self.now_ms,
                outcome: Outcome::Skipped,
                workflow_id: None,
                detail: Some(detail),
                by,
            });
        };
        match overlap {
            Overlap::AllowAll => vec![self.start(state, nominal_ms, by)],
            Overlap::Skip => {
                skip(
                    state,
                    nominal_ms,
                    format!("{running} had not ended (overlap: skip)"),
                );
                Vec::new()
            }
            Overlap::BufferOne => {
                if let Some(waiting) = state.buffered_ms {
                    skip(
                        state,
                        nominal_ms,
                        format!(
                            "{running} had not ended and the fire of {} waits already (overlap: buffer_one)",
                            super::spec::rfc3339(waiting)
                        ),
                    );
                } else {
                    self.buffer(state, nominal_ms, by, &running);
                }
                Vec::new()
            }
            Overlap::CancelOther => {
                if let Some(replaced) = state.buffered_ms.take() {
                    skip(
                        state,
                        replaced,
                        "a later fire took its place (overlap: cancel_other)".into(),
                    );
                }
                self.buffer(state, nominal_ms, by, &running);
                vec![Step::Cancel(state.running.clone())]
            }
        }
    }

    fn buffer(&self, state: &mut ScheduleState, nominal_ms: i64, by: By, running: &str) {
        state.buffered_ms = Some(nominal_ms);
        state.record(FireRecord {
            nominal_ms,
            at_ms: self.now_ms,
            outcome: Outcome::Buffered,
            workflow_id: Some(fire_workflow_id(self.id, nominal_ms)),
            detail: Some(format!("starts once {running} ended")),
            by,
        });
    }

    fn start(&self, state: &mut ScheduleState, nominal_ms: i64, by: By) -> Step {
        // Under allow_all many may run: the oldest are no longer followed (each followed
        // run costs a read at every look).
        if state.running.len() >= MAX_RUNNING {
            state.running.remove(0);
        }
        state.running.push(fire_workflow_id(self.id, nominal_ms));
        Step::Start { nominal_ms, by }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedules::spec::parse_time;

    fn spec(json: serde_json::Value) -> ScheduleSpec {
        serde_json::from_value(json).expect("a spec")
    }

    fn at(s: &str) -> i64 {
        parse_time("t", s).expect("a time")
    }

    fn starts(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|step| match step {
                Step::Start { nominal_ms, .. } => Some(super::super::spec::rfc3339(*nominal_ms)),
                Step::Cancel(_) => None,
            })
            .collect()
    }

    #[test]
    fn due_fires_start_once_and_the_next_is_named() {
        let spec = spec(serde_json::json!({"every": "1m", "start": {"workflow": "w"}}));
        let timing = spec.check().expect("valid");
        let mut state = ScheduleState::new(&spec, at("2026-12-05T10:00:30Z"));
        let look = Look {
            id: "s",
            spec: &spec,
            timing: &timing,
            now_ms: at("2026-12-05T10:02:00Z"),
        };
        let (steps, due) = look.due(&mut state);
        assert_eq!(starts(&steps), ["2026-12-05T10:01:00Z"]);
        // Skipped, not started: the 10:01 run has not ended.
        assert_eq!(state.counts.skipped, 1);
        assert_eq!(due, Some(at("2026-12-05T10:03:00Z")));
        // Looking again at the same time starts nothing.
        let (steps, _) = look.due(&mut state);
        assert!(steps.is_empty());
    }

    #[test]
    fn allow_all_starts_every_fire_and_buffer_one_keeps_one() {
        let mut spec = spec(serde_json::json!({"every": "1m", "start": {"workflow": "w"}}));
        let timing = spec.check().expect("valid");
        let now_ms = at("2026-12-05T10:05:00Z");
        for (overlap, started, skipped, buffered) in [
            (Overlap::AllowAll, 5, 0, None),
            (Overlap::BufferOne, 1, 3, Some(at("2026-12-05T10:02:00Z"))),
            (Overlap::Skip, 1, 4, None),
        ] {
            spec.overlap = overlap;
            let mut state = ScheduleState::new(&spec, at("2026-12-05T10:00:00Z"));
            let look = Look {
                id: "s",
                spec: &spec,
                timing: &timing,
                now_ms,
            };
            let (steps, due) = look.due(&mut state);
            assert_eq!(starts(&steps).len(), started, "{overlap:?}");
            assert_eq!(state.counts.skipped, skipped, "{overlap:?}");
            assert_eq!(state.buffered_ms, buffered, "{overlap:?}");
            if buffered.is_some() {
                assert_eq!(due, Some(now_ms + BUFFER_POLL_MS));
                // Once the running run ended, the buffered fire starts.
                state.running.clear();
                let (steps, _) = look.due(&mut state);
                assert_eq!(starts(&steps), ["2026-12-05T10:02:00Z"]);
                assert_eq!(state.buffered_ms, None);
            }
        }
    }

    #[test]
    fn cancel_other_cancels_the_running_run_and_waits_for_it() {
        let spec = spec(serde_json::json!({
            "every": "1m", "overlap": "cancel_other", "start": {"workflow": "w"}
        }));
        let timing = spec.check().expect("valid");
        let mut state = ScheduleState::new(&spec, at("2026-12-05T10:00:30Z"));
        state.running = vec!["s-2026-12-05T10:00:00Z".into()];
        let look = Look {
            id: "s",
            spec: &spec,
            timing: &timing,
            now_ms: at("2026-12-05T10:02:00Z"),
        };
        let (steps, _) = look.due(&mut state);
        assert_eq!(
            steps,
            [
                Step::Cancel(vec!["s-2026-12-05T10:00:00Z".into()]),
                Step::Cancel(vec!["s-2026-12-05T10:00:00Z".into()])
            ]
        );
        // The later fire replaced the earlier one that waited.
        assert_eq!(state.buffered_ms, Some(at("2026-12-05T10:02:00Z")));
        assert_eq!(state.counts.skipped, 1);
    }

    #[test]
    fn fires_older_than_the_catchup_window_are_missed_not_started() {
        let spec = spec(serde_json::json!({
            "every": "1m", "overlap": "allow_all", "catchup_window": "3m",
            "start": {"workflow": "w"}
        }));
        let timing = spec.check().expect("valid");
        let mut state = ScheduleState::new(&spec, at("2026-12-05T10:00:00Z"));
        let look = Look {
            id: "s",
            spec: &spec,
            timing: &timing,
            now_ms: at("2026-12-05T11:00:00Z"),
        };
        let (steps, _) = look.due(&mut state);
        // 10:57, 10:58, 10:59 and 11:00 are within 3 minutes; 10:01 to 10:56 are not.
        assert_eq!(
            starts(&steps),
            [
                "2026-12-05T10:57:00Z",
                "2026-12-05T10:58:00Z",
                "2026-12-05T10:59:00Z",
                "2026-12-05T11:00:00Z"
            ]
        );
        assert_eq!(state.counts.missed, 56);
        assert_eq!(state.counts.started, 0, "starts are counted by the rule");
    }

    #[test]
    fn a_paused_schedule_fires_nothing_and_is_not_due() {
        let spec =
            spec(serde_json::json!({"every": "1m", "paused": true, "start": {"workflow": "w"}}));
        let timing = spec.check().expect("valid");
        let mut state = ScheduleState::new(&spec, at("2026-12-05T10:00:00Z"));
        let look = Look {
            id: "s",
            spec: &spec,
            timing: &timing,
            now_ms: at("2026-12-05T10:10:00Z"),
        };
        assert_eq!(look.due(&mut state), (Vec::new(), None));
    }

    #[test]
    fn a_look_deals_with_a_bounded_number_of_fires() {
        let spec = spec(serde_json::json!({
            "every": "1s", "overlap": "allow_all", "catchup_window": "1d",
            "start": {"workflow": "w"}
        }));
        let timing = spec.check().expect("valid");
        let mut state = ScheduleState::new(&spec, at("2026-12-05T10:00:00Z"));
        let now_ms = at("2026-12-05T11:00:00Z");
        let look = Look {
            id: "s",
            spec: &spec,
            timing: &timing,
            now_ms,
        };
        let (steps, due) = look.due(&mut state);
        assert_eq!(steps.len(), MAX_FIRES_PER_LOOK);
        assert_eq!(due, Some(now_ms), "the rest at once");
    }
}
