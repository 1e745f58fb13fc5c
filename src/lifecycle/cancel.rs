//! Cancel: a cancelled invocation ends as `cancelled` when its handler gives up with the
//! `Cancelled` error its next await received (after whatever compensations it ran), or, for
//! a plain handler, with any terminal answer. A handler that catches the error and returns
//! an output completes as usual.

use durin_protocol::Failure;

use crate::store::AttemptEnd;

/// The error type an SDK gives the await that receives a cancellation.
pub const CANCELLED: &str = "Cancelled";

pub(super) fn is_cancelled(failure: &Failure) -> bool {
    failure.error_type.as_deref() == Some(CANCELLED)
}

pub(super) fn ended(failure: Failure) -> AttemptEnd {
    AttemptEnd::Cancelled {
        failure: Failure {
            status: 409,
            error_type: Some(CANCELLED.into()),
            ..failure
        },
    }
}
