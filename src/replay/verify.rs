//! A deployment proves itself before it takes traffic: the recent journals of each handler
//! it would serve are replayed against it, runs that have not ended first, and a
//! divergence refuses it.

use super::history::{handler_end, History};
use super::run::Candidate;
use crate::store::{InvocationFilter, InvocationRecord, Store, StoreResult};

/// How many invocations of each handler a verification replays unless told otherwise.
pub const DEFAULT_SAMPLE: u32 = 20;

/// How many of the newest invocations of a handler are looked at to choose the sample.
const LOOKED_AT: u32 = 500;

/// The histories a verification of `candidate` replays: for each handler it serves, up to
/// `per_handler` of its newest invocations that recorded something, those still going on
/// (running, waiting, paused) first, then those that ended by the handler's own answer
/// (see [`handler_end`]). Runs Durin ended (terminated, timed out, retries used up) are
/// left out: the code did not choose that end.
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
                .filter(|r| {
                    r.journal_len > 1
                        && (!r.status.is_final()
                            || handler_end(r.status.as_str(), r.failure.as_ref()))
                })
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
