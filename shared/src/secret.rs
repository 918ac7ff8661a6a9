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
///
/// Credentials run from `://` to the *last* `@`: a password may hold `/`, `?`, `:` or `@`
/// (rightly percent-encoded or not), so nothing before that `@` is shown. A host whose port is
/// not a number may be part of a password typed without its user or host: then nothing after
/// the scheme is shown.
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return REDACTED.to_owned();
    };
    let (scheme, rest) = (&uri[..scheme_end], &uri[scheme_end + 3..]);
    let (credentials, after) = match rest.rfind('@') {
        Some(at) => ("***@", &rest[at + 1..]),
        None => ("", rest),
    };
    let authority_end = after.find(['/', '?']).unwrap_or(after.len());
    let (hosts, tail) = after.split_at(authority_end);
    if !hosts.split(',').all(plain_host) {
        return format!("{scheme}://***");
    }
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
    format!("{scheme}://{credentials}{hosts}{tail}")
}

/// `host`, `host:27017`, `[::1]:27017`: no room for a secret.
fn plain_host(host: &str) -> bool {
    let port = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((_, rest)) => rest.strip_prefix(':'),
            None => return false,
        },
        None => host.split_once(':').map(|(_, port)| port),
    };
    port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// `text` (a driver's error message, say) with every form of the URI's secrets replaced:
/// the URI itself, its credentials, its password raw and percent-decoded, and the pieces of
/// each. When the hosts are not plain (a password with an `@` in it, typed unencoded), all
/// that follows the scheme counts as secret.
pub fn scrub(text: &str, uri: &str) -> String {
    const SEPARATORS: [char; 5] = ['/', '?', '@', ':', ','];
    let mut out = text.replace(uri, &redact_uri(uri));
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let mut secrets: Vec<String> = Vec::new();
    if let Some(at) = rest.rfind('@') {
        let credentials = &rest[..at];
        let password = credentials.split_once(':').map_or("", |(_, p)| p);
        secrets.extend([
            credentials.to_owned(),
            password.to_owned(),
            percent_decode(password),
        ]);
    }
    let after = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
    let hosts = &after[..after.find(['/', '?']).unwrap_or(after.len())];
    if !hosts.split(',').all(plain_host) {
        secrets.push(rest.to_owned());
    }
    let pieces: Vec<String> = secrets
        .iter()
        .flat_map(|s| s.split(SEPARATORS).map(str::to_owned).collect::<Vec<_>>())
        .collect();
    secrets.extend(pieces);
    // Short pieces would mangle the message and tell little; the longest go first, so a part
    // never leaves the rest of a longer one behind.
    secrets.retain(|s| s.chars().count() >= 3);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    for secret in secrets {
        out = out.replace(&secret, "***");
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|&b| hex(b)),
            bytes.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

    /// Passwords with `/ ? @ : %` in them, typed as they are or percent-encoded.
    const AWKWARD: [&str; 6] = [
        "Mongo/S3CR?et",
        "p@ss:w/rd?x=1",
        "50%off/now",
        "a:b:c@d",
        "Mongo%2FS3CR%3Fet",
        "sl/ash",
    ];

    #[test]
    fn passwords_with_separators_in_them_never_show() {
        for pw in AWKWARD {
            for uri in [
                format!("mongodb://user:{pw}@db1:27017,db2/?replicaSet=rs0"),
                format!("mongodb+srv://user:{pw}@cluster.example/app"),
                format!("mongodb://user:{pw}@host"),
            ] {
                let shown = redact_uri(&uri);
                assert!(!shown.contains(pw), "{uri} -> {shown}");
                for part in pw.split(['/', '?', '@', ':']).filter(|p| p.len() > 2) {
                    assert!(!shown.contains(part), "{uri} -> {shown} shows {part}");
                }
                assert!(shown.contains("***@"), "{shown}");
            }
            // Typed without its host: no part of the password shows either.
            let shown = redact_uri(&format!("mongodb://user:{pw}"));
            for part in pw.split(['/', '?', '@', ':']).filter(|p| p.len() > 1) {
                assert!(!shown.contains(part), "{pw} -> {shown} shows {part}");
            }
        }
        assert_eq!(
            redact_uri("mongodb://[::1]:27017/db"),
            "mongodb://[::1]:27017/db"
        );
        assert_eq!(
            redact_uri("mongodb://h1,h2:27018/"),
            "mongodb://h1,h2:27018/"
        );
    }

    #[test]
    fn a_password_that_looks_like_a_host_is_scrubbed_too() {
        let uri = "mongodb://labuser:p@ss:w0rd/x";
        let message = "invalid server address ss:w0rd: the port must be an integer, got w0rd";
        let clean = scrub(message, uri);
        assert!(!clean.contains("w0rd"), "{clean}");
        assert!(clean.contains("invalid server address"), "{clean}");
    }

    #[test]
    fn driver_messages_are_scrubbed_of_every_form_of_the_password() {
        let uri = "mongodb://user:Mongo%2FS3CR%3Fet@host/";
        let message = format!(
            "invalid URI {uri}: password Mongo%2FS3CR%3Fet (decoded Mongo/S3CR?et) is wrong for user:Mongo%2FS3CR%3Fet"
        );
        let clean = scrub(&message, uri);
        for secret in ["Mongo%2FS3CR%3Fet", "Mongo/S3CR?et", "S3CR"] {
            assert!(!clean.contains(secret), "{clean}");
        }
        assert!(clean.contains("mongodb://***@host/"), "{clean}");
    }
}
