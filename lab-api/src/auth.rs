//! Who may read: bearer JWTs verified against the identity provider's JWKS (RS256, ES256),
//! static API tokens stored as SHA-256 digests, or nobody checked at all (`mode = "none"`).
//! The credential comes from the `Authorization: Bearer` header or, when
//! `api.auth.cookie_name` is set, from that cookie (what a browser's `EventSource` and a UI
//! behind the same ingress send).
//!
//! The key set is kept fresh in the background; a request never waits for the identity
//! provider when it carries a known key, and an unknown key costs at most one fetch per short
//! period however many arrive.
//!
//! A checked credential says who the caller is ([`Caller`]): a JWT by its claims
//! (`api.access.username_claim`, and `admin_claim` holding one of `admin_values` for an admin
//! of the fleet), a static token by the holder it names (`api.auth.tokens`; those of
//! `api.auth.token_hashes` are the fleet's admins). Under `api.access.mode = "open"` or
//! `api.auth.mode = "none"` nobody's identity is asked: every caller sees everything.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock, Weak},
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
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use shared::{
    access::{plausible_username, Identity},
    config::{AccessConfig, AccessMode, AuthConfig, AuthMode},
};
use tokio::sync::watch;

use crate::{
    logs::{JwksFetchFailed, JwksFetched, LogLine},
    problem::ApiError,
};

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// When the key set is fetched again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksPolicy {
    /// A token naming a key not in the set triggers a fetch, at most once per this period,
    /// whatever tokens arrive (a flood of made-up key ids costs one fetch a period).
    pub min_refresh_interval: Duration,
    /// How long a request whose key is unknown waits for a fetch in flight.
    pub max_wait: Duration,
    /// The set is fetched in the background this often, so keys are fresh before they are
    /// needed and requests with known keys never wait for the identity provider.
    pub refresh_every: Duration,
    /// After a failed background fetch, the next one is tried this much later.
    pub retry_after_failure: Duration,
}

