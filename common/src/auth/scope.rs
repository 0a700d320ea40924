//! Scopes: what a credential may do. Kept apart from the rest of `auth` so that the
//! configuration can check scope names without depending on authentication.

use std::fmt;

/// One permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Create uploads and send their bytes (and read their status, to resume).
    Upload,
    /// Read status and download completed files.
    Read,
    /// Abort and delete uploads.
    Delete,
    /// The worker's admin endpoints.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Self::Upload, Self::Read, Self::Delete, Self::Admin];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Upload => "upload",
            Self::Read => "read",
            Self::Delete => "delete",
            Self::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    fn bit(&self) -> u8 {
        1 << (*self as u8)
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub fn of(scopes: &[Scope]) -> Self {
        Self(scopes.iter().fold(0, |bits, s| bits | s.bit()))
    }

    /// Every scope but `admin`: what a key has when its table names none.
    pub fn default_for_keys() -> Self {
        Self::of(&[Scope::Upload, Scope::Read, Scope::Delete])
    }

    /// What a capability token has when the request names none.
    pub fn default_for_tokens() -> Self {
        Self::of(&[Scope::Upload, Scope::Read])
    }

    pub fn all() -> Self {
        Self::of(&Scope::ALL)
    }

    pub fn contains(&self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn is_subset_of(&self, other: Scopes) -> bool {
        self.0 & !other.0 == 0
    }

    /// Parses scope names; `None` names the first unknown one.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut scopes = Vec::new();
        for name in names {
            scopes.push(Scope::parse(name).ok_or_else(|| name.to_owned())?);
        }
        Ok(Self::of(&scopes))
    }

    pub fn names(&self) -> Vec<&'static str> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.contains(*s))
            .map(|s| s.as_str())
            .collect()
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}
