//! Every Prometheus metric Stitch exports, in one place: names (prefixed `stitch_`, unit in
//! the name), help, and labels (always low-cardinality: never an upload id). The dashboard
//! and the alert rules under `deploy/` use these names; a test checks that each one they use
//! is exported by the binaries.
//!
//! [`register`] describes them and creates every labelled series at zero, so that a metric
//! exists (and `increase()` works) before its first event.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

// API
pub const HTTP_REQUESTS: &str = "stitch_http_requests_total";
pub const HTTP_DURATION: &str = "stitch_http_request_duration_seconds";
pub const CHUNKS_RECEIVED: &str = "stitch_chunks_received_total";
pub const CHUNK_BYTES_RECEIVED: &str = "stitch_chunk_bytes_received_total";
pub const CHUNK_WRITES_IN_FLIGHT: &str = "stitch_chunk_writes_in_flight";
pub const CHUNKS_REFUSED: &str = "stitch_chunks_refused_total";
/// New uploads refused by a tenant's quota, by the limit that refused them (never by tenant:
/// tenants are unbounded).
pub const QUOTA_REFUSALS: &str = "stitch_quota_refusals_total";
// Upload lifecycle (API and worker)
pub const UPLOAD_TRANSITIONS: &str = "stitch_upload_transitions_total";
pub const ASSEMBLY_STEPS: &str = "stitch_assembly_steps_total";
pub const ASSEMBLY_BYTES: &str = "stitch_assembly_bytes_total";
/// How the early assembly found the parts after a prefix: `after` (only those, the prefix
/// carried on from the process's own last step) or `all` (every counted part).
pub const ASSEMBLY_READS: &str = "stitch_assembly_reads_total";
/// The early assembly's leases on an upload (`taken`), and the times another API held it
/// (`busy`).
pub const ASSEMBLY_LEASES: &str = "stitch_assembly_leases_total";
/// Of those, the bytes hashed as they arrived (merge.hash_in_line), not read back.
pub const HASHED_IN_LINE_BYTES: &str = "stitch_hashed_in_line_bytes_total";
/// Early assembly (API) and merges (worker) alike.
pub const CLONED_BYTES: &str = "stitch_cloned_bytes_total";
// Worker
pub const MERGES: &str = "stitch_merges_total";
pub const MERGE_DURATION: &str = "stitch_merge_duration_seconds";
pub const MERGE_SIZE: &str = "stitch_merge_size_bytes";
pub const MERGE_PREFIX_BYTES: &str = "stitch_merge_prefix_bytes_total";
pub const MERGE_TRANSIENT_FAILURES: &str = "stitch_merge_transient_failures_total";
pub const QUEUE_MESSAGES: &str = "stitch_queue_messages";
/// Per tenant, for the tenants named in `[auth.tenants]` only (bounded by configuration).
pub const TENANT_ACTIVE_UPLOADS: &str = "stitch_tenant_active_uploads";
pub const TENANT_STORED_BYTES: &str = "stitch_tenant_stored_bytes";
pub const QUEUE_CONSUMERS: &str = "stitch_queue_consumers";
pub const DEAD_LETTERS: &str = "stitch_dead_letter_messages";
pub const LOCK_ACQUISITIONS: &str = "stitch_lock_acquisitions_total";
pub const LOCK_LEASES_LOST: &str = "stitch_lock_leases_lost_total";
pub const OUTBOX_ENTRIES: &str = "stitch_outbox_entries";
pub const STUCK_MERGES: &str = "stitch_stuck_merges";
pub const WEBHOOK_DELIVERIES: &str = "stitch_webhook_deliveries_total";
pub const WEBHOOK_DURATION: &str = "stitch_webhook_delivery_duration_seconds";
/// Chunk bodies refused because the process's write slots, or the tenant's share of them,
/// were taken (`limit` = `process` | `tenant`).
pub const WRITE_REFUSALS: &str = "stitch_write_refusals_total";
pub const JANITOR_FILES_REMOVED: &str = "stitch_janitor_files_removed_total";
/// Quota reservations the janitor released because their upload never reached storage.
pub const QUOTA_RESERVATIONS_RELEASED: &str = "stitch_quota_reservations_released_total";
// Everywhere
pub const BACKEND_ERRORS: &str = "stitch_backend_errors_total";
/// Uploads whose state was rebuilt from storage after the state store lost it.
pub const STATE_REBUILDS: &str = "stitch_state_rebuilds_total";

