//! [`RedisLock`]: Redlock over one or more independent Redis nodes.

use std::time::{Duration, Instant};

use deadpool_redis::Pool;
use futures_util::future::join_all;
use redis::Script;

use super::{Lease, LockError, MergeLock};
use crate::config::Settings;

/// Redlock over `nodes` (a quorum of ⌊n/2⌋+1 must agree).
#[derive(Clone)]
pub struct RedisLock {
    nodes: Vec<Pool>,
    ttl: Duration,
    node_timeout: Duration,
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
    /// The lock nodes from `lock.redis_urls`, or the state store's Redis when none are set.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
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
        let ttl = settings.lock.ttl.0;
        Ok(Self {
            nodes,
            ttl,
            // A node that cannot answer quickly must not eat the lease's validity.
            node_timeout: (ttl / 10).clamp(Duration::from_millis(50), timeout),
        })
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
        let errors = results.into_iter().filter_map(Result::err).collect();
        (ok, errors)
    }
}

#[async_trait::async_trait]
impl MergeLock for RedisLock {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn try_acquire(&self, key: &str) -> Result<Option<Lease>, LockError> {
        let token = Lease::new_token();
        let started = Instant::now();
        let ttl_ms = self.ttl.as_millis() as u64;
        let (ok, errors) = self
            .on_all_nodes(|pool| {
                let (key, token) = (key.to_owned(), token.clone());
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
        let lease = Lease::new(key, token, started + self.ttl.saturating_sub(self.drift()));
        if ok >= self.quorum() && elapsed + self.drift() < self.ttl {
            return Ok(Some(lease));
        }
        // Not ours: undo the nodes we did get.
        let _ = self.release(&lease).await;
        if errors.len() > self.nodes.len() - self.quorum() {
            return Err(LockError::Unavailable(errors.join("; ")));
        }
        Ok(None)
    }

    async fn renew(&self, lease: &mut Lease) -> Result<bool, LockError> {
        let started = Instant::now();
        let ttl_ms = self.ttl.as_millis() as u64;
        let (ok, errors) = self
            .on_all_nodes(|pool| {
                let (key, token) = (lease.key.clone(), lease.token().to_owned());
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
        if errors.len() > self.nodes.len() - self.quorum() {
            return Err(LockError::Unavailable(errors.join("; ")));
        }
        Ok(false)
    }

    async fn release(&self, lease: &Lease) -> Result<bool, LockError> {
        let (ok, errors) = self
            .on_all_nodes(|pool| {
                let (key, token) = (lease.key.clone(), lease.token().to_owned());
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

    async fn is_held(&self, key: &str) -> Result<bool, LockError> {
        let (held, errors) = self
            .on_all_nodes(|pool| {
                let key = key.to_owned();
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
        if held == 0 && errors.len() == self.nodes.len() {
            return Err(LockError::Unavailable(errors.join("; ")));
        }
        Ok(held > 0)
    }
}
