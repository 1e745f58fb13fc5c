//! The `order` example binary under a name of this package, so that tests find it.
fn main() -> std::process::ExitCode {
    order_example::main()
}
