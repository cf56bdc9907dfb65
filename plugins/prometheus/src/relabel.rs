//! Relabelling: what the operator keeps, drops and adds, applied to each target's families
//! before they are merged into one collection, and the merge itself.
//!
//! For each target, in this order (each step sees the result of the one before):
//!
//! 1. `keep_metrics` / `drop_metrics`: regexes on the family name. The name is the one the
//!    plugin emits: a histogram or summary by its base name (`foo`, not `foo_bucket`), a
//!    counter with its `_total`. When `keep_metrics` is non-empty a family must match one of
//!    its regexes; a family matching any `drop_metrics` regex is dropped.
//! 2. Labels are made safe for the agent, which refuses a whole collection otherwise, the way
//!    Prometheus treats scraped labels with `honor_labels: false`: a scraped `instance` (the
//!    agent's own label) is renamed `exported_instance`; the target label (`target_label`,
//!    value `host:port`) is added, and a scraped label of that name is renamed
//!    `exported_<name>`; labels starting with `__` are removed; labels with an empty value
//!    are removed, since Prometheus treats them as absent; values longer than
//!    `max_label_value_bytes` are cut at a character boundary.
//! 3. `keep_series` / `drop_series`: `{label, regex}` rules on label values, a missing label
//!    counting as "". A series is kept only if it matches *every* `keep_series` rule (like a
//!    chain of Prometheus `keep` actions) and is dropped if it matches *any* `drop_series`
//!    rule. They see the target label, so one instance can filter per target.
//! 4. `drop_labels`: those labels are removed. Default: `task_attempt_id` (see
//!    [`crate::settings::Settings::default`]).
//! 5. Timestamps are removed when `honor_timestamps` is false.
//!
//! Then [`Merger`] merges every target's families by name and collapses duplicate series,
//! which appear when dropped labels were all that told two series apart: the last one wins
//! (the newest in exposition order, e.g. Flink's new task attempt after its old one), and
//! each discarded series is counted against the target it came from.
//!
//! Regexes are anchored at both ends, as in Prometheus: `foo` matches only `foo`.

use std::collections::HashMap;

use picket_plugin_sdk::types::{Family, Label, MetricKind, Sample};
use regex_lite::Regex;

use crate::settings::{LabelMatch, Settings};

/// The compiled relabelling rules of one plugin instance.
#[derive(Debug)]
pub struct Rules {
    keep_metrics: Vec<Regex>,
    drop_metrics: Vec<Regex>,
    keep_series: Vec<LabelRule>,
    drop_series: Vec<LabelRule>,
    drop_labels: Vec<String>,
    max_label_value_bytes: usize,
    honor_timestamps: bool,
}

#[derive(Debug)]
struct LabelRule {
    label: String,
    regex: Regex,
}

impl LabelRule {
    fn matches(&self, labels: &[Label]) -> bool {
        let value = labels
            .iter()
            .find(|l| l.name == self.label)
            .map_or("", |l| l.value.as_str());
        self.regex.is_match(value)
    }
}

impl Rules {
    /// Compiles the settings' regexes; an invalid one is a configuration error naming it.
    pub fn from_settings(settings: &Settings) -> Result<Rules, String> {
        Ok(Rules {
            keep_metrics: compile_all("keep_metrics", &settings.keep_metrics)?,
            drop_metrics: compile_all("drop_metrics", &settings.drop_metrics)?,
            keep_series: compile_label_rules("keep_series", &settings.keep_series)?,
            drop_series: compile_label_rules("drop_series", &settings.drop_series)?,
            drop_labels: settings.drop_labels.clone(),
            max_label_value_bytes: settings.max_label_value_bytes,
            honor_timestamps: settings.honor_timestamps,
        })
    }

    /// Applies the rules to one target's families. `target` is the target label to add, if
    /// any. Families left without series are removed.
    pub fn apply(&self, mut families: Vec<Family>, target: Option<&Label>) -> Vec<Family> {
        families.retain(|f| self.keeps_family(&f.name));
        for family in &mut families {
            let samples = std::mem::take(&mut family.samples);
            family.samples = samples
                .into_iter()
                .filter_map(|sample| self.relabel_sample(sample, target))
                .collect();
        }
        families.retain(|f| !f.samples.is_empty());
        families
    }

    fn keeps_family(&self, name: &str) -> bool {
        let kept =
            self.keep_metrics.is_empty() || self.keep_metrics.iter().any(|r| r.is_match(name));
        kept && !self.drop_metrics.iter().any(|r| r.is_match(name))
    }

    fn relabel_sample(&self, mut sample: Sample, target: Option<&Label>) -> Option<Sample> {
        make_labels_safe(&mut sample.labels, target, self.max_label_value_bytes);
        if !self.keeps_series(&sample.labels) {
            return None;
        }
        sample
            .labels
            .retain(|l| !self.drop_labels.contains(&l.name));
        if !self.honor_timestamps {
            sample.timestamp_ms = None;
        }
        Some(sample)
    }

    fn keeps_series(&self, labels: &[Label]) -> bool {
        self.keep_series.iter().all(|r| r.matches(labels))
            && !self.drop_series.iter().any(|r| r.matches(labels))
    }
}

