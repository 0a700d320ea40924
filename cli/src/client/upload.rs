//! `stitch upload FILE`: parallel chunked upload over the chunk protocol, resumable.
//!
//! The upload's id is derived from the file (path, size, modification time, chunk size), so
//! running the same command again after an interruption finds the same upload, asks the
//! server which chunks it has, and sends only the others. One thread reads the file in order,
//! computing its MD5 over every byte (uploaded before or not); the chunks to send go to
//! `--parallel` senders. The last chunk to send waits for the MD5 and declares it
//! (`X-File-MD5`), so the server's merge verifies the file end to end.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use md5::Digest;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use stitch_common::digest::Md5Hasher;
use tokio::sync::mpsc;

use super::{Client, ServerArgs, Status};
use crate::Failure;
use crate::progress::Progress;

#[derive(Args)]
pub struct UploadArgs {
    /// The file to upload.
    file: PathBuf,
    #[command(flatten)]
    server: ServerArgs,
    /// Chunk size (e.g. 8MiB, 64MiB).
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Chunks in flight at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Use this upload id instead of one derived from the file.
    #[arg(long)]
    id: Option<String>,
    /// Attempts per request before giving up.
    #[arg(long, default_value_t = 10)]
    retries: u32,
    /// Return once every chunk is sent, without waiting for the merge.
    #[arg(long)]
    no_wait: bool,
    /// Only say what would be sent: the upload's id and the chunks the server is missing.
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_size(raw: &str) -> Result<u64, String> {
    stitch_common::config::ByteSize::parse(raw)
        .map(|s| s.0)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("{raw:?} is not a size such as 8MiB"))
}

/// What `--json` prints.
#[derive(Serialize)]
struct Outcome {
    upload_id: String,
    state: String,
    size: u64,
    md5: String,
    download_url: Option<String>,
    chunks_total: u64,
    /// Chunks this run sent (the others were already on the server).
    chunks_sent: u64,
    chunks_skipped: u64,
    bytes_sent: u64,
}

/// A stable id for `file` uploaded with `chunk_size`: the same file gives the same id, a
/// changed file (size or modification time) a new one.
fn derive_id(file: &Path, size: u64, chunk_size: u64) -> anyhow::Result<String> {
    let path = std::fs::canonicalize(file)?;
    let modified = std::fs::metadata(file)?
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut h = md5::Md5::new();
    h.update(path.to_string_lossy().as_bytes());
    h.update(format!("\0{size}\0{modified}\0{chunk_size}").as_bytes());
    let digest = stitch_common::digest::Md5::from_bytes(h.finalize().into());
    Ok(format!("up-{}", &digest.to_hex()[..24]))
}

pub async fn run(args: UploadArgs) -> Result<(), Failure> {
    // A merge that finds chunks storage lost puts the upload back to `receiving`; the client
    // then resumes as a new run would (bounded, like its other retries).
    for _ in 0..=args.retries {
        match run_once(&args).await? {
            Finished::Done => return Ok(()),
            Finished::Reopened { missing } => {
                if !args.quiet {
                    eprintln!(
                        "the server lost {missing} chunk(s) before merging them; sending them again"
                    );
                }
            }
        }
    }
    Err(Failure::Rejected(
        "the server kept asking for chunks again; giving up".into(),
    ))
}

/// How a run ended without an error.
enum Finished {
    Done,
    /// The upload is receiving again with `missing` chunks to send (storage lost them).
    Reopened {
        missing: u64,
    },
}

