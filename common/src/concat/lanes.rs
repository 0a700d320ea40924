//! Hashing in line (`merge.hash_in_line`): the whole-file hashes advanced over a chunk's
//! bytes while the API receives them, from memory, instead of reading the chunk back from
//! storage afterwards.
//!
//! Each upload this API receives has a *lane*: where its hashes stand (the *head*: an offset
//! and the hashes' state there) and the *streams* of the pieces being received, by the offset
//! they start at. The writer of a piece taps its blocks into the piece's stream once they are
//! written ([`Tap::push`]), says when it has pushed the last one ([`Tap::fed_all`]) and
//! when the copy is durable ([`Tap::finish`]); a hashing thread of the lane feeds the
//! head's stream to the hashes. For each stream hashed to its end whose copy is durable the
//! lane notes one fact: *hashing copy `token` from state `from` gives state `after`*. Those
//! facts are true for ever (a copy's bytes never change; tokens are unique per copy),
//! whatever becomes of the upload, so the assembly ([`super::prefix`]) can use any of them
//! whose `from` is where its saved checkpoint stands and whose copy is the one counted: it
//! then only clones the chunk into the assembly file and saves the `after` state, reading
//! nothing.
//!
//! The hashes do not wait for a copy to be durable before they go on to the next piece: a
//! stream whose bytes are all hashed is *passed*, and its fact is noted when its copy is
//! durable. If that copy fails instead, the head goes back to where the passed stream
//! began, and every stream from there on is dropped (their bytes followed bytes that are
//! not the file's; the assembly reads their chunks back).
//!
//! Pacing: while an upload arrives in order here (its streams follow each other from the
//! head without a gap), a writer waits whenever the hashes have `merge.hash_queue` bytes to
//! take before its next block, until they have half of that left (so that the writer, and
//! the connection behind it, wake once per half queue, not once per block taken): a client
//! sending in order, on one connection or several, then sends no faster than the file is
//! hashed, and the hashes are moments behind the last byte. Streams the hashes cannot reach yet keep their blocks, up to `merge.hash_ahead`
//! bytes for the whole process, and their writers are not held back (the merge finishes an
//! upload sent out of order anyway). A stream that would go past that budget, or whose
//! writer waited [`HEAD_WAIT`] without the hashes taking a block, stops being hashed in
//! line, and its chunk is read back from storage by the assembly as without this.
//!
//! Each hashing thread and each waiting writer has a condition variable of its own, woken
//! only by what it waits for: a block or an end in the head's stream for the one, room
//! under `merge.hash_queue` for the other. Many uploads and connections then never wake
//! each other.
//!
//! A stream that fails (a body cut short, a copy not written) puts the head back where the
//! stream began: its state was saved before the first byte.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::HashState;
use super::hashing::FileHasher;
use crate::id::UploadId;
use crate::storage::Block;
use crate::upload::ChunkRecord;

/// How long a writer waits on the hashes of its upload without them taking a block before
/// its stream is dropped.
pub const HEAD_WAIT: Duration = Duration::from_secs(2);
/// A lane that nothing fed or hashed for this long is dropped when another is opened (its
/// upload was abandoned, or its chunks go to another API now).
const IDLE: Duration = Duration::from_secs(60);
/// How long an idle hashing thread sleeps before it looks at its lane again on its own.
const HASHER_NAP: Duration = Duration::from_millis(500);

/// Serial numbers of lanes and streams: a thread that let go of the lock knows, when it
/// takes it again, whether the lane or stream it held is still the same one.
static SERIAL: AtomicU64 = AtomicU64::new(1);

