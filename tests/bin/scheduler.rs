//! kiln-scheduler built from `kiln_scheduler::cli` (the shipped binary's code) for process-level tests.

fn main() -> anyhow::Result<()> {
    kiln_scheduler::cli::main()
}
