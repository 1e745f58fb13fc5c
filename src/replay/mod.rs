//! Histories and their replay. A history is an invocation's journal as a file
//! (`history.rs`); a replay runs the handler of a deployment against it with no side effect
//! (`run.rs`): an SDK handler is told it replays and answers from the journal alone; a plain
//! handler calls the context API and the egress as always, and the session it belongs to
//! (`session.rs`) answers from the recording and stops it where the recording ends or the
//! code asks for something else. Only the answer of the replay is kept: nothing is written
//! to the store, and nothing is sent downstream.

pub mod history;
pub mod run;
pub mod session;
pub mod verify;

pub use history::History;
pub use run::{replay_all, Candidate, Report, Verdict};
pub use session::{Replays, Session};
