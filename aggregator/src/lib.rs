//! `picket-aggregator`: receives batches from Picket agents over gRPC (TLS by default, mutual
//! TLS for fleets) and serves them onwards.
//!
//! Module map: [`config`] reads `aggregator.toml`; [`server`] wires the listeners, signals and
//! housekeeping; [`grpc_listener`] accepts gRPC connections within their limits; [`ingest`] is
//! the gRPC stream handler; [`agents`] keeps per-agent state;
//! [`sinks`] is where accepted batches go ([`store`] backs `/metrics`); [`http`] serves health
//! and exposition; [`receivers`] take pushes (Pushgateway, InfluxDB `/write`) into the same
//! sinks; [`certs`] is the certificate tooling; [`identity`] reads agent names from
//! client certificates.

pub mod agents;
pub mod certs;
pub mod config;
pub mod grpc_listener;
pub mod grpc_zstd;
pub mod http;
pub mod identity;
pub mod ingest;
pub mod receivers;
pub mod server;
pub mod sinks;
pub mod store;
#[cfg(test)]
mod test_support;
pub mod tls_reload;
