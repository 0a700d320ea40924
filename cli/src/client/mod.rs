//! The HTTP client of the `stitch` commands: status, chunk uploads and downloads with
//! retries and backoff on everything a retry can fix (connection errors, 408, 429, 5xx).
//!
//! With an API key (`--key`, `STITCH_KEY`) every request carries `Authorization: Bearer`; the
//! header is marked sensitive, and the key appears in no message, log line or `--help`. A 401
//! or 403 is the server's refusal (exit 3), with its message.

pub mod download;
pub mod status;
pub mod upload;

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use crate::Failure;

/// The default server, for `--server`.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Where the server is and how to authenticate to it: the same for every client command.
#[derive(Args)]
pub struct ServerArgs {
    /// The Stitch server.
    #[arg(long, env = "STITCH_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// API key, sent as `Authorization: Bearer` (`stitch keys new` makes one); prefer
    /// STITCH_KEY, which the process list does not show. Not needed by a server on this
    /// machine that has no key configured.
    #[arg(long, env = "STITCH_KEY", hide_env_values = true, value_name = "KEY")]
    pub key: Option<String>,
}

impl ServerArgs {
    /// A client of this server making up to `attempts` attempts per request.
    pub fn client(&self, attempts: u32) -> Result<Client, Failure> {
        Client::new(&self.server, attempts, self.key.as_deref())
    }
}

/// An upload's status as the server reports it (the fields the client uses).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct Status {
    pub upload_id: String,
    pub state: String,
    pub filename: Option<String>,
    pub total_size: u64,
    pub chunk_size: u64,
    pub total_chunks: u64,
    pub uploaded_chunks: Vec<u64>,
    pub bytes_received: u64,
    pub size: Option<u64>,
    pub md5: Option<String>,
    pub download_url: Option<String>,
    pub failure_reason: Option<String>,
    pub merge_bytes_done: Option<u64>,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    attempts: u32,
    /// Whether requests carry an API key (for the hint on a refusal).
    keyed: bool,
}

/// Whether a response status is worth retrying.
fn retryable(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// The server's error message, from its JSON error body.
async fn error_message(response: reqwest::Response) -> String {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            let code = v["error"]["code"].as_str()?.to_owned();
            let message = v["error"]["message"].as_str()?.to_owned();
            Some(format!("{message} ({code})"))
        })
        .unwrap_or(text);
    format!("{status}: {message}")
}

impl Client {
    /// A client of `server`; with `key`, every request carries it. An empty key is no key.
    pub fn new(server: &str, attempts: u32, key: Option<&str>) -> Result<Self, Failure> {
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            return Err(Failure::Usage(format!(
                "--server must be an http:// or https:// URL, not {server:?}"
            )));
        }
        let key = key.map(str::trim).filter(|k| !k.is_empty());
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = key {
            // The message must not quote the key.
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| {
                    Failure::Usage(
                        "--key / STITCH_KEY holds characters an HTTP header cannot carry".into(),
                    )
                })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .default_headers(headers)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: server.trim_end_matches('/').to_owned(),
            attempts: attempts.max(1),
            keyed: key.is_some(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A link from the server, made absolute against `--server` when it is relative.
    pub fn absolute(&self, link: &str) -> String {
        if link.starts_with("http://") || link.starts_with("https://") {
            link.to_owned()
        } else {
            self.url(link)
        }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends the request `make` builds until it succeeds, a non-retryable status comes back
    /// (returned as is for the caller to judge), or the attempts run out.
    pub async fn send(
        &self,
        what: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Failure> {
        let mut delay = Duration::from_millis(250);
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            match make().send().await {
                Ok(response) if !retryable(response.status()) => return Ok(response),
                Ok(response) => {
                    let wait = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    last = error_message(response).await;
                    if let Some(wait) = wait {
                        delay = delay.max(wait);
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if attempt < self.attempts {
                // Full jitter keeps many retrying clients from arriving together.
                let jittered = delay.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                tracing::debug!(%what, attempt, ?jittered, %last, "retrying");
                tokio::time::sleep(jittered).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
        }
        Err(Failure::Other(anyhow::anyhow!(
            "{what}: gave up after {} attempts: {last}",
            self.attempts
        )))
    }

    /// The upload's status, or `None` if the server does not know it.
    pub async fn status(&self, id: &str) -> Result<Option<Status>, Failure> {
        let url = self.url(&format!("/upload/{id}/status"));
        let response = self.send("status", || self.http.get(&url)).await?;
        match response.status().as_u16() {
            200 => Ok(Some(response.json().await.context("reading the status")?)),
            404 => Ok(None),
            _ => Err(self.refusal(response).await),
        }
    }

    /// Refuses a non-success response with the server's message.
    pub async fn expect_success(
        &self,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, Failure> {
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.refusal(response).await)
        }
    }

    /// The server's refusal, with a hint about the key when it is about credentials.
    async fn refusal(&self, response: reqwest::Response) -> Failure {
        let status = response.status().as_u16();
        let message = error_message(response).await;
        let hint = match (status, self.keyed) {
            (401, false) => " (give an API key with --key or STITCH_KEY)",
            (401, true) => " (check the key given with --key or STITCH_KEY)",
            _ => "",
        };
        Failure::Rejected(format!("{message}{hint}"))
    }
}

/// Waits for Ctrl-C.
pub async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
