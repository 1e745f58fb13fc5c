//! A deployment proves itself before it takes traffic: the recent journals of each handler
//! it would serve are replayed against it, runs that have not ended first, and a
//! divergence refuses it.

use super::history::History;
use super::run::Candidate;
use crate::store::{InvocationFilter, InvocationRecord, Status, Store, StoreResult};

/// How many invocations of each handler a verification replays unless told otherwise.
pub const DEFAULT_SAMPLE: u32 = 20;

/// How many of the newest invocations of a handler are looked at to choose the sample.
const LOOKED_AT: u32 = 500;

/// The histories a verification of `candidate` replays: for each handler it serves, up to
/// `per_handler` of its newest invocations that recorded something, those still going on
/// (running, waiting, paused) first, then those that ended by the handler's own answer
/// (completed, failed, cancelled, continued as new). Terminated runs are left out: their
/// end was Durin's, not the code's.
pub async fn sample(
    store: &dyn Store,
    candidate: &Candidate,
    per_handler: u32,
) -> StoreResult<Vec<History>> {
    let mut histories = Vec::new();
    for service in &candidate.services {
        for handler in &service.handlers {
            let filter = InvocationFilter {
                service: Some(service.name.clone()),
                handler: Some(handler.name.clone()),
                ..InvocationFilter::default()
            };
            let mut listed: Vec<InvocationRecord> = store
                .list_invocations(filter, LOOKED_AT)
                .await?
                .into_iter()
                .filter(|r| r.journal_len > 1 && r.status != Status::Terminated)
                .collect();
            // Newest first within each group; the sort is stable.
            listed.sort_by_key(|r| r.status.is_final());
            for record in listed.into_iter().take(per_handler as usize) {
                let entries = store.read_journal(&record.id).await?;
                histories.push(History::of(&record, entries));
            }
        }
    }
    Ok(histories)
}
