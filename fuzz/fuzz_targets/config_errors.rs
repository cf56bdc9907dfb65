//! The shared config loader's error locating (`lib/picket-core/src/config.rs`): any TOML
//! text, parsed into a small strict config (unknown keys refused, as in every Picket config),
//! and `ConfigError::at_key` for a key path taken from the input, which finds the key's line
//! and column in the text. Positions must lie inside the text.
//!
//! Input: a dotted key path on the first line (`sinks.1.url`), the TOML text after it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_core::config::{ConfigError, parse};
use picket_fuzz::first_line;
use serde::Deserialize;

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Strict {
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    listen: Option<std::net::SocketAddr>,
    #[serde(default)]
    tls: Option<Tls>,
    #[serde(default)]
    sinks: Vec<Sink>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tls {
    ca: Option<String>,
    insecure: Option<bool>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
enum Sink {
    File {
        path: String,
    },
    Network {
        url: String,
        concurrency: Option<u32>,
    },
}

fn check_position(error: &ConfigError, text: &str) {
    let rendered = error.to_string();
    let Some((line, column)) = error.position else {
        return;
    };
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        line >= 1 && line <= lines.len().max(1),
        "line {line} of {}: {rendered}",
        lines.len()
    );
    let length = lines.get(line - 1).map_or(0, |l| l.chars().count());
    assert!(
        column >= 1 && column <= length + 1,
        "column {column} of a {length}-character line: {rendered}"
    );
}

fuzz_target!(|data: &[u8]| {
    let (path, text) = first_line(data);
    let (Ok(path), Ok(text)) = (std::str::from_utf8(path), std::str::from_utf8(text)) else {
        return;
    };
    if let Err(e) = parse::<Strict>("fuzz.toml", text) {
        check_position(&e, text);
    }
    if let Err(e) = parse::<toml::Table>("fuzz.toml", text) {
        check_position(&e, text);
    }
    let key_path: Vec<&str> = path.split('.').collect();
    let error = ConfigError::at_key("fuzz.toml", text, &key_path, "fuzz");
    check_position(&error, text);
});