fn next_serial() -> u64 {
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// The lanes of the uploads this process receives.
#[derive(Clone)]
pub struct HashLanes {
    shared: Arc<Shared>,
}

struct Shared {
    sha256: bool,
    /// Bytes of the head's stream the hashes have not taken yet before its writer waits.
    head_queue: u64,
    /// Bytes the streams ahead of their heads may hold, in all.
    ahead_budget: u64,
    /// Off once the storage turned out not to clone: hashing in line would then be wasted.
    enabled: AtomicBool,
    lanes: Mutex<Lanes>,
    on_hashed: OnceLock<OnHashed>,
}

type OnHashed = Box<dyn Fn(&UploadId) + Send + Sync>;

#[derive(Default)]
struct Lanes {
    by_upload: HashMap<UploadId, Lane>,
    /// Bytes held by streams ahead of their heads.
    ahead: u64,
    /// Times a writer was held back by the hashes.
    writer_waits: u64,
}

struct Lane {
    serial: u64,
    head: Option<Head>,
    streams: BTreeMap<u64, Stream>,
    /// Copy token → what hashing it did.
    hashed: HashMap<String, Hashed>,
    /// A hashing thread runs for this lane.
    hashing: bool,
    /// Its hashing thread waits on `work`.
    hasher_idle: bool,
    work: Arc<Condvar>,
    /// How many times the head went back to a passed stream: a hashing thread that held
    /// the hasher meanwhile drops what it hashed.
    rewinds: u64,
    touched: Instant,
    /// When its hashes last took a block (or its hashing thread started).
    progressed: Instant,
    runtime: tokio::runtime::Handle,
}

struct Head {
    offset: u64,
    /// `None` while the hashing thread holds it.
    hasher: Option<FileHasher>,
}

struct Stream {
    /// The tap's: a stream found again at the same offset after the lock was let go is the
    /// tap's own only if it is the same.
    serial: u64,
    /// Blocks not hashed yet, and whether each counts against the ahead budget.
    blocks: VecDeque<(Block, bool)>,
    queued: u64,
    fed: u64,
    /// Its writer has pushed every byte of the piece ([`Tap::fed_all`]).
    complete: bool,
    /// The hashes' state where the stream begins, once the hashing thread began it.
    from: Option<HashState>,
    /// Passed: every byte hashed, the head gone on, the copy not durable yet. The state
    /// after its last byte.
    after: Option<HashState>,
    end: Option<End>,
    /// Its writer waits on `room`.
    writer_waits: bool,
    room: Arc<Condvar>,
}

enum End {
    Copy(String),
    Failed,
}

/// What hashing one copy did to the hashes.
#[derive(Clone, Debug)]
struct Hashed {
    from: HashState,
    after: HashState,
}

impl HashLanes {
    /// `head_queue`: bytes a head's stream holds before its writer waits for the hashes;
    /// `ahead_budget`: bytes that streams ahead of their heads may hold, in all.
    pub fn new(sha256: bool, head_queue: u64, ahead_budget: u64) -> Self {
        Self {
            shared: Arc::new(Shared {
                sha256,
                head_queue,
                ahead_budget,
                enabled: AtomicBool::new(true),
                lanes: Mutex::new(Lanes::default()),
                on_hashed: OnceLock::new(),
            }),
        }
    }

    /// Called (from a hashing or writer thread, in the runtime that opened the lane) each
    /// time a copy of `id` has been hashed in line.
    pub fn on_hashed(&self, f: impl Fn(&UploadId) + Send + Sync + 'static) {
        let _ = self.shared.on_hashed.set(Box::new(f));
    }

    /// Stops hashing in line in this process (streams already open carry on).
    pub fn disable(&self) {
        self.shared.enabled.store(false, Ordering::Relaxed);
    }

    /// A stream for the piece of `id` that starts at `start`, if hashing it in line can be of
    /// use: its upload's hashes stand at or before `start` in this process (or it starts at
    /// byte 0, or within `merge.hash_ahead` of it before byte 0 came), and no other copy of
    /// it is being received here. Must be called in a Tokio runtime.
    pub fn tap(&self, id: &UploadId, start: u64) -> Option<Tap> {
        if !self.shared.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let mut lanes = self.shared.lock();
        let now = Instant::now();
        let idle: Vec<UploadId> = lanes
            .by_upload
            .iter()
            .filter(|(_, l)| !l.hashing && now.duration_since(l.touched) > IDLE)
            .map(|(id, _)| id.clone())
            .collect();
        for gone in idle {
            lanes.remove(&gone);
        }
        let sha256 = self.shared.sha256;
        let lane = lanes.by_upload.entry(id.clone()).or_insert_with(|| Lane {
            serial: next_serial(),
            head: None,
            streams: BTreeMap::new(),
            hashed: HashMap::new(),
            hashing: false,
            hasher_idle: false,
            work: Arc::new(Condvar::new()),
            rewinds: 0,
            touched: now,
            progressed: now,
            runtime: tokio::runtime::Handle::current(),
        });
        if lane.head.is_none() && start == 0 && !lane.hashing {
            lane.head = Some(Head {
                offset: 0,
                hasher: Some(FileHasher::new(sha256)),
            });
        }
        let ahead_of_head = match &lane.head {
            Some(head) => start >= head.offset,
            // The first pieces of an upload sent on several connections at once: the one at
            // byte 0 may open the lane after them. Only near the start, so that an API that
            // never receives byte 0 holds little for a head that never comes.
            None => !lane.hashing && lane.hashed.is_empty() && start < self.shared.ahead_budget,
        };
        if !ahead_of_head || lane.streams.contains_key(&start) {
            return None;
        }
        let serial = next_serial();
        lane.streams.insert(start, Stream::new(serial));
        lane.touched = now;
        self.shared.wake(id, lane);
        // A piece beyond a gap: the writers before it need not wait for the hashes.
        lane.release_writers(self.shared.head_queue);
        Some(Tap {
            shared: self.shared.clone(),
            id: id.clone(),
            start,
            serial,
            ended: false,
        })
    }

    /// How many of `records` (counted parts in order, the first starting where `base`
    /// stands) were hashed in line one after the other from `base`, and the state after the
    /// last of them.
    pub fn chain(
        &self,
        id: &UploadId,
        base: &HashState,
        records: &[ChunkRecord],
    ) -> (usize, HashState) {
        let lanes = self.shared.lock();
        let mut state = base.clone();
        let mut n = 0;
        if let Some(lane) = lanes.by_upload.get(id) {
            for r in records {
                match lane.hashed.get(&r.token) {
                    Some(h)
                        if h.from == state
                            && state.offset == r.offset
                            && h.after.offset == r.offset + r.len =>
                    {
                        state = h.after.clone();
                        n += 1;
                    }
                    _ => break,
                }
            }
        }
        (n, state)
    }

    /// Whether the piece of `id` at `offset` is being hashed in line now (the head is there
    /// and its stream is live, or its stream is passed and waits for its copy): the
    /// assembly leaves it to the lane.
    pub fn pending(&self, id: &UploadId, offset: u64) -> bool {
        let lanes = self.shared.lock();
        lanes.by_upload.get(id).is_some_and(|lane| {
            let at_head = lane.head.as_ref().is_some_and(|h| h.offset == offset);
            lane.streams.get(&offset).is_some_and(|s| {
                !matches!(s.end, Some(End::Failed)) && (at_head || s.after.is_some())
            })
        })
    }

    /// The assembly saved a checkpoint of `id` at `state`: facts behind it are of no more
    /// use, and a lane that stood behind it (a chunk it did not hash, read back by the
    /// assembly instead) carries on from there.
    pub fn checkpoint_saved(&self, id: &UploadId, state: &HashState) {
        let mut lanes = self.shared.lock();
        let Lanes {
            by_upload, ahead, ..
        } = &mut *lanes;
        let Some(lane) = by_upload.get_mut(id) else {
            return;
        };
        lane.hashed.retain(|_, h| h.after.offset > state.offset);
        let behind = lane.head.as_ref().is_none_or(|h| h.offset < state.offset);
        if behind && !lane.hashing {
            let Some(hasher) = FileHasher::resume(state) else {
                return;
            };
            lane.head = Some(Head {
                offset: state.offset,
                hasher: Some(hasher),
            });
            let kept = lane.streams.split_off(&state.offset);
            *ahead -= Stream::dropped(std::mem::replace(&mut lane.streams, kept).values());
            self.shared.wake(id, lane);
            lane.release_writers(self.shared.head_queue);
        }
    }

    /// `id` is no longer received (merging, gone): its lane goes.
    pub fn forget(&self, id: &UploadId) {
        self.shared.lock().remove(id);
    }

    /// Bytes held by streams ahead of their heads, in all (for tests and metrics).
    pub fn ahead_bytes(&self) -> u64 {
        self.shared.lock().ahead
    }

    /// Times a writer was held back by the hashes, in all (for tests and metrics).
    pub fn writer_waits(&self) -> u64 {
        self.shared.lock().writer_waits
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the lane's hashing thread if its head's stream has work and none runs, or
    /// wakes it if it waits.
    fn wake(self: &Arc<Self>, id: &UploadId, lane: &mut Lane) {
        if lane.hashing {
            if lane.hasher_idle {
                lane.work.notify_one();
            }
            return;
        }
        let ready = lane
            .head
            .as_ref()
            .is_some_and(|h| lane.streams.contains_key(&h.offset));
        if !ready {
            return;
        }
        lane.hashing = true;
        lane.progressed = Instant::now();
        let shared = self.clone();
        let (id, serial) = (id.clone(), lane.serial);
        let runtime = lane.runtime.clone();
        let spawned = std::thread::Builder::new()
            .name("stitch-hash-lane".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                shared.hash_lane(&id, serial);
            });
        if spawned.is_err() {
            lane.hashing = false;
        }
    }

    /// The hashing thread of lane `serial`: feeds the head's stream to the hashes, then the
    /// next, while there is one.
    fn hash_lane(self: &Arc<Self>, id: &UploadId, serial: u64) {
        let mut lanes = self.lock();
        loop {
            let Lanes {
                by_upload, ahead, ..
            } = &mut *lanes;
            let Some(lane) = by_upload.get_mut(id).filter(|l| l.serial == serial) else {
                return;
            };
            let Some(head) = lane.head.as_mut() else {
                lane.hashing = false;
                return;
            };
            let offset = head.offset;
            let Some(stream) = lane.streams.get_mut(&offset) else {
                lane.hashing = false;
                return;
            };
            let Some(mut hasher) = head.hasher.take() else {
                lane.hashing = false;
                return;
            };
            if stream.from.is_none() {
                stream.from = Some(hasher.state(offset));
            }
            if let Some((block, counted)) = stream.blocks.pop_front() {
                let len = block.len() as u64;
                stream.queued -= len;
                if counted {
                    *ahead -= len;
                }
                lane.touched = Instant::now();
                lane.progressed = lane.touched;
                lane.release_writers(self.head_queue);
                let rewinds = lane.rewinds;
                drop(lanes);
                hasher.update(&block);
                drop(block);
                lanes = self.lock();
                match lanes.by_upload.get_mut(id).filter(|l| l.serial == serial) {
                    Some(lane) if lane.rewinds == rewinds => {
                        if let Some(head) = lane.head.as_mut() {
                            head.hasher = Some(hasher);
                        }
                    }
                    // A passed stream's copy failed meanwhile: this state is not the file's.
                    Some(_) => {}
                    // Forgotten meanwhile.
                    None => return,
                }
                continue;
            }
            match &stream.end {
                Some(End::Copy(token)) => {
                    let from = stream.from.take().expect("set above");
                    let end = offset + stream.fed;
                    let after = hasher.state(end);
                    lane.hashed.insert(token.clone(), Hashed { from, after });
                    lane.streams.remove(&offset);
                    head.offset = end;
                    head.hasher = Some(hasher);
                    lane.touched = Instant::now();
                    lane.release_writers(self.head_queue);
                    drop(lanes);
                    if let Some(f) = self.on_hashed.get() {
                        f(id);
                    }
                    lanes = self.lock();
                }
                Some(End::Failed) => {
                    // Back to where the stream began: its bytes are not the file's.
                    let from = stream.from.take().expect("set above");
                    lane.streams.remove(&offset);
                    match FileHasher::resume(&from) {
                        Some(restored) => head.hasher = Some(restored),
                        None => lane.head = None,
                    }
                    lane.release_writers(self.head_queue);
                }
                None if stream.complete && stream.fed > 0 => {
                    // Every byte is hashed and the copy is being made durable: on to the
                    // next piece meanwhile ([`Tap::finish`] notes the fact). An empty piece
                    // waits for its copy instead: passing it would leave the head where it
                    // is.
                    let end = offset + stream.fed;
                    stream.after = Some(hasher.state(end));
                    head.offset = end;
                    head.hasher = Some(hasher);
                    lane.release_writers(self.head_queue);
                }
                None => {
                    head.hasher = Some(hasher);
                    lane.hasher_idle = true;
                    let work = lane.work.clone();
                    lanes = work
                        .wait_timeout(lanes, HASHER_NAP)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    match lanes.by_upload.get_mut(id).filter(|l| l.serial == serial) {
                        Some(lane) => lane.hasher_idle = false,
                        None => return,
                    }
                }
            }
        }
    }
}

impl Lane {
    /// The bytes the hashes must take before a block of the stream at `start` that is
    /// pushed now: those queued in the streams from the head up to this one. `None` when
    /// the upload is not arriving in order here: some stream of the lane lies beyond a gap
    /// (as far as is known: a stream still being received ends where the next begins), so
    /// the hashes cannot reach it until another piece comes; holding this writer back would
    /// only slow an upload whose file the merge finishes anyway.
    fn backlog(&self, start: u64) -> Option<u64> {
        let head = self.head.as_ref()?;
        let mut at = Some(head.offset);
        let mut backlog = None;
        for (&from, stream) in self.streams.range(head.offset..) {
            if at.is_some_and(|at| at != from) {
                return None;
            }
            if from <= start {
                backlog = Some(backlog.unwrap_or(0) + stream.queued);
            }
            at = match stream.end {
                Some(End::Copy(_)) => Some(from + stream.fed),
                Some(End::Failed) => return None,
                None if stream.complete => Some(from + stream.fed),
                None => None,
            };
        }
        backlog
    }

    /// Wakes each waiting writer that may push now: half its queue is free ([`Tap::push`]).
    fn release_writers(&self, head_queue: u64) {
        for (&start, stream) in &self.streams {
            if stream.writer_waits && self.backlog(start).is_none_or(|b| b < head_queue / 2) {
                stream.room.notify_one();
            }
        }
    }

    /// The stream of the tap `serial` at `start`.
    fn stream_of(&mut self, start: u64, serial: u64) -> Option<&mut Stream> {
        self.streams.get_mut(&start).filter(|s| s.serial == serial)
    }

    /// A passed stream's copy failed: the head goes back to where it began, and every
    /// stream from there on goes (what the hashes took of them followed bytes that are not
    /// the file's). Returns the bytes the dropped streams held ahead of the head.
    fn rewind(&mut self, start: u64, from: &HashState) -> u64 {
        let freed = Stream::dropped(self.streams.split_off(&start).values());
        self.rewinds += 1;
        self.head = FileHasher::resume(from).map(|hasher| Head {
            offset: start,
            hasher: Some(hasher),
        });
        if self.hasher_idle {
            self.work.notify_one();
        }
        freed
    }
}

impl Lanes {
    fn remove(&mut self, id: &UploadId) {
        if let Some(lane) = self.by_upload.remove(id) {
            self.ahead -= Stream::dropped(lane.streams.values());
            lane.work.notify_all();
        }
    }
}

impl Stream {
    fn new(serial: u64) -> Self {
        Self {
            serial,
            blocks: VecDeque::new(),
            queued: 0,
            fed: 0,
            complete: false,
            from: None,
            after: None,
            end: None,
            writer_waits: false,
            room: Arc::new(Condvar::new()),
        }
    }

    /// `streams` leave their lane: their writers, if waiting, wake to find them gone.
    /// Returns the bytes they held ahead of the head.
    fn dropped<'a>(streams: impl IntoIterator<Item = &'a Stream>) -> u64 {
        streams
            .into_iter()
            .map(|stream| {
                stream.room.notify_all();
                stream.ahead_bytes()
            })
            .sum()
    }

    fn ahead_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .filter(|(_, counted)| *counted)
            .map(|(b, _)| b.len() as u64)
            .sum()
    }
}

