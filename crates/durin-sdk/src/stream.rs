//! A streamed attempt (protocol 6): the invocation's own exchange carries the
//! handler's appends, as lines of its answer, and Durin's acknowledgements, as lines of
//! its request, in the same order. An append waits for the acknowledgement of its line.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use durin_protocol::{AppendRequest, GatewayFrame, HandlerFrame, Outcome};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

/// The lines an attempt sends, and the appends that wait for Durin's answer.
pub(crate) struct AttemptStream {
    state: Mutex<Lines>,
}

struct Lines {
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
            state: Mutex::new(Lines {
                out: Some(out),
                waiting: VecDeque::new(),
            }),
        };
        (stream, Body::from_stream(lines))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
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
        mut rest: Vec<u8>,
    ) {
        // How much of `rest` holds no newline.
        let mut searched = 0;
        loop {
            while let Some(end) = rest[searched..].iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = rest.drain(..=searched + end).collect();
                searched = 0;
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
            searched = rest.len();
            match body.next().await {
                Some(Ok(chunk)) => rest.extend_from_slice(&chunk),
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
/// bytes: the line and what came after it. `Err` says why it could not be read, with the
/// status to answer.
pub(crate) async fn first_line(
    body: &mut axum::body::BodyDataStream,
    limit: usize,
) -> Result<(Bytes, Vec<u8>), (StatusCode, String)> {
    let mut read: Vec<u8> = Vec::new();
    // How much of `read` holds no newline: a journal of many chunks is searched once.
    let mut searched = 0;
    loop {
        let end = read[searched..]
            .iter()
            .position(|b| *b == b'\n')
            .map(|end| searched + end);
        searched = read.len();
        if read.len().min(end.unwrap_or(usize::MAX)) > limit {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the invocation request is larger than {limit} bytes"),
            ));
        }
        if let Some(end) = end {
            let rest = read.split_off(end + 1);
            read.truncate(end);
            return Ok((Bytes::from(read), rest));
        }
        match body.next().await {
            Some(Ok(chunk)) => read.extend_from_slice(&chunk),
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
