//! Capability tokens: stateless credentials for browsers and download links, made by a key
//! holder (`POST /upload/tokens`) and checked by any process that has the token secret —
//! no Redis, no lookup.
//!
//! Form: `st1.<payload>.<signature>`, both URL-safe base64 without padding (so a token fits in
//! a header and in `?token=` unescaped). The payload is JSON: tenant, upload name, scopes,
//! expiry (Unix seconds) and an optional size bound. The signature is HMAC-SHA256, keyed by
//! `auth.token_secret`, over `st1.<payload>`; tokens signed with one of
//! `auth.previous_token_secrets` are accepted too, so secrets rotate without cutting off
//! tokens in flight. Verification is constant-time (`verify_slice`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{Credential, Principal, Scopes};
use crate::config::Secret;
use crate::id::Tenant;

const PREFIX: &str = "st1.";
/// Longest token accepted for verification (a payload is well under 1 KiB).
const MAX_TOKEN_LEN: usize = 2048;

/// True when `credential` has a token's form (API keys never do).
pub fn looks_like_token(credential: &str) -> bool {
    credential.starts_with(PREFIX)
}

/// What a token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub tenant: Tenant,
    /// The upload's name in `tenant`.
    pub upload: String,
    pub scopes: Scopes,
    /// Unix seconds.
    pub expires_at: u64,
    pub max_bytes: Option<u64>,
    /// The id of the API key that made the token: the token is refused once that key is
    /// gone. `None` for tokens made without a key (protected mode, event links, links made
    /// by `stitch link new`).
    pub issuer: Option<String>,
    /// An "upload here" link: `upload` is not one upload but a prefix, and the token may
    /// make and touch any number of uploads named `<upload>-…` (server-made), none other.
    pub link: bool,
}

impl TokenClaims {
    pub fn principal(self) -> Principal {
        Principal {
            tenant: self.tenant,
            scopes: self.scopes,
            credential: Credential::Token,
            upload: Some(self.upload),
            max_bytes: self.max_bytes,
            link: self.link,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    v: u8,
    t: String,
    u: String,
    s: Vec<String>,
    e: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<String>,
    /// A link (absent: one upload).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    l: bool,
}

/// Why a token was refused. Callers answer one 401 for all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
}

/// Signs with the current secret; verifies with it and the previous ones.
#[derive(Clone)]
pub struct TokenSigner {
    /// The current secret first.
    secrets: Vec<Vec<u8>>,
}

impl TokenSigner {
    pub fn new(current: &Secret, previous: &[Secret]) -> Self {
        let secrets = std::iter::once(current)
            .chain(previous)
            .map(|s| s.expose().as_bytes().to_vec())
            .collect();
        Self { secrets }
    }

    fn mac(secret: &[u8], signed: &str) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(signed.as_bytes());
        mac
    }

    pub fn sign(&self, claims: &TokenClaims) -> String {
        let payload = Payload {
            v: 1,
            t: claims.tenant.as_str().to_owned(),
            u: claims.upload.clone(),
            s: claims
                .scopes
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            e: claims.expires_at,
            m: claims.max_bytes,
            k: claims.issuer.clone(),
            l: claims.link,
        };
        let json = serde_json::to_vec(&payload).expect("a payload serializes");
        let signed = format!("{PREFIX}{}", B64.encode(json));
        let tag = Self::mac(&self.secrets[0], &signed).finalize().into_bytes();
        format!("{signed}.{}", B64.encode(tag))
    }

    /// The claims of a genuine, unexpired token.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<TokenClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let payload = signed.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
        let genuine = self
            .secrets
            .iter()
            .any(|secret| Self::mac(secret, signed).verify_slice(&tag).is_ok());
        if !genuine {
            return Err(TokenError::BadSignature);
        }
        let json = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let p: Payload = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if p.v != 1 {
            return Err(TokenError::Malformed);
        }
        if now_secs >= p.e {
            return Err(TokenError::Expired);
        }
        let claims = TokenClaims {
            tenant: Tenant::parse(&p.t).map_err(|_| TokenError::Malformed)?,
            upload: p.u,
            scopes: Scopes::parse(p.s.iter().map(String::as_str))
                .map_err(|_| TokenError::Malformed)?,
            expires_at: p.e,
            max_bytes: p.m,
            issuer: p.k,
            link: p.l,
        };
        crate::id::UploadId::new(&claims.tenant, &claims.upload)
            .map_err(|_| TokenError::Malformed)?;
        Ok(claims)
    }
}

