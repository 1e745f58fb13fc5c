//! Serving a router on a listener, with the bounds a listener open to many callers needs.
//!
//! `axum::serve` gives hyper no timer, so a client that opens a connection and sends its
//! headers a byte at a time (or never) holds the connection, a task and its buffers for
//! as long as it likes. Here every connection is HTTP/1.1 served by hyper with a timer:
//! the request head must arrive within `header_read_timeout` (also the longest a
//! keep-alive connection stays idle between requests), and a request body that stops
//! flowing for `body_read_timeout` is cut. A waiting answer (`Prefer: wait`, a `call`) is
//! not a read, and is bounded by its own wait.
//!
//! A stop closes the listener at once, lets the requests in flight finish and closes idle
//! connections, as `axum::serve`'s graceful shutdown does.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send what it sends.
#[derive(Debug, Clone, Copy)]
pub struct ReadTimeouts {
    /// For a request's head; also the longest a keep-alive connection stays idle.
    pub header: Duration,
    /// For the next piece of a request body.
    pub body: Duration,
}
/// The pause after `accept` failed for want of resources (too many open files).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `stop`, then waits for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: ReadTimeouts,
    stop: CancellationToken,
) {
    let router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        timeouts.body,
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    let connections = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Per-connection failures (reset before accept) pass; running out of
                    // file descriptors (EMFILE, ENFILE) passes too, after a pause, as
                    // connections close, but an operator must hear of it.
                    if matches!(error.raw_os_error(), Some(23 | 24)) {
                        tracing::warn!(%error, "cannot accept connections: out of file descriptors");
                    } else {
                        tracing::debug!(%error, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        // Answers are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::trace!(%error, "connection ended");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}