/// Label values, fixed sets.
pub const TRANSITIONS: [&str; 7] = [
    "created",
    "completed",
    "failed",
    "aborted",
    "expired",
    "deleted",
    "reopened",
];
/// `restored`: this process rebuilt it; `already_known`: another had, or it was never lost.
pub const REBUILD_OUTCOMES: [&str; 2] = ["restored", "already_known"];
pub const MERGE_OUTCOMES: [&str; 8] = [
    "committed",
    "already_completed",
    "skipped",
    "failed",
    "reopened",
    "retried",
    "lock_busy",
    "cancelled",
];
/// Causes of a transiently failed merge attempt: the merge's own file I/O, or a backend
/// (Redis, RabbitMQ, SQLite).
pub const TRANSIENT_CAUSES: [&str; 2] = ["storage", "backend"];
pub const LOCK_RESULTS: [&str; 3] = ["acquired", "busy", "error"];
pub const WEBHOOK_OUTCOMES: [&str; 7] = [
    "delivered",
    "failed",
    "dead",
    "gone",
    "disabled",
    "refused",
    "unknown_endpoint",
];
pub const BACKENDS: [&str; 4] = ["redis", "rabbitmq", "sqlite", "storage"];
pub const QUEUE_FAMILIES: [&str; 3] = ["merge", "webhooks", "webhooks.feed"];

/// Which process registers which metrics.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Worker,
}

/// Describes the role's metrics and creates their series at zero, once per process and role
/// (several apps in one process share one recorder).
pub fn register(role: Role) {
    static API: std::sync::Once = std::sync::Once::new();
    static WORKER: std::sync::Once = std::sync::Once::new();
    let once = match role {
        Role::Api => &API,
        Role::Worker => &WORKER,
    };
    once.call_once(|| register_now(role));
}

