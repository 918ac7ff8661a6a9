//! Strict reading of path and query parameters: unknown names, repeats and bad values are 400s
//! naming the parameter. Each endpoint declares its query parameters once, as a struct
//! (`Deserialize` for reading, `IntoParams` for the OpenAPI document) read by [`Query`]; each
//! value's rule is written once, in its type here, whose schema states the same rule.

use std::{
    any::TypeId,
    collections::HashMap,
    sync::{OnceLock, RwLock},
    time::Duration,
};

use axum::{extract::FromRequestParts, http::request::Parts};
use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use shared::record::LabState;
use utoipa::{openapi::path::ParameterIn, IntoParams, ToSchema};

use crate::problem::ApiError;

const ID_MAX: usize = 128;
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// The longest a caller may wait for an outcome.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// A query string read into `T`: names `T` does not declare and repeated names are refused,
/// then each value is read by its field's type; every refusal is a 400 naming the parameter.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + IntoParams + 'static> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse(parts.uri.query()).map(Query)
    }
}

/// Reads `raw` (a query string) into `T` as [`Query`] does.
pub fn parse<T: DeserializeOwned + IntoParams + 'static>(raw: Option<&str>) -> Result<T, ApiError> {
    let names = names::<T>();
    let pairs = query(raw, names)?;
    let object: serde_json::Map<String, serde_json::Value> = pairs
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    serde_path_to_error::deserialize(serde_json::Value::Object(object)).map_err(|e| {
        let param = e.path().to_string();
        ApiError::bad(&param, e.into_inner().to_string())
    })
}

/// The names `T` declares, read from its `IntoParams` once per type.
fn names<T: IntoParams + 'static>() -> &'static [&'static str] {
    static NAMES: OnceLock<RwLock<HashMap<TypeId, &'static [&'static str]>>> = OnceLock::new();
    let cache = NAMES.get_or_init(RwLock::default);
    let key = TypeId::of::<T>();
    if let Some(names) = cache.read().ok().and_then(|c| c.get(&key).copied()) {
        return names;
    }
    let declared: Vec<&'static str> = T::into_params(|| Some(ParameterIn::Query))
        .into_iter()
        .map(|p| &*Box::leak(p.name.into_boxed_str()))
        .collect();
    let mut cache = cache
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Leaked once per type (a handful of endpoints), not per request.
    cache
        .entry(key)
        .or_insert_with(|| Box::leak(declared.into_boxed_slice()))
}

/// The query string as name → value, refusing names not in `allowed` and repeated names.
pub fn query(raw: Option<&str>, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|_| ApiError::bad("query", "is not a valid query string"))?;
    let mut out = HashMap::new();
    for (name, value) in pairs {
        if !allowed.contains(&name.as_str()) {
            let hint = if allowed.is_empty() {
                "this endpoint takes no query parameters".to_owned()
            } else {
                format!("allowed: {}", allowed.join(", "))
            };
            return Err(ApiError::bad(
                &name,
                format!("is not a known parameter ({hint})"),
            ));
        }
        if out.insert(name.clone(), value).is_some() {
            return Err(ApiError::bad(&name, "is given more than once"));
        }
    }
    Ok(out)
}

/// Reads a string and checks it with `check`, whose error is the 400's detail.
fn checked<'de, D: Deserializer<'de>, T>(
    d: D,
    check: impl FnOnce(String) -> Result<T, &'static str>,
) -> Result<T, D::Error> {
    check(String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// A worker or lab id: UUIDs in practice; letters, digits and `-_.:`, 1 to 128 characters.
#[derive(Debug, Clone, PartialEq, Eq, ToSchema)]
#[schema(
    value_type = String,
    example = "0f3c2b9e-5a41-4d5e-9b7e-2c1a9e0d7f10",
    pattern = r"^[A-Za-z0-9._:-]{1,128}$"
)]
pub struct Id(pub String);

