//! Compiles the .proto files with protox (a protobuf compiler in Rust), so
//! building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/gpupool/peer/v1/peer.proto", "proto/gpupool/pool/v1/pool.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // The CLI prints Pool API answers as JSON or YAML as well as tables.
        .message_attribute(
            ".gpupool.pool.v1",
            "#[derive(serde::Serialize)] #[serde(rename_all = \"camelCase\")]",
        )
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
