//! Human-friendly durations (`"30s"`, `"1h 30m"`, `"7d"`) and byte sizes (`"64MiB"`) in
//! configuration. Plain integers are accepted too: seconds for durations, bytes for sizes.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// A byte count written as an integer or with a unit (`KiB`, `MiB`, `GiB`, `TiB`, `KB`, `MB`…).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

/// A duration written as integer seconds or in `humantime`'s notation: one or more numbers
/// with a unit (`ms`, `s`, `m`, `h`, `d`, `w`, their long forms such as `min` and `hours`,
/// `M` for months and `y` for years), e.g. `500ms`, `1h 30m`, `2w`.
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
    /// Parses `90` (seconds) or a duration with units (`1h 30m`); the error says why not.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        // humantime wants a unit on every number; a bare integer is seconds here, as it
        // always was in Stitch's configuration.
        if let Ok(secs) = raw.parse::<u64>() {
            return Ok(Self(Duration::from_secs(secs)));
        }
        humantime::parse_duration(raw)
            .map(Self)
            .map_err(|e| e.to_string())
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
            IntOrString::Str(s) => Self::parse(&s).map_err(|why| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration ({why}; e.g. 30, \"500ms\", \"1h 30m\", \"7d\")"
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
    /// In the notation `parse` reads back exactly (`1h 30m`, `1s 500ms`).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
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
    fn durations_take_humantime_units() {
        let secs = |s| Ok(Interval(Duration::from_secs(s)));
        assert_eq!(Interval::parse("1h 30m"), secs(5400));
        assert_eq!(Interval::parse("2w"), secs(14 * 86_400));
        assert_eq!(Interval::parse("7d"), secs(604_800));
        assert_eq!(Interval::parse("2min"), secs(120));
        assert_eq!(
            Interval::parse("500ms"),
            Ok(Interval(Duration::from_millis(500)))
        );
    }

    #[test]
    fn a_bare_integer_is_seconds() {
        assert_eq!(Interval::parse("90"), Ok(Interval(Duration::from_secs(90))));
        assert_eq!(
            Interval::parse(" 30 "),
            Ok(Interval(Duration::from_secs(30)))
        );
        assert_eq!(Interval::parse("0"), Ok(Interval(Duration::ZERO)));
    }

    #[test]
    fn garbage_is_not_a_duration() {
        for bad in [
            "",
            "soon",
            "-1",
            "1 parsec",
            "5 s m",
            "99999999999999999999w",
        ] {
            assert!(Interval::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_serialize_to_what_parse_reads_back() {
        for text in ["1h 30m", "1500ms", "2w", "0"] {
            let interval = Interval::parse(text).unwrap();
            let written = serde_json::to_value(interval).unwrap();
            let written = written.as_str().unwrap();
            assert_eq!(
                Interval::parse(written),
                Ok(interval),
                "{text:?} -> {written:?}"
            );
        }
    }
}
