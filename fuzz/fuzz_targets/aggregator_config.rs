//! The aggregator's config file (`aggregator/src/config.rs`) through the shared loader
//! (`lib/picket-core/src/config.rs`): TOML into `AggregatorConfig` with key paths and
//! positions in errors, then `validate`, the checks across keys, whose errors point into the
//! text. The input is the file's text.
//!
//! `validate` also reads files the config names (TLS PEMs, an InfluxDB password file): those
//! reads are turned off here (`tls.insecure`, no `password_file`), since a fuzzed path could
//! name `/dev/stdin` or `/dev/zero`. Checking that a file sink's directory exists stays.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_aggregator::config::{AggregatorConfig, validate};
use picket_core::config::parse;

const ORIGIN: &str = "/etc/picket/aggregator.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut config = match parse::<AggregatorConfig>(ORIGIN, text) {
        Ok(config) => config,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    config.tls.insecure = true;
    config.receivers.influxdb.password_file = None;
    if let Err(e) = validate(&config, ORIGIN, text) {
        let _ = e.to_string();
    }
    for sink in &config.sinks {
        let _ = sink.network();
    }
});
