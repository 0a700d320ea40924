fn main() -> std::process::ExitCode {
    stitch_api::cli::main()
}
