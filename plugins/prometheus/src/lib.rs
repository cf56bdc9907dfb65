//! Picket's first-party **prometheus** plugin: scrapes Prometheus text (0.0.4) and
//! OpenMetrics endpoints through the `http` capability — Apache Flink's PrometheusReporter,
//! node_exporter, or any other exporter — and hands their metrics to the agent.
//!
//! ```toml
//! [[plugins.instances]]
//! name = "flink-reporters"
//! plugin = "prometheus"
//! timeout = "20s"   # covers every target of a collection, scraped one after another
//! settings = { targets = ["http://127.0.0.1:9250-9251/metrics"] }
//! grants = { http = { allow = ["http://127.0.0.1:9250/", "http://127.0.0.1:9251/"] } }
//! ```
//!
//! Settings are described in [`settings`], relabelling in [`relabel`], parsing in [`parse`];
//! `README.md` beside this crate is the operator's summary.
//!
//! # One collection
//!
//! Each target is fetched with an `Accept` header preferring OpenMetrics 1.0.0, then text
//! 0.0.4; the response's `Content-Type` picks the parser (text when in doubt). Its families
//! are relabelled, then all targets' families are merged by name with duplicate series
//! collapsed (see [`relabel`]).
//!
//! What happens when a target fails depends on whose problem it is:
//!
//! - **The target is down** (connection refused, timeout, an HTTP status other than 2xx, a
//!   body over the grant's `max_bytes`): not an error. The target gets
//!   `picket_scrape_up 0` and the other targets are reported as usual; unused ports of a
//!   Flink port range are expected to be down. The agent log says when a target goes down
//!   (with the reason) and when it comes back.
//! - **The exposition is malformed** (one bad line): `collect` fails with an error naming the
//!   target, the line number and what is wrong. Prometheus fails the scrape on one bad line
//!   too; a partly read exposition would silently lose series, and a broken exporter is
//!   something the operator needs to see (the agent counts the error and logs it).
//! - **The request is outside the grants** (`denied`): `collect` fails naming the missing
//!   grant, since nothing will change until the operator fixes the configuration.
//!
//! Series that parse but cannot be represented (see [`parse`]) are left out, counted in
//! `picket_scrape_invalid_series` and logged when they first appear.
//!
//! # The plugin's own metrics
//!
//! One series per target, labelled with the target label (`target` when that is disabled):
//!
//! | gauge | meaning |
//! |---|---|
//! | `picket_scrape_up` | 1 when the target was scraped and parsed, 0 when it was down |
//! | `picket_scrape_duration_seconds` | time to fetch, parse and relabel it |
//! | `picket_scrape_samples_scraped` | series it exposed (a histogram or summary counts once) |
//! | `picket_scrape_samples` | of those, series in this collection after relabelling and de-duplication |
//! | `picket_scrape_duplicate_series` | its series discarded because a later one had the same name and labels |
//! | `picket_scrape_invalid_series` | its series left out because Picket cannot represent them |
//!
//! The duration uses the monotonic clock of WASI (`wasi:clocks`), which the agent's sandbox
//! links for every plugin; it needs no grant.

pub mod parse;
pub mod relabel;
pub mod settings;

use std::cell::RefCell;
use std::collections::HashSet;
use std::time::Instant;

use picket_plugin_sdk::families::FamilyBuilder;
use picket_plugin_sdk::host::http::Response;
use picket_plugin_sdk::host::{http, log};
use picket_plugin_sdk::types::{Capability, Description, Family, HostError, Label, MetricKind};
use picket_plugin_sdk::{Guest, error_message, export};

use crate::parse::{Format, Parsed};
use crate::relabel::{Merger, Rules};
use crate::settings::{Settings, TargetUrl, expand_targets};

/// The label on the plugin's own metrics when `target_label` is empty.
const FALLBACK_TARGET_LABEL: &str = "target";

thread_local! {
    /// The instance's scraper, built by `init`, used by every `collect`.
    static SCRAPER: RefCell<Option<Scraper>> = const { RefCell::new(None) };
}

struct Prometheus;

impl Guest for Prometheus {
    fn describe() -> Description {
        Description {
            name: "prometheus".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![Capability::Http, Capability::Log],
            default_settings: Settings::default_json(),
        }
    }

    fn init(settings: String) -> Result<(), String> {
        let scraper = Scraper::new(Settings::from_json(&settings)?)?;
        log::write(log::Level::Info, &scraper.summary());
        SCRAPER.with(|s| *s.borrow_mut() = Some(scraper));
        Ok(())
    }

    fn collect() -> Result<Vec<Family>, String> {
        SCRAPER.with(|s| {
            let mut scraper = s.borrow_mut();
            let scraper = scraper
                .as_mut()
                .ok_or("collect was called before a successful init")?;
            let collection = scraper.collect(&mut |url, headers| http::get(url, headers));
            for (level, message) in &collection.logs {
                log::write(*level, message);
            }
            collection.result
        })
    }
}

