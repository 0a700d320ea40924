//! The merge benchmark's report, in the skeleton every report has ([`Report`]): the issue's
//! targets with PASS/FAIL as measured, the baselines, every merge, a summary, how to read
//! it, and what this run shows.

use super::{Kind, MergeResults, MergeRun};
use crate::deployment::BUILD_ALL;
use crate::report::{
    Report, Section, Table, closing_notes, count, disturbance_notes, fixed, median, median_range,
    mib, numbered, range, signed, size, size_flag, targets_table, verdict,
};

/// The target for the merge rate over the MD5-only rate.
const RATIO_TARGET: f64 = 0.85;
/// The allowance for the event beyond the merge itself, in ms.
const EVENT_ALLOWANCE_MS: f64 = 100.0;

/// The report of a run.
pub fn report(r: &MergeResults) -> Report<'_> {
    let a = &r.args;
    let chunks = a.size.div_ceil(a.chunk_size);
    Report {
        command: "merge",
        heading: "## Merge (issue: merge pipeline)",
        build: BUILD_ALL,
        services_for: "",
        options: format!(
            "--size {} --chunk-size {} --clients {} --repeats {} --nofsync-repeats {} --warm-repeats {} --buffer {} --api-bin {} --worker-bin {}",
            size_flag(a.size),
            size_flag(a.chunk_size),
            a.clients,
            a.repeats,
            a.nofsync_repeats,
            a.warm_repeats,
            size_flag(a.buffer),
            a.api_bin.display(),
            a.worker_bin.display()
        ),
        preface: Vec::new(),
        headline: Section::new("Targets", targets(r)),
        machine: &r.machine,
        sharing: "the worker, the API, this benchmark, Redis and RabbitMQ share them",
        baselines: baselines(r),
        sections: vec![
            Section::new("Merges", merges(r)).intro(format!(
                "One row per merge, in the order run; each is a fresh {} upload of {chunks} chunks of {} through a fresh `stitch-api` and `stitch-worker`. (i) is the MD5-only pass over that upload's chunk files just before its last chunk was sent. Kinds: default = as configured by default (fsync on), what the targets judge; no fsync = `STITCH__STORAGE__FSYNC=false` on the worker; warm memory = fsync on, with a scratch file of the upload's size written and deleted just before the last chunk (its rate is in the last column), so that the merge writes into memory freed a moment ago.",
                size(a.size),
                size(a.chunk_size)
            )),
            Section::new("Summary", summary(r)),
        ],
        how_to_read: HOW_TO_READ,
        observations: observations(r),
    }
}

