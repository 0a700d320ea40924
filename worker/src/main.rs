//! `stitch-worker`: see `stitch_worker::cli`.

fn main() -> std::process::ExitCode {
    stitch_worker::cli::main()
}
