//! Checks the plugin's names against real node_exporter output (`fixtures/`, recorded with
//! `fixtures/record.sh`): every family the plugin reports must exist there with the same
//! type and the same label names, and the meminfo renaming must give exactly the
//! `node_memory_*` families node_exporter made from the same /proc/meminfo.

use std::collections::{BTreeMap, BTreeSet};

use picket_plugin_sdk::host::host_stats::Snapshot;
use picket_plugin_sdk::types::MetricKind;

use crate::metrics::tests::{cpu, disk, fs, mem, net, sensor, snapshot};
use crate::metrics::{families, meminfo_metric_name};
use crate::settings::Config;

const HOST: &str = include_str!("../fixtures/node-exporter.txt");
const SYSFS: &str = include_str!("../fixtures/node-exporter-sysfs.txt");
const MEMINFO: &str = include_str!("../fixtures/proc-meminfo.txt");

/// A family as node_exporter exposed it: its type and the label names of its first sample.
#[derive(Debug)]
struct Exposed {
    kind: String,
    labels: Option<BTreeSet<String>>,
}

/// Label names of one sample line (`name{a="x",b="y \" } z"} 1`).
fn label_names(line: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Some(open) = line.find('{') else {
        return names;
    };
    let mut chars = line[open + 1..].chars();
    let mut name = String::new();
    while let Some(c) = chars.next() {
        match c {
            '}' => break,
            '=' => {
                names.insert(std::mem::take(&mut name));
                // Skip the quoted value, minding escapes.
                let _ = chars.next();
                while let Some(v) = chars.next() {
                    match v {
                        '\\' => {
                            let _ = chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            ',' | ' ' => {}
            c => name.push(c),
        }
    }
    names
}

fn exposition(text: &str) -> BTreeMap<String, Exposed> {
    let mut out: BTreeMap<String, Exposed> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                out.insert(
                    name.to_owned(),
                    Exposed {
                        kind: kind.to_owned(),
                        labels: None,
                    },
                );
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default().to_owned();
            if let Some(family) = out.get_mut(&name)
                && family.labels.is_none()
            {
                family.labels = Some(label_names(line));
            }
        }
    }
    out
}

/// A snapshot in which every part is present and nothing is filtered away.
fn everything() -> Snapshot {
    let mut s = snapshot();
    s.cpus = vec![
        cpu("0", 0.0, Some(1_500_000_000)),
        cpu("1", 0.0, Some(600_000_000)),
    ];
    s.memory = MEMINFO
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| mem(name, 1))
        .collect();
    s.filesystems = vec![fs("/dev/vda", "/", "ext4")];
    s.disks = vec![disk("vda")];
    s.networks = vec![net("eth0")];
    s.hwmon = vec![
        sensor("coretemp", "temp1", Some("Package id 0"), 51.0),
        sensor("cpu_thermal", "temp1", None, 48.0),
    ];
    s
}

#[test]
fn label_parsing() {
    let names = label_names(r#"x{a="1",b="p \" } , c=",c_d="ok"} 1"#);
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["a", "b", "c_d"]);
    assert!(label_names("x 1").is_empty());
}

#[test]
fn every_family_matches_node_exporter() {
    let mut exposed = exposition(HOST);
    exposed.extend(exposition(SYSFS));
    let out = families(&everything(), &Config::default());
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    let mut checked = 0;
    for family in &out.families {
        if family.name.starts_with("picket_") {
            continue;
        }
        let Some(theirs) = exposed.get(&family.name) else {
            panic!("{} is not in node_exporter's output", family.name);
        };
        let kind = match family.kind {
            MetricKind::Gauge => "gauge",
            MetricKind::Counter => "counter",
            other => panic!("{}: unexpected kind {other:?}", family.name),
        };
        assert_eq!(kind, theirs.kind, "{}: type", family.name);
        let ours: BTreeSet<String> = family
            .samples
            .first()
            .map(|s| s.labels.iter().map(|l| l.name.clone()).collect())
            .unwrap_or_default();
        assert_eq!(
            Some(&ours),
            theirs.labels.as_ref(),
            "{}: label names",
            family.name
        );
        checked += 1;
    }
    // cpu 2 + load 3 + memory 54 + filesystem 6 + disk 11 + network 8 + stat 6 + hwmon 3 +
    // thermal 1.
    let memory = MEMINFO.lines().filter(|l| l.contains(':')).count();
    assert_eq!(checked, 2 + 3 + memory + 6 + 11 + 8 + 6 + 3 + 1);
}

#[test]
fn meminfo_names_are_exactly_node_exporters() {
    let ours: BTreeSet<String> = MEMINFO
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter_map(|(name, _)| meminfo_metric_name(name))
        .collect();
    let theirs: BTreeSet<String> = exposition(HOST)
        .into_keys()
        .filter(|name| name.starts_with("node_memory_"))
        .collect();
    assert!(ours.len() > 40, "{ours:?}");
    assert_eq!(ours, theirs);
}