const HOW_TO_READ: &[&str] = &[
    "MB/s are decimal (10^6 bytes per second); sizes are binary (MiB, GiB). Medians are over the merges of one kind; ranges are smallest–largest.",
    "(i), the limit: the MD5 of this upload's chunk files, read from the storage directory (`uploads/<id>/chunks/<index>.<token>`) in index order in blocks of the merge's size, on one thread, writing nothing; the last chunk is hashed from memory because its file does not exist yet (it is sent only afterwards, so that the merge runs as in production). The chunks were just written, and are read through once more just before (i) (this VM runs DAMON's proactive `pageout`, which evicts page cache left untouched for about a minute), so both (i) and the merge read them from the page cache; the residency column, from `fincore`, shows that before each.",
    "Merge (ii), inside: `completed_at − merge_started_at` of the upload's Redis hash, both written by the worker (ms): from the merge attempt taking its fencing token to its commit, so it holds the copy, the MD5, the per-chunk CRC32C checks, the fsync of the file and of its directory, the rename and the commit. Ratio = merge MB/s ÷ (i) MB/s of the same upload; the target asks for 0.85, i.e. the merge may take at most ~18% longer than hashing alone.",
    "Response → event, (ii) from outside and (iii): this benchmark's clock from reading the completing chunk's HTTP response to receiving `upload.completed` on a private queue bound to `<ns>.events` (`upload.*`) before that chunk was sent. It holds the merge plus dispatch (the API publishes the job, the worker takes the lock and its fence) and the event's publish and delivery. \"Beyond merge\" = response → event − merge: the target allows 100 ms. \"Start after response\" is `merge_started_at` against the response's wall-clock time: negative when the merge began before the client had read the answer (the API publishes the job before it answers).",
    "Worker CPU is the worker process's CPU time (all threads; user + system) from just before the last chunk was sent until the event arrived; worker cores = that ÷ the merge time. By default (`STITCH__MERGE__DIRECT_IO=true`) the merge runs a copy thread (reads the chunk files from the page cache, CRC32C), a hashing thread and a writer thread (`O_DIRECT` writes of 1 MiB blocks, past the page cache); with buffered writes, a copy thread (read, CRC32C, `write` into the page cache), a hashing thread and a writeback thread. Above 1 core the copy and the hash overlapped. System time is mostly the reads and writes. Worker peak RSS is `VmHWM` after a reset (`/proc/<pid>/clear_refs`) just before the last chunk was sent: the most the merge held resident (page cache is not counted).",
    "(c) is the payload written into the page cache with the merge's block size and no fsync (the file is deleted before writeback starts): the cost of the merge's `write`s alone. This VM reports free memory to its host (virtio-balloon free page reporting), and touching a page the host has taken back costs a fault in the host, so (c) is measured twice at the start: \"cold\", after 10 s of rest (memory freed long ago, as a merge finds it), and \"warm\", at once into the memory the cold write has just freed. The warm-memory merges repeat that trick just before their last chunk (the scratch write's own rate is in their row), to show the merge when fresh memory is cheap, as on bare metal.",
    "(a) is the disk alone: the payload written with direct I/O (no page cache) in 1 MiB writes, one fsync at the end, measured before the first merge and after each, since this VM's disk speed swings with its recent history. A merge that fsyncs its output cannot finish before the disk has taken it. The merges without fsync leave the file to the kernel's writeback (the benchmark flushes it before the next measurement).",
    "Kernel threads = CPU of all kernel threads (disk writeback, mostly) over the merge window; other = the machine's busy time minus interrupts, the watched processes (worker, API, this benchmark, Redis, RabbitMQ) and kernel threads: other processes. A merge during which other processes used 0.35 cores or more (in the merge window or the MD5-only pass) is discarded and run again, up to `--retries` times; the machine is also waited on to be idle before each measurement. Redis and RabbitMQ are shared with whatever else runs on the machine.",
    "Every merge is checked before it is reported: the MD5-only pass's digest equals the payload's (so the chunk files hold the bytes sent); the event is `upload.completed` with the payload's size and MD5; Redis says `completed` with that MD5; the status says `completed` with every chunk, the size and the MD5; and the merged file on storage is read back and its MD5 and length checked. The upload carries `X-File-MD5`, so the worker verifies the whole file too.",
];

fn baselines(r: &MergeResults) -> Table {
    let a = &r.args;
    let md5_only: Vec<f64> = r.merges.iter().map(|m| m.md5_only.mb_per_s()).collect();
    let disk = r.disk_rates();
    let mut table = Table::new(&["Limit", ">MB/s", "Notes"]);
    table
        .row([
            format!(
                "(i) MD5 of the upload's chunk files read from storage in {} blocks, one core, nothing written",
                size(a.buffer)
            ),
            median(md5_only.iter().copied()).map_or("—".into(), |m| fixed(m, 0)),
            format!(
                "median of {} passes, one per merge (range {}); per merge in the table below",
                md5_only.len(),
                range_text(&md5_only)
            ),
        ])
        .row([
            format!("(b) MD5 of {} in memory, one core", size(r.md5_memory.bytes)),
            fixed(r.md5_memory.mb_per_s(), 0),
            format!(
                "{:.2} s; (i) adds reading the files",
                r.md5_memory.elapsed.as_secs_f64()
            ),
        ])
        .row([
            format!(
                "(c) cold: {} written into the page cache in {} writes, no fsync, after 10 s of rest",
                size(r.page_cache_cold.bytes),
                size(a.buffer)
            ),
            fixed(r.page_cache_cold.mb_per_s(), 0),
            format!(
                "{:.2} s: what the merge's writes cost when they find memory the host has taken back",
                r.page_cache_cold.elapsed.as_secs_f64()
            ),
        ])
        .row([
            "(c) warm: the same, at once into the memory just freed".to_owned(),
            fixed(r.page_cache_warm.mb_per_s(), 0),
            format!("{:.2} s", r.page_cache_warm.elapsed.as_secs_f64()),
        ])
        .row([
            format!(
                "(a) disk: {} written with direct I/O in 1 MiB writes, one fsync at the end",
                size(r.disk_first.bytes)
            ),
            median(disk.iter().copied()).map_or("—".into(), |m| fixed(m, 0)),
            format!(
                "median of {} measurements, before the first merge and after each (range {}); the run's first write, {:.0} MB/s, is not used",
                disk.len(),
                range_text(&disk),
                r.disk_first.mb_per_s()
            ),
        ]);
    table
}

