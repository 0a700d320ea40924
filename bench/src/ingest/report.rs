//! The ingest benchmark's report, in the skeleton every report has ([`Report`]): the issue's
//! targets with PASS/FAIL as measured, the baselines, every configuration, how to read it,
//! and what this run shows.

use super::{DISTURBED_CORES, IngestResults, RunResult};
use crate::deployment::BUILD_API;
use crate::report::{Report, Section, Table, fixed, mib, size, size_flag, targets_table, verdict};

/// Share of the limit that the throughput targets ask for.
const TARGET_SHARE: f64 = 0.7;
/// The memory target for the API while 16 chunks of 64 MiB stream in at once.
const RSS_LIMIT: u64 = 64 << 20;

/// What a configuration's rate is compared with.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Limit {
    /// (a): without per-chunk MD5, the disk is the limit.
    Disk,
    /// 2×(b): with it, two cores of MD5 are.
    TwoCoreMd5,
}

impl Limit {
    fn of(run: &RunResult) -> Self {
        if run.content_md5 {
            Self::TwoCoreMd5
        } else {
            Self::Disk
        }
    }

    /// The limit for `run`, in MB/s: (a) around the run, or 2×(b).
    fn mb_per_s(self, r: &IngestResults, run: &RunResult) -> f64 {
        match self {
            Self::Disk => run.disk_limit(),
            Self::TwoCoreMd5 => 2.0 * r.md5.mb_per_s(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Disk => "(a) around it",
            Self::TwoCoreMd5 => "2×(b)",
        }
    }
}

fn ratio(r: &IngestResults, run: &RunResult) -> f64 {
    run.mb_per_s() / Limit::of(run).mb_per_s(r, run)
}

/// The report of a run.
pub fn report(r: &IngestResults) -> Report<'_> {
    let a = &r.args;
    let clients: Vec<String> = a.clients.iter().map(ToString::to_string).collect();
    Report {
        command: "ingest",
        heading: "## Ingest (issue: core ingest)",
        build: BUILD_API,
        services_for: "",
        options: format!(
            "--size {} --chunk-size {} --clients {} --md5 {} --rss-chunk-size {} --rss-clients {} --rss-repeats {} --api-bin {}",
            size_flag(a.size),
            size_flag(a.chunk_size),
            clients.join(","),
            a.md5,
            size_flag(a.rss_chunk_size),
            a.rss_clients,
            a.rss_repeats,
            a.api_bin.display()
        ),
        preface: Vec::new(),
        headline: Section::new("Targets", targets(r)),
        machine: &r.machine,
        sharing: "client, API and Redis share them",
        baselines: baselines(r),
        sections: vec![
            Section::new("Ingest through `stitch-api`", runs(r))
                .intro(format!(
                    "One {} upload per row, each with a fresh API process; the last rows are the memory runs, repeated because a peak varies from run to run.",
                    size(a.size)
                ))
                .outro(format!(
                    "An API process that has just started and served nothing peaks at {}.",
                    mib(r.idle_rss)
                )),
        ],
        how_to_read: HOW_TO_READ,
        observations: observations(r),
    }
}

const HOW_TO_READ: &[&str] = &[
    "MB/s are decimal (10^6 bytes per second) of wall time, from the first chunk request sent to the last response read; sizes are binary (MiB, GiB).",
    "(a) is a plain sequential write of the same bytes to the disk the API stores on, one fsync at the end. This VM's disk is fast or slow depending on its recent history (the same write ranges from about 100 MB/s to 1.5 GB/s), so (a) is measured before the first configuration and again after each one, and each configuration without `Content-MD5` is compared with the mean of the (a) just before and just after it (column \"(a) around it\"). The first write of a run, to blocks the disk has not seen lately, is shown but not used.",
    "Ratio: a configuration's rate divided by its limit. Without `Content-MD5` the API only writes (and CRC32C-checks) the bytes, so the limit is the disk; with it, the API must also MD5 every byte, and two cores of MD5, 2×(b), is the most a 2-core machine could hash. A ratio near 1 means the API adds little beyond the unavoidable work; above 1 means the disk happened to be faster during the run than around it.",
    "The API fsyncs every chunk (and its directory) before counting it, as durability requires, where (a) fsyncs once: per-chunk costs show up as a lower ratio, most with one client, whose chunks wait for each other's fsync.",
    "CPU columns are CPU seconds used during the upload divided by its wall time: the average number of cores busy. API = the `stitch-api` process (all threads, user + system), client = this benchmark (one thread), Redis = the Redis server; machine busy and iowait are for the whole machine (`/proc/stat`), and other = machine busy minus those three: kernel threads (disk writeback) and any other process, so a high value means the run was disturbed. On loopback the sender's kernel does much of the TCP work, so client CPU is mostly kernel time. When machine busy nears the core count, the rate is CPU-bound here (client and server share the cores) and a machine with more cores would do better.",
    "API peak RSS is `VmHWM` of the row's API process read right after its upload: the most memory it ever had resident. Every row uses its own process, so each peak is that configuration's.",
    "Each configuration is measured once, after waiting for the machine to be idle, and measured again (up to `--retries` times) when other work used 0.35 cores or more meanwhile; the observations list what was repeated. On a shared 2-core VM expect ±20% between runs of the whole benchmark (much more for the disk). Compare ratios rather than absolute rates across machines.",
    "Every run is checked before it is reported: every response is 200, for the chunk sent, with the CRC32C (and with `Content-MD5` the MD5) of the bytes sent; exactly one response says `upload_complete`; the final status is `merging` with every chunk and byte counted; storage holds exactly one file per chunk, of the right length. No merge worker runs, so the numbers are for ingest alone.",
];

