//! What a schedule is: when it fires (a cron expression in a time zone, or a fixed
//! interval), what each fire starts, and how fires that overlap or were missed are treated.
//! Checked once, when it is set; [`Timing`] then answers "the next fire after T".

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The default catch-up window: fires missed for up to a day while Durin was down still
/// happen (subject to the overlap policy) when it is back.
pub const DEFAULT_CATCHUP: Duration = Duration::from_secs(24 * 3600);
/// The shortest interval and the shortest catch-up window.
const MIN_PERIOD: Duration = Duration::from_secs(1);
/// The longest interval and the longest catch-up window.
const MAX_SPAN: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest jitter.
const MAX_JITTER: Duration = Duration::from_secs(24 * 3600);

/// A schedule as it is set (by the admin API, the CLI or the config) and stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// A cron expression: five fields, or six with seconds first; `@daily` and the like.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Or a fixed interval (`15m`): fires at the multiples of it since the Unix epoch,
    /// plus `offset`.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub every: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub offset: Option<Duration>,
    /// The IANA time zone a cron expression is read in (`Europe/Berlin`); UTC by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Each fire is delayed by up to this much (the same delay for the same fire on every
    /// node), so that many schedules on one minute do not start together.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub jitter: Option<Duration>,
    #[serde(default)]
    pub overlap: Overlap,
    /// Fires missed while Durin was down (or the schedule's workflow had no deployment)
    /// for longer than this are not made up; [`DEFAULT_CATCHUP`] by default.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub catchup_window: Option<Duration>,
    /// What each fire does.
    pub start: StartAction,
    /// Set on the schedule's state (it is not part of what the schedule is): paused from
    /// the start, or paused/unpaused by an update.
    #[serde(default, skip_serializing)]
    pub paused: Option<bool>,
    /// A note shown with the schedule (why it is paused, who owns it).
    #[serde(default, skip_serializing)]
    pub note: Option<String>,
}

/// Each fire starts a run of `workflow` (its `run` handler) with `input`, under the
/// workflow id `{schedule}-{fire time}`, so that a fire starts one run however many nodes
/// see it due.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartAction {
    pub workflow: String,
    #[serde(default)]
    pub input: Value,
}

/// What a fire does while a run an earlier fire started has not ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// The fire is skipped.
    #[default]
    Skip,
    /// The fire waits for the run to end (one fire at most; a later one is skipped).
    BufferOne,
    /// The fire starts its run anyway.
    AllowAll,
    /// The running run is cancelled, and the fire starts once it ended.
    CancelOther,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::BufferOne => "buffer_one",
            Overlap::AllowAll => "allow_all",
            Overlap::CancelOther => "cancel_other",
        }
    }
}

impl FromStr for Overlap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(Overlap::Skip),
            "buffer_one" => Ok(Overlap::BufferOne),
            "allow_all" => Ok(Overlap::AllowAll),
            "cancel_other" => Ok(Overlap::CancelOther),
            other => Err(format!(
                "overlap {other:?} is not a policy: use skip, buffer_one, allow_all or cancel_other"
            )),
        }
    }
}

/// When a schedule fires, checked.
#[derive(Debug, Clone)]
pub enum Timing {
    Cron {
        cron: Box<croner::Cron>,
        zone: jiff::tz::TimeZone,
    },
    Every {
        period_ms: i64,
        offset_ms: i64,
    },
}

impl ScheduleSpec {
    /// Checks everything a schedule says, with a message that names what is wrong.
    pub fn check(&self) -> Result<Timing, String> {
        crate::ids::parse_name("workflow", &self.start.workflow)?;
        if let Some(note) = &self.note {
            if note.len() > 1024 {
                return Err("the note is longer than 1024 bytes".into());
            }
        }
        if let Some(window) = self.catchup_window {
            if window < MIN_PERIOD || window > MAX_SPAN {
                return Err("catchup_window must be from 1s to 366d".into());
            }
        }
        if self.jitter.is_some_and(|jitter| jitter > MAX_JITTER) {
            return Err("jitter must be at most 1d".into());
        }
        let timing = match (&self.cron, self.every) {
            (Some(_), Some(_)) => {
                return Err("give either cron or every, not both".into());
            }
            (None, None) => {
                return Err("say when it fires: cron (\"0 3 * * *\") or every (\"15m\")".into());
            }
            (Some(expression), None) => {
                if self.offset.is_some() {
                    return Err("offset goes with every, not with cron".into());
                }
                let cron = croner::parser::CronParser::builder()
                    .seconds(croner::parser::Seconds::Optional)
                    .build()
                    .parse(expression)
                    .map_err(|e| format!("cron {expression:?} is not a cron expression: {e}"))?;
                let zone = match &self.time_zone {
                    None => jiff::tz::TimeZone::UTC,
                    Some(name) => jiff::tz::TimeZone::get(name).map_err(|_| {
                        format!(
                            "time_zone {name:?} is not an IANA time zone (such as \"Europe/Berlin\" or \"UTC\")"
                        )
                    })?,
                };
                Timing::Cron {
                    cron: Box::new(cron),
                    zone,
                }
            }
            (None, Some(every)) => {
                if self.time_zone.is_some() {
                    return Err("time_zone goes with cron; every counts from the Unix epoch".into());
                }
                if every < MIN_PERIOD || every > MAX_SPAN {
                    return Err("every must be from 1s to 366d".into());
                }
                if self.jitter.is_some_and(|jitter| jitter > every) {
                    return Err("jitter must not be longer than every".into());
                }
                let offset = self.offset.unwrap_or_default();
                if offset >= every {
                    return Err("offset must be shorter than every".into());
                }
                Timing::Every {
                    period_ms: millis(every),
                    offset_ms: millis(offset),
                }
            }
        };
        // A pattern that never matches (the 30th of February) is refused now rather than
        // found silent later.
        if timing.next_after(0).is_none() && timing.next_after(now_guess()).is_none() {
            return Err("the schedule never fires".into());
        }
        Ok(timing)
    }