impl Default for JwksPolicy {
    fn default() -> Self {
        Self {
            min_refresh_interval: Duration::from_secs(5),
            max_wait: Duration::from_secs(2),
            refresh_every: Duration::from_secs(300),
            retry_after_failure: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
pub struct Authenticator {
    scheme: Scheme,
    /// The cookie that may carry the credential when no `Authorization` header does.
    cookie: Option<String>,
    /// Whether callers see what CML shows them (`cml`), or everything (`open`).
    access: AccessMode,
    claims: ClaimNames,
}

#[derive(Debug)]
enum Scheme {
    None,
    Tokens(Vec<([u8; 32], Identity)>),
    Jwt(Arc<JwtVerifier>),
}

/// Who made a request, as its credential says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Access is open (`api.access.mode = "open"`, or no authentication): sees everything.
    Anyone,
    /// A checked identity: sees what CML shows it.
    Known(Identity),
}

/// The claims a JWT names its holder with.
#[derive(Debug, Clone)]
struct ClaimNames {
    username: String,
    admin_path: Vec<String>,
    admin_values: Vec<String>,
}

impl Authenticator {
    pub fn from_config(cfg: &AuthConfig, access: &AccessConfig, http: reqwest::Client) -> Self {
        Self::with_policy(cfg, access, http, JwksPolicy::default())
    }

    /// [`Authenticator::from_config`] with a key-refresh policy of the caller's (tests).
    pub fn with_policy(
        cfg: &AuthConfig,
        access: &AccessConfig,
        http: reqwest::Client,
        policy: JwksPolicy,
    ) -> Self {
        let digest = |h: &str| -> Option<[u8; 32]> { hex::decode(h).ok()?.try_into().ok() };
        let admin = || Identity {
            username: String::new(),
            fleet_admin: true,
        };
        let scheme = match cfg.mode {
            AuthMode::None => Scheme::None,
            AuthMode::Tokens => Scheme::Tokens(
                cfg.token_hashes
                    .iter()
                    .filter_map(|h| Some((digest(h)?, admin())))
                    .chain(cfg.tokens.iter().filter_map(|t| {
                        let who = Identity {
                            username: t.username.clone(),
                            fleet_admin: t.admin,
                        };
                        Some((digest(&t.sha256)?, who))
                    }))
                    .collect(),
            ),
            AuthMode::Jwt => Scheme::Jwt(JwtVerifier::start(cfg, http, policy)),
        };
        let cookie = Some(cfg.cookie_name.clone()).filter(|c| !c.is_empty());
        Self {
            scheme,
            cookie,
            access: access.mode,
            claims: ClaimNames {
                username: access.username_claim.clone(),
                admin_path: access.admin_claim.split('.').map(str::to_owned).collect(),
                admin_values: access.admin_values.clone(),
            },
        }
    }

    /// Whether access follows CML (the mode lab-api logs at start).
    pub fn access_mode(&self) -> AccessMode {
        match self.scheme {
            Scheme::None => AccessMode::Open,
            _ => self.access,
        }
    }

    /// Checks the request's credential (its `Authorization` header, or else its cookie) and
    /// says who the caller is.
    pub async fn check(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let identity = match &self.scheme {
            Scheme::None => return Ok(Caller::Anyone),
            Scheme::Tokens(tokens) => {
                let token = self.credential(headers)?;
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                // Every digest is compared, so the time taken says nothing of which matched.
                let mut found = None;
                for (hash, who) in tokens {
                    if constant_time_eq(hash, &digest) {
                        found = Some(who);
                    }
                }
                found
                    .cloned()
                    .ok_or_else(|| ApiError::Unauthorized("The API token is not valid.".into()))?
            }
            Scheme::Jwt(v) => {
                let claims = v.verify(self.credential(headers)?).await?;
                if self.access == AccessMode::Open {
                    return Ok(Caller::Anyone);
                }
                self.identity(&claims)?
            }
        };
        Ok(match self.access {
            AccessMode::Open => Caller::Anyone,
            AccessMode::Cml => Caller::Known(identity),
        })
    }

    /// Who a verified token's claims name: its username claim (a short string, required) and
    /// whether its admin claim holds an admin value.
    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, ApiError> {
        let names = &self.claims;
        let username = match claims.get(&names.username) {
            Some(Value::String(u)) if plausible_username(u) => u.clone(),
            _ => {
                return Err(ApiError::Forbidden(format!(
                "The token's `{}` claim must name a CML user (a string of 1 to 256 characters).",
                names.username
            )))
            }
        };
        let mut at = claims.get(&names.admin_path[0]);
        for part in &names.admin_path[1..] {
            at = at.and_then(|v| v.get(part));
        }
        let is_admin = |v: &Value| {
            v.as_str()
                .is_some_and(|s| names.admin_values.iter().any(|a| a == s))
        };
        let fleet_admin = match at {
            Some(Value::Array(items)) => items.iter().any(is_admin),
            Some(v) => is_admin(v),
            None => false,
        };
        Ok(Identity {
            username,
            fleet_admin,
        })
    }

    /// The token of the `Authorization` header when there is one (it must be well formed),
    /// else the configured cookie's value.
    fn credential<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, ApiError> {
        if headers.contains_key(header::AUTHORIZATION) {
            return bearer(headers);
        }
        let missing = || match &self.cookie {
            Some(name) => ApiError::Unauthorized(format!(
                "An `Authorization: Bearer <token>` header or the `{name}` cookie is required."
            )),
            None => ApiError::Unauthorized(
                "An `Authorization: Bearer <token>` header is required.".into(),
            ),
        };
        let name = self.cookie.as_deref().ok_or_else(missing)?;
        cookie(headers, name).ok_or_else(missing)
    }
}

/// The non-empty value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
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

type Keys = HashMap<String, (DecodingKey, Algorithm)>;

/// The last fetch of the key set: when it started, whether one runs, how it ended.
#[derive(Debug, Default)]
struct Fetching {
    last_start: Option<Instant>,
    running: bool,
    last_error: Option<String>,
}

/// Verifies bearer JWTs against a JWKS. Keys are read without waiting; fetches run one at a
/// time, in the background on a timer, and at most once per short period on demand.
pub struct JwtVerifier {
    jwks_url: String,
    issuer: String,
    audience: String,
    http: reqwest::Client,
    policy: JwksPolicy,
    keys: RwLock<Keys>,
    fetching: Mutex<Fetching>,
    /// Bumped when a fetch ends; waiters watch it.
    fetched: watch::Sender<u64>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self
            .keys
            .read()
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("JwtVerifier")
            .field("jwks_url", &self.jwks_url)
            .field("kids", &kids)
            .finish_non_exhaustive()
    }
}

/// What came of asking for a fetch.
enum Fetched {
    /// A fetch ended (successfully or not) while we waited.
    Ended,
    /// One ran shortly before: not again yet.
    TooSoon,
    /// It did not end within the wait.
    StillRunning,
}

impl JwtVerifier {
    /// Builds the verifier and starts its background refresh (the first fetch at once).
    fn start(cfg: &AuthConfig, http: reqwest::Client, policy: JwksPolicy) -> Arc<Self> {
        let verifier = Arc::new(Self {
            jwks_url: cfg.jwks_url.clone(),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            http,
            policy,
            keys: RwLock::new(HashMap::new()),
            fetching: Mutex::new(Fetching::default()),
            fetched: watch::Sender::new(0),
        });
        tokio::spawn(refresh_in_background(Arc::downgrade(&verifier)));
        verifier
    }