fn range_text(values: &[f64]) -> String {
    range(values.iter().copied()).map_or("—".into(), |(lo, hi)| format!("{lo:.0}–{hi:.0}"))
}

fn residency(resident: Option<(u64, u64)>) -> String {
    match resident {
        Some((_, 0)) => "—".into(),
        Some((res, total)) => format!("{:.0}%", 100.0 * res as f64 / total as f64),
        None => "unknown".into(),
    }
}

fn merges(r: &MergeResults) -> Table {
    let mut table = Table::new(&[
        ">#",
        "Kind",
        "Chunks in cache before (i) / merge",
        ">(i) MB/s",
        ">Merge s",
        ">Merge MB/s",
        ">Ratio",
        ">Start after response ms",
        ">Response → event ms",
        ">Beyond merge ms",
        ">Worker CPU s (user + sys)",
        ">Worker cores",
        ">Worker peak RSS",
        ">API cores",
        ">Kernel threads",
        ">Other",
        ">iowait",
        ">(a) around it",
        ">Warm-up write MB/s",
    ]);
    for (i, m) in r.merges.iter().enumerate() {
        let cpu = m.worker_cpu();
        table.row([
            (i + 1).to_string(),
            m.kind.name().to_owned(),
            format!(
                "{} / {}",
                residency(m.resident_before_md5),
                residency(m.resident_before_merge)
            ),
            fixed(m.md5_only.mb_per_s(), 0),
            fixed(m.merge_time().as_secs_f64(), 3),
            fixed(m.merge_mb_per_s(), 0),
            fixed(m.ratio(), 2),
            signed(m.start_after_response_ms(), 0),
            fixed(m.event_delay().as_secs_f64() * 1e3, 0),
            signed(m.event_overhead_ms(), 0),
            format!(
                "{:.2} ({:.2} + {:.2})",
                cpu.total().as_secs_f64(),
                cpu.user.as_secs_f64(),
                cpu.system.as_secs_f64()
            ),
            fixed(m.worker_cores(), 2),
            mib(m.worker_peak_rss),
            fixed(m.usage.cores_of("api"), 2),
            fixed(m.usage.kernel_cores(), 2),
            fixed(m.usage.other_cores(), 2),
            fixed(m.usage.machine.iowait, 2),
            format!(
                "{:.0} ({:.0}, {:.0})",
                m.disk_around(),
                m.disk_before.mb_per_s(),
                m.disk_after.mb_per_s()
            ),
            m.warm_up.map_or("—".into(), |t| fixed(t.mb_per_s(), 0)),
        ]);
    }
    table
}

/// Per-merge values of one kind.
fn values(r: &MergeResults, kind: Kind, f: impl Fn(&MergeRun) -> f64) -> Vec<f64> {
    r.of(kind).map(f).collect()
}

fn summary(r: &MergeResults) -> Table {
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|&k| r.of(k).next().is_some())
        .collect();
    let header: Vec<String> = std::iter::once("Median (range)".to_owned())
        .chain(
            kinds
                .iter()
                .map(|&k| format!(">{} ({})", k.name(), count(r.of(k).count(), "merge"))),
        )
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = Table::new(&header);
    type Metric = (&'static str, usize, fn(&MergeRun) -> f64);
    let metrics: [Metric; 10] = [
        ("(i) MD5 only, MB/s", 0, |m| m.md5_only.mb_per_s()),
        ("Merge, s", 3, |m| m.merge_time().as_secs_f64()),
        ("Merge, MB/s", 0, MergeRun::merge_mb_per_s),
        ("Ratio merge ÷ (i)", 2, MergeRun::ratio),
        ("Response → event, ms", 0, |m| {
            m.event_delay().as_secs_f64() * 1e3
        }),
        ("Event beyond the merge, ms", 0, MergeRun::event_overhead_ms),
        ("Worker CPU, s", 2, |m| m.worker_cpu().total().as_secs_f64()),
        ("Worker system CPU, s", 2, |m| {
            m.worker_cpu().system.as_secs_f64()
        }),
        ("Worker cores", 2, MergeRun::worker_cores),
        ("Worker peak RSS, MiB", 1, |m| {
            m.worker_peak_rss as f64 / crate::MIB as f64
        }),
    ];
    for (name, decimals, f) in metrics {
        let mut row = vec![name.to_owned()];
        for &kind in &kinds {
            row.push(median_range(&values(r, kind, f), decimals));
        }
        table.row(row);
    }
    table
}

