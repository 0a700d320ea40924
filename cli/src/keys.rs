//! `stitch keys new`: a fresh API key and the configuration that accepts it.
//!
//! The key is printed once and never stored: what a server is configured with is its SHA-256,
//! in a `[[auth.keys]]` table of the configuration file or a `[[keys]]` table of the keys file
//! (`auth.keys_file`, which servers re-read when it changes). `--append FILE` adds the table to
//! a keys file by writing the whole new file beside it and renaming it over the old one, so a
//! server reading it sees the old file or the new one, never half of one; the new file is
//! checked with the servers' own loader first.
//!
//! `stitch serve` uses the same pieces for the key it makes at first start ([`KeyTable`],
//! [`replace_file`]).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use stitch_common::auth::{KeyRing, Scope, Scopes, key_sha256, new_api_key};
use stitch_common::config::ApiKeyEntry;
use stitch_common::config::check_key_entry;

use crate::Failure;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make an API key: prints the key (once) and the table that configures a server with it.
    New(NewArgs),
}

#[derive(Args)]
pub struct NewArgs {
    /// The tenant the key acts for: 1-64 of A-Z a-z 0-9 _ -.
    #[arg(long)]
    tenant: String,
    /// The key's name in logs and metrics (not secret) [default: <tenant>-<6 random hex>].
    #[arg(long)]
    id: Option<String>,
    /// What the key may do, comma-separated: upload, read, delete, admin
    /// [default: upload,read,delete].
    #[arg(long, value_delimiter = ',', value_name = "SCOPES")]
    scopes: Option<Vec<String>>,
    /// Also add the `[[keys]]` table to this keys file (created with mode 0600 if missing),
    /// atomically.
    #[arg(long, value_name = "FILE")]
    append: Option<PathBuf>,
    /// Print the key and its tables as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(command: KeysCommand) -> Result<(), Failure> {
    match command {
        KeysCommand::New(args) => new(args),
    }
}

/// One key's configuration: everything but the key.
pub struct KeyTable {
    pub id: String,
    pub tenant: String,
    pub sha256: String,
    pub scopes: Scopes,
}

impl KeyTable {
    /// The table for `key`, checked as a server checks it (a bad tenant, id or scope is the
    /// message a server would give).
    pub fn new(key: &str, id: &str, tenant: &str, scopes: Scopes) -> Result<Self, String> {
        let table = Self {
            id: id.to_owned(),
            tenant: tenant.to_owned(),
            sha256: key_sha256(key),
            scopes,
        };
        check_key_entry(&table.entry())?;
        Ok(table)
    }

    fn entry(&self) -> ApiKeyEntry {
        ApiKeyEntry {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            sha256: self.sha256.clone(),
            scopes: Some(self.scopes.names().into_iter().map(str::to_owned).collect()),
        }
    }

    /// The TOML table under `header` (`auth.keys` or `keys`).
    pub fn toml(&self, header: &str) -> String {
        let scopes: Vec<String> = self.scopes.names().into_iter().map(quoted).collect();
        format!(
            "[[{header}]]\nid = {}\ntenant = {}\nsha256 = {}\nscopes = [{}]\n",
            quoted(&self.id),
            quoted(&self.tenant),
            quoted(&self.sha256),
            scopes.join(", "),
        )
    }
}

/// A TOML basic string.
fn quoted(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

/// What `--json` prints.
#[derive(Serialize)]
struct Issued<'a> {
    key: &'a str,
    id: &'a str,
    tenant: &'a str,
    scopes: Vec<&'static str>,
    sha256: &'a str,
    /// The table for a configuration file.
    auth_keys_table: String,
    /// The table for a keys file.
    keys_file_table: String,
    appended_to: Option<String>,
}

