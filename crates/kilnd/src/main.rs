//! `kilnd` binary: see [`kilnd::cli`].

/// jemalloc with its background purge thread (the `background_threads` feature turns it on at start, so no
/// `unsafe` configuration call is needed) instead of glibc malloc. Under bursts of connections and parked requests
/// glibc kept the freed memory in its per-thread arenas: after six waves of 3,000 parked requests kilnd's RSS stood
/// at 4.94 × its baseline while only 4.8 MB was in use. jemalloc's background thread hands freed pages back on its
/// decay timer (1.07 × the baseline 18–28 s after each wave). Measured by `benches/memory.rs`; the numbers are in
/// ARCHITECTURE.md and benches/README.md. Only Rust allocations go through it: GStreamer's C code still uses glibc.
/// CI's test build (`--cfg kiln_system_allocator`, set by scripts/test) uses glibc, to skip jemalloc's C build.
#[cfg(not(kiln_system_allocator))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    kilnd::cli::main()
}
