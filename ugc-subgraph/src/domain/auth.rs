//! Why a bearer token was refused: what the HTTP layer finds and the error
//! catalogue reports (so neither `graphql` nor `error` depends on `http`).

/// Why a token was refused. Messages are safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send Authorization: Bearer <token>")]
    Missing,
    #[error("malformed Authorization header: expected Bearer <token>")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm must be HS256")]
    WrongAlgorithm,
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("malformed token: expected a JWT (header.payload.signature)")]
    MalformedToken,
    #[error("invalid token")]
    Invalid,
    #[error("token subject must be 1 to 64 characters")]
    BadSubject,
    #[error("authentication is not configured on this service")]
    NotConfigured,
}
