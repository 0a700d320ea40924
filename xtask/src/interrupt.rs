//! Ctrl-C or SIGTERM during `cargo xtask test`: nothing of the run is left behind. The test
//! runner is told to stop (a SIGTERM sent to xtask alone does not reach it, and it would go
//! on against stopped services), then the services are stopped, then the reflink image is
//! unmounted and removed; xtask exits 130. Without this, an interrupted run left its loop
//! mount in `target/xtask/reflink` of that checkout for good.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// The test runner's process id while it runs.
static RUNNER: Mutex<Option<u32>> = Mutex::new(None);
/// Set when the handler starts: the rest of the run is its to end.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once per process).
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("xtask: interrupted; stopping the test runner and the test services");
            stop_runner();
            crate::services::stop_all_now();
            crate::reflink::unmount_all_now();
            std::process::exit(130);
        });
    });
}

/// Notes the test runner, for the handler; `None` once it ended.
pub fn runner_is(pid: Option<u32>) {
    *RUNNER.lock().unwrap_or_else(|e| e.into_inner()) = pid;
}

/// Called when the runner ended: if that was the handler's doing, waits for the handler to
/// finish the cleanup and end the process (exit 130), rather than going on to the next stage.
pub fn hold_if_interrupted() {
    while INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// SIGTERM to the runner (nextest and cargo stop their tests on it), and up to 20 s for it
/// to end, so that nothing uses the reflink mount when it is unmounted.
fn stop_runner() {
    let Some(pid) = *RUNNER.lock().unwrap_or_else(|e| e.into_inner()) else {
        return;
    };
    let signal = |name: &str| {
        Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    // `kill -0` fails once the process is gone (the main thread, waiting on it, reaps it).
    while Instant::now() < deadline && signal("0") {
        std::thread::sleep(Duration::from_millis(100));
    }
}
