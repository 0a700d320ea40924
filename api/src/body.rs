//! Chunk bodies, raw (`application/octet-stream`) or `multipart/form-data` with the bytes in
//! a field named `file`, read as a stream of byte blocks: a body is never held whole in
//! memory, and a client that sends too slowly is cut off.
//!
//! "Too slowly" is three limits ([`BodyLimits`]), whichever is reached first:
//! - idle: nothing arrived for `http.body_idle_timeout` (408 `body_timeout`);
//! - rate: less than `http.min_body_rate` bytes per second over a window of
//!   `http.min_body_rate_window` (408 `body_too_slow`), judged at the end of each window,
//!   so a body that ends within its first window is never judged;
//! - deadline: reading took longer than `http.chunk_deadline` in all (408 `body_deadline`).
//!
//! The rate's windows are tumbling and run on the client's time only: the time spent inside
//! [`ChunkBody::next`] waiting for bytes. While the server is not reading (storage is slow,
//! the shared body buffer is full) the client cannot send either, so that time is not held
//! against it. A trickle that stays under the idle timeout therefore holds a write slot for
//! about one window, and no body holds one past the deadline.

use std::future::Future;
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::service::{PartBody, ServiceError};

/// Bytes allowed in a multipart body beyond the chunk itself: boundaries, part headers and
/// small extra fields that browser form clients add.
const MULTIPART_OVERHEAD: u64 = 64 << 10;
/// The name of the multipart field that carries the chunk.
const FILE_FIELD: &str = "file";

/// How slowly a body may arrive (see the module's documentation).
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// Longest wait for the next bytes.
    pub idle_timeout: Duration,
    /// Bytes per second a body must average over each window; 0: no floor.
    pub min_rate: u64,
    pub rate_window: Duration,
    /// Bound on reading the whole body, from its first read.
    pub deadline: Duration,
}

impl BodyLimits {
    pub fn from_settings(http: &stitch_common::config::HttpSettings) -> Self {
        Self {
            idle_timeout: http.body_idle_timeout.0,
            min_rate: http.min_body_rate.0,
            rate_window: http.min_body_rate_window.0,
            deadline: http.chunk_deadline.0,
        }
    }
}

/// A chunk body being read.
pub struct ChunkBody {
    source: Source,
    pace: Pace,
}

/// The clock of one body against its [`BodyLimits`].
struct Pace {
    limits: BodyLimits,
    /// Set at the first read.
    deadline: Option<Instant>,
    /// Time spent waiting for the client in the current rate window.
    waited: Duration,
    /// Bytes the client delivered in the current rate window.
    bytes: u64,
}

enum Source {
    Raw(BodyDataStream),
    Multipart(Box<MultipartSource>),
}

struct MultipartSource {
    multipart: multer::Multipart<'static>,
    /// The field being read.
    field: Option<multer::Field<'static>>,
    seen_file: bool,
}

impl ChunkBody {
    /// Wraps a request body. `expected_len` bounds a multipart body as a whole.
    pub fn new(
        content_type: Option<&str>,
        body: Body,
        expected_len: u64,
        limits: BodyLimits,
    ) -> Result<Self, ServiceError> {
        let is_multipart = content_type
            .and_then(|ct| ct.parse::<mime::Mime>().ok())
            .is_some_and(|m| m.type_() == mime::MULTIPART && m.subtype() == mime::FORM_DATA);
        let source = if is_multipart {
            let boundary =
                multer::parse_boundary(content_type.unwrap_or_default()).map_err(|e| {
                    ServiceError::InvalidBody(format!("bad multipart Content-Type: {e}"))
                })?;
            let constraints = multer::Constraints::new().size_limit(
                multer::SizeLimit::new()
                    .whole_stream(expected_len.saturating_add(MULTIPART_OVERHEAD))
                    .per_field(expected_len.saturating_add(1).max(MULTIPART_OVERHEAD)),
            );
            Source::Multipart(Box::new(MultipartSource {
                multipart: multer::Multipart::with_constraints(
                    body.into_data_stream(),
                    boundary,
                    constraints,
                ),
                field: None,
                seen_file: false,
            }))
        } else {
            Source::Raw(body.into_data_stream())
        };
        Ok(Self {
            source,
            pace: Pace {
                limits,
                deadline: None,
                waited: Duration::ZERO,
                bytes: 0,
            },
        })
    }

    /// Whether the body is multipart (its Content-Length then includes the framing).
    pub fn is_multipart(&self) -> bool {
        matches!(self.source, Source::Multipart(_))
    }

