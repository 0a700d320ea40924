//! The HTTP server loop: hyper's connection builder driven directly, because axum 0.8's
//! `serve` sets no header-read timeout (a slowloris client could hold connections forever).
//! Graceful shutdown: on the signal, stop accepting, let in-flight requests finish within
//! the grace period, then return.
//!
//! The header-read timeout, two ways. Hyper enforces it on each HTTP/1 request's head, but has
//! nothing of the kind for HTTP/2, and its protocol detection waits without a bound for a
//! connection's first bytes. So this loop also closes any connection, whatever its protocol,
//! that has not delivered a complete first request within the timeout: one that sends
//! nothing, only the HTTP/2 preface, or a header block it never finishes. Later requests on an
//! HTTP/2 connection are bounded less tightly: a header block left unfinished stops every
//! other frame, so a client that then goes quiet fails the keep-alive ping (20 s, then its
//! 20 s timeout); one that keeps trickling continuation frames is bounded only by h2's limits
//! on a header block's size and frame count.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

/// Server-side connection settings.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Signalled by every request, as its headers are complete; the first one counts.
        let first_request = Arc::new(Notify::new());
        let request_seen = first_request.clone();
        let service = TowerToHyperService::new(router.clone().map_request(
            move |req: axum::http::Request<Incoming>| {
                request_seen.notify_one();
                let mut req = req.map(axum::body::Body::new);
                // The peer, for protected mode's loopback check.
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        ));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let first = tokio::time::timeout(header_read_timeout, async {
                tokio::select! {
                    biased;
                    ended = &mut connection => Some(ended),
                    () = first_request.notified() => None,
                }
            })
            .await;
            let ended = match first {
                Ok(Some(ended)) => ended,
                Ok(None) => connection.await,
                Err(_) => {
                    // Dropping the connection closes the socket.
                    tracing::debug!(%peer, "no complete request within the header read timeout; closing");
                    return;
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("stopped accepting; draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("grace period over; closing remaining connections");
        }
    }
    Ok(())
}
