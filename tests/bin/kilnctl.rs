//! kilnctl built from `kilnctl::main` (the shipped binary's code) for process-level tests.

fn main() -> std::process::ExitCode {
    kilnctl::main()
}
