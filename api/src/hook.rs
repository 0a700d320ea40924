//! The blocking pre-create hook (`[hooks.pre_create]`): before any upload is created, by an
//! explicit create or by its first chunk, the operator's service is asked, with a POST signed
//! per Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
//!
//! - 2xx allows; a JSON reply `{"metadata": {...}}` attaches metadata to the upload (its keys
//!   replace the client's of the same name).
//! - 4xx refuses: the client gets `403 rejected_by_hook` with the hook's `message`.
//! - Anything else — no answer within `timeout`, a 5xx, a redirect, a connection refused — is
//!   `503 hook_unavailable`: the hook is a gate, and a gate that does not answer stays shut.
//!
//! Two first chunks of one upload racing on two pods may both ask; the hook should answer
//! the same declaration the same way.

use std::time::Duration;

use serde::Deserialize;
use stitch_common::auth::Principal;
use stitch_common::config::PreCreateHook;
use stitch_common::upload::NewUpload;
use stitch_common::webhooks::signing::{SigningKey, signature_header};

use crate::service::ServiceError;

/// Longest reply read from the hook.
const MAX_REPLY: usize = 64 << 10;
/// Longest refusal message passed on to the client.
const MAX_MESSAGE: usize = 500;

pub struct Hook {
    url: String,
    key: SigningKey,
    client: reqwest::Client,
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    error: Option<ReplyError>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct ReplyError {
    message: Option<String>,
}

impl Hook {
    pub fn new(config: &PreCreateHook) -> anyhow::Result<Self> {
        // The client needs rustls's provider; every main installs it first, this covers
        // the API embedded in other programs (tests, the single-node mode).
        stitch_common::tls::install_crypto_provider();
        let key = SigningKey::parse(config.secret.expose())
            .ok_or_else(|| anyhow::anyhow!("hooks.pre_create.secret must be whsec_<base64>"))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout.0)
            .connect_timeout(config.timeout.0.min(Duration::from_secs(5)))
            .user_agent(concat!("Stitch-Hooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            url: config.url.clone(),
            key,
            client,
        })
    }

    /// Asks whether `upload` may be created by `caller`; returns the metadata to attach.
    pub async fn ask(
        &self,
        caller: &Principal,
        upload: &NewUpload,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, ServiceError> {
        let body = serde_json::to_vec(&serde_json::json!({
            "type": "upload.pre_create",
            "tenant": caller.tenant.as_str(),
            "credential": caller.label(),
            "upload": {
                "id": upload.id.name(),
                "size": upload.geometry.total_size,
                "chunk_size": upload.geometry.chunk_size,
                "filename": upload.filename,
                "md5": upload.file_md5.map(|m| m.to_hex()),
                "metadata": upload.metadata,
            },
        }))
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let id = format!("hook_{}", uuid::Uuid::new_v4().simple());
        let timestamp = stitch_common::now_ms() / 1000;
        let signature = signature_header(std::slice::from_ref(&self.key), &id, timestamp, &body);
        let sent = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(upload_id = %upload.id, error = %e, "pre-create hook did not answer");
                return Err(ServiceError::HookUnavailable);
            }
        };
        let status = response.status();
        let reply = read_reply(response).await;
        if status.is_success() {
            return Ok(reply.and_then(|r| r.metadata));
        }
        if status.is_client_error() {
            let message = reply
                .and_then(|r| r.message.or(r.error.and_then(|e| e.message)))
                .unwrap_or_else(|| format!("refused with {status}"));
            tracing::info!(upload_id = %upload.id, %status, "pre-create hook refused an upload");
            return Err(ServiceError::RejectedByHook(clean(&message)));
        }
        tracing::warn!(upload_id = %upload.id, %status, "pre-create hook failed");
        Err(ServiceError::HookUnavailable)
    }
}

async fn read_reply(mut response: reqwest::Response) -> Option<Reply> {
    let mut bytes = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_REPLY {
            return None;
        }
    }
    match serde_json::from_slice::<Reply>(&bytes) {
        Ok(reply) => Some(reply),
        // A plain-text refusal is its own message.
        Err(_) => std::str::from_utf8(&bytes)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .map(|t| Reply {
                message: Some(t.trim().to_owned()),
                error: None,
                metadata: None,
            }),
    }
}

/// A message fit to pass on: no control characters, bounded.
fn clean(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE)
        .collect()
}
