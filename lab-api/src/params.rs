//! Strict reading of path and query parameters: unknown names, repeats and bad values are 400s.
//! Each rule is written once here; the OpenAPI document states the same rules through the
//! schema types below.

use std::collections::HashMap;

use shared::record::LabState;
use utoipa::ToSchema;

use crate::problem::ApiError;

/// A worker or lab id: UUIDs in practice; letters, digits and `-_.:`, 1 to 128 characters.
#[derive(Debug, ToSchema)]
#[schema(
    example = "0f3c2b9e-5a41-4d5e-9b7e-2c1a9e0d7f10",
    pattern = r"^[A-Za-z0-9._:-]{1,128}$"
)]
pub struct Id(pub String);

/// How long to wait for an outcome: whole seconds (`10` or `10s`), at most 30.
#[derive(Debug, ToSchema)]
#[schema(example = "10s", pattern = r"^(30|[12]?[0-9])s?$")]
pub struct Wait(pub String);

/// An AWS region name such as `us-east-1`.
#[derive(Debug, ToSchema)]
#[schema(example = "us-east-1", pattern = r"^[a-z0-9-]{1,32}$")]
pub struct Region(pub String);

/// A CML username: 1 to 64 characters, no control characters.
#[derive(Debug, ToSchema)]
#[schema(example = "alice", pattern = r"^[^\u0000-\u001f\u007f]{1,64}$")]
pub struct Username(pub String);

/// The `next_cursor` of the previous page (opaque).
#[derive(Debug, ToSchema)]
#[schema(pattern = r"^[A-Za-z0-9_-]{1,1024}$")]
pub struct Cursor(pub String);

const ID_MAX: usize = 128;

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

/// Checks a worker or lab id (see [`Id`]).
pub fn id<'a>(param: &str, value: &'a str) -> Result<&'a str, ApiError> {
    let ok = !value.is_empty()
        && value.len() <= ID_MAX
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(value)
    } else {
        Err(ApiError::bad(
            param,
            "must be 1–128 letters, digits or -_.: characters",
        ))
    }
}

/// Checks a region name (see [`Region`]) given as `param`.
pub fn region<'a>(param: &str, value: &'a str) -> Result<&'a str, ApiError> {
    let ok = !value.is_empty()
        && value.len() <= 32
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(value)
    } else {
        Err(ApiError::bad(
            param,
            "must be a region name such as us-east-1",
        ))
    }
}

pub fn boolean(params: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    Ok(optional_boolean(params, name)?.unwrap_or(false))
}

/// A boolean filter: absent means "either".
pub fn optional_boolean(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<Option<bool>, ApiError> {
    match params.get(name).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(ApiError::bad(name, "must be true or false")),
    }
}

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

pub fn limit(params: &HashMap<String, String>) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad(
                "limit",
                format!("must be a whole number from 1 to {MAX_LIMIT}"),
            )),
        },
    }
}

/// A lab state filter: CML's lab states only.
pub fn state(params: &HashMap<String, String>) -> Result<Option<LabState>, ApiError> {
    params
        .get("state")
        .map(|s| {
            s.parse()
                .map_err(|_| ApiError::bad("state", format!("must be {}", LabState::list())))
        })
        .transpose()
}

/// Checks a username filter (see [`Username`]).
pub fn username(params: &HashMap<String, String>) -> Result<Option<String>, ApiError> {
    match params.get("owner_username") {
        None => Ok(None),
        Some(u) if !u.is_empty() && u.chars().count() <= 64 && !u.chars().any(char::is_control) => {
            Ok(Some(u.clone()))
        }
        Some(_) => Err(ApiError::bad(
            "owner_username",
            "must be 1–64 characters without control characters",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        assert!(query(Some("limit=5"), &["limit"]).is_ok());
        let e = query(Some("limt=5"), &["limit"]).expect_err("unknown");
        assert!(matches!(e, ApiError::BadRequest { ref param, .. } if param == "limt"));
        assert!(query(Some("limit=5&limit=6"), &["limit"]).is_err());
        assert!(query(Some("x=1"), &[]).is_err());
        assert!(query(None, &[]).expect("empty").is_empty());
    }

    #[test]
    fn ids_limits_and_states_are_checked() {
        assert!(id("worker_id", "0f3c-9a_b.c:d").is_ok());
        for bad in ["", "a/b", "{\"$ne\":1}", "a b", &"x".repeat(129)] {
            assert!(id("worker_id", bad).is_err(), "{bad}");
        }
        let p = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        assert_eq!(limit(&HashMap::new()).ok(), Some(100));
        assert_eq!(limit(&p("limit", "1000")).ok(), Some(1000));
        for bad in ["0", "1001", "-1", "ten", ""] {
            assert!(limit(&p("limit", bad)).is_err(), "{bad}");
        }
        assert!(state(&p("state", "BOOTED")).is_err());
        assert!(boolean(&p("include_removed", "yes"), "include_removed").is_err());
        assert!(username(&p("owner_username", "")).is_err());
        assert!(region("r", "us-east-1").is_ok() && region("r", "US_EAST").is_err());
        assert_eq!(
            state(&p("state", "STARTED")).ok(),
            Some(Some(LabState::Started))
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
