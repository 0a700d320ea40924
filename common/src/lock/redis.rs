//! [`RedisLock`]: Redlock over one or more independent Redis nodes.
//!
//! The algorithm's rules, as this file follows them:
//! - every node is asked at once (`SET key token NX PX ttl`), each bounded by a timeout small
//!   against the TTL, so a dead or slow node cannot eat the lease;
//! - the lease is granted when a majority (⌊n/2⌋+1) said yes and time is left: its validity is
//!   `ttl - elapsed - drift`, measured from before the first request on the monotonic clock,
//!   with a clock drift allowance of 1% of the TTL plus 2 ms;
//! - a failed acquire is undone on *every* node, those that said no or did not answer included
//!   (a request that timed out may still have been applied);
//! - renewal is the same vote with a compare-and-`PEXPIRE`: a holder whose token is no longer on
//!   a majority (nodes restarted empty, another holder took them) is not renewed.
//!
//! Keys (on the lock nodes, which may be the state store's Redis or servers of their own):
//! `<ns>:{<id>}:lock` for an upload's merge (the upload's hash tag, so it lands in the
//! upload's Redis Cluster slot) and `<ns>:janitor:lock` for the janitor's pass. They are part
//! of the operator interface: a rolling deploy's old and new workers exclude each other only
//! while both build the same keys.
//!
//! Not granted is not an error: with too few nodes answering no lease is granted, the caller
//! waits and tries again, and nothing about the upload is held against it.

use std::time::{Duration, Instant};

use deadpool_redis::Pool;
use futures_util::future::join_all;
use redis::Script;

use super::{Lease, LockError, LockName, MergeLock};
use crate::config::Settings;

/// Redlock over `nodes` (a quorum of ⌊n/2⌋+1 must agree).
#[derive(Clone)]
pub struct RedisLock {
    nodes: Vec<Pool>,
    /// The prefix of every key (`namespace`).
    namespace: String,
    ttl: Duration,
    node_timeout: Duration,
}

/// The key of `name` in namespace `ns`.
fn key(ns: &str, name: &LockName) -> String {
    match name {
        LockName::Merge(id) => format!("{ns}:{{{id}}}:lock"),
        LockName::Janitor => format!("{ns}:janitor:lock"),
        LockName::Append(id) => format!("{ns}:{{{id}}}:append"),
        LockName::Assemble(id) => format!("{ns}:{{{id}}}:assemble"),
    }
}

fn release_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then \
               return redis.call('DEL', KEYS[1]) else return 0 end",
        )
    })
}

fn renew_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then \
               return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
        )
    })
}

impl RedisLock {
    /// The lock nodes from `lock.redis_urls`, or the state store's Redis when none are set,
    /// with leases of `lock.ttl`.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Self::with_ttl(settings, settings.lock.ttl.0)
    }

    /// The same nodes with leases of `ttl` (the tus append lease).
    pub fn with_ttl(settings: &Settings, ttl: Duration) -> anyhow::Result<Self> {
        let timeout = settings.redis.timeout.0;
        let nodes = if settings.lock.redis_urls.is_empty() {
            vec![crate::state::redis_pool(
                settings.redis.url.expose(),
                8,
                timeout,
                "STITCH__REDIS__URL",
            )?]
        } else {
            settings
                .lock
                .redis_urls
                .iter()
                .map(|url| {
                    crate::state::redis_pool(url.expose(), 8, timeout, "STITCH__LOCK__REDIS_URLS")
                })
                .collect::<anyhow::Result<_>>()?
        };
        Ok(Self {
            nodes,
            namespace: settings.namespace.clone(),
            ttl,
            node_timeout: node_timeout(ttl, timeout),
        })
    }

    /// How many nodes may fail before no majority is possible.
    fn tolerated_failures(&self) -> usize {
        self.nodes.len() - self.quorum()
    }

    fn key(&self, name: &LockName) -> String {
        key(&self.namespace, name)
    }

    fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    /// Clock drift allowance (Redlock: 1% of the TTL plus 2 ms).
    fn drift(&self) -> Duration {
        self.ttl / 100 + Duration::from_millis(2)
    }

    /// Runs `op` on every node at once, each bounded by the node timeout; counts successes.
    async fn on_all_nodes<F, Fut>(&self, op: F) -> (usize, Vec<String>)
    where
        F: Fn(Pool) -> Fut,
        Fut: std::future::Future<Output = Result<bool, String>>,
    {
        let attempts = self.nodes.iter().map(|pool| {
            let fut = op(pool.clone());
            async move {
                match tokio::time::timeout(self.node_timeout, fut).await {
                    Ok(result) => result,
                    Err(_) => Err("timed out".into()),
                }
            }
        });
        let results = join_all(attempts).await;
        let ok = results.iter().filter(|r| matches!(r, Ok(true))).count();
        let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        for _ in &errors {
            crate::metrics::backend_error("redis");
        }
        (ok, errors)
    }
}

