//! `kilnctl` binary: see [`kilnctl::main`].

fn main() -> std::process::ExitCode {
    kilnctl::main()
}
