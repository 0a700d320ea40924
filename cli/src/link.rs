//! `stitch link new`: an "upload here" link for the upload page, made with the server's token
//! secret (read from the same configuration the server uses: `--config` / `STITCH_CONFIG` and
//! `STITCH__…`). Whoever has the link may upload any number of files to one tenant, each at
//! most `--max-bytes`, until it expires, and see those uploads only; nothing is stored, so a
//! link is revoked only by its expiry or by rotating `auth.token_secret`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use stitch_common::auth::{Scope, Scopes, TokenClaims, TokenSigner, new_link_prefix};
use stitch_common::config::{ByteSize, Interval, Settings};
use stitch_common::id::{Tenant, UploadId};

use crate::Failure;

#[derive(Subcommand)]
pub enum LinkCommand {
    /// Make an "upload here" link for the upload page (needs `auth.token_secret`).
    New(NewArgs),
}

#[derive(Args)]
pub struct NewArgs {
    /// The tenant the uploads go to.
    #[arg(long)]
    tenant: String,
    /// How long the link works, e.g. `1d`, `12h` (at most `auth.token_max_ttl`).
    #[arg(long, default_value = "1d")]
    ttl: String,
    /// The largest file it takes, e.g. `50GiB`.
    #[arg(long)]
    max_bytes: Option<String>,
    /// The server's configuration file [env: STITCH_CONFIG].
    #[arg(long, env = "STITCH_CONFIG")]
    config: Option<PathBuf>,
    /// The page's base URL [default: `http.public_url`, else `http://<http.bind>`].
    #[arg(long)]
    server: Option<String>,
}

pub fn run(command: LinkCommand) -> Result<(), Failure> {
    match command {
        LinkCommand::New(args) => new(args),
    }
}

fn new(args: NewArgs) -> Result<(), Failure> {
    let settings = Settings::load(args.config.as_deref(), &[])
        .map_err(|e| Failure::Usage(format!("the configuration: {e}")))?;
    let secret = settings.auth.token_secret.as_ref().ok_or_else(|| {
        Failure::Usage(
            "links are tokens: set auth.token_secret (STITCH__AUTH__TOKEN_SECRET)".into(),
        )
    })?;
    let tenant =
        Tenant::parse(&args.tenant).map_err(|e| Failure::Usage(format!("--tenant: {e}")))?;
    let ttl = Interval::parse(&args.ttl).map_err(|e| Failure::Usage(format!("--ttl: {e}")))?;
    if ttl.0.is_zero() || ttl.0 > settings.auth.token_max_ttl.0 {
        return Err(Failure::Usage(format!(
            "--ttl must be between 1s and auth.token_max_ttl ({}s)",
            settings.auth.token_max_ttl.0.as_secs()
        )));
    }
    let max_bytes = match args.max_bytes.as_deref() {
        None => None,
        Some(raw) => Some(
            ByteSize::parse(raw)
                .ok_or_else(|| Failure::Usage(format!("--max-bytes: {raw:?} is not a size")))?
                .0,
        ),
    };
    let prefix = new_link_prefix();
    UploadId::new(&tenant, &prefix).map_err(|e| Failure::Usage(e.to_string()))?;
    let expires_at = (stitch_common::now_ms() + ttl.0.as_millis() as u64).div_ceil(1000);
    let token =
        TokenSigner::new(secret, &settings.auth.previous_token_secrets).sign(&TokenClaims {
            tenant,
            upload: prefix,
            scopes: Scopes::of(&[Scope::Upload, Scope::Read]),
            expires_at,
            max_bytes,
            issuer: None,
            link: true,
        });
    let base = args
        .server
        .or(settings.http.public_url.clone())
        .unwrap_or_else(|| format!("http://{}", settings.http.bind));
    println!("{}/#token={token}", base.trim_end_matches('/'));
    Ok(())
}
