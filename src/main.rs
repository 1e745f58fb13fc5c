//! The `durin` binary: everything is in the library, [`durin::cli::main`].

/// jemalloc rather than the system's allocator, with its background threads: they give
/// memory back to the system some seconds after a burst of callers has passed, where
/// glibc's arenas keep most of it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    durin::cli::main()
}