/// A piece's way into its lane, held by its writer.
pub struct Tap {
    shared: Arc<Shared>,
    id: UploadId,
    start: u64,
    serial: u64,
    ended: bool,
}

impl Tap {
    /// Hands on a block once it is written. Waits while the hashes have `merge.hash_queue`
    /// bytes to take before it and wait on nothing but their thread ([`Lane::backlog`]; a
    /// blocking call: the writer's thread).
    pub fn push(&mut self, mut block: Block) {
        let len = block.len() as u64;
        let mut lanes = self.shared.lock();
        // Once held back, a writer waits until the hashes have taken half the queue, so that
        // it and the connection behind it wake once per half queue, not once per block.
        let mut limit = self.shared.head_queue;
        loop {
            let Lanes {
                by_upload,
                ahead,
                writer_waits,
            } = &mut *lanes;
            let Some(lane) = by_upload.get_mut(&self.id) else {
                return;
            };
            let at_head = lane.head.as_ref().is_some_and(|h| h.offset == self.start);
            let backlog = lane.backlog(self.start);
            let progressed = lane.progressed;
            let Some(stream) = lane.stream_of(self.start, self.serial) else {
                return;
            };
            if stream.end.is_some() || stream.complete {
                return;
            }
            if backlog.is_some_and(|b| b >= limit) {
                if progressed.elapsed() >= HEAD_WAIT {
                    // The hashes are stuck (or starved): this piece is read back instead.
                    drop(lanes);
                    self.fail();
                    return;
                }
                stream.writer_waits = true;
                *writer_waits += 1;
                limit = self.shared.head_queue / 2;
                let room = stream.room.clone();
                lanes = room
                    .wait_timeout(lanes, HEAD_WAIT)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                if let Some(stream) = lanes
                    .by_upload
                    .get_mut(&self.id)
                    .and_then(|l| l.stream_of(self.start, self.serial))
                {
                    stream.writer_waits = false;
                }
                continue;
            }
            if at_head {
                stream.blocks.push_back((block, false));
            } else {
                if *ahead + len > self.shared.ahead_budget {
                    drop(lanes);
                    self.fail();
                    return;
                }
                block.release_budget();
                stream.blocks.push_back((block, true));
                *ahead += len;
            }
            stream.queued += len;
            stream.fed += len;
            lane.touched = Instant::now();
            self.shared.wake(&self.id, lane);
            return;
        }
    }

