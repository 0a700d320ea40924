//! API keys: the tables of `[[auth.keys]]` and of `auth.keys_file`, looked up by the SHA-256
//! of the presented key (the key itself is never stored).
//!
//! The keys file is a mounted Secret in Kubernetes, replaced when keys rotate: it is looked
//! at again (one `stat`) at most once per [`RECHECK`], and re-read when its modification time
//! or size changed. A file that became unreadable or invalid keeps the keys last read from
//! it, with an error in the log: a bad edit must not lock every client out.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::{Credential, Principal, Scopes, key_sha256};
use crate::config::{ApiKeyEntry, check_key_entry};
use crate::id::Tenant;

/// How often the keys file is looked at.
pub const RECHECK: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
struct Key {
    id: String,
    tenant: Tenant,
    scopes: Scopes,
}

type Table = HashMap<String, Key>;

/// The keys a process accepts.
pub struct KeyRing {
    configured: Table,
    file: Option<KeysFile>,
}

struct KeysFile {
    path: PathBuf,
    recheck: Duration,
    state: RwLock<FileState>,
}

struct FileState {
    checked: Instant,
    /// Modification time and size when last read.
    stamp: Option<(SystemTime, u64)>,
    keys: Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFileContent {
    #[serde(default)]
    keys: Vec<ApiKeyEntry>,
}

fn table(entries: &[ApiKeyEntry]) -> Result<Table, String> {
    let mut keys = Table::new();
    for entry in entries {
        check_key_entry(entry)?;
        let scopes = match &entry.scopes {
            Some(names) => Scopes::parse(names.iter().map(String::as_str))
                .map_err(|s| format!("unknown scope {s:?}"))?,
            None => Scopes::default_for_keys(),
        };
        let key = Key {
            id: entry.id.clone(),
            tenant: Tenant::parse(&entry.tenant).map_err(|e| e.to_string())?,
            scopes,
        };
        if keys
            .insert(entry.sha256.to_ascii_lowercase(), key)
            .is_some()
        {
            return Err(format!("key {:?}: the same key is listed twice", entry.id));
        }
    }
    Ok(keys)
}

fn read_file(path: &PathBuf) -> Result<((SystemTime, u64), Table), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let stamp = (meta.modified().map_err(|e| e.to_string())?, meta.len());
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let content: KeysFileContent = toml::from_str(&text).map_err(|e| e.to_string())?;
    Ok((stamp, table(&content.keys)?))
}

impl KeyRing {
    /// Keys from the configuration and, if given, the keys file (which must be readable).
    pub fn load(configured: &[ApiKeyEntry], file: Option<PathBuf>) -> anyhow::Result<Self> {
        Self::load_with_recheck(configured, file, RECHECK)
    }

    /// As [`KeyRing::load`], looking at the file again after `recheck` (tests use zero).
    pub fn load_with_recheck(
        configured: &[ApiKeyEntry],
        file: Option<PathBuf>,
        recheck: Duration,
    ) -> anyhow::Result<Self> {
        let configured = table(configured).map_err(|e| anyhow::anyhow!("auth.keys: {e}"))?;
        let file = match file {
            None => None,
            Some(path) => {
                let (stamp, keys) = read_file(&path).map_err(|e| {
                    anyhow::anyhow!("STITCH__AUTH__KEYS_FILE ({}): {e}", path.display())
                })?;
                Some(KeysFile {
                    path,
                    recheck,
                    state: RwLock::new(FileState {
                        checked: Instant::now(),
                        stamp: Some(stamp),
                        keys,
                    }),
                })
            }
        };
        Ok(Self { configured, file })
    }

    pub fn empty() -> Self {
        Self {
            configured: Table::new(),
            file: None,
        }
    }

    /// True when no key is configured at all (protected mode). A keys file counts even
    /// while empty: the operator chose keys.
    pub fn is_empty(&self) -> bool {
        self.configured.is_empty() && self.file.is_none()
    }

    /// Whether a key with this id is configured now (tokens made by a removed key are
    /// refused).
    pub fn has_key_id(&self, id: &str) -> bool {
        self.configured.values().any(|k| k.id == id)
            || self.file.as_ref().is_some_and(|f| {
                f.refresh();
                let state = f.state.read().unwrap_or_else(|e| e.into_inner());
                state.keys.values().any(|k| k.id == id)
            })
    }

    /// The principal of a presented key, if it is one of ours.
    pub fn principal(&self, presented: &str) -> Option<Principal> {
        let hash = key_sha256(presented);
        let found = match self.configured.get(&hash) {
            Some(key) => Some(key.clone()),
            None => self.file.as_ref().and_then(|f| f.lookup(&hash)),
        }?;
        Some(Principal {
            tenant: found.tenant,
            scopes: found.scopes,
            credential: Credential::Key(found.id),
            upload: None,
            max_bytes: None,
            link: false,
        })
    }
}

impl KeysFile {
    fn lookup(&self, hash: &str) -> Option<Key> {
        self.refresh();
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.keys.get(hash).cloned()
    }

    fn refresh(&self) {
        {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            if state.checked.elapsed() < self.recheck {
                return;
            }
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() < self.recheck {
            return;
        }
        state.checked = Instant::now();
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp == state.stamp {
            return;
        }
        match read_file(&self.path) {
            Ok((stamp, keys)) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "keys file re-read");
                state.stamp = Some(stamp);
                state.keys = keys;
            }
            Err(e) => {
                // Keep serving the keys last read; say so once per change.
                if state.stamp.is_some() {
                    tracing::error!(path = %self.path.display(), error = %e, "keys file unreadable; keeping the keys last read");
                }
                state.stamp = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    fn line(id: &str, tenant: &str, key: &str, scopes: &str) -> String {
        format!(
            "[[keys]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nsha256 = \"{}\"\n{scopes}\n",
            key_sha256(key)
        )
    }

    #[test]
    fn the_keys_file_is_re_read_when_it_changes_and_kept_when_it_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, line("a", "acme", "key-a", "")).unwrap();
        let ring = KeyRing::load_with_recheck(&[], Some(path.clone()), Duration::ZERO).unwrap();
        assert_eq!(ring.principal("key-a").unwrap().tenant.as_str(), "acme");
        assert!(ring.principal("key-b").is_none());

        // Rotation: b replaces a.
        std::fs::write(
            &path,
            line("b", "globex", "key-b", "scopes = [\"read\", \"admin\"]"),
        )
        .unwrap();
        let b = ring.principal("key-b").expect("the new key is read");
        assert_eq!(b.tenant.as_str(), "globex");
        assert!(b.scopes.contains(Scope::Admin) && !b.scopes.contains(Scope::Upload));
        assert!(
            ring.principal("key-a").is_none(),
            "the removed key is refused"
        );

        // A broken edit keeps b.
        std::fs::write(&path, "[[keys]\nnot toml").unwrap();
        assert!(ring.principal("key-b").is_some());
        std::fs::remove_file(&path).unwrap();
        assert!(ring.principal("key-b").is_some());
    }

    #[test]
    fn an_unreadable_keys_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        assert!(KeyRing::load(&[], Some(dir.path().join("missing.toml"))).is_err());
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, line("a", "ac/me", "k", "")).unwrap();
        assert!(KeyRing::load(&[], Some(bad)).is_err());
    }
}
