//! The bare sink: the least a server of the chunk protocol must do with an upload — stream
//! each chunk's body to a file of its own and fsync it before answering — and nothing of
//! Stitch (no state store, no queue, no assembly, no merge). It is what the same client, with
//! the same connections, chunks and order, would measure against a server that only stores
//! the bytes: the floor under an upload's time on this machine.
//!
//! It runs in this process, on a runtime of its own (every core, as a server process has),
//! apart from the client's current-thread runtime. Like `stitch-api`, it streams a body from
//! the connection to a blocking writer thread through a short channel, which writes it with
//! Stitch's own chunk file writer (`O_DIRECT` in aligned 1 MiB blocks where the file system
//! allows it, as `storage.direct_io` does by default; through the page cache, the sink's
//! fsync at the end of each chunk made one client wait for the whole chunk to reach the
//! disk, and a 10 GiB upload from one client took twice as long as from four), computing
//! the CRC32C of the bytes on the way (hardware-accelerated, a small fraction of the
//! write): the client
//! checks every answer's CRC32C against the bytes it sent, as it does Stitch's. It never says
//! `upload_complete`: it counts nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use bytes::Bytes;
use futures_util::StreamExt as _;
use stitch_common::config::StorageSettings;
use stitch_common::storage::ChunkFile;
use tokio::sync::{mpsc, oneshot};

use crate::workdir::remove_dir;

/// How long the sink may take to close its connections once asked to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Body pieces in flight between the connection and the writer thread (the API's is short
/// too: the writer, not memory, absorbs the stream).
const FEED_DEPTH: usize = 8;

/// A running bare sink, storing into a directory of its own.
pub struct BareSink {
    pub addr: SocketAddr,
    dir: PathBuf,
    runtime: tokio::runtime::Runtime,
    shutdown: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl BareSink {
    /// Starts a sink on a loopback port that stores every chunk under `dir` (made here, and
    /// removed by [`BareSink::stop`]).
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("bare-sink")
            .enable_all()
            .build()
            .context("starting the bare sink's runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
            .context("binding the bare sink")?;
        let addr = listener.local_addr().context("the bare sink's address")?;
        let router = Router::new()
            .route("/upload/chunk", put(store_chunk))
            .layer(DefaultBodyLimit::disable())
            .with_state(Arc::new(dir.to_owned()));
        let (shutdown, stopped) = oneshot::channel::<()>();
        let server = runtime.spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        Ok(Self {
            addr,
            dir: dir.to_owned(),
            runtime,
            shutdown,
            server,
        })
    }

    /// The chunks stored for `upload_id`: (index, length) in index order.
    pub fn stored(&self, upload_id: &str) -> anyhow::Result<Vec<(u64, u64)>> {
        let mut stored = Vec::new();
        let prefix = format!("{upload_id}.");
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", self.dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let index = name
                .strip_prefix(&prefix)
                .and_then(|i| i.parse().ok())
                .with_context(|| format!("unexpected file {name} in the bare sink"))?;
            let len = entry
                .metadata()
                .with_context(|| format!("reading the size of {name}"))?
                .len();
            stored.push((index, len));
        }
        stored.sort_unstable();
        Ok(stored)
    }

    /// Closes the sink's connections, stops its runtime, and removes its directory.
    pub fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        let server = self.server;
        let stopped = self
            .runtime
            .block_on(async { tokio::time::timeout(STOP_TIMEOUT, server).await });
        self.runtime.shutdown_timeout(STOP_TIMEOUT);
        let removed = remove_dir(&self.dir);
        match stopped {
            Ok(Ok(served)) => served.context("the bare sink's server failed")?,
            Ok(Err(e)) => return Err(e).context("the bare sink's server panicked"),
            Err(_) => anyhow::bail!("the bare sink did not stop within {STOP_TIMEOUT:?}"),
        }
        removed
    }
}

/// The fields of the chunk answer that the benchmarks' client checks.
#[derive(serde::Serialize)]
struct ChunkAnswer {
    chunk_index: u64,
    duplicate: bool,
    upload_complete: bool,
    chunk_crc32c: String,
}