#[async_trait::async_trait]
impl MergeLock for RedisLock {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn try_acquire(&self, name: &LockName) -> Result<Option<Lease>, LockError> {
        let key = self.key(name);
        let token = Lease::new_token();
        let started = Instant::now();
        let ttl_ms = self.ttl.as_millis() as u64;
        let (ok, errors) = self
            .on_all_nodes(|pool| {
                let (key, token) = (key.clone(), token.clone());
                async move {
                    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                    let set: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(set.is_some())
                }
            })
            .await;
        let elapsed = started.elapsed();
        let lease = Lease::new(
            name.clone(),
            token,
            started + self.ttl.saturating_sub(self.drift()),
        );
        if ok >= self.quorum() && elapsed + self.drift() < self.ttl {
            return Ok(Some(lease));
        }
        // Not granted: undo it on every node, including those that did not answer.
        let _ = self.release(&lease).await;
        if errors.len() > self.tolerated_failures() {
            // No majority could have answered. A lock outage is not the upload's fault: the
            // caller waits for the nodes as it waits for another holder, without spending
            // one of the upload's attempts.
            tracing::warn!(
                %key,
                nodes = self.nodes.len(),
                unreachable = errors.len(),
                errors = %errors.join("; "),
                "no quorum of lock nodes answered; lease not granted"
            );
        }
        Ok(None)
    }

    async fn renew(&self, lease: &mut Lease) -> Result<bool, LockError> {
        let started = Instant::now();
        let ttl_ms = self.ttl.as_millis() as u64;
        let key = self.key(lease.name());
        let (ok, errors) = self
            .on_all_nodes(|pool| {
                let (key, token) = (key.clone(), lease.token().to_owned());
                async move {
                    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                    let n: i64 = renew_script()
                        .key(&key)
                        .arg(&token)
                        .arg(ttl_ms)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(n == 1)
                }
            })
            .await;
        if ok >= self.quorum() {
            lease.extend_to(started + self.ttl.saturating_sub(self.drift()));
            return Ok(true);
        }
        if errors.len() > self.tolerated_failures() {
            return Err(LockError::Unavailable(errors.join("; ")));
        }
        Ok(false)
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        let key = self.key(lease.name());
        let (ok, errors) = self
            .on_all_nodes(|pool| {
                let (key, token) = (key.clone(), lease.token().to_owned());
                async move {
                    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                    let n: i64 = release_script()
                        .key(&key)
                        .arg(&token)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(n == 1)
                }
            })
            .await;
        if ok == 0 && errors.len() == self.nodes.len() {
            return Err(LockError::Unavailable(errors.join("; ")));
        }
        Ok(ok >= self.quorum())
    }

    async fn is_held(&self, name: &LockName) -> Result<bool, LockError> {
        let key = self.key(name);
        let (held, errors) = self
            .on_all_nodes(|pool| {
                let key = key.clone();
                async move {
                    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                    let n: i64 = redis::cmd("EXISTS")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(n == 1)
                }
            })
            .await;
        // "Not held" needs a majority saying so: a lease lives on a majority, so the nodes
        // that did not answer may be the ones holding it.
        if held == 0 && errors.len() > self.tolerated_failures() {
            return Err(LockError::Unavailable(errors.join("; ")));
        }
        Ok(held > 0)
    }
}

/// The bound on each node's answer: a tenth of the TTL, at least 50 ms, and never longer than
/// the configured Redis timeout (which may itself be shorter than 50 ms).
fn node_timeout(ttl: Duration, redis_timeout: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(50)).min(redis_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::UploadId;

    #[test]
    fn lock_keys_are_the_ones_every_release_has_used() {
        let id = UploadId::parse("abc").unwrap();
        assert_eq!(key("ns", &LockName::Merge(id)), "ns:{abc}:lock");
        assert_eq!(key("ns", &LockName::Janitor), "ns:janitor:lock");
    }

    #[test]
    fn each_node_gets_a_tenth_of_the_ttl_within_the_redis_timeout() {
        let ms = Duration::from_millis;
        assert_eq!(node_timeout(ms(30_000), ms(5_000)), ms(3_000));
        assert_eq!(node_timeout(ms(30_000), ms(1_000)), ms(1_000));
        assert_eq!(node_timeout(ms(300), ms(5_000)), ms(50));
        // A Redis timeout below the 50 ms floor wins (this used to panic in `clamp`).
        assert_eq!(node_timeout(ms(300), ms(20)), ms(20));
    }
}
