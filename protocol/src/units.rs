//! Human-friendly quantities in job files and configs: durations ("90s", "10m", or seconds as an
//! integer) and byte sizes ("64MiB", "1GB", or bytes as an integer).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration with whole-second resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub u64);

/// A size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

/// A quantity that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("bad duration {0:?} (examples: 90, \"90s\", \"10m\", \"2h\")")]
    Duration(String),
    #[error("bad size {0:?} (examples: 1048576, \"512KiB\", \"64MiB\", \"1GB\")")]
    Size(String),
}

/// How long before `now_ms` the time `then_ms` was (both unix milliseconds), for people:
/// `12s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

impl Seconds {
    /// As a std duration.
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl FromStr for Seconds {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(n) = t.parse::<u64>() {
            return Ok(Self(n));
        }
        humantime::parse_duration(t)
            .map(|d| Self(d.as_secs()))
            .map_err(|_| UnitError::Duration(s.chars().take(40).collect()))
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.as_duration()))
    }
}

impl FromStr for Bytes {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnitError::Size(s.chars().take(40).collect());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "k" | "K" | "kB" | "KB" => 1_000,
            "KiB" => 1 << 10,
            "M" | "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "G" | "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            "T" | "TB" => 1_000_000_000_000,
            "TiB" => 1 << 40,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(Self).ok_or_else(bad)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut i = 0;
        while v >= 1024.0 && i < UNITS.len() - 1 {
            v /= 1024.0;
            i += 1;
        }
        if i == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[i])
        }
    }
}

/// Accepts an integer or a string, as TOML users write either.
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u64),
    Str(String),
}

macro_rules! serde_quantity {
    ($ty:ident) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u64(self.0)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                match IntOrString::deserialize(d)? {
                    IntOrString::Int(n) => Ok($ty(n)),
                    IntOrString::Str(s) => s.parse().map_err(serde::de::Error::custom),
                }
            }
        }
    };
}
serde_quantity!(Seconds);
serde_quantity!(Bytes);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("90".parse::<Seconds>().unwrap(), Seconds(90));
        assert_eq!("10m".parse::<Seconds>().unwrap(), Seconds(600));
        assert_eq!("1h 30m".parse::<Seconds>().unwrap(), Seconds(5400));
        assert!("ten minutes".parse::<Seconds>().is_err());
    }

    #[test]
    fn ages() {
        assert_eq!(ago(5_000, 1_000), "4s ago");
        assert_eq!(ago(0, 1_000), "0s ago");
        assert_eq!(ago(126_000, 1_000), "2m ago");
        assert_eq!(ago(2 * 86_400_000, 0), "2d ago");
    }

    #[test]
    fn sizes() {
        assert_eq!("64MiB".parse::<Bytes>().unwrap(), Bytes(64 << 20));
        assert_eq!("1GB".parse::<Bytes>().unwrap(), Bytes(1_000_000_000));
        assert_eq!("512".parse::<Bytes>().unwrap(), Bytes(512));
        assert!("12 parsecs".parse::<Bytes>().is_err());
        assert!("99999999999999999999TiB".parse::<Bytes>().is_err());
        assert_eq!(Bytes(3 << 20).to_string(), "3.0 MiB");
    }

    #[test]
    fn toml_accepts_both_forms() {
        #[derive(Deserialize)]
        struct T {
            a: Seconds,
            b: Bytes,
        }
        let t: T = toml::from_str("a = \"2m\"\nb = 10").unwrap();
        assert_eq!((t.a, t.b), (Seconds(120), Bytes(10)));
    }
}
