//! Crash failpoints, compiled only into test builds (feature `failpoints`): a named line at a
//! boundary between two durable steps where a test can make the process die as if the
//! kernel or an orchestrator had killed it there.
//!
//! A test arms a failpoint through the environment of the process it starts, with the `fail`
//! crate's syntax: `FAILPOINTS=merge-renamed-before-commit=return` crashes at the first pass
//! over that line, `FAILPOINTS=chunk-durable-before-record=1*off->return` at the second. The
//! binaries set the environment up at start (`fail::FailScenario::setup`).
//!
//! The names and the boundaries they sit at are listed in `docs/reliability.md`.

/// The API, after a new upload's quota reservation and before its manifest (and, for the
/// chunk protocol, before its first chunk's body is read).
pub const QUOTA_RESERVED_BEFORE_MANIFEST: &str = "quota-reserved-before-manifest";
/// The API, after a chunk's copy is durable on storage (and, for an upload's first chunk,
/// after its manifest) and before the state store records it.
pub const CHUNK_DURABLE_BEFORE_RECORD: &str = "chunk-durable-before-record";
/// The API, after a segment of an append (tus `PATCH`) is durable and before the state store
/// counts it.
pub const SEGMENT_DURABLE_BEFORE_RECORD: &str = "segment-durable-before-record";
/// The API, after a step of an upload's early assembly saved its checkpoint (the assembly
/// synced up to it), before the next step.
pub const PREFIX_SAVED: &str = "prefix-saved";
/// The worker, after the merged file's rename and its completion record, before the commit.
pub const MERGE_RENAMED_BEFORE_COMMIT: &str = "merge-renamed-before-commit";
/// The worker, after the commit (which put the completion event in the outbox), before the
/// event is published.
pub const MERGE_COMMITTED_BEFORE_PUBLISH: &str = "merge-committed-before-publish";
/// The worker, after the completion event is published (and confirmed), before the merge job
/// is acked.
pub const MERGE_PUBLISHED_BEFORE_ACK: &str = "merge-published-before-ack";

/// Kills this process with SIGKILL when the failpoint `name` is armed (any action but `off`;
/// `return` is the natural one), and does nothing otherwise.
///
/// SIGKILL to itself is what makes the crash faithful: the kernel ends every thread at once,
/// no destructor or `atexit` handler runs, no buffered write is flushed, no connection is
/// closed politely (the broker and Redis see the socket drop, as they would when a node
/// dies), so only what earlier steps made durable survives. A panic would unwind one task
/// and let the rest of the process carry on; `std::process::abort` raises SIGABRT, which a
/// handler or a core dump could observe.
pub fn crash_here(name: &str) {
    if fail::eval(name, |_| ()).is_none() {
        return;
    }
    eprintln!("failpoint {name}: killing this process (SIGKILL)");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // SIGKILL cannot be caught or ignored, so this is not reached; were the signal refused,
    // the process must still not go past the line.
    std::process::abort();
}
