//! API errors: every error knows its HTTP status and its OpenAI error body
//! `{"error": {"message", "type", "param", "code"}}` (vLLM's type names).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use trellis_engine::{AsyncEngineError, ChatTemplateError, EngineError};

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status (also the body's `code`).
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// The request parameter at fault, when one is.
    pub param: Option<String>,
    /// Seconds for the `Retry-After` header of a 503 the client should retry.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400 with a message and, optionally, the parameter at fault.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(str::to_string),
            retry_after: None,
        }
    }

    /// An error with any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 404 for a model name that is not served; `aliases` lists the names that are.
    pub fn model_not_found(name: &str, aliases: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{name}` does not exist. Valid aliases: {aliases}."),
            param: Some("model".into()),
            retry_after: None,
        }
    }

    /// 503: the engine thread is gone.
    pub fn engine_dead() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The engine is not running.",
        )
    }

    /// The OpenAI error type for the status (vLLM's names).
    pub fn error_type(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 422 => "BadRequestError",
            401 => "AuthenticationError",
            403 => "PermissionDeniedError",
            404 => "NotFoundError",
            405 => "MethodNotAllowedError",
            408 => "RequestTimeoutError",
            413 => "PayloadTooLargeError",
            415 => "UnsupportedMediaTypeError",
            503 => "ServiceUnavailableError",
            _ => "InternalServerError",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.error_type(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidParams(p) => ApiError::bad_request(p.message, Some(p.param)),
            EngineError::Scheduler(s) => ApiError::bad_request(s.to_string(), None),
            EngineError::Tokenizer(t) => ApiError::bad_request(t.to_string(), None),
            EngineError::Config(c) => ApiError::bad_request(c, None),
            EngineError::Rejected(r) => ApiError::bad_request(r, None),
            e @ EngineError::QueueFull { .. } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            },
            EngineError::InvalidPluginData(m) => ApiError::bad_request(m, Some("data")),
            EngineError::InvalidPoolingParams(p) => {
                ApiError::bad_request(p.to_string(), Some("dimensions"))
            }
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

impl From<AsyncEngineError> for ApiError {
    fn from(e: AsyncEngineError) -> Self {
        match e {
            AsyncEngineError::Engine(e) => e.into(),
            AsyncEngineError::EngineDead => ApiError::engine_dead(),
        }
    }
}

impl From<ChatTemplateError> for ApiError {
    fn from(e: ChatTemplateError) -> Self {
        ApiError::bad_request(e.to_string(), None)
    }
}
