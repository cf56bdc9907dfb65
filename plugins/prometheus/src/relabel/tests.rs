use picket_plugin_sdk::types::Value;

use super::*;
use crate::parse::{Format, parse, parse_str};

fn rules(json: &str) -> Rules {
    Rules::from_settings(&Settings::from_json(json).unwrap()).unwrap()
}

fn label(name: &str, value: &str) -> Label {
    Label {
        name: name.into(),
        value: value.into(),
    }
}

fn families(body: &str) -> Vec<Family> {
    parse_str(body, Format::Text).unwrap().families
}

fn names(families: &[Family]) -> Vec<&str> {
    families.iter().map(|f| f.name.as_str()).collect()
}

fn labels(sample: &Sample) -> Vec<(&str, &str)> {
    sample
        .labels
        .iter()
        .map(|l| (l.name.as_str(), l.value.as_str()))
        .collect()
}

fn number(sample: &Sample) -> f64 {
    match sample.value {
        Value::Number(v) => v,
        ref other => panic!("not a number: {other:?}"),
    }
}

fn target() -> Label {
    label("target", "127.0.0.1:9249")
}

#[test]
fn metric_regexes_are_anchored_keep_is_any_of_and_drop_wins() {
    let body = "flink_a 1\nflink_b 2\nnot_flink 3\nflink 4\n";
    let kept = rules(r#"{"keep_metrics":["flink_.*"]}"#).apply(families(body), None);
    assert_eq!(names(&kept), ["flink_a", "flink_b"]);
    let kept = rules(r#"{"keep_metrics":["flink_a","flink"]}"#).apply(families(body), None);
    assert_eq!(names(&kept), ["flink_a", "flink"]);
    let kept = rules(r#"{"drop_metrics":["flink_.*"]}"#).apply(families(body), None);
    assert_eq!(names(&kept), ["not_flink", "flink"]);
    let kept = rules(r#"{"keep_metrics":["flink_.*"],"drop_metrics":["flink_b"]}"#)
        .apply(families(body), None);
    assert_eq!(names(&kept), ["flink_a"]);
    let kept = rules(r#"{"drop_metrics":["flink|flink_a"]}"#).apply(families(body), None);
    assert_eq!(
        names(&kept),
        ["flink_b", "not_flink"],
        "alternation is anchored as a whole"
    );
}

#[test]
fn metric_rules_see_the_emitted_family_names() {
    let body = "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 1\n";
    assert!(
        rules(r#"{"drop_metrics":["h"]}"#)
            .apply(families(body), None)
            .is_empty()
    );
    let kept = rules(r#"{"drop_metrics":["h_bucket"]}"#).apply(families(body), None);
    assert_eq!(names(&kept), ["h"]);
}

#[test]
fn keep_series_rules_must_all_match_and_any_drop_series_rule_drops() {
    let body = "m{job=\"a\",env=\"prod\"} 1\nm{job=\"b\",env=\"prod\"} 2\nm{job=\"a\",env=\"dev\"} 3\nm 4\n";
    let value_of = |json: &str| -> Vec<f64> {
        rules(json)
            .apply(families(body), None)
            .iter()
            .flat_map(|f| f.samples.iter().map(number))
            .collect()
    };
    assert_eq!(
        value_of(r#"{"keep_series":[{"label":"job","regex":"a"}]}"#),
        [1.0, 3.0]
    );
    assert_eq!(
        value_of(r#"{"keep_series":[{"label":"job","regex":"a"},{"label":"env","regex":"prod"}]}"#),
        [1.0]
    );
    assert_eq!(
        value_of(r#"{"drop_series":[{"label":"job","regex":"b"},{"label":"env","regex":"dev"}]}"#),
        [1.0, 4.0]
    );
    // A missing label has the value "", as in Prometheus.
    assert_eq!(
        value_of(r#"{"keep_series":[{"label":"job","regex":""}]}"#),
        [4.0]
    );
    assert_eq!(
        value_of(r#"{"drop_series":[{"label":"job","regex":""}]}"#),
        [1.0, 2.0, 3.0]
    );
    assert_eq!(
        value_of(r#"{"keep_series":[{"label":"job","regex":"a|b"}]}"#),
        [1.0, 2.0, 3.0]
    );
    assert_eq!(
        value_of(r#"{"keep_series":[{"label":"job","regex":"."}]}"#),
        [1.0, 2.0, 3.0]
    );
    assert_eq!(
        value_of(r#"{"keep_series":[{"label":"env","regex":"pro"}]}"#),
        [] as [f64; 0],
        "anchored"
    );
}

#[test]
fn series_rules_see_the_target_label() {
    let body = "m 1\n";
    let kept = rules(r#"{"drop_series":[{"label":"target","regex":".*:9249"}]}"#)
        .apply(families(body), Some(&target()));
    assert!(kept.is_empty());
    let kept = rules(r#"{"drop_series":[{"label":"target","regex":".*:9250"}]}"#)
        .apply(families(body), Some(&target()));
    assert_eq!(kept.len(), 1);
}

#[test]
fn drop_labels_defaults_to_task_attempt_id_and_runs_after_the_series_rules() {
    let body = "m{task_attempt_id=\"abc\",tm_id=\"t1\",subtask_index=\"0\"} 1\n";
    let kept = rules("{}").apply(families(body), None);
    assert_eq!(
        labels(&kept[0].samples[0]),
        [("tm_id", "t1"), ("subtask_index", "0")]
    );
    let kept = rules(
        r#"{"drop_labels":["tm_id","subtask_index"],
        "keep_series":[{"label":"tm_id","regex":"t1"}]}"#,
    )
    .apply(families(body), None);
    assert_eq!(labels(&kept[0].samples[0]), [("task_attempt_id", "abc")]);
    let kept = rules(r#"{"drop_labels":[]}"#).apply(families(body), None);
    assert_eq!(kept[0].samples[0].labels.len(), 3);
}

#[test]
fn the_target_label_is_added_and_a_scraped_one_is_renamed() {
    let body = "m{a=\"1\"} 1\nn{target=\"theirs\"} 2\n";
    let kept = rules("{}").apply(families(body), Some(&target()));
    assert_eq!(
        labels(&kept[0].samples[0]),
        [("a", "1"), ("target", "127.0.0.1:9249")]
    );
    assert_eq!(
        labels(&kept[1].samples[0]),
        [("exported_target", "theirs"), ("target", "127.0.0.1:9249")]
    );
}

#[test]
fn labels_the_agent_would_refuse_are_made_safe() {
    let mut labels_ = vec![
        label("instance", "theirs"),
        label("exported_instance", "older"),
        label("__meta", "x"),
        label("empty", ""),
        label("long", &"ü".repeat(10)),
        label("ok", "1"),
    ];
    make_labels_safe(&mut labels_, None, 6);
    let got: Vec<(&str, &str)> = labels_
        .iter()
        .map(|l| (l.name.as_str(), l.value.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("exported_exported_instance", "theirs"),
            ("exported_instance", "older"),
            ("long", "üüü"),
            ("ok", "1"),
        ]
    );
}

#[test]
fn long_values_are_cut_at_a_character_boundary() {
    for (value, max, expected) in [
        ("abcdef", 3, "abc"),
        ("温度計", 4, "温"),
        ("温度計", 6, "温度"),
        ("🚀🚀", 3, ""),
        ("short", 4096, "short"),
    ] {
        let mut labels_ = vec![label("v", value)];
        make_labels_safe(&mut labels_, None, max);
        let got = labels_.first().map_or("", |l| l.value.as_str());
        assert_eq!(got, expected, "{value} cut to {max}");
    }
}

#[test]
fn timestamps_are_dropped_unless_honored() {
    let body = "m 1 1700000000000\n";
    let kept = rules("{}").apply(families(body), None);
    assert_eq!(kept[0].samples[0].timestamp_ms, Some(1_700_000_000_000));
    let kept = rules(r#"{"honor_timestamps":false}"#).apply(families(body), None);
    assert_eq!(kept[0].samples[0].timestamp_ms, None);
}

#[test]
fn invalid_regexes_are_configuration_errors_naming_the_setting() {
    for (json, setting) in [
        (r#"{"keep_metrics":["("]}"#, "keep_metrics"),
        (r#"{"drop_metrics":["a","[z-a]"]}"#, "drop_metrics"),
        (
            r#"{"keep_series":[{"label":"a","regex":"*"}]}"#,
            "keep_series",
        ),
        (
            r#"{"drop_series":[{"label":"a","regex":"(?P<"}]}"#,
            "drop_series",
        ),
    ] {
        let e = Rules::from_settings(&Settings::from_json(json).unwrap()).unwrap_err();
        assert!(e.contains(setting), "{e}");
        assert!(e.contains("invalid regex"), "{e}");
    }
}

// ---- Merging ---------------------------------------------------------------------------------

#[test]
fn duplicates_collapse_to_the_last_and_count_against_the_discarded_series_target() {
    let mut merger = Merger::new(2);
    for f in families("m{a=\"1\"} 1\nm{a=\"2\"} 2\nm{a=\"1\"} 3\n") {
        merger.add(0, f).unwrap();
    }
    for f in families("m{a=\"2\"} 4\nn 5\n") {
        merger.add(1, f).unwrap();
    }
    let merged = merger.finish();
    assert_eq!(names(&merged.families), ["m", "n"]);
    let m = &merged.families[0];
    assert_eq!(m.samples.len(), 2);
    assert_eq!(
        (labels(&m.samples[0]), number(&m.samples[0])),
        (vec![("a", "1")], 3.0)
    );
    assert_eq!(
        (labels(&m.samples[1]), number(&m.samples[1])),
        (vec![("a", "2")], 4.0)
    );
    assert_eq!(merged.duplicates, [2, 0]);
    assert_eq!(merged.kept, [1, 2]);
}

#[test]
fn label_order_does_not_hide_a_duplicate() {
    let mut merger = Merger::new(1);
    for f in families("m{a=\"1\",b=\"2\"} 1\nm{b=\"2\",a=\"1\"} 2\n") {
        merger.add(0, f).unwrap();
    }
    let merged = merger.finish();
    assert_eq!(merged.families[0].samples.len(), 1);
    assert_eq!(merged.duplicates, [1]);
}

#[test]
fn families_of_another_kind_are_refused_and_help_is_filled_in() {
    let mut merger = Merger::new(2);
    for f in families("# TYPE m gauge\nm 1\nh 1\n") {
        merger.add(0, f).unwrap();
    }
    let mut second =
        families("# TYPE m counter\nm 2\n# HELP h Help from the second.\nh 3\n").into_iter();
    let conflict = merger.add(1, second.next().unwrap()).unwrap_err();
    assert_eq!(
        conflict,
        KindConflict {
            family: "m".into(),
            kept: MetricKind::Gauge,
            refused: MetricKind::Counter,
        }
    );
    merger.add(1, second.next().unwrap()).unwrap();
    let merged = merger.finish();
    assert_eq!(number(&merged.families[0].samples[0]), 1.0);
    assert_eq!(merged.families[1].help, "Help from the second.");
}

#[test]
fn a_flink_restart_collapses_onto_the_new_attempt_once_task_attempt_id_is_dropped() {
    // During a failover both attempts of a subtask can briefly be registered.
    let body = concat!(
        "# TYPE flink_taskmanager_job_task_numRecordsIn gauge\n",
        "flink_taskmanager_job_task_numRecordsIn{job_id=\"j\",task_attempt_id=\"old\",tm_id=\"t\",subtask_index=\"0\",} 500.0\n",
        "flink_taskmanager_job_task_numRecordsIn{job_id=\"j\",task_attempt_id=\"new\",tm_id=\"t\",subtask_index=\"0\",} 3.0\n",
        "flink_taskmanager_job_task_numRecordsIn{job_id=\"j\",task_attempt_id=\"x\",tm_id=\"t\",subtask_index=\"1\",} 7.0\n",
    );
    let mut merger = Merger::new(1);
    for f in rules("{}").apply(families(body), Some(&target())) {
        merger.add(0, f).unwrap();
    }
    let merged = merger.finish();
    let samples = &merged.families[0].samples;
    assert_eq!(samples.len(), 2);
    assert_eq!(number(&samples[0]), 3.0);
    assert_eq!(
        labels(&samples[0]),
        [
            ("job_id", "j"),
            ("tm_id", "t"),
            ("subtask_index", "0"),
            ("target", "127.0.0.1:9249")
        ]
    );
    assert_eq!(merged.duplicates, [1]);
    assert_eq!(merged.kept, [2]);
}

#[test]
fn the_flink_fixture_relabels_without_collisions() {
    let path = format!(
        "{}/fixtures/flink-taskmanager.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let parsed = parse(&std::fs::read(path).unwrap(), Format::Text).unwrap();
    let before = parsed.series_count();
    let mut merger = Merger::new(1);
    for f in rules("{}").apply(parsed.families, Some(&target())) {
        merger.add(0, f).unwrap();
    }
    let merged = merger.finish();
    assert_eq!(merged.kept, [before]);
    assert_eq!(merged.duplicates, [0]);
    for f in &merged.families {
        for s in &f.samples {
            assert!(!s.labels.iter().any(|l| l.name == "task_attempt_id"));
            assert!(s.labels.iter().any(|l| l.name == "tm_id"));
            assert_eq!(s.labels.last(), Some(&target()));
        }
    }
}