    /// Every byte of the piece has been pushed (its copy is being made durable): the
    /// hashes may go on past it once they have taken them.
    pub fn fed_all(&mut self) {
        let mut lanes = self.shared.lock();
        if let Some(lane) = lanes.by_upload.get_mut(&self.id)
            && let Some(stream) = lane.stream_of(self.start, self.serial)
            && stream.end.is_none()
        {
            stream.complete = true;
            self.shared.wake(&self.id, lane);
            lane.release_writers(self.shared.head_queue);
        }
    }

    /// The piece's copy is durable under `token`: the lane may note what hashing it did.
    pub fn finish(mut self, token: &str) {
        self.ended = true;
        let mut lanes = self.shared.lock();
        let Some(lane) = lanes.by_upload.get_mut(&self.id) else {
            return;
        };
        let Some(stream) = lane.stream_of(self.start, self.serial) else {
            return;
        };
        if stream.end.is_some() {
            return;
        }
        let Some(after) = stream.after.take() else {
            stream.end = Some(End::Copy(token.to_owned()));
            self.shared.wake(&self.id, lane);
            lane.release_writers(self.shared.head_queue);
            return;
        };
        // Passed already: the fact is known.
        let from = stream.from.take().expect("a passed stream was begun");
        lane.streams.remove(&self.start);
        lane.hashed.insert(token.to_owned(), Hashed { from, after });
        lane.touched = Instant::now();
        drop(lanes);
        if let Some(f) = self.shared.on_hashed.get() {
            f(&self.id);
        }
    }

