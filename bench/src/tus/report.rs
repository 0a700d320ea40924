//! The tus benchmark's report, in the skeleton every report has ([`Report`]): the issue's
//! targets with PASS/FAIL as measured, the disk baseline, the three kinds of upload side by
//! side, every upload, how to read it, and what this run shows.

use super::{Kind, TusResults, TusRun};
use crate::deployment::BUILD_ALL;
use crate::report::{
    Report, Section, Table, closing_notes, count, disturbance_notes, fixed, median, median_range,
    mib, numbered, range, size, size_flag, targets_table, verdict,
};

/// Share of the chunk protocol's single-stream rate that one `PATCH` must reach.
const TARGET_SHARE: f64 = 0.9;
/// How much more a peak RSS may be than the one it is compared with and still count as the
/// same: a few MiB separate the peaks of identical runs, while a server that held a `PATCH`
/// body, or one segment of it, in memory would need tens of MiB more for one long `PATCH`.
const RSS_TOLERANCE: u64 = 8 << 20;

const API: &str = "api";

/// The report of a run.
pub fn report(r: &TusResults) -> Report<'_> {
    let a = &r.args;
    Report {
        command: "tus",
        heading: "## tus ingest (issue: tus)",
        build: BUILD_ALL,
        services_for: "",
        options: options(r),
        preface: vec![format!(
            "The same {} through `stitch-api` in three ways: the chunk protocol from one client ({} chunks in order, no MD5), tus in one `PATCH` (one streaming request body, which the API cuts into durable segments of {}: `tus.segment_size`{}), and tus in `PATCH`es of {} one after the other{}.",
            size(a.size),
            size(a.chunk_size),
            size(r.segment_size),
            if a.segment_size.is_some() {
                ", set for this run"
            } else {
                ", its default"
            },
            size(a.chunk_size),
            match &r.large {
                Some(large) => format!(
                    "; then once more in one `PATCH` of {}, for memory",
                    size(large.size)
                ),
                None => String::new(),
            }
        )],
        headline: Section::new("Targets", targets(r)),
        machine: &r.machine,
        sharing: "client, API, Redis and RabbitMQ share them",
        baselines: baselines(r),
        sections: vec![
            Section::new("Comparison", comparison(r)).intro(format!(
                "Medians (range) of each kind's {} of {}.",
                count(a.repeats, "upload"),
                size(a.size)
            )),
            Section::new("Uploads", runs(r))
                .intro("One row per upload, in the order run, each through a fresh API process.")
                .outro(format!(
                    "An API process that has just started and served nothing peaks at {}.",
                    mib(r.idle_rss)
                )),
        ],
        how_to_read: HOW_TO_READ,
        observations: observations(r),
    }
}

fn options(r: &TusResults) -> String {
    let a = &r.args;
    let mut options = format!(
        "--size {} --chunk-size {} --repeats {} --large-size {}",
        size_flag(a.size),
        size_flag(a.chunk_size),
        a.repeats,
        if a.large_size == 0 {
            "0".to_owned()
        } else {
            size_flag(a.large_size)
        }
    );
    if let Some(segment_size) = a.segment_size {
        options.push_str(&format!(" --segment-size {}", size_flag(segment_size)));
    }
    if a.no_merge {
        options.push_str(" --no-merge");
    }
    options.push_str(&format!(" --api-bin {}", a.api_bin.display()));
    if !a.no_merge {
        options.push_str(&format!(" --worker-bin {}", a.worker_bin.display()));
    }
    options
}

