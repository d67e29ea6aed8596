//! The qxfer binary: everything lives in the library; see `qxfer::cli`.

fn main() -> std::process::ExitCode {
    qxfer::cli::main()
}