    pub fn catchup_window_ms(&self) -> i64 {
        millis(self.catchup_window.unwrap_or(DEFAULT_CATCHUP))
    }

    /// The delay of the fire at `nominal_ms`: the same on every node and at every look.
    pub fn jitter_ms(&self, schedule: &str, nominal_ms: i64) -> i64 {
        let jitter = self.jitter.map(millis).unwrap_or(0);
        if jitter <= 0 {
            return 0;
        }
        let digest = Sha256::new()
            .chain_update(schedule.as_bytes())
            .chain_update(nominal_ms.to_be_bytes())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        (u64::from_be_bytes(first) % (jitter as u64 + 1)) as i64
    }
}

impl Timing {
    /// The first fire strictly after `after_ms`, or `None` when there is none (a pattern
    /// whose last year passed).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Timing::Every {
                period_ms,
                offset_ms,
            } => {
                let k = (after_ms - offset_ms).div_euclid(*period_ms) + 1;
                k.checked_mul(*period_ms)?.checked_add(*offset_ms)
            }
            Timing::Cron { cron, zone } => {
                let start = jiff::Timestamp::from_millisecond(after_ms)
                    .ok()?
                    .to_zoned(zone.clone());
                let next = cron.find_next_occurrence(&start, false).ok()?;
                Some(next.timestamp().as_millisecond())
            }
        }
    }

    /// Up to `n` fires after `after_ms`.
    pub fn upcoming(&self, after_ms: i64, n: usize) -> Vec<i64> {
        let mut fires = Vec::with_capacity(n);
        let mut at = after_ms;
        while fires.len() < n {
            match self.next_after(at) {
                Some(next) => {
                    fires.push(next);
                    at = next;
                }
                None => break,
            }
        }
        fires
    }
}

/// The workflow id of the fire at `nominal_ms`: `{schedule}-{UTC time}`, with milliseconds
/// only when the time has some (a trigger by hand).
pub fn fire_workflow_id(schedule: &str, nominal_ms: i64) -> String {
    format!("{schedule}-{}", rfc3339(nominal_ms))
}

/// A time as RFC 3339 in UTC (`2026-12-05T03:00:00Z`), milliseconds when it has some.
pub fn rfc3339(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(at) if ms % 1000 == 0 => format!("{at:.0}"),
        Ok(at) => format!("{at:.3}"),
        Err(_) => ms.to_string(),
    }
}

