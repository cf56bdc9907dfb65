//! The InfluxDB line protocol parser of the aggregator's `/write` receiver
//! (`aggregator/src/receivers/influx_line.rs`). The input is a request body; it is read with
//! nanosecond precision (the default) and with one picked by the input's length. Whatever it
//! makes must be valid for the sinks: Prometheus names, unreserved label names, one point per
//! counted sample, errors that name a line of the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_aggregator::receivers::influx_line::{Precision, parse};
use picket_fuzz::check_model_families;

const PRECISIONS: [Precision; 6] = [
    Precision::Nanoseconds,
    Precision::Microseconds,
    Precision::Milliseconds,
    Precision::Seconds,
    Precision::Minutes,
    Precision::Hours,
];

/// 2023-11-14T22:15:23.456Z, as the receiver's clock would say.
const NOW_MS: i64 = 1_700_000_123_456;

fuzz_target!(|data: &[u8]| {
    let physical_lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
    for precision in [
        Precision::Nanoseconds,
        PRECISIONS[data.len() % PRECISIONS.len()],
    ] {
        let parsed = parse(data, precision, NOW_MS);
        check_model_families(&parsed.families);
        let points: usize = parsed.families.iter().map(|f| f.points.len()).sum();
        assert_eq!(points, parsed.points);
        for family in &parsed.families {
            assert!(!family.points.is_empty(), "{} has no points", family.name);
        }
        let mut previous = 0;
        for error in &parsed.errors {
            assert!(
                error.line > previous && error.line <= physical_lines,
                "error on line {} of {physical_lines} (after {previous})",
                error.line
            );
            previous = error.line;
            assert!(error.excerpt.chars().count() <= 101, "{:?}", error.excerpt);
        }
    }
});
