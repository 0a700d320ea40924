//! Who is asking, and what they may do.
//!
//! Every request is authenticated into a [`Principal`]: a tenant, a set of [`Scopes`], and —
//! for a capability token — the one upload it is bound to and the size it may reach. The API
//! asks the principal for the [`UploadId`] a request names ([`Principal::upload_id`]), so an
//! id is always scoped to the caller's tenant: another tenant's upload of the same name is
//! simply a different upload, never visible, never a conflict.
//!
//! Credentials ([`Authenticator::authenticate`]):
//! - an API key (`Authorization: Bearer <key>`), looked up by its SHA-256 in the keys of
//!   `[[auth.keys]]` and `auth.keys_file` (re-read when the file changes: [`keys`]);
//! - a capability token (`Bearer` too, or `?token=` on downloads), checked by its signature
//!   alone, without any backend ([`token`]);
//! - nothing, when `auth.mode = "none"`, or in protected mode (mode `keys` with no key
//!   configured) from a loopback peer: the default tenant with every scope.

pub mod keys;
pub mod scope;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{AuthMode, AuthSettings};
use crate::id::{InvalidId, Tenant, UploadId};

pub use self::keys::KeyRing;
pub use self::scope::{Scope, Scopes};
pub use self::token::{DownloadLinks, TokenClaims, TokenSigner};

/// How a principal proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// An API key, by its configured id.
    Key(String),
    /// A capability token.
    Token,
    /// No credential: `auth.mode = "none"`, or a loopback client in protected mode.
    Open,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub tenant: Tenant,
    pub scopes: Scopes,
    pub credential: Credential,
    /// A token's binding: the one upload (by name, in `tenant`) it may touch; for a link,
    /// the prefix of the names of the uploads it may make and touch.
    pub upload: Option<String>,
    /// A token's bound on the size of that upload (of each, for a link).
    pub max_bytes: Option<u64>,
    /// `upload` is a link's prefix, not one upload.
    pub link: bool,
}

/// A fresh prefix for an "upload here" link's uploads (`link_<16 hex>`).
pub fn new_link_prefix() -> String {
    format!("link_{:016x}", rand::random::<u64>())
}

/// Why a request is not allowed. `Unauthorized` is 401 (who are you?), the others 403.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("this credential does not have the `{0}` scope")]
    MissingScope(&'static str),
    #[error("this token is for another upload")]
    OtherUpload,
    #[error("{0}")]
    Forbidden(&'static str),
}

impl Principal {
    /// The default tenant with every scope (mode `none`, protected mode's loopback).
    pub fn open() -> Self {
        Self {
            tenant: Tenant::default_tenant(),
            scopes: Scopes::all(),
            credential: Credential::Open,
            upload: None,
            max_bytes: None,
            link: false,
        }
    }

    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.scopes.contains(scope) {
            Ok(())
        } else {
            Err(AuthError::MissingScope(scope.as_str()))
        }
    }

    /// Either scope will do (status: an uploader resumes with it, a reader reads it).
    pub fn require_any(&self, a: Scope, b: Scope) -> Result<(), AuthError> {
        self.require(a).or_else(|_| self.require(b))
    }

    /// The upload a request names, scoped to this principal's tenant. A token allows only
    /// the upload it is bound to.
    pub fn upload_id(&self, name: &str) -> Result<UploadId, ScopedIdError> {
        let id = UploadId::new(&self.tenant, name)?;
        let allowed = match (&self.upload, self.link) {
            (None, _) => true,
            (Some(bound), false) => bound == id.name(),
            (Some(prefix), true) => id
                .name()
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.starts_with('-')),
        };
        if !allowed {
            return Err(ScopedIdError::Auth(AuthError::OtherUpload));
        }
        Ok(id)
    }

    /// The id of an upload this principal creates without naming it: a token's own upload,
    /// a fresh `<prefix>-<uuid>` for a link, a fresh UUID otherwise.
    pub fn new_upload_id(&self) -> Result<UploadId, ScopedIdError> {
        match (&self.upload, self.link) {
            (Some(bound), false) => self.upload_id(bound),
            (Some(prefix), true) => {
                self.upload_id(&format!("{prefix}-{}", uuid::Uuid::new_v4().simple()))
            }
            (None, _) => Ok(UploadId::generate(&self.tenant)),
        }
    }

    /// Whether this principal is one upload's token (it sees that upload only).
    pub fn single_upload(&self) -> Option<&str> {
        self.upload.as_deref().filter(|_| !self.link)
    }

    /// Checks a declared upload size against the token's bound.
    pub fn check_size(&self, total_size: u64) -> Result<(), AuthError> {
        match self.max_bytes {
            Some(max) if total_size > max => Err(AuthError::Forbidden(
                "the upload is larger than this token allows",
            )),
            _ => Ok(()),
        }
    }

    /// The id of the API key this principal presented, if it presented one.
    pub fn key_id(&self) -> Option<&str> {
        match &self.credential {
            Credential::Key(id) => Some(id),
            _ => None,
        }
    }

    /// A label for logs: the key id, `token` or `open`.
    pub fn label(&self) -> &str {
        match &self.credential {
            Credential::Key(id) => id,
            Credential::Token => "token",
            Credential::Open => "open",
        }
    }
}

