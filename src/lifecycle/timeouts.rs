//! The timeouts of a handler beyond `start_to_close`: `schedule_to_close` (the whole
//! invocation from its creation, a workflow run's execution timeout), `schedule_to_start`
//! (how late an attempt may start after it was due) and `heartbeat_timeout` (how long an
//! attempt may go without a heartbeat). Each comes from the handler's declaration, else
//! from the gateway's configuration; each failure names the timeout that fired.

use std::time::Duration;

use durin_protocol::{Failure, HandlerSpec};

use super::after;
use crate::store::AttemptEnd;

/// The gateway's defaults, for handlers that declare none.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeoutDefaults {
    pub schedule_to_close: Option<Duration>,
    pub schedule_to_start: Option<Duration>,
    pub heartbeat: Option<Duration>,
}

impl TimeoutDefaults {
    /// When an invocation of `spec` created at `now_ms` fails if it has not ended.
    pub fn deadline(&self, spec: &HandlerSpec, now_ms: i64) -> Option<i64> {
        spec.schedule_to_close
            .or(self.schedule_to_close)
            .map(|d| after(now_ms, d))
    }

    pub fn schedule_to_start(&self, spec: &HandlerSpec) -> Option<Duration> {
        spec.schedule_to_start.or(self.schedule_to_start)
    }

    pub fn heartbeat(&self, spec: &HandlerSpec) -> Option<Duration> {
        spec.heartbeat_timeout.or(self.heartbeat)
    }
}

/// The failure of an invocation whose `schedule_to_close` passed.
pub fn schedule_to_close_failure(created_at_ms: i64, deadline_ms: i64) -> Failure {
    Failure {
        status: 504,
        error_type: Some("ScheduleToCloseTimeout".into()),
        message: format!(
            "schedule_to_close timeout: the invocation had not ended {} after its creation",
            humantime::format_duration(Duration::from_millis(
                deadline_ms.saturating_sub(created_at_ms).max(0) as u64
            ))
        ),
    }
}

/// An attempt that started `late_ms` after it was due, past `limit`: the invocation fails
/// (what it was for is too late now).
pub fn started_too_late(late_ms: i64, limit: Duration) -> Option<AttemptEnd> {
    let late = Duration::from_millis(late_ms.max(0) as u64);
    (late > limit).then(|| AttemptEnd::Failed {
        failure: Failure {
            status: 504,
            error_type: Some("ScheduleToStartTimeout".into()),
            message: format!(
                "schedule_to_start timeout: the attempt started {} after it was due (at most {})",
                humantime::format_duration(Duration::from_millis(late.as_millis() as u64)),
                humantime::format_duration(limit)
            ),
        },
        body: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_timeouts_win_over_defaults_and_each_failure_names_its_timeout() {
        let defaults = TimeoutDefaults {
            schedule_to_close: Some(Duration::from_secs(60)),
            schedule_to_start: None,
            heartbeat: Some(Duration::from_secs(5)),
        };
        let mut spec = HandlerSpec {
            name: "run".into(),
            path: None,
            retry_policy: None,
            start_to_close: None,
            schedule_to_close: None,
            schedule_to_start: Some(Duration::from_secs(1)),
            heartbeat_timeout: None,
            key: None,
        };
        assert_eq!(defaults.deadline(&spec, 1_000), Some(61_000));
        spec.schedule_to_close = Some(Duration::from_secs(2));
        assert_eq!(defaults.deadline(&spec, 1_000), Some(3_000));
        assert_eq!(defaults.heartbeat(&spec), Some(Duration::from_secs(5)));
        assert_eq!(
            defaults.schedule_to_start(&spec),
            Some(Duration::from_secs(1))
        );
        assert!(started_too_late(900, Duration::from_secs(1)).is_none());
        match started_too_late(1_500, Duration::from_secs(1)) {
            Some(AttemptEnd::Failed { failure, .. }) => {
                assert_eq!(
                    failure.error_type.as_deref(),
                    Some("ScheduleToStartTimeout")
                )
            }
            other => panic!("{other:?}"),
        }
        let failure = schedule_to_close_failure(1_000, 3_000);
        assert!(failure.message.contains("2s"), "{failure:?}");
    }
}