fn compile(setting: &str, pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("settings: {setting}: invalid regex {pattern:?}: {e}"))
}

fn compile_all(setting: &str, patterns: &[String]) -> Result<Vec<Regex>, String> {
    patterns.iter().map(|p| compile(setting, p)).collect()
}

fn compile_label_rules(setting: &str, rules: &[LabelMatch]) -> Result<Vec<LabelRule>, String> {
    rules
        .iter()
        .map(|rule| {
            Ok(LabelRule {
                label: rule.label.clone(),
                regex: compile(setting, &rule.regex)?,
            })
        })
        .collect()
}

/// Step 2 of the module doc: the labels the agent would refuse, or that would clash with the
/// ones it and this plugin add, are renamed, removed or cut.
pub fn make_labels_safe(labels: &mut Vec<Label>, target: Option<&Label>, max_value_bytes: usize) {
    labels.retain(|l| !l.value.is_empty() && !l.name.starts_with("__"));
    rename_clashing(labels, "instance");
    if let Some(target) = target {
        rename_clashing(labels, &target.name);
        labels.push(target.clone());
    }
    for label in labels.iter_mut() {
        truncate_at_char_boundary(&mut label.value, max_value_bytes);
    }
}

/// Renames a scraped label `name` to `exported_name` (more `exported_` prefixes while that
/// is taken too), as Prometheus does.
fn rename_clashing(labels: &mut [Label], name: &str) {
    let Some(position) = labels.iter().position(|l| l.name == name) else {
        return;
    };
    let mut renamed = format!("exported_{name}");
    while labels.iter().any(|l| l.name == renamed) {
        renamed.insert_str(0, "exported_");
    }
    labels[position].name = renamed;
}

fn truncate_at_char_boundary(text: &mut String, max_bytes: usize) {
    if text.len() <= max_bytes {
        return;
    }
    let mut cut = max_bytes;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
}

/// Why a family was not merged.
#[derive(Debug, Clone, PartialEq)]
pub struct KindConflict {
    pub family: String,
    pub kept: MetricKind,
    pub refused: MetricKind,
}

/// Merges the families of several targets by name, collapsing duplicate series.
pub struct Merger {
    families: Vec<Family>,
    by_name: HashMap<String, usize>,
    /// Per family: where each label set's series is.
    series: Vec<HashMap<LabelKey, Slot>>,
    duplicates: Vec<usize>,
}

/// A label set as an order-independent key.
type LabelKey = Vec<(String, String)>;

/// Where a merged series is: its index in the family's samples and the target it came from.
struct Slot {
    position: usize,
    target: usize,
}

/// What a merge produced.
pub struct Merged {
    pub families: Vec<Family>,
    /// Per target: series in `families` that came from it.
    pub kept: Vec<usize>,
    /// Per target: its series discarded for a later series with the same name and labels.
    pub duplicates: Vec<usize>,
}

impl Merger {
    pub fn new(targets: usize) -> Merger {
        Merger {
            families: Vec::new(),
            by_name: HashMap::new(),
            series: Vec::new(),
            duplicates: vec![0; targets],
        }
    }

    /// Adds one family from `target`. A family whose kind differs from an earlier family of
    /// the same name is refused whole: mixing them would give the agent values of the wrong
    /// kind.
    pub fn add(&mut self, target: usize, family: Family) -> Result<(), KindConflict> {
        let index = match self.by_name.get(&family.name) {
            Some(&index) => index,
            None => self.start_family(&family),
        };
        let existing = &mut self.families[index];
        if existing.kind != family.kind {
            return Err(KindConflict {
                family: family.name,
                kept: existing.kind,
                refused: family.kind,
            });
        }
        if existing.help.is_empty() {
            existing.help = family.help;
        }
        let series = &mut self.series[index];
        for sample in family.samples {
            let key = label_key(&sample.labels);
            match series.get_mut(&key) {
                Some(slot) => {
                    if let Some(count) = self.duplicates.get_mut(slot.target) {
                        *count += 1;
                    }
                    existing.samples[slot.position] = sample;
                    slot.target = target;
                }
                None => {
                    let position = existing.samples.len();
                    series.insert(key, Slot { position, target });
                    existing.samples.push(sample);
                }
            }
        }
        Ok(())
    }

    fn start_family(&mut self, family: &Family) -> usize {
        self.families.push(Family {
            name: family.name.clone(),
            kind: family.kind,
            help: String::new(),
            samples: Vec::new(),
        });
        self.series.push(HashMap::new());
        let index = self.families.len() - 1;
        self.by_name.insert(family.name.clone(), index);
        index
    }

    pub fn finish(self) -> Merged {
        let mut kept = vec![0; self.duplicates.len()];
        for series in &self.series {
            for slot in series.values() {
                if let Some(count) = kept.get_mut(slot.target) {
                    *count += 1;
                }
            }
        }
        let families = self
            .families
            .into_iter()
            .filter(|f| !f.samples.is_empty())
            .collect();
        Merged {
            families,
            kept,
            duplicates: self.duplicates,
        }
    }
}

fn label_key(labels: &[Label]) -> LabelKey {
    let mut key: LabelKey = labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect();
    key.sort();
    key
}

#[cfg(test)]
mod tests;
