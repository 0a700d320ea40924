//! Who used the cores during a measurement: each process the benchmark watches (its own
//! Stitch processes, itself, the Redis and RabbitMQ servers), the kernel threads (disk
//! writeback), interrupts, and everything else — "other", which is what tells a disturbed
//! measurement (a build or a test run next to it) from a clean one. Also Redis's own count of
//! its CPU time, for a Redis that may not run on this machine.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procfs::{self, CpuTime, MachineCores, MachineCpu};

/// Cores busy below which the machine counts as idle, before a measurement.
pub const IDLE_CORES: f64 = 0.25;
/// Cores used by other processes from which a measurement counts as disturbed.
pub const DISTURBED_CORES: f64 = 0.35;

/// Waits up to `seconds` for the machine to be idle (under [`IDLE_CORES`] busy over one
/// second). Returns whether it was; `seconds == 0` does not wait and returns true.
pub fn wait_for_idle(seconds: u64) -> anyhow::Result<bool> {
    if seconds == 0 {
        return Ok(true);
    }
    procfs::wait_until_idle(IDLE_CORES, Duration::from_secs(seconds))
}

/// The CPU time the Redis server has used since it started (`INFO cpu`: user + system of
/// the main process).
pub fn redis_cpu_time(redis: &mut redis::Connection) -> anyhow::Result<Duration> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query(redis)
        .context("asking Redis for INFO cpu")?;
    parse_info_cpu(&info).context("INFO cpu has no used_cpu_sys / used_cpu_user")
}

fn parse_info_cpu(info: &str) -> Option<Duration> {
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))?
            .parse()
            .ok()
    };
    let secs = field("used_cpu_sys")? + field("used_cpu_user")?;
    Some(Duration::from_secs_f64(secs))
}

/// A process whose CPU time is read, under a label for the report.
#[derive(Clone, Debug)]
pub struct Watched {
    pub label: &'static str,
    pub pid: u32,
}

impl Watched {
    /// This benchmark's own process (its client threads and anything it hashes).
    pub fn this_process() -> Self {
        Self {
            label: "bench",
            pid: std::process::id(),
        }
    }

    /// The shared services on this machine, when they run here: the Redis server and
    /// RabbitMQ's Erlang VM (the one that booted `rabbit`; `rabbitmqctl` runs in a
    /// `beam.smp` of its own, which is not the broker). Services elsewhere are not watched.
    /// They are shared: their CPU includes whatever else uses them meanwhile.
    pub fn services() -> Vec<Self> {
        let mut watched = Vec::new();
        for pid in procfs::find_processes("redis-server").unwrap_or_default() {
            watched.push(Self {
                label: "redis",
                pid,
            });
        }
        for pid in procfs::find_processes("beam.smp").unwrap_or_default() {
            let args = procfs::cmdline(pid).unwrap_or_default();
            if args.windows(2).any(|w| w[0] == "rabbit" && w[1] == "boot") {
                watched.push(Self {
                    label: "rabbitmq",
                    pid,
                });
            }
        }
        watched
    }
}

/// CPU counters at one moment.
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    at: Instant,
    watched: Vec<(Watched, CpuTime)>,
    kernel: Duration,
    machine: MachineCpu,
}

impl CpuSnapshot {
    /// Reads the counters of `watched` (a process that has exited counts as zero), of the
    /// kernel threads and of the machine.
    pub fn take(watched: &[Watched]) -> anyhow::Result<Self> {
        Ok(Self {
            at: Instant::now(),
            watched: watched
                .iter()
                .map(|w| (w.clone(), procfs::cpu_time(w.pid).unwrap_or_default()))
                .collect(),
            kernel: procfs::kernel_threads_cpu()?,
            machine: MachineCpu::read()?,
        })
    }