/// `PUT /upload/chunk`: the body to `<dir>/<X-File-ID>.<X-Chunk-Index>`, fsynced, then 200.
async fn store_chunk(State(dir): State<Arc<PathBuf>>, headers: HeaderMap, body: Body) -> Response {
    match receive(&dir, &headers, body).await {
        Ok(answer) => axum::Json(answer).into_response(),
        Err((status, message)) => (status, message).into_response(),
    }
}

async fn receive(
    dir: &Path,
    headers: &HeaderMap,
    body: Body,
) -> Result<ChunkAnswer, (StatusCode, String)> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| (StatusCode::BAD_REQUEST, format!("no {name}")))
    };
    let id = header("X-File-ID")?;
    ensure_plain(id).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let index: u64 = header("X-Chunk-Index")?
        .parse()
        .map_err(|_| (StatusCode::BAD_REQUEST, "bad X-Chunk-Index".to_owned()))?;
    let path = dir.join(format!("{id}.{index}"));
    let (feed, pieces) = mpsc::channel::<Bytes>(FEED_DEPTH);
    let writer = tokio::task::spawn_blocking(move || write_synced(&path, pieces));
    let mut stream = body.into_data_stream();
    let mut received = Ok(());
    while let Some(piece) = stream.next().await {
        match piece {
            Ok(piece) => {
                if feed.send(piece).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                received = Err((StatusCode::BAD_REQUEST, format!("reading the body: {e}")));
                break;
            }
        }
    }
    drop(feed);
    let written = writer
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("writer: {e}")))?
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")));
    received?;
    Ok(ChunkAnswer {
        chunk_index: index,
        duplicate: false,
        upload_complete: false,
        chunk_crc32c: format!("{:08x}", written?),
    })
}

/// An upload id usable as a file name as it is.
fn ensure_plain(id: &str) -> anyhow::Result<()> {
    ensure!(
        !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "X-File-ID {id:?} is not [A-Za-z0-9_-]+"
    );
    Ok(())
}

/// Writes every piece of `pieces` to a new file `path` the way Stitch writes a chunk's copy
/// ([`ChunkFile`] with the storage defaults: `O_DIRECT` where the file system allows it),
/// fsyncs it, and returns the CRC32C of the bytes written.
fn write_synced(path: &Path, mut pieces: mpsc::Receiver<Bytes>) -> anyhow::Result<u32> {
    let storage = StorageSettings::default();
    let mut file = ChunkFile::create(path, storage.direct_io, true)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut crc = 0u32;
    while let Some(piece) = pieces.blocking_recv() {
        crc = crc32c::crc32c_append(crc, &piece);
        file.write(&piece)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    file.finish()
        .with_context(|| format!("fsync of {}", path.display()))?;
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upload::{Payload, UploadJob, send_upload};
    use stitch_testkit::Source;

    #[test]
    fn the_sink_stores_each_chunk_in_a_file_of_its_own_and_answers_its_crc() {
        // As `main` does, before any client exists.
        stitch_common::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let sink_dir = dir.path().join("sink");
        let sink = BareSink::start(&sink_dir).unwrap();
        let payload = Payload::new(Source::random(250_000, 100_000, 7).shared());
        let job = UploadJob {
            order: Arc::from([2, 0, 1]),
            completes: false,
            ..UploadJob::all(sink.addr, "up-1".into(), payload, 2)
        };
        let client = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let outcome = client.block_on(send_upload(&job)).unwrap();
        assert_eq!(outcome.bytes, 250_000);
        assert_eq!(
            sink.stored("up-1").unwrap(),
            [(0, 100_000), (1, 100_000), (2, 50_000)]
        );
        sink.stop().unwrap();
        assert!(!sink_dir.exists());
    }

    #[test]
    fn only_plain_ids_name_files() {
        assert!(ensure_plain("bench-00ff_A").is_ok());
        assert!(ensure_plain("../x").is_err());
        assert!(ensure_plain("").is_err());
    }
}
