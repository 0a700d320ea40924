//! The checker, run once the nemesis stopped and the clients finished (or gave up at the
//! hard stop):
//!
//! - every upload whose bytes were all acknowledged is `completed` with the source's size
//!   and MD5, and its download is the source's bytes; none is still `merging` past the
//!   sweeper's stuck-merge horizon (nor `failed`);
//! - every other upload is still resumable to what was acknowledged (its status lists every
//!   acknowledged chunk, its `HEAD` reports at least the acknowledged offset);
//! - every completed upload was announced under exactly one distinct `event_id`, the one its
//!   completion record on storage holds; no upload was announced as failed;
//! - after a janitor pass, a completed upload's directory holds its manifest, its merged
//!   file and that file's completion record, nothing else; no temporary file is left in any
//!   upload's directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::Digest as _;
use stitch_common::id::UploadId;
use stitch_testkit::events::DurableTap;
use stitch_testkit::{ApiClient, TestEnv};
use tokio::time::Instant;

use crate::client::{Acked, UploadRecord};
use crate::cluster::STUCK_MERGE_HORIZON;

#[derive(Default, Debug)]
pub struct Findings {
    pub violations: Vec<String>,
    pub completed: usize,
    pub resumable: usize,
    pub completed_bytes: u64,
    pub completion_events: usize,
}

impl Findings {
    fn violation(&mut self, what: String) {
        println!("soak: VIOLATION {what}");
        self.violations.push(what);
    }
}

pub struct Checker<'a> {
    pub env: &'a TestEnv,
    pub api: ApiClient,
    pub tap: &'a DurableTap,
}

