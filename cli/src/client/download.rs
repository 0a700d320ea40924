//! `stitch download ID [OUT]`: fetches a completed file into `OUT.part`, continuing a partial
//! download with an HTTP range (guarded by `If-Range` on the file's ETag, so a different file
//! restarts from zero), verifies the MD5 the server computed at merge time, then renames
//! `OUT.part` to `OUT`.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;

use super::{Client, ServerArgs};
use crate::Failure;
use crate::progress::Progress;

#[derive(Args)]
pub struct DownloadArgs {
    /// The upload's id.
    id: String,
    /// Where to write the file [default: the upload's file name, in the current directory].
    out: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
    /// Attempts per request before giving up.
    #[arg(long, default_value_t = 10)]
    retries: u32,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Serialize)]
struct Outcome {
    upload_id: String,
    path: String,
    size: u64,
    md5: String,
    /// Bytes fetched by this run (the rest came from an earlier, interrupted one).
    bytes_fetched: u64,
}

/// The final name from the server's file name, reduced to a plain name in this directory.
fn default_name(filename: Option<&str>, id: &str) -> PathBuf {
    let name = filename
        .and_then(|n| Path::new(n).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| id.to_owned());
    PathBuf::from(name)
}

pub async fn run(args: DownloadArgs) -> Result<(), Failure> {
    let client = args.server.client(args.retries)?;
    let Some(status) = client.status(&args.id).await? else {
        return Err(Failure::Rejected(format!(
            "no upload {:?} on {}",
            args.id, args.server.server
        )));
    };
    match status.state.as_str() {
        "completed" => {}
        "failed" => {
            return Err(Failure::UploadFailed(
                status.failure_reason.unwrap_or_default(),
            ));
        }
        other => {
            return Err(Failure::Rejected(format!(
                "upload {} is {other}, not completed",
                args.id
            )));
        }
    }
    let (Some(size), Some(md5)) = (status.size, status.md5.clone()) else {
        return Err(Failure::Rejected(
            "the server reported no size or MD5".into(),
        ));
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_name(status.filename.as_deref(), &args.id));
    let mut part_name = out.as_os_str().to_owned();
    part_name.push(".part");
    let part = PathBuf::from(part_name);

    let fetch = fetch(&client, &args, &part, size, &md5);
    let fetched = tokio::select! {
        result = fetch => result?,
        () = super::interrupted() => return Err(Failure::Interrupted),
    };

    // Verify everything on disk, not just what this run fetched.
    let actual = tokio::task::spawn_blocking({
        let part = part.clone();
        move || hash_file(&part)
    })
    .await
    .map_err(|e| Failure::Other(anyhow::anyhow!("hashing failed: {e}")))??;
    if actual != md5 {
        let _ = std::fs::remove_file(&part);
        return Err(Failure::Other(anyhow::anyhow!(
            "the downloaded file's MD5 is {actual}, the server's is {md5}; the partial file was removed, run again"
        )));
    }
    std::fs::rename(&part, &out).with_context(|| format!("renaming to {}", out.display()))?;
    let outcome = Outcome {
        upload_id: args.id.clone(),
        path: out.display().to_string(),
        size,
        md5,
        bytes_fetched: fetched,
    };
    if args.json {
        println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
    } else if !args.quiet {
        println!(
            "saved    {} ({} bytes, MD5 {} verified)",
            outcome.path, size, outcome.md5
        );
    }
    Ok(())
}

/// Appends the rest of the file to `part`; returns the bytes fetched.
async fn fetch(
    client: &Client,
    args: &DownloadArgs,
    part: &Path,
    size: u64,
    md5: &str,
) -> Result<u64, Failure> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .with_context(|| format!("opening {}", part.display()))?;
    let url = client.url(&format!("/files/{}", args.id));
    let etag = format!("\"{md5}\"");
    let resume_from = if have > 0 && have < size { have } else { 0 };
    let response = client
        .send("download", || {
            let request = client.http().get(&url);
            if resume_from > 0 {
                request
                    .header(reqwest::header::RANGE, format!("bytes={resume_from}-"))
                    .header(reqwest::header::IF_RANGE, &etag)
            } else {
                request
            }
        })
        .await?;
    let response = client.expect_success(response).await?;
    let start = if response.status() == reqwest::StatusCode::PARTIAL_CONTENT {
        resume_from
    } else {
        0 // The whole file: start over.
    };
    file.set_len(start).context("truncating the partial file")?;
    file.seek(std::io::SeekFrom::Start(start))
        .context("seeking the partial file")?;
    let progress = Progress::new("download", size, args.quiet);
    progress.inc(start);
    let mut fetched = 0u64;
    let mut body = response.bytes_stream();
    while let Some(block) = body.next().await {
        let block = block.context("reading the download")?;
        file.write_all(&block).context("writing the file")?;
        fetched += block.len() as u64;
        progress.inc(block.len() as u64);
    }
    file.sync_all().context("syncing the file")?;
    progress.finish();
    if start + fetched != size {
        return Err(Failure::Other(anyhow::anyhow!(
            "the download ended at {} of {size} bytes; run again to resume",
            start + fetched
        )));
    }
    Ok(fetched)
}

fn hash_file(path: &Path) -> Result<String, Failure> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut md5 = stitch_common::digest::Md5Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).context("reading the file")?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
    }
    Ok(md5.finalize().to_hex())
}
