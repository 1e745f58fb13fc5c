//! A streamed attempt (protocol 6): the invocation's own exchange carries the
//! handler's appends, as lines of its answer, and Durin's acknowledgements, as lines of
//! its request, in the same order. An append waits for the acknowledgement of its line.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use durin_protocol::{AppendRequest, GatewayFrame, HandlerFrame, Lines, Outcome};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

/// The lines an attempt sends, and the appends that wait for Durin's answer.
pub(crate) struct AttemptStream {
    state: Mutex<Sending>,
}

struct Sending {
    /// The answer's body; `None` once the outcome went.
    out: Option<mpsc::UnboundedSender<Bytes>>,
    /// One per append sent and not yet answered, oldest first.
    waiting: VecDeque<oneshot::Sender<GatewayFrame>>,
}

/// The stream ended (Durin went away, or the attempt's outcome was sent) before the answer:
/// the append may or may not be recorded.
#[derive(Debug)]
pub(crate) struct Gone;

impl AttemptStream {
    /// A stream whose lines go to the answer's body, returned with it.
    pub(crate) fn new() -> (AttemptStream, Body) {
        let (out, lines) = mpsc::unbounded_channel::<Bytes>();
        let lines = futures_util::stream::unfold(lines, |mut lines| async move {
            let line = lines.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(line), lines))
        });
        let stream = AttemptStream {
            state: Mutex::new(Sending {
                out: Some(out),
                waiting: VecDeque::new(),
            }),
        };
        (stream, Body::from_stream(lines))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sending> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request` and waits for Durin's answer to it.
    pub(crate) async fn append(&self, request: &AppendRequest) -> Result<GatewayFrame, Gone> {
        let line = line(&HandlerFrame::Append(request.clone()));
        let (answer, answered) = oneshot::channel();
        {
            // Sent and queued under one lock: answers come in the order lines went.
            let mut lines = self.lock();
            let out = lines.out.as_ref().ok_or(Gone)?;
            out.send(line).map_err(|_| Gone)?;
            lines.waiting.push_back(answer);
        }
        answered.await.map_err(|_| Gone)
    }

    /// Sends the outcome and ends the answer; appends still waiting learn that it is over.
    pub(crate) fn finish(&self, outcome: &Outcome) {
        let mut lines = self.lock();
        if let Some(out) = lines.out.take() {
            let _ = out.send(line(&HandlerFrame::Outcome(outcome.clone())));
        }
        lines.waiting.clear();
    }

    /// Hands Durin's lines (after the first) to the appends that wait for them, until the
    /// request ends; then every append still waiting learns that the stream is gone.
    pub(crate) async fn read_answers(
        &self,
        mut body: axum::body::BodyDataStream,
        mut lines: Lines,
    ) {
        loop {
            while let Some(line) = lines.next_line() {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let Ok(frame) = serde_json::from_slice::<GatewayFrame>(line) else {
                    tracing::warn!(
                        "Durin sent a line that is not a frame; the attempt's stream is dropped"
                    );
                    self.close();
                    return;
                };
                let waiter = self.lock().waiting.pop_front();
                if let Some(waiter) = waiter {
                    let _ = waiter.send(frame);
                }
            }
            match body.next().await {
                Some(Ok(chunk)) => lines.push(&chunk),
                Some(Err(_)) | None => break,
            }
        }
        self.close();
    }

    /// Nothing more goes on the stream: the appends waiting, and any later one, are `Gone`.
    fn close(&self) {
        let mut lines = self.lock();
        lines.out = None;
        lines.waiting.clear();
    }
}

fn line<T: serde::Serialize>(frame: &T) -> Bytes {
    let mut line = serde_json::to_vec(frame).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Reads the first line of a streamed request (the invocation request), at most `limit`
/// bytes: the line and the lines that came after it. `Err` says why it could not be read,
/// with the status to answer.
pub(crate) async fn first_line(
    body: &mut axum::body::BodyDataStream,
    limit: usize,
) -> Result<(Bytes, Lines), (StatusCode, String)> {
    let mut lines = Lines::default();
    loop {
        let first = lines.next_line();
        if first.as_ref().map_or(lines.pending(), Vec::len) > limit {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the invocation request is larger than {limit} bytes"),
            ));
        }
        if let Some(first) = first {
            return Ok((Bytes::from(first), lines));
        }
        match body.next().await {
            Some(Ok(chunk)) => lines.push(&chunk),
            Some(Err(e)) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("the invocation request could not be read: {e}"),
                ))
            }
            None => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "the stream ended before its first line".into(),
                ))
            }
        }
    }
}
