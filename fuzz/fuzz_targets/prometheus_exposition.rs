//! The Prometheus text (0.0.4) and OpenMetrics (1.0.0) parser of the prometheus plugin
//! (`plugins/prometheus/src/parse.rs`), which reads every scrape and every Pushgateway push.
//! Each input is read in both formats. What parses must be what the parser promises: families
//! with samples, valid names, no label twice, and only values Picket's model can hold (the rest
//! goes to `invalid`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_fuzz::check_plugin_families;
use picket_plugin_prometheus::parse::{Format, parse, render_series};

fuzz_target!(|data: &[u8]| {
    for format in [Format::Text, Format::OpenMetrics] {
        match parse(data, format) {
            Ok(parsed) => {
                for family in &parsed.families {
                    assert!(!family.samples.is_empty(), "{} has no samples", family.name);
                    for sample in &family.samples {
                        let _ = render_series(&family.name, &sample.labels);
                    }
                }
                check_plugin_families(&parsed.families);
                for invalid in &parsed.invalid {
                    let _ = invalid.to_string();
                }
                let _ = parsed.series_count();
            }
            // The message goes to logs and to the pusher: rendering it must not fail.
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
