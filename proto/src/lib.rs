//! Picket's wire protocol: the `picket.v1` gRPC service between agents and aggregators.
//!
//! The schema lives in `picket/v1/ingest.proto`; how it may evolve is in `EVOLUTION.md`.
//! This crate only holds generated code; converting between the wire form and Picket's
//! metric model is `picket_core::codec`.

/// Version 1 of the protocol.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("picket.v1");
}

/// The protocol revision this build speaks, sent in `Hello.protocol_revision`.
pub const PROTOCOL_REVISION: u32 = 1;
