//! Compiles `rootlet/v1/rootlet.proto` with protox (pure Rust, so no protoc
//! binary is needed) and generates the tonic client and server.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=rootlet");
    let fds = protox::compile(["rootlet/v1/rootlet.proto"], ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("rootlet_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
