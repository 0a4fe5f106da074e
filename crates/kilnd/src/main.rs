//! `kilnd` binary: see [`kilnd::cli`].

fn main() -> anyhow::Result<()> {
    kilnd::cli::main()
}
