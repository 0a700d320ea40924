//! Capability tokens, signed then changed: `TokenSigner::sign` and `TokenSigner::verify`.
//!
//! Input: six lines of claims, then edits to the signed token.
//! - lines: tenant (an invalid one becomes `default`), upload name (anything), scopes
//!   (comma-separated names; unknown ones are left out), expiry and "now" (Unix seconds),
//!   size bound (a number; anything else: no bound, and the line, when not empty and at
//!   most 64 bytes — a key id's limit —, is the issuing key's id);
//! - the rest, four bytes per edit: operation (`% 4`: flip bits, insert, remove, truncate),
//!   position (`u16`, little-endian, modulo the token's length + 1), byte.
//!
//! Properties: a token verifies, unchanged, to exactly the claims it was signed with while it
//! has not expired (and is refused as expired after, malformed when its upload name is not a
//! valid id); a token signed with another secret never verifies; a changed token never
//! verifies, to any claims.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stitch_common::auth::token::TokenError;
use stitch_common::auth::{Scope, Scopes, TokenClaims, TokenSigner};
use stitch_common::config::Secret;
use stitch_common::id::{Tenant, UploadId};

/// The longest token `verify` reads.
const MAX_TOKEN_LEN: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(7, |&b| b == b'\n');
    let mut line = || String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let (tenant, upload, scopes, expires_at, now, max_bytes) =
        (line(), line(), line(), line(), line(), line());
    let edits = lines.next().unwrap_or_default();

    let claims = TokenClaims {
        tenant: Tenant::parse(&tenant).unwrap_or_else(|_| Tenant::default_tenant()),
        upload,
        scopes: Scopes::of(
            &scopes
                .split(',')
                .filter_map(Scope::parse)
                .collect::<Vec<_>>(),
        ),
        expires_at: expires_at.parse().unwrap_or_default(),
        max_bytes: max_bytes.parse().ok(),
        issuer: (max_bytes.parse::<u64>().is_err()
            && !max_bytes.is_empty()
            && max_bytes.len() <= 64)
            .then(|| max_bytes.clone()),
        // A link when the expiry is odd: both kinds round-trip.
        link: expires_at.parse::<u64>().is_ok_and(|e| e % 2 == 1),
    };
    let now: u64 = now.parse().unwrap_or_default();
    let signer = TokenSigner::new(&Secret::new("the current secret, 32 bytes long"), &[]);
    let token = signer.sign(&claims);

    // Unchanged: exactly the claims, until it expires.
    let verified = signer.verify(&token, now);
    let valid_upload = UploadId::new(&claims.tenant, &claims.upload).is_ok();
    if token.len() > MAX_TOKEN_LEN {
        assert!(
            !valid_upload,
            "a token for a valid id is too long: {token:?}"
        );
        assert_eq!(verified, Err(TokenError::Malformed));
    } else if now >= claims.expires_at {
        assert_eq!(verified, Err(TokenError::Expired));
    } else if valid_upload {
        assert_eq!(verified.as_ref(), Ok(&claims));
    } else {
        assert_eq!(verified, Err(TokenError::Malformed));
    }

    // Another secret: never.
    let other = TokenSigner::new(&Secret::new("another secret, also 32 bytes!!"), &[]);
    assert!(other.verify(&token, now).is_err());

    // Changed: never, whatever the change (verified before the expiry, where one exists).
    let mut bytes = token.clone().into_bytes();
    for edit in edits.chunks_exact(4) {
        let at = usize::from(u16::from_le_bytes([edit[1], edit[2]])) % (bytes.len() + 1);
        match edit[0] % 4 {
            0 => {
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= edit[3];
                }
            }
            1 => bytes.insert(at, edit[3]),
            2 => {
                if at < bytes.len() {
                    bytes.remove(at);
                }
            }
            _ => bytes.truncate(at),
        }
    }
    let Ok(changed) = String::from_utf8(bytes) else {
        return;
    };
    if changed != token {
        let before_expiry = now.min(claims.expires_at.saturating_sub(1));
        let result = signer.verify(&changed, before_expiry);
        assert!(
            result.is_err(),
            "a changed token verified: {token:?} became {changed:?}, read as {result:?}"
        );
    }
});
