//! The single-node benchmark's report, in the skeleton every report has ([`Report`]): the
//! two modes side by side, the baselines, every upload, how to read it, and what dominates in
//! this run.

use super::{Mode, ModeRun, SingleNodeResults};
use crate::deployment::BUILD_ALL;
use crate::report::{
    Report, Section, Table, closing_notes, count, disturbance_notes, fixed, median, median_range,
    mib, numbered, range, size, size_flag,
};

const MODES: [Mode; 2] = [Mode::SingleNode, Mode::Distributed];

/// The report of a run.
pub fn report(r: &SingleNodeResults) -> Report<'_> {
    let a = &r.args;
    Report {
        command: "single-node",
        heading: "## Single-node mode against the distributed mode (issue: single-node mode)",
        build: BUILD_ALL,
        services_for: " for the distributed mode",
        options: format!(
            "--size {} --chunk-size {} --clients {} --repeats {} --poll-ms {} --serve-bin {} --api-bin {} --worker-bin {}",
            size_flag(a.size),
            size_flag(a.chunk_size),
            a.clients,
            a.repeats,
            a.poll_ms,
            a.serve_bin.display(),
            a.api_bin.display(),
            a.worker_bin.display()
        ),
        preface: vec![format!(
            "No target: a comparison of the two ways to run Stitch on one machine, with the same {} file in {} chunks over {} connections, both with the default configuration (fsync on).",
            size(a.size),
            size(a.chunk_size),
            a.clients
        )],
        headline: Section::new("Comparison", comparison(r)),
        machine: &r.machine,
        sharing: "the Stitch processes, this benchmark (the client), Redis and RabbitMQ share them",
        baselines: baselines(r),
        sections: vec![
            Section::new("Uploads", runs(r))
                .intro("One row per upload, in the order run, each through fresh processes."),
        ],
        how_to_read: HOW_TO_READ,
        observations: observations(r),
    }
}

const HOW_TO_READ: &[&str] = &[
    "MB/s are decimal (10^6 bytes per second); sizes are binary (MiB, GiB). The comparison shows medians over the uploads of each mode with their range (smallest–largest).",
    "Ingest: from the first chunk request sent to the last chunk response read. Merge: from the worker's `merging` log line (the attempt has its fencing token and its plan) to its `merge committed` line, both with the process's own timestamps; the merge is the same code in both modes, over different state stores. After the upload: from the completing chunk's response to the first status answer saying `completed` (the status is asked every `--poll-ms`), i.e. dispatch + merge + up to one interval. Total: first chunk sent to `completed` seen, what a client that waits for the merge experiences.",
    "Peak RSS is `VmHWM` of each Stitch process after the upload: `stitch serve` alone, or `stitch-api` + `stitch-worker` (their sum in the comparison). The distributed mode also needs Redis and RabbitMQ, whose memory is shown apart: they are shared services, whose size depends on everything else they hold, and are not charged to one upload.",
    "CPU is CPU time (user + system) from just before the first chunk until `completed` was seen: Stitch = the mode's own processes; services = Redis and RabbitMQ (`redis-server` and the broker's `beam.smp`), counted for the distributed mode only (the single-node mode uses neither, so anything they do then is other work); they are shared, so their CPU includes whatever else used them meanwhile; client = this benchmark; kernel threads = disk writeback and other kernel work; other = the machine's busy time minus interrupts, those, and kernel threads: other processes. An upload during which other processes used 0.35 cores or more is discarded and run again (up to `--retries` times), and the machine is waited on to be idle before each.",
    "The modes alternate (A B, B A, …) so that a drift of the machine over the run — this VM's disk speed swings with its recent history, see (a), and so does the cost of fresh memory, see (c) — falls on both alike. Differences smaller than the ranges are noise.",
    "Every upload is checked before it is reported: every chunk answer (status, CRC32C, exactly one `upload_complete`); the final status (`completed`, every chunk and byte, the payload's size and MD5; the upload carries `X-File-MD5`, so the merge verified the file too); and the merged file on storage, read back and hashed.",
];

fn baselines(r: &SingleNodeResults) -> Table {
    let disk = r.disk_rates();
    let mut table = Table::new(&["Limit", ">MB/s", "Notes"]);
    table
        .row([
            format!(
                "(c) cold: {} written into the page cache in 64 KiB writes, no fsync, after 10 s of rest",
                size(r.page_cache_cold.bytes)
            ),
            fixed(r.page_cache_cold.mb_per_s(), 0),
            format!(
                "{:.2} s: ingest (the chunks) and the merge (the file) each write every byte into fresh page cache",
                r.page_cache_cold.elapsed.as_secs_f64()
            ),
        ])
        .row([
            "(c) warm: the same, at once into the memory just freed".to_owned(),
            fixed(r.page_cache_warm.mb_per_s(), 0),
            format!(
                "{:.2} s; see the merge section for why cold and warm differ",
                r.page_cache_warm.elapsed.as_secs_f64()
            ),
        ])
        .row([
            format!(
                "(a) disk: {} written with direct I/O in 1 MiB writes, one fsync at the end",
                size(r.disk_first.bytes)
            ),
            median(disk.iter().copied()).map_or("—".into(), |m| fixed(m, 0)),
            format!(
                "median of {} measurements, before the first upload and after each (range {}); the run's first write, {:.0} MB/s, is not used",
                disk.len(),
                range(disk.iter().copied())
                    .map_or("—".into(), |(lo, hi)| format!("{lo:.0}–{hi:.0}")),
                r.disk_first.mb_per_s()
            ),
        ])
        .row([
            format!("(b) MD5 of {} in memory, one core", size(r.md5_memory.bytes)),
            fixed(r.md5_memory.mb_per_s(), 0),
            format!(
                "{:.2} s: the floor under a merge, which hashes every byte on one core",
                r.md5_memory.elapsed.as_secs_f64()
            ),
        ]);
    table
}