const HOW_TO_READ: &[&str] = &[
    "MB/s are decimal (10^6 bytes per second) of wall time; sizes are binary (MiB, GiB). For the chunk protocol the time runs from the first chunk request sent to the last answer read; for tus from the `POST /files/` sent to the last `PATCH`'s answer read, so it includes creating the upload.",
    "(a) is the ingest benchmark's disk baseline: the same bytes written sequentially to the disk the API stores on, in writes of the chunk size, one fsync at the end. It is measured before the first upload and after each, since this VM's disk speed swings with its recent history, and each upload is compared with the mean of the (a) just before and just after it. The API fsyncs every chunk, and every tus segment, before counting it, where (a) fsyncs once.",
    "The target compares one `PATCH` with the chunk protocol from one client, not with (a): both stream one request at a time, wait for each piece's fsync and count it in Redis, so their ratio is what the tus front end costs. The kinds run in rotating order (A B C, B C A, C A B, …) so that a drift of the machine weighs on all alike; differences smaller than the ranges are noise.",
    "A `PATCH` body is stored in segments of `tus.segment_size` cut from the start of that body: one `PATCH` of the whole upload makes size ÷ segment size segments, a `PATCH` smaller than a segment makes one. Column \"Stored as\" shows what the status and storage were checked to hold.",
    "CPU is CPU time (user + system) over the upload from `/proc`: API = the `stitch-api` process (all threads), client = this benchmark (one thread: on loopback the sender's kernel does much of the TCP work, so client CPU is mostly kernel time), services = Redis and RabbitMQ, kernel threads = disk writeback and other kernel work; other = the machine's busy time minus interrupts, those, and kernel threads: other processes. Per GiB = CPU seconds ÷ GiB uploaded; cores = CPU seconds ÷ wall time. An upload during which other processes used 0.35 cores or more is discarded and run again (up to `--retries` times), and the machine is waited on to be idle before each.",
    "API peak RSS is `VmHWM` of the upload's own API process, read right after its last answer: the most memory it ever had resident. The memory targets compare the worst peak of one kind with the worst of the other and allow 8 MiB between them: identical runs differ by a few MiB, while a server that kept a `PATCH` body, or one whole segment of it, in memory would peak tens of MiB (or the body's size) higher for one long `PATCH`.",
    "Every upload is checked before it is reported: for the chunk protocol every answer (200, the chunk sent, its CRC32C, exactly one `upload_complete`), the status (`merging`, every chunk and byte) and one file per chunk on storage; for tus the `POST` (201 with `Location`), every `PATCH` (204 with `Upload-Offset` where its bytes end), `HEAD` (`Upload-Offset` and `Upload-Length` = the size), the status (`merging`, protocol `tus`, `bytes_received` = the size, the segments expected) and exactly those segments on storage. Then a `stitch-worker`, started after the measurement, merges the upload, and its status (`completed`, size, MD5) and the merged file, read back and hashed, must match the bytes sent (with `--no-merge`, the stored chunks or segments are compared with them instead).",
];

fn baselines(r: &TusResults) -> Table {
    let rates = r.disk_rates();
    let mut table = Table::new(&["Limit", ">MB/s", "Notes"]);
    table
        .row([
            format!(
                "(a) disk: {} written sequentially in {} writes, one fsync at the end",
                size(r.disk_first.bytes),
                size(r.args.chunk_size)
            ),
            median(rates.iter().copied()).map_or("—".into(), |m| fixed(m, 0)),
            format!(
                "median of {} measurements, before the first upload and after each (range {})",
                rates.len(),
                range(rates.iter().copied())
                    .map_or("—".into(), |(lo, hi)| format!("{lo:.0}–{hi:.0}"))
            ),
        ])
        .row([
            "(a), the run's first write".to_owned(),
            fixed(r.disk_first.mb_per_s(), 0),
            "to blocks the disk had not seen lately; not used".to_owned(),
        ]);
    table
}

/// A value of every upload of `kind`.
fn values(r: &TusResults, kind: Kind, f: impl Fn(&TusRun) -> f64) -> Vec<f64> {
    r.of(kind).map(f).collect()
}

fn median_of(r: &TusResults, kind: Kind, f: impl Fn(&TusRun) -> f64) -> Option<f64> {
    median(values(r, kind, f))
}

fn worst_rss(runs: impl Iterator<Item = u64>) -> Option<u64> {
    runs.max()
}