fn register_now(role: Role) {
    // The recorder first: series created before it exists would go nowhere.
    crate::telemetry::metrics_handle();
    describe_counter!(
        BACKEND_ERRORS,
        "Failed calls to a backend (Redis, RabbitMQ, SQLite, storage)"
    );
    for backend in BACKENDS {
        metrics::counter!(BACKEND_ERRORS, "backend" => backend).absolute(0);
    }
    describe_counter!(
        UPLOAD_TRANSITIONS,
        "Uploads entering a state: created, completed, failed, aborted, expired, deleted (retention), reopened (back to receiving: storage lost chunks)"
    );
    for t in TRANSITIONS {
        metrics::counter!(UPLOAD_TRANSITIONS, "transition" => t).absolute(0);
    }
    describe_counter!(
        STATE_REBUILDS,
        "Uploads the state store did not know and storage did, rebuilt from storage"
    );
    for outcome in REBUILD_OUTCOMES {
        metrics::counter!(STATE_REBUILDS, "outcome" => outcome).absolute(0);
    }
    describe_counter!(
        CLONED_BYTES,
        Unit::Bytes,
        "Bytes placed into assembly and merged files by sharing their chunks' blocks (merge.reflink) instead of writing them again"
    );
    metrics::counter!(CLONED_BYTES).absolute(0);
    if role == Role::Api {
        describe_counter!(
            HTTP_REQUESTS,
            "HTTP requests by route template, method and status"
        );
        describe_histogram!(
            HTTP_DURATION,
            Unit::Seconds,
            "HTTP request latency by route template, method and status"
        );
        describe_counter!(
            CHUNKS_RECEIVED,
            "Chunks accepted, new or duplicate (an idempotent re-send)"
        );
        describe_counter!(
            CHUNK_BYTES_RECEIVED,
            Unit::Bytes,
            "Bytes of chunks newly counted"
        );
        describe_gauge!(CHUNK_WRITES_IN_FLIGHT, "Chunk bodies being written now");
        describe_counter!(
            QUOTA_REFUSALS,
            "New uploads refused by a tenant quota, by limit: active_uploads, stored_bytes, upload_bytes"
        );
        for limit in ["active_uploads", "stored_bytes", "upload_bytes"] {
            metrics::counter!(QUOTA_REFUSALS, "limit" => limit).absolute(0);
        }
        describe_counter!(
            CHUNKS_REFUSED,
            "Chunk requests refused, by HTTP status class"
        );
        for result in ["new", "duplicate"] {
            metrics::counter!(CHUNKS_RECEIVED, "result" => result).absolute(0);
        }
        metrics::counter!(CHUNK_BYTES_RECEIVED).absolute(0);
        metrics::gauge!(CHUNK_WRITES_IN_FLIGHT).set(0.0);
        describe_counter!(
            ASSEMBLY_STEPS,
            "Steps that carried an upload's in-order prefix on while its chunks arrive (merge.incremental), by result: ok, error (the merge does that part)"
        );
        describe_counter!(
            ASSEMBLY_BYTES,
            Unit::Bytes,
            "Bytes appended to assembly files and hashed while their chunks arrive"
        );
        describe_counter!(
            HASHED_IN_LINE_BYTES,
            Unit::Bytes,
            "Of the assembled bytes, those hashed from memory as their chunks arrived (merge.hash_in_line) rather than read back from storage"
        );
        describe_counter!(
            ASSEMBLY_READS,
            "How the early assembly read the counted parts after an upload's prefix: after (only those, carrying on from this process's last step) or all (every counted part: a first step here, or another API's step since)"
        );
        describe_counter!(
            ASSEMBLY_LEASES,
            "Leases the early assembly took on an upload (taken: one per run of chunks counted one after another), and tries that found another API holding it (busy)"
        );
        for result in ["ok", "error"] {
            metrics::counter!(ASSEMBLY_STEPS, "result" => result).absolute(0);
        }
        for result in ["taken", "busy"] {
            metrics::counter!(ASSEMBLY_LEASES, "result" => result).absolute(0);
        }
        for parts in ["after", "all"] {
            metrics::counter!(ASSEMBLY_READS, "parts" => parts).absolute(0);
        }
        metrics::counter!(ASSEMBLY_BYTES).absolute(0);
        metrics::counter!(HASHED_IN_LINE_BYTES).absolute(0);
        for class in ["4xx", "5xx"] {
            metrics::counter!(CHUNKS_REFUSED, "class" => class).absolute(0);
        }
    }
    if role == Role::Worker {
        describe_counter!(MERGES, "Merge attempts by outcome");
        describe_histogram!(
            MERGE_DURATION,
            Unit::Seconds,
            "Duration of committed merges (copy, MD5, fsync, commit)"
        );
        describe_histogram!(MERGE_SIZE, Unit::Bytes, "Size of merged files");
        describe_counter!(
            MERGE_PREFIX_BYTES,
            Unit::Bytes,
            "Bytes of committed merges that were assembled and hashed while the chunks arrived (the merge carried on from a saved prefix)"
        );
        metrics::counter!(MERGE_PREFIX_BYTES).absolute(0);
        describe_counter!(
            MERGE_TRANSIENT_FAILURES,
            "Merge attempts that failed transiently and were scheduled again, by cause (storage: disk full, I/O errors; backend: Redis, RabbitMQ)"
        );
        describe_gauge!(QUEUE_MESSAGES, "Messages ready in a work queue, by family");
        describe_gauge!(QUEUE_CONSUMERS, "Consumers of a work queue, by family");
        describe_gauge!(DEAD_LETTERS, "Messages in a dead-letter queue, by family");
        describe_gauge!(
            TENANT_ACTIVE_UPLOADS,
            "Uploads a tenant has active (receiving or merging), for tenants named in [auth.tenants]"
        );
        describe_gauge!(
            TENANT_STORED_BYTES,
            Unit::Bytes,
            "Bytes a tenant's uploads hold against its quota, for tenants named in [auth.tenants]"
        );
        describe_counter!(
            LOCK_ACQUISITIONS,
            "Merge lock acquisitions: acquired, busy (contention), error"
        );
        describe_counter!(
            LOCK_LEASES_LOST,
            "Merge leases lost while merging (renewal failed or lapsed)"
        );
        describe_gauge!(
            OUTBOX_ENTRIES,
            "Outbox entries (merge triggers, events) not yet published"
        );
        describe_gauge!(STUCK_MERGES, "Uploads merging past the stuck-merge horizon");
        describe_counter!(WEBHOOK_DELIVERIES, "Webhook delivery attempts by outcome");
        describe_histogram!(WEBHOOK_DURATION, Unit::Seconds, "Webhook delivery latency");
        describe_counter!(
            JANITOR_FILES_REMOVED,
            "Files and directories the janitor removed"
        );
        describe_counter!(
            WRITE_REFUSALS,
            "Chunk bodies refused because every write slot, or the tenant's share, was taken"
        );
        describe_counter!(
            QUOTA_RESERVATIONS_RELEASED,
            "Quota reservations the janitor released because their upload never reached storage"
        );
        for outcome in MERGE_OUTCOMES {
            metrics::counter!(MERGES, "outcome" => outcome).absolute(0);
        }
        for cause in TRANSIENT_CAUSES {
            metrics::counter!(MERGE_TRANSIENT_FAILURES, "cause" => cause).absolute(0);
        }
        for result in LOCK_RESULTS {
            metrics::counter!(LOCK_ACQUISITIONS, "result" => result).absolute(0);
        }
        metrics::counter!(LOCK_LEASES_LOST).absolute(0);
        for family in QUEUE_FAMILIES {
            metrics::gauge!(QUEUE_MESSAGES, "family" => family).set(0.0);
            metrics::gauge!(QUEUE_CONSUMERS, "family" => family).set(0.0);
            metrics::gauge!(DEAD_LETTERS, "family" => family).set(0.0);
        }
        metrics::gauge!(OUTBOX_ENTRIES).set(0.0);
        metrics::gauge!(STUCK_MERGES).set(0.0);
        for outcome in WEBHOOK_OUTCOMES {
            metrics::counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).absolute(0);
        }
        metrics::counter!(JANITOR_FILES_REMOVED).absolute(0);
        metrics::counter!(QUOTA_RESERVATIONS_RELEASED).absolute(0);
    }
}

/// Counts a failed backend call.
pub fn backend_error(backend: &'static str) {
    metrics::counter!(BACKEND_ERRORS, "backend" => backend).increment(1);
}

/// Counts an upload entering a state.
pub fn transition(name: &'static str) {
    metrics::counter!(UPLOAD_TRANSITIONS, "transition" => name).increment(1);
}
