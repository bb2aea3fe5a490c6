//! `rootletctl`: parses the command line and hands over to
//! [`rootlet_client::cli::run`]; the process exits with the code it returns
//! (0 success, 1 failed, 2 usage or configuration error, 3 rolled back).
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(rootlet_client::cli::main());
}
