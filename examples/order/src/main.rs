fn main() -> std::process::ExitCode {
    order_example::main()
}