impl Checker<'_> {
    pub async fn check(&self, records: &[UploadRecord]) -> anyhow::Result<Findings> {
        let mut findings = Findings::default();
        // The sweeper rescues a merge left by a dead worker after its horizon; give it that,
        // a lease and a retry's delays, and some slack for a loaded machine.
        let deadline = Instant::now() + STUCK_MERGE_HORIZON + Duration::from_secs(90);
        let mut completed = BTreeMap::new();
        for record in records {
            if let Some(what) = &record.violation {
                findings.violation(format!("client: {what}"));
                continue;
            }
            let Some(id) = &record.id else { continue };
            if record.all_acked {
                if self
                    .check_completed(record, id, deadline, &mut findings)
                    .await
                {
                    completed.insert(id.clone(), record);
                }
            } else {
                self.check_resumable(record, id, &mut findings).await;
            }
        }
        findings.completed = completed.len();
        findings.completed_bytes = completed.values().map(|r| r.spec.len as u64).sum();
        self.check_events(&completed, &mut findings).await?;
        self.check_storage(&completed, &mut findings).await?;
        Ok(findings)
    }

    /// The status, retried while the API or its dependencies are away.
    async fn status(&self, id: &str) -> (u16, serde_json::Value) {
        for _ in 0..60 {
            if let Ok(response) = self.api.status_request(id).send().await {
                let code = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                if !matches!(code, 500 | 502 | 503 | 504) {
                    return (code, serde_json::from_str(&text).unwrap_or_default());
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (0, serde_json::Value::Null)
    }

    async fn check_completed(
        &self,
        record: &UploadRecord,
        id: &str,
        deadline: Instant,
        findings: &mut Findings,
    ) -> bool {
        let status = loop {
            let (code, status) = self.status(id).await;
            let state = status["state"].as_str().unwrap_or_default().to_owned();
            if code == 200 && state != "merging" && state != "receiving" {
                break status;
            }
            if Instant::now() > deadline {
                findings.violation(format!(
                    "{id}: every byte acknowledged, still {code} {state} past the sweeper's horizon: {status}"
                ));
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        if status["state"] != "completed" {
            findings.violation(format!("{id}: every byte acknowledged, but {status}"));
            return false;
        }
        if status["size"] != record.spec.len as u64 || status["md5"] != record.md5.as_str() {
            findings.violation(format!(
                "{id}: completed with size {} and MD5 {}, the source has {} and {}",
                status["size"], status["md5"], record.spec.len, record.md5
            ));
            return false;
        }
        let downloaded = match self
            .api
            .client
            .get(self.api.url(&format!("/files/{id}")))
            .send()
            .await
        {
            Ok(response) if response.status() == 200 => response.bytes().await.ok(),
            _ => None,
        };
        match downloaded {
            Some(bytes) if crate::md5_hex(&bytes) == record.md5 => true,
            Some(bytes) => {
                findings.violation(format!(
                    "{id}: the download ({} bytes, MD5 {}) is not the source ({} bytes, MD5 {})",
                    bytes.len(),
                    crate::md5_hex(&bytes),
                    record.spec.len,
                    record.md5
                ));
                false
            }
            None => {
                findings.violation(format!("{id}: completed, but the download failed"));
                false
            }
        }
    }

    async fn check_resumable(&self, record: &UploadRecord, id: &str, findings: &mut Findings) {
        let (code, status) = self.status(id).await;
        let state = status["state"].as_str().unwrap_or_default();
        let ok = code == 200
            && match &record.acked {
                Acked::Chunks(acked) => {
                    let stored: BTreeSet<u64> = status["uploaded_chunks"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|i| i.as_u64()).collect())
                        .unwrap_or_default();
                    acked.is_subset(&stored) || state == "merging" || state == "completed"
                }
                Acked::Offset(acked) => {
                    status["bytes_received"].as_u64().unwrap_or(0) >= *acked
                        || state == "merging"
                        || state == "completed"
                }
            };
        if ok {
            findings.resumable += 1;
        } else {
            findings.violation(format!(
                "{id}: not resumable to what was acknowledged ({:?}): {code} {status}",
                record.acked
            ));
        }
    }

    async fn check_events(
        &self,
        completed: &BTreeMap<String, &UploadRecord>,
        findings: &mut Findings,
    ) -> anyhow::Result<()> {
        let settings = self.env.settings();
        let backends = stitch_common::backends::Backends::distributed(&settings)?;
        let deadline = Instant::now() + Duration::from_secs(90);
        // Everything published so far, at once (one connection, not one per upload).
        while self.tap.collect().await.is_err() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for id in completed.keys() {
            let uid = UploadId::parse(id)?;
            let record = backends
                .storage
                .inventory(&uid)
                .await?
                .and_then(|i| i.completion);
            let Some(record) = record else {
                findings.violation(format!("{id}: completed without a completion record"));
                continue;
            };
            let mut ids = distinct(&self.tap.seen_of(id), "upload.completed");
            while ids.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(500)).await;
                ids = distinct(&self.tap.events_of(id).await, "upload.completed");
            }
            findings.completion_events += ids.len();
            if ids != [record.event_id.clone()] {
                findings.violation(format!(
                    "{id}: completion event ids {ids:?}, the completion record holds {}",
                    record.event_id
                ));
            }
            let failed = distinct(&self.tap.seen_of(id), "upload.failed");
            if !failed.is_empty() {
                findings.violation(format!("{id}: announced as failed too: {failed:?}"));
            }
        }
        Ok(())
    }

    /// A janitor pass, then what storage holds.
    async fn check_storage(
        &self,
        completed: &BTreeMap<String, &UploadRecord>,
        findings: &mut Findings,
    ) -> anyhow::Result<()> {
        let mut settings = self.env.settings();
        // Nothing is in flight any more: whatever is left over is past any use.
        settings.janitor.grace = stitch_common::config::Interval(Duration::ZERO);
        let backends = stitch_common::backends::Backends::distributed(&settings)?;
        let janitor = stitch_worker::janitor::Janitor::new(&backends, &settings);
        janitor.sweep_once().await?;
        let storage = &backends.storage;
        for id in completed.keys() {
            let uid = UploadId::parse(id)?;
            let Some(record) = storage.inventory(&uid).await?.and_then(|i| i.completion) else {
                continue; // Reported with the events.
            };
            let expected: BTreeSet<PathBuf> = [
                storage.manifest_path(&uid),
                storage.attempt(&uid, record.fence).merged,
                storage.completion_path(&uid, record.fence),
            ]
            .into();
            let found = files_under(&storage.upload_dir(&uid));
            if found != expected {
                findings.violation(format!(
                    "{id}: after a janitor pass its directory holds {:?}, expected {:?}",
                    found.difference(&expected).collect::<Vec<_>>(),
                    expected
                ));
            }
        }
        // Temporary files anywhere (a merge's or a chunk's in-flight copy).
        let uploads = self.env.storage_root.join("uploads");
        for file in files_under(&uploads) {
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.ends_with(".tmp") || n.ends_with(".part")) {
                findings.violation(format!(
                    "a temporary file survived the janitor: {}",
                    file.display()
                ));
            }
        }
        Ok(())
    }
}

fn distinct(events: &[serde_json::Value], kind: &str) -> Vec<String> {
    let ids: BTreeSet<String> = events
        .iter()
        .filter(|e| e["type"] == kind)
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect();
    ids.into_iter().collect()
}

fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            } else {
                files.insert(entry.path());
            }
        }
    }
    files
}

/// The MD5 of `bytes` in hex.
pub fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(md5::Md5::digest(bytes))
}