const ID_RULE: &str = "must be 1–128 letters, digits or -_.: characters";

impl Id {
    fn check(value: String) -> Result<Self, &'static str> {
        let ok = !value.is_empty()
            && value.len() <= ID_MAX
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if ok {
            Ok(Self(value))
        } else {
            Err(ID_RULE)
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, Self::check)
    }
}

/// Checks a worker or lab id given in the path as `param` (see [`Id`]).
pub fn id<'a>(param: &str, value: &'a str) -> Result<&'a str, ApiError> {
    Id::check(value.to_owned())
        .map(|_| value)
        .map_err(|rule| ApiError::bad(param, rule))
}

/// How long to wait for an outcome: whole seconds (`10` or `10s`), at most 30.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ToSchema)]
#[schema(value_type = String, example = "10s", pattern = r"^(30|[12]?[0-9])s?$")]
pub struct Wait(pub Duration);

impl<'de> Deserialize<'de> for Wait {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |v| {
            let digits = v.strip_suffix('s').unwrap_or(&v);
            digits
                .parse::<u64>()
                .ok()
                .filter(|secs| *secs <= MAX_WAIT.as_secs() && secs.to_string() == digits)
                .map(|secs| Wait(Duration::from_secs(secs)))
                .ok_or("must be whole seconds from 0 to 30, such as 10s")
        })
    }
}

/// An AWS region name such as `us-east-1`.
#[derive(Debug, Clone, PartialEq, Eq, ToSchema)]
#[schema(value_type = String, example = "us-east-1", pattern = r"^[a-z0-9-]{1,32}$")]
pub struct Region(pub String);

impl Region {
    fn check(value: String) -> Result<Self, &'static str> {
        let ok = !value.is_empty()
            && value.len() <= 32
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(Self(value))
        } else {
            Err("must be a region name such as us-east-1")
        }
    }
}

impl<'de> Deserialize<'de> for Region {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, Self::check)
    }
}

/// Checks a region name given in the path as `param` (see [`Region`]).
pub fn region<'a>(param: &str, value: &'a str) -> Result<&'a str, ApiError> {
    Region::check(value.to_owned())
        .map(|_| value)
        .map_err(|rule| ApiError::bad(param, rule))
}

/// A CML username: 1 to 64 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, ToSchema)]
#[schema(value_type = String, example = "alice", pattern = r"^[^\u0000-\u001f\u007f]{1,64}$")]
pub struct Username(pub String);

impl<'de> Deserialize<'de> for Username {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |u| {
            if !u.is_empty() && u.chars().count() <= 64 && !u.chars().any(char::is_control) {
                Ok(Username(u))
            } else {
                Err("must be 1–64 characters without control characters")
            }
        })
    }
}

/// The `next_cursor` of the previous page (opaque); whether this API issued it is checked by
/// the endpoint that decodes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[schema(value_type = String, pattern = r"^[A-Za-z0-9_-]{1,1024}$")]
pub struct Cursor(pub String);

/// `true` or `false`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |v| match v.as_str() {
            "true" => Ok(Flag(true)),
            "false" => Ok(Flag(false)),
            _ => Err("must be true or false"),
        })
    }
}

/// A page size, 1 to [`MAX_LIMIT`] (default [`DEFAULT_LIMIT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub usize);

impl Default for Limit {
    fn default() -> Self {
        Self(DEFAULT_LIMIT)
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(Limit(n)),
            _ => Err(serde::de::Error::custom(format!(
                "must be a whole number from 1 to {MAX_LIMIT}"
            ))),
        }
    }
}

/// A lab state filter: CML's lab states only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State(pub LabState);

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        v.parse()
            .map(State)
            .map_err(|_| serde::de::Error::custom(format!("must be {}", LabState::list())))
    }
}

/// An event-stream watch state filter: [`shared::status::WATCH_STATES`] only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchState(pub &'static str);