/// An id a request named that is not valid, or not this principal's to name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopedIdError {
    #[error(transparent)]
    Invalid(#[from] InvalidId),
    #[error(transparent)]
    Auth(AuthError),
}

/// Turns credentials into principals. Cheap to clone; shared by every request.
#[derive(Clone)]
pub struct Authenticator {
    mode: AuthMode,
    keys: Arc<KeyRing>,
    tokens: Option<Arc<TokenSigner>>,
}

/// What a request presented.
#[derive(Clone, Copy, Debug, Default)]
pub struct Presented<'a> {
    /// The `Authorization` header's value, if any.
    pub authorization: Option<&'a str>,
    /// A `?token=` query parameter, where the route accepts one.
    pub query_token: Option<&'a str>,
    /// The TCP peer.
    pub peer: Option<SocketAddr>,
}

impl Authenticator {
    /// From the settings; fails on a keys file that cannot be read.
    pub fn new(settings: &AuthSettings) -> anyhow::Result<Self> {
        let keys = KeyRing::load(&settings.keys, settings.keys_file.clone())?;
        let tokens = settings
            .token_secret
            .as_ref()
            .map(|secret| Arc::new(TokenSigner::new(secret, &settings.previous_token_secrets)));
        let auth = Self {
            mode: settings.mode,
            keys: Arc::new(keys),
            tokens,
        };
        match auth.mode {
            AuthMode::None => tracing::warn!(
                "auth.mode = none: every request is trusted as the default tenant with every scope"
            ),
            AuthMode::Keys if auth.keys.is_empty() => tracing::warn!(
                "no API key is configured: protected mode, only loopback clients are served \
                 (configure [[auth.keys]] or auth.keys_file; `stitch keys new --tenant T` makes one)"
            ),
            AuthMode::Keys => {}
        }
        Ok(auth)
    }

