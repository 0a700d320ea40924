fn main() -> std::process::ExitCode {
    stitch_worker::cli::main()
}