    /// The next block of chunk bytes, or `None` at the end of the chunk (for multipart: after
    /// the rest of the form was read and found to hold no second `file` field).
    pub async fn next(&mut self) -> Result<Option<Bytes>, ServiceError> {
        let Self { source, pace } = self;
        pace.start();
        match source {
            Source::Raw(stream) => match pace.wait(stream.next()).await? {
                None => Ok(None),
                Some(Ok(bytes)) => {
                    pace.delivered(bytes.len())?;
                    Ok(Some(bytes))
                }
                Some(Err(e)) => Err(ServiceError::InvalidBody(e.to_string())),
            },
            Source::Multipart(source) => loop {
                let MultipartSource {
                    multipart,
                    field,
                    seen_file,
                } = &mut **source;
                if let Some(current) = field {
                    let is_file = current.name() == Some(FILE_FIELD);
                    match pace.wait(current.chunk()).await?.map_err(multipart_error)? {
                        Some(bytes) => {
                            // Every field's bytes are the client's sending, not only the file's.
                            pace.delivered(bytes.len())?;
                            if is_file {
                                return Ok(Some(bytes));
                            }
                            continue;
                        }
                        None => *field = None,
                    }
                }
                match pace
                    .wait(multipart.next_field())
                    .await?
                    .map_err(multipart_error)?
                {
                    Some(next) => {
                        if next.name() == Some(FILE_FIELD) {
                            if *seen_file {
                                return Err(ServiceError::InvalidBody(
                                    "more than one field named `file`".into(),
                                ));
                            }
                            *seen_file = true;
                        }
                        *field = Some(next);
                    }
                    None if *seen_file => return Ok(None),
                    None => {
                        return Err(ServiceError::InvalidBody(
                            "the multipart form has no field named `file`".into(),
                        ));
                    }
                }
            },
        }
    }
}

impl PartBody for ChunkBody {
    fn next(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, ServiceError>> + Send {
        ChunkBody::next(self)
    }
}

impl Pace {
    /// Starts the deadline at the first read.
    fn start(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.limits.deadline);
        }
    }

    /// Waits for `f` (a read from the client) within the limits. `f` is never dropped midway
    /// and polled again: it is either finished or the body fails.
    async fn wait<F: Future>(&mut self, f: F) -> Result<F::Output, ServiceError> {
        let deadline = self.deadline.unwrap_or_else(Instant::now);
        let mut f = std::pin::pin!(f);
        let idle_at = Instant::now() + self.limits.idle_timeout;
        loop {
            // Checked before waiting too: a body that keeps flowing never wakes a timer.
            let now = Instant::now();
            if now >= deadline {
                return Err(ServiceError::BodyDeadline {
                    deadline: self.limits.deadline,
                });
            }
            if now >= idle_at {
                return Err(ServiceError::BodyTimeout);
            }
            let mut wake = deadline.min(idle_at);
            if self.limits.min_rate > 0 {
                wake = wake.min(now + self.limits.rate_window.saturating_sub(self.waited));
            }
            tokio::select! {
                biased;
                out = &mut f => {
                    self.waited += now.elapsed();
                    return Ok(out);
                }
                () = tokio::time::sleep_until(wake) => {
                    self.waited += now.elapsed();
                    self.judge()?;
                }
            }
        }
    }

    /// Counts bytes the client delivered, then judges the window if it is over.
    fn delivered(&mut self, len: usize) -> Result<(), ServiceError> {
        self.bytes = self.bytes.saturating_add(len as u64);
        self.judge()
    }

    /// At the end of a rate window: fails the body if it arrived slower than the floor over
    /// the time actually waited (a late wake-up makes that a little longer than the window),
    /// else starts the next window.
    fn judge(&mut self) -> Result<(), ServiceError> {
        let BodyLimits {
            min_rate,
            rate_window,
            ..
        } = self.limits;
        if min_rate == 0 || self.waited < rate_window {
            return Ok(());
        }
        let needed = u128::from(min_rate) * self.waited.as_nanos();
        if u128::from(self.bytes) * 1_000_000_000 < needed {
            return Err(ServiceError::BodyTooSlow {
                min_rate,
                window: rate_window,
            });
        }
        self.waited = Duration::ZERO;
        self.bytes = 0;
        Ok(())
    }
}

