//! Report writing shared by every benchmark: the skeleton every report has ([`Report`]),
//! Markdown tables, number formatting, and the section of `docs/benchmarks.md` that a
//! benchmark owns. A section runs from its `## ` heading to the next `## ` heading (or the
//! end of the file); writing one replaces only that section, so benchmarks and hand-written
//! text share the file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, ensure};

use crate::machine::Machine;
use crate::options::RunArgs;
use crate::usage::DISTURBED_CORES;

/// What `docs/benchmarks.md` starts with when a benchmark creates it.
const NEW_DOC: &str = "# Benchmarks\n\nEach `## ` section below is written by a `stitch-bench` subcommand run with `--write-docs`;\nre-run it rather than editing the section by hand.\n";

/// One benchmark run's report, in the parts every report has and the order it prints them:
/// when and by what it was measured, how to reproduce it and the options of this run, the
/// report's own paragraphs, its headline table (the issue's targets, or a comparison), the
/// machine, the baselines, the benchmark's own tables, how to read the numbers, and what this
/// run shows.
pub struct Report<'a> {
    /// The subcommand (`merge`).
    pub command: &'static str,
    /// The heading of the section the report owns in `docs/benchmarks.md`.
    pub heading: &'static str,
    /// What `cargo build --release` builds before the run (`-p stitch-api -p stitch-bench`).
    pub build: &'static str,
    /// Which part of the run needs Redis and RabbitMQ, when not all of it does
    /// (`" for the distributed mode"`); empty otherwise.
    pub services_for: &'static str,
    /// The options of this run, as `stitch-bench <command>` takes them.
    pub options: String,
    /// Paragraphs before the first table.
    pub preface: Vec<String>,
    pub headline: Section,
    pub machine: &'a Machine,
    /// Who shares the machine's cores, for its table.
    pub sharing: &'static str,
    pub baselines: Table,
    pub sections: Vec<Section>,
    pub how_to_read: &'static [&'static str],
    pub observations: Vec<String>,
}

impl Report<'_> {
    /// The Markdown, without its `## ` heading.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let command = self.command;
        let _ = writeln!(
            out,
            "_Measured {} by `stitch-bench {command}`; `--write-docs` rewrites this section, so change the benchmark, not the text._\n",
            self.machine.date
        );
        let _ = writeln!(
            out,
            "Reproduce (from the workspace root, with Redis on `127.0.0.1:6379` and RabbitMQ on `127.0.0.1:5672`{}):\n",
            self.services_for
        );
        let _ = writeln!(
            out,
            "```sh\ncargo build --release {} && target/release/stitch-bench {command} --write-docs\n```\n",
            self.build
        );
        let _ = writeln!(
            out,
            "This run: `stitch-bench {command} {}`.\n",
            self.options
        );
        for paragraph in &self.preface {
            let _ = writeln!(out, "{paragraph}\n");
        }
        self.headline.render_into(&mut out);
        let machine = machine_table(self.machine, self.sharing);
        let baselines = self.baselines.clone();
        let fixed = [
            Section::new("Machine", machine),
            Section::new("Baselines", baselines),
        ];
        for section in fixed.iter().chain(&self.sections) {
            out.push('\n');
            section.render_into(&mut out);
        }
        out.push_str("\n### How to read the numbers\n\n");
        for line in self.how_to_read {
            bullet(&mut out, line);
        }
        out.push_str("\n### Observations (computed from this run)\n\n");
        for line in &self.observations {
            bullet(&mut out, line);
        }
        out
    }

    /// Prints the report under its heading and, with `--write-docs`, writes it as its section
    /// of the docs file.
    pub fn publish(&self, run: &RunArgs) -> anyhow::Result<()> {
        let markdown = self.render();
        println!("{}\n\n{markdown}", self.heading);
        if run.write_docs {
            write_section(&run.docs, self.heading, &markdown)?;
            eprintln!(
                "wrote the {} section of {}",
                self.command,
                run.docs.display()
            );
        }
        Ok(())
    }
}

