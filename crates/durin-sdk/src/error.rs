//! The error a handler or a step returns.

use std::fmt;
use std::time::Duration;

use durin_protocol::Failure;

/// The error type of a cancellation.
const CANCELLED: &str = "Cancelled";

/// Why a handler or a step failed, and whether trying again may help.
///
/// Any `std::error::Error` converts into a retryable `HandlerError` with `?`; use
/// [`HandlerError::terminal`] for failures that no retry can fix (a declined card, bad input).
#[derive(Debug, Clone)]
pub struct HandlerError {
    pub(crate) kind: Kind,
    pub(crate) message: String,
    pub(crate) error_type: Option<String>,
    pub(crate) status: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Terminal,
    Retryable {
        retry_after: Option<Duration>,
    },
    /// The attempt must end now (the context knows why: a step is backing off, the journal
    /// disagrees with the code, or the attempt was superseded). Propagate it with `?`.
    Abort,
}

impl HandlerError {
    /// A failure that is not retried; it goes back to the caller with status 500.
    pub fn terminal(message: impl Into<String>) -> HandlerError {
        HandlerError::terminal_with_status(500, message)
    }

    /// A failure that is not retried, answered to the caller with `status` (400 to 599).
    pub fn terminal_with_status(status: u16, message: impl Into<String>) -> HandlerError {
        HandlerError {
            kind: Kind::Terminal,
            message: message.into(),
            error_type: None,
            status: if (400..600).contains(&status) {
                status
            } else {
                500
            },
        }
    }

    /// A failure that is retried according to the retry policy.
    pub fn retryable(message: impl Into<String>) -> HandlerError {
        HandlerError {
            kind: Kind::Retryable { retry_after: None },
            message: message.into(),
            error_type: None,
            status: 500,
        }
    }

    /// Names the error's type, which a retry policy's `non_retryable_error_types` can list.
    pub fn with_type(mut self, error_type: impl Into<String>) -> HandlerError {
        self.error_type = Some(error_type.into());
        self
    }

    /// Asks for the next attempt no sooner than `delay` (retryable errors only).
    pub fn retry_after(mut self, delay: Duration) -> HandlerError {
        if let Kind::Retryable { retry_after } = &mut self.kind {
            *retry_after = Some(delay);
        }
        self
    }

    /// The error an await receives once when the invocation was cancelled: terminal, status
    /// 409, type `Cancelled`. Propagate it (after compensations) to end the invocation as
    /// cancelled.
    pub fn cancelled() -> HandlerError {
        HandlerError::terminal_with_status(409, "the invocation was cancelled").with_type(CANCELLED)
    }

    /// Whether this is the error of a cancellation ([`HandlerError::cancelled`]).
    pub fn is_cancelled(&self) -> bool {
        self.is_terminal() && self.error_type() == Some(CANCELLED)
    }

    pub fn is_terminal(&self) -> bool {
        self.kind == Kind::Terminal
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn error_type(&self) -> Option<&str> {
        self.error_type.as_deref()
    }

    pub(crate) fn abort(message: impl Into<String>) -> HandlerError {
        HandlerError {
            kind: Kind::Abort,
            message: message.into(),
            error_type: None,
            status: 500,
        }
    }

    pub(crate) fn from_failure(failure: Failure) -> HandlerError {
        HandlerError {
            kind: Kind::Terminal,
            message: failure.message,
            error_type: failure.error_type,
            status: failure.status,
        }
    }

    pub(crate) fn to_failure(&self) -> Failure {
        Failure {
            status: self.status,
            error_type: self.error_type.clone(),
            message: self.message.clone(),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error_type {
            Some(t) => write!(f, "{t}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> HandlerError {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(e) = source {
            message.push_str(": ");
            message.push_str(&e.to_string());
            source = e.source();
        }
        HandlerError::retryable(message)
    }
}