/// Per-upload values of one mode.
fn values(r: &SingleNodeResults, mode: Mode, f: impl Fn(&ModeRun) -> f64) -> Vec<f64> {
    r.of(mode).map(f).collect()
}

const SERVICES_CPU: &str = "CPU of Redis + RabbitMQ, s";

type Metric = (&'static str, usize, fn(&ModeRun) -> f64);

const METRICS: [Metric; 11] = [
    ("Ingest, MB/s", 0, ModeRun::ingest_mb_per_s),
    ("Ingest, s", 2, |m| m.upload.elapsed.as_secs_f64()),
    ("Merge, s", 2, |m| m.merge_time().as_secs_f64()),
    ("Completing response → `completed` seen, s", 2, |m| {
        m.after_upload().as_secs_f64()
    }),
    ("Total: first chunk → `completed` seen, s", 2, |m| {
        m.total().as_secs_f64()
    }),
    ("Peak RSS of the Stitch processes, MiB", 1, |m| {
        m.peak_rss() as f64 / crate::MIB as f64
    }),
    ("CPU of the Stitch processes, s", 2, ModeRun::stitch_cpu),
    (SERVICES_CPU, 2, ModeRun::services_cpu),
    ("CPU of the client, s", 2, |m| {
        m.usage.cpu("bench").total().as_secs_f64()
    }),
    ("CPU of kernel threads, s", 2, |m| {
        m.usage.kernel.as_secs_f64()
    }),
    ("iowait, cores", 2, |m| m.usage.machine.iowait),
];

fn comparison(r: &SingleNodeResults) -> Table {
    let header: Vec<String> = std::iter::once("Median (range)".to_owned())
        .chain(
            MODES
                .iter()
                .map(|&m| format!(">{} ({})", m.name(), count(r.of(m).count(), "upload"))),
        )
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = Table::new(&header);
    for (name, decimals, f) in METRICS {
        let mut row = vec![name.to_owned()];
        for mode in MODES {
            row.push(if mode == Mode::SingleNode && name == SERVICES_CPU {
                "not used".to_owned()
            } else {
                median_range(&values(r, mode, f), decimals)
            });
        }
        table.row(row);
    }
    let mut services = vec!["RSS of Redis, RabbitMQ at the end (shared services)".to_owned()];
    for mode in MODES {
        services.push(match r.of(mode).last() {
            Some(run) if mode == Mode::Distributed => {
                let rss = |label: &str| -> u64 {
                    run.services_rss
                        .iter()
                        .filter(|(l, _)| *l == label)
                        .map(|(_, b)| b)
                        .sum()
                };
                format!("{}, {}", mib(rss("redis")), mib(rss("rabbitmq")))
            }
            Some(_) => "not used".to_owned(),
            None => "—".to_owned(),
        });
    }
    table.row(services);
    table
}

fn runs(r: &SingleNodeResults) -> Table {
    let mut table = Table::new(&[
        ">#",
        "Mode",
        ">Ingest s",
        ">Ingest MB/s",
        ">Merge s",
        ">Response → completed s",
        ">Total s",
        "Peak RSS",
        ">Stitch CPU s",
        ">Services CPU s",
        ">Client CPU s",
        ">Kernel threads s",
        ">Other cores",
        ">iowait",
        ">(a) around it",
    ]);
    for (i, run) in r.runs.iter().enumerate() {
        let peaks: Vec<String> = run
            .peaks
            .iter()
            .map(|(label, peak)| format!("{label} {}", mib(*peak)))
            .collect();
        table.row([
            (i + 1).to_string(),
            run.mode.short().to_owned(),
            fixed(run.upload.elapsed.as_secs_f64(), 2),
            fixed(run.ingest_mb_per_s(), 0),
            fixed(run.merge_time().as_secs_f64(), 2),
            fixed(run.after_upload().as_secs_f64(), 2),
            fixed(run.total().as_secs_f64(), 2),
            peaks.join(", "),
            fixed(run.stitch_cpu(), 2),
            fixed(run.services_cpu(), 2),
            fixed(run.usage.cpu("bench").total().as_secs_f64(), 2),
            fixed(run.usage.kernel.as_secs_f64(), 2),
            fixed(run.usage.other_cores(), 2),
            fixed(run.usage.machine.iowait, 2),
            format!(
                "{:.0} ({:.0}, {:.0})",
                (run.disk_before.mb_per_s() + run.disk_after.mb_per_s()) / 2.0,
                run.disk_before.mb_per_s(),
                run.disk_after.mb_per_s()
            ),
        ]);
    }
    table
}

fn observations(r: &SingleNodeResults) -> Vec<String> {
    let mut notes = Vec::new();
    let med = |mode: Mode, f: fn(&ModeRun) -> f64| median(values(r, mode, f));
    for mode in MODES {
        let (Some(ingest), Some(after), Some(total), Some(merge)) = (
            med(mode, |m| m.upload.elapsed.as_secs_f64()),
            med(mode, |m| m.after_upload().as_secs_f64()),
            med(mode, |m| m.total().as_secs_f64()),
            med(mode, |m| m.merge_time().as_secs_f64()),
        ) else {
            continue;
        };
        let dominant = if ingest >= after {
            "ingest"
        } else {
            "the merge"
        };
        notes.push(format!(
            "{}: of {total:.2} s in total, ingest took {ingest:.2} s ({:.0}%) and the wait for the merge {after:.2} s ({:.0}%), of which the merge itself {merge:.2} s ({:.0} MB/s, {:.2} × (b) MD5 in memory): {dominant} dominates.",
            mode.name(),
            100.0 * ingest / total,
            100.0 * after / total,
            r.args.size as f64 / 1e6 / merge,
            r.args.size as f64 / 1e6 / merge / r.md5_memory.mb_per_s()
        ));
    }
    let (single, distributed) = (Mode::SingleNode, Mode::Distributed);
    if let (Some(s), Some(d)) = (
        med(single, |m| m.total().as_secs_f64()),
        med(distributed, |m| m.total().as_secs_f64()),
    ) {
        let pair = |f: fn(&ModeRun) -> f64| (med(single, f), med(distributed, f));
        let (si, di) = pair(|m| m.upload.elapsed.as_secs_f64());
        let (sm, dm) = pair(|m| m.merge_time().as_secs_f64());
        let (sa, da) = pair(|m| (m.after_upload() - m.merge_time()).as_secs_f64());
        let diff = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or(0.0, |(a, b)| a - b);
        notes.push(format!(
            "Total, single-node minus distributed: {:+.2} s (medians {s:.2} s and {d:.2} s), made of ingest {:+.2} s, merge {:+.2} s, and dispatch plus polling {:+.2} s.",
            s - d,
            diff(si, di),
            diff(sm, dm),
            diff(sa, da)
        ));
    }
    let per_gb = |mode: Mode, f: fn(&ModeRun) -> f64| -> Option<f64> {
        med(mode, f).map(|cpu| cpu / (r.args.size as f64 / 1e9))
    };
    if let (Some(s), Some(d), Some(services)) = (
        per_gb(single, ModeRun::stitch_cpu),
        per_gb(distributed, ModeRun::stitch_cpu),
        per_gb(distributed, ModeRun::services_cpu),
    ) {
        notes.push(format!(
            "CPU per GB uploaded and merged (medians): single-node {s:.2} s in `stitch serve`; distributed {d:.2} s in `stitch-api` + `stitch-worker` plus {services:.2} s in Redis and RabbitMQ, {:.2} s in all.",
            d + services
        ));
    }
    if let (Some(s), Some(d)) = (
        med(single, |m| m.peak_rss() as f64),
        med(distributed, |m| m.peak_rss() as f64),
    ) {
        notes.push(format!(
            "Memory (median peaks): `stitch serve` {}; `stitch-api` + `stitch-worker` {} together ({}), before counting Redis and RabbitMQ.",
            mib(s as u64),
            mib(d as u64),
            r.of(distributed)
                .next()
                .map(|run| {
                    run.peaks
                        .iter()
                        .map(|(label, _)| {
                            let peak = median(r.of(distributed).filter_map(|x| {
                                x.peaks.iter().find(|(l, _)| l == label).map(|(_, p)| *p as f64)
                            }))
                            .unwrap_or(0.0);
                            format!("{label} {}", mib(peak as u64))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        ));
    }
    let retried_merges = numbered(&r.runs, |run| {
        (run.attempts != 1).then(|| format!(" ({} attempts)", run.attempts))
    });
    if !retried_merges.is_empty() {
        notes.push(format!(
            "Merges that needed more than one attempt: {}; the merge time is the last attempt's.",
            retried_merges.join(", ")
        ));
    }
    let retried = numbered(&r.runs, |run| {
        (run.discarded > 0).then(|| format!(" ({})", run.discarded))
    });
    let disturbed = numbered(&r.runs, |run| {
        run.disturbed()
            .then(|| format!(" ({:.2})", run.usage.other_cores()))
    });
    notes.extend(disturbance_notes(
        "uploads",
        &retried,
        &disturbed,
        r.args.run.retries,
        "",
    ));
    let unclean = numbered(&r.runs, |run| {
        (!run.unclean_exits.is_empty()).then(|| format!(": {}", run.unclean_exits.join(", ")))
    });
    notes.extend(closing_notes(
        r.busy_waits,
        &r.args.run,
        &unclean,
        &r.machine,
    ));
    notes
}