fn targets(r: &TusResults) -> Table {
    let a = &r.args;
    let mut table = targets_table();
    let chunk = median_of(r, Kind::Chunks, TusRun::mb_per_s);
    let one = median_of(r, Kind::OnePatch, TusRun::mb_per_s);
    if let (Some(chunk), Some(one)) = (chunk, one) {
        let needed = TARGET_SHARE * chunk;
        let disk = median(r.disk_rates()).unwrap_or(0.0);
        table.row([
            format!(
                "tus, one `PATCH` of {} ≥ {TARGET_SHARE} × the chunk protocol's single-stream rate ({} chunks, no MD5)",
                size(a.size),
                size(a.chunk_size)
            ),
            format!(
                "{one:.0} MB/s against {chunk:.0} MB/s ({:.2} ×; medians of {}; (a) disk {disk:.0} MB/s)",
                one / chunk,
                count(a.repeats, "upload")
            ),
            format!("≥ {TARGET_SHARE} × {chunk:.0} = {needed:.0} MB/s"),
            verdict(one >= needed).to_owned(),
        ]);
    }
    let peaks = |kind: Kind| -> Vec<u64> { r.of(kind).map(|run| run.peak_rss).collect() };
    let listed = |peaks: &[u64]| -> String {
        let shown: Vec<String> = peaks
            .iter()
            .map(|p| format!("{:.1}", *p as f64 / crate::MIB as f64))
            .collect();
        format!("{} MiB", shown.join(", "))
    };
    let (one, small) = (peaks(Kind::OnePatch), peaks(Kind::Patches));
    if let (Some(one_worst), Some(small_worst)) = (
        worst_rss(one.iter().copied()),
        worst_rss(small.iter().copied()),
    ) {
        table.row([
            format!(
                "API peak RSS independent of the `PATCH` size: one `PATCH` of {} against `PATCH`es of {}",
                size(a.size),
                size(a.chunk_size)
            ),
            format!(
                "{} against {} ({}; worst of {} and of {})",
                mib(one_worst),
                mib(small_worst),
                signed_mib(one_worst, small_worst),
                listed(&one),
                listed(&small)
            ),
            format!("< +{}", mib(RSS_TOLERANCE)),
            verdict(one_worst < small_worst + RSS_TOLERANCE).to_owned(),
        ]);
    }
    if let (Some(large), Some(one_worst)) = (&r.large, worst_rss(one.iter().copied())) {
        table.row([
            format!(
                "… and of the upload's size: one `PATCH` of {} against one of {}",
                size(large.size),
                size(a.size)
            ),
            format!(
                "{} against {} ({})",
                mib(large.peak_rss),
                mib(one_worst),
                signed_mib(large.peak_rss, one_worst)
            ),
            format!("< +{}", mib(RSS_TOLERANCE)),
            verdict(large.peak_rss < one_worst + RSS_TOLERANCE).to_owned(),
        ]);
    }
    table
}

/// `a − b` in MiB with its sign.
fn signed_mib(a: u64, b: u64) -> String {
    let diff = (a as f64 - b as f64) / crate::MIB as f64;
    format!("{} MiB", crate::report::signed(diff, 1))
}

