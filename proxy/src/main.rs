//! The `jitgate` binary; everything lives in the library's [`jitgate::cli`].

fn main() -> std::process::ExitCode {
    jitgate::cli::main()
}
