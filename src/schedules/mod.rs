//! Schedules: workflow runs started by a cron expression (in a time zone) or a fixed
//! interval, set through the admin API, the CLI or the config.
//!
//! `spec.rs` checks what a schedule says and computes its fire times; `fires.rs` decides,
//! with no store, what the fires due at a look do (start, skip, wait, missed); `rule.rs`
//! carries that out over the tables in one transaction, which starts each fire's run
//! under the workflow id `{schedule}-{fire time}`: a fire starts one run, also when
//! several nodes look at once. [`Schedules::run`] is the loop that looks at the due ones.

pub mod fires;
pub mod rule;
pub mod spec;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::engine::Engine;
use crate::lifecycle::timeouts::TimeoutDefaults;
use crate::registry::Targets;
use crate::store::{HandlerTarget, ScheduleRow, Store, StoreError};

use fires::FireRecord;
use rule::{Applied, Limits, Op, SetOutcome};
pub use spec::{Overlap, ScheduleSpec};

/// The workflow handler a fire starts.
const RUN_HANDLER: &str = "run";
/// The most schedules one pass of the loop looks at.
const BATCH: u32 = 64;
/// The longest the loop sleeps without looking at the store (a schedule set on another
/// node, a clock moved by hand).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Fire times a view shows.
const UPCOMING: usize = 5;