type Metric = (&'static str, usize, fn(&TusRun) -> f64);

const METRICS: [Metric; 12] = [
    ("MB/s", 0, TusRun::mb_per_s),
    ("Seconds", 2, |run| run.elapsed.as_secs_f64()),
    ("Ratio to (a) around it", 2, |run| {
        run.mb_per_s() / run.disk_limit()
    }),
    ("API CPU s per GiB", 2, |run| run.cpu_per_gib(API)),
    ("… of which user", 2, |run| {
        run.usage.cpu(API).user.as_secs_f64() / gib(run.size)
    }),
    ("… of which system", 2, |run| {
        run.usage.cpu(API).system.as_secs_f64() / gib(run.size)
    }),
    ("Client CPU s per GiB", 2, |run| run.cpu_per_gib("bench")),
    ("Redis + RabbitMQ CPU s per GiB", 2, |run| {
        run.cpu_per_gib("redis") + run.cpu_per_gib("rabbitmq")
    }),
    ("Kernel threads CPU s per GiB", 2, |run| {
        run.usage.kernel.as_secs_f64() / gib(run.size)
    }),
    ("Machine busy, cores", 2, |run| run.usage.machine.busy),
    ("iowait, cores", 2, |run| run.usage.machine.iowait),
    ("API peak RSS, MiB", 1, |run| {
        run.peak_rss as f64 / crate::MIB as f64
    }),
];

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn comparison(r: &TusResults) -> Table {
    let a = &r.args;
    let header: Vec<String> = std::iter::once("Median (range)".to_owned())
        .chain(
            Kind::ALL
                .iter()
                .map(|k| format!(">{}", k.name(a.chunk_size))),
        )
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = Table::new(&header);
    let chunk = median_of(r, Kind::Chunks, TusRun::mb_per_s);
    for (i, (name, decimals, f)) in METRICS.into_iter().enumerate() {
        let mut row = vec![name.to_owned()];
        for kind in Kind::ALL {
            row.push(median_range(&values(r, kind, f), decimals));
        }
        table.row(row);
        if i == 0 {
            let mut ratio = vec!["Rate ÷ chunk protocol's (medians)".to_owned()];
            for kind in Kind::ALL {
                ratio.push(match (median_of(r, kind, TusRun::mb_per_s), chunk) {
                    (Some(x), Some(c)) => fixed(x / c, 2),
                    _ => "—".to_owned(),
                });
            }
            table.row(ratio);
        }
    }
    let mut shape = vec!["Requests; stored as".to_owned()];
    for kind in Kind::ALL {
        shape.push(match r.of(kind).next() {
            Some(run) => format!("{}; {}", run.requests, stored_as(run)),
            None => "—".to_owned(),
        });
    }
    table.row(shape);
    table
}

fn stored_as(run: &TusRun) -> String {
    match run.kind {
        Kind::Chunks => count(run.pieces, "chunk"),
        Kind::OnePatch | Kind::Patches => count(run.pieces, "segment"),
    }
}

fn runs(r: &TusResults) -> Table {
    let mut table = Table::new(&[
        ">#",
        "Upload",
        ">Size",
        ">Requests",
        "Stored as",
        ">Seconds",
        ">MB/s",
        ">(a) around it",
        ">Ratio to (a)",
        ">API CPU s/GiB (user + sys)",
        ">API cores",
        ">Client cores",
        ">Services cores",
        ">Kernel threads cores",
        ">Other cores",
        ">Machine busy",
        ">iowait",
        ">API peak RSS",
    ]);
    for (i, run) in r.all_runs().enumerate() {
        let api = run.usage.cpu(API);
        let services = run.usage.cores_of("redis") + run.usage.cores_of("rabbitmq");
        table.row([
            (i + 1).to_string(),
            run.kind.name(r.args.chunk_size),
            size(run.size),
            run.requests.to_string(),
            stored_as(run),
            fixed(run.elapsed.as_secs_f64(), 2),
            fixed(run.mb_per_s(), 0),
            format!(
                "{:.0} ({:.0}, {:.0})",
                run.disk_limit(),
                run.disk_before.mb_per_s(),
                run.disk_after.mb_per_s()
            ),
            fixed(run.mb_per_s() / run.disk_limit(), 2),
            format!(
                "{:.2} ({:.2} + {:.2})",
                run.cpu_per_gib(API),
                api.user.as_secs_f64() / gib(run.size),
                api.system.as_secs_f64() / gib(run.size)
            ),
            fixed(run.usage.cores_of(API), 2),
            fixed(run.usage.cores_of("bench"), 2),
            fixed(services, 2),
            fixed(run.usage.kernel_cores(), 2),
            fixed(run.usage.other_cores(), 2),
            fixed(run.usage.machine.busy, 2),
            fixed(run.usage.machine.iowait, 2),
            mib(run.peak_rss),
        ]);
    }
    table
}

fn observations(r: &TusResults) -> Vec<String> {
    let a = &r.args;
    let mut notes = Vec::new();
    let cpus = r.machine.cpus as f64;
    let med = |kind: Kind, f: fn(&TusRun) -> f64| median_of(r, kind, f);
    let name = |kind: Kind| kind.name(a.chunk_size);
    if let (Some(chunk), Some(one), Some(small)) = (
        med(Kind::Chunks, TusRun::mb_per_s),
        med(Kind::OnePatch, TusRun::mb_per_s),
        med(Kind::Patches, TusRun::mb_per_s),
    ) {
        notes.push(format!(
            "Rates (medians): {} {chunk:.0} MB/s; {} {one:.0} MB/s ({:.2} ×); {} {small:.0} MB/s ({:.2} ×). The disk baseline (a) had a median of {:.0} MB/s.",
            name(Kind::Chunks),
            name(Kind::OnePatch),
            one / chunk,
            name(Kind::Patches),
            small / chunk,
            median(r.disk_rates()).unwrap_or(0.0)
        ));
    }
    let per_gib = |kind: Kind| -> Option<(f64, f64, f64)> {
        Some((
            med(kind, |run| run.cpu_per_gib(API))?,
            med(kind, |run| {
                run.usage.cpu(API).user.as_secs_f64() / gib(run.size)
            })?,
            med(kind, |run| {
                run.usage.cpu(API).system.as_secs_f64() / gib(run.size)
            })?,
        ))
    };
    let costs: Vec<String> = Kind::ALL
        .iter()
        .filter_map(|&kind| {
            let (total, user, system) = per_gib(kind)?;
            Some(format!(
                "{} {total:.2} ({user:.2} user + {system:.2} system)",
                name(kind)
            ))
        })
        .collect();
    if !costs.is_empty() {
        notes.push(format!(
            "API CPU seconds per GiB (medians): {}.",
            costs.join("; ")
        ));
    }
    if let (Some((chunk, cu, cs)), Some((one, ou, os))) =
        (per_gib(Kind::Chunks), per_gib(Kind::OnePatch))
    {
        notes.push(format!(
            "One `PATCH` costs the API {:+.2} CPU s per GiB against the chunk protocol ({:+.2} user, {:+.2} system).",
            one - chunk,
            ou - cu,
            os - cs
        ));
    }
    for kind in Kind::ALL {
        if let (Some(busy), Some(iowait)) = (
            med(kind, |run| run.usage.machine.busy),
            med(kind, |run| run.usage.machine.iowait),
        ) {
            let bound = if busy >= 0.9 * cpus {
                format!(
                    ": the {} cores were at least 90% busy, so this rate is CPU-bound here",
                    r.machine.cpus
                )
            } else if iowait >= 0.25 {
                ": cores waited on the disk (the fsyncs)".to_owned()
            } else {
                String::new()
            };
            notes.push(format!(
                "{}: {busy:.2} cores busy, {iowait:.2} in iowait (medians){bound}.",
                name(kind)
            ));
        }
    }
    let rss: Vec<String> = Kind::ALL
        .iter()
        .filter_map(|&kind| {
            let peaks: Vec<f64> = values(r, kind, |run| run.peak_rss as f64);
            let (lo, hi) = range(peaks)?;
            Some(if lo == hi {
                format!("{} {}", name(kind), mib(lo as u64))
            } else {
                format!(
                    "{} {:.1}–{}",
                    name(kind),
                    lo / crate::MIB as f64,
                    mib(hi as u64)
                )
            })
        })
        .chain(r.large.iter().map(|large| {
            format!(
                "one `PATCH` of {} {}",
                size(large.size),
                mib(large.peak_rss)
            )
        }))
        .collect();
    notes.push(format!(
        "API peak RSS: {}; {} idle.",
        rss.join("; "),
        mib(r.idle_rss)
    ));
    let all: Vec<TusRun> = r.all_runs().cloned().collect();
    let merged = all.iter().filter(|run| run.merged).count();
    if merged > 0 {
        notes.push(format!(
            "{} of {} merged by `stitch-worker` after the measurement, with the MD5 of the bytes sent.",
            merged,
            count(all.len(), "upload")
        ));
    }
    let retried = numbered(&all, |run| {
        (run.discarded > 0).then(|| format!(" ({})", run.discarded))
    });
    let disturbed = numbered(&all, |run| {
        run.disturbed()
            .then(|| format!(" ({:.2})", run.usage.other_cores()))
    });
    notes.extend(disturbance_notes(
        "uploads",
        &retried,
        &disturbed,
        a.run.retries,
        "",
    ));
    if r.machine.busy_before > 0.2 * cpus {
        notes.push(format!(
            "{:.2} cores were busy just before the run (load average {:.2}): other work was competing for the cores.",
            r.machine.busy_before, r.machine.load_before
        ));
    }
    let unclean = numbered(&all, |run| {
        (!run.unclean_exits.is_empty()).then(|| format!(": {}", run.unclean_exits.join(", ")))
    });
    notes.extend(closing_notes(r.busy_waits, &a.run, &unclean, &r.machine));
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::Role;

    #[test]
    fn rss_differences_carry_their_sign() {
        assert_eq!(signed_mib(40 << 20, 32 << 20), "+8.0 MiB");
        assert_eq!(signed_mib(32 << 20, 40 << 20), "-8.0 MiB");
        assert_eq!(signed_mib(1 << 20, 1 << 20), "0.0 MiB");
    }

    #[test]
    fn the_api_is_labelled_as_the_deployment_labels_it() {
        assert_eq!(API, Role::Api.label());
    }
}
