//! Generates the `picket.v1` types and gRPC stubs from `picket/v1/ingest.proto`.
//!
//! The schema is parsed by `protox` (pure Rust) rather than a system `protoc`, so a fresh
//! machine and the cross builds need nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "picket/v1/ingest.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
