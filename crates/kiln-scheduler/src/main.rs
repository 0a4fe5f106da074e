//! `kiln-scheduler` binary: see [`kiln_scheduler::cli`].

fn main() -> anyhow::Result<()> {
    kiln_scheduler::cli::main()
}