fn multipart_error(e: multer::Error) -> ServiceError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ServiceError::InvalidBody("the multipart body is larger than the chunk allows".into())
        }
        other => ServiceError::InvalidBody(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    const LIMITS: BodyLimits = BodyLimits {
        idle_timeout: Duration::from_secs(60),
        min_rate: 1000,
        rate_window: Duration::from_secs(10),
        deadline: Duration::from_secs(3600),
    };

    /// A raw body whose client sends `block` bytes every `every`, `blocks` times, on its own
    /// schedule: what it sent while the server was not reading waits in the socket.
    fn paced_body(block: usize, every: Duration, blocks: u32) -> Body {
        let start = Instant::now();
        Body::from_stream(stream::unfold(0, move |sent| async move {
            if sent == blocks {
                return None;
            }
            tokio::time::sleep_until(start + every * (sent + 1)).await;
            Some((Ok::<_, std::io::Error>(vec![7u8; block]), sent + 1))
        }))
    }

    /// Reads the whole body; the bytes received and the error that ended it, if any.
    async fn read_all(body: Body, limits: BodyLimits) -> (u64, Option<ServiceError>) {
        let mut body = ChunkBody::new(None, body, u64::MAX, limits).unwrap();
        let mut received = 0;
        loop {
            match body.next().await {
                Ok(Some(bytes)) => received += bytes.len() as u64,
                Ok(None) => return (received, None),
                Err(e) => return (received, Some(e)),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_under_the_idle_timeout_is_cut_after_one_window() {
        let started = Instant::now();
        let (received, error) =
            read_all(paced_body(1, Duration::from_millis(300), 1000), LIMITS).await;
        assert!(
            matches!(
                error,
                Some(ServiceError::BodyTooSlow { min_rate: 1000, .. })
            ),
            "{error:?}"
        );
        assert!(received < 40, "{received}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(11),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_is_never_cut() {
        // 500 bytes every half second, exactly 1000 bytes per second, for a minute.
        let (received, error) =
            read_all(paced_body(500, Duration::from_millis(500), 120), LIMITS).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(received, 60_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_that_ends_within_its_first_window_is_not_judged() {
        let (received, error) = read_all(paced_body(1, Duration::from_secs(1), 9), LIMITS).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(received, 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_of_zero_judges_nothing() {
        let limits = BodyLimits {
            min_rate: 0,
            ..LIMITS
        };
        let (received, error) = read_all(paced_body(1, Duration::from_secs(30), 20), limits).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(received, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_body_is_cut_at_the_deadline() {
        let limits = BodyLimits {
            deadline: Duration::from_secs(5),
            ..LIMITS
        };
        let started = Instant::now();
        // 100 kB per second, for ever.
        let (received, error) = read_all(
            paced_body(10_000, Duration::from_millis(100), u32::MAX),
            limits,
        )
        .await;
        assert!(
            matches!(error, Some(ServiceError::BodyDeadline { .. })),
            "{error:?}"
        );
        assert!(received <= 500_000, "{received}");
        assert!(started.elapsed() <= Duration::from_millis(5100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_is_cut_by_whichever_limit_comes_first() {
        let stalled = || paced_body(100, Duration::from_secs(3600), 2);
        let idle_first = BodyLimits {
            idle_timeout: Duration::from_secs(2),
            ..LIMITS
        };
        let (_, error) = read_all(stalled(), idle_first).await;
        assert!(
            matches!(error, Some(ServiceError::BodyTimeout)),
            "{error:?}"
        );
        let (_, error) = read_all(stalled(), LIMITS).await;
        assert!(
            matches!(error, Some(ServiceError::BodyTooSlow { .. })),
            "{error:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_server_spends_not_reading_is_not_held_against_the_client() {
        // The client sends 2000 bytes per second, but the server takes a minute over each
        // block (storage stalled): 33 bytes per second arrive, by the server's fault. Only
        // the time spent waiting for the client counts, and in it the bytes came at once.
        let mut body = ChunkBody::new(
            None,
            paced_body(2000, Duration::from_secs(1), 30),
            u64::MAX,
            LIMITS,
        )
        .unwrap();
        let mut received = 0;
        while let Some(bytes) = body.next().await.unwrap() {
            received += bytes.len();
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        assert_eq!(received, 60_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_multipart_trickle_is_cut_too() {
        let head = "--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n";
        let body = Body::from_stream(
            stream::once(async move { Ok::<_, std::io::Error>(head) }).chain(stream::unfold(
                (),
                |()| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Some((Ok("x"), ()))
                },
            )),
        );
        let mut body = ChunkBody::new(
            Some("multipart/form-data; boundary=b"),
            body,
            1 << 20,
            LIMITS,
        )
        .unwrap();
        let error = loop {
            match body.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the endless body ended"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(error, ServiceError::BodyTooSlow { .. }),
            "{error:?}"
        );
    }
}