    /// The claims of a token that verifies.
    pub async fn verify(self: &Arc<Self>, token: &str) -> Result<Map<String, Value>, ApiError> {
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
        let (key, alg) = match self.known(&kid) {
            Some(k) => k,
            None => self
                .after_fetch(&kid)
                .await?
                .ok_or_else(|| unauthorized("it is signed with an unknown key"))?,
        };
        if alg != header.alg {
            return Err(unauthorized("its algorithm does not match its key"));
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map(|data| data.claims)
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

    fn known(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        self.keys.read().ok()?.get(kid).cloned()
    }

    /// The key of an unknown `kid` after a fetch, if one may run now (or runs already) and
    /// ends within the wait. 503 when the identity provider cannot be reached.
    async fn after_fetch(
        self: &Arc<Self>,
        kid: &str,
    ) -> Result<Option<(DecodingKey, Algorithm)>, ApiError> {
        let unreachable = |detail: String| ApiError::AuthUnavailable(detail);
        match self.fetch(self.policy.max_wait).await {
            Fetched::Ended | Fetched::TooSoon => match self.known(kid) {
                Some(k) => Ok(Some(k)),
                None => match self.last_error() {
                    Some(e) => Err(unreachable(e)),
                    None => Ok(None),
                },
            },
            Fetched::StillRunning => Err(unreachable("the JWKS did not answer in time".into())),
        }
    }

    fn last_error(&self) -> Option<String> {
        self.fetching.lock().ok()?.last_error.clone()
    }

    /// Starts a fetch unless one ran within the minimum period (one that runs is joined),
    /// then waits up to `wait` for a fetch to end.
    async fn fetch(self: &Arc<Self>, wait: Duration) -> Fetched {
        let mut ended = self.fetched.subscribe();
        let seen = *ended.borrow_and_update();
        {
            let mut f = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            if !f.running {
                if f.last_start
                    .is_some_and(|t| t.elapsed() < self.policy.min_refresh_interval)
                {
                    return Fetched::TooSoon;
                }
                f.running = true;
                f.last_start = Some(Instant::now());
                // On a task of its own: a request that gives up waiting does not cancel it.
                tokio::spawn(self.clone().fetch_and_store());
            }
        }
        let in_time = tokio::time::timeout(wait, ended.wait_for(|n| *n != seen))
            .await
            .is_ok();
        if in_time {
            Fetched::Ended
        } else {
            Fetched::StillRunning
        }
    }

    async fn fetch_and_store(self: Arc<Self>) {
        let result = self.download().await;
        {
            let mut f = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            f.running = false;
            f.last_error = result.as_ref().err().cloned();
        }
        match result {
            Ok(keys) => {
                JwksFetched {
                    keys: keys.len(),
                    url: &self.jwks_url,
                }
                .emit();
                if let Ok(mut current) = self.keys.write() {
                    *current = keys;
                }
            }
            Err(error) => {
                JwksFetchFailed {
                    url: &self.jwks_url,
                    error: &error,
                }
                .emit();
            }
        }
        self.fetched.send_modify(|n| *n += 1);
    }

    async fn download(&self) -> Result<Keys, String> {
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
        Ok(keys)
    }
}

/// Fetches the key set at start and every `refresh_every` (sooner after a failure), for as
/// long as the verifier lives.
async fn refresh_in_background(verifier: Weak<JwtVerifier>) {
    loop {
        let next = {
            let Some(v) = verifier.upgrade() else { return };
            // Waits as long as a fetch may take (the HTTP client bounds it).
            v.fetch(Duration::from_secs(3600)).await;
            if v.last_error().is_some() {
                v.policy.retry_after_failure
            } else {
                v.policy.refresh_every
            }
        };
        tokio::time::sleep(next).await;
    }
}

/// Middleware: every request it guards must pass the authenticator; the [`Caller`] it names
/// goes with the request.
pub async fn require(
    State(auth): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    match auth.check(request.headers()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
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
        let auth =
            Authenticator::from_config(&cfg, &AccessConfig::default(), reqwest::Client::new());
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
        let mut cookie_only = HeaderMap::new();
        cookie_only.insert(header::COOKIE, "session=s3cret-token".parse().expect("c"));
        assert!(
            matches!(
                auth.check(&cookie_only).await,
                Err(ApiError::Unauthorized(_))
            ),
            "cookies are ignored unless api.auth.cookie_name names one"
        );
    }

    #[tokio::test]
    async fn the_configured_cookie_carries_the_token_when_no_header_does() {
        let digest = hex::encode(Sha256::digest(b"s3cret-token"));
        let cfg = AuthConfig {
            mode: AuthMode::Tokens,
            token_hashes: vec![digest],
            cookie_name: "cml_token".into(),
            ..AuthConfig::default()
        };
        let auth =
            Authenticator::from_config(&cfg, &AccessConfig::default(), reqwest::Client::new());
        let with_cookies = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::COOKIE, v.parse().expect("cookie"));
            }
            h
        };
        for ok in [
            &["cml_token=s3cret-token"][..],
            &["theme=dark; cml_token=s3cret-token; lang=en"],
            &["theme=dark", "cml_token=\"s3cret-token\""],
        ] {
            assert!(auth.check(&with_cookies(ok)).await.is_ok(), "{ok:?}");
        }
        for bad in [
            &["cml_token=wrong"][..],
            &["cml_token="],
            &["other_cml_token=s3cret-token"],
            &["xcml_token=s3cret-token; cml_tokenx=s3cret-token"],
        ] {
            assert!(
                matches!(
                    auth.check(&with_cookies(bad)).await,
                    Err(ApiError::Unauthorized(_))
                ),
                "{bad:?}"
            );
        }
        // A header, when present, is the credential: a bad one is not rescued by the cookie.
        let mut both = with_cookies(&["cml_token=s3cret-token"]);
        both.insert(header::AUTHORIZATION, "Bearer wrong".parse().expect("h"));
        assert!(matches!(
            auth.check(&both).await,
            Err(ApiError::Unauthorized(m)) if m.contains("not valid")
        ));
        let Err(ApiError::Unauthorized(m)) = auth.check(&HeaderMap::new()).await else {
            panic!("no credential");
        };
        assert!(m.contains("`cml_token` cookie"), "{m}");
    }
}
