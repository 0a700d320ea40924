fn main() -> std::process::ExitCode {
    stitch_soak::main()
}
