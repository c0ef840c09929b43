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
    // The revision shown by `--version`, the start-up log and the
    // build-info metric. An image build without `.git` passes it in as
    // GIT_REVISION. (Not STOCKGATE_*: cargo also exports it to test runs,
    // and the config would read it as a key.)
    println!("cargo:rerun-if-env-changed=GIT_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let revision = env::var("GIT_REVISION").ok().or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|s| s.trim().to_owned())
    });
    println!(
        "cargo:rustc-env=BUILT_GIT_REVISION={}",
        revision.unwrap_or_else(|| "unknown".into())
    );
    Ok(())
}
