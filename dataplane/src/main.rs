#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    modelgate_dataplane::cli::main()
}