fn baselines(r: &IngestResults) -> Table {
    let a = &r.args;
    let rates = r.disk_rates();
    let (min, max) = rates.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), &x| {
        (lo.min(x), hi.max(x))
    });
    let mut table = Table::new(&["Limit", ">MB/s", "Notes"]);
    table
        .row([
            format!(
                "(a) disk: {} written sequentially in {} writes, one fsync at the end",
                size(r.disk_first.bytes),
                size(a.chunk_size)
            ),
            fixed(r.disk_median(), 0),
            format!(
                "median of {} measurements, before the first configuration and after each (range {min:.0}–{max:.0})",
                rates.len()
            ),
        ])
        .row([
            "(a), the run's first write".to_owned(),
            fixed(r.disk_first.mb_per_s(), 0),
            "to blocks the disk had not seen lately; not used".to_owned(),
        ])
        .row([
            format!("(b) MD5 of {} in memory, one core", size(r.md5.bytes)),
            fixed(r.md5.mb_per_s(), 0),
            format!("{:.2} s", r.md5.elapsed.as_secs_f64()),
        ])
        .row([
            "2×(b): the two-core MD5 ceiling".to_owned(),
            fixed(2.0 * r.md5.mb_per_s(), 0),
            String::new(),
        ]);
    table
}

fn runs(r: &IngestResults) -> Table {
    let mut table = Table::new(&[
        ">Clients",
        ">Chunk",
        "Content-MD5",
        ">Seconds",
        ">MB/s",
        ">(a) around it",
        ">Ratio",
        "Ratio of",
        ">API CPU",
        ">Client CPU",
        ">Redis CPU",
        ">Other CPU",
        ">Machine busy",
        ">iowait",
        ">API peak RSS",
    ]);
    for run in r.all_runs() {
        table.row([
            run.clients.to_string(),
            size(run.chunk_size),
            if run.content_md5 { "yes" } else { "no" }.to_owned(),
            fixed(run.outcome.elapsed.as_secs_f64(), 2),
            fixed(run.mb_per_s(), 0),
            format!(
                "{:.0} ({:.0}, {:.0})",
                run.disk_limit(),
                run.disk_before.mb_per_s(),
                run.disk_after.mb_per_s()
            ),
            fixed(ratio(r, run), 2),
            Limit::of(run).name().to_owned(),
            fixed(run.cores(run.api_cpu.total()), 2),
            fixed(run.cores(run.client_cpu.total()), 2),
            fixed(run.cores(run.redis_cpu), 2),
            fixed(run.other_cores(), 2),
            fixed(run.machine.busy, 2),
            fixed(run.machine.iowait, 2),
            mib(run.peak_rss),
        ]);
    }
    table
}

fn find(r: &IngestResults, clients: usize, content_md5: bool) -> Option<&RunResult> {
    r.runs
        .iter()
        .find(|run| run.clients == clients && run.content_md5 == content_md5)
}

