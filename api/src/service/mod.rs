//! The upload service: the rules of uploads, between a wire protocol's front end (its
//! extractors, handlers and error table) and the backends (state store, shared storage).
//! Handlers call exactly one function here. Nothing here knows HTTP or any protocol's
//! headers: requests come in as uploads, byte ranges, digests and a body stream
//! ([`ChunkPart`], [`PartBody`]), and every failure is a [`ServiceError`].

mod error;
mod permits;
mod segments;

pub use self::error::{QUOTA_RETRY_AFTER_SECS, ServiceError};
pub use self::segments::{Append, Appended, DeclaredDigest, NewStream};

use std::sync::Arc;

use serde::Deserialize;
use stitch_common::auth::{Authenticator, DownloadLinks, Principal, Scope, Scopes, TokenClaims};
use stitch_common::backends::Backends;
use stitch_common::concat::prefix::Assembler;
use stitch_common::config::Interval;
use stitch_common::config::{Limits, Settings};
use stitch_common::digest::{ChunkDigests, Md5};
use stitch_common::events::Event;
use stitch_common::geometry::{ChunkIndex, Geometry};
use stitch_common::id::UploadId;
use stitch_common::lock::MergeLock;
use stitch_common::metrics as m;
use stitch_common::now_ms;
use stitch_common::queue::{EventSink, MergeJob, NOW, OutboxMessage, WorkQueue};
use stitch_common::recovery::{Recovery, RecoveryError};
use stitch_common::state::{
    Aborted, Conflict, Created, OutboxEntry, Progress, Recorded, StateError, StateStore,
    UploadHeader,
};
use stitch_common::storage::{Block, Feed, FsChunkStore, ManifestCheck, StagedChunk, StorageError};
use stitch_common::upload::{Assembly, ChunkRecord, NewUpload, UploadState, UploadStatus};
use stitch_common::webhooks::callback::CallbackPolicy;
use tokio::sync::{Semaphore, mpsc};

use self::permits::WritePermits;

use crate::hook::Hook;
use stitch_common::quota::{QuotaError, QuotaLedger, Reservation};

/// Blocks of body bytes buffered between the request and the storage writer. Small: the
/// memory a chunk costs is this many blocks, whatever the chunk's size.
const FEED_DEPTH: usize = 4;

pub struct UploadService {
    state: Arc<dyn StateStore>,
    storage: FsChunkStore,
    /// Where the completing chunk sends the merge job (the outbox covers its failures).
    merges: Arc<dyn WorkQueue>,
    /// Where `upload.created` and `upload.aborted` go (the outbox covers its failures).
    events: Arc<dyn EventSink>,
    /// The policy for client callback URLs; `None` when the operator does not allow them.
    callbacks: Option<CallbackPolicy>,
    /// Bound on the merge job publish, so a slow broker does not hold the client's response.
    publish_timeout: std::time::Duration,
    limits: Limits,
    ttl_ms: u64,
    /// Rebuilds an upload the state store lost, from storage.
    recovery: Recovery,
    /// Compute MD5 of every chunk even without a client digest (operator's choice).
    always_md5: bool,
    /// Bounds the chunk bodies written at once by this process, and by each tenant.
    write_permits: WritePermits,
    /// Body memory in flight, in KiB units (`limits.max_buffered_body_bytes`).
    body_budget: Arc<Semaphore>,
    body_budget_kib: u32,
    /// Signs capability tokens (when `auth.token_secret` is set).
    auth: Authenticator,
    /// Quotas per tenant, and the ledger that enforces them.
    auth_settings: stitch_common::config::AuthSettings,
    quotas: Arc<dyn QuotaLedger>,
    /// The operator's pre-create hook, if configured.
    hook: Option<Hook>,
    token_max_ttl: std::time::Duration,
    /// One append (tus `PATCH`) per upload at a time, fleet-wide.
    append_lock: Arc<dyn MergeLock>,
    /// An append is made durable and counted every this many bytes.
    segment_size: u64,
    /// Assembles and hashes each upload's in-order prefix while its chunks arrive
    /// (`merge.incremental`).
    assembler: Option<Assembler>,
}

/// `POST /upload/tokens`: a capability token for one upload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The upload (in the caller's tenant); a fresh id when absent.
    pub upload_id: Option<String>,
    /// Lifetime; default one hour, at most `auth.token_max_ttl`.
    pub ttl: Option<Interval>,
    /// Default `upload` and `read`; never more than the caller's, never `admin`.
    pub scopes: Option<Vec<String>>,
    /// Bound on the upload's declared size (each upload's, for a link).
    pub max_bytes: Option<u64>,
    /// An "upload here" link: the token may make any number of uploads, named
    /// `<upload_id>-…` by the server (`upload_id`: the link's prefix, fresh when absent),
    /// and touch those only.
    #[serde(default)]
    pub link: bool,
}

/// A token made by [`UploadService::issue_token`].
pub struct IssuedToken {
    pub token: String,
    pub upload_id: UploadId,
    pub expires_at_ms: u64,
}

/// A token's lifetime when the request names none.
const DEFAULT_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// An upload id as a client wrote it: valid in form, not yet scoped to a tenant (the
/// caller's [`Principal::upload_id`] does that).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadName(String);

