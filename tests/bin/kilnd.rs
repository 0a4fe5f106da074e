//! kilnd built from `kilnd::cli` (the shipped binary's code) for tests that run daemons as processes.

fn main() -> anyhow::Result<()> {
    kilnd::cli::main()
}
