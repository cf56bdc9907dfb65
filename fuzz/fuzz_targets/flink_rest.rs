//! The flink plugin's handling of Flink REST answers (`plugins/flink/src/api.rs` and
//! `metrics.rs`): one whole collection (`scrape`) against a fake JobManager whose answers
//! come from the input.
//!
//! Input: up to seven answers separated by a line `--` (`\n--\n`), one per kind of request,
//! in this order: `/overview`, `/jobs/overview`, `/jobs/<id>/metrics`,
//! `/jobs/<id>/checkpoints`, `/jobs/<id>`, `/jobs/<id>/vertices/<vid>/subtasks/metrics`,
//! `/jobs/<id>/vertices/<vid>/backpressure`. Every request of a kind gets that kind's answer.
//! An answer starting with `HTTP <status>\n` has that status, otherwise 200; a kind with no
//! answer fails as an unreachable server would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_fuzz::{check_plugin_families, first_line, split};
use picket_plugin_flink::metrics::MAX_NAME_BYTES;
use picket_plugin_flink::settings::Settings;
use picket_plugin_flink::{Http, Reply, api, scrape};

const BASE: &str = "http://jobmanager:8081";

struct Replay<'a> {
    answers: Vec<&'a [u8]>,
}

impl Replay<'_> {
    fn kind(path: &str) -> usize {
        let path = path.split('?').next().unwrap_or(path);
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            ["overview"] => 0,
            ["jobs", "overview"] => 1,
            ["jobs", _, "metrics"] => 2,
            ["jobs", _, "checkpoints"] => 3,
            ["jobs", _] => 4,
            ["jobs", _, "vertices", _, "subtasks", "metrics"] => 5,
            ["jobs", _, "vertices", _, "backpressure"] => 6,
            _ => panic!("the plugin asked for an unexpected path {path:?}"),
        }
    }
}

impl Http for Replay<'_> {
    fn get(&mut self, url: &str) -> Result<Reply, String> {
        let path = url
            .strip_prefix(BASE)
            .unwrap_or_else(|| panic!("the plugin asked another server: {url:?}"));
        let Some(answer) = self.answers.get(Self::kind(path)) else {
            return Err("connection refused".into());
        };
        let (first, rest) = first_line(answer);
        let status = std::str::from_utf8(first)
            .ok()
            .and_then(|line| line.strip_prefix("HTTP "))
            .and_then(|code| code.trim().parse::<u16>().ok());
        Ok(match status {
            Some(status) => Reply {
                status,
                body: rest.to_vec(),
            },
            None => Reply {
                status: 200,
                body: answer.to_vec(),
            },
        })
    }

    fn warn(&mut self, _message: &str) {}
}

fuzz_target!(|data: &[u8]| {
    let answers = split(data, b"\n--\n", 7);
    // A few jobs: every job multiplies the requests, and the limit is the same code for 4 or 20.
    let Ok(settings) = Settings::parse(&format!(
        r#"{{"url":"{BASE}/","cluster":"fuzz","backpressure":true,"max_jobs":4}}"#
    )) else {
        panic!("the fuzz settings are refused");
    };
    let mut http = Replay {
        answers: answers.clone(),
    };
    if let Ok(families) = scrape(&settings, &mut http) {
        check_plugin_families(&families);
        for family in &families {
            for sample in &family.samples {
                for label in &sample.labels {
                    assert!(
                        label.value.len() <= MAX_NAME_BYTES,
                        "{}: label {} is {} bytes",
                        family.name,
                        label.name,
                        label.value.len()
                    );
                }
            }
        }
    }
    for answer in answers {
        let _ = api::error_summary(answer);
    }
});