/// A `### ` part of a report: a paragraph, a table, and a sentence after it.
pub struct Section {
    pub title: String,
    pub intro: Option<String>,
    pub table: Table,
    pub outro: Option<String>,
}

impl Section {
    pub fn new(title: impl Into<String>, table: Table) -> Self {
        Self {
            title: title.into(),
            intro: None,
            table,
            outro: None,
        }
    }

    /// With a paragraph before the table.
    pub fn intro(self, text: impl Into<String>) -> Self {
        Self {
            intro: Some(text.into()),
            ..self
        }
    }

    /// With a sentence after the table.
    pub fn outro(self, text: impl Into<String>) -> Self {
        Self {
            outro: Some(text.into()),
            ..self
        }
    }

    fn render_into(&self, out: &mut String) {
        let _ = write!(out, "### {}\n\n", self.title);
        if let Some(intro) = &self.intro {
            let _ = write!(out, "{intro}\n\n");
        }
        out.push_str(&self.table.render());
        if let Some(outro) = &self.outro {
            let _ = writeln!(out, "\n{outro}");
        }
    }
}

/// `#1`, `#2`… (by position in `items`) with `describe`'s words, for the items it has words
/// for: `numbered(&runs, |r| (r.discarded > 0).then(|| format!(" ({})", r.discarded)))`
/// gives `#3 (2)`.
pub fn numbered<T>(items: &[T], describe: impl Fn(&T) -> Option<String>) -> Vec<String> {
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| Some(format!("#{}{}", i + 1, describe(item)?)))
        .collect()
}

/// What the reports of numbered runs (`merges`, `uploads`) say about runs that other work
/// disturbed: those repeated (`#n (times)`), and those still disturbed after `retries`
/// repeats (`#n (other cores…)`, the cores `measured` names).
pub fn disturbance_notes(
    runs: &str,
    retried: &[String],
    disturbed: &[String],
    retries: usize,
    measured: &str,
) -> Vec<String> {
    let mut notes = Vec::new();
    if !retried.is_empty() {
        let runs = capitalized(runs);
        notes.push(format!(
            "{runs} discarded because other processes used {DISTURBED_CORES} cores or more while they ran, and repeated: {}.",
            retried.join(", ")
        ));
    }
    if !disturbed.is_empty() {
        notes.push(format!(
            "Still disturbed after {retries} repeats (other cores{measured}): {}. Those numbers may be off; re-run on an idle machine.",
            disturbed.join(", ")
        ));
    }
    notes
}

/// What the reports of numbered runs say last about the run as a whole: that `--wait-idle`
/// ran out, the processes that did not exit cleanly (`#n: …`), and a work directory in memory.
pub fn closing_notes(
    busy_waits: usize,
    run: &RunArgs,
    unclean: &[String],
    machine: &Machine,
) -> Vec<String> {
    let mut notes = Vec::new();
    if busy_waits > 0 {
        notes.push(format!(
            "{busy_waits} time(s) the machine was still busy when `--wait-idle` ({} s) ran out.",
            run.wait_idle
        ));
    }
    if !unclean.is_empty() {
        notes.push(format!(
            "Processes that did not exit cleanly on SIGTERM: {}.",
            unclean.join("; ")
        ));
    }
    if machine.work_fs.is_memory() {
        notes.push(format!(
            "The work directory is on {}: nothing reached a disk.",
            machine.work_fs.fs_type
        ));
    }
    notes
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The table of the issue's targets: each with what was measured, what it needs, and
/// [`verdict`].
pub fn targets_table() -> Table {
    Table::new(&["Target (from the issue)", "Measured", "Needed", "Result"])
}

/// A Markdown table.
#[derive(Clone, Debug, Default)]
pub struct Table {
    header: Vec<String>,
    /// Per column: right-align (numbers) or not.
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named `header`; a name starting with `>` is right-aligned (the `>` is dropped).
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header
                .iter()
                .map(|h| h.strip_prefix('>').unwrap_or(h).to_owned())
                .collect(),
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    pub fn render(&self) -> String {
        let cell = |s: &str| s.replace('|', "\\|");
        let mut out = String::new();
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(self.header.iter().map(|h| cell(h)).collect()));
        out.push_str(&line(
            self.right
                .iter()
                .map(|&r| if r { "---:".into() } else { "---".into() })
                .collect(),
        ));
        for row in &self.rows {
            let mut cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
            cells.resize(self.header.len(), String::new());
            out.push_str(&line(cells));
        }
        out
    }
}

