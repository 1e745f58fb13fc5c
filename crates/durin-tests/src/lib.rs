//! End-to-end tests live in `tests/`; this crate only builds the binaries they run.
