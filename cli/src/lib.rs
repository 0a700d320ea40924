//! The `stitch` command: `stitch serve` runs the whole product in one process (API, merge
//! worker and sweeper over the embedded SQLite backends, no other service needed), and
//! `stitch upload` / `stitch status` / `stitch download` are its client, resumable across
//! interruptions on either side, sending an API key when given one (`--key`, `STITCH_KEY`);
//! `stitch keys new` makes API keys.
//!
//! Exit codes ([`Failure`]): 0 success, 1 error (network, files, retries exhausted),
//! 2 usage or configuration, 3 the server refused the request, 4 the upload failed on the
//! server (e.g. MD5 mismatch), 130 interrupted (Ctrl-C); re-running resumes.

pub mod client;
pub mod keys;
pub mod link;
mod progress;
pub mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// How a command ended, when not in success.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("the server refused: {0}")]
    Rejected(String),
    #[error("the upload failed: {0}")]
    UploadFailed(String),
    #[error("interrupted; run the same command again to resume")]
    Interrupted,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Other(_) => 1,
            Self::Usage(_) => 2,
            Self::Rejected(_) => 3,
            Self::UploadFailed(_) => 4,
            Self::Interrupted => 130,
        }
    }
}

#[derive(Parser)]
#[command(
    name = "stitch",
    version,
    about = "Stitch: resumable uploads of very large files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Stitch on this machine: API, merge worker and sweeper in one process, state in an
    /// embedded database under the storage directory. No other service needed.
    Serve(serve::ServeArgs),
    /// Upload a file, in parallel chunks, resuming whatever an earlier run already sent.
    Upload(client::upload::UploadArgs),
    /// Show an upload's status.
    Status(client::status::StatusArgs),
    /// Download a completed file, resuming a partial download, and verify its MD5.
    Download(client::download::DownloadArgs),
    /// Make API keys (`stitch keys new --tenant T`).
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Make "upload here" links for the upload page (`stitch link new --tenant T`).
    Link {
        #[command(subcommand)]
        command: link::LinkCommand,
    },
}

/// The whole `stitch` program.
pub fn main() -> ExitCode {
    stitch_common::heap::keep_freed_memory();
    // Before any client exists (downloads, uploads, the OTLP exporter of `serve`).
    stitch_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stitch: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Upload(args) => client::upload::run(args).await,
            Command::Status(args) => client::status::run(args).await,
            Command::Download(args) => client::download::run(args).await,
            Command::Keys { command } => keys::run(command),
            Command::Link { command } => link::run(command),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("stitch: {failure:#}");
            ExitCode::from(failure.exit_code())
        }
    }
}