export!(Prometheus);

/// Fetches a URL with request headers; the host's `http::get` in the plugin, a fake in tests.
pub type Fetch<'a> = dyn FnMut(&str, &[(String, String)]) -> Result<Response, HostError> + 'a;

/// The result of one collection, and what to log about it.
pub struct Collection {
    pub result: Result<Vec<Family>, String>,
    pub logs: Vec<(log::Level, String)>,
}

/// One configured target and what the last collections said about it.
struct Target {
    url: TargetUrl,
    /// None before the first collection.
    was_up: Option<bool>,
    /// Whether its invalid series were logged (reset once it has none).
    invalid_logged: bool,
}

/// What one target's scrape gave.
#[derive(Default)]
struct TargetReport {
    up: bool,
    duration_seconds: f64,
    scraped: usize,
    invalid: usize,
}

/// Why a target's scrape failed.
enum Failure {
    /// The target is unreachable or unhealthy; reported as `picket_scrape_up 0`.
    Down(String),
    /// Fails the whole collection.
    Fatal(String),
}

/// Scrapes an instance's targets; built from its settings by `init`.
pub struct Scraper {
    targets: Vec<Target>,
    rules: Rules,
    target_label: String,
    /// Families whose kind conflict between targets was logged already.
    conflicts_logged: HashSet<String>,
}

impl Scraper {
    pub fn new(settings: Settings) -> Result<Scraper, String> {
        let rules = Rules::from_settings(&settings)?;
        let targets = expand_targets(&settings.targets)?
            .into_iter()
            .map(|url| Target {
                url,
                was_up: None,
                invalid_logged: false,
            })
            .collect();
        Ok(Scraper {
            targets,
            rules,
            target_label: settings.target_label,
            conflicts_logged: HashSet::new(),
        })
    }

    /// A line for the log at start: what will be scraped.
    pub fn summary(&self) -> String {
        let urls: Vec<&str> = self.targets.iter().map(|t| t.url.url.as_str()).collect();
        format!("scraping {} target(s): {}", urls.len(), urls.join(", "))
    }

    pub fn collect(&mut self, fetch: &mut Fetch) -> Collection {
        let mut logs = Vec::new();
        let result = self.collect_logging(fetch, &mut logs);
        Collection { result, logs }
    }

    fn collect_logging(
        &mut self,
        fetch: &mut Fetch,
        logs: &mut Vec<(log::Level, String)>,
    ) -> Result<Vec<Family>, String> {
        let mut merger = Merger::new(self.targets.len());
        let mut reports = Vec::with_capacity(self.targets.len());
        for index in 0..self.targets.len() {
            let started = Instant::now();
            let mut report = TargetReport::default();
            match fetch_and_parse(&self.targets[index].url.url, fetch) {
                Err(Failure::Fatal(message)) => return Err(message),
                Err(Failure::Down(reason)) => self.note_down(index, &reason, logs),
                Ok(parsed) => {
                    report.up = true;
                    report.scraped = parsed.series_count();
                    report.invalid = parsed.invalid.len();
                    self.note_up(index, &parsed, logs);
                    self.merge(index, parsed.families, &mut merger, logs);
                }
            }
            report.duration_seconds = started.elapsed().as_secs_f64();
            reports.push(report);
        }
        let merged = merger.finish();
        let mut families = merged.families;
        let own = self.own_metrics(&reports, &merged.kept, &merged.duplicates);
        // A scraped family that happens to share a name with ours would mix two meanings.
        families.retain(|f| !own.iter().any(|o| o.name == f.name));
        families.extend(own);
        Ok(families)
    }

    fn target_label(&self, index: usize) -> Option<Label> {
        (!self.target_label.is_empty()).then(|| Label {
            name: self.target_label.clone(),
            value: self.targets[index].url.label.clone(),
        })
    }

    fn merge(
        &mut self,
        index: usize,
        families: Vec<Family>,
        merger: &mut Merger,
        logs: &mut Vec<(log::Level, String)>,
    ) {
        let target_label = self.target_label(index);
        for family in self.rules.apply(families, target_label.as_ref()) {
            let Err(conflict) = merger.add(index, family) else {
                continue;
            };
            if self.conflicts_logged.insert(conflict.family.clone()) {
                logs.push((
                    log::Level::Warn,
                    format!(
                        "{}: family {} is a {} here but a {} at an earlier target; \
                         it is left out for this target",
                        self.targets[index].url.url,
                        conflict.family,
                        kind_name(conflict.refused),
                        kind_name(conflict.kept)
                    ),
                ));
            }
        }
    }

