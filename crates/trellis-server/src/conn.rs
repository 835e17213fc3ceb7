//! Connections: the accept loop, its cap and its timeouts.
//!
//! A client that opens connections and sends nothing, or trickles its headers or body a byte
//! at a time, must not tie up the server. So:
//!
//! - **A cap on open connections** ([`ConnLimits::max_connections`], `--max-connections`).
//!   A connection beyond it is answered at once with a 503 OpenAI error body and
//!   `Retry-After`, and closed; the ones already open are untouched.
//! - **A header timeout** ([`ConnLimits::header_timeout`], vLLM's
//!   `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, `--timeout-keep-alive`): the request line and headers must
//!   arrive within it, counted from when the server starts waiting for them — on a new
//!   connection and between the requests of a kept-alive one. An idle or slow connection is
//!   closed when it runs out (hyper's `header_read_timeout`).
//! - **A body deadline** ([`ConnLimits::body_timeout`], `--http-body-timeout`): the whole body
//!   must arrive within it, however it is trickled, else 408. A client that disconnects
//!   mid-body costs the buffered bytes and nothing else: no request reaches the engine before
//!   its body is complete.
//!
//! Responses (a stream of tokens included) are not limited: a request in flight keeps its
//! connection for as long as it runs.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::ApiError;

/// Default cap on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default header (and keep-alive idle) timeout: uvicorn's `timeout_keep_alive` as vLLM sets it.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default deadline for a whole request body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// What one client connection may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time to receive a request's line and headers, and most idle time between requests.
    pub header_timeout: Duration,
    /// Time to receive a request's whole body.
    pub body_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

/// Middleware: reads the whole body within the body deadline and the body limit, then hands
/// the request on with the body in memory. 408 past the deadline, 413 past the limit.
pub(crate) async fn read_body(
    State(limits): State<(Duration, usize)>,
    req: Request,
    next: Next,
) -> Response {
    let (deadline, max_bytes) = limits;
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, max_bytes)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The request body is too large.",
                )
                .into_response()
            } else {
                // Most likely the client went away mid-body: nobody reads this answer.
                ApiError::bad_request(format!("Failed to read the request body: {e}"), None)
                    .into_response()
            }
        }
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "The request body did not arrive within {} seconds.",
                deadline.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

/// Accepts connections until `stop` is notified, serving each with `app` under `limits`;
/// then stops accepting and asks every open connection to finish its request in flight and
/// close. Returns once they all have (the caller bounds that wait).
pub(crate) async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
    stop: Arc<tokio::sync::Notify>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let stream = tokio::select! {
            _ = stop.notified() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: the cap should prevent them; back off briefly
                    // instead of spinning on a listener that keeps failing.
                    eprintln!("trellis: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            app.clone().oneshot(req.map(Body::new))
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Errors here are the client's (reset, header timeout): nothing to report.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Answers a connection over the cap with a 503 and closes it, reading what the client sent
/// first (briefly) so that closing does not reset the connection before it reads the answer.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let err = ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("The server has {cap} connections open, its limit; retry shortly."),
        )
    };
    let body = err.body().to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), write).await {
        // Drain until the client closes (or a second passes), so the answer is not lost to a
        // reset.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}
