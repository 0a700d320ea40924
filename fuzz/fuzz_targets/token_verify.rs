//! Capability tokens as anyone can send them: `TokenSigner::verify` on arbitrary text.
//!
//! Input: the token, as text. The signer holds this target's fixed secrets (a current one and
//! a previous one, as during a rotation); the seed corpus holds tokens signed with them, so
//! the fuzzer starts from genuine tokens and changes them. Properties: it never panics; what
//! does not have a token's form is refused as malformed, not as badly signed; and a token
//! that verifies is one this signer (or its predecessor) made from those claims: re-signing
//! the claims gives back the same token (or, for the previous secret, the previous signer
//! does), so nothing but a genuine token is ever accepted.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stitch_common::auth::TokenSigner;
use stitch_common::auth::token::{TokenError, looks_like_token};
use stitch_common::config::Secret;

/// The secrets the seed corpus was signed with (docs/fuzzing.md says how to make more).
const CURRENT: &str = "stitch-fuzz-current-token-secret-0001";
const PREVIOUS: &str = "stitch-fuzz-previous-token-secret-0001";
/// "Now" for every verification, so that the seeds never expire: 2023-11-14T22:13:20Z.
const NOW: u64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let signer = TokenSigner::new(&Secret::new(CURRENT), &[Secret::new(PREVIOUS)]);
    let result = signer.verify(token, NOW);
    if !looks_like_token(token) {
        assert_eq!(result, Err(TokenError::Malformed), "{token:?}");
    }
    if let Ok(claims) = result {
        assert!(claims.expires_at > NOW);
        let current = TokenSigner::new(&Secret::new(CURRENT), &[]).sign(&claims);
        let previous = TokenSigner::new(&Secret::new(PREVIOUS), &[]).sign(&claims);
        assert!(
            token == current || token == previous,
            "accepted a token no signer made: {token:?} as {claims:?}"
        );
    }
});
