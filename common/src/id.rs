//! Upload identifiers.
//!
//! An id is chosen by the client (the chunk protocol lets it make one up, e.g. a UUID) and
//! ends up in storage paths and Redis keys, so it is the first thing we refuse to trust:
//! 1–128 characters of `[A-Za-z0-9_-]`, which can never spell `..`, a separator, a Redis
//! hash-tag brace or a glob character.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A validated upload id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UploadId(String);

/// Why a string is not an [`UploadId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("the upload id is empty")]
    Empty,
    #[error("the upload id is longer than {MAX_ID_LEN} characters")]
    TooLong,
    #[error("the upload id may only contain A-Z, a-z, 0-9, '_' and '-'")]
    BadCharacter,
}

impl UploadId {
    /// Parses a client-supplied id.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() {
            return Err(InvalidId::Empty);
        }
        if raw.len() > MAX_ID_LEN {
            return Err(InvalidId::TooLong);
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(InvalidId::BadCharacter);
        }
        Ok(Self(raw.to_owned()))
    }

    /// A fresh server-made id (a UUID v4 without dashes).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UploadId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_that_could_escape_a_path_or_a_key_are_refused() {
        for bad in [
            "", "..", "a/b", "a\\b", "{x}", "a*", "a b", "é", "a\0", "a.b", "a:b",
        ] {
            assert!(UploadId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(UploadId::parse(&"a".repeat(129)), Err(InvalidId::TooLong));
        assert!(UploadId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn generated_ids_are_valid() {
        let id = UploadId::generate();
        assert_eq!(UploadId::parse(id.as_str()), Ok(id));
    }

    proptest! {
        #[test]
        fn any_string_of_the_alphabet_up_to_128_is_an_id(s in "[A-Za-z0-9_-]{1,128}") {
            prop_assert_eq!(UploadId::parse(&s).map(|id| id.0), Ok(s));
        }

        #[test]
        fn an_accepted_id_never_contains_path_or_key_syntax(s in "\\PC{0,140}") {
            if let Ok(id) = UploadId::parse(&s) {
                let forbidden = ['/', '.', '{', '}', '*', ':', '\\'];
                prop_assert!(!id.as_str().contains(forbidden), "{:?}", id);
            }
        }
    }
}
