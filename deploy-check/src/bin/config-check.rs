//! `stitch-config-check`: loads Stitch's settings from this process's environment (and
//! `STITCH_CONFIG`, if set) with the same loader and validation as `stitch-api` and
//! `stitch-worker`, and reads the API keys as they do at start (`[[auth.keys]]` and the
//! keys file `STITCH__AUTH__KEYS_FILE` names, which must exist and hold valid `[[keys]]`
//! tables), without connecting to anything. Exit 0 when valid; 2 with the programs' own
//! message otherwise. The deploy-check tests run it with the environment of every container
//! that the deployment files define, the keys file mapped to the file that would be mounted.

use std::process::ExitCode;

use stitch_common::auth::Authenticator;
use stitch_common::config::Settings;

fn main() -> ExitCode {
    let settings = match Settings::load(None, &[]) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match Authenticator::new(&settings.auth) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("invalid API keys: {e:#}");
            ExitCode::from(2)
        }
    }
}