/// Who set a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The admin API or the CLI.
    Api,
    /// The config file: changed and removed only there.
    Config,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Config => "config",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule {0:?} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("schedule {0:?} is set by the config file: change or remove it there (pause, unpause, trigger and backfill work)")]
    Managed(String),
    #[error("no deployment serves workflow {0}; register one with POST /v1/deployments")]
    NoDeployment(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A schedule as the API shows it.
#[derive(Debug, Serialize)]
pub struct ScheduleView {
    pub id: String,
    pub source: &'static str,
    pub spec: ScheduleSpec,
    pub paused: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The next fire times (RFC 3339, before jitter); none while paused.
    pub next_fires: Vec<String>,
    /// The workflow ids of runs it started that have not ended (as of its last look).
    pub running: Vec<String>,
    /// A fire waiting for a run to end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffered: Option<String>,
    pub counts: fires::Counts,
    /// The recent fires, newest first.
    pub recent: Vec<FireView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// One fire as the API shows it.
#[derive(Debug, Serialize)]
pub struct FireView {
    pub fire_time: String,
    pub at: String,
    pub outcome: fires::Outcome,
    pub by: fires::By,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl From<&FireRecord> for FireView {
    fn from(record: &FireRecord) -> FireView {
        FireView {
            fire_time: spec::rfc3339(record.nominal_ms),
            at: spec::rfc3339(record.at_ms),
            outcome: record.outcome,
            by: record.by,
            workflow_id: record.workflow_id.clone(),
            detail: record.detail.clone(),
        }
    }
}

fn view(row: &ScheduleRow, now_ms: i64) -> Result<ScheduleView, ScheduleError> {
    let (spec, timing, state) = rule::read(row)?;
    let after = state.through_ms.max(now_ms);
    Ok(ScheduleView {
        id: row.id.clone(),
        source: if row.source == "config" {
            Source::Config.as_str()
        } else {
            Source::Api.as_str()
        },
        next_fires: if state.paused {
            Vec::new()
        } else {
            timing
                .upcoming(after, UPCOMING)
                .into_iter()
                .map(spec::rfc3339)
                .collect()
        },
        spec,
        paused: state.paused,
        note: state.note,
        running: state.running,
        buffered: state.buffered_ms.map(spec::rfc3339),
        counts: state.counts,
        recent: state.recent.iter().rev().map(FireView::from).collect(),
        last_error: state.last_error,
        created_at: spec::rfc3339(state.created_ms),
        updated_at: spec::rfc3339(state.updated_ms),
    })
}

/// The schedules of this node: the operations the API offers, and the loop.
pub struct Schedules {
    store: Arc<dyn Store>,
    engine: Arc<Engine>,
    targets: Arc<Targets>,
    clock: Arc<dyn Clock>,
    timeouts: TimeoutDefaults,
    /// Wakes the loop when a schedule was set here.
    changed: Notify,
}

impl Schedules {
    pub fn new(
        store: Arc<dyn Store>,
        engine: Arc<Engine>,
        targets: Arc<Targets>,
        clock: Arc<dyn Clock>,
        timeouts: TimeoutDefaults,
    ) -> Schedules {
        Schedules {
            store,
            engine,
            targets,
            clock,
            timeouts,
            changed: Notify::new(),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            timeouts: self.timeouts,
            max_bytes: self.store.journal_limits().max_bytes,
        }
    }

    fn key(id: &str) -> String {
        format!("schedule/{id}")
    }

    pub async fn list(&self) -> Result<Vec<ScheduleView>, ScheduleError> {
        let now_ms = self.clock.now_ms();
        let rows = self.store.list_schedules().await?;
        rows.iter().map(|row| view(row, now_ms)).collect()
    }

    pub async fn get(&self, id: &str) -> Result<ScheduleView, ScheduleError> {
        match self.store.get_schedule(id).await? {
            Some(row) => view(&row, self.clock.now_ms()),
            None => Err(ScheduleError::NotFound(id.to_owned())),
        }
    }

    /// Creates or replaces schedule `id`: the view, and whether it is new.
    pub async fn set(
        &self,
        id: &str,
        spec: ScheduleSpec,
        source: Source,
    ) -> Result<(ScheduleView, bool), ScheduleError> {
        crate::ids::parse_name("schedule", id).map_err(ScheduleError::Invalid)?;
        spec.check().map_err(ScheduleError::Invalid)?;
        let now_ms = self.clock.now_ms();
        let rule_id = id.to_owned();
        let outcome = self
            .store
            .write(&Self::key(id), move |tx| {
                Box::pin(
                    async move { rule::set(tx, &rule_id, spec, source.as_str(), now_ms).await },
                )
            })
            .await?;
        match outcome {
            SetOutcome::Set { row, created } => {
                self.changed.notify_one();
                Ok((view(&row, now_ms)?, created))
            }
            SetOutcome::Managed => Err(ScheduleError::Managed(id.to_owned())),
        }
    }

    /// Deletes schedule `id`; the runs it started go on.
    pub async fn delete(&self, id: &str, source: Source) -> Result<(), ScheduleError> {
        let rule_id = id.to_owned();
        let outcome = self
            .store
            .write(&Self::key(id), move |tx| {
                Box::pin(async move { rule::delete(tx, &rule_id, source.as_str()).await })
            })
            .await?;
        match outcome {
            None => Err(ScheduleError::NotFound(id.to_owned())),
            Some(SetOutcome::Managed) => Err(ScheduleError::Managed(id.to_owned())),
            Some(SetOutcome::Set { .. }) => Ok(()),
        }
    }

    /// Pauses or unpauses schedule `id`; fires that fall while it is paused are not made
    /// up.
    pub async fn pause(
        &self,
        id: &str,
        paused: bool,
        note: Option<String>,
    ) -> Result<ScheduleView, ScheduleError> {
        if note.as_ref().is_some_and(|note| note.len() > 1024) {
            return Err(ScheduleError::Invalid(
                "the note is longer than 1024 bytes".into(),
            ));
        }
        let now_ms = self.clock.now_ms();
        let rule_id = id.to_owned();
        let row = self
            .store
            .write(&Self::key(id), move |tx| {
                Box::pin(async move { rule::pause(tx, &rule_id, paused, note, now_ms).await })
            })
            .await?
            .ok_or_else(|| ScheduleError::NotFound(id.to_owned()))?;
        self.changed.notify_one();
        view(&row, now_ms)
    }

    /// One fire now (`Trigger`) or every fire of a past range (`Backfill`), under the
    /// given overlap policy: what became of each fire, and the schedule.
    pub async fn fire(
        &self,
        id: &str,
        op: Op,
    ) -> Result<(Vec<FireView>, ScheduleView), ScheduleError> {
        let row = self
            .store
            .get_schedule(id)
            .await?
            .ok_or_else(|| ScheduleError::NotFound(id.to_owned()))?;
        let (spec, _, _) = rule::read(&row)?;
        let target = self
            .target(&spec.start.workflow)
            .await?
            .ok_or_else(|| ScheduleError::NoDeployment(spec.start.workflow.clone()))?;
        let applied = self.apply(id, op, Some(target)).await?;
        let applied = applied.ok_or_else(|| ScheduleError::NotFound(id.to_owned()))?;
        let fires = applied.fires.iter().map(FireView::from).collect();
        Ok((fires, view(&applied.row, self.clock.now_ms())?))
    }

    async fn target(&self, workflow: &str) -> Result<Option<HandlerTarget>, StoreError> {
        self.targets
            .latest(&*self.store, workflow, RUN_HANDLER)
            .await
    }

    async fn apply(
        &self,
        id: &str,
        op: Op,
        target: Option<HandlerTarget>,
    ) -> Result<Option<Applied>, StoreError> {
        let now_ms = self.clock.now_ms();
        let limits = self.limits();
        let rule_id = id.to_owned();
        let applied = self
            .store
            .write(&Self::key(id), move |tx| {
                Box::pin(async move {
                    rule::look(tx, &rule_id, op, now_ms, target.as_ref(), limits).await
                })
            })
            .await?;
        if let Some(applied) = &applied {
            if applied.woke {
                self.engine.nudge();
            }
            for fire in &applied.fires {
                tracing::info!(
                    schedule = %id,
                    fire_time = %spec::rfc3339(fire.nominal_ms),
                    outcome = ?fire.outcome,
                    workflow_id = fire.workflow_id.as_deref().unwrap_or(""),
                    "schedule fired"
                );
            }
        }
        Ok(applied)
    }

    /// A look at a due schedule, from the loop.
    async fn look(&self, id: &str) -> Result<(), ScheduleError> {
        let Some(row) = self.store.get_schedule(id).await? else {
            return Ok(());
        };
        let (spec, _, _) = rule::read(&row)?;
        let target = self.target(&spec.start.workflow).await?;
        self.apply(id, Op::Due, target).await?;
        Ok(())
    }

    /// Makes the store's config-managed schedules what `configured` says: each is set
    /// (taking over an API schedule of the same id), and those no longer in it deleted.
    pub async fn sync_config(
        &self,
        configured: &BTreeMap<String, ScheduleSpec>,
    ) -> Result<(), ScheduleError> {
        for (id, spec) in configured {
            self.set(id, spec.clone(), Source::Config)
                .await
                .map_err(|e| ScheduleError::Invalid(format!("schedule {id}: {e}")))?;
        }
        for row in self.store.list_schedules().await? {
            if row.source == "config" && !configured.contains_key(&row.id) {
                self.delete(&row.id, Source::Config).await?;
                tracing::info!(schedule = %row.id, "schedule removed from the config: deleted");
            }
        }
        Ok(())
    }

    /// Looks at due schedules until `shutdown`: sleeps until the next is due (at most
    /// [`IDLE_POLL`]) or a schedule is set.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let now_ms = self.clock.now_ms();
            let due = match self.store.due_schedules(now_ms, BATCH).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::error!(%error, "could not read the due schedules");
                    Vec::new()
                }
            };
            let mut failed = false;
            for id in &due {
                if let Err(error) = self.look(id).await {
                    tracing::error!(schedule = %id, %error, "could not look at a due schedule");
                    failed = true;
                }
            }
            // A schedule that cannot be looked at stays due: not again at once.
            let wait = if failed {
                IDLE_POLL
            } else if due.len() == BATCH as usize {
                Duration::ZERO
            } else {
                match self.store.next_schedule_due().await {
                    Ok(Some(next)) => {
                        let ms = next.saturating_sub(self.clock.now_ms()).max(0) as u64;
                        Duration::from_millis(ms).min(IDLE_POLL)
                    }
                    Ok(None) => IDLE_POLL,
                    Err(error) => {
                        tracing::error!(%error, "could not read when a schedule is due");
                        IDLE_POLL
                    }
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.changed.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}
