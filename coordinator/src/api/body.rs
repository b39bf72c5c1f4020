//! Request bodies, read before any handler: within a deadline, up to the size limit.
//!
//! A client that sends its body slowly would otherwise hold a connection and a task for as long
//! as it likes (the header timeout ends where the body starts). A body over the limit is still
//! read to its end, up to [`DRAIN_MAX`] bytes and within the deadline, before the 413: a client
//! that sends its whole body before reading (Python's `urllib`) sees a broken pipe instead of
//! the answer if the server answers and closes first.

use super::{error::ApiError, AppState};
use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderValue},
    middleware::Next,
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use std::sync::Arc;

/// The most bytes of an oversized body read and dropped so that its 413 can be read; past it
/// the connection closes.
pub(crate) const DRAIN_MAX: usize = 64 << 20;

pub(crate) async fn read_body(
    State(s): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let limit = s.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut over = declared.is_some_and(|n| n > limit as u64);
    if declared.is_some_and(|n| n > (limit + DRAIN_MAX) as u64) {
        // Too large even to drain: answer now, and close.
        return closing(ApiError::too_large(limit).into_response());
    }
    let deadline = tokio::time::Instant::now() + s.body_read_timeout;
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut drained = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return closing(ApiError::body_timeout(s.body_read_timeout).into_response()),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body ended early");
                return closing(ApiError::bad_body().into_response());
            }
            Ok(Some(Ok(chunk))) => {
                if !over && buf.len() + chunk.len() <= limit {
                    buf.extend_from_slice(&chunk);
                } else {
                    over = true;
                    buf = Vec::new();
                    drained += chunk.len();
                    if drained > DRAIN_MAX {
                        break;
                    }
                }
            }
        }
    }
    if over {
        return closing(ApiError::too_large(limit).into_response());
    }
    next.run(Request::from_parts(parts, Body::from(buf))).await
}

/// `r` with `Connection: close`: the rest of this connection's bytes are not trusted.
fn closing(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn body_errors_have_their_statuses_and_close() {
        for (e, want) in [
            (ApiError::too_large(10), StatusCode::PAYLOAD_TOO_LARGE),
            (
                ApiError::body_timeout(std::time::Duration::from_secs(1)),
                StatusCode::REQUEST_TIMEOUT,
            ),
            (ApiError::bad_body(), StatusCode::BAD_REQUEST),
        ] {
            let r = closing(e.into_response());
            assert_eq!(r.status(), want);
            assert_eq!(r.headers()[header::CONNECTION], "close");
        }
    }
}