impl UploadName {
    pub fn parse(raw: &str) -> Result<Self, stitch_common::id::InvalidId> {
        UploadId::parse(raw).map(|id| Self(id.name().to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One part of an upload of fixed-size parts: which upload, which part of how many, the
/// bytes it covers, and the digests the client declared. Checked for form by the front end,
/// against the limits and the upload here.
#[derive(Clone, Debug)]
pub struct ChunkPart {
    pub id: UploadName,
    pub index: ChunkIndex,
    pub total_chunks: u64,
    pub range: stitch_common::geometry::ContentRange,
    pub filename: Option<String>,
    /// MD5 of the whole file, if declared.
    pub file_md5: Option<Md5>,
    /// MD5 of this part, if declared: the part counts only if it matches.
    pub chunk_md5: Option<Md5>,
}

/// A part's bytes as they arrive. The front end enforces its transport's limits (idle,
/// rate, deadline) and reports them as [`ServiceError`]s; the service enforces the length.
pub trait PartBody: Send {
    /// The next bytes; `None` at the end.
    fn next(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<bytes::Bytes>, ServiceError>> + Send;
}

/// `POST /upload`: an explicit create.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUpload {
    /// The client's id for the upload (scoped to its tenant); a fresh one is made when
    /// absent (a token's own upload, for a token).
    pub upload_id: Option<String>,
    pub total_size: u64,
    pub chunk_size: u64,
    pub filename: Option<String>,
    /// MD5 of the whole file (hex or base64); the merge verifies against it.
    pub md5: Option<Md5>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Where to POST this upload's events (signed with a secret returned once, in the
    /// response), when the operator allows client callbacks.
    pub callback_url: Option<String>,
}

/// One readiness check's outcome.
pub struct ReadinessCheck {
    pub name: &'static str,
    /// Whether the process is unready when this check fails.
    pub required: bool,
    pub result: Result<(), String>,
}

/// A completed upload's file.
pub struct CompletedFile {
    pub path: std::path::PathBuf,
    pub size: u64,
    pub md5: Md5,
    pub filename: Option<String>,
    pub completed_at_ms: u64,
}

/// What became of one chunk.
#[derive(Debug)]
pub struct ChunkAccepted {
    pub id: UploadId,
    pub index: ChunkIndex,
    pub geometry: Geometry,
    /// True when an identical copy was already counted (an idempotent re-send).
    pub duplicate: bool,
    pub progress: Progress,
    pub digests: ChunkDigests,
}

impl UploadService {
    pub fn new(
        settings: &Settings,
        backends: &Backends,
        auth: Authenticator,
    ) -> anyhow::Result<Self> {
        let hook = settings
            .hooks
            .pre_create
            .as_ref()
            .map(Hook::new)
            .transpose()?;
        let budget_kib =
            (settings.limits.max_buffered_body_bytes.0 >> 10).clamp(64, u32::MAX as u64) as u32;
        let ttl_ms = settings.uploads.ttl.0.as_millis() as u64;
        Ok(Self {
            recovery: Recovery::new(
                backends.state.clone(),
                backends.storage.clone(),
                backends.events.clone(),
                ttl_ms,
            ),
            state: backends.state.clone(),
            storage: backends.storage.clone(),
            merges: backends.merges.clone(),
            events: backends.events.clone(),
            callbacks: settings
                .webhooks
                .allow_client_callbacks
                .then(|| {
                    CallbackPolicy::new(
                        &settings.webhooks.callback_allowlist,
                        &settings.webhooks.callback_allow_networks,
                    )
                    .ok()
                })
                .flatten(),
            publish_timeout: settings.amqp.timeout.0,
            limits: settings.limits.clone(),
            ttl_ms: settings.uploads.ttl.0.as_millis() as u64,
            always_md5: settings.uploads.chunk_md5,
            write_permits: WritePermits::new(&settings.limits),
            body_budget: Arc::new(Semaphore::new(budget_kib as usize)),
            body_budget_kib: budget_kib,
            auth,
            token_max_ttl: settings.auth.token_max_ttl.0,
            auth_settings: settings.auth.clone(),
            quotas: backends.quotas.clone(),
            hook,
            append_lock: backends.append_lock.clone(),
            segment_size: settings.tus.segment_size.0,
            assembler: Assembler::new(
                settings,
                backends.state.clone(),
                backends.storage.clone(),
                backends.lock.clone(),
            ),
        })
    }

    /// Makes a capability token for one of the caller's uploads. Only a key (or the open
    /// principal) makes tokens, never with more than its own scopes, never `admin`.
    pub fn issue_token(
        &self,
        caller: &Principal,
        req: TokenRequest,
    ) -> Result<IssuedToken, ServiceError> {
        let Some(signer) = self.auth.tokens() else {
            return Err(ServiceError::TokensDisabled);
        };
        if caller.upload.is_some() {
            return Err(ServiceError::Forbidden("a token cannot make tokens".into()));
        }
        let scopes = match &req.scopes {
            None => Scopes::default_for_tokens(),
            Some(names) => Scopes::parse(names.iter().map(String::as_str))
                .map_err(|s| ServiceError::InvalidRequest(format!("unknown scope {s:?}")))?,
        };
        if scopes.contains(Scope::Admin) {
            return Err(ServiceError::InvalidRequest(
                "a token cannot carry the admin scope".into(),
            ));
        }
        if scopes == Scopes::default() {
            return Err(ServiceError::InvalidRequest(
                "scopes must not be empty".into(),
            ));
        }
        if !scopes.is_subset_of(caller.scopes) {
            return Err(ServiceError::Forbidden(
                "a token cannot have scopes its maker does not have".into(),
            ));
        }
        let ttl = req.ttl.map_or(DEFAULT_TOKEN_TTL, |t| t.0);
        if ttl.is_zero() || ttl > self.token_max_ttl {
            return Err(ServiceError::InvalidRequest(format!(
                "ttl must be between 1s and auth.token_max_ttl ({}s)",
                self.token_max_ttl.as_secs()
            )));
        }
        if let Some(max) = req.max_bytes {
            caller.check_size(max)?;
            if max == 0 {
                return Err(ServiceError::InvalidRequest(
                    "max_bytes must be at least 1".into(),
                ));
            }
        }
        let upload_id = match (&req.upload_id, req.link) {
            (Some(name), _) => caller.upload_id(name)?,
            (None, false) => UploadId::generate(&caller.tenant),
            (None, true) => caller.upload_id(&stitch_common::auth::new_link_prefix())?,
        };
        let expires_at_ms = now_ms() + ttl.as_millis() as u64;
        let token = signer.sign(&TokenClaims {
            tenant: caller.tenant.clone(),
            upload: upload_id.name().to_owned(),
            scopes,
            expires_at: expires_at_ms.div_ceil(1000),
            max_bytes: req.max_bytes,
            issuer: caller.key_id().map(str::to_owned),
            link: req.link,
        });
        tracing::info!(upload_id = %upload_id, by = caller.label(), scopes = ?scopes, ttl_s = ttl.as_secs(), "capability token issued");
        Ok(IssuedToken {
            token,
            upload_id,
            expires_at_ms,
        })
    }

    /// Creates an upload (or confirms an identical one): manifest on storage first, then the
    /// state store, so that every upload the state store knows has a manifest. The callback
    /// secret comes back only to the call that created the upload.
    pub async fn create_upload(
        &self,
        caller: &Principal,
        req: CreateUpload,
    ) -> Result<(Created, UploadStatus, Option<String>), ServiceError> {
        caller.require(Scope::Upload)?;
        let id = match &req.upload_id {
            Some(name) => caller.upload_id(name)?,
            None => caller.new_upload_id()?,
        };
        let geometry = Geometry::new(req.total_size, req.chunk_size)?;
        self.check_geometry(&geometry)?;
        caller.check_size(geometry.total_size)?;
        let filename = req.filename.map(|f| self.check_filename(f)).transpose()?;
        self.check_metadata(req.metadata.as_ref())?;
        let callback_url = req
            .callback_url
            .map(|url| self.check_callback(&url).map(|()| url))
            .transpose()?;
        let mut upload = NewUpload {
            id,
            geometry,
            filename,
            file_md5: req.md5,
            metadata: req.metadata,
            created_at_ms: now_ms(),
            assembly: Assembly::Chunks,
            callback_secret: callback_url.as_ref().map(|_| new_callback_secret()),
            callback_url,
        };
        let reservation = match self.upload_header(&upload.id).await? {
            Some(_) => Reservation::Held,
            None => self.admit(caller, &mut upload).await?,
        };
        let id = upload.id.clone();
        let created = self.create_admitted(upload).await;
        if created.is_err() && reservation == Reservation::New {
            self.undo_reservation(&id).await;
        }
        created
    }

    /// The rest of [`UploadService::create_upload`], once the upload is admitted.
    async fn create_admitted(
        &self,
        mut upload: NewUpload,
    ) -> Result<(Created, UploadStatus, Option<String>), ServiceError> {
        match self.storage.ensure_manifest(&upload).await? {
            ManifestCheck::Conflicts(existing) => {
                return Err(manifest_conflict(&existing, &upload));
            }
            // The first writer's manifest is the upload's: its creation time is the one
            // recorded (and the one `upload.created`'s id derives from).
            ManifestCheck::Matches(existing) => upload.created_at_ms = existing.created_at_ms,
            ManifestCheck::Created => {}
        }
        let event = Event::created(&upload);
        let outboxed = OutboxMessage::event(&event);
        let created = self
            .state
            .create_upload(&upload, &outboxed, self.ttl_ms)
            .await?;
        if created == Created::New {
            m::transition("created");
            self.publish_event(&upload.id, &event, &outboxed).await;
        }
        let status = self.status_of(&upload.id).await?;
        let secret = match created {
            Created::New => upload.callback_secret,
            Created::AlreadyExists => None,
        };
        Ok((created, status, secret))
    }

    /// Receives one chunk: checks it against the limits and the upload, streams it to
    /// storage (durable under a unique name), then records it in one atomic state-store
    /// operation. Whatever is refused leaves no file and no state behind.
    pub async fn accept_chunk<B: PartBody>(
        &self,
        caller: &Principal,
        chunk: ChunkPart,
        body: B,
    ) -> Result<ChunkAccepted, ServiceError> {
        // 1. Everything that needs no I/O: who asks, then bounds, so that no huge number
        //    reaches a backend.
        caller.require(Scope::Upload)?;
        let id = caller.upload_id(chunk.id.as_str())?;
        if chunk.total_chunks > self.limits.max_chunks {
            return Err(ServiceError::TooManyChunks {
                count: chunk.total_chunks,
                max: self.limits.max_chunks,
            });
        }
        let geometry = Geometry::from_chunk(chunk.index, chunk.total_chunks, chunk.range)?;
        self.check_geometry(&geometry)?;
        caller.check_size(geometry.total_size)?;
        let len = chunk.range.len();
        let filename = chunk
            .filename
            .clone()
            .map(|f| self.check_filename(f))
            .transpose()?;
        let mut upload = NewUpload {
            id,
            geometry,
            filename,
            file_md5: chunk.file_md5,
            metadata: None,
            created_at_ms: now_ms(),
            assembly: Assembly::Chunks,
            callback_url: None,
            callback_secret: None,
        };

        // 2. What the state store knows, to refuse early without reading the body. An upload
        //    it lost but storage knows is rebuilt first: counting this chunk into a fresh
        //    record would forget every chunk stored before.
        let known = self.upload_header(&upload.id).await?;
        if let Some(header) = &known {
            fits(header, &upload)?;
        }

        // A first chunk creates the upload: the tenant's quotas and the operator's hook
        // decide first, before any byte is stored.
        let reservation = match known {
            Some(_) => Reservation::Held,
            None => self.admit(caller, &mut upload).await?,
        };
        let stored = self
            .store_chunk(upload.clone(), known.is_none(), chunk, body, len)
            .await;
        if stored.is_err() && reservation == Reservation::New {
            self.undo_reservation(&upload.id).await;
        }
        stored
    }

    /// Lets a new upload in: the tenant's size limit, the operator's pre-create hook (which
    /// may attach metadata), then a reservation against the tenant's quotas — the last, so
    /// that a refusal by the hook holds nothing.
    async fn admit(
        &self,
        caller: &Principal,
        upload: &mut NewUpload,
    ) -> Result<Reservation, ServiceError> {
        let quotas = self.auth_settings.quotas_of(caller.tenant.as_str());
        let size = upload.geometry.total_size;
        if let Some(max) = quotas.max_upload_bytes
            && size > max.0
        {
            metrics::counter!(m::QUOTA_REFUSALS, "limit" => "upload_bytes").increment(1);
            return Err(ServiceError::QuotaUploadTooLarge { size, max: max.0 });
        }
        if let Some(hook) = &self.hook
            && let Some(attached) = hook.ask(caller, upload).await?
        {
            let mut metadata = upload.metadata.take().unwrap_or_default();
            metadata.extend(attached);
            let bytes = serde_json::Value::Object(metadata.clone())
                .to_string()
                .len();
            if bytes > self.limits.max_metadata_bytes {
                tracing::error!(upload_id = %upload.id, bytes, "the pre-create hook attached more metadata than limits.max_metadata_bytes");
                return Err(ServiceError::HookUnavailable);
            }
            upload.metadata = Some(metadata);
        }
        // Under a `max_stored_bytes`, an upload whose length is open holds the most it may
        // reach until it declares one: otherwise its bytes would pass the limit unseen.
        // Without one there is nothing to pass, and a bound as large as
        // `limits.max_upload_bytes` would only blur the tenant's stored-bytes gauge.
        let bytes = match upload.geometry.is_deferred() {
            true if quotas.max_stored_bytes.is_some() => self.largest_upload(caller),
            true => 0,
            false => upload.quota_bytes_until_complete(),
        };
        let reservation = self
            .quotas
            .reserve(&upload.id, bytes, &quotas)
            .await
            .inspect_err(|e| {
                let limit = match e {
                    QuotaError::ActiveUploads { .. } => "active_uploads",
                    QuotaError::StoredBytes { .. } => "stored_bytes",
                    QuotaError::Backend(_) => return,
                };
                metrics::counter!(m::QUOTA_REFUSALS, "limit" => limit).increment(1);
            })
            .map_err(ServiceError::from)?;
        #[cfg(feature = "failpoints")]
        if reservation == Reservation::New {
            stitch_common::failpoints::crash_here(
                stitch_common::failpoints::QUOTA_RESERVED_BEFORE_MANIFEST,
            );
        }
        Ok(reservation)
    }

    /// The largest upload `caller` may make: `limits.max_upload_bytes`, its tenant's
    /// `max_upload_bytes` and its token's bound, whichever is least.
    fn largest_upload(&self, caller: &Principal) -> u64 {
        let tenant = self.auth_settings.quotas_of(caller.tenant.as_str());
        [
            Some(self.limits.max_upload_bytes.0),
            tenant.max_upload_bytes.map(|b| b.0),
            caller.max_bytes,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(u64::MAX)
    }

    /// Gives back a reservation whose upload was not created after all. Kept when the
    /// upload exists (a concurrent request created it) or may exist (the state store did
    /// not answer): the janitor settles what is left over from storage.
    async fn undo_reservation(&self, id: &UploadId) {
        let exists = !matches!(
            (
                self.state.upload_header(id).await,
                self.storage.read_manifest(id).await,
            ),
            (Ok(None), Ok(None))
        );
        if !exists && let Err(e) = self.quotas.release(id).await {
            tracing::warn!(upload_id = %id, error = %e, "a quota reservation was not given back");
        }
    }

    /// Steps 3 to 5 of [`UploadService::accept_chunk`]: the body to storage, the upload's
    /// creation if this is its first part, then the record.
    async fn store_chunk<B: PartBody>(
        &self,
        mut upload: NewUpload,
        first: bool,
        chunk: ChunkPart,
        mut body: B,
        len: u64,
    ) -> Result<ChunkAccepted, ServiceError> {
        let _permit = self
            .write_permits
            .try_take(&upload.id.tenant())
            .map_err(|_| ServiceError::Busy)?;
        let _in_flight = InFlight::start();
        let staged = self.stage_part(&upload.id, &chunk, len, &mut body).await?;
        if first && let Err(e) = self.ensure_manifest(&mut upload).await {
            self.storage.discard(&staged).await;
            return Err(e);
        }
        #[cfg(feature = "failpoints")]
        stitch_common::failpoints::crash_here(
            stitch_common::failpoints::CHUNK_DURABLE_BEFORE_RECORD,
        );
        self.count_part(&upload, &chunk, len, staged).await
    }

    /// 3. The body, to a durable copy under a unique name, checked against the part's MD5.
    async fn stage_part<B: PartBody>(
        &self,
        id: &UploadId,
        chunk: &ChunkPart,
        len: u64,
        body: &mut B,
    ) -> Result<StagedChunk, ServiceError> {
        let with_md5 = self.always_md5 || chunk.chunk_md5.is_some();
        let staged = self
            .receive_body(id, chunk.index, chunk.range.start, with_md5, len, body)
            .await?;
        if let Some(expected) = chunk.chunk_md5
            && staged.digests.md5 != Some(expected)
        {
            self.storage.discard(&staged).await;
            return Err(ServiceError::ChecksumMismatch { what: "chunk MD5" });
        }
        Ok(staged)
    }

    /// 4. A first part creates the upload: its manifest now, its state atomically with the
    ///    part. The first writer's manifest is the upload's (its creation time too).
    async fn ensure_manifest(&self, upload: &mut NewUpload) -> Result<(), ServiceError> {
        match self.storage.ensure_manifest(upload).await? {
            ManifestCheck::Created => Ok(()),
            ManifestCheck::Matches(existing) => {
                upload.created_at_ms = existing.created_at_ms;
                Ok(())
            }
            ManifestCheck::Conflicts(existing) => Err(manifest_conflict(&existing, upload)),
        }
    }

    /// 5. Counts the staged copy in one atomic state-store step, then publishes what that
    ///    step put in the outbox (the creation, the merge trigger).
    async fn count_part(
        &self,
        upload: &NewUpload,
        chunk: &ChunkPart,
        len: u64,
        staged: StagedChunk,
    ) -> Result<ChunkAccepted, ServiceError> {
        let record = ChunkRecord {
            index: chunk.index,
            offset: chunk.range.start,
            len,
            crc32c: staged.digests.crc32c,
            md5: staged.digests.md5,
            token: staged.token.clone(),
        };
        let accepted = |duplicate, progress| ChunkAccepted {
            id: upload.id.clone(),
            index: chunk.index,
            geometry: upload.geometry,
            duplicate,
            progress,
            digests: staged.digests,
        };
        let merge_job = MergeJob::new(upload.id.clone());
        let merge_outboxed = OutboxMessage::Merge(merge_job.clone());
        let created_event = Event::created(upload);
        let created_outboxed = OutboxMessage::event(&created_event);
        match self
            .state
            .record_chunk(
                upload,
                &record,
                &merge_outboxed,
                &created_outboxed,
                self.ttl_ms,
            )
            .await
        {
            Ok(Recorded::New(progress)) => {
                metrics::counter!(m::CHUNKS_RECEIVED, "result" => "new").increment(1);
                metrics::counter!(m::CHUNK_BYTES_RECEIVED).increment(len);
                if progress.created_upload {
                    m::transition("created");
                    self.publish_event(&upload.id, &created_event, &created_outboxed)
                        .await;
                }
                if progress.completed_upload {
                    self.trigger_merge(&upload.id, merge_job).await;
                } else {
                    self.assemble(&upload.id);
                }
                Ok(accepted(false, progress))
            }
            Ok(Recorded::Duplicate {
                progress,
                counted_token,
            }) => {
                // The counted copy may be this very one: a rebuild from storage (by another
                // pod or the janitor) can count a copy between its rename and its record.
                // Then this request's copy is the one counted, not a duplicate.
                let ours = counted_token == staged.token;
                if ours {
                    metrics::counter!(m::CHUNKS_RECEIVED, "result" => "new").increment(1);
                    metrics::counter!(m::CHUNK_BYTES_RECEIVED).increment(len);
                } else {
                    metrics::counter!(m::CHUNKS_RECEIVED, "result" => "duplicate").increment(1);
                    self.storage.discard(&staged).await;
                }
                Ok(accepted(!ours, progress))
            }
            Err(e) => Err(self.unrecorded(&staged, e).await),
        }
    }

    /// A staged copy whose record failed: removed, unless the record may have been applied
    /// (the answer was lost), in which case the copy may be the counted one and stays (an
    /// uncounted copy is collected by the janitor; a counted one must never go missing).
    async fn unrecorded(&self, staged: &StagedChunk, e: StateError) -> ServiceError {
        match e {
            StateError::Unavailable {
                detail,
                outcome_unknown: true,
            } => ServiceError::Unavailable(detail),
            e => {
                self.storage.discard(staged).await;
                e.into()
            }
        }
    }

    /// A part of `id` was counted: its in-order prefix may go further now (in the
    /// background; nothing waits for it).
    fn assemble(&self, id: &UploadId) {
        if let Some(assembler) = &self.assembler {
            assembler.chunk_counted(id);
        }
    }

    /// Publishes the merge job the completing chunk wrote to the outbox, and clears it from
    /// the outbox once the broker confirmed it. Any failure leaves the job in the outbox for
    /// the sweeper; the client's chunk is stored and acknowledged either way.
    async fn trigger_merge(&self, id: &UploadId, merge_job: MergeJob) {
        let published = tokio::time::timeout(
            self.publish_timeout,
            self.merges.enqueue(merge_job.to_json().as_bytes(), NOW),
        )
        .await;
        match published {
            Ok(Ok(())) => {
                tracing::info!(upload_id = %id, "upload complete, merge enqueued");
                let entry = OutboxEntry::new(id.clone(), OutboxMessage::Merge(merge_job));
                if let Err(e) = self.state.clear_outbox_entry(&entry).await {
                    tracing::warn!(upload_id = %id, error = %e, "merge enqueued but not cleared from the outbox; it may be enqueued twice");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(upload_id = %id, error = %e, "merge not enqueued; the sweeper will retry from the outbox");
            }
            Err(_) => {
                tracing::warn!(upload_id = %id, "merge enqueue timed out; the sweeper will retry from the outbox");
            }
        }
    }

    /// Publishes an event its state change wrote to the outbox, and clears it from the outbox
    /// once the broker confirmed it; on failure the sweeper publishes it later.
    async fn publish_event(&self, id: &UploadId, event: &Event, outboxed: &OutboxMessage) {
        let published =
            tokio::time::timeout(self.publish_timeout, self.events.publish_event(event)).await;
        match published {
            Ok(Ok(())) => {
                let entry = OutboxEntry::new(id.clone(), outboxed.clone());
                if let Err(e) = self.state.clear_outbox_entry(&entry).await {
                    tracing::warn!(upload_id = %id, error = %e, "event published but not cleared from the outbox; it may be published twice");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(upload_id = %id, error = %e, kind = event.kind.routing_key(), "event not published; the sweeper will retry from the outbox");
            }
            Err(_) => {
                tracing::warn!(upload_id = %id, kind = event.kind.routing_key(), "event publish timed out; the sweeper will retry from the outbox");
            }
        }
    }

    /// Pumps the body into a staged copy, enforcing the declared length as it goes: reading
    /// stops at the first byte past it.
    async fn receive_body<B: PartBody>(
        &self,
        id: &UploadId,
        index: ChunkIndex,
        start: u64,
        with_md5: bool,
        len: u64,
        body: &mut B,
    ) -> Result<StagedChunk, ServiceError> {
        let (tx, rx) = mpsc::channel(FEED_DEPTH);
        let tap = self.assembler.as_ref().and_then(|a| a.tap(id, start));
        let writer = self.storage.stage_chunk(id, index, with_md5, rx, tap);
        let (budget, budget_kib) = (self.body_budget.clone(), self.body_budget_kib);
        let reader = async move {
            let mut received = 0u64;
            while let Some(bytes) = body.next().await? {
                received += bytes.len() as u64;
                if received > len {
                    return Err(ServiceError::BodyTooLong { expected: len });
                }
                // Wait for memory before holding more: the budget is shared by all chunks.
                let kib = (bytes.len().div_ceil(1024) as u32).clamp(1, budget_kib);
                let Ok(permit) = budget.clone().acquire_many_owned(kib).await else {
                    return Ok(());
                };
                if tx
                    .send(Feed::Data(Block::new(bytes, Some(permit))))
                    .await
                    .is_err()
                {
                    return Ok(()); // The writer failed; its error is the one to report.
                }
            }
            if received < len {
                return Err(if received == 0 {
                    ServiceError::EmptyChunk
                } else {
                    ServiceError::BodyTooShort {
                        expected: len,
                        received,
                    }
                });
            }
            let _ = tx.send(Feed::End).await;
            Ok(())
        };
        let (written, read) = tokio::join!(writer, reader);
        match (read, written) {
            (Err(e), Ok(staged)) => {
                // Unreachable in practice (no End was sent), but never keep such a copy.
                self.storage.discard(&staged).await;
                Err(e)
            }
            (Err(e), Err(_)) => Err(e),
            (Ok(()), Err(StorageError::Interrupted)) => {
                Err(ServiceError::InvalidBody("the body ended early".into()))
            }
            (Ok(()), Err(e)) => Err(e.into()),
            (Ok(()), Ok(staged)) => Ok(staged),
        }
    }

    /// The status of the caller's upload `name`.
    pub async fn upload_status(
        &self,
        caller: &Principal,
        name: &UploadName,
    ) -> Result<UploadStatus, ServiceError> {
        caller.require_any(Scope::Read, Scope::Upload)?;
        self.status_of(&caller.upload_id(name.as_str())?).await
    }

    /// The caller's uploads, newest first: at most `limit` after `cursor` (the cursor of the
    /// page before), and the cursor of the next page when there is one. A token sees only its
    /// own upload.
    pub async fn recent_uploads(
        &self,
        caller: &Principal,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<UploadStatus>, Option<String>), ServiceError> {
        caller.require(Scope::Read)?;
        if let Some(name) = caller.single_upload() {
            return match self.status_of(&caller.upload_id(name)?).await {
                Ok(status) => Ok((vec![status], None)),
                Err(ServiceError::NotFound) => Ok((Vec::new(), None)),
                Err(e) => Err(e),
            };
        }
        let after = match cursor.map(parse_cursor).transpose()? {
            Some((ms, name)) => Some((ms, caller.upload_id(&name)?.as_str().to_owned())),
            None => None,
        };
        let mut page = Vec::new();
        let mut next = None;
        for (created_at, id) in self.storage.uploads_of(&caller.tenant).await? {
            if caller.upload_id(id.name()).is_err() {
                continue; // Not one of a link's uploads.
            }
            let position = (created_at, id.as_str().to_owned());
            if after.as_ref().is_some_and(|after| position >= *after) {
                continue;
            }
            if page.len() == limit {
                next = page
                    .last()
                    .map(|s: &UploadStatus| format!("{}.{}", s.created_at_ms, s.id.name()));
                break;
            }
            match self.status_of(&id).await {
                Ok(status) => page.push(status),
                // Removed since the listing: not part of the page.
                Err(ServiceError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((page, next))
    }

    /// `url` (a completed upload's download URL) with a read-only token that lasts `ttl`, for
    /// a caller that may read the upload: a link to hand to someone without a key.
    pub fn signed_link(
        &self,
        caller: &Principal,
        status: &UploadStatus,
        url: &str,
        ttl: Interval,
    ) -> Result<String, ServiceError> {
        caller.require(Scope::Read)?;
        let Some(signer) = self.auth.tokens() else {
            return Err(ServiceError::TokensDisabled);
        };
        if caller.upload.is_some() {
            // A token's holder could outlive its own token with a longer link.
            return Err(ServiceError::Forbidden("a token cannot make links".into()));
        }
        if ttl.0.is_zero() || ttl.0 > self.token_max_ttl {
            return Err(ServiceError::InvalidLinkTtl(format!(
                "link_ttl must be between 1s and auth.token_max_ttl ({}s)",
                self.token_max_ttl.as_secs()
            )));
        }
        let links = DownloadLinks::new(signer.clone(), ttl.0);
        Ok(links.link(url, &status.id, caller.key_id()))
    }

    /// A snapshot of the upload, rebuilt from storage if the state store lost it.
    async fn status_of(&self, id: &UploadId) -> Result<UploadStatus, ServiceError> {
        if let Some(status) = self.state.upload_status(id).await? {
            return Ok(status);
        }
        if !self.rebuild(id).await? {
            return Err(ServiceError::NotFound);
        }
        self.state
            .upload_status(id)
            .await?
            .ok_or(ServiceError::NotFound)
    }

    /// The upload's header, rebuilt from storage if the state store lost it.
    async fn upload_header(&self, id: &UploadId) -> Result<Option<UploadHeader>, ServiceError> {
        if let Some(header) = self.state.upload_header(id).await? {
            return Ok(Some(header));
        }
        if !self.rebuild(id).await? {
            return Ok(None);
        }
        Ok(self.state.upload_header(id).await?)
    }

    async fn rebuild(&self, id: &UploadId) -> Result<bool, ServiceError> {
        match self.recovery.rebuild(id).await {
            Ok(known) => Ok(known),
            Err(RecoveryError::State(e)) => Err(e.into()),
            Err(RecoveryError::Storage(e)) => Err(e.into()),
        }
    }

    /// Aborts the caller's upload `name` and removes its chunks. Idempotent: aborting again
    /// retries the removal.
    pub async fn abort_upload(
        &self,
        caller: &Principal,
        name: &UploadName,
    ) -> Result<(), ServiceError> {
        caller.require(Scope::Delete)?;
        let id = &caller.upload_id(name.as_str())?;
        let status = self.status_of(id).await?;
        let event = Event::aborted(&status);
        let outboxed = OutboxMessage::event(&event);
        if let Aborted::Now { .. } = self.state.abort_upload(id, &outboxed, self.ttl_ms).await? {
            m::transition("aborted");
            self.publish_event(id, &event, &outboxed).await;
        }
        // The quota before the files: should this fail, the files are still there, so the
        // janitor (which walks storage) finishes the removal and the release; the client's
        // DELETE, answered with the error, may also simply be sent again.
        self.quotas.release(id).await?;
        self.storage.remove_upload(id).await?;
        Ok(())
    }

    /// Readiness: Redis and storage must answer (`required`); the broker is reported but
    /// not required, because the outbox keeps chunks flowing while it is down.
    pub async fn check_ready(&self) -> Vec<ReadinessCheck> {
        let (state, storage, broker) = tokio::join!(
            self.state.ping(),
            self.storage.probe(),
            tokio::time::timeout(self.publish_timeout, self.merges.ping()),
        );
        let broker = match broker {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("no answer in time".into()),
        };
        vec![
            ReadinessCheck {
                name: "state",
                required: true,
                result: state.map_err(|e| e.to_string()),
            },
            ReadinessCheck {
                name: "storage",
                required: true,
                result: storage.map_err(|e| e.to_string()),
            },
            ReadinessCheck {
                name: "queue",
                required: false,
                result: broker,
            },
        ]
    }

    /// The completed file of the caller's upload `name`, for download.
    pub async fn completed_file(
        &self,
        caller: &Principal,
        name: &UploadName,
    ) -> Result<CompletedFile, ServiceError> {
        caller.require(Scope::Read)?;
        let status = self.status_of(&caller.upload_id(name.as_str())?).await?;
        let completion = match (&status.completion, status.state) {
            (Some(c), UploadState::Completed) => c.clone(),
            (_, state) => return Err(ServiceError::NotCompleted(state)),
        };
        let path = self.storage.resolve(&completion.location).ok_or_else(|| {
            ServiceError::Internal(format!("bad stored location {:?}", completion.location))
        })?;
        Ok(CompletedFile {
            path,
            size: completion.size,
            md5: completion.md5,
            filename: status.filename,
            completed_at_ms: completion.completed_at_ms,
        })
    }

    /// A client callback must be allowed at all, and pass the operator's policy as written
    /// (the addresses it resolves to are checked whenever a delivery connects to it).
    fn check_callback(&self, url: &str) -> Result<(), ServiceError> {
        let Some(policy) = &self.callbacks else {
            return Err(ServiceError::CallbacksDisabled);
        };
        policy
            .check_url(url)
            .map(|_| ())
            .map_err(|refusal| ServiceError::InvalidCallback(refusal.to_string()))
    }

    fn check_metadata(
        &self,
        metadata: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<(), ServiceError> {
        if let Some(metadata) = metadata {
            let size = serde_json::Value::Object(metadata.clone())
                .to_string()
                .len();
            if size > self.limits.max_metadata_bytes {
                return Err(ServiceError::InvalidRequest(format!(
                    "metadata is {size} bytes; at most {} are allowed",
                    self.limits.max_metadata_bytes
                )));
            }
        }
        Ok(())
    }

    /// An upload's size against `limits.max_upload_bytes`.
    fn check_size(&self, size: u64) -> Result<(), ServiceError> {
        let max = self.limits.max_upload_bytes.0;
        if size > max {
            return Err(ServiceError::UploadTooLarge { size, max });
        }
        Ok(())
    }

    fn check_geometry(&self, g: &Geometry) -> Result<(), ServiceError> {
        let l = &self.limits;
        self.check_size(g.total_size)?;
        if g.chunk_size > l.max_chunk_bytes.0 {
            return Err(ServiceError::ChunkTooLarge {
                size: g.chunk_size,
                max: l.max_chunk_bytes.0,
            });
        }
        if g.total_chunks > l.max_chunks {
            return Err(ServiceError::TooManyChunks {
                count: g.total_chunks,
                max: l.max_chunks,
            });
        }
        Ok(())
    }

    fn check_filename(&self, name: String) -> Result<String, ServiceError> {
        if name.len() > self.limits.max_filename_bytes {
            return Err(ServiceError::InvalidFilename(format!(
                "is longer than {} bytes",
                self.limits.max_filename_bytes
            )));
        }
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(ServiceError::InvalidFilename(
                "must be non-empty, without control characters".into(),
            ));
        }
        Ok(name)
    }
}

/// A listing cursor, `<created_at_ms>.<name>`: the position of the last upload of a page,
/// as (creation time, key) in the caller's tenant (names are unique within it).
fn parse_cursor(raw: &str) -> Result<(u64, String), ServiceError> {
    let invalid = || ServiceError::InvalidRequest("cursor is not one this server gave".into());
    let (ms, name) = raw.split_once('.').ok_or_else(invalid)?;
    let ms = ms.parse().map_err(|_| invalid())?;
    UploadName::parse(name).map_err(|_| invalid())?;
    Ok((ms, name.to_owned()))
}

/// A fresh signing secret for an upload's callbacks, written as Standard Webhooks writes
/// secrets.
fn new_callback_secret() -> String {
    use base64::Engine as _;
    let key: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// Counts a chunk body being written, for as long as it lives.
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics::gauge!(m::CHUNK_WRITES_IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(m::CHUNK_WRITES_IN_FLIGHT).decrement(1.0);
    }
}

/// Whether a part declaring `upload` may join the upload the state store knows as `header`.
fn fits(header: &UploadHeader, upload: &NewUpload) -> Result<(), Conflict> {
    if header.assembly != upload.assembly {
        return Err(Conflict::Assembly);
    }
    if header.geometry != upload.geometry {
        return Err(Conflict::Geometry {
            existing: header.geometry,
        });
    }
    if let (Some(a), Some(b)) = (header.file_md5, upload.file_md5)
        && a != b
    {
        return Err(Conflict::FileMd5);
    }
    if header.state != UploadState::Receiving {
        return Err(Conflict::NotReceiving(header.state));
    }
    Ok(())
}

fn manifest_conflict(existing: &NewUpload, upload: &NewUpload) -> ServiceError {
    if existing.geometry != upload.geometry {
        Conflict::Geometry {
            existing: existing.geometry,
        }
        .into()
    } else {
        Conflict::FileMd5.into()
    }
}
