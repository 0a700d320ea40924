//! Upload identifiers and tenants.
//!
//! An id is chosen by the client (the chunk protocol lets it make one up, e.g. a UUID) and
//! ends up in storage paths and Redis keys, so it is the first thing we refuse to trust:
//! 1–128 characters of `[A-Za-z0-9_-]`, which can never spell `..`, a separator, a Redis
//! hash-tag brace or a glob character.
//!
//! Every upload belongs to one [`Tenant`], and the id a client chooses is scoped to it: the
//! same name used by two tenants is two uploads. [`UploadId`] is the scoped id: the *key*
//! (`tenant~name`, or the bare name for the [`Tenant::DEFAULT`] tenant, whose uploads predate
//! tenants) names the upload's directory on storage and its state-store keys; the *name* is
//! what the client sees. `~` is in neither alphabet, so a key splits one way only, and a
//! client-supplied name can never address another tenant's key: client input goes through
//! [`UploadId::new`] with the caller's tenant, never through [`UploadId::from_key`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// The longest tenant name accepted, in bytes.
pub const MAX_TENANT_LEN: usize = 64;
/// Between the tenant and the name in a key.
const SEPARATOR: char = '~';

/// Why a string is not an [`UploadId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("the upload id is empty")]
    Empty,
    #[error("the upload id is longer than {MAX_ID_LEN} characters")]
    TooLong,
    #[error("the upload id may only contain A-Z, a-z, 0-9, '_' and '-'")]
    BadCharacter,
    #[error("the tenant name must be 1-{MAX_TENANT_LEN} of A-Z, a-z, 0-9, '_' and '-'")]
    BadTenant,
}

