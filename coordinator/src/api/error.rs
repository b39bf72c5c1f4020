//! The one mapping from failures to HTTP: OpenAI's error body with the right status.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};

/// An error answered to an API client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: &'static str,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: "SY:API:InvalidRequest",
            retry_after: None,
        }
    }
    /// 404 for a model this server does not serve.
    pub fn unknown_model(name: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!("model {name:?} does not exist; this server serves {served:?}"),
            param: Some("model"),
            code: "model_not_found",
            retry_after: None,
        }
    }
    /// 429 with Retry-After.
    pub fn queue_full() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            message: "the server is at capacity; retry shortly".into(),
            param: None,
            code: "SY:API:QueueFull",
            retry_after: Some(1),
        }
    }
    /// 503 with Retry-After.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "service_unavailable",
            message: message.into(),
            param: None,
            code: "SY:API:Unavailable",
            retry_after: Some(2),
        }
    }
    /// 504: the request ran past `--request-timeout`.
    pub fn timeout(limit: std::time::Duration) -> Self {
        Self {
            status: StatusCode::GATEWAY_TIMEOUT,
            kind: "timeout_error",
            message: format!("the request did not finish within {limit:?}"),
            param: None,
            code: "SY:API:Timeout",
            retry_after: None,
        }
    }
    /// 401.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            message: "invalid or missing API key (Authorization: Bearer ...)".into(),
            param: None,
            code: "invalid_api_key",
            retry_after: None,
        }
    }
    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!("request body exceeds {limit} bytes"),
            param: None,
            code: "SY:API:BodyTooLarge",
            retry_after: None,
        }
    }
    /// 408: the body did not arrive within the deadline.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            kind: "invalid_request_error",
            message: format!("request body not received within {} s", limit.as_secs_f64()),
            param: None,
            code: "SY:API:BodyTimeout",
            retry_after: None,
        }
    }
    /// 400: the body's bytes stopped short of what the request said (a broken connection or
    /// bad chunked encoding).
    pub fn bad_body() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: "the request body could not be read".into(),
            param: None,
            code: "SY:API:BadBody",
            retry_after: None,
        }
    }
    /// 500 with a fixed message; the details go to the log only.
    pub fn internal(details: &str) -> Self {
        tracing::error!(details, "internal error answered as 500");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "internal_error",
            message: "internal error".into(),
            param: None,
            code: "SY:API:Internal",
            retry_after: None,
        }
    }

    /// The JSON body, also used inside SSE streams.
    #[must_use]
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        metrics::counter!("switchyard_request_errors_total", "code" => self.code).increment(1);
        r
    }
}

impl From<crate::request::RequestError> for ApiError {
    fn from(e: crate::request::RequestError) -> Self {
        use crate::request::RequestError;
        match e {
            RequestError::Invalid { message, param } => Self::invalid(message, param),
            RequestError::UnknownModel { given, served } => Self::unknown_model(&given, &served),
        }
    }
}

impl From<crate::scheduler::SubmitError> for ApiError {
    fn from(e: crate::scheduler::SubmitError) -> Self {
        use crate::scheduler::SubmitError;
        match e {
            SubmitError::QueueFull => Self::queue_full(),
            SubmitError::Stopped => Self::unavailable("the engine is shutting down"),
        }
    }
}

impl From<crate::scheduler::SeqFailure> for ApiError {
    fn from(f: crate::scheduler::SeqFailure) -> Self {
        use crate::scheduler::SeqFailure;
        match f {
            SeqFailure::Unavailable(m) => Self::unavailable(m),
            SeqFailure::QueueFull => Self::queue_full(),
            SeqFailure::QueueTimeout(d) => Self::unavailable(format!(
                "the request waited {d:?} in the queue without starting; retry later"
            )),
            SeqFailure::Internal(m) => Self::internal(&m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        request::RequestError,
        scheduler::{SeqFailure, SubmitError},
    };

    #[test]
    fn every_domain_error_maps_to_its_status_and_code() {
        let cases = [
            (
                ApiError::from(RequestError::invalid("bad n", Some("n"))),
                StatusCode::BAD_REQUEST,
                "SY:API:InvalidRequest",
            ),
            (
                ApiError::from(RequestError::UnknownModel {
                    given: "x".into(),
                    served: "y".into(),
                }),
                StatusCode::NOT_FOUND,
                "model_not_found",
            ),
            (
                ApiError::from(SubmitError::QueueFull),
                StatusCode::TOO_MANY_REQUESTS,
                "SY:API:QueueFull",
            ),
            (
                ApiError::from(SubmitError::Stopped),
                StatusCode::SERVICE_UNAVAILABLE,
                "SY:API:Unavailable",
            ),
            (
                ApiError::from(SeqFailure::Unavailable("worker gone".into())),
                StatusCode::SERVICE_UNAVAILABLE,
                "SY:API:Unavailable",
            ),
            (
                ApiError::from(SeqFailure::Internal("bug".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
                "SY:API:Internal",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status, e.code), (status, code), "{}", e.message);
        }
        let e = ApiError::from(RequestError::invalid("bad n", Some("n")));
        assert_eq!(e.body()["error"]["param"], "n");
        assert_eq!(e.retry_after, None);
        assert_eq!(ApiError::from(SubmitError::QueueFull).retry_after, Some(1));
        // Internal details stay in the log.
        assert_eq!(
            ApiError::from(SeqFailure::Internal("secret".into())).message,
            "internal error"
        );
    }
}
