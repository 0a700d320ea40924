//! Progress on stderr: a bar with bytes, rate and ETA on a terminal, a plain line every few
//! seconds otherwise (logs, CI), nothing with `--quiet`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const PLAIN_EVERY: Duration = Duration::from_secs(2);

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: Option<Mutex<Plain>>,
    label: &'static str,
    total: u64,
}

struct Plain {
    started: Instant,
    last: Instant,
    done: u64,
}

impl Progress {
    pub fn new(label: &'static str, total: u64, quiet: bool) -> Self {
        let (bar, plain) = if quiet {
            (None, None)
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label);
            (Some(bar), None)
        } else {
            let now = Instant::now();
            (
                None,
                Some(Mutex::new(Plain {
                    started: now,
                    last: now,
                    done: 0,
                })),
            )
        };
        Self {
            bar,
            plain,
            label,
            total,
        }
    }

    pub fn inc(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
        if let Some(plain) = &self.plain
            && let Ok(mut p) = plain.lock()
        {
            p.done += bytes;
            if p.last.elapsed() >= PLAIN_EVERY {
                p.last = Instant::now();
                let secs = p.started.elapsed().as_secs_f64().max(0.001);
                eprintln!(
                    "{}: {} of {} MiB ({:.0}%), {:.1} MiB/s",
                    self.label,
                    p.done >> 20,
                    self.total >> 20,
                    p.done as f64 * 100.0 / self.total.max(1) as f64,
                    p.done as f64 / secs / (1 << 20) as f64
                );
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
