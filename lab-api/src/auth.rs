//! Who may read: bearer JWTs verified against the identity provider's JWKS (RS256, ES256),
//! static API tokens stored as SHA-256 digests, or nobody checked at all (`mode = "none"`).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap},
    middleware::Next,
    response::{IntoResponse, Response},
};
use jsonwebtoken::{
    jwk::{AlgorithmParameters, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use sha2::{Digest, Sha256};
use shared::config::{AuthConfig, AuthMode};
use tokio::sync::{Mutex, RwLock};

use crate::problem::ApiError;

/// An unknown `kid` triggers one JWKS fetch; if the key is still missing, the `kid` is
/// remembered as unknown this long.
const UNKNOWN_KID_TTL: Duration = Duration::from_secs(60);
/// At most this many JWKS fetches per minute, whatever tokens arrive.
const MAX_FETCHES_PER_MINUTE: usize = 10;
/// Unknown kids remembered at most (a flood of random kids cannot grow memory).
const MAX_UNKNOWN_KIDS: usize = 1024;
/// Keys are refreshed at least this often even when every `kid` is known (rotation).
const MAX_KEY_AGE: Duration = Duration::from_secs(3600);
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

#[derive(Debug)]
pub enum Authenticator {
    None,
    Tokens(Vec<[u8; 32]>),
    Jwt(Box<JwtVerifier>),
}

impl Authenticator {
    pub fn from_config(cfg: &AuthConfig, http: reqwest::Client) -> Self {
        match cfg.mode {
            AuthMode::None => Authenticator::None,
            AuthMode::Tokens => Authenticator::Tokens(
                cfg.token_hashes
                    .iter()
                    .filter_map(|h| hex::decode(h).ok()?.try_into().ok())
                    .collect(),
            ),
            AuthMode::Jwt => Authenticator::Jwt(Box::new(JwtVerifier {
                jwks_url: cfg.jwks_url.clone(),
                issuer: cfg.issuer.clone(),
                audience: cfg.audience.clone(),
                http,
                keys: RwLock::new(KeyCache::default()),
                refreshing: Mutex::new(()),
            })),
        }
    }

    /// Checks the request's `Authorization` header.
    pub async fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self {
            Authenticator::None => Ok(()),
            Authenticator::Tokens(hashes) => {
                let token = bearer(headers)?;
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                if hashes.iter().any(|h| constant_time_eq(h, &digest)) {
                    Ok(())
                } else {
                    Err(ApiError::Unauthorized("The API token is not valid.".into()))
                }
            }
            Authenticator::Jwt(v) => v.verify(bearer(headers)?).await,
        }
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("An `Authorization: Bearer <token>` header is required.".into())
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized("The Authorization header must be `Bearer <token>`.".into())
        })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
    unknown: HashMap<String, Instant>,
    fetches: std::collections::VecDeque<Instant>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("fetched_at", &self.fetched_at)
            .finish()
    }
}

/// Verifies bearer JWTs against a JWKS, caching keys and refreshing them on an unknown `kid`.
#[derive(Debug)]
pub struct JwtVerifier {
    jwks_url: String,
    issuer: String,
    audience: String,
    http: reqwest::Client,
    keys: RwLock<KeyCache>,
    /// One fetch at a time; others wait for its result.
    refreshing: Mutex<()>,
}

#[derive(Debug, serde::Deserialize)]
struct Claims {}

