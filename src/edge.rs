//! The HTTP edge: accepting connections and holding every client to a clock.
//!
//! `axum::serve` sets no timer, so a client that sends nothing, or one byte of
//! body a second, keeps a connection and a task for as long as it likes; with
//! no cap, the only ceiling is the open-file limit. This loop serves the same
//! router over hyper's HTTP/1 connection with four limits ([`EdgeConfig`]):
//!
//! * **header timeout**: a request head must arrive in full within it, counted
//!   from the connection's start or from the end of the previous response
//!   (hyper's `header_read_timeout`, which also closes idle keep-alives);
//! * **body timeout**: the whole request body must arrive within it, counted
//!   from the head (answered `408 body_timeout` and the connection closed);
//! * **idle timeout**: a connection with no byte read or written for this
//!   long is closed, whatever it was doing (longer than the longest
//!   `?wait_ms=` a caller may ask for);
//! * **max connections**: one more is answered `503 too_many_connections` and
//!   closed at once.
//!
//! The body is read here, whole and bounded (`413 body_too_large`), before the
//! router sees the request, so no handler ever waits on a slow client. And the
//! rejections hyper makes by itself before any handler runs (`400` for a
//! malformed head, `414` for a huge path, `431` for huge headers) leave with
//! the same JSON error shape as every other rejection ([`EdgeIo`] rewrites
//! them on their way out).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::Instrument;

/// Limits every connection is held to. Every field is a `DISPATCH_HTTP_…`
/// setting (see the README's "Edge limits").
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// `DISPATCH_HTTP_HEADER_TIMEOUT_MS` (default 10 s): time to send a whole
    /// request head, from connect or from the end of the previous response.
    pub header_timeout: Duration,
    /// `DISPATCH_HTTP_BODY_TIMEOUT_MS` (default 15 s): time to send a whole body.
    pub body_timeout: Duration,
    /// `DISPATCH_HTTP_IDLE_TIMEOUT_MS` (default 60 s): no byte either way for
    /// this long closes the connection.
    pub idle_timeout: Duration,
    /// `DISPATCH_HTTP_MAX_CONNECTIONS` (default 1,024): open connections served at once.
    pub max_connections: usize,
    /// The largest request body (`DISPATCH_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// The request head (line and headers) a connection may send.
const MAX_HEAD_BYTES: usize = 96 * 1024;

/// How long connections may take to finish their requests after shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Serve `router` on `listener` until `stop` is cancelled, then let open
/// connections finish their requests (bounded).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: EdgeConfig,
    stop: CancellationToken,
) {
    let config = Arc::new(config);
    raise_fd_limit(config.max_connections);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::HTTP_CONNECTIONS_REFUSED).increment(1);
            connections.spawn(refuse(stream));
            continue;
        };
        // A second handle on the socket, for the lingering close below.
        let (stream, linger) = match duplicate(stream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "could not set up a connection");
                continue;
            }
        };
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(EdgeIo::new(stream, activity.clone()));
        let cfg = config.clone();
        let app = router.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            let cfg = cfg.clone();
            // A span per request: the method here, the route template and
            // tenant where the caller is authenticated (`http::Caller`), the
            // status at the end; never the path itself or a body.
            let span = tracing::info_span!(
                "request",
                http.method = %req.method(),
                http.route = tracing::field::Empty,
                tenant.id = tracing::field::Empty,
                http.status = tracing::field::Empty,
            );
            async move {
                let response = handle(app, &cfg, req).instrument(span.clone()).await;
                span.record("http.status", response.status().as_u16());
                Ok::<_, Infallible>(response)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            // Request heads over 96 KiB are refused (431); hyper checks
            // between reads, so what it accepts stays under twice this.
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(io, service);
        let conn = graceful.watch(conn);
        let idle = config.idle_timeout;
        connections.spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                _ = activity.idle_for(idle) => {
                    tracing::debug!("idle connection closed");
                }
            }
            linger_close(linger).await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace; closing them");
    }
    // Nothing of ours outlives the server: lingering closes and stragglers end here.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// Each connection holds two descriptors (see [`duplicate`]); raise the
/// soft open-file limit to the hard one, and say so when the cap cannot fit.
fn raise_fd_limit(max_connections: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let need = 2 * max_connections as u64 + 256;
    if lim.rlim_cur < need {
        tracing::warn!(
            open_files = lim.rlim_cur,
            need,
            "the open-file limit is below 2 x DISPATCH_HTTP_MAX_CONNECTIONS + 256; connections beyond it will wait in the backlog"
        );
    }
}

