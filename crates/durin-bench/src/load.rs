//! The load generator: a fixed number of requests sent by a fixed number of concurrent
//! callers, each waiting for its answer before sending the next (a closed loop, like oha
//! `-n N -c C`, which is what the Restate anchor figures were measured with). With several
//! Durin nodes, the callers are spread round-robin over them: caller i always calls node
//! i mod N.
//!
//! Past saturation Durin's admission control may refuse a call with 503 and a
//! `Retry-After` header: such an answer is expected, so its latency is counted like any
//! answer's, but it is not a success; the answers other than 200 are counted per status.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The request body of the order3 workload; the same body is sent every time, as in
/// `shared/bench/restate/bench.sh`.
pub const ORDER_BODY: &str = r#"{"order_id":"bench-1","customer_id":"cust-1","amount_cents":4999}"#;

/// The result the order handler returns for `ORDER_BODY`.
pub const EXPECTED_RESULT: &str =
    "order bench-1 complete charge charge_bench-1 reservation reservation_bench-1";

/// How the result of an order3 call is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Exactly [`EXPECTED_RESULT`]: the Rust SDK example and the plain handler derive their
    /// ids from the order.
    Exact,
    /// The shape of [`EXPECTED_RESULT`], `order bench-1 complete charge {id} reservation {id}`,
    /// with ids of the handler's own making (the TypeScript example draws them at random).
    Shape,
}

impl Expected {
    /// Whether `result`, the JSON string a call answered, is the expected one.
    pub fn matches(self, result: &str) -> bool {
        match self {
            Expected::Exact => result == EXPECTED_RESULT,
            Expected::Shape => result
                .strip_prefix("order bench-1 complete charge ")
                .and_then(|rest| rest.split_once(" reservation "))
                .is_some_and(|(charge, reservation)| {
                    let id = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
                    id(charge) && id(reservation)
                }),
        }
    }

    /// What is expected, for the error of a call whose body did not match.
    fn describe(self) -> String {
        match self {
            Expected::Exact => format!("{EXPECTED_RESULT:?}"),
            Expected::Shape => "\"order bench-1 complete charge {id} reservation {id}\"".to_owned(),
        }
    }
}

/// The status with which admission control refuses a call it has no room for.
pub const REFUSED: u16 = 503;

/// What one run of `requests` requests at one concurrency produced.
#[derive(Default)]
pub struct LevelResult {
    /// Latencies of all requests that got an answer, successful or not, sorted ascending.
    pub latencies: Vec<Duration>,
    /// 200 answers with the expected body.
    pub ok: usize,
    /// 200 answers whose body was not the expected result.
    pub bad_body: usize,
    /// The answers with a status other than 200, counted per status.
    pub by_status: BTreeMap<u16, usize>,
    /// The 503 answers that carried a `Retry-After` header.
    pub refused_with_retry_after: usize,
    /// Connection failures, timeouts, and bodies that could not be read.
    pub transport: usize,
    /// From just before the first request to just after the last answer.
    pub wall: Duration,
    /// The first failure seen, to show what went wrong without flooding the output.
    pub first_error: Option<String>,
}

impl LevelResult {
    /// Every request that did not succeed: bad bodies, other statuses than 200 (503
    /// refusals included) and transport errors.
    pub fn errors(&self) -> usize {
        self.bad_body + self.bad_status() + self.transport
    }

    /// The answers with a status other than 200, whatever the status.
    pub fn bad_status(&self) -> usize {
        self.by_status.values().sum()
    }

    /// The answers refused with 503, with or without `Retry-After`.
    pub fn refused_503(&self) -> usize {
        self.by_status.get(&REFUSED).copied().unwrap_or(0)
    }

    /// Counts one answer with `status` (not 200); `retry_after` says whether it carried a
    /// `Retry-After` header, which is noted for 503 only.
    pub fn count_status(&mut self, status: u16, retry_after: bool) {
        *self.by_status.entry(status).or_insert(0) += 1;
        if status == REFUSED && retry_after {
            self.refused_with_retry_after += 1;
        }
    }

    /// Latency at quantile `q` (0..=1) by the nearest-rank method.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let rank = (q * self.latencies.len() as f64).ceil() as usize;
        Some(self.latencies[rank.clamp(1, self.latencies.len()) - 1])
    }

    /// The mean latency of the answers; `None` without any.
    pub fn mean(&self) -> Option<Duration> {
        let n = u32::try_from(self.latencies.len())
            .ok()
            .filter(|&n| n > 0)?;
        Some(self.latencies.iter().sum::<Duration>() / n)
    }
}

/// The outcome of one request, as the callers count it.
enum Outcome {
    Ok,
    BadBody(String),
    /// An answer with a status other than 200.
    BadStatus {
        status: u16,
        /// Whether the answer carried a `Retry-After` header.
        retry_after: bool,
        error: String,
    },
    /// No answer: the connection failed (refused, reset, out of file descriptors), timed
    /// out, or the body could not be read.
    Transport(String),
}

/// The HTTP client shared by all callers of a run. One client with a large enough idle pool
/// keeps one keep-alive connection per caller, so connection setup is not measured after
/// the first request of each caller. The client sets no limit on the connections it opens
/// (only on those it keeps idle), so `max_concurrency` callers, 5,000 too, get a
/// connection each, as far as the open-file limit allows (checked before a run, see
/// `main.rs`); a connection that cannot be opened fails its request as a transport error.
pub fn client(max_concurrency: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(max_concurrency.max(1))
        .tcp_nodelay(true)
        // Long enough for any queueing at c=256 on a loaded machine; a hung gateway still
        // ends the run instead of stalling it forever.
        .timeout(Duration::from_secs(120))
        .build()
        .context("cannot build the HTTP client")
}