fn new(args: NewArgs) -> Result<(), Failure> {
    let scopes = match &args.scopes {
        None => Scopes::default_for_keys(),
        Some(names) => Scopes::parse(names.iter().map(|s| s.trim())).map_err(|unknown| {
            Failure::Usage(format!(
                "--scopes: unknown scope {unknown:?} (choose from {})",
                Scope::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?,
    };
    if scopes == Scopes::default() {
        return Err(Failure::Usage("--scopes: name at least one scope".into()));
    }
    if stitch_common::id::Tenant::parse(&args.tenant).is_err() {
        return Err(Failure::Usage(format!(
            "--tenant {:?}: a tenant is 1-64 of A-Z, a-z, 0-9, '_', '-'",
            args.tenant
        )));
    }
    let id = args.id.clone().unwrap_or_else(|| default_id(&args.tenant));
    let key = new_api_key();
    let table = KeyTable::new(&key, &id, &args.tenant, scopes).map_err(Failure::Usage)?;
    if let Some(file) = &args.append {
        append(file, &table)?;
    }
    let issued = Issued {
        key: &key,
        id: &table.id,
        tenant: &table.tenant,
        scopes: table.scopes.names(),
        sha256: &table.sha256,
        auth_keys_table: table.toml("auth.keys"),
        keys_file_table: table.toml("keys"),
        appended_to: args.append.as_ref().map(|f| f.display().to_string()),
    };
    if args.json {
        println!("{}", serde_json::to_string(&issued).unwrap_or_default());
        return Ok(());
    }
    println!("The key (shown only now: Stitch keeps its SHA-256, never the key):\n");
    println!("    {key}\n");
    println!(
        "Clients send it as `Authorization: Bearer <key>`; the stitch client takes --key or STITCH_KEY.\n"
    );
    match &args.append {
        Some(file) => println!(
            "Added to {} as key {:?} of tenant {:?}; servers reading that file (auth.keys_file) accept it within a second, without a restart.",
            file.display(),
            table.id,
            table.tenant
        ),
        None => {
            println!("In a configuration file (STITCH_CONFIG):\n");
            println!("{}", issued.auth_keys_table);
            println!("Or in a keys file (auth.keys_file, re-read when it changes):\n");
            print!("{}", issued.keys_file_table);
        }
    }
    Ok(())
}

/// `<tenant>-<6 hex>`, within the 64 characters of an id.
fn default_id(tenant: &str) -> String {
    let suffix = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let room = 64 - suffix.len() - 1;
    // A valid tenant is ASCII: any byte index is a character boundary.
    let prefix = &tenant[..tenant.len().min(room)];
    format!("{prefix}-{suffix}")
}

/// The content of a keys file, as the servers read it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFileContent {
    #[serde(default)]
    keys: Vec<ApiKeyEntry>,
}

/// Adds `table` to the keys file `file` (a new file if it does not exist).
fn append(file: &Path, table: &KeyTable) -> Result<(), Failure> {
    let shown = file.display();
    let (existing, mode) = match std::fs::read_to_string(file) {
        Ok(text) => {
            let mode = std::fs::metadata(file)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o600);
            (text, mode)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0o600),
        Err(e) => return Err(Failure::Other(anyhow::anyhow!("reading {shown}: {e}"))),
    };
    let content: KeysFileContent = toml::from_str(&existing).map_err(|e| {
        Failure::Usage(format!(
            "{shown} is not a keys file (`[[keys]]` tables), left unchanged: {e}"
        ))
    })?;
    if content.keys.iter().any(|k| k.id == table.id) {
        return Err(Failure::Usage(format!(
            "{shown} already has a key with id {:?}: choose another --id",
            table.id
        )));
    }
    let mut text = existing;
    if !text.is_empty() {
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push('\n');
    }
    text.push_str(&table.toml("keys"));
    replace_file(file, &text, mode, |written| {
        KeyRing::load(&[], Some(written.to_owned()))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    })
    .map_err(|e| Failure::Other(anyhow::anyhow!("writing {shown}: {e}")))
}

/// Replaces `path` with `content`: written to a temp file beside it (with `mode`), fsynced,
/// checked by `check`, renamed over `path`, then the directory fsynced. A reader sees the
/// old file or the new one, never a part of either; a failed check leaves `path` as it was.
pub fn replace_file(
    path: &Path,
    content: &str,
    mode: u32,
    check: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| "not a file name".to_owned())?
        .to_string_lossy();
    let temp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(|e| e.to_string())?;
        // The umask may have narrowed `mode`: say it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())?;
        file.write_all(content.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| e.to_string())?;
        check(&temp).map_err(|e| format!("the new file would not be accepted: {e}"))?;
        std::fs::rename(&temp, path).map_err(|e| e.to_string())?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| e.to_string())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reads_back_as_the_entry_it_was_made_from() {
        let scopes = Scopes::of(&[Scope::Read, Scope::Admin]);
        let table = KeyTable::new("sk_x", "ops \"night\" \\ shift", "acme", scopes).unwrap();
        let content: KeysFileContent = toml::from_str(&table.toml("keys")).unwrap();
        assert_eq!(content.keys, vec![table.entry()]);
        assert_eq!(content.keys[0].id, "ops \"night\" \\ shift");
        assert_eq!(
            content.keys[0].scopes.as_deref(),
            Some(&["read".to_owned(), "admin".to_owned()][..])
        );
    }

    #[test]
    fn default_ids_fit_the_limit_of_an_id() {
        let long = "t".repeat(64);
        let id = default_id(&long);
        assert_eq!(id.len(), 64);
        assert!(KeyTable::new("k", &id, &long, Scopes::default_for_keys()).is_ok());
        assert!(default_id("acme").starts_with("acme-"));
    }

    #[test]
    fn a_replacement_that_fails_its_check_leaves_the_file_and_no_temp_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "old").unwrap();
        let refused = replace_file(&path, "new", 0o600, |_| Err("no".into()));
        assert!(refused.is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        replace_file(&path, "new", 0o640, |_| Ok(())).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }
}
