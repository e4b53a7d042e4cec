//! The `queuectl` command. Everything it does lives in the `queuectl_cli` library.

fn main() -> std::process::ExitCode {
    queuectl_cli::main()
}
