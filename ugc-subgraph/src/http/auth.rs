//! Bearer-token authentication: `Authorization: Bearer <JWT>` (HS256,
//! `UGC_JWT_SECRET`) → [`Viewer`]. Tokens are never logged.
//!
//! Reads need no token: a request without one is anonymous. A request with a
//! bad token reads as anonymous too, but its mutations fail with the reason.

use axum::http::{header, HeaderMap};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

pub use crate::domain::auth::AuthError;
use crate::domain::{EntityId, Viewer};

/// A development token: HS256 with `secret`, for `sub`, valid for `ttl_secs`
/// (the `token` subcommand; production tokens come from the identity
/// provider the gateway trusts).
///
/// # Errors
/// `sub` is not a valid user id, or signing failed.
pub fn issue(secret: &str, sub: &str, moderator: bool, ttl_secs: u64) -> Result<String, AuthError> {
    let sub = EntityId::new(sub, "sub").map_err(|_| AuthError::BadSubject)?;
    let exp = chrono::Utc::now().timestamp() + i64::try_from(ttl_secs).unwrap_or(i64::MAX / 2);
    let roles: &[&str] = if moderator { &["moderator"] } else { &[] };
    let claims = serde_json::json!({ "sub": sub.as_str(), "exp": exp, "roles": roles });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|_| AuthError::Invalid)
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// Verifies tokens with one HS256 key.
#[derive(Clone)]
pub struct Authenticator {
    key: Option<DecodingKey>,
    validation: Validation,
}

impl Authenticator {
    pub fn new(secret: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        Self { key: secret.map(|s| DecodingKey::from_secret(s.as_bytes())), validation }
    }

