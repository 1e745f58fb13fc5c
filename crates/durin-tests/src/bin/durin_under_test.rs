//! The `durin` binary under a name of this package, so that tests find it.
fn main() -> std::process::ExitCode {
    durin::cli::main()
}
