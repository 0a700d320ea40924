//! `stitch-config-check`: loads Stitch's settings from this process's environment (and
//! `STITCH_CONFIG`, if set) with the same loader and validation as `stitch-api` and
//! `stitch-worker`, without connecting to anything. Exit 0 when valid; 2 with the
//! programs' own message otherwise. The deploy-check tests run it with the environment of
//! every container that the deployment files define.

use std::process::ExitCode;

use stitch_common::config::Settings;

fn main() -> ExitCode {
    match Settings::load(None, &[]) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            ExitCode::from(2)
        }
    }
}