impl<'de> Deserialize<'de> for WatchState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        shared::status::WATCH_STATES
            .into_iter()
            .find(|s| *s == v)
            .map(WatchState)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "must be {}",
                    shared::status::WATCH_STATES.join(", ")
                ))
            })
    }
}

/// Endpoints without query parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NoQuery {}

/// A worker's labs.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WorkerLabsQuery {
    /// Also list labs that vanished from CML
    #[serde(default)]
    #[param(value_type = Option<bool>)]
    pub include_removed: Flag,
}

/// Labs across the fleet.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FleetLabsQuery {
    /// Only labs in this state
    #[param(value_type = Option<LabState>)]
    pub state: Option<State>,
    /// Only this owner's labs
    #[param(value_type = Option<Username>)]
    pub owner_username: Option<Username>,
    /// Only this worker's labs
    #[param(value_type = Option<Id>)]
    pub worker_id: Option<Id>,
    /// Also list labs that vanished from CML
    #[serde(default)]
    #[param(value_type = Option<bool>)]
    pub include_removed: Flag,
    /// Page size, 1–1000 (default 100)
    #[serde(default)]
    #[param(value_type = Option<usize>, minimum = 1, maximum = 1000)]
    pub limit: Limit,
    /// `next_cursor` of the previous page (opaque)
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<Cursor>,
}

/// The fleet view.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FleetStatusQuery {
    /// Only workers without a success for more than two sync intervals (or never), or only the others
    #[param(value_type = Option<bool>)]
    pub stale: Option<Flag>,
    /// Only workers whose last sync failed, or only the others
    #[param(value_type = Option<bool>)]
    pub failing: Option<Flag>,
    /// Only workers of this AWS region
    #[param(value_type = Option<Region>)]
    pub region: Option<Region>,
    /// Only workers whose CML event-stream watch is in this state: live, connecting, polling
    /// (no stream: synced by the periodic cycle) or failing
    #[param(value_type = Option<String>, pattern = "^(live|connecting|polling|failing)$")]
    pub watch_state: Option<WatchState>,
    /// Page size, 1–1000 (default 100)
    #[serde(default)]
    #[param(value_type = Option<usize>, minimum = 1, maximum = 1000)]
    pub limit: Limit,
    /// `next_cursor` of the previous page (opaque)
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<Cursor>,
}

/// The live event stream's filter (each a comma-separated list).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventStreamQuery {
    /// Only events of these workers (comma-separated ids, at most 1000)
    pub worker_ids: Option<String>,
    /// Only these events (comma-separated: worker.labs.updated, worker.data.refreshed, worker.sync.failed, worker.refresh.throttled); connected, heartbeat and reset always come
    pub event_types: Option<String>,
}

