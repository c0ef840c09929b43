//! Compiles the public contract in `proto/` and writes the file descriptor set
//! that server reflection serves, so `grpcurl` works without the .proto files.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A fresh machine has no system protoc; the vendored binary keeps the
    // build self-contained. An explicit PROTOC still wins.
    if env::var_os("PROTOC").is_none() {
        env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("stockgate_descriptor.bin"))
        .compile_protos(
            &[
                "proto/stockgate/v1/inventory.proto",
                "proto/stockgate/v1/admin.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
