//! The error catalogue: every error a client can see, its GraphQL
//! `extensions.code` and its HTTP status, in one table ([`ApiError::code`]).
//!
//! Layer errors (`StoreError`, `WriteError`, `InvalidInput`, `AuthError`)
//! convert into [`ApiError`] here and nowhere else. Internal failures are
//! logged once, with detail, at this conversion, and reach the client as
//! "internal error" only.
//!
//! `ApiError` deliberately does not implement `Display`: async-graphql turns
//! any `Display` type into an error carrying its raw text, and without
//! `Display` the only way into a GraphQL error is the mapping below.

use std::sync::Arc;

use async_graphql::ErrorExtensions;
use axum::http::StatusCode;

use crate::domain::auth::AuthError;
use crate::domain::InvalidInput;
use crate::store::{StoreError, WriteError};

#[derive(Debug)]
pub enum ApiError {
    BadUserInput(String),
    Unauthenticated(String),
    Forbidden(String),
    NotFound(String),
    Conflict(String),
    RateLimited { retry_after_secs: u64 },
    Unavailable,
    Internal,
}

impl ApiError {
    /// `(extensions.code, HTTP status)` of each error.
    pub fn code(&self) -> (&'static str, StatusCode) {
        match self {
            Self::BadUserInput(_) => ("BAD_USER_INPUT", StatusCode::BAD_REQUEST),
            Self::Unauthenticated(_) => ("UNAUTHENTICATED", StatusCode::UNAUTHORIZED),
            Self::Forbidden(_) => ("FORBIDDEN", StatusCode::FORBIDDEN),
            Self::NotFound(_) => ("NOT_FOUND", StatusCode::NOT_FOUND),
            Self::Conflict(_) => ("CONFLICT", StatusCode::CONFLICT),
            Self::RateLimited { .. } => ("RATE_LIMITED", StatusCode::TOO_MANY_REQUESTS),
            Self::Unavailable => ("SERVICE_UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE),
            Self::Internal => ("INTERNAL_SERVER_ERROR", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::BadUserInput(m)
            | Self::Unauthenticated(m)
            | Self::Forbidden(m)
            | Self::NotFound(m)
            | Self::Conflict(m) => m.clone(),
            Self::RateLimited { retry_after_secs } => {
                format!("rate limited; retry after {retry_after_secs} s")
            }
            Self::Unavailable => "service temporarily unavailable".into(),
            Self::Internal => "internal error".into(),
        }
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(error: ApiError) -> Self {
        let (code, _) = error.code();
        async_graphql::Error::new(error.message()).extend_with(|_, ext| {
            ext.set("code", code);
            if let ApiError::RateLimited { retry_after_secs } = error {
                ext.set("retryAfter", retry_after_secs);
            }
        })
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        Self::BadUserInput(e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::Unauthenticated(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "database unavailable");
                Self::Unavailable
            }
            _ => {
                tracing::error!(error = %e, "store failure");
                Self::Internal
            }
        }
    }
}

impl From<Arc<StoreError>> for ApiError {
    fn from(e: Arc<StoreError>) -> Self {
        // A batch error is shared by every request of the batch: log the
        // detail once per request is acceptable, it is rare.
        match Arc::try_unwrap(e) {
            Ok(e) => e.into(),
            Err(shared) => match &*shared {
                StoreError::Unavailable(_) => Self::Unavailable,
                other => {
                    tracing::error!(error = %other, "store failure");
                    Self::Internal
                }
            },
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Invalid(e) => e.into(),
            WriteError::NotFound => Self::NotFound("review not found".into()),
            WriteError::Forbidden => Self::Forbidden("only the author or a moderator may change this review".into()),
            WriteError::Conflict => Self::Conflict("you have already reviewed this offer".into()),
            // Resolved by the mutation (it answers the stored outcome); here
            // only if that outcome could not be read.
            WriteError::Replayed => Self::Unavailable,
            WriteError::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_leak() {
        let err: ApiError = StoreError::Corrupt("column secret_col is weird".into()).into();
        let gql: async_graphql::Error = err.into();
        assert_eq!(gql.message, "internal error");
        let ext = format!("{:?}", gql.extensions);
        assert!(ext.contains("INTERNAL_SERVER_ERROR") && !ext.contains("secret_col"), "{ext}");
    }

    #[test]
    fn rate_limits_say_when_to_retry() {
        let gql: async_graphql::Error = ApiError::RateLimited { retry_after_secs: 3 }.into();
        let ext = format!("{:?}", gql.extensions);
        assert!(ext.contains("RATE_LIMITED") && ext.contains("retryAfter"), "{ext}");
    }
}