fn targets(r: &MergeResults) -> Table {
    let mut table = targets_table();
    let ratios = values(r, Kind::Standard, MergeRun::ratio);
    if let Some(ratio) = median(ratios.iter().copied()) {
        let merge = median(values(r, Kind::Standard, MergeRun::merge_mb_per_s)).unwrap_or(0.0);
        let md5 = median(values(r, Kind::Standard, |m| m.md5_only.mb_per_s())).unwrap_or(0.0);
        table.row([
            format!(
                "Merge (copy + MD5 + fsync + commit) ≥ {RATIO_TARGET} × the MD5 alone of the same chunk files (median of {}, default configuration)",
                count(ratios.len(), "merge")
            ),
            format!(
                "{ratio:.2} (range {}); merge {merge:.0} MB/s, MD5 only {md5:.0} MB/s (medians)",
                range(ratios.iter().copied())
                    .map_or("—".into(), |(lo, hi)| format!("{lo:.2}–{hi:.2}"))
            ),
            format!("≥ {RATIO_TARGET}"),
            verdict(ratio >= RATIO_TARGET).to_owned(),
        ]);
    }
    let overheads = values(r, Kind::Standard, MergeRun::event_overhead_ms);
    if let Some((_, worst)) = range(overheads.iter().copied()) {
        let within = overheads
            .iter()
            .filter(|&&o| o <= EVENT_ALLOWANCE_MS)
            .count();
        table.row([
            format!(
                "`upload.completed` arrives ≤ merge time + {EVENT_ALLOWANCE_MS:.0} ms after the completing chunk's response (every merge, default configuration)"
            ),
            format!(
                "worst {} ms beyond the merge, median {} ms; {within} of {} within",
                signed(worst, 0),
                signed(median(overheads.iter().copied()).unwrap_or(0.0), 0),
                overheads.len()
            ),
            format!("≤ +{EVENT_ALLOWANCE_MS:.0} ms"),
            verdict(within == overheads.len()).to_owned(),
        ]);
    }
    table
}