    /// Logs a target going down (once, not every collection).
    fn note_down(&mut self, index: usize, reason: &str, logs: &mut Vec<(log::Level, String)>) {
        let target = &mut self.targets[index];
        if target.was_up != Some(false) {
            // Unused ports of a range are down by design; say so quietly.
            let level = if target.url.from_range {
                log::Level::Info
            } else {
                log::Level::Warn
            };
            logs.push((level, format!("{} is down: {reason}", target.url.url)));
        }
        target.was_up = Some(false);
    }

    /// Logs a target coming back, and its invalid series when they first appear.
    fn note_up(&mut self, index: usize, parsed: &Parsed, logs: &mut Vec<(log::Level, String)>) {
        let target = &mut self.targets[index];
        if target.was_up == Some(false) {
            logs.push((log::Level::Info, format!("{} is up again", target.url.url)));
        }
        target.was_up = Some(true);
        match parsed.invalid.first() {
            Some(first) if !target.invalid_logged => {
                logs.push((
                    log::Level::Warn,
                    format!(
                        "{}: {} series left out because Picket cannot represent them \
                         (counted in picket_scrape_invalid_series); the first: {first}",
                        target.url.url,
                        parsed.invalid.len()
                    ),
                ));
                target.invalid_logged = true;
            }
            Some(_) => {}
            None => target.invalid_logged = false,
        }
    }

    fn own_metrics(
        &self,
        reports: &[TargetReport],
        kept: &[usize],
        duplicates: &[usize],
    ) -> Vec<Family> {
        let label = if self.target_label.is_empty() {
            FALLBACK_TARGET_LABEL
        } else {
            &self.target_label
        };
        let mut up = FamilyBuilder::gauge(
            "picket_scrape_up",
            "1 when the target was scraped and parsed, 0 when it was down.",
        );
        let mut duration = FamilyBuilder::gauge(
            "picket_scrape_duration_seconds",
            "Time taken to fetch, parse and relabel the target.",
        );
        let mut scraped = FamilyBuilder::gauge(
            "picket_scrape_samples_scraped",
            "Series the target exposed (a histogram or summary counts once).",
        );
        let mut samples = FamilyBuilder::gauge(
            "picket_scrape_samples",
            "Series from the target in this collection, after relabelling and de-duplication.",
        );
        let mut duplicate = FamilyBuilder::gauge(
            "picket_scrape_duplicate_series",
            "Series from the target discarded because a later one had the same name and labels.",
        );
        let mut invalid = FamilyBuilder::gauge(
            "picket_scrape_invalid_series",
            "Series from the target left out because Picket cannot represent them.",
        );
        let count = |values: &[usize], index: usize| values.get(index).copied().unwrap_or(0) as f64;
        for (index, (target, report)) in self.targets.iter().zip(reports).enumerate() {
            let labels = [(label, target.url.label.as_str())];
            up.sample(&labels, if report.up { 1.0 } else { 0.0 });
            duration.sample(&labels, report.duration_seconds);
            scraped.sample(&labels, report.scraped as f64);
            samples.sample(&labels, count(kept, index));
            duplicate.sample(&labels, count(duplicates, index));
            invalid.sample(&labels, report.invalid as f64);
        }
        [up, duration, scraped, samples, duplicate, invalid]
            .into_iter()
            .map(FamilyBuilder::build)
            .collect()
    }
}

fn kind_name(kind: MetricKind) -> &'static str {
    match kind {
        MetricKind::Untyped => "untyped",
        MetricKind::Gauge => "gauge",
        MetricKind::Counter => "counter",
        MetricKind::Summary => "summary",
        MetricKind::Histogram => "histogram",
    }
}

fn fetch_and_parse(url: &str, fetch: &mut Fetch) -> Result<Parsed, Failure> {
    let headers = [("Accept".to_owned(), parse::ACCEPT.to_owned())];
    let response = fetch(url, &headers).map_err(|e| classify_host_error(url, &e))?;
    if !(200..300).contains(&response.status) {
        return Err(Failure::Down(format!("HTTP status {}", response.status)));
    }
    let content_type = response
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.as_str());
    parse::parse(&response.body, Format::from_content_type(content_type))
        .map_err(|e| Failure::Fatal(format!("{url}: {e}")))
}

fn classify_host_error(url: &str, error: &HostError) -> Failure {
    match error {
        HostError::Denied(_) => Failure::Fatal(format!("{url}: {}", error_message(error))),
        HostError::TooLarge => Failure::Down(format!(
            "{} (raise http.max_bytes in the instance's grants)",
            error_message(error)
        )),
        HostError::Timeout | HostError::Failed(_) => Failure::Down(error_message(error)),
    }
}

#[cfg(test)]
mod tests;