    /// The stream is not the file's: dropped if the hashes have not begun it, undone by the
    /// hashing thread if they are in it, and the head rewound to it if they passed it.
    fn fail(&mut self) {
        self.ended = true;
        let mut lanes = self.shared.lock();
        let Lanes {
            by_upload, ahead, ..
        } = &mut *lanes;
        let Some(lane) = by_upload.get_mut(&self.id) else {
            return;
        };
        let Some(stream) = lane.stream_of(self.start, self.serial) else {
            return;
        };
        *ahead -= stream.ahead_bytes();
        match (&stream.from, &stream.after) {
            (None, _) => {
                lane.streams.remove(&self.start);
            }
            (Some(from), Some(_)) => {
                let from = from.clone();
                *ahead -= lane.rewind(self.start, &from);
            }
            (Some(_), None) => {
                stream.blocks.clear();
                stream.queued = 0;
                stream.end = Some(End::Failed);
                self.shared.wake(&self.id, lane);
            }
        }
        lane.release_writers(self.shared.head_queue);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if !self.ended {
            self.fail();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use bytes::Bytes;

    use super::*;
    use crate::id::Tenant;

    const CHUNK: usize = 1 << 20;

    fn upload() -> UploadId {
        UploadId::new(&Tenant::parse("acme").unwrap(), "lanes").unwrap()
    }

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn record(offset: u64, len: usize, token: &str) -> ChunkRecord {
        ChunkRecord {
            index: crate::geometry::ChunkIndex(offset / CHUNK as u64),
            offset,
            len: len as u64,
            crc32c: 0,
            md5: None,
            token: token.into(),
        }
    }

    /// The state after hashing `parts` one after the other from byte 0.
    fn hashed(parts: &[&[u8]]) -> HashState {
        let mut hasher = FileHasher::new(true);
        let mut offset = 0;
        for p in parts {
            hasher.update(p);
            offset += p.len() as u64;
        }
        hasher.state(offset)
    }

    fn start() -> HashState {
        FileHasher::new(true).state(0)
    }

    /// Lanes whose hashing threads report each copy hashed on the returned channel.
    fn lanes(ahead_budget: u64) -> (HashLanes, mpsc::Receiver<UploadId>) {
        let lanes = HashLanes::new(true, 2 << 20, ahead_budget);
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        lanes.on_hashed(move |id| {
            let _ = tx.lock().unwrap().send(id.clone());
        });
        (lanes, rx)
    }

    /// Feeds `data` in 256 KiB blocks, as a chunk writer does.
    fn feed(tap: &mut Tap, data: &[u8]) {
        for block in data.chunks(256 << 10) {
            tap.push(Block::new(Bytes::copy_from_slice(block), None));
        }
    }

    /// Feeds all of a piece's bytes, and says so, as its writer does before making the copy
    /// durable.
    fn feed_all(tap: &mut Tap, data: &[u8]) {
        feed(tap, data);
        tap.fed_all();
    }

    /// Feeds a whole copy through `tap` on a blocking thread, as its writer does, and ends it
    /// as the durable copy `token`.
    async fn send(mut tap: Tap, data: &[u8], token: &'static str) {
        let data = data.to_vec();
        tokio::task::spawn_blocking(move || {
            feed_all(&mut tap, &data);
            tap.finish(token);
        })
        .await
        .unwrap();
    }

    fn wait_hashed(rx: &mpsc::Receiver<UploadId>) {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("a copy hashed in line");
    }

    /// Polls `cond` (the lanes' threads move on their own) for up to a minute.
    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_hashed_in_line_chain_to_the_state_of_hashing_the_file() {
        let (lanes, rx) = lanes(64 << 20);
        let id = upload();
        let (a, b) = (bytes(1, CHUNK), bytes(2, CHUNK / 2 + 7));
        // The second piece arrives on another connection while the first is still open.
        let mut first = lanes.tap(&id, 0).expect("a lane opens at byte 0");
        let mut second = lanes.tap(&id, CHUNK as u64).expect("ahead of the head");
        assert!(
            lanes.tap(&id, CHUNK as u64).is_none(),
            "one stream per piece"
        );
        let (ta, tb) = tokio::task::spawn_blocking(move || {
            feed(&mut second, &b);
            assert!(
                second.shared.lock().ahead > 0,
                "the piece ahead holds its blocks"
            );
            second.finish("copy-b");
            feed(&mut first, &a);
            first.finish("copy-a");
            (a, b)
        })
        .await
        .unwrap();
        wait_hashed(&rx);
        wait_hashed(&rx);
        assert_eq!(lanes.ahead_bytes(), 0);

        let records = [
            record(0, ta.len(), "copy-a"),
            record(CHUNK as u64, tb.len(), "copy-b"),
        ];
        let (n, state) = lanes.chain(&id, &start(), &records);
        assert_eq!(n, 2);
        assert_eq!(state, hashed(&[&ta, &tb]));
        // From the state after the first copy, only the second is left.
        let (n, state) = lanes.chain(&id, &hashed(&[&ta]), &records[1..]);
        assert_eq!((n, state), (1, hashed(&[&ta, &tb])));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fact_is_used_only_for_its_copy_from_its_state() {
        let (lanes, rx) = lanes(64 << 20);
        let id = upload();
        let a = bytes(1, CHUNK);
        send(lanes.tap(&id, 0).unwrap(), &a, "copy-a").await;
        wait_hashed(&rx);
        // Another copy of the chunk was counted (a re-send, counted by another API).
        assert_eq!(
            lanes
                .chain(&id, &start(), &[record(0, a.len(), "copy-a2")])
                .0,
            0
        );
        // The prefix stands somewhere else than where the copy was hashed from.
        let elsewhere = hashed(&[&bytes(9, 10)]);
        assert_eq!(
            lanes
                .chain(&id, &elsewhere, &[record(0, a.len(), "copy-a")])
                .0,
            0
        );
        // At the same offset, in another state: a checkpoint saved without the SHA-256.
        let other_digests = FileHasher::new(false).state(0);
        assert_eq!(
            lanes
                .chain(&id, &other_digests, &[record(0, a.len(), "copy-a")])
                .0,
            0
        );
        // The record says another length.
        assert_eq!(
            lanes
                .chain(&id, &start(), &[record(0, a.len() - 1, "copy-a")])
                .0,
            0
        );
        // Another upload.
        let other = UploadId::new(&Tenant::parse("acme").unwrap(), "other").unwrap();
        assert_eq!(
            lanes
                .chain(&other, &start(), &[record(0, a.len(), "copy-a")])
                .0,
            0
        );
        assert_eq!(
            lanes
                .chain(&id, &start(), &[record(0, a.len(), "copy-a")])
                .0,
            1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_cut_short_puts_the_hashes_back_where_it_began() {
        let (lanes, rx) = lanes(64 << 20);
        let id = upload();
        let mut cut = lanes.tap(&id, 0).unwrap();
        let shared = cut.shared.clone();
        let (stream_begun, id2) = (shared.clone(), id.clone());
        tokio::task::spawn_blocking(move || {
            feed(&mut cut, &bytes(7, CHUNK / 2));
            // The hashes have taken some of its bytes when the body breaks off.
            eventually("the hashes to begin the stream", || {
                let lanes = stream_begun.lock();
                let lane = &lanes.by_upload[&id2];
                lane.streams
                    .get(&0)
                    .is_some_and(|s| s.from.is_some() && s.queued == 0)
            });
            drop(cut);
        })
        .await
        .unwrap();
        eventually("the failed stream to be undone", || {
            !shared.lock().by_upload[&id].streams.contains_key(&0)
        });

        let good = bytes(8, CHUNK);
        let tap = lanes.tap(&id, 0).expect("the piece again, from byte 0");
        send(tap, &good, "copy-good").await;
        wait_hashed(&rx);
        let (n, state) = lanes.chain(&id, &start(), &[record(0, good.len(), "copy-good")]);
        assert_eq!((n, state), (1, hashed(&[&good])));
    }

    /// Where the head of `id`'s lane stands.
    fn head_of(lanes: &HashLanes, id: &UploadId) -> Option<u64> {
        let lanes = lanes.shared.lock();
        lanes.by_upload[id].head.as_ref().map(|h| h.offset)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hashes_go_on_past_a_piece_whose_copy_is_not_durable_yet() {
        let (lanes, rx) = lanes(64 << 20);
        let id = upload();
        let (a, b) = (bytes(1, CHUNK), bytes(2, CHUNK / 2 + 3));
        let mut first = lanes.tap(&id, 0).unwrap();
        let mut second = lanes.tap(&id, CHUNK as u64).unwrap();
        let (ta, tb) = (a.clone(), b.clone());
        let (first, second) = tokio::task::spawn_blocking(move || {
            feed_all(&mut first, &ta);
            feed_all(&mut second, &tb);
            (first, second)
        })
        .await
        .unwrap();
        let end = (a.len() + b.len()) as u64;
        // Neither copy is durable, and the hashes have taken both.
        eventually("the hashes to pass both pieces", || {
            head_of(&lanes, &id) == Some(end)
        });
        assert!(lanes.pending(&id, 0), "the assembly waits for the fact");
        let records = [
            record(0, a.len(), "copy-a"),
            record(CHUNK as u64, b.len(), "copy-b"),
        ];
        assert_eq!(lanes.chain(&id, &start(), &records).0, 0, "no fact yet");
        // The copies become durable, the later one first.
        tokio::task::spawn_blocking(move || {
            second.finish("copy-b");
            first.finish("copy-a");
        })
        .await
        .unwrap();
        wait_hashed(&rx);
        wait_hashed(&rx);
        assert_eq!(lanes.chain(&id, &start(), &records), (2, hashed(&[&a, &b])));
        assert!(!lanes.pending(&id, 0));
        assert_eq!(lanes.ahead_bytes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_piece_is_noted_once_its_copy_is_durable() {
        let (lanes, rx) = lanes(64 << 20);
        let id = upload();
        let mut empty = lanes.tap(&id, 0).unwrap();
        eventually("the hashing thread to wait for bytes", || {
            lanes.shared.lock().by_upload[&id].hasher_idle
        });
        // Its writer says it has pushed everything (nothing), and the hashing thread looks
        // at the piece before the copy is durable.
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            empty.fed_all();
            std::thread::sleep(Duration::from_millis(100));
            empty.finish("copy-empty");
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("the copy's end to get through: the lanes are not stuck");
        wait_hashed(&rx);
        assert_eq!(
            lanes.chain(&id, &start(), &[record(0, 0, "copy-empty")]),
            (1, start())
        );
        // The lane is still usable: its hashing thread did not get stuck on the empty piece.
        let a = bytes(1, CHUNK);
        send(lanes.tap(&id, 0).expect("the head is at 0"), &a, "copy-a").await;
        wait_hashed(&rx);
        assert_eq!(
            lanes.chain(&id, &start(), &[record(0, a.len(), "copy-a")]),
            (1, hashed(&[&a]))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_passed_piece_whose_copy_fails_rewinds_the_hashes_to_it() {
        let (lanes, rx) = lanes(64 << 20);
        let id = upload();
        let (a, b) = (bytes(1, CHUNK), bytes(2, CHUNK));
        let mut first = lanes.tap(&id, 0).unwrap();
        let mut second = lanes.tap(&id, CHUNK as u64).unwrap();
        let third_start = 2 * CHUNK as u64;
        let mut third = lanes.tap(&id, third_start).unwrap();
        let (ta, tb) = (a.clone(), b.clone());
        let (first, third) = tokio::task::spawn_blocking(move || {
            feed_all(&mut first, &ta);
            feed_all(&mut second, &tb);
            second.finish("copy-b");
            // The third piece is still arriving.
            feed(&mut third, &bytes(3, CHUNK / 4));
            (first, third)
        })
        .await
        .unwrap();
        wait_hashed(&rx);
        eventually("the hashes to be in the third piece", || {
            head_of(&lanes, &id) == Some(third_start)
                && lanes.shared.lock().by_upload[&id].streams[&third_start]
                    .blocks
                    .is_empty()
        });
        // The first copy is never made durable (a failed fsync, say).
        tokio::task::spawn_blocking(move || drop(first))
            .await
            .unwrap();
        assert_eq!(
            head_of(&lanes, &id),
            Some(0),
            "back where the failed copy began"
        );
        assert!(
            lanes.shared.lock().by_upload[&id].streams.is_empty(),
            "every stream from there on is dropped"
        );
        assert!(!lanes.pending(&id, CHUNK as u64));
        assert_eq!(lanes.ahead_bytes(), 0);
        // What the third piece's writer does next goes nowhere.
        tokio::task::spawn_blocking(move || {
            let mut third = third;
            feed_all(&mut third, &bytes(3, CHUNK / 4));
            third.finish("copy-c");
        })
        .await
        .unwrap();
        let records = [
            record(0, a.len(), "copy-a"),
            record(CHUNK as u64, b.len(), "copy-b"),
        ];
        assert_eq!(lanes.chain(&id, &start(), &records).0, 0);

        // The piece again, other bytes: hashed from byte 0's state.
        let a2 = bytes(4, CHUNK);
        send(
            lanes.tap(&id, 0).expect("the head is there"),
            &a2,
            "copy-a2",
        )
        .await;
        wait_hashed(&rx);
        assert_eq!(
            lanes.chain(&id, &start(), &[record(0, a2.len(), "copy-a2")]),
            (1, hashed(&[&a2]))
        );
        // The second copy's fact still says only what is true: from the first copy's state.
        assert_eq!(
            lanes.chain(&id, &hashed(&[&a]), &records[1..]),
            (1, hashed(&[&a, &b]))
        );
        assert_eq!(lanes.chain(&id, &hashed(&[&a2]), &records[1..]).0, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_held_back_by_the_hashes_is_woken_as_they_take_its_blocks() {
        // A queue of four blocks: the writer is held back again and again. A wake-up lost
        // would cost it HEAD_WAIT each time.
        let queue = 4 * (256 << 10);
        let lanes = HashLanes::new(true, queue as u64, 64 << 20);
        let id = upload();
        let data = bytes(5, 32 * (256 << 10));
        let tap = lanes.tap(&id, 0).unwrap();
        let began = Instant::now();
        let tap = tokio::task::spawn_blocking({
            let data = data.clone();
            move || {
                let mut tap = tap;
                feed_all(&mut tap, &data);
                tap
            }
        })
        .await
        .unwrap();
        let took = began.elapsed();
        let waits = lanes.writer_waits();
        assert!(waits > 0, "the writer was held back");
        assert!(
            took < HEAD_WAIT * 4,
            "{waits} waits took {took:?}: a writer slept through the room made for it"
        );
        // Held back, it waits until half the queue is free, then pushes at least two
        // blocks: at most one wait per two blocks (a writer woken at each block taken
        // would wait about 28 times).
        assert!(waits <= 16, "{waits} waits for 32 blocks");
        tokio::task::spawn_blocking(move || tap.finish("copy"))
            .await
            .unwrap();
        eventually("the fact", || {
            lanes
                .chain(&id, &start(), &[record(0, data.len(), "copy")])
                .0
                == 1
        });
        assert_eq!(
            lanes.chain(&id, &start(), &[record(0, data.len(), "copy")]),
            (1, hashed(&[&data]))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_ahead_that_would_pass_the_budget_is_dropped_and_its_bytes_freed() {
        let (lanes, _rx) = lanes(CHUNK as u64);
        let id = upload();
        let _head = lanes.tap(&id, 0).unwrap();
        let mut ahead = lanes.tap(&id, 4 * CHUNK as u64).unwrap();
        let probe = lanes.clone();
        tokio::task::spawn_blocking(move || {
            ahead.push(Block::new(Bytes::from(bytes(1, CHUNK * 3 / 4)), None));
            assert_eq!(probe.ahead_bytes(), (CHUNK * 3 / 4) as u64);
            // Past the budget: the stream goes, and with it what it held.
            ahead.push(Block::new(Bytes::from(bytes(2, CHUNK / 2)), None));
            assert_eq!(probe.ahead_bytes(), 0);
            ahead.push(Block::new(Bytes::from(bytes(3, 10)), None));
            ahead.finish("copy-far");
            assert_eq!(probe.ahead_bytes(), 0);
        })
        .await
        .unwrap();
        assert!(
            !lanes.shared.lock().by_upload[&id]
                .streams
                .contains_key(&(4 * CHUNK as u64)),
            "the dropped stream is gone"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_behind_the_saved_prefix_carries_on_from_it() {
        let (lanes, rx) = lanes(64 << 20);
        let id = upload();
        let (a, b) = (bytes(1, CHUNK), bytes(2, CHUNK));
        // The first chunk's body reached another API: this one's lane never hashes it.
        drop(lanes.tap(&id, 0).unwrap());
        send(lanes.tap(&id, CHUNK as u64).unwrap(), &b, "copy-b").await;
        assert_eq!(lanes.ahead_bytes(), b.len() as u64, "waiting for the head");
        // The assembly read the first chunk back and saved the prefix after it.
        lanes.checkpoint_saved(&id, &hashed(&[&a]));
        wait_hashed(&rx);
        let (n, state) = lanes.chain(
            &id,
            &hashed(&[&a]),
            &[record(CHUNK as u64, b.len(), "copy-b")],
        );
        assert_eq!((n, state), (1, hashed(&[&a, &b])));
        assert_eq!(lanes.ahead_bytes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pieces_near_the_start_wait_for_byte_0_and_others_need_a_head() {
        let (lanes, rx) = lanes(4 * CHUNK as u64);
        let id = upload();
        assert!(
            lanes.tap(&id, 4 * CHUNK as u64).is_none(),
            "past merge.hash_ahead, nothing hashes up to it"
        );
        // The second piece's request came before the first's.
        let (a, b) = (bytes(1, CHUNK), bytes(2, CHUNK));
        let mut second = lanes.tap(&id, CHUNK as u64).expect("near the start");
        let mut first = lanes.tap(&id, 0).expect("byte 0 opens the head");
        assert!(
            lanes.tap(&id, 0).is_none(),
            "a second copy of a piece being hashed"
        );
        let (ta, tb) = (a.clone(), b.clone());
        tokio::task::spawn_blocking(move || {
            feed(&mut second, &tb);
            second.finish("copy-b");
            feed(&mut first, &ta);
            first.finish("copy-a");
        })
        .await
        .unwrap();
        wait_hashed(&rx);
        wait_hashed(&rx);
        let records = [
            record(0, a.len(), "copy-a"),
            record(CHUNK as u64, b.len(), "copy-b"),
        ];
        assert_eq!(lanes.chain(&id, &start(), &records), (2, hashed(&[&a, &b])));
        lanes.disable();
        let other = UploadId::new(&Tenant::parse("acme").unwrap(), "other").unwrap();
        assert!(lanes.tap(&other, 0).is_none(), "disabled");
    }
}