/// Sends one order3 request and classifies the answer.
async fn call(client: &reqwest::Client, url: &str, expected: Expected) -> Outcome {
    let response = match client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(ORDER_BODY)
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => return Outcome::Transport(format!("{e:#}")),
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .contains_key(reqwest::header::RETRY_AFTER);
    // The body is always read, also on failures, so the connection can be reused.
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => return Outcome::Transport(format!("reading the body: {e:#}")),
    };
    if status != reqwest::StatusCode::OK {
        return Outcome::BadStatus {
            status: status.as_u16(),
            retry_after,
            error: format!("status {status}: {}", String::from_utf8_lossy(&body)),
        };
    }
    // Parsing rather than comparing bytes keeps the check independent of JSON formatting.
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::String(s)) if expected.matches(&s) => Outcome::Ok,
        _ => Outcome::BadBody(format!(
            "body {:?}, expected {} as a JSON string",
            String::from_utf8_lossy(&body),
            expected.describe()
        )),
    }
}

/// Sends one request and fails unless it succeeds with exactly the expected body, so a
/// broken setup stops the run before any figures are printed.
pub async fn smoke(client: &reqwest::Client, url: &str, expected: Expected) -> Result<()> {
    match call(client, url, expected).await {
        Outcome::Ok => Ok(()),
        Outcome::BadBody(e) | Outcome::BadStatus { error: e, .. } | Outcome::Transport(e) => {
            anyhow::bail!("the first order3 call to {url} failed: {e}")
        }
    }
}

/// Sends `requests` requests from `concurrency` concurrent callers, caller i to
/// `urls[i % urls.len()]`, and checks each result against `expected`.
pub async fn run(
    client: &reqwest::Client,
    urls: &[String],
    requests: usize,
    concurrency: usize,
    expected: Expected,
) -> Result<LevelResult> {
    anyhow::ensure!(!urls.is_empty(), "no URL to send the requests to");
    // Callers claim request numbers from a shared counter, so exactly `requests` are sent
    // however unevenly the callers progress.
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..concurrency.clamp(1, requests.max(1)) {
        let client = client.clone();
        let url = urls[caller % urls.len()].clone();
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let sent = Instant::now();
                let outcome = call(&client, &url, expected).await;
                outcomes.push((sent.elapsed(), outcome));
            }
            outcomes
        });
    }
    let mut result = LevelResult {
        latencies: Vec::with_capacity(requests),
        ..LevelResult::default()
    };
    while let Some(joined) = tasks.join_next().await {
        for (latency, outcome) in joined.context("a load-generating task failed")? {
            let error = match outcome {
                Outcome::Ok => {
                    result.ok += 1;
                    None
                }
                Outcome::BadBody(e) => {
                    result.bad_body += 1;
                    Some(e)
                }
                // A refusal (503) is an answer: its latency is counted, but it is no success.
                Outcome::BadStatus {
                    status,
                    retry_after,
                    error,
                } => {
                    result.count_status(status, retry_after);
                    Some(error)
                }
                Outcome::Transport(e) => {
                    result.transport += 1;
                    // A transport error has no answer, so its time is not a latency.
                    result.first_error.get_or_insert(e);
                    continue;
                }
            };
            result.latencies.push(latency);
            if let Some(e) = error {
                result.first_error.get_or_insert(e);
            }
        }
    }
    result.wall = start.elapsed();
    result.latencies.sort_unstable();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let result = LevelResult {
            latencies: (1..=100).map(Duration::from_millis).collect(),
            ok: 100,
            wall: Duration::from_secs(1),
            ..LevelResult::default()
        };
        assert_eq!(result.percentile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(result.percentile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(result.percentile(1.0), Some(Duration::from_millis(100)));
        assert_eq!(result.percentile(0.0), Some(Duration::from_millis(1)));
    }

    #[test]
    fn checks_the_result_exactly_or_by_its_shape() {
        assert!(Expected::Exact.matches(EXPECTED_RESULT));
        assert!(Expected::Shape.matches(EXPECTED_RESULT));
        let drawn = "order bench-1 complete charge ch_0f3a-11 reservation rs_9b2c-7";
        assert!(!Expected::Exact.matches(drawn));
        assert!(Expected::Shape.matches(drawn));
        for wrong in [
            "",
            "order bench-2 complete charge a reservation b",
            "order bench-1 complete charge  reservation b",
            "order bench-1 complete charge a reservation ",
            "order bench-1 complete charge a b reservation c",
            "order bench-1 complete charge a",
        ] {
            assert!(!Expected::Shape.matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn counts_answers_per_status_and_refusals_with_retry_after() {
        let mut result = LevelResult {
            ok: 5,
            bad_body: 1,
            transport: 2,
            ..LevelResult::default()
        };
        result.count_status(503, true);
        result.count_status(503, false);
        result.count_status(503, true);
        result.count_status(500, false);
        // Retry-After is noted for refusals only.
        result.count_status(429, true);
        assert_eq!(
            result.by_status.iter().collect::<Vec<_>>(),
            [(&429, &1), (&500, &1), (&503, &3)]
        );
        assert_eq!(result.refused_503(), 3);
        assert_eq!(result.refused_with_retry_after, 2);
        assert_eq!(result.bad_status(), 5);
        assert_eq!(result.errors(), 1 + 5 + 2);
    }
}