async fn run_once(args: &UploadArgs) -> Result<Finished, Failure> {
    let client = args.server.client(args.retries)?;
    if args.parallel == 0 {
        return Err(Failure::Usage("--parallel must be at least 1".into()));
    }
    let size = std::fs::metadata(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?
        .len();
    if size == 0 {
        return Err(Failure::Usage(format!("{} is empty", args.file.display())));
    }
    let chunk_size = args.chunk_size.min(size);
    let total_chunks = size.div_ceil(chunk_size);
    let id = match args.id.clone() {
        Some(id) => id,
        None => derive_id(&args.file, size, chunk_size)
            .with_context(|| format!("reading {}", args.file.display()))?,
    };
    let filename = args
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| id.clone());

    // What does the server have already?
    let existing = client.status(&id).await?;
    if let Some(status) = &existing {
        if status.total_size != size || status.chunk_size != chunk_size {
            return Err(Failure::Usage(format!(
                "upload {id} exists with {} bytes in chunks of {}; this file is {size} bytes in chunks of {chunk_size} (use --id for a new upload)",
                status.total_size, status.chunk_size
            )));
        }
        match status.state.as_str() {
            "receiving" => {}
            "merging" | "completed" | "failed" => {
                let sent = Sent::default();
                return finish(&client, args, &id, total_chunks, &sent).await;
            }
            other => return Err(Failure::Rejected(format!("upload {id} is {other}"))),
        }
    }
    let have: std::collections::HashSet<u64> = existing
        .map(|s| s.uploaded_chunks.into_iter().collect())
        .unwrap_or_default();
    let missing: Vec<u64> = (0..total_chunks).filter(|i| !have.contains(i)).collect();
    if args.dry_run {
        let plan = serde_json::json!({
            "upload_id": id,
            "chunks_total": total_chunks,
            "chunks_missing": missing.len(),
            "chunk_size": chunk_size,
            "size": size,
        });
        if args.json {
            println!("{plan}");
        } else {
            println!("upload   {id}");
            println!(
                "would send {} of {total_chunks} chunks of {chunk_size} bytes",
                missing.len()
            );
        }
        return Ok(Finished::Done);
    }

    let progress = Arc::new(Progress::new("uploading", size, args.quiet));
    progress.inc(have.iter().map(|&i| chunk_len(i, chunk_size, size)).sum());
    let sent = Arc::new(Sent::default());
    let upload = send_chunks(
        &client,
        &args.file,
        &id,
        &filename,
        Geometry { size, chunk_size },
        missing,
        args.parallel,
        progress.clone(),
        sent.clone(),
    );
    tokio::select! {
        result = upload => result?,
        () = super::interrupted() => return Err(Failure::Interrupted),
    }
    progress.finish();
    finish(&client, args, &id, total_chunks, &sent).await
}

#[derive(Clone, Copy)]
struct Geometry {
    size: u64,
    chunk_size: u64,
}

fn chunk_len(index: u64, chunk_size: u64, size: u64) -> u64 {
    chunk_size.min(size - index * chunk_size)
}

#[derive(Default)]
struct Sent {
    chunks: AtomicU64,
    bytes: AtomicU64,
}

/// One chunk ready to send; the last one carries the file's MD5.
struct Outgoing {
    index: u64,
    bytes: Bytes,
    file_md5: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn send_chunks(
    client: &Client,
    file: &Path,
    id: &str,
    filename: &str,
    g: Geometry,
    missing: Vec<u64>,
    parallel: usize,
    progress: Arc<Progress>,
    sent: Arc<Sent>,
) -> Result<(), Failure> {
    let (tx, rx) = mpsc::channel::<Outgoing>(parallel);
    let reader = {
        let file = file.to_owned();
        tokio::task::spawn_blocking(move || read_chunks(&file, g, &missing, tx))
    };
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let senders = (0..parallel).map(|_| {
        let (rx, client, progress, sent) =
            (rx.clone(), client.clone(), progress.clone(), sent.clone());
        let (id, name) = (
            id.to_owned(),
            utf8_percent_encode(filename, NON_ALPHANUMERIC).to_string(),
        );
        async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(chunk) = next else {
                    return Ok::<(), Failure>(());
                };
                put_chunk(&client, &id, &name, g, &chunk).await?;
                progress.inc(chunk.bytes.len() as u64);
                sent.chunks.fetch_add(1, Ordering::Relaxed);
                sent.bytes
                    .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
            }
        }
    });
    let results = futures_util::future::join_all(senders).await;
    // Senders stop at the first failure; the reader then sees a closed channel and stops.
    for result in results {
        result?;
    }
    reader
        .await
        .map_err(|e| Failure::Other(anyhow::anyhow!("the file reader failed: {e}")))?
        .map_err(Failure::Other)
}

/// Reads the file in order, hashing all of it, and queues the missing chunks; the last of
/// them is held back until the hash is complete and goes out with it.
fn read_chunks(
    file: &Path,
    g: Geometry,
    missing: &[u64],
    tx: mpsc::Sender<Outgoing>,
) -> anyhow::Result<()> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?);
    let mut md5 = Md5Hasher::new();
    let wanted: std::collections::HashSet<u64> = missing.iter().copied().collect();
    let last = missing.last().copied();
    let mut held = None;
    let total_chunks = g.size.div_ceil(g.chunk_size);
    for index in 0..total_chunks {
        let len = chunk_len(index, g.chunk_size, g.size) as usize;
        let mut buf = vec![0u8; len];
        reader
            .read_exact(&mut buf)
            .with_context(|| format!("reading chunk {index} (did the file change?)"))?;
        md5.update(&buf);
        if !wanted.contains(&index) {
            continue;
        }
        let chunk = Outgoing {
            index,
            bytes: Bytes::from(buf),
            file_md5: None,
        };
        if Some(index) == last {
            held = Some(chunk);
        } else if tx.blocking_send(chunk).is_err() {
            return Ok(()); // The senders stopped; their error is reported.
        }
    }
    if let Some(mut chunk) = held {
        chunk.file_md5 = Some(md5.finalize().to_hex());
        let _ = tx.blocking_send(chunk);
    }
    Ok(())
}

