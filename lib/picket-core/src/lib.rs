//! What Picket's agent and aggregator truly share.
//!
//! - [`model`]: the in-memory metric model (families, series, points) both sides work on;
//! - [`codec`]: turning model families into `picket.v1` batches and back, with validation;
//! - [`exposition`]: Prometheus text format output (`picket-agent once`, the aggregator's
//!   `/metrics`);
//! - [`config`]: TOML config loading whose errors name the file, line, key and what to write;
//! - [`tls`]: reading PEM certificates and keys with errors an operator can act on;
//! - [`logging`]: tracing set-up whose level can be changed on SIGHUP.

pub mod codec;
pub mod config;
pub mod exposition;
pub mod logging;
pub mod model;
pub mod secret;
pub mod tls;
