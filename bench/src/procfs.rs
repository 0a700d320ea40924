//! What `/proc` tells about a process's and the machine's CPU: a process's CPU time (user +
//! system, all threads), the kernel threads', and the machine-wide split (busy, iowait,
//! idle). Memory (`VmHWM`, `VmRSS`) is read by the test kit's [`stitch_testkit::process`].
//!
//! CPU time is what shows who a loopback benchmark is really measuring: client, server and
//! Redis share the same cores, so "the API used 1.6 cores of 2" says more than a rate alone.
//! Kernel threads (disk writeback, among others) are counted apart from other processes, so
//! that work the benchmark causes is not mistaken for work that disturbs it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

/// CPU time a process has used so far, summed over all its threads.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// The CPU used between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// CPU time of process `pid`, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> anyhow::Result<CpuTime> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_cpu(&stat, ticks_per_second()).with_context(|| format!("parsing {path}"))
}

/// CPU time of this process.
pub fn own_cpu_time() -> anyhow::Result<CpuTime> {
    cpu_time(std::process::id())
}

fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

fn parse_stat_cpu(stat: &str, hz: u64) -> anyhow::Result<CpuTime> {
    // The command name (field 2) is in parentheses and may hold spaces and parentheses:
    // fields are counted from the last `)`.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no `)` after the command name")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        let raw = fields.get(i).context("too few fields")?;
        raw.parse()
            .with_context(|| format!("field {} is {raw:?}", i + 3))
    };
    let to_duration = |t: u64| Duration::from_secs_f64(t as f64 / hz as f64);
    Ok(CpuTime {
        user: to_duration(ticks(11)?),
        system: to_duration(ticks(12)?),
    })
}

/// The flag of a kernel thread in field 9 of `/proc/<pid>/stat` (`PF_KTHREAD`).
const PF_KTHREAD: u64 = 0x0020_0000;

/// CPU time used so far by all kernel threads together (writeback, kworkers, …), summed
/// over those alive now: a kernel thread that exits between two readings takes its time
/// with it, so a difference of two readings is a lower bound.
pub fn kernel_threads_cpu() -> anyhow::Result<Duration> {
    let hz = ticks_per_second();
    let mut total = Duration::ZERO;
    for (_, stat) in all_stats()? {
        if parse_stat_flags(&stat).is_some_and(|f| f & PF_KTHREAD != 0)
            && let Ok(cpu) = parse_stat_cpu(&stat, hz)
        {
            total += cpu.total();
        }
    }
    Ok(total)
}