/// The "Machine" table every report has; `sharing` says which processes share the cores.
fn machine_table(m: &Machine, sharing: &str) -> Table {
    let mut table = Table::new(&["", ""]);
    table
        .row([
            "CPUs".to_owned(),
            format!("{} (`nproc`), {}; {sharing}", m.cpus, m.cpu_model),
        ])
        .row(["Kernel".to_owned(), m.kernel.clone()])
        .row(["Memory".to_owned(), format!("{:.1} GiB", m.memory_gib)])
        .row([
            "Work directory's file system".to_owned(),
            format!(
                "{} on {} (mounted at {})",
                m.work_fs.fs_type,
                m.work_fs.source,
                m.work_fs.mount_point.display()
            ),
        ])
        .row([
            "Before the run".to_owned(),
            format!(
                "load average {:.2}; {:.2} cores busy over one second",
                m.load_before, m.busy_before
            ),
        ])
        .row(["Date (UTC)".to_owned(), m.date.clone()]);
    table
}

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The smallest and largest of `values`; `None` if empty.
pub fn range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().fold(None, |acc, x| match acc {
        None => Some((x, x)),
        Some((lo, hi)) => Some((x.min(lo), x.max(hi))),
    })
}

/// `median (lo–hi)` of `values` with `decimals` digits, or `—` when there are none.
pub fn median_range(values: &[f64], decimals: usize) -> String {
    match (
        median(values.iter().copied()),
        range(values.iter().copied()),
    ) {
        (Some(m), Some((lo, hi))) if values.len() > 1 => {
            format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
        }
        (Some(m), _) => format!("{m:.decimals$}"),
        _ => "—".to_owned(),
    }
}

/// `**PASS**` or `**FAIL**`.
pub fn verdict(pass: bool) -> &'static str {
    if pass { "**PASS**" } else { "**FAIL**" }
}

/// A number with `decimals` digits after the point.
pub fn fixed(value: f64, decimals: usize) -> String {
    format!("{value:.decimals$}")
}

/// A signed number with `decimals` digits (`+12`, `-3`), and `0` for what rounds to zero
/// (never `-0`).
pub fn signed(value: f64, decimals: usize) -> String {
    let text = format!("{value:+.decimals$}");
    if text[1..].chars().all(|c| c == '0' || c == '.') {
        text[1..].to_owned()
    } else {
        text
    }
}

/// `n` and the noun, plural unless `n` is 1 (`1 merge`, `5 merges`).
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A byte size as an option takes it (`1GiB`, `64KiB`).
pub fn size_flag(bytes: u64) -> String {
    size(bytes).replace(' ', "")
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / crate::MIB as f64)
}

