//! The `durin` binary: everything is in the library, [`durin::cli::main`].

/// mimalloc rather than the system's allocator: it gives memory back to the system soon
/// after a burst of callers has passed, where glibc's arenas keep most of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    durin::cli::main()
}
