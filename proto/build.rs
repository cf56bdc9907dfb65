//! Generates the `picket.v1` types and gRPC stubs from `picket/v1/ingest.proto`.
//!
//! The schema is parsed by `protox` (pure Rust) rather than a system `protoc`, so a fresh
//! machine and the cross builds need nothing but cargo.
//!
//! The server side of `Ingest` is generated separately, from a description in this file:
//! the aggregator reads each `AgentMessage` as a `ReceivedAgentMessage` (defined in
//! `src/received.rs`), which keeps a batch as the bytes the agent sent. The method's name,
//! route and streaming shape are the ones `ingest.proto` declares, so agents cannot tell.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "picket/v1/ingest.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors)?;

    let stream = tonic_build::manual::Method::builder()
        .name("stream")
        .route_name("Stream")
        .input_type("super::ReceivedAgentMessage")
        .output_type("super::Ack")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let ingest = tonic_build::manual::Service::builder()
        .name("Ingest")
        .package("picket.v1")
        .method(stream)
        .build();
    // Written as `picket.v1.Ingest.rs` next to the prost output.
    tonic_build::manual::Builder::new()
        .build_client(false)
        .build_server(true)
        .compile(&[ingest]);
    Ok(())
}
