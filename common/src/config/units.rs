//! Human-friendly durations (`"30s"`, `"7d"`) and byte sizes (`"64MiB"`) in configuration.
//! Plain integers are accepted too: seconds for durations, bytes for sizes.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// A byte count written as an integer or with a unit (`KiB`, `MiB`, `GiB`, `TiB`, `KB`, `MB`…).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

/// A duration written as integer seconds or with a unit (`ms`, `s`, `m`, `h`, `d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interval(pub Duration);

impl ByteSize {
    pub fn parse(raw: &str) -> Option<Self> {
        let (number, unit) = split_number(raw)?;
        let scale: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return None,
        };
        number.checked_mul(scale).map(Self)
    }
}

impl Interval {
    pub fn parse(raw: &str) -> Option<Self> {
        let (number, unit) = split_number(raw)?;
        let duration = match unit {
            "ms" => Duration::from_millis(number),
            "" | "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.checked_mul(60)?),
            "h" => Duration::from_secs(number.checked_mul(3600)?),
            "d" => Duration::from_secs(number.checked_mul(86_400)?),
            _ => return None,
        };
        Some(Self(duration))
    }
}

fn split_number(raw: &str) -> Option<(u64, &str)> {
    let raw = raw.trim();
    let digits = raw.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let number = raw[..digits].parse().ok()?;
    Some((number, raw[digits..].trim()))
}

/// Accepts an integer or a string, for values that may come from a file or the environment.
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u64),
    Str(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrString::deserialize(d)? {
            IntOrString::Int(n) => Ok(Self(n)),
            IntOrString::Str(s) => Self::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a byte size (e.g. 1048576, \"64MiB\", \"1TiB\")"
                ))
            }),
        }
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrString::deserialize(d)? {
            IntOrString::Int(n) => Ok(Self(Duration::from_secs(n))),
            IntOrString::Str(s) => Self::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration (e.g. 30, \"30s\", \"500ms\", \"7d\")"
                ))
            }),
        }
    }
}

/// A list given as an array (files) or as comma-separated text (environment variables).
pub(super) fn list_or_csv<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText<T> {
        List(Vec<T>),
        Text(String),
    }
    match ListOrText::<T>::deserialize(d)? {
        ListOrText::List(items) => Ok(items),
        ListOrText::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                T::deserialize(
                    serde::de::value::StrDeserializer::<serde::de::value::Error>::new(item),
                )
                .map_err(|e| serde::de::Error::custom(format!("{item:?}: {e}")))
            })
            .collect(),
    }
}

impl Serialize for Interval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_millis()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(ByteSize::parse("64MiB"), Some(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("1 TiB"), Some(ByteSize(1 << 40)));
        assert_eq!(ByteSize::parse("8mb"), Some(ByteSize(8_000_000)));
        assert_eq!(ByteSize::parse("123"), Some(ByteSize(123)));
        for bad in [
            "",
            "MiB",
            "-1",
            "1.5GiB",
            "1 parsec",
            "99999999999999999999TiB",
        ] {
            assert_eq!(ByteSize::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(
            Interval::parse("500ms"),
            Some(Interval(Duration::from_millis(500)))
        );
        assert_eq!(
            Interval::parse("30"),
            Some(Interval(Duration::from_secs(30)))
        );
        assert_eq!(
            Interval::parse("7d"),
            Some(Interval(Duration::from_secs(604_800)))
        );
        assert_eq!(Interval::parse("1w"), None);
    }
}
