//! The merge lock over several independent Redis nodes (`lock.redis_urls`), each a real
//! `redis-server` of this test's own that is stopped, frozen and restarted empty: what a
//! majority grants, what it refuses, and what a holder that lost its majority may still do.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use stitch_common::config::{Interval, Secret};
use stitch_common::id::UploadId;
use stitch_common::lock::{LockName, MergeLock, RedisLock};
use stitch_testkit::TestEnv;
use stitch_testkit::redis_server::RedisServer;

/// The lock's namespace in these tests.
const NAMESPACE: &str = "redlock-test";
/// The key of [`name`] on every node.
const KEY: &str = "redlock-test:{u1}:lock";

/// What these tests lock: upload `u1`'s merge.
fn name() -> LockName {
    LockName::Merge(UploadId::parse("u1").unwrap())
}

/// A lock over `nodes`, as a worker process builds it from its configuration.
fn lock_on(nodes: &[RedisServer], ttl: Duration) -> RedisLock {
    let mut settings = TestEnv::local().settings();
    settings.lock.redis_urls = nodes.iter().map(|n| Secret::new(n.url())).collect();
    settings.lock.ttl = Interval(ttl);
    settings.namespace = NAMESPACE.into();
    RedisLock::new(&settings).unwrap()
}

/// The token `node` holds for `key`, if any.
fn token_on(node: &RedisServer, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut node.connection())
        .unwrap()
}

fn set_on(node: &RedisServer, key: &str, token: &str) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg(token)
        .arg("PX")
        .arg(10_000)
        .query(&mut node.connection())
        .unwrap();
}

#[tokio::test]
async fn a_lease_is_granted_with_a_majority_of_nodes_up_and_refused_without_one() {
    let mut nodes = RedisServer::start_many(3);
    let lock = lock_on(&nodes, Duration::from_secs(10));

    let lease = lock
        .try_acquire(&name())
        .await
        .unwrap()
        .expect("all three up");
    for node in &nodes {
        assert_eq!(token_on(node, KEY).as_deref(), Some(lease.token()));
    }
    assert!(lock.release(&lease).await.unwrap());
    assert!(nodes.iter().all(|n| token_on(n, KEY).is_none()));

    nodes[0].stop();
    let lease = lock
        .try_acquire(&name())
        .await
        .unwrap()
        .expect("two of three up");
    assert!(lock.is_held(&name()).await.unwrap());
    assert!(lock.release(&lease).await.unwrap());
    assert!(
        !lock.is_held(&name()).await.unwrap(),
        "two nodes of three saying 'free' are a majority"
    );

    nodes[1].stop();
    assert!(
        lock.try_acquire(&name()).await.unwrap().is_none(),
        "a lease granted by one node of three"
    );
    assert_eq!(
        token_on(&nodes[2], KEY),
        None,
        "the failed acquire was not undone on the node that said yes"
    );
    assert!(
        lock.is_held(&name()).await.is_err(),
        "one node of three cannot tell that nobody holds the lock"
    );

    nodes[0].restart();
    let lease = lock
        .try_acquire(&name())
        .await
        .unwrap()
        .expect("a majority is back (one of them empty)");
    assert!(lock.release(&lease).await.unwrap());
}

#[tokio::test]
async fn a_lease_held_on_a_majority_cannot_be_taken_by_a_second_holder() {
    let mut nodes = RedisServer::start_many(3);
    let first = lock_on(&nodes, Duration::from_secs(10));
    // Another worker process: its own connections, its own tokens.
    let second = lock_on(&nodes, Duration::from_secs(10));

    let mut held = first.try_acquire(&name()).await.unwrap().unwrap();
    assert!(second.try_acquire(&name()).await.unwrap().is_none());

    nodes[0].stop();
    assert!(
        second.try_acquire(&name()).await.unwrap().is_none(),
        "taken while the holder still has two nodes of three"
    );
    assert!(
        first.renew(&mut held).await.unwrap(),
        "two nodes of three renew"
    );
    for node in &nodes[1..] {
        assert_eq!(
            token_on(node, KEY).as_deref(),
            Some(held.token()),
            "the second holder's attempt changed the first one's lease"
        );
    }
    assert!(second.is_held(&name()).await.unwrap());
}

#[tokio::test]
async fn an_acquire_that_wins_no_majority_is_undone_on_every_node() {
    let nodes = RedisServer::start_many(3);
    let lock = lock_on(&nodes, Duration::from_secs(10));
    // A split vote: two other contenders got one node each.
    set_on(&nodes[0], KEY, "contender-a");
    set_on(&nodes[1], KEY, "contender-b");

    assert!(lock.try_acquire(&name()).await.unwrap().is_none());
    assert_eq!(
        token_on(&nodes[2], KEY),
        None,
        "the node that said yes still holds the loser's token"
    );
    assert_eq!(token_on(&nodes[0], KEY).as_deref(), Some("contender-a"));
    assert_eq!(token_on(&nodes[1], KEY).as_deref(), Some("contender-b"));
}

#[tokio::test]
async fn a_holder_that_lost_its_majority_is_not_renewed() {
    let mut nodes = RedisServer::start_many(3);
    let first = lock_on(&nodes, Duration::from_secs(10));
    let second = lock_on(&nodes, Duration::from_secs(10));
    let mut held = first.try_acquire(&name()).await.unwrap().unwrap();

    // Two nodes restart without persistence: the lease is left on one node of three.
    nodes[0].restart();
    nodes[1].restart();
    assert!(
        !matches!(first.renew(&mut held).await, Ok(true)),
        "renewed on one node of three"
    );

    let taken = second
        .try_acquire(&name())
        .await
        .unwrap()
        .expect("the two empty nodes are a majority");
    assert!(!matches!(first.renew(&mut held).await, Ok(true)));
    assert!(!first.release(&held).await.unwrap());
    for node in &nodes[..2] {
        assert_eq!(
            token_on(node, KEY).as_deref(),
            Some(taken.token()),
            "the old holder's renew or release touched the new lease"
        );
    }
}

#[tokio::test]
async fn the_lease_lasts_the_ttl_less_the_time_taken_and_the_clock_drift() {
    let nodes = RedisServer::start_many(3);
    let ttl = Duration::from_secs(1);
    let lock = lock_on(&nodes, ttl);
    // Redlock's allowance: 1% of the TTL plus 2 ms.
    let drift = ttl / 100 + Duration::from_millis(2);
    // A frozen node is waited for (up to a tenth of the TTL): time the lease must not count.
    nodes[0].pause();

    // The lock reads its clock a moment after `before`; far less than the frozen node costs.
    let slack = Duration::from_millis(20);

    let before = Instant::now();
    let mut lease = lock
        .try_acquire(&name())
        .await
        .unwrap()
        .expect("two of three");
    let took = before.elapsed();
    assert!(
        took >= Duration::from_millis(100),
        "the frozen node was not waited for ({took:?})"
    );
    let latest = before + ttl - drift + slack;
    assert!(
        lease.valid_until() <= latest,
        "the lease ends {:?} too late: the time the acquire took was not subtracted",
        lease.valid_until() - latest
    );
    assert!(lease.is_valid());

    let before = Instant::now();
    assert!(lock.renew(&mut lease).await.unwrap());
    assert!(before.elapsed() >= Duration::from_millis(100));
    assert!(lease.valid_until() <= before + ttl - drift + slack);
    nodes[0].resume();
}