/// Parses an RFC 3339 time (`2026-12-05T03:00:00Z`, `2026-12-05T04:00:00+01:00`).
pub fn parse_time(what: &str, s: &str) -> Result<i64, String> {
    s.parse::<jiff::Timestamp>()
        .map(|at| at.as_millisecond())
        .map_err(|e| format!("{what} {s:?} is not an RFC 3339 time (2026-12-05T03:00:00Z): {e}"))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The system clock's now, only to tell a pattern that never fires again.
fn now_guess() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> ScheduleSpec {
        serde_json::from_value(json).expect("a spec")
    }

    fn at(s: &str) -> i64 {
        parse_time("t", s).expect("a time")
    }

    #[test]
    fn a_cron_expression_fires_in_its_time_zone_across_daylight_saving() {
        let timing = spec(serde_json::json!({
            "cron": "30 2 * * *", "time_zone": "Europe/Berlin",
            "start": {"workflow": "nightly"}
        }))
        .check()
        .expect("valid");
        // 2:30 in Berlin is 1:30 UTC in winter; on 2026-03-29 the clocks skip from 2:00
        // to 3:00, so that day's fire is once, when the clocks jump (3:00 CEST = 1:00 UTC).
        let fires: Vec<String> = timing
            .upcoming(at("2026-03-27T12:00:00Z"), 4)
            .into_iter()
            .map(rfc3339)
            .collect();
        assert_eq!(
            fires,
            [
                "2026-03-28T01:30:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-30T00:30:00Z",
                "2026-03-31T00:30:00Z"
            ]
        );
        // On 2026-10-25 the clocks go back from 3:00 to 2:00: 2:30 happens twice, and the
        // schedule fires once, at the first (0:30 UTC).
        let fires: Vec<String> = timing
            .upcoming(at("2026-10-24T12:00:00Z"), 3)
            .into_iter()
            .map(rfc3339)
            .collect();
        assert_eq!(
            fires,
            [
                "2026-10-25T00:30:00Z",
                "2026-10-26T01:30:00Z",
                "2026-10-27T01:30:00Z"
            ]
        );
    }

    #[test]
    fn an_interval_fires_at_multiples_since_the_epoch_plus_its_offset() {
        let timing = spec(serde_json::json!({
            "every": "15m", "offset": "5m", "start": {"workflow": "sync"}
        }))
        .check()
        .expect("valid");
        let fires: Vec<String> = timing
            .upcoming(at("2026-12-05T10:05:00Z"), 3)
            .into_iter()
            .map(rfc3339)
            .collect();
        assert_eq!(
            fires,
            [
                "2026-12-05T10:20:00Z",
                "2026-12-05T10:35:00Z",
                "2026-12-05T10:50:00Z"
            ]
        );
    }

    #[test]
    fn seconds_are_optional_in_a_cron_expression() {
        let timing =
            spec(serde_json::json!({"cron": "*/10 * * * * *", "start": {"workflow": "w"}}))
                .check()
                .expect("valid");
        assert_eq!(
            timing.next_after(at("2026-12-05T10:00:01Z")),
            Some(at("2026-12-05T10:00:10Z"))
        );
    }

    #[test]
    fn what_is_wrong_is_named() {
        let cases = [
            (serde_json::json!({"start": {"workflow": "w"}}), "say when"),
            (
                serde_json::json!({"cron": "* * *", "start": {"workflow": "w"}}),
                "not a cron expression",
            ),
            (
                serde_json::json!({"cron": "0 0 30 2 *", "start": {"workflow": "w"}}),
                "never fires",
            ),
            (
                serde_json::json!({"cron": "0 3 * * *", "time_zone": "Mars/Olympus", "start": {"workflow": "w"}}),
                "IANA",
            ),
            (
                serde_json::json!({"every": "10m", "offset": "10m", "start": {"workflow": "w"}}),
                "offset",
            ),
            (
                serde_json::json!({"every": "10ms", "start": {"workflow": "w"}}),
                "from 1s",
            ),
            (
                serde_json::json!({"every": "1m", "cron": "* * * * *", "start": {"workflow": "w"}}),
                "not both",
            ),
            (
                serde_json::json!({"every": "1m", "start": {"workflow": "no such/thing"}}),
                "workflow name",
            ),
            (
                serde_json::json!({"every": "300000000y", "start": {"workflow": "w"}}),
                "366d",
            ),
            (
                serde_json::json!({"every": "1m", "jitter": "2m", "start": {"workflow": "w"}}),
                "jitter",
            ),
            (
                serde_json::json!({"cron": "* * * * *", "jitter": "2d", "start": {"workflow": "w"}}),
                "jitter",
            ),
            (
                serde_json::json!({"every": "1m", "catchup_window": "400d", "start": {"workflow": "w"}}),
                "catchup_window",
            ),
        ];
        for (json, expected) in cases {
            let error = spec(json.clone()).check().expect_err("refused");
            assert!(error.contains(expected), "{json}: {error}");
        }
    }

    #[test]
    fn jitter_is_the_same_for_a_fire_and_within_its_bound() {
        let s =
            spec(serde_json::json!({"every": "1m", "jitter": "30s", "start": {"workflow": "w"}}));
        let delays: Vec<i64> = (0..50)
            .map(|i| s.jitter_ms("nightly", i * 60_000))
            .collect();
        assert!(delays.iter().all(|d| (0..=30_000).contains(d)));
        assert!(delays.iter().any(|d| *d != delays[0]), "{delays:?}");
        assert_eq!(s.jitter_ms("nightly", 60_000), delays[1]);
    }

    #[test]
    fn fire_ids_name_the_schedule_and_the_time() {
        assert_eq!(
            fire_workflow_id("nightly", at("2026-12-05T03:00:00Z")),
            "nightly-2026-12-05T03:00:00Z"
        );
        assert_eq!(
            fire_workflow_id("nightly", at("2026-12-05T03:00:00.250Z")),
            "nightly-2026-12-05T03:00:00.250Z"
        );
    }
}