fn observations(r: &MergeResults) -> Vec<String> {
    let mut notes = Vec::new();
    let med = |kind: Kind, f: fn(&MergeRun) -> f64| median(values(r, kind, f));
    let merge_s = |m: &MergeRun| m.merge_time().as_secs_f64();
    let md5_s = |m: &MergeRun| m.md5_only.elapsed.as_secs_f64();
    let sys_s = |m: &MergeRun| m.worker_cpu().system.as_secs_f64();
    let (standard, nofsync, warm) = (Kind::Standard, Kind::NoFsync, Kind::WarmMemory);
    if let (Some(merge), Some(md5)) = (med(standard, merge_s), med(standard, md5_s)) {
        notes.push(format!(
            "Default configuration: the merge took {merge:.2} s where hashing the same files alone took {md5:.2} s (medians), {:+.2} s or {:+.0}%; the target allows {:.2} s. The worker kept {:.2} cores busy and spent {:.2} s in the kernel.",
            merge - md5,
            100.0 * (merge - md5) / md5,
            md5 / RATIO_TARGET,
            med(standard, MergeRun::worker_cores).unwrap_or(0.0),
            med(standard, sys_s).unwrap_or(0.0)
        ));
    }
    let cold_s = r.page_cache_cold.elapsed.as_secs_f64();
    let warm_s = r.page_cache_warm.elapsed.as_secs_f64();
    if let Some(md5) = med(standard, md5_s) {
        let bound = if cold_s > md5 {
            "longer than the MD5 alone: on this machine the copy thread's writes, not the MD5, bound a merge into cold memory, and the overlap of copy and hash cannot hide them"
        } else {
            "less than the MD5 alone, so the copy can hide behind the hash"
        };
        notes.push(format!(
            "Writing {} into the page cache took {cold_s:.2} s into cold memory and {warm_s:.2} s into warm memory ((c)): {bound}.",
            size(r.page_cache_cold.bytes)
        ));
    }
    if let (Some(with), Some(warm_merge)) = (med(standard, merge_s), med(warm, merge_s)) {
        notes.push(format!(
            "With the output's memory warmed first, the merge took {warm_merge:.2} s (ratio {:.2}, worker system time {:.2} s) against {with:.2} s by default (ratio {:.2}, {:.2} s): fresh memory costs the merge {:.2} s here.",
            med(warm, MergeRun::ratio).unwrap_or(0.0),
            med(warm, sys_s).unwrap_or(0.0),
            med(standard, MergeRun::ratio).unwrap_or(0.0),
            med(standard, sys_s).unwrap_or(0.0),
            with - warm_merge
        ));
    }
    if let (Some(with), Some(without)) = (med(standard, merge_s), med(nofsync, merge_s)) {
        notes.push(format!(
            "The fsync costs {:+.2} s per {} merge (median {with:.2} s with, {without:.2} s without; without it the ratio is {:.2}).",
            with - without,
            size(r.args.size),
            med(nofsync, MergeRun::ratio).unwrap_or(0.0)
        ));
    }
    let disk_bound = numbered(&r.merges, |m| {
        (m.kind.fsync() && m.disk_around() < m.md5_only.mb_per_s()).then(|| {
            format!(
                " ((a) {:.0} MB/s, (i) {:.0} MB/s)",
                m.disk_around(),
                m.md5_only.mb_per_s()
            )
        })
    });
    if !disk_bound.is_empty() {
        notes.push(format!(
            "The disk alone was slower than (i) around merges {}: there a merge that fsyncs its output is bounded by the disk too.",
            disk_bound.join(", ")
        ));
    }
    let waiting = numbered(&r.merges, |m| {
        let iowait = m.usage.machine.iowait;
        (iowait >= 0.25).then(|| format!(" ({iowait:.2})"))
    });
    if !waiting.is_empty() {
        notes.push(format!(
            "Cores sat in iowait (waiting for the disk) during merges {}.",
            waiting.join(", ")
        ));
    }
    if let Some(m) = r.of(standard).next() {
        let starts = values(r, standard, MergeRun::start_after_response_ms);
        notes.push(format!(
            "Dispatch: the merge started {} ms after the completing chunk's response was read (median; negative = before), and the event arrived {} ms after the commit (median). The worker idled at {} before a merge.",
            median(starts).map_or("—".into(), |s| signed(s, 0)),
            median(values(r, standard, |m| {
                m.event_overhead_ms() - m.start_after_response_ms()
            }))
            .map_or("—".into(), |s| format!("{s:.0}")),
            mib(m.worker_rss_before)
        ));
    }
    let cold = numbered(&r.merges, |m| {
        [m.resident_before_md5, m.resident_before_merge]
            .iter()
            .any(|x| x.is_some_and(|(res, total)| res < total))
            .then(String::new)
    });
    if !cold.is_empty() {
        notes.push(format!(
            "Some chunk data was not in the page cache before (i) or the merge in {}: those passes read part of it from the disk.",
            cold.join(", ")
        ));
    }
    let refenced = numbered(&r.merges, |m| {
        (m.fence != 1).then(|| format!(" (fence {})", m.fence))
    });
    if !refenced.is_empty() {
        notes.push(format!(
            "Not committed by the first merge attempt: {}; the merge time is that of the committing attempt.",
            refenced.join(", ")
        ));
    }
    let retried = numbered(&r.merges, |m| {
        (m.discarded > 0).then(|| format!(" ({})", m.discarded))
    });
    let disturbed = numbered(&r.merges, |m| {
        m.disturbed().then(|| {
            format!(
                " ({:.2} / {:.2})",
                m.usage.other_cores(),
                m.md5_usage.other_cores()
            )
        })
    });
    notes.extend(disturbance_notes(
        "merges",
        &retried,
        &disturbed,
        r.args.run.retries,
        " during the merge / the MD5 pass",
    ));
    let unclean = numbered(&r.merges, |m| {
        (!m.unclean_exits.is_empty()).then(|| format!(": {}", m.unclean_exits.join(", ")))
    });
    notes.extend(closing_notes(
        r.busy_waits,
        &r.args.run,
        &unclean,
        &r.machine,
    ));
    notes
}