fn in_alphabet(raw: &str) -> bool {
    raw.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The owner of uploads: every API key and capability token names one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Tenant(String);

impl Tenant {
    /// The tenant of requests when auth is off or in protected mode, and of every upload
    /// made before tenants existed (their keys are bare names).
    pub const DEFAULT: &'static str = "default";

    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() || raw.len() > MAX_TENANT_LEN || !in_alphabet(raw) {
            return Err(InvalidId::BadTenant);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn default_tenant() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_default(&self) -> bool {
        self.0 == Self::DEFAULT
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Tenant {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A validated upload id, scoped to its tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadId {
    /// `tenant~name`, or `name` for the default tenant.
    key: String,
    /// Where the name starts in `key` (0 for the default tenant).
    name_at: usize,
}

fn check_name(raw: &str) -> Result<(), InvalidId> {
    if raw.is_empty() {
        return Err(InvalidId::Empty);
    }
    if raw.len() > MAX_ID_LEN {
        return Err(InvalidId::TooLong);
    }
    if !in_alphabet(raw) {
        return Err(InvalidId::BadCharacter);
    }
    Ok(())
}

impl UploadId {
    /// The upload `name` (client-supplied, validated here) of `tenant`.
    pub fn new(tenant: &Tenant, name: &str) -> Result<Self, InvalidId> {
        check_name(name)?;
        if tenant.is_default() {
            return Ok(Self {
                key: name.to_owned(),
                name_at: 0,
            });
        }
        Ok(Self {
            key: format!("{}{SEPARATOR}{name}", tenant.as_str()),
            name_at: tenant.as_str().len() + 1,
        })
    }

    /// A client-supplied id in the default tenant (tests and the single-tenant tools).
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        Self::new(&Tenant::default_tenant(), raw)
    }

    /// An id from its key, as storage and the state store name it. Never for client input:
    /// a key can name any tenant's upload.
    pub fn from_key(key: &str) -> Result<Self, InvalidId> {
        match key.split_once(SEPARATOR) {
            None => Self::parse(key),
            Some((tenant, name)) => {
                let tenant = Tenant::parse(tenant)?;
                if tenant.is_default() {
                    // The default tenant's keys are bare: a prefixed one is not a key.
                    return Err(InvalidId::BadCharacter);
                }
                Self::new(&tenant, name)
            }
        }
    }

    /// A fresh server-made id (a UUID v4 without dashes) in `tenant`.
    pub fn generate(tenant: &Tenant) -> Self {
        Self::new(tenant, &uuid::Uuid::new_v4().simple().to_string())
            .expect("a UUID is a valid name")
    }

    /// The key: the name of the upload's directory and state-store keys.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The name the client chose (or was given): what responses and events show.
    pub fn name(&self) -> &str {
        &self.key[self.name_at..]
    }

    /// The upload's owner.
    pub fn tenant(&self) -> Tenant {
        if self.name_at == 0 {
            Tenant::default_tenant()
        } else {
            Tenant(self.key[..self.name_at - 1].to_owned())
        }
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

/// Serialized as its key: messages and manifests name the upload itself, tenant included.
impl Serialize for UploadId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.key)
    }
}

impl<'de> Deserialize<'de> for UploadId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::from_key(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tenant(t: &str) -> Tenant {
        Tenant::parse(t).unwrap()
    }

    #[test]
    fn ids_that_could_escape_a_path_or_a_key_are_refused() {
        for bad in [
            "", "..", "a/b", "a\\b", "{x}", "a*", "a b", "é", "a\0", "a.b", "a:b", "t~x",
        ] {
            assert!(UploadId::parse(bad).is_err(), "{bad:?} was accepted");
            assert!(
                UploadId::new(&tenant("acme"), bad).is_err(),
                "{bad:?} was accepted"
            );
        }
        assert_eq!(UploadId::parse(&"a".repeat(129)), Err(InvalidId::TooLong));
        assert!(UploadId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn generated_ids_are_valid() {
        let id = UploadId::generate(&tenant("acme"));
        assert_eq!(UploadId::from_key(id.as_str()), Ok(id.clone()));
        assert_eq!(id.tenant(), tenant("acme"));
    }

    #[test]
    fn the_same_name_in_two_tenants_is_two_uploads() {
        let a = UploadId::new(&tenant("acme"), "report").unwrap();
        let b = UploadId::new(&tenant("globex"), "report").unwrap();
        let d = UploadId::parse("report").unwrap();
        assert_ne!(a, b);
        assert_ne!(a.as_str(), d.as_str());
        assert_eq!(
            (a.name(), b.name(), d.name()),
            ("report", "report", "report")
        );
        assert_eq!(a.as_str(), "acme~report");
        assert_eq!(d.as_str(), "report", "the default tenant keeps bare keys");
        assert_eq!(a.tenant().as_str(), "acme");
        assert!(d.tenant().is_default());
    }

    #[test]
    fn keys_round_trip_and_a_prefixed_default_key_is_refused() {
        for key in ["x", "acme~x", "a-b_c~Y-1"] {
            let id = UploadId::from_key(key).unwrap();
            assert_eq!(id.as_str(), key);
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(serde_json::from_str::<UploadId>(&json).unwrap(), id);
        }
        for bad in ["default~x", "~x", "a~", "a~b~c", "a.b~c"] {
            assert!(UploadId::from_key(bad).is_err(), "{bad:?} was accepted");
        }
    }

    proptest! {
        #[test]
        fn any_string_of_the_alphabet_up_to_128_is_an_id(s in "[A-Za-z0-9_-]{1,128}") {
            prop_assert_eq!(UploadId::parse(&s).map(|id| id.key), Ok(s));
        }

        #[test]
        fn an_accepted_id_never_contains_path_or_key_syntax(t in "[A-Za-z0-9_-]{1,64}", s in "\\PC{0,140}") {
            if let Ok(id) = UploadId::new(&tenant(&t), &s) {
                let forbidden = ['/', '.', '{', '}', '*', ':', '\\'];
                prop_assert!(!id.as_str().contains(forbidden), "{:?}", id);
                prop_assert_eq!(UploadId::from_key(id.as_str()), Ok(id.clone()));
                prop_assert_eq!(id.name(), s.as_str());
            }
        }
    }
}