    /// Everyone is the default tenant with every scope (tests of other concerns, `none`).
    pub fn open() -> Self {
        Self {
            mode: AuthMode::None,
            keys: Arc::new(KeyRing::empty()),
            tokens: None,
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The token signer, if `auth.token_secret` is set.
    pub fn tokens(&self) -> Option<&TokenSigner> {
        self.tokens.as_deref()
    }

    /// Who presented this. Never reveals which part of a credential was wrong.
    pub fn authenticate(&self, presented: Presented<'_>) -> Result<Principal, AuthError> {
        if self.mode == AuthMode::None {
            return Ok(Principal::open());
        }
        let bearer = match presented.authorization {
            Some(value) => Some(bearer_of(value).ok_or(AuthError::Unauthorized(
                "the Authorization header must be `Bearer <key or token>`",
            ))?),
            None => None,
        };
        // A query parameter ends up in access logs and browser histories: it may carry a
        // capability token (short-lived, one upload, read-only links), never an API key.
        if bearer.is_none()
            && let Some(query) = presented.query_token
            && !token::looks_like_token(query)
        {
            return Err(AuthError::Unauthorized(
                "?token= takes a capability token; send API keys in the Authorization header",
            ));
        }
        let Some(credential) = bearer.or(presented.query_token) else {
            if self.keys.is_empty() {
                if presented
                    .peer
                    .is_some_and(|p| p.ip().to_canonical().is_loopback())
                {
                    return Ok(Principal::open());
                }
                return Err(AuthError::Unauthorized(
                    "this server has no API key configured and serves loopback clients only: \
                     configure [[auth.keys]] or auth.keys_file (`stitch keys new --tenant T`), \
                     or set auth.mode = \"none\"",
                ));
            }
            return Err(AuthError::Unauthorized(
                "an API key or token is required: `Authorization: Bearer <key>`",
            ));
        };
        if token::looks_like_token(credential) {
            let signer = self
                .tokens
                .as_ref()
                .ok_or(AuthError::Unauthorized("the token is not valid"))?;
            let claims = signer
                .verify(credential, crate::now_ms() / 1000)
                .map_err(|_| AuthError::Unauthorized("the token is not valid or has expired"))?;
            // A token lives no longer than the key that made it: removing a key from the
            // configuration or the keys file revokes every token it issued.
            if let Some(issuer) = &claims.issuer
                && !self.keys.has_key_id(issuer)
            {
                return Err(AuthError::Unauthorized("the token's key was revoked"));
            }
            return Ok(claims.principal());
        }
        self.keys
            .principal(credential)
            .ok_or(AuthError::Unauthorized("the API key is not valid"))
    }
}

/// The credential of `Bearer <credential>` (the scheme is case-insensitive).
fn bearer_of(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    let credential = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

/// A fresh API key: `sk_` and 32 random bytes in URL-safe base64.
pub fn new_api_key() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    format!(
        "sk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Hex SHA-256 of a key: what the configuration holds.
pub fn key_sha256(key: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyEntry;

    fn entry(id: &str, tenant: &str, key: &str, scopes: Option<&[&str]>) -> ApiKeyEntry {
        ApiKeyEntry {
            id: id.into(),
            tenant: tenant.into(),
            sha256: key_sha256(key),
            scopes: scopes.map(|s| s.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn keyed(entries: Vec<ApiKeyEntry>) -> Authenticator {
        let settings = AuthSettings {
            keys: entries,
            token_secret: Some(crate::config::Secret::new("s".repeat(32))),
            ..AuthSettings::default()
        };
        Authenticator::new(&settings).unwrap()
    }

    fn bearer(value: &str) -> String {
        format!("Bearer {value}")
    }

    #[test]
    fn a_known_key_is_its_tenant_with_its_scopes() {
        let auth = keyed(vec![entry("ci", "acme", "k1", Some(&["read"]))]);
        let header = bearer("k1");
        let p = auth
            .authenticate(Presented {
                authorization: Some(&header),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(p.tenant.as_str(), "acme");
        assert!(p.require(Scope::Read).is_ok());
        assert_eq!(
            p.require(Scope::Upload),
            Err(AuthError::MissingScope("upload"))
        );
        assert_eq!(p.credential, Credential::Key("ci".into()));
    }

    #[test]
    fn missing_unknown_and_malformed_credentials_are_unauthorized() {
        let auth = keyed(vec![entry("ci", "acme", "k1", None)]);
        for authorization in [None, Some("Bearer nope"), Some("Basic k1"), Some("Bearer ")] {
            let r = auth.authenticate(Presented {
                authorization,
                peer: Some(SocketAddr::from(([127, 0, 0, 1], 1))),
                ..Default::default()
            });
            assert!(
                matches!(r, Err(AuthError::Unauthorized(_))),
                "{authorization:?}: {r:?}"
            );
        }
    }

    #[test]
    fn protected_mode_serves_loopback_only() {
        let auth = keyed(Vec::new());
        let local = auth.authenticate(Presented {
            peer: Some(SocketAddr::from(([127, 0, 0, 1], 1))),
            ..Default::default()
        });
        assert_eq!(local, Ok(Principal::open()));
        for peer in ["[::1]:1", "[::ffff:127.0.0.1]:1"] {
            let v6 = auth.authenticate(Presented {
                peer: Some(peer.parse().unwrap()),
                ..Default::default()
            });
            assert_eq!(v6, Ok(Principal::open()), "{peer}");
        }
        let remote = auth.authenticate(Presented {
            peer: Some(SocketAddr::from(([10, 0, 0, 7], 1))),
            ..Default::default()
        });
        assert!(matches!(remote, Err(AuthError::Unauthorized(m)) if m.contains("auth.keys")));
        let unknown_peer = auth.authenticate(Presented::default());
        assert!(unknown_peer.is_err());
    }

    #[test]
    fn with_keys_configured_loopback_is_not_trusted() {
        let auth = keyed(vec![entry("ci", "acme", "k1", None)]);
        let r = auth.authenticate(Presented {
            peer: Some(SocketAddr::from(([127, 0, 0, 1], 1))),
            ..Default::default()
        });
        assert!(r.is_err());
    }

    #[test]
    fn a_link_makes_and_touches_only_uploads_under_its_prefix() {
        let auth = keyed(vec![entry("ci", "acme", "k1", None)]);
        let signer = auth.tokens().unwrap();
        let token = signer.sign(&TokenClaims {
            tenant: Tenant::parse("acme").unwrap(),
            upload: "link_ab".into(),
            scopes: Scopes::default_for_tokens(),
            expires_at: crate::now_ms() / 1000 + 60,
            max_bytes: Some(100),
            issuer: None,
            link: true,
        });
        let header = bearer(&token);
        let p = auth
            .authenticate(Presented {
                authorization: Some(&header),
                ..Default::default()
            })
            .unwrap();
        let made = p.new_upload_id().unwrap();
        assert!(made.as_str().starts_with("acme~link_ab-"), "{made}");
        assert_ne!(made, p.new_upload_id().unwrap());
        assert!(p.upload_id("link_ab-x1").is_ok());
        assert_eq!(p.single_upload(), None);
        for other in ["link_ab", "link_abc-x1", "link_a-b", "u1"] {
            assert_eq!(
                p.upload_id(other),
                Err(ScopedIdError::Auth(AuthError::OtherUpload)),
                "{other}"
            );
        }
    }

    #[test]
    fn a_token_principal_is_bound_to_its_upload() {
        let auth = keyed(vec![entry("ci", "acme", "k1", None)]);
        let signer = auth.tokens().unwrap();
        let now = crate::now_ms() / 1000;
        let token = signer.sign(&TokenClaims {
            tenant: Tenant::parse("acme").unwrap(),
            upload: "u1".into(),
            scopes: Scopes::default_for_tokens(),
            expires_at: now + 60,
            max_bytes: Some(100),
            issuer: Some("ci".into()),
            link: false,
        });
        let header = bearer(&token);
        let p = auth
            .authenticate(Presented {
                authorization: Some(&header),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(p.upload_id("u1").unwrap().as_str(), "acme~u1");
        assert_eq!(
            p.upload_id("u2"),
            Err(ScopedIdError::Auth(AuthError::OtherUpload))
        );
        assert!(p.check_size(100).is_ok());
        assert!(p.check_size(101).is_err());
        assert_eq!(
            p.require(Scope::Delete),
            Err(AuthError::MissingScope("delete"))
        );
        let query = auth.authenticate(Presented {
            query_token: Some(&token),
            ..Default::default()
        });
        assert_eq!(query, Ok(p));
    }

    #[test]
    fn a_token_dies_with_the_key_that_made_it_and_no_key_goes_in_a_query() {
        let auth = keyed(vec![entry("ci", "acme", "k1", None)]);
        let signer = auth.tokens().unwrap();
        let claims = |issuer: Option<&str>| TokenClaims {
            link: false,
            tenant: Tenant::parse("acme").unwrap(),
            upload: "u1".into(),
            scopes: Scopes::default_for_tokens(),
            expires_at: crate::now_ms() / 1000 + 60,
            max_bytes: None,
            issuer: issuer.map(str::to_owned),
        };
        let by = |issuer| {
            let header = bearer(&signer.sign(&claims(issuer)));
            auth.authenticate(Presented {
                authorization: Some(&header),
                ..Default::default()
            })
        };
        assert!(by(Some("ci")).is_ok());
        assert!(
            by(None).is_ok(),
            "a token made without a key lives until it expires"
        );
        assert!(
            matches!(by(Some("removed")), Err(AuthError::Unauthorized(_))),
            "a removed key's tokens are refused"
        );
        let in_query = auth.authenticate(Presented {
            query_token: Some("k1"),
            ..Default::default()
        });
        assert!(
            matches!(in_query, Err(AuthError::Unauthorized(_))),
            "{in_query:?}"
        );
    }

    #[test]
    fn mode_none_trusts_everyone_as_the_default_tenant() {
        let auth = Authenticator::open();
        let p = auth
            .authenticate(Presented {
                authorization: Some("Bearer whatever"),
                peer: Some(SocketAddr::from(([10, 0, 0, 7], 1))),
                ..Default::default()
            })
            .unwrap();
        assert!(p.tenant.is_default());
        assert!(p.require(Scope::Admin).is_ok());
    }

    #[test]
    fn key_tables_are_checked() {
        assert!(crate::config::check_key_entry(&entry("a", "acme", "k", None)).is_ok());
        assert!(crate::config::check_key_entry(&entry("a", "ac/me", "k", None)).is_err());
        assert!(crate::config::check_key_entry(&entry("a", "acme", "k", Some(&["root"]))).is_err());
        let mut raw = entry("a", "acme", "k", None);
        raw.sha256 = "sk_the_key_itself".into();
        assert!(crate::config::check_key_entry(&raw).is_err());
    }

    #[test]
    fn new_keys_are_distinct_and_hash_to_config_form() {
        let (a, b) = (new_api_key(), new_api_key());
        assert_ne!(a, b);
        assert!(a.starts_with("sk_") && a.len() > 40);
        assert_eq!(key_sha256(&a).len(), 64);
        assert!(!token::looks_like_token(&a));
    }
}