/// A byte size in the largest binary unit that divides it (`1 GiB`, `8 MiB`, `1000 B`).
pub fn size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// `doc` with the section that starts at the line `heading` replaced by `heading`, a blank
/// line and `body`; appended at the end when `doc` has no such section.
pub fn replace_section(doc: &str, heading: &str, body: &str) -> String {
    let mut section = format!("{heading}\n\n{}", body.trim_end());
    section.push('\n');
    let lines: Vec<&str> = doc.split_inclusive('\n').collect();
    let Some(start) = lines.iter().position(|l| l.trim_end() == heading) else {
        let mut out = doc.trim_end().to_owned();
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(&section);
        return out;
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out: String = lines[..start].concat();
    out.push_str(&section);
    if end < lines.len() {
        out.push('\n');
        out.push_str(&lines[end..].concat());
    }
    out
}

/// Writes `body` as the section `heading` of the Markdown file `path`, creating the file
/// (with a short preamble) when missing and keeping every other section as it is.
pub fn write_section(path: &Path, heading: &str, body: &str) -> anyhow::Result<()> {
    ensure!(
        heading.starts_with("## ") && !body.lines().any(|l| l.starts_with("## ")),
        "a section is one `## ` heading with no other `## ` heading inside"
    );
    let doc = match std::fs::read_to_string(path) {
        Ok(doc) => doc,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NEW_DOC.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let updated = replace_section(&doc, heading, body);
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

/// Appends a bullet line to `out`.
fn bullet(out: &mut String, text: impl AsRef<str>) {
    let _ = writeln!(out, "- {}", text.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_numbers_right_and_escape_pipes() {
        let mut t = Table::new(&["name", ">MB/s"]);
        t.row(["a|b", "12.5"]).row(["c"]);
        assert_eq!(
            t.render(),
            "| name | MB/s |\n| --- | ---: |\n| a\\|b | 12.5 |\n| c |  |\n"
        );
    }

    #[test]
    fn medians_and_ranges() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median([]), None);
        assert_eq!(range([3.0, 1.0, 2.0]), Some((1.0, 3.0)));
        assert_eq!(median_range(&[1.0, 2.0, 4.0], 1), "2.0 (1.0–4.0)");
        assert_eq!(median_range(&[1.0], 0), "1");
        assert_eq!(median_range(&[], 0), "—");
    }

    #[test]
    fn signed_numbers_never_show_minus_zero() {
        assert_eq!(signed(12.4, 0), "+12");
        assert_eq!(signed(-3.0, 0), "-3");
        assert_eq!(signed(-0.3, 0), "0");
        assert_eq!(signed(0.04, 1), "0.0");
        assert_eq!(count(1, "merge"), "1 merge");
        assert_eq!(count(5, "merge"), "5 merges");
    }

    #[test]
    fn sizes_use_the_largest_exact_unit() {
        assert_eq!(size(1 << 30), "1 GiB");
        assert_eq!(size(8 << 20), "8 MiB");
        assert_eq!(size(1536), "1536 B");
        assert_eq!(size(3 << 10), "3 KiB");
        assert_eq!(mib(64 << 20), "64.0 MiB");
    }

    #[test]
    fn every_report_has_the_same_parts_in_the_same_order() {
        let machine = Machine {
            cpus: 2,
            cpu_model: "CPU".into(),
            kernel: "6.1".into(),
            memory_gib: 4.0,
            work_fs: crate::machine::Mount {
                mount_point: "/".into(),
                fs_type: "ext4".into(),
                source: "/dev/vda".into(),
            },
            load_before: 0.5,
            busy_before: 0.1,
            date: "2026-12-01T00:00:00Z".into(),
        };
        let mut headline = targets_table();
        headline.row(["fast", "2", "≥ 1", verdict(true)]);
        let mut baselines = Table::new(&["Limit", ">MB/s"]);
        baselines.row(["(a)", "9"]);
        let mut runs = Table::new(&[">#"]);
        runs.row(["1"]);
        let report = Report {
            command: "merge",
            heading: "## Merge",
            build: "-p stitch-bench",
            services_for: " for the distributed mode",
            options: "--size 1GiB".into(),
            preface: vec!["No target.".into()],
            headline: Section::new("Targets", headline),
            machine: &machine,
            sharing: "all share them",
            baselines,
            sections: vec![
                Section::new("Runs", runs)
                    .intro("One row per run.")
                    .outro("Done."),
            ],
            how_to_read: &["Read it."],
            observations: vec!["It ran.".into()],
        };
        let text = report.render();
        assert!(text.starts_with(
            "_Measured 2026-12-01T00:00:00Z by `stitch-bench merge`; `--write-docs` rewrites this section, so change the benchmark, not the text._\n\n\
             Reproduce (from the workspace root, with Redis on `127.0.0.1:6379` and RabbitMQ on `127.0.0.1:5672` for the distributed mode):\n\n\
             ```sh\ncargo build --release -p stitch-bench && target/release/stitch-bench merge --write-docs\n```\n\n\
             This run: `stitch-bench merge --size 1GiB`.\n\n\
             No target.\n\n\
             ### Targets\n\n| Target (from the issue) | Measured | Needed | Result |\n"
        ), "{text}");
        let parts: Vec<&str> = text.lines().filter(|l| l.starts_with("### ")).collect();
        assert_eq!(
            parts,
            [
                "### Targets",
                "### Machine",
                "### Baselines",
                "### Runs",
                "### How to read the numbers",
                "### Observations (computed from this run)"
            ]
        );
        assert!(text.contains("| CPUs | 2 (`nproc`), CPU; all share them |\n"));
        assert!(text.contains(
            "### Runs\n\nOne row per run.\n\n| # |\n| ---: |\n| 1 |\n\nDone.\n\n### How"
        ));
        assert!(
            text.ends_with(
                "- Read it.\n\n### Observations (computed from this run)\n\n- It ran.\n"
            )
        );
    }

    #[test]
    fn numbered_notes_name_runs_from_one() {
        let discarded = [0, 2, 0, 1];
        let retried = numbered(&discarded, |&d| (d > 0).then(|| format!(" ({d})")));
        assert_eq!(retried, ["#2 (2)", "#4 (1)"]);
        let notes = disturbance_notes("uploads", &retried, &[], 3, "");
        assert_eq!(
            notes,
            [
                "Uploads discarded because other processes used 0.35 cores or more while they ran, and repeated: #2 (2), #4 (1)."
            ]
        );
        assert!(disturbance_notes("merges", &[], &[], 3, "").is_empty());
    }

    #[test]
    fn a_section_is_replaced_up_to_the_next_section() {
        let doc = "# B\n\nintro\n\n## Ingest\n\nold\n### sub\nold too\n\n## Merge\n\nkeep\n";
        let out = replace_section(doc, "## Ingest", "new\n");
        assert_eq!(
            out,
            "# B\n\nintro\n\n## Ingest\n\nnew\n\n## Merge\n\nkeep\n"
        );
    }

    #[test]
    fn the_last_section_is_replaced_to_the_end() {
        let doc = "# B\n\n## Merge\n\nkeep\n\n## Ingest\n\nold\n";
        let out = replace_section(doc, "## Ingest", "new");
        assert_eq!(out, "# B\n\n## Merge\n\nkeep\n\n## Ingest\n\nnew\n");
    }

    #[test]
    fn a_missing_section_is_appended() {
        let out = replace_section("# B\n\nintro\n", "## Ingest", "new");
        assert_eq!(out, "# B\n\nintro\n\n## Ingest\n\nnew\n");
        assert_eq!(
            replace_section("", "## Ingest", "new"),
            "## Ingest\n\nnew\n"
        );
    }

    #[test]
    fn writing_a_section_creates_the_file_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs/benchmarks.md");
        write_section(&path, "## Ingest", "one").unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(first.starts_with("# Benchmarks\n") && first.ends_with("## Ingest\n\none\n"));
        std::fs::write(&path, format!("{first}\n## Merge\n\nkeep\n")).unwrap();
        write_section(&path, "## Ingest", "two").unwrap();
        let second = std::fs::read_to_string(&path).unwrap();
        assert!(
            second.contains("## Ingest\n\ntwo\n\n## Merge\n\nkeep\n"),
            "{second}"
        );
        assert!(write_section(&path, "## Ingest", "## Sneaky\n").is_err());
    }
}
