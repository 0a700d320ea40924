//! `stitch`: see `stitch_cli`.

fn main() -> std::process::ExitCode {
    stitch_cli::main()
}