/// Read-only download tokens for links: `?token=` appended to a download URL.
pub struct DownloadLinks {
    signer: TokenSigner,
    ttl: std::time::Duration,
}

impl DownloadLinks {
    /// The links of `upload.completed` events, when `auth.event_link_ttl` is set.
    pub fn for_events(auth: &crate::config::AuthSettings) -> Option<Self> {
        let (secret, ttl) = (auth.token_secret.as_ref()?, auth.event_link_ttl?);
        Some(Self {
            signer: TokenSigner::new(secret, &auth.previous_token_secrets),
            ttl: ttl.0,
        })
    }

    pub fn new(signer: TokenSigner, ttl: std::time::Duration) -> Self {
        Self { signer, ttl }
    }

    /// `url` with a token that lets its holder download `id` (and nothing else) until the
    /// link's life is over, or until the key `issuer` (if any) is removed.
    pub fn link(&self, url: &str, id: &crate::id::UploadId, issuer: Option<&str>) -> String {
        let expires_at = (crate::now_ms() + self.ttl.as_millis() as u64).div_ceil(1000);
        let token = self.signer.sign(&TokenClaims {
            tenant: id.tenant(),
            upload: id.name().to_owned(),
            scopes: Scopes::of(&[super::Scope::Read]),
            expires_at,
            max_bytes: None,
            issuer: issuer.map(str::to_owned),
            link: false,
        });
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}token={token}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;
    use proptest::prelude::*;

    fn signer(secret: &str) -> TokenSigner {
        TokenSigner::new(&Secret::new(secret), &[])
    }

    fn claims() -> TokenClaims {
        TokenClaims {
            link: false,
            tenant: Tenant::parse("acme").unwrap(),
            upload: "u1".into(),
            scopes: Scopes::of(&[Scope::Read]),
            expires_at: 1000,
            max_bytes: Some(5),
            issuer: Some("ci".into()),
        }
    }

    #[test]
    fn a_link_stays_a_link_and_a_token_for_one_upload_stays_one() {
        let signer = TokenSigner::new(&Secret::new("the current secret, 32 bytes long"), &[]);
        let link = TokenClaims {
            link: true,
            ..claims()
        };
        assert_eq!(signer.verify(&signer.sign(&link), 10), Ok(link));
        assert!(!signer.verify(&signer.sign(&claims()), 10).unwrap().link);
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let s = signer("a".repeat(32).as_str());
        let token = s.sign(&claims());
        assert!(looks_like_token(&token));
        assert_eq!(s.verify(&token, 999), Ok(claims()));
        assert_eq!(s.verify(&token, 1000), Err(TokenError::Expired));
    }

    #[test]
    fn tampered_tokens_and_other_secrets_are_refused() {
        let s = signer(&"a".repeat(32));
        let token = s.sign(&claims());
        let (payload, tag) = token.rsplit_once('.').unwrap();
        // Another tenant in the payload, same signature.
        let mut forged = claims();
        forged.tenant = Tenant::parse("globex").unwrap();
        let other = s.sign(&forged);
        let (other_payload, _) = other.rsplit_once('.').unwrap();
        assert_eq!(
            s.verify(&format!("{other_payload}.{tag}"), 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            s.verify(&format!("{payload}.AAAA"), 0),
            Err(TokenError::BadSignature)
        );
        assert!(signer(&"b".repeat(32)).verify(&token, 0).is_err());
        assert!(s.verify("st1.", 0).is_err());
        assert!(s.verify("st1..", 0).is_err());
    }

    #[test]
    fn previous_secrets_still_verify_during_a_rotation() {
        let old = signer(&"o".repeat(32));
        let token = old.sign(&claims());
        let rotated =
            TokenSigner::new(&Secret::new("n".repeat(32)), &[Secret::new("o".repeat(32))]);
        assert_eq!(rotated.verify(&token, 0), Ok(claims()));
        // New tokens are signed with the new secret only.
        let fresh = rotated.sign(&claims());
        assert!(old.verify(&fresh, 0).is_err());
    }

    proptest! {
        #[test]
        fn verification_never_panics(s in "\\PC{0,300}") {
            let _ = signer(&"a".repeat(32)).verify(&s, 0);
        }
    }
}