/// Endpoints that can wait for a refresh's outcome.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to this many seconds for the outcome (`10` or `10s`; at most 30)
    #[serde(default)]
    #[param(value_type = Option<Wait>)]
    pub wait: Wait,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad<T: DeserializeOwned + IntoParams + std::fmt::Debug + 'static>(
        raw: &str,
    ) -> (String, String) {
        match parse::<T>(Some(raw)).expect_err(raw) {
            ApiError::BadRequest { param, detail } => (param, detail),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        assert!(query(Some("limit=5"), &["limit"]).is_ok());
        let e = query(Some("limt=5"), &["limit"]).expect_err("unknown");
        assert!(matches!(e, ApiError::BadRequest { ref param, .. } if param == "limt"));
        assert!(query(Some("limit=5&limit=6"), &["limit"]).is_err());
        assert!(query(Some("x=1"), &[]).is_err());
        assert!(query(None, &[]).expect("empty").is_empty());
        // Through a struct: its own fields are the allowed names.
        let (param, detail) = bad::<FleetLabsQuery>("limt=5");
        assert_eq!(param, "limt");
        assert_eq!(
            detail,
            "is not a known parameter (allowed: state, owner_username, worker_id, include_removed, limit, cursor)"
        );
        assert_eq!(
            bad::<FleetLabsQuery>("limit=5&limit=6").1,
            "is given more than once"
        );
        assert_eq!(
            bad::<NoQuery>("x=1").1,
            "is not a known parameter (this endpoint takes no query parameters)"
        );
    }

    #[test]
    fn each_value_is_checked_by_its_type_and_the_400_names_it() {
        let q: FleetLabsQuery = parse(None).expect("defaults");
        assert_eq!(
            (q.limit, q.include_removed, q.state),
            (Limit(100), Flag(false), None)
        );
        let q: FleetLabsQuery = parse(Some(
            "limit=1000&state=STARTED&include_removed=true&owner_username=al%20ice",
        ))
        .expect("reads");
        assert_eq!(q.limit, Limit(1000));
        assert_eq!(q.state, Some(State(LabState::Started)));
        assert_eq!(q.owner_username, Some(Username("al ice".into())));
        for bad_limit in ["0", "1001", "-1", "ten", ""] {
            assert_eq!(
                bad::<FleetLabsQuery>(&format!("limit={bad_limit}")),
                (
                    "limit".to_owned(),
                    "must be a whole number from 1 to 1000".to_owned()
                )
            );
        }
        assert_eq!(bad::<FleetLabsQuery>("state=BOOTED").0, "state");
        assert_eq!(
            bad::<WorkerLabsQuery>("include_removed=yes"),
            (
                "include_removed".to_owned(),
                "must be true or false".to_owned()
            )
        );
        assert_eq!(bad::<FleetLabsQuery>("owner_username=").0, "owner_username");
        assert_eq!(bad::<FleetLabsQuery>("worker_id=a%2Fb").1, ID_RULE);
        assert_eq!(bad::<FleetStatusQuery>("region=US_EAST").0, "region");
        assert_eq!(bad::<FleetStatusQuery>("watch_state=dead").0, "watch_state");
        let q: FleetStatusQuery = parse(Some("stale=false")).expect("reads");
        assert_eq!((q.stale, q.failing), (Some(Flag(false)), None));
        assert!(region("r", "us-east-1").is_ok() && region("r", "US_EAST").is_err());
    }

    #[test]
    fn waits_are_whole_seconds_up_to_thirty() {
        let wait = |raw: &str| parse::<WaitQuery>(Some(raw)).map(|q| q.wait.0);
        assert_eq!(wait("wait=10").ok(), Some(Duration::from_secs(10)));
        assert_eq!(wait("wait=30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(wait("wait=7").ok(), Some(Duration::from_secs(7)));
        assert_eq!(wait("wait=30s").ok(), Some(MAX_WAIT));
        assert_eq!(wait("wait=0").ok(), Some(Duration::ZERO));
        for bad in [
            "31s", "1h", "soon", "-1", "05", "+5", "5ss", "s", "", "1.5s", "30000ms", "010",
        ] {
            assert!(wait(&format!("wait={bad}")).is_err(), "{bad}");
        }
        assert_eq!(
            parse::<WaitQuery>(None).expect("none").wait,
            Wait::default()
        );
    }

    /// The document states the rule `id` checks.
    #[test]
    fn the_id_schema_states_the_rule_the_validator_checks() {
        let schema = serde_json::to_value(<Id as utoipa::PartialSchema>::schema()).expect("json");
        let pattern = schema["pattern"].as_str().expect("a pattern");
        assert_eq!(pattern, format!("^[A-Za-z0-9._:-]{{1,{ID_MAX}}}$"));
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._:-".contains(c);
        for c in (0u8..=127).map(char::from) {
            assert_eq!(id("x", &c.to_string()).is_ok(), allowed(c), "{c:?}");
        }
        assert!(id("x", &"a".repeat(ID_MAX)).is_ok());
        assert!(id("x", &"a".repeat(ID_MAX + 1)).is_err());
    }
}
