//! `stitch serve`: the single-node server.
//!
//! Access with no key configured (`auth.mode = "keys"`, no `[[auth.keys]]`, no
//! `auth.keys_file`): on a loopback address the API's protected mode serves this machine's
//! clients as they are, so the first run needs no step. On any other address a server must
//! not be open, and protected mode would refuse every client, so the first start makes a key
//! (all scopes, the default tenant), writes its `[[keys]]` table — the SHA-256, never the
//! key — to `<storage root>/keys.toml` (mode 0600), serves with it as `auth.keys_file`, and
//! prints the key once on stderr. Later starts with nothing configured use that file on any
//! address (once a server has keys, they are required), and say where it is.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use stitch_common::auth::{Scopes, new_api_key};
use stitch_common::backends::Backends;
use stitch_common::config::{AuthMode, Settings};
use stitch_common::id::Tenant;
use tokio::sync::watch;

use crate::Failure;
use crate::keys::{KeyTable, replace_file};

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (TOML or YAML); `STITCH__*` environment variables override it.
    #[arg(long, env = "STITCH_CONFIG")]
    config: Option<PathBuf>,
    /// The embedded database [default: <storage root>/stitch.db].
    #[arg(long)]
    db: Option<PathBuf>,
}

/// The keys file `stitch serve` makes and uses when nothing else is configured.
pub fn generated_keys_file(settings: &Settings) -> PathBuf {
    settings.storage.root.join("keys.toml")
}

/// The id of the key made at first start.
const FIRST_KEY_ID: &str = "serve-first-key";

/// How this start gets its keys, when the configuration names none.
enum KeysAtStart {
    /// Configured keys, `auth.mode = "none"`, or protected mode on loopback: nothing to do.
    AsConfigured,
    /// The keys file an earlier start made.
    Existing(PathBuf),
    /// A key made now, to show once.
    Made { path: PathBuf, key: String },
}

/// Decides (and, at a first start on a non-loopback address, makes) the keys of this start,
/// pointing `auth.keys_file` at the generated file when it is used.
fn keys_at_start(settings: &mut Settings) -> Result<KeysAtStart, Failure> {
    let auth = &settings.auth;
    if auth.mode != AuthMode::Keys || !auth.keys.is_empty() || auth.keys_file.is_some() {
        return Ok(KeysAtStart::AsConfigured);
    }
    let path = generated_keys_file(settings);
    if path.exists() {
        settings.auth.keys_file = Some(path.clone());
        return Ok(KeysAtStart::Existing(path));
    }
    if settings.http.bind.ip().is_loopback() {
        return Ok(KeysAtStart::AsConfigured);
    }
    std::fs::create_dir_all(&settings.storage.root)
        .with_context(|| format!("creating {}", settings.storage.root.display()))?;
    let key = new_api_key();
    let table = KeyTable::new(&key, FIRST_KEY_ID, Tenant::DEFAULT, Scopes::all())
        .map_err(|e| Failure::Other(anyhow::anyhow!("the first key's table: {e}")))?;
    let content = format!(
        "# API keys of this `stitch serve` (auth.keys_file), re-read when it changes. Made at\n\
         # its first start on a non-loopback address; the key itself was shown once and is\n\
         # not stored. Add keys with `stitch keys new --tenant T --append {}`.\n\n{}",
        path.display(),
        table.toml("keys")
    );
    replace_file(&path, &content, 0o600, |written| {
        stitch_common::auth::KeyRing::load(&[], Some(written.to_owned()))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    })
    .map_err(|e| Failure::Other(anyhow::anyhow!("writing {}: {e}", path.display())))?;
    settings.auth.keys_file = Some(path.clone());
    Ok(KeysAtStart::Made { path, key })
}