    /// What was used between `earlier` and this snapshot (processes watched in both).
    pub fn since(&self, earlier: &CpuSnapshot) -> CpuUsage {
        let window = self.at.duration_since(earlier.at);
        let processes = self
            .watched
            .iter()
            .filter_map(|(w, now)| {
                let (_, then) = earlier.watched.iter().find(|(e, _)| e.pid == w.pid)?;
                Some((w.label, now.since(then)))
            })
            .collect();
        CpuUsage {
            window,
            processes,
            kernel: self.kernel.saturating_sub(earlier.kernel),
            machine: self.machine.cores_since(&earlier.machine, window),
        }
    }
}

/// CPU used over a window.
#[derive(Clone, Debug, Default)]
pub struct CpuUsage {
    pub window: Duration,
    /// Per watched process, by label (a label may repeat, e.g. several RabbitMQ processes).
    pub processes: Vec<(&'static str, CpuTime)>,
    /// All kernel threads together.
    pub kernel: Duration,
    pub machine: MachineCores,
}

impl CpuUsage {
    /// CPU time of the processes labelled `label`.
    pub fn cpu(&self, label: &str) -> CpuTime {
        self.processes.iter().filter(|(l, _)| *l == label).fold(
            CpuTime::default(),
            |sum, (_, t)| CpuTime {
                user: sum.user + t.user,
                system: sum.system + t.system,
            },
        )
    }

    /// A CPU time as average cores busy over the window.
    pub fn cores(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.window.as_secs_f64().max(1e-9)
    }

    /// Average cores used by the processes labelled `label`.
    pub fn cores_of(&self, label: &str) -> f64 {
        self.cores(self.cpu(label).total())
    }

    /// Average cores used by kernel threads.
    pub fn kernel_cores(&self) -> f64 {
        self.cores(self.kernel)
    }

    /// Average cores busy with anything but the watched processes, kernel threads and
    /// interrupts: other processes, i.e. work that competed with the measurement.
    pub fn other_cores(&self) -> f64 {
        let watched: Duration = self.processes.iter().map(|(_, t)| t.total()).sum();
        (self.machine.busy - self.machine.irq - self.cores(watched) - self.kernel_cores()).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_split_by_label_and_the_rest_is_other() {
        let secs = Duration::from_secs;
        let usage = CpuUsage {
            window: secs(2),
            processes: vec![
                (
                    "worker",
                    CpuTime {
                        user: secs(1),
                        system: secs(1),
                    },
                ),
                (
                    "rabbitmq",
                    CpuTime {
                        user: Duration::from_millis(100),
                        system: Duration::ZERO,
                    },
                ),
                (
                    "rabbitmq",
                    CpuTime {
                        user: Duration::from_millis(100),
                        system: Duration::ZERO,
                    },
                ),
            ],
            kernel: Duration::from_millis(400),
            machine: MachineCores {
                busy: 1.8,
                irq: 0.1,
                iowait: 0.0,
                steal: 0.0,
            },
        };
        assert!((usage.cores_of("worker") - 1.0).abs() < 1e-9);
        assert!((usage.cores_of("rabbitmq") - 0.1).abs() < 1e-9);
        assert!((usage.kernel_cores() - 0.2).abs() < 1e-9);
        // 1.8 busy − 0.1 irq − 1.1 watched − 0.2 kernel.
        assert!((usage.other_cores() - 0.4).abs() < 1e-9);
        assert_eq!(usage.cpu("nobody"), CpuTime::default());
    }

    #[test]
    fn redis_cpu_time_adds_system_and_user() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9.0\r\n";
        assert_eq!(parse_info_cpu(info), Some(Duration::from_millis(3750)));
        assert_eq!(parse_info_cpu("# CPU\r\n"), None);
    }

    #[test]
    fn this_process_can_be_watched() {
        let watched = [Watched::this_process()];
        let before = CpuSnapshot::take(&watched).unwrap();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let usage = CpuSnapshot::take(&watched).unwrap().since(&before);
        assert_eq!(usage.processes.len(), 1);
        assert!(usage.window > Duration::ZERO);
    }
}