/// The pids of the processes whose command name (`/proc/<pid>/comm`, at most 15 bytes) is
/// `name`, e.g. `redis-server` or `beam.smp`.
pub fn find_processes(name: &str) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for pid in all_pids()? {
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            && comm.trim_end() == name
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// A process's command line (`/proc/<pid>/cmdline`), one string per argument.
pub fn cmdline(pid: u32) -> anyhow::Result<Vec<String>> {
    let path = format!("/proc/{pid}/cmdline");
    let raw = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
    Ok(raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

fn all_pids() -> anyhow::Result<Vec<u32>> {
    let entries = std::fs::read_dir("/proc").context("listing /proc")?;
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// `/proc/<pid>/stat` of every process that still exists when read.
fn all_stats() -> anyhow::Result<Vec<(u32, String)>> {
    Ok(all_pids()?
        .into_iter()
        .filter_map(|pid| {
            Some((
                pid,
                std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
            ))
        })
        .collect())
}

/// Field 9 (`flags`) of a `/proc/<pid>/stat` line.
fn parse_stat_flags(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(6)?.parse().ok()
}

/// The machine's CPU counters (all cores, in clock ticks) from the `cpu` line of `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineCpu {
    /// user + nice + system + irq + softirq.
    pub busy: u64,
    /// irq + softirq (part of `busy`): interrupt work that no process is charged for, such as
    /// loopback TCP's receive path.
    pub irq: u64,
    pub iowait: u64,
    /// Time the hypervisor gave to someone else.
    pub steal: u64,
    pub idle: u64,
}

impl MachineCpu {
    pub fn read() -> anyhow::Result<Self> {
        let path = Path::new("/proc/stat");
        let stat = std::fs::read_to_string(path).context("reading /proc/stat")?;
        Self::parse(&stat)
    }

    fn parse(stat: &str) -> anyhow::Result<Self> {
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no `cpu` line in /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("a counter of the `cpu` line in /proc/stat is not a number")?;
        if v.len() < 8 {
            bail!(
                "the `cpu` line of /proc/stat has {} counters, expected 8 or more",
                v.len()
            );
        }
        let (user, nice, system, idle, iowait, irq, softirq, steal) =
            (v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
        Ok(Self {
            busy: user + nice + system + irq + softirq,
            irq: irq + softirq,
            iowait,
            steal,
            idle,
        })
    }

    /// Average cores in each state between `earlier` and `self`, over `wall`.
    pub fn cores_since(&self, earlier: &MachineCpu, wall: Duration) -> MachineCores {
        let hz = ticks_per_second() as f64;
        let secs = wall.as_secs_f64().max(1e-9);
        let cores = |now: u64, then: u64| now.saturating_sub(then) as f64 / hz / secs;
        MachineCores {
            busy: cores(self.busy, earlier.busy),
            irq: cores(self.irq, earlier.irq),
            iowait: cores(self.iowait, earlier.iowait),
            steal: cores(self.steal, earlier.steal),
        }
    }
}

/// Average number of cores busy, waiting on I/O, or stolen, over an interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MachineCores {
    pub busy: f64,
    /// The part of `busy` spent in interrupt handlers.
    pub irq: f64,
    pub iowait: f64,
    pub steal: f64,
}

/// Cores busy (all processes) over the next `window`.
pub fn busy_cores(window: Duration) -> anyhow::Result<f64> {
    let before = MachineCpu::read()?;
    std::thread::sleep(window);
    Ok(MachineCpu::read()?.cores_since(&before, window).busy)
}

/// Waits until the machine is idle (fewer than `max_busy` cores busy over one second), for
/// at most `timeout`. Returns whether it became idle.
pub fn wait_until_idle(max_busy: f64, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if busy_cores(Duration::from_secs(1))? < max_busy {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// The 1-minute load average.
pub fn load_average() -> anyhow::Result<f64> {
    let raw = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    raw.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .context("/proc/loadavg does not start with a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis, as a thread name can have.
        let stat = "42 (tokio (rt) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1";
        let cpu = parse_stat_cpu(stat, 100).unwrap();
        assert_eq!(cpu.user, Duration::from_millis(2500));
        assert_eq!(cpu.system, Duration::from_millis(500));
        assert_eq!(cpu.total(), Duration::from_secs(3));
    }

    #[test]
    fn stat_flags_are_counted_after_the_command_name() {
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 1 0 0 20 0 1 0 3";
        assert_eq!(parse_stat_flags(kthread), Some(2_129_984));
        assert_ne!(2_129_984 & PF_KTHREAD, 0);
        let user = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1";
        assert_eq!(parse_stat_flags(user).map(|f| f & PF_KTHREAD), Some(0));
    }

    #[test]
    fn kernel_threads_and_processes_can_be_found() {
        kernel_threads_cpu().unwrap();
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        let found = find_processes(me.trim_end()).unwrap();
        assert!(found.contains(&std::process::id()), "{found:?}");
        assert!(!cmdline(std::process::id()).unwrap().is_empty());
    }

    #[test]
    fn the_machine_cpu_line_is_split_into_busy_iowait_steal_and_idle() {
        let stat = "cpu  10 1 5 100 7 2 3 4 0 0\ncpu0 5 0 2 50 3 1 1 2 0 0\n";
        let m = MachineCpu::parse(stat).unwrap();
        assert_eq!(
            m,
            MachineCpu {
                busy: 21,
                irq: 5,
                iowait: 7,
                steal: 4,
                idle: 100
            }
        );
    }

    #[test]
    fn this_process_can_be_measured() {
        own_cpu_time().unwrap();
        MachineCpu::read().unwrap();
    }
}