/// The URL a client on another machine would use (the host unknown for a wildcard bind).
fn server_url(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://<this host>:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

fn announce(keys: &KeysAtStart, addr: SocketAddr) {
    match keys {
        KeysAtStart::AsConfigured => {}
        KeysAtStart::Existing(path) => {
            tracing::info!(keys_file = %path.display(), "API keys from the keys file made at the first start");
        }
        KeysAtStart::Made { path, key } => {
            tracing::info!(keys_file = %path.display(), "no API key was configured and this server is not on a loopback address: made one (shown once on stderr)");
            // On stderr, not in the log: logs are kept and shipped, this line is not.
            eprintln!(
                "\nstitch serve: this server listens on {addr}, not on a loopback address, and had no API key.\n\
                 It made one (all scopes, default tenant); only its SHA-256 is kept, in {file}.\n\
                 The key, shown only this once:\n\n    {key}\n\n\
                 Use it: STITCH_KEY={key} stitch upload FILE --server {url}\n",
                file = path.display(),
                url = server_url(addr),
            );
        }
    }
}

pub async fn run(args: ServeArgs) -> Result<(), Failure> {
    let mut settings = Settings::load(args.config.as_deref(), &[])
        .map_err(|e| Failure::Usage(format!("invalid configuration: {e}")))?;
    let _telemetry = stitch_common::telemetry::init(&settings.log, &settings.tracing, "stitch");
    let keys = keys_at_start(&mut settings)?;
    let db = args
        .db
        .unwrap_or_else(|| stitch_common::embedded::default_path(&settings));
    let backends = Backends::embedded(&settings, &db)
        .with_context(|| format!("opening the embedded database {}", db.display()))?;
    tracing::info!(db = %db.display(), storage = %settings.storage.root.display(), "single-node mode");
    let worker = stitch_worker::Worker::without_probes(&settings, backends.clone())?;
    let api = stitch_api::Application::build_with(&settings, &backends)
        .await?
        .with_routes(worker.admin_routes()?);
    announce(&keys, api.local_addr());

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        stitch_common::shutdown::signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let (api_result, worker_result) = tokio::join!(
        api.run_until_stopped(stopped(stop_rx.clone())),
        worker.run_until_stopped(stopped(stop_rx)),
    );
    api_result?;
    worker_result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn settings(bind: &str, root: &Path) -> Settings {
        let mut s = Settings::default();
        s.http.bind = bind.parse().unwrap();
        s.storage.root = root.to_owned();
        s
    }

    #[test]
    fn a_loopback_server_with_no_key_stays_in_protected_mode_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings("127.0.0.1:0", dir.path());
        assert!(matches!(
            keys_at_start(&mut s).unwrap(),
            KeysAtStart::AsConfigured
        ));
        assert!(s.auth.keys_file.is_none());
        assert!(!generated_keys_file(&s).exists());
    }

    #[test]
    fn configured_keys_or_mode_none_are_left_alone_on_any_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut none = settings("0.0.0.0:0", dir.path());
        none.auth.mode = AuthMode::None;
        assert!(matches!(
            keys_at_start(&mut none).unwrap(),
            KeysAtStart::AsConfigured
        ));
        let mut filed = settings("0.0.0.0:0", dir.path());
        filed.auth.keys_file = Some(dir.path().join("mine.toml"));
        assert!(matches!(
            keys_at_start(&mut filed).unwrap(),
            KeysAtStart::AsConfigured
        ));
        assert_eq!(filed.auth.keys_file, Some(dir.path().join("mine.toml")));
        assert!(!generated_keys_file(&filed).exists());
    }

    #[test]
    fn a_first_start_elsewhere_makes_a_key_that_later_starts_reuse() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("not-yet");
        let mut first = settings("0.0.0.0:0", &root);
        let KeysAtStart::Made { path, key } = keys_at_start(&mut first).unwrap() else {
            panic!("no key made");
        };
        assert_eq!(first.auth.keys_file.as_ref(), Some(&path));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&key), "the key itself is stored");
        assert!(text.contains(&stitch_common::auth::key_sha256(&key)));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let ring = stitch_common::auth::KeyRing::load(&[], Some(path.clone())).unwrap();
        let principal = ring.principal(&key).unwrap();
        assert!(principal.tenant.is_default());
        assert_eq!(principal.scopes, Scopes::all());

        for bind in ["0.0.0.0:0", "127.0.0.1:0"] {
            let mut later = settings(bind, &root);
            match keys_at_start(&mut later).unwrap() {
                KeysAtStart::Existing(p) => assert_eq!(p, path),
                _ => panic!("{bind}: the file was not reused"),
            }
            assert_eq!(later.auth.keys_file.as_ref(), Some(&path));
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