impl JwtVerifier {
    pub async fn verify(&self, token: &str) -> Result<(), ApiError> {
        let unauthorized =
            |why: &str| ApiError::Unauthorized(format!("The bearer token is not valid: {why}."));
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| unauthorized("it is not a JWT"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(unauthorized("only RS256 and ES256 are accepted"));
        }
        let kid = header
            .kid
            .ok_or_else(|| unauthorized("it names no key (kid)"))?;
        let (key, alg) = self
            .key(&kid)
            .await?
            .ok_or_else(|| unauthorized("it is signed with an unknown key"))?;
        if alg != header.alg {
            return Err(unauthorized("its algorithm does not match its key"));
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map(|_| ())
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => unauthorized("it has expired"),
                    K::ImmatureSignature => unauthorized("it is not valid yet"),
                    K::InvalidIssuer => unauthorized("its issuer is not accepted"),
                    K::InvalidAudience => unauthorized("its audience is not this API"),
                    K::InvalidSignature => unauthorized("its signature does not verify"),
                    K::MissingRequiredClaim(c) => {
                        unauthorized(&format!("it lacks the `{c}` claim"))
                    }
                    _ => unauthorized("it cannot be verified"),
                }
            })
    }

    /// The key for `kid`: from the cache, or after one fetch of the JWKS. Fetches are bounded:
    /// a `kid` still unknown after a fetch is not fetched for again for a while, and there are
    /// at most a few fetches a minute.
    async fn key(&self, kid: &str) -> Result<Option<(DecodingKey, Algorithm)>, ApiError> {
        {
            let cache = self.keys.read().await;
            let fresh = cache.fetched_at.is_some_and(|t| t.elapsed() < MAX_KEY_AGE);
            if let (Some(k), true) = (cache.keys.get(kid), fresh) {
                return Ok(Some(k.clone()));
            }
        }
        let _one_at_a_time = self.refreshing.lock().await;
        {
            let mut cache = self.keys.write().await;
            let fresh = cache.fetched_at.is_some_and(|t| t.elapsed() < MAX_KEY_AGE);
            if let (Some(k), true) = (cache.keys.get(kid), fresh) {
                return Ok(Some(k.clone()));
            }
            cache.unknown.retain(|_, t| t.elapsed() < UNKNOWN_KID_TTL);
            cache
                .fetches
                .retain(|t| t.elapsed() < Duration::from_secs(60));
            let known_unknown = cache.unknown.contains_key(kid);
            let over_budget = cache.fetches.len() >= MAX_FETCHES_PER_MINUTE;
            if known_unknown || over_budget {
                return Ok(cache.keys.get(kid).cloned());
            }
            cache.fetches.push_back(Instant::now());
        }
        match self.fetch().await {
            Ok(keys) => {
                let mut cache = self.keys.write().await;
                cache.keys = keys;
                cache.fetched_at = Some(Instant::now());
                let found = cache.keys.get(kid).cloned();
                if found.is_none() && cache.unknown.len() < MAX_UNKNOWN_KIDS {
                    cache.unknown.insert(kid.to_owned(), Instant::now());
                }
                Ok(found)
            }
            Err(e) => {
                let cache = self.keys.read().await;
                match cache.keys.get(kid) {
                    // A known key keeps working while the identity provider is unreachable.
                    Some(k) => Ok(Some(k.clone())),
                    None => Err(ApiError::Unavailable(format!("cannot fetch the JWKS: {e}"))),
                }
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
        let set: JwkSet = self
            .http
            .get(&self.jwks_url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                _ => continue,
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid, (key, alg));
            }
        }
        tracing::info!(event = "jwks_fetched", keys = keys.len(), url = %self.jwks_url, "Fetched the signing keys of the JWKS");
        Ok(keys)
    }
}

/// Middleware: every request it guards must pass the authenticator.
pub async fn require(
    State(auth): State<Arc<Authenticator>>,
    request: Request,
    next: Next,
) -> Response {
    match auth.check(request.headers()).await {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().expect("header"));
        h
    }

    #[tokio::test]
    async fn static_tokens_are_checked_by_their_digest() {
        let digest = hex::encode(Sha256::digest(b"s3cret-token"));
        let cfg = AuthConfig {
            mode: AuthMode::Tokens,
            token_hashes: vec![digest],
            ..AuthConfig::default()
        };
        let auth = Authenticator::from_config(&cfg, reqwest::Client::new());
        assert!(auth.check(&headers("Bearer s3cret-token")).await.is_ok());
        assert!(matches!(
            auth.check(&headers("Bearer wrong")).await,
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            auth.check(&headers("Basic abc")).await,
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            auth.check(&HeaderMap::new()).await,
            Err(ApiError::Unauthorized(_))
        ));
    }
}
