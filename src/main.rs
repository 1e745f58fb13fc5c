fn main() -> std::process::ExitCode {
    durin::cli::main()
}
