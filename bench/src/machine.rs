//! What a report says about the machine it ran on: cores, CPU model, kernel, memory, the
//! file system under the work directory, the load before the run, and the date.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;

use crate::procfs;

/// The machine, as the report describes it.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub work_fs: Mount,
    /// 1-minute load average just before the benchmark started.
    pub load_before: f64,
    /// Cores busy (all processes) during a one-second sample just before the benchmark
    /// started: other work competing for the cores shows here.
    pub busy_before: f64,
    /// RFC 3339, UTC, seconds.
    pub date: String,
}

/// The mount a path lives on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

impl Mount {
    /// Whether writes here only reach memory, so that a "disk" baseline measures none.
    pub fn is_memory(&self) -> bool {
        matches!(self.fs_type.as_str(), "tmpfs" | "ramfs")
    }
}

impl Machine {
    /// Describes this machine; `work_dir` must exist. Takes one second, to sample how busy
    /// the machine is.
    pub fn describe(work_dir: &Path) -> anyhow::Result<Self> {
        let busy_before = procfs::busy_cores(Duration::from_secs(1))?;
        let cpus = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1);
        let cpuinfo = read("/proc/cpuinfo")?;
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel = read("/proc/sys/kernel/osrelease")?.trim().to_owned();
        let memory_kib: u64 = read("/proc/meminfo")?
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .context("no MemTotal in /proc/meminfo")?;
        let work_dir = work_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", work_dir.display()))?;
        let work_fs = mount_of(&read("/proc/self/mountinfo")?, &work_dir)
            .with_context(|| format!("no mount found for {}", work_dir.display()))?;
        Ok(Self {
            cpus,
            cpu_model,
            kernel,
            memory_gib: memory_kib as f64 / (1 << 20) as f64,
            work_fs,
            load_before: procfs::load_average()?,
            busy_before,
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        })
    }
}

fn read(path: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

/// The mount of `path` (canonical) from `/proc/self/mountinfo`: the longest mount point
/// that contains it.
fn mount_of(mountinfo: &str, path: &Path) -> Option<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `id parent major:minor root mount-point options [optional…] - type source …`
            let (left, right) = line.split_once(" - ")?;
            let mount_point = PathBuf::from(unescape(left.split(' ').nth(4)?));
            let mut right = right.split(' ');
            let fs_type = right.next()?.to_owned();
            let source = unescape(right.next()?);
            Some(Mount {
                mount_point,
                fs_type,
                source,
            })
        })
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /tmp rw,nosuid shared:2 - tmpfs tmpfs rw,size=1024k
24 22 0:22 / /mnt/my\\040disk rw - xfs /dev/vdb rw
";

    #[test]
    fn the_longest_containing_mount_wins() {
        let root = mount_of(MOUNTINFO, Path::new("/work/main/target")).unwrap();
        assert_eq!(
            (root.fs_type.as_str(), root.source.as_str()),
            ("ext4", "/dev/vda")
        );
        assert!(!root.is_memory());
        let tmp = mount_of(MOUNTINFO, Path::new("/tmp/x")).unwrap();
        assert!(tmp.is_memory());
        // A sibling whose name merely starts the same is not inside the mount.
        assert_eq!(
            mount_of(MOUNTINFO, Path::new("/tmpfoo")).unwrap().fs_type,
            "ext4"
        );
        let spaced = mount_of(MOUNTINFO, Path::new("/mnt/my disk/a")).unwrap();
        assert_eq!(spaced.fs_type, "xfs");
    }

    #[test]
    fn this_machine_can_be_described() {
        let m = Machine::describe(Path::new(".")).unwrap();
        assert!(m.cpus >= 1);
        assert!(!m.kernel.is_empty());
    }
}
