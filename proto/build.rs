//! Compiles the `.proto` contract with protox (a pure-Rust protobuf compiler), so a fresh
//! machine builds with no protoc install. The encoded descriptor set is kept for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "meridian/v1/inference.proto",
        "meridian/admin/v1/admin.proto",
    ];
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // One descriptor set per port, so reflection lists only what that port serves.
    for (proto, bin) in [
        (protos[0], "inference_descriptor.bin"),
        (protos[1], "admin_descriptor.bin"),
    ] {
        let fds = protox::compile([proto], ["."])?;
        std::fs::write(out.join(bin), prost::Message::encode_to_vec(&fds))?;
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
