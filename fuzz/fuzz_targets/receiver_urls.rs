//! What the push receivers decode from request URLs (`aggregator/src/receivers/`): the
//! Pushgateway path (`/metrics/job/<job>{/<label>/<value>}`, with `%XX` escapes and
//! `<label>@base64/<value>` segments), and `percent_decode`, `decode_base64`, `query_param`
//! and `Precision::from_param` on the input as a whole. `percent_decode` and `decode_base64`
//! must also give back any text encoded by the encoders below.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_aggregator::receivers::influx_line::Precision;
use picket_aggregator::receivers::pushgateway::fuzzing::parse_group;
use picket_aggregator::receivers::{decode_base64, percent_decode, query_param};
use picket_core::model::is_valid_label_name;

/// URL-safe base64 without padding (RFC 4648 §5), as Prometheus clients write `@base64` values.
fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let mut group = [0u8; 3];
        group[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from(group[0]) << 16 | u32::from(group[1]) << 8 | u32::from(group[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// `%XX` for every byte outside `[A-Za-z0-9._~-]`.
fn encode_percent(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || b"._~-".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(group) = parse_group(text) {
        assert!(
            group.get("job").is_some_and(|job| !job.is_empty()),
            "{text:?}: no job in {group:?}"
        );
        for name in group.keys() {
            assert!(
                is_valid_label_name(name) && !name.starts_with("__"),
                "{text:?}: grouping label {name:?}"
            );
        }
    }
    let _ = percent_decode(text);
    let _ = decode_base64(text);
    for name in ["db", "precision", "u", "p"] {
        let _ = query_param(Some(text), name);
    }
    let _ = Precision::from_param(Some(text));

    assert_eq!(
        decode_base64(&encode_base64(data)).as_deref(),
        Some(text),
        "base64 round trip"
    );
    assert_eq!(
        decode_base64(&format!("{}==", encode_base64(data))).as_deref(),
        Some(text),
        "padded base64 round trip"
    );
    assert_eq!(
        percent_decode(&encode_percent(text)).as_deref(),
        Some(text),
        "percent round trip"
    );
});
