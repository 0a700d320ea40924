//! `stitch-api`: see `stitch_api::cli`.

fn main() -> std::process::ExitCode {
    stitch_api::cli::main()
}
