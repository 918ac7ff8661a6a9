//! Secret values (passwords, credentialed URIs, tokens) that cannot be printed or logged by accident.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A string that never shows its value through `Debug`, `Display` or `Serialize`.
///
/// The only way to read it is [`Secret::expose`], which makes every use greppable.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself, for the one place that must hand it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

const REDACTED: &str = "[redacted]";

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("Secret(\"\")")
        } else {
            write!(f, "Secret({REDACTED})")
        }
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { REDACTED })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { REDACTED })
    }
}

/// Accepts any scalar: environment variables are parsed by type, so a numeric password such as
/// `CML_LABS_CML__PASSWORD=123456` arrives as a number and must still become the string "123456".
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_char<E: de::Error>(self, v: char) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A MongoDB connection string with its credentials replaced, safe for logs:
/// `mongodb://user:pw@host/db?authSource=x` becomes `mongodb://***@host/db?authSource=x`.
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return REDACTED.to_owned();
    };
    let rest = &uri[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let hosts = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    // Options such as `authMechanismProperties=AWS_SESSION_TOKEN:...` may carry secrets too.
    let tail = match tail.find('?') {
        Some(q) => {
            let (path, query) = tail.split_at(q);
            let kept: Vec<String> = query[1..]
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("authMechanismProperties") => {
                        format!("{k}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", kept.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{}://{hosts}{tail}", &uri[..scheme_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_display_and_serialize_hide_the_value() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn numbers_and_booleans_deserialize_as_their_text() {
        let s: Secret = serde_json::from_str("123456").expect("number");
        assert_eq!(s.expose(), "123456");
        let s: Secret = serde_json::from_str("true").expect("bool");
        assert_eq!(s.expose(), "true");
    }

    #[test]
    fn uri_credentials_are_removed() {
        assert_eq!(
            redact_uri("mongodb://u:p%40ss@h1:27017,h2/db?authSource=admin"),
            "mongodb://***@h1:27017,h2/db?authSource=admin"
        );
        assert_eq!(
            redact_uri("mongodb://127.0.0.1:27017"),
            "mongodb://127.0.0.1:27017"
        );
        assert_eq!(
            redact_uri(
                "mongodb+srv://a:b@c.example/?authMechanismProperties=AWS_SESSION_TOKEN:xyz"
            ),
            "mongodb+srv://***@c.example/?authMechanismProperties=***"
        );
        assert_eq!(redact_uri("garbage"), "[redacted]");
    }
}
