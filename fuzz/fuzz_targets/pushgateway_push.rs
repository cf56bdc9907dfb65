//! A Pushgateway push as the aggregator's receiver reads it before it touches any group
//! (`aggregator/src/receivers/pushgateway.rs`): the path names the group, the exposition
//! parser reads the body, the grouping labels are added and the values checked.
//!
//! Input: the request path on the first line, the `Content-Type` on the second (empty: none),
//! the body after that. What comes out must be valid for the sinks, and every series must
//! carry the group's labels.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_aggregator::receivers::pushgateway::fuzzing::{parse_group, read_push};
use picket_fuzz::{check_model_families, first_line};

const NOW_MS: i64 = 1_700_000_123_456;

fuzz_target!(|data: &[u8]| {
    let (path, rest) = first_line(data);
    let (content_type, body) = first_line(rest);
    let (Ok(path), Ok(content_type)) =
        (std::str::from_utf8(path), std::str::from_utf8(content_type))
    else {
        return;
    };
    let content_type = (!content_type.is_empty()).then_some(content_type);
    let Ok(families) = read_push(path, content_type, body, NOW_MS) else {
        return;
    };
    check_model_families(&families);
    let Ok(group) = parse_group(path) else {
        panic!("{path:?}: the push was read but its path is refused");
    };
    for family in &families {
        for point in &family.points {
            for (name, value) in &group {
                assert_eq!(
                    point.labels.get(name),
                    Some(value.as_str()),
                    "{}{}: grouping label {name}",
                    family.name,
                    point.labels
                );
            }
        }
    }
});
