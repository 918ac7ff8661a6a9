//! Humane durations in configuration: `"30m"`, `"10s"`, `"7d"` (or a bare number of seconds).

use std::{fmt, str::FromStr, time::Duration};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A [`Duration`] read from and written as humane text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<u64>() {
            return Ok(Self::from_secs(secs));
        }
        humantime::parse_duration(s)
            .map(Self)
            .map_err(|e| format!("`{s}` is not a duration like \"30s\", \"10m\" or \"7d\" ({e})"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"10m\" or \"7d\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration::from_secs(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(HumanDuration::from_secs)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humane_units() {
        assert_eq!(
            "30m".parse::<HumanDuration>(),
            Ok(HumanDuration::from_secs(1800))
        );
        assert_eq!(
            "7d".parse::<HumanDuration>(),
            Ok(HumanDuration::from_secs(7 * 86400))
        );
        assert_eq!(
            "10s".parse::<HumanDuration>(),
            Ok(HumanDuration::from_secs(10))
        );
        assert_eq!(
            "45".parse::<HumanDuration>(),
            Ok(HumanDuration::from_secs(45))
        );
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn displays_in_the_same_form_it_parses() {
        let d = HumanDuration::from_secs(90);
        assert_eq!(d.to_string().parse::<HumanDuration>(), Ok(d));
    }
}
