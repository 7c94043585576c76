#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    modelgate_operator::cli::main()
}
