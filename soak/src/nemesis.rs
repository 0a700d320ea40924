//! The nemesis: from a seed, one fault after another, a few seconds apart — SIGKILL an API
//! or a worker and start it again, freeze one (SIGSTOP, SIGCONT seconds later), stop one
//! gracefully (SIGTERM) and start it again, kill Redis and RabbitMQ (SIGKILL) and start them
//! again over their files. Every fault ends before the next one begins, and nothing is left
//! down or frozen when it stops.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};

use crate::cluster::Cluster;

/// What the nemesis did, for the summary.
#[derive(Default, Debug)]
pub struct Log {
    pub actions: Vec<String>,
    /// What went wrong on the Stitch side: a process that did not stop cleanly on SIGTERM or
    /// died on its own.
    pub problems: Vec<String>,
}

fn pause(rng: &mut StdRng, from_ms: u64, to_ms: u64) {
    std::thread::sleep(Duration::from_millis(rng.random_range(from_ms..to_ms)));
}

/// Runs until `until`, then makes sure every process runs. On a thread of its own (every
/// step blocks).
pub fn run(cluster: Arc<Mutex<Cluster>>, seed: u64, until: Instant) -> anyhow::Result<Log> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let mut log = Log::default();
    let started = Instant::now();
    let lock = || cluster.lock().unwrap_or_else(|e| e.into_inner());
    while Instant::now() < until {
        pause(&mut rng, 1_500, 5_000);
        if Instant::now() >= until {
            break;
        }
        let slots = lock().slots.len();
        let slot = rng.random_range(0..slots);
        let label = lock().slots[slot].label();
        let at = started.elapsed().as_secs();
        let action = match rng.random_range(0..100) {
            0..=34 => {
                lock().kill_slot(slot);
                pause(&mut rng, 200, 3_000);
                lock().start_slot(slot)?;
                format!("{at:>5}s SIGKILL {label}, restarted")
            }
            35..=59 => {
                let held = rng.random_range(500..6_000);
                lock().signal_slot(slot, "STOP");
                std::thread::sleep(Duration::from_millis(held));
                lock().signal_slot(slot, "CONT");
                format!("{at:>5}s SIGSTOP {label} for {held} ms, SIGCONT")
            }
            60..=74 => {
                if let Some(problem) = lock().terminate_slot(slot) {
                    log.problems.push(problem);
                }
                lock().start_slot(slot)?;
                format!("{at:>5}s SIGTERM {label}, restarted")
            }
            75..=89 => {
                let down = rng.random_range(0..2_000);
                lock().redis.kill();
                std::thread::sleep(Duration::from_millis(down));
                lock().redis.restart();
                format!(
                    "{at:>5}s SIGKILL Redis, restarted from its append-only file after {down} ms"
                )
            }
            _ => {
                let begun = Instant::now();
                lock().rabbit.kill();
                pause(&mut rng, 0, 2_000);
                lock().rabbit.restart()?;
                format!(
                    "{at:>5}s SIGKILL RabbitMQ, restarted over its database (down {:.1} s)",
                    begun.elapsed().as_secs_f64()
                )
            }
        };
        println!("soak: nemesis {action}");
        log.actions.push(action);
        let exited = lock().ensure_running()?;
        log.problems.extend(exited);
    }
    let exited = lock().ensure_running()?;
    log.problems.extend(exited);
    Ok(log)
}