async fn put_chunk(
    client: &Client,
    id: &str,
    name: &str,
    g: Geometry,
    chunk: &Outgoing,
) -> Result<(), Failure> {
    let total_chunks = g.size.div_ceil(g.chunk_size);
    let start = chunk.index * g.chunk_size;
    let end = start + chunk.bytes.len() as u64 - 1;
    let url = client.url("/upload/chunk");
    let response = client
        .send(&format!("chunk {}", chunk.index), || {
            let mut request = client
                .http()
                .put(&url)
                .header("X-File-ID", id)
                .header("X-Chunk-Index", chunk.index.to_string())
                .header("X-Total-Chunks", total_chunks.to_string())
                .header("Content-Range", format!("bytes {start}-{end}/{}", g.size))
                .header("X-File-Name", name)
                .header("Content-Type", "application/octet-stream")
                .body(chunk.bytes.clone());
            if let Some(md5) = &chunk.file_md5 {
                request = request.header("X-File-MD5", md5);
            }
            request
        })
        .await?;
    client.expect_success(response).await?;
    Ok(())
}

/// Waits for the merge (unless `--no-wait`) and reports.
async fn finish(
    client: &Client,
    args: &UploadArgs,
    id: &str,
    total_chunks: u64,
    sent: &Sent,
) -> Result<Finished, Failure> {
    let mut status = client
        .status(id)
        .await?
        .ok_or_else(|| Failure::Rejected(format!("upload {id} vanished from the server")))?;
    if !args.no_wait {
        let merging = Progress::new("merging", status.total_size, args.quiet);
        let mut shown = 0;
        loop {
            if let Some(done) = status.merge_bytes_done.filter(|d| *d > shown) {
                merging.inc(done - shown);
                shown = done;
            }
            if status.state == "receiving" && (status.uploaded_chunks.len() as u64) < total_chunks {
                merging.finish();
                return Ok(Finished::Reopened {
                    missing: total_chunks - status.uploaded_chunks.len() as u64,
                });
            }
            if status.state != "merging" && status.state != "receiving" {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = super::interrupted() => return Err(Failure::Interrupted),
            }
            status = client.status(id).await?.ok_or_else(|| {
                Failure::Rejected(format!("upload {id} vanished from the server"))
            })?;
        }
        merging.finish();
    }
    report(client, args, &status, total_chunks, sent)?;
    match status.state.as_str() {
        "failed" => Err(Failure::UploadFailed(
            status
                .failure_reason
                .unwrap_or_else(|| "no reason given".into()),
        )),
        "completed" | "merging" | "receiving" => Ok(Finished::Done),
        other => Err(Failure::Rejected(format!("upload {id} is {other}"))),
    }
}

fn report(
    client: &Client,
    args: &UploadArgs,
    status: &Status,
    total_chunks: u64,
    sent: &Sent,
) -> Result<(), Failure> {
    let chunks_sent = sent.chunks.load(Ordering::Relaxed);
    let outcome = Outcome {
        upload_id: status.upload_id.clone(),
        state: status.state.clone(),
        size: status.size.unwrap_or(status.total_size),
        md5: status.md5.clone().unwrap_or_default(),
        download_url: status.download_url.as_deref().map(|u| client.absolute(u)),
        chunks_total: total_chunks,
        chunks_sent,
        chunks_skipped: total_chunks - chunks_sent.min(total_chunks),
        bytes_sent: sent.bytes.load(Ordering::Relaxed),
    };
    if args.json {
        println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
    } else if !args.quiet {
        println!("upload   {}", outcome.upload_id);
        println!("state    {}", outcome.state);
        println!(
            "sent     {} of {} chunks ({} were already there)",
            outcome.chunks_sent, total_chunks, outcome.chunks_skipped
        );
        if let Some(url) = &outcome.download_url {
            println!("md5      {}", outcome.md5);
            println!("download {url}");
        }
    }
    Ok(())
}