/// The socket twice: one for hyper, one kept for [`linger_close`].
fn duplicate(stream: TcpStream) -> io::Result<(TcpStream, TcpStream)> {
    let std = stream.into_std()?;
    let dup = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, TcpStream::from_std(dup)?))
}

/// Close the way nginx does (`lingering_close`): send FIN, then read and
/// drop what the client still sends, for a moment. Closing a socket with
/// unread data makes the kernel send a reset, and a reset can destroy our
/// last answer (a 408, 413 or 431 written while the client was still
/// sending) before the client reads it.
async fn linger_close(mut stream: TcpStream) {
    const LINGER: Duration = Duration::from_secs(1);
    const MAX_DRAIN: usize = 1 << 20;
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 8192];
    let mut drained = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while drained < MAX_DRAIN {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Read the body whole (bounded in size and time), then route the request.
async fn handle(router: Router, cfg: &EdgeConfig, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cfg.max_body_bytes as u64) {
        return close(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than this server accepts",
        ));
    }
    let collected = tokio::time::timeout(
        cfg.body_timeout,
        Limited::new(body, cfg.max_body_bytes).collect(),
    )
    .await;
    let bytes = match collected {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return close(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is larger than this server accepts",
            ))
        }
        Ok(Err(_)) => {
            return close(error(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                "the request body could not be read",
            ))
        }
        Err(_) => {
            metrics::counter!(crate::metrics::HTTP_BODY_TIMEOUTS).increment(1);
            return close(error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive in time",
            ));
        }
    };
    match router
        .oneshot(Request::from_parts(parts, Body::from(bytes)))
        .await
    {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = json!({"error": {"code": code, "message": message}}).to_string();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The connection is not reused after this answer (its body may be unread).
fn close(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A raw JSON error response, for answers written below hyper.
fn raw_error(status: u16, reason: &str, code: &str, message: &str) -> Vec<u8> {
    let body = json!({"error": {"code": code, "message": message}}).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One connection over the cap: told so, and closed.
async fn refuse(mut stream: TcpStream) {
    let answer = raw_error(
        503,
        "Service Unavailable",
        "too_many_connections",
        "too many open connections; try again shortly",
    );
    let written = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&answer)).await;
    if matches!(written, Ok(Ok(()))) {
        linger_close(stream).await;
    }
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// The connection as hyper sees it: records activity, and gives hyper's own
/// bodiless error answers (400, 414, 431, written before any handler runs)
/// the JSON error shape.
struct EdgeIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// A rewritten answer still being written.
    pending: Vec<u8>,
}

impl EdgeIo {
    fn new(inner: TcpStream, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            pending: Vec::new(),
        }
    }

    /// Write out what is pending; `Ready(Ok)` once nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.activity.touch();
                    self.pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// hyper's automatic answer to a request it could not parse, as JSON; `None`
/// for anything else (every answer of ours carries a content type).
fn rewrite_automatic(buf: &[u8]) -> Option<Vec<u8>> {
    // hyper's automatic answers are one short, bodiless head.
    if buf.len() > 512 || !buf.starts_with(b"HTTP/1.") || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    let (head, rest) = head.split_once("\r\n\r\n")?;
    if !rest.is_empty() || !head.starts_with("HTTP/1.") {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    if lower.contains("\r\ncontent-type:") || !lower.contains("\r\ncontent-length: 0") {
        return None;
    }
    let status: u16 = head.get(9..12)?.parse().ok()?;
    let (reason, code, message) = match status {
        400 => (
            "Bad Request",
            "malformed_request",
            "the request line or a header is malformed",
        ),
        414 => (
            "URI Too Long",
            "uri_too_long",
            "the request path is too long",
        ),
        431 => (
            "Request Header Fields Too Large",
            "headers_too_large",
            "the request headers are too large",
        ),
        _ => return None,
    };
    Some(raw_error(status, reason, code, message))
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if let Some(json) = rewrite_automatic(buf) {
            this.pending = json;
            // Taken whole; written out by this and the next calls.
            let _ = this.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_automatic_answers_become_json() {
        let raw = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 09:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite_automatic(raw).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 431 "));
        assert!(out.contains("content-type: application/json"));
        assert!(out.ends_with(r#"{"error":{"code":"headers_too_large","message":"the request headers are too large"}}"#));
    }

    #[test]
    fn our_own_answers_pass_untouched() {
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert!(rewrite_automatic(ours).is_none());
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}";
        assert!(rewrite_automatic(with_body).is_none());
        let ok = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
        assert!(rewrite_automatic(ok).is_none());
    }
}
