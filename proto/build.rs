//! Compiles the .proto files with protox (pure Rust), so a fresh machine needs no `protoc`.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &["fhirgw/config/v1/config.proto", "fhirgw/push/v1/push.proto", "fhirgw/admin/v1/admin.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fhirgw");
    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(FILES)?;
    let fds = compiler.file_descriptor_set();

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Served by gRPC reflection; carries comments so `grpcurl describe` shows them.
    std::fs::write(out.join("fhirgw_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Deterministic encoding: content-hash versions must not depend on map iteration order.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
