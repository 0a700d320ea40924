//! The `[auth]` and `[hooks]` sections: who may call the API, what each tenant may use, and
//! the operator's pre-create hook. What the values mean at run time is in `crate::auth`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{self, ByteSize, Interval};
use super::{Secret, SettingsError};

/// How requests are authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// API keys and capability tokens. With no key configured: protected mode (loopback
    /// clients only).
    Keys,
    /// Every request is the default tenant with every scope. Explicit only; logged as a
    /// warning at start.
    None,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// `[[auth.keys]]`: keys in the configuration itself.
    pub keys: Vec<ApiKeyEntry>,
    /// A file of `[[keys]]` tables (a mounted Secret), re-read when it changes.
    pub keys_file: Option<PathBuf>,
    /// Signs capability tokens; none: `POST /upload/tokens` is refused.
    pub token_secret: Option<Secret>,
    /// Secrets tokens signed earlier may still carry, during a rotation. In the
    /// environment: comma-separated.
    #[serde(deserialize_with = "units::list_or_csv")]
    pub previous_token_secrets: Vec<Secret>,
    /// The longest life a capability token may be given.
    pub token_max_ttl: Interval,
    /// When set, the download link of every `upload.completed` event carries a read-only
    /// token valid this long (needs `token_secret`). Off by default: a link with a token is
    /// a credential, handed to every event consumer and webhook receiver.
    pub event_link_ttl: Option<Interval>,
    /// `[auth.quotas]`: every tenant's limits, unless overridden.
    pub quotas: Quotas,
    /// `[auth.tenants.<tenant>]`: one tenant's overrides.
    pub tenants: BTreeMap<String, Quotas>,
}

/// One API key as configured: never the key itself, only its SHA-256.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// A name for logs and metrics; not secret.
    pub id: String,
    pub tenant: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Subset of `upload`, `read`, `delete`, `admin`; default: all but `admin`.
    pub scopes: Option<Vec<String>>,
}

/// Per-tenant limits; absent: unlimited (or, in a tenant's table, the `[auth.quotas]` value).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Uploads not yet completed, failed or gone.
    pub max_active_uploads: Option<u64>,
    /// Bytes of all the tenant's uploads that are kept (declared sizes of active uploads
    /// plus completed and failed files).
    pub max_stored_bytes: Option<ByteSize>,
    /// The largest single upload.
    pub max_upload_bytes: Option<ByteSize>,
}

impl Quotas {
    /// These limits with `over`'s values where it has them.
    pub fn overridden_by(&self, over: &Quotas) -> Quotas {
        Quotas {
            max_active_uploads: over.max_active_uploads.or(self.max_active_uploads),
            max_stored_bytes: over.max_stored_bytes.or(self.max_stored_bytes),
            max_upload_bytes: over.max_upload_bytes.or(self.max_upload_bytes),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self == &Quotas::default()
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::Keys,
            keys: Vec::new(),
            keys_file: None,
            token_secret: None,
            previous_token_secrets: Vec::new(),
            token_max_ttl: Interval(Duration::from_secs(7 * 86_400)),
            event_link_ttl: None,
            quotas: Quotas::default(),
            tenants: BTreeMap::new(),
        }
    }
}

impl AuthSettings {
    /// The limits that apply to `tenant`.
    pub fn quotas_of(&self, tenant: &str) -> Quotas {
        match self.tenants.get(tenant) {
            Some(over) => self.quotas.overridden_by(over),
            None => self.quotas.clone(),
        }
    }

    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        let invalid =
            |key: &'static str, problem: String| Err(SettingsError::Invalid { key, problem });
        for key in &self.keys {
            if let Err(problem) = check_key_entry(key) {
                return invalid("auth.keys", problem);
            }
        }
        for secret in self.token_secret.iter().chain(&self.previous_token_secrets) {
            if secret.expose().len() < 32 {
                return invalid(
                    "STITCH__AUTH__TOKEN_SECRET",
                    "must be at least 32 characters (e.g. `openssl rand -base64 32`)".into(),
                );
            }
        }
        if self.token_max_ttl.0.is_zero() {
            return invalid(
                "STITCH__AUTH__TOKEN_MAX_TTL",
                "must be longer than zero".into(),
            );
        }
        if let Some(ttl) = self.event_link_ttl {
            if self.token_secret.is_none() {
                return invalid(
                    "STITCH__AUTH__EVENT_LINK_TTL",
                    "needs STITCH__AUTH__TOKEN_SECRET to sign the links".into(),
                );
            }
            if ttl.0.is_zero() || ttl.0 > self.token_max_ttl.0 {
                return invalid(
                    "STITCH__AUTH__EVENT_LINK_TTL",
                    "must be longer than zero and at most auth.token_max_ttl".into(),
                );
            }
        }
        for tenant in self.tenants.keys() {
            if crate::id::Tenant::parse(tenant).is_err() {
                return invalid(
                    "auth.tenants",
                    format!("{tenant:?} is not a tenant name (1-64 of A-Z, a-z, 0-9, '_', '-')"),
                );
            }
        }
        if self.mode == AuthMode::None && (!self.keys.is_empty() || self.keys_file.is_some()) {
            return invalid(
                "STITCH__AUTH__MODE",
                "is `none` but keys are configured: set `keys` or remove the keys".into(),
            );
        }
        Ok(())
    }
}

/// `[hooks]`: calls out to the operator's services.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HookSettings {
    /// A blocking hook asked before every upload is created.
    pub pre_create: Option<PreCreateHook>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreCreateHook {
    pub url: String,
    /// `whsec_<base64>`: the hook's requests are signed per Standard Webhooks.
    pub secret: Secret,
    /// No answer within this: the create is refused with 503.
    #[serde(default = "default_hook_timeout")]
    pub timeout: Interval,
}

fn default_hook_timeout() -> Interval {
    Interval(Duration::from_secs(5))
}

/// Checks one configured key table (also used for the keys file and `stitch keys new`).
pub fn check_key_entry(key: &ApiKeyEntry) -> Result<(), String> {
    if key.id.is_empty() || key.id.len() > 64 || key.id.chars().any(char::is_control) {
        return Err(format!(
            "key id {:?} must be 1-64 printable characters",
            key.id
        ));
    }
    if crate::id::Tenant::parse(&key.tenant).is_err() {
        return Err(format!(
            "key {:?}: tenant {:?} must be 1-64 of A-Z, a-z, 0-9, '_', '-'",
            key.id, key.tenant
        ));
    }
    let hex_ok = key.sha256.len() == 64 && key.sha256.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex_ok {
        return Err(format!(
            "key {:?}: sha256 must be 64 hex digits (the SHA-256 of the key, not the key)",
            key.id
        ));
    }
    if let Some(scopes) = &key.scopes {
        crate::auth::scope::Scopes::parse(scopes.iter().map(String::as_str)).map_err(
            |unknown| {
                format!(
                    "key {:?}: unknown scope {unknown:?} (upload, read, delete, admin)",
                    key.id
                )
            },
        )?;
    }
    Ok(())
}