    /// The viewer of a request: `Ok(Anonymous)` without a token.
    ///
    /// # Errors
    /// A token was sent and is not acceptable.
    pub fn viewer(&self, headers: &HeaderMap) -> Result<Viewer, AuthError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Viewer::Anonymous);
        };
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        let key = self.key.as_ref().ok_or(AuthError::NotConfigured)?;
        // Only the one algorithm and the one key: the header's `alg`, `kid`,
        // `jku` or `x5u` never choose how a token is verified.
        let claims = decode::<Claims>(token, key, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => AuthError::Expired,
                    K::ImmatureSignature => AuthError::NotYetValid,
                    K::InvalidSignature => AuthError::BadSignature,
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => AuthError::WrongAlgorithm,
                    K::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
                    K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => AuthError::MalformedToken,
                    _ => AuthError::Invalid,
                }
            })?
            .claims;
        let id = EntityId::new(&claims.sub, "sub").map_err(|_| AuthError::BadSubject)?;
        Ok(Viewer::User { id: id.into_string(), moderator: claims.roles.iter().any(|r| r == "moderator") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "test-secret-0123456789";

    fn token(secret: &str, claims: serde_json::Value, alg: Algorithm) -> HeaderMap {
        let t = encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        h
    }

    fn bearer(raw: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {raw}").parse().unwrap());
        h
    }

    fn b64(json: &serde_json::Value) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
    }

    /// Tokens an attacker would forge: `alg: none`, an RS256 header over an
    /// HMAC made with something public, `kid` pointing elsewhere.
    #[test]
    fn forged_algorithms_and_headers_are_refused() {
        use hmac_free::sign;
        let auth = Authenticator::new(Some(SECRET));
        let claims = b64(&serde_json::json!({"sub": "u1", "exp": exp(60), "roles": ["moderator"]}));
        for alg in ["none", "None", "NONE"] {
            let t = format!("{}.{claims}.", b64(&serde_json::json!({"alg": alg, "typ": "JWT"})));
            assert!(auth.viewer(&bearer(&t)).is_err(), "alg {alg} accepted");
            let t = format!("{}.{claims}", b64(&serde_json::json!({"alg": alg})));
            assert!(auth.viewer(&bearer(&t)).is_err(), "unsigned {alg} accepted");
        }
        // RS256 declared, signed with HMAC over a "public key" string.
        let header = b64(&serde_json::json!({"alg": "RS256", "typ": "JWT"}));
        let t = sign(&header, &claims, b"-----BEGIN PUBLIC KEY-----");
        assert_eq!(auth.viewer(&bearer(&t)), Err(AuthError::WrongAlgorithm));
        // HS256 with a kid naming another key, signed with that other key.
        let header = b64(&serde_json::json!({"alg": "HS256", "kid": "../../dev/null"}));
        let t = sign(&header, &claims, b"");
        assert_eq!(auth.viewer(&bearer(&t)), Err(AuthError::BadSignature));
        // The real key with a kid still verifies: kid is simply ignored.
        let t = sign(&header, &claims, SECRET.as_bytes());
        assert!(auth.viewer(&bearer(&t)).is_ok());
    }

    /// HS256 signing by hand, through jsonwebtoken's own primitive.
    mod hmac_free {
        pub fn sign(header: &str, claims: &str, key: &[u8]) -> String {
            let message = format!("{header}.{claims}");
            let key = jsonwebtoken::EncodingKey::from_secret(key);
            let signature =
                jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256).unwrap();
            format!("{message}.{signature}")
        }
    }

    fn exp(offset: i64) -> i64 {
        chrono::Utc::now().timestamp() + offset
    }

    #[test]
    fn issued_tokens_verify() {
        let auth = Authenticator::new(Some(SECRET));
        let t = issue(SECRET, "user-000001", true, 60).unwrap();
        assert_eq!(auth.viewer(&bearer(&t)), Ok(Viewer::User { id: "user-000001".into(), moderator: true }));
        let t = issue(SECRET, "user-000002", false, 60).unwrap();
        assert_eq!(auth.viewer(&bearer(&t)), Ok(Viewer::User { id: "user-000002".into(), moderator: false }));
        assert_eq!(issue(SECRET, &"x".repeat(65), false, 60), Err(AuthError::BadSubject));
    }

    #[test]
    fn verifies_tokens() {
        let auth = Authenticator::new(Some(SECRET));
        assert_eq!(auth.viewer(&HeaderMap::new()), Ok(Viewer::Anonymous));
        let ok =
            token(SECRET, serde_json::json!({"sub": "u1", "exp": exp(60), "roles": ["moderator"]}), Algorithm::HS256);
        assert_eq!(auth.viewer(&ok), Ok(Viewer::User { id: "u1".into(), moderator: true }));
        let expired = token(SECRET, serde_json::json!({"sub": "u1", "exp": exp(-3600)}), Algorithm::HS256);
        assert_eq!(auth.viewer(&expired), Err(AuthError::Expired));
        let forged = token("another-secret-999999", serde_json::json!({"sub": "u1", "exp": exp(60)}), Algorithm::HS256);
        assert_eq!(auth.viewer(&forged), Err(AuthError::BadSignature));
        let other_alg = token(SECRET, serde_json::json!({"sub": "u1", "exp": exp(60)}), Algorithm::HS384);
        assert_eq!(auth.viewer(&other_alg), Err(AuthError::WrongAlgorithm));
        let no_exp = token(SECRET, serde_json::json!({"sub": "u1"}), Algorithm::HS256);
        assert_eq!(auth.viewer(&no_exp), Err(AuthError::MissingClaim("exp".into())));
        let not_yet =
            token(SECRET, serde_json::json!({"sub": "u1", "exp": exp(3600), "nbf": exp(600)}), Algorithm::HS256);
        assert_eq!(auth.viewer(&not_yet), Err(AuthError::NotYetValid));
        let long_sub = token(SECRET, serde_json::json!({"sub": "x".repeat(65), "exp": exp(60)}), Algorithm::HS256);
        assert_eq!(auth.viewer(&long_sub), Err(AuthError::BadSubject));
        assert_eq!(auth.viewer(&bearer("not.a.jwt")), Err(AuthError::MalformedToken));
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(auth.viewer(&basic), Err(AuthError::Malformed));
    }
}