fn targets(r: &IngestResults) -> Table {
    let mut table = targets_table();
    for (content_md5, what) in [
        (false, "4-way ingest without per-chunk MD5 ≥ 0.7 × (a) disk"),
        (
            true,
            "4-way ingest with `Content-MD5` on every chunk ≥ 0.7 × 2×(b) MD5",
        ),
    ] {
        let row = match find(r, 4, content_md5) {
            Some(run) => {
                let limit = Limit::of(run).mb_per_s(r, run);
                let needed = TARGET_SHARE * limit;
                [
                    format!("{:.0} MB/s ({:.2} ×)", run.mb_per_s(), ratio(r, run)),
                    format!("≥ 0.7 × {limit:.0} = {needed:.0} MB/s"),
                    verdict(run.mb_per_s() >= needed).to_owned(),
                ]
            }
            None => [
                "not run (see `--clients` and `--md5`)".to_owned(),
                String::new(),
                "—".to_owned(),
            ],
        };
        let [measured, needed, result] = row;
        table.row([what.to_owned(), measured, needed, result]);
    }
    // The memory target holds for the worse of the runs, with and without Content-MD5.
    if let Some(worst) = r.rss_runs.iter().max_by_key(|run| run.peak_rss) {
        let what = format!(
            "API peak RSS while {} chunks of {} stream in at once < {}",
            worst.clients,
            size(worst.chunk_size),
            mib(RSS_LIMIT)
        );
        // The case: 16 chunks of 64 MiB in flight at once.
        let standard = worst.clients == 16 && worst.chunk_size == 64 << 20 && worst.chunks >= 16;
        let result = if standard {
            verdict(worst.peak_rss < RSS_LIMIT)
        } else {
            "— (not the issue's 16 × 64 MiB at once)"
        };
        let peaks = |content_md5: bool| -> String {
            let of_kind: Vec<String> = r
                .rss_runs
                .iter()
                .filter(|run| run.content_md5 == content_md5)
                .map(|run| format!("{:.1}", run.peak_rss as f64 / crate::MIB as f64))
                .collect();
            of_kind.join(", ")
        };
        let mut runs = Vec::new();
        if r.rss_runs.iter().any(|run| !run.content_md5) {
            runs.push(format!("{} MiB without MD5", peaks(false)));
        }
        if r.rss_runs.iter().any(|run| run.content_md5) {
            runs.push(format!("{} MiB with MD5", peaks(true)));
        }
        table.row([
            what,
            format!("{} (worst of {})", mib(worst.peak_rss), runs.join("; ")),
            format!("< {}", mib(RSS_LIMIT)),
            result.to_owned(),
        ]);
    }
    table
}

fn observations(r: &IngestResults) -> Vec<String> {
    let mut notes = Vec::new();
    let cpus = r.machine.cpus as f64;
    let disk = r.disk_median();
    let md5x2 = 2.0 * r.md5.mb_per_s();
    let fastest_plain = r
        .runs
        .iter()
        .filter(|run| !run.content_md5)
        .max_by(|x, y| x.mb_per_s().total_cmp(&y.mb_per_s()));
    if let Some(plain) = fastest_plain.filter(|run| run.mb_per_s() > disk) {
        notes.push(format!(
            "Ingest without MD5 ran faster than (a) ({}: {:.0} MB/s against a median (a) of {disk:.0} MB/s): on this disk one big file with one fsync goes slower than many {} files fsynced in parallel, so (a) understates what the disk takes from the API, and ratios above 1 against it mean that, not that the API beats its disk. The fastest no-MD5 rate is the better bound on the write path here.",
            describe(plain),
            plain.mb_per_s(),
            size(plain.chunk_size)
        ));
    } else if disk < md5x2 {
        notes.push(format!(
            "The disk (median {disk:.0} MB/s) is slower than two cores of MD5 ({md5x2:.0} MB/s): with `Content-MD5` the API cannot beat the disk either, so here the MD5 rows are bounded by min((a), 2×(b)), a ratio of about {:.2} against 2×(b).",
            disk / md5x2
        ));
    }
    if let Some(best) = r
        .runs
        .iter()
        .max_by(|x, y| x.mb_per_s().total_cmp(&y.mb_per_s()))
    {
        notes.push(format!(
            "Fastest configuration: {}, {:.0} MB/s ({:.2} × {}).",
            describe(best),
            best.mb_per_s(),
            ratio(r, best),
            Limit::of(best).name()
        ));
    }
    let all: Vec<&RunResult> = r.all_runs().collect();
    // CPU cost per gigabyte ingested, split by who pays it.
    let costs: Vec<String> = all
        .iter()
        .map(|run| {
            let gb = run.outcome.bytes as f64 / 1e9;
            format!(
                "{} {:.2} API + {:.2} client",
                describe(run),
                run.api_cpu.total().as_secs_f64() / gb,
                run.client_cpu.total().as_secs_f64() / gb
            )
        })
        .collect();
    notes.push(format!(
        "CPU seconds per GB ingested: {}. With MD5 the API's cost rises by about what (b) predicts ({:.2} s per GB for MD5 alone).",
        costs.join("; "),
        1e3 / r.md5.mb_per_s()
    ));
    if let Some(run) = find(r, 4, true) {
        let gb = run.outcome.bytes as f64 / 1e9;
        let per_gb =
            (run.api_cpu.total() + run.client_cpu.total() + run.redis_cpu).as_secs_f64() / gb;
        let ceiling = cpus / per_gb * 1e3;
        let needed = TARGET_SHARE * md5x2;
        notes.push(format!(
            "CPU ceiling of 4 × {} with MD5: it cost {per_gb:.2} CPU seconds per GB (API, client and Redis), so {} cores can ingest at most {ceiling:.0} MB/s this way ({:.2} × 2×(b)); {needed:.0} MB/s would need at most {:.2} CPU seconds per GB, of which MD5 alone takes {:.2}.",
            size(run.chunk_size),
            r.machine.cpus,
            ceiling / md5x2,
            cpus / needed * 1e3,
            1e3 / r.md5.mb_per_s()
        ));
    }
    let saturated = counted(
        all.iter()
            .filter(|run| run.machine.busy >= 0.9 * cpus)
            .map(|run| describe(run)),
    );
    if !saturated.is_empty() {
        notes.push(format!(
            "The machine's {} cores were at least 90% busy during: {}. Those rates are CPU-bound here (client, API and Redis together).",
            r.machine.cpus,
            saturated.join("; ")
        ));
    }
    let waiting: Vec<String> = all
        .iter()
        .filter(|run| run.machine.iowait >= 0.25)
        .map(|run| format!("{} ({:.2})", describe(run), run.machine.iowait))
        .collect();
    if !waiting.is_empty() {
        notes.push(format!(
            "Cores sat in iowait (waiting on the disk, the fsyncs) during: {}.",
            waiting.join("; ")
        ));
    }
    if let Some(heaviest) = all.iter().max_by_key(|run| run.peak_rss) {
        notes.push(format!(
            "Largest API peak RSS: {} ({}), against {} idle.",
            mib(heaviest.peak_rss),
            describe(heaviest),
            mib(r.idle_rss)
        ));
    }
    let retried: Vec<String> = all
        .iter()
        .filter(|run| run.discarded > 0)
        .map(|run| format!("{} ({})", describe(run), run.discarded))
        .collect();
    if !retried.is_empty() {
        notes.push(format!(
            "Runs discarded because other work (processes or kernel threads beyond the API, the client and Redis) used {DISTURBED_CORES} cores or more while they ran, and repeated: {}.",
            retried.join("; ")
        ));
    }
    let disturbed: Vec<String> = all
        .iter()
        .filter(|run| run.disturbed())
        .map(|run| format!("{} ({:.2})", describe(run), run.other_cores()))
        .collect();
    if !disturbed.is_empty() {
        notes.push(format!(
            "Still disturbed after {} repeats (other CPU in cores): {}. These rates may be low; re-run on an idle machine.",
            r.args.run.retries,
            disturbed.join("; ")
        ));
    }
    if r.busy_waits > 0 {
        notes.push(format!(
            "{} time(s) the machine was still busy when `--wait-idle` ({} s) ran out before a configuration.",
            r.busy_waits, r.args.run.wait_idle
        ));
    }
    if r.machine.busy_before > 0.2 * cpus {
        notes.push(format!(
            "{:.2} cores were busy just before the run: other work was competing for the cores, so these rates may be low.",
            r.machine.busy_before
        ));
    }
    if r.machine.work_fs.is_memory() {
        notes.push(format!(
            "The work directory is on {}: (a) measured memory, not a disk.",
            r.machine.work_fs.fs_type
        ));
    }
    let unclean: Vec<String> = all
        .iter()
        .filter(|run| !run.exit.success())
        .map(|run| format!("{} ({})", describe(run), run.exit))
        .collect();
    if !unclean.is_empty() {
        notes.push(format!(
            "The API did not exit cleanly on SIGTERM after: {}.",
            unclean.join("; ")
        ));
    }
    notes
}

/// The distinct items in order, repeated ones marked with their count (`x (3 runs)`).
fn counted(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for item in items {
        match out.iter_mut().find(|(seen, _)| *seen == item) {
            Some((_, n)) => *n += 1,
            None => out.push((item, 1)),
        }
    }
    out.into_iter()
        .map(|(item, n)| {
            if n == 1 {
                item
            } else {
                format!("{item} ({n} runs)")
            }
        })
        .collect()
}

fn describe(run: &RunResult) -> String {
    format!(
        "{} × {}{}",
        run.clients,
        size(run.chunk_size),
        if run.content_md5 { " with MD5" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_items_are_counted_once() {
        let items = ["a", "b", "a", "a"].map(String::from);
        assert_eq!(counted(items.into_iter()), vec!["a (3 runs)", "b"]);
    }
}
