//! Flink REST responses → metric families. Pure functions: no I/O, so every rule here is
//! tested natively against recorded responses (`fixtures/`).
//!
//! Conventions: names start with `flink_`; durations are converted to seconds and sizes are
//! bytes, except Flink's own `*TimeMsPerSecond` gauges, which keep Flink's unit so they read
//! like the Flink docs and web UI. Cumulative counts (restarts, checkpoints, records) are
//! counters with `_total`. A value Flink reports as `NaN` (busy time of a source, for one) is
//! left out rather than emitted: a NaN sample poisons every `sum`/`avg` over it in PromQL.
//!
//! Cardinality stays bounded by construction: per-job series only for unfinished jobs (at most
//! `max_jobs`, see [`select_jobs`]), per-vertex series only for running vertices of RUNNING
//! jobs, states and levels from fixed lists, and long names cut to [`MAX_NAME_BYTES`].

use picket_plugin_sdk::families::FamilyBuilder;
use picket_plugin_sdk::types::Family;

use crate::api::{
    AggregatedMetric, Backpressure, Checkpoints, JobSummary, MetricValue, Overview, truncate,
};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// A metric this plugin emits: the single place its name, type and help text live.
#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

macro_rules! spec {
    ($id:ident, $name:literal, $kind:ident, $help:literal) => {
        pub const $id: Spec = Spec {
            name: $name,
            kind: Kind::$kind,
            help: $help,
        };
    };
}

spec!(
    INFO,
    "flink_info",
    Gauge,
    "Flink version and commit of the JobManager; always 1."
);
spec!(
    TASKMANAGERS,
    "flink_taskmanagers",
    Gauge,
    "TaskManagers registered with the JobManager."
);
spec!(
    SLOTS,
    "flink_task_slots",
    Gauge,
    "Task slots of all registered TaskManagers."
);
spec!(
    SLOTS_AVAILABLE,
    "flink_task_slots_available",
    Gauge,
    "Task slots not in use."
);
spec!(
    JOBS,
    "flink_jobs",
    Gauge,
    "Jobs the JobManager knows, by state (finished ones until they expire from its job store)."
);
spec!(
    JOBS_SKIPPED,
    "flink_jobs_skipped",
    Gauge,
    "Unfinished jobs without per-job series because of the max_jobs setting."
);
spec!(
    JOB_STATE,
    "flink_job_state",
    Gauge,
    "1 for the job's current state (the state label)."
);
spec!(
    JOB_UPTIME,
    "flink_job_uptime_seconds",
    Gauge,
    "Time the job has been running since its last (re)start."
);
spec!(
    JOB_RESTARTS,
    "flink_job_restarts_total",
    Counter,
    "Restarts of the job since submission (numRestarts)."
);
spec!(
    CHECKPOINTS_COMPLETED,
    "flink_job_checkpoints_completed_total",
    Counter,
    "Checkpoints completed."
);
spec!(
    CHECKPOINTS_FAILED,
    "flink_job_checkpoints_failed_total",
    Counter,
    "Checkpoints failed (including ones that could not be triggered)."
);
spec!(
    CHECKPOINTS_RESTORED,
    "flink_job_checkpoints_restored_total",
    Counter,
    "Times the job was restored from a checkpoint."
);
spec!(
    CHECKPOINTS_IN_PROGRESS,
    "flink_job_checkpoints_in_progress",
    Gauge,
    "Checkpoints in progress."
);
spec!(
    LAST_CHECKPOINT_DURATION,
    "flink_job_last_checkpoint_duration_seconds",
    Gauge,
    "End-to-end duration of the latest completed checkpoint."
);
spec!(
    LAST_CHECKPOINT_SIZE,
    "flink_job_last_checkpoint_size_bytes",
    Gauge,
    "Bytes written by the latest completed checkpoint (the increment for incremental checkpoints)."
);
spec!(
    LAST_CHECKPOINT_FULL_SIZE,
    "flink_job_last_checkpoint_full_size_bytes",
    Gauge,
    "Full state size of the latest completed checkpoint."
);
spec!(
    LAST_CHECKPOINT_TIME,
    "flink_job_last_checkpoint_timestamp_seconds",
    Gauge,
    "Unix time the latest completed checkpoint was acknowledged."
);
spec!(
    VERTEX_PARALLELISM,
    "flink_vertex_parallelism",
    Gauge,
    "Parallelism (subtasks) of the vertex."
);
spec!(
    VERTEX_BUSY,
    "flink_vertex_busy_time_ms_per_second",
    Gauge,
    "Milliseconds per second the vertex's subtasks are busy, avg and max over subtasks."
);
spec!(
    VERTEX_IDLE,
    "flink_vertex_idle_time_ms_per_second",
    Gauge,
    "Milliseconds per second the vertex's subtasks are idle, avg and max over subtasks."
);
spec!(
    VERTEX_BACKPRESSURED,
    "flink_vertex_backpressured_time_ms_per_second",
    Gauge,
    "Milliseconds per second the vertex's subtasks are back-pressured, avg and max over subtasks."
);
spec!(
    VERTEX_RECORDS_IN,
    "flink_vertex_records_in_total",
    Counter,
    "Records received by the vertex, summed over subtasks."
);
spec!(
    VERTEX_RECORDS_OUT,
    "flink_vertex_records_out_total",
    Counter,
    "Records emitted by the vertex, summed over subtasks."
);
spec!(
    VERTEX_BACKPRESSURE_LEVEL,
    "flink_vertex_backpressure_level",
    Gauge,
    "1 for the vertex's back-pressure level as Flink rates it (ok, low, high), 0 for the others."
);
spec!(
    VERTEX_BACKPRESSURE_RATIO,
    "flink_vertex_backpressure_ratio",
    Gauge,
    "Highest back-pressured time ratio (0..1) of the vertex's subtasks."
);
spec!(
    SCRAPE_ERRORS,
    "flink_scrape_errors",
    Gauge,
    "Flink REST requests that failed in this collection, by endpoint (404 for a job that just went away does not count)."
);

/// Every metric, in output order.
pub const ALL: &[&Spec] = &[
    &INFO,
    &TASKMANAGERS,
    &SLOTS,
    &SLOTS_AVAILABLE,
    &JOBS,
    &JOBS_SKIPPED,
    &JOB_STATE,
    &JOB_UPTIME,
    &JOB_RESTARTS,
    &CHECKPOINTS_COMPLETED,
    &CHECKPOINTS_FAILED,
    &CHECKPOINTS_RESTORED,
    &CHECKPOINTS_IN_PROGRESS,
    &LAST_CHECKPOINT_DURATION,
    &LAST_CHECKPOINT_SIZE,
    &LAST_CHECKPOINT_FULL_SIZE,
    &LAST_CHECKPOINT_TIME,
    &VERTEX_PARALLELISM,
    &VERTEX_BUSY,
    &VERTEX_IDLE,
    &VERTEX_BACKPRESSURED,
    &VERTEX_RECORDS_IN,
    &VERTEX_RECORDS_OUT,
    &VERTEX_BACKPRESSURE_LEVEL,
    &VERTEX_BACKPRESSURE_RATIO,
    &SCRAPE_ERRORS,
];

/// Job and vertex names are user text of any length (DataStream operator names can embed whole
/// SQL plans); cut them so one odd name cannot hit the agent's label-size cap.
pub const MAX_NAME_BYTES: usize = 256;

/// Flink's job states (`JobStatus`), lower-cased as label values. Always emitted in
/// `flink_jobs`, with 0 when no job is in them, so alerts on e.g. `state="failed"` have a
/// series to compare.
pub const JOB_STATES: &[&str] = &[
    "initializing",
    "created",
    "running",
    "failing",
    "failed",
    "cancelling",
    "canceled",
    "finished",
    "restarting",
    "suspended",
    "reconciling",
];

/// States after which a job never runs again; such jobs get no per-job series.
const TERMINAL_STATES: &[&str] = &["finished", "canceled", "failed"];

/// Flink's back-pressure levels.
pub const BACKPRESSURE_LEVELS: &[&str] = &["ok", "low", "high"];

/// The per-vertex metrics fetched from `.../subtasks/metrics?get=` (Flink's names).
pub const VERTEX_METRIC_IDS: &[&str] = &[
    "busyTimeMsPerSecond",
    "idleTimeMsPerSecond",
    "backPressuredTimeMsPerSecond",
    "numRecordsIn",
    "numRecordsOut",
];

/// The job metrics fetched from `/jobs/<id>/metrics?get=`.
pub const JOB_METRIC_IDS: &[&str] = &["uptime", "numRestarts"];

/// A job state as a label value: lower case, `[a-z0-9_]`, at most 32 bytes, `unknown` when
/// missing. A state from a newer Flink keeps its own name.
pub fn state_label(state: Option<&str>) -> String {
    let state = state.unwrap_or("").trim();
    if state.is_empty() {
        return "unknown".to_owned();
    }
    state
        .chars()
        .take(32)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether a job in this state (as [`state_label`] renders it) is done for good.
pub fn is_terminal(state: &str) -> bool {
    TERMINAL_STATES.contains(&state)
}

/// The jobs that get per-job series: unfinished ones (unknown states included, in case a new
/// Flink state means "still alive"), oldest first so long-running streaming jobs keep their
/// series when a burst of new jobs exceeds `max_jobs`. Returns them and how many were left out.
pub fn select_jobs(jobs: &[JobSummary], max_jobs: usize) -> (Vec<&JobSummary>, usize) {
    let mut alive: Vec<&JobSummary> = jobs
        .iter()
        .filter(|job| job.jid.as_deref().is_some_and(|id| !id.is_empty()))
        .filter(|job| !is_terminal(&state_label(job.state.as_deref())))
        .collect();
    alive.sort_by(|a, b| {
        let a_start = a.start_time.unwrap_or(f64::MAX);
        let b_start = b.start_time.unwrap_or(f64::MAX);
        a_start.total_cmp(&b_start).then_with(|| a.jid.cmp(&b.jid))
    });
    let skipped = alive.len().saturating_sub(max_jobs);
    alive.truncate(max_jobs);
    (alive, skipped)
}

/// Labels identifying a job.
#[derive(Debug, Clone, Copy)]
pub struct JobRef<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

/// Labels identifying a vertex of a job.
#[derive(Debug, Clone, Copy)]
pub struct VertexRef<'a> {
    pub job: JobRef<'a>,
    pub id: &'a str,
    pub name: &'a str,
}

impl JobRef<'_> {
    fn labels(&self) -> Vec<(&'static str, String)> {
        vec![
            ("job_id", self.id.to_owned()),
            ("job_name", truncate(self.name, MAX_NAME_BYTES).to_owned()),
        ]
    }
}

impl VertexRef<'_> {
    fn labels(&self) -> Vec<(&'static str, String)> {
        let mut labels = self.job.labels();
        labels.push(("vertex_id", self.id.to_owned()));
        labels.push(("vertex", truncate(self.name, MAX_NAME_BYTES).to_owned()));
        labels
    }
}

/// The REST endpoints whose failures are counted in `flink_scrape_errors`. `/overview` is not
/// among them: when it fails the whole collection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    JobsOverview,
    Job,
    JobMetrics,
    JobCheckpoints,
    VertexMetrics,
    VertexBackpressure,
}

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::JobsOverview,
        Endpoint::Job,
        Endpoint::JobMetrics,
        Endpoint::JobCheckpoints,
        Endpoint::VertexMetrics,
        Endpoint::VertexBackpressure,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::JobsOverview => "jobs_overview",
            Endpoint::Job => "job",
            Endpoint::JobMetrics => "job_metrics",
            Endpoint::JobCheckpoints => "job_checkpoints",
            Endpoint::VertexMetrics => "vertex_metrics",
            Endpoint::VertexBackpressure => "vertex_backpressure",
        }
    }
}

/// Failed requests of one collection, per endpoint.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ScrapeErrors {
    counts: [u32; Endpoint::ALL.len()],
}

impl ScrapeErrors {
    pub fn add(&mut self, endpoint: Endpoint) {
        let i = endpoint as usize;
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    pub fn get(&self, endpoint: Endpoint) -> u32 {
        self.counts[endpoint as usize]
    }

    pub fn total(&self) -> u32 {
        self.counts.iter().sum()
    }
}

/// The families of one collection, filled response by response.
pub struct Families {
    cluster: Option<String>,
    builders: Vec<(&'static Spec, FamilyBuilder)>,
}

impl Families {
    /// `cluster`: the value of a `cluster` label put first on every sample, if any.
    pub fn new(cluster: Option<&str>) -> Self {
        Families {
            cluster: cluster.map(str::to_owned),
            builders: ALL
                .iter()
                .map(|spec| {
                    let builder = match spec.kind {
                        Kind::Gauge => FamilyBuilder::gauge(spec.name, spec.help),
                        Kind::Counter => FamilyBuilder::counter(spec.name, spec.help),
                    };
                    (*spec, builder)
                })
                .collect(),
        }
    }

    /// Adds a sample unless the value is missing, NaN or infinite (see the module docs).
    fn add(&mut self, spec: &Spec, labels: &[(&'static str, String)], value: Option<f64>) {
        let Some(value) = value.filter(|v| v.is_finite()) else {
            return;
        };
        let Some((_, builder)) = self
            .builders
            .iter_mut()
            .find(|(candidate, _)| candidate.name == spec.name)
        else {
            return;
        };
        let mut refs: Vec<(&str, &str)> = Vec::with_capacity(labels.len() + 1);
        if let Some(cluster) = &self.cluster {
            refs.push(("cluster", cluster));
        }
        refs.extend(labels.iter().map(|(name, value)| (*name, value.as_str())));
        builder.sample(&refs, value);
    }

    /// The non-empty families, in [`ALL`] order.
    pub fn finish(self) -> Vec<Family> {
        self.builders
            .into_iter()
            .filter(|(_, builder)| !builder.is_empty())
            .map(|(_, builder)| builder.build())
            .collect()
    }

    /// `/overview`: version, TaskManagers and slots.
    pub fn overview(&mut self, overview: &Overview) {
        if let Some(version) = &overview.flink_version {
            let commit = overview.flink_commit.clone().unwrap_or_default();
            let labels = [
                ("version", truncate(version, 64).to_owned()),
                ("commit", truncate(&commit, 64).to_owned()),
            ];
            self.add(&INFO, &labels, Some(1.0));
        }
        self.add(&TASKMANAGERS, &[], overview.taskmanagers);
        self.add(&SLOTS, &[], overview.slots_total);
        self.add(&SLOTS_AVAILABLE, &[], overview.slots_available);
    }

    /// `/jobs/overview`: jobs per state. Every known state is present; unknown ones are added.
    pub fn jobs_by_state(&mut self, jobs: &[JobSummary]) {
        let mut counts: Vec<(String, f64)> =
            JOB_STATES.iter().map(|s| ((*s).to_owned(), 0.0)).collect();
        for job in jobs {
            let state = state_label(job.state.as_deref());
            match counts.iter_mut().find(|(s, _)| *s == state) {
                Some((_, n)) => *n += 1.0,
                None => counts.push((state, 1.0)),
            }
        }
        for (state, n) in counts {
            self.add(&JOBS, &[("state", state)], Some(n));
        }
    }

    pub fn jobs_skipped(&mut self, skipped: usize) {
        self.add(&JOBS_SKIPPED, &[], Some(skipped as f64));
    }

    pub fn job_state(&mut self, job: JobRef, state: Option<&str>) {
        let mut labels = job.labels();
        labels.push(("state", state_label(state)));
        self.add(&JOB_STATE, &labels, Some(1.0));
    }

    /// `/jobs/<id>/metrics?get=uptime,numRestarts`.
    pub fn job_metrics(&mut self, job: JobRef, metrics: &[MetricValue]) {
        let labels = job.labels();
        for metric in metrics {
            match metric.id.as_deref() {
                // Milliseconds; Flink reports -1 for a job that is no longer running.
                Some("uptime") => {
                    let seconds = metric.value.filter(|v| *v >= 0.0).map(|ms| ms / 1000.0);
                    self.add(&JOB_UPTIME, &labels, seconds);
                }
                Some("numRestarts") => {
                    self.add(&JOB_RESTARTS, &labels, metric.value.filter(|v| *v >= 0.0));
                }
                _ => {}
            }
        }
    }

    /// `/jobs/<id>/checkpoints`. Counts come from here rather than the job metrics: these are
    /// seconds old at most, while metric values are answered from a cache that the request
    /// itself only starts refreshing (see the README, "Freshness").
    pub fn checkpoints(&mut self, job: JobRef, checkpoints: &Checkpoints) {
        let labels = job.labels();
        if let Some(counts) = &checkpoints.counts {
            self.add(&CHECKPOINTS_COMPLETED, &labels, counts.completed);
            self.add(&CHECKPOINTS_FAILED, &labels, counts.failed);
            self.add(&CHECKPOINTS_RESTORED, &labels, counts.restored);
            self.add(&CHECKPOINTS_IN_PROGRESS, &labels, counts.in_progress);
        }
        let latest = checkpoints
            .latest
            .as_ref()
            .and_then(|l| l.completed.as_ref());
        if let Some(done) = latest {
            let ms_to_s = |ms: Option<f64>| ms.filter(|v| *v >= 0.0).map(|v| v / 1000.0);
            self.add(
                &LAST_CHECKPOINT_DURATION,
                &labels,
                ms_to_s(done.end_to_end_duration),
            );
            self.add(
                &LAST_CHECKPOINT_SIZE,
                &labels,
                done.checkpointed_size.filter(|v| *v >= 0.0),
            );
            self.add(
                &LAST_CHECKPOINT_FULL_SIZE,
                &labels,
                done.state_size.filter(|v| *v >= 0.0),
            );
            // 0 or less means "not known"; a 1970 timestamp would fire every staleness alert.
            let acked = done.latest_ack_timestamp.filter(|v| *v > 0.0);
            self.add(&LAST_CHECKPOINT_TIME, &labels, ms_to_s(acked));
        }
    }

    pub fn vertex(&mut self, vertex: VertexRef, parallelism: Option<f64>) {
        self.add(&VERTEX_PARALLELISM, &vertex.labels(), parallelism);
    }

    /// `/jobs/<id>/vertices/<vid>/subtasks/metrics?get=...` (aggregated over subtasks).
    pub fn vertex_metrics(&mut self, vertex: VertexRef, metrics: &[AggregatedMetric]) {
        let labels = vertex.labels();
        let with_stat = |stat: &str| {
            let mut l = labels.clone();
            l.push(("stat", stat.to_owned()));
            l
        };
        for metric in metrics {
            let time_spec = match metric.id.as_deref() {
                Some("busyTimeMsPerSecond") => Some(&VERTEX_BUSY),
                Some("idleTimeMsPerSecond") => Some(&VERTEX_IDLE),
                Some("backPressuredTimeMsPerSecond") => Some(&VERTEX_BACKPRESSURED),
                Some("numRecordsIn") => {
                    self.add(&VERTEX_RECORDS_IN, &labels, metric.sum);
                    None
                }
                Some("numRecordsOut") => {
                    self.add(&VERTEX_RECORDS_OUT, &labels, metric.sum);
                    None
                }
                _ => None,
            };
            if let Some(spec) = time_spec {
                self.add(spec, &with_stat("avg"), metric.avg);
                self.add(spec, &with_stat("max"), metric.max);
            }
        }
    }

    /// `/jobs/<id>/vertices/<vid>/backpressure`. Skipped unless Flink says the numbers are
    /// ready (`status: ok`); an unknown level is skipped rather than guessed.
    pub fn backpressure(&mut self, vertex: VertexRef, backpressure: &Backpressure) {
        if backpressure.status.as_deref() != Some("ok") {
            return;
        }
        let labels = vertex.labels();
        if let Some(level) = backpressure.level().map(str::to_ascii_lowercase)
            && BACKPRESSURE_LEVELS.contains(&level.as_str())
        {
            for candidate in BACKPRESSURE_LEVELS {
                let mut l = labels.clone();
                l.push(("level", (*candidate).to_owned()));
                let value = if *candidate == level { 1.0 } else { 0.0 };
                self.add(&VERTEX_BACKPRESSURE_LEVEL, &l, Some(value));
            }
        }
        let worst = backpressure
            .subtasks
            .iter()
            .filter_map(|s| s.ratio.filter(|r| r.is_finite()))
            .reduce(f64::max);
        self.add(&VERTEX_BACKPRESSURE_RATIO, &labels, worst);
    }

    pub fn scrape_errors(&mut self, errors: &ScrapeErrors) {
        for endpoint in Endpoint::ALL {
            let labels = [("endpoint", endpoint.label().to_owned())];
            self.add(
                &SCRAPE_ERRORS,
                &labels,
                Some(f64::from(errors.get(endpoint))),
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{self, JobDetails, JobsOverview};
    use picket_plugin_sdk::types::{MetricKind, Value};

    /// Recorded from a real Flink 2.3 cluster (tests/flink/record-fixtures.sh).
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../fixtures/", $name)).as_bytes()
        };
    }
    pub(crate) use fixture;

    pub const JOB_ID: &str = "7c997992b172a4a842aa7460f6969a66";
    pub const SOURCE_ID: &str = "bc764cd8ddf7a0cff126f51c16239658";
    pub const CALC_ID: &str = "0a448493b4782967b150582570326227";
    pub const SINK_ID: &str = "ea632d67b7d595e5b851708ae9ad79d6";

    /// The value of the one sample of `name` whose labels include all of `labels`.
    pub fn value(families: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = families.iter().find(|f| f.name == name)?;
        let matching: Vec<f64> = family
            .samples
            .iter()
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|l| l.name == *k && l.value == *v))
            })
            .map(|s| match s.value {
                Value::Number(n) => n,
                _ => panic!("{name}: not a number"),
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?}: {} samples",
            matching.len()
        );
        matching.first().copied()
    }

    pub fn samples(families: &[Family], name: &str) -> usize {
        families
            .iter()
            .find(|f| f.name == name)
            .map_or(0, |f| f.samples.len())
    }

    fn job() -> JobRef<'static> {
        JobRef {
            id: JOB_ID,
            name: "picket-datagen-blackhole",
        }
    }

    fn vertex(id: &'static str, name: &'static str) -> VertexRef<'static> {
        VertexRef {
            job: job(),
            id,
            name,
        }
    }

    #[test]
    fn specs_are_well_formed_and_unique() {
        for (i, spec) in ALL.iter().enumerate() {
            assert!(spec.name.starts_with("flink_"), "{}", spec.name);
            assert!(
                spec.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                spec.name
            );
            assert_eq!(
                spec.kind == Kind::Counter,
                spec.name.ends_with("_total"),
                "{}",
                spec.name
            );
            assert!(!spec.help.is_empty());
            assert!(
                ALL[..i].iter().all(|other| other.name != spec.name),
                "{}",
                spec.name
            );
        }
    }

    #[test]
    fn readme_documents_every_metric() {
        let readme = include_str!("../README.md");
        for spec in ALL {
            assert!(
                readme.contains(&format!("`{}`", spec.name)),
                "{} missing from README",
                spec.name
            );
        }
    }

    #[test]
    fn overview_fixture() {
        let overview: Overview = api::parse(fixture!("overview.json")).unwrap();
        let mut out = Families::new(None);
        out.overview(&overview);
        let f = out.finish();
        assert_eq!(value(&f, "flink_taskmanagers", &[]), Some(1.0));
        assert_eq!(value(&f, "flink_task_slots", &[]), Some(2.0));
        assert_eq!(value(&f, "flink_task_slots_available", &[]), Some(0.0));
        assert_eq!(
            value(
                &f,
                "flink_info",
                &[("version", "2.3.0"), ("commit", "c0f8d1a")]
            ),
            Some(1.0)
        );
        let kinds: Vec<bool> = f
            .iter()
            .map(|f| matches!(f.kind, MetricKind::Gauge))
            .collect();
        assert!(kinds.iter().all(|g| *g));

        let cancelled: Overview = api::parse(fixture!("overview-cancelled.json")).unwrap();
        let mut out = Families::new(None);
        out.overview(&cancelled);
        let f = out.finish();
        assert_eq!(value(&f, "flink_task_slots_available", &[]), Some(2.0));
    }

    #[test]
    fn cluster_label_goes_first_on_every_sample() {
        let overview: Overview = api::parse(fixture!("overview.json")).unwrap();
        let mut out = Families::new(Some("prod"));
        out.overview(&overview);
        out.scrape_errors(&ScrapeErrors::default());
        for family in out.finish() {
            for sample in &family.samples {
                assert_eq!(sample.labels[0].name, "cluster", "{}", family.name);
                assert_eq!(sample.labels[0].value, "prod");
            }
        }
    }

    #[test]
    fn jobs_overview_fixtures_count_by_state() {
        let running: JobsOverview = api::parse(fixture!("jobs-overview.json")).unwrap();
        assert_eq!(running.jobs.len(), 1);
        assert_eq!(running.jobs[0].jid.as_deref(), Some(JOB_ID));
        assert_eq!(
            running.jobs[0].name.as_deref(),
            Some("picket-datagen-blackhole")
        );
        assert_eq!(running.jobs[0].start_time, Some(1_795_299_906_909.0));
        let mut out = Families::new(None);
        out.jobs_by_state(&running.jobs);
        let f = out.finish();
        assert_eq!(value(&f, "flink_jobs", &[("state", "running")]), Some(1.0));
        assert_eq!(value(&f, "flink_jobs", &[("state", "canceled")]), Some(0.0));
        assert_eq!(samples(&f, "flink_jobs"), JOB_STATES.len());

        let cancelled: JobsOverview = api::parse(fixture!("jobs-overview-cancelled.json")).unwrap();
        let mut out = Families::new(None);
        out.jobs_by_state(&cancelled.jobs);
        let f = out.finish();
        assert_eq!(value(&f, "flink_jobs", &[("state", "running")]), Some(0.0));
        assert_eq!(value(&f, "flink_jobs", &[("state", "canceled")]), Some(1.0));
        // A cancelled job gets no per-job series.
        let (selected, skipped) = select_jobs(&cancelled.jobs, 10);
        assert!(selected.is_empty());
        assert_eq!(skipped, 0);
    }

    #[test]
    fn unknown_and_missing_states_get_their_own_label() {
        let jobs: JobsOverview = api::parse(
            br#"{"jobs":[{"jid":"a1","state":"TELEPORTING"},{"jid":"a2"},{"jid":"a3","state":"Weird State!"},{"jid":"a4","state":7}]}"#,
        )
        .unwrap();
        let mut out = Families::new(None);
        out.jobs_by_state(&jobs.jobs);
        let f = out.finish();
        assert_eq!(
            value(&f, "flink_jobs", &[("state", "teleporting")]),
            Some(1.0)
        );
        assert_eq!(value(&f, "flink_jobs", &[("state", "unknown")]), Some(1.0));
        assert_eq!(
            value(&f, "flink_jobs", &[("state", "weird_state_")]),
            Some(1.0)
        );
        assert_eq!(value(&f, "flink_jobs", &[("state", "7")]), Some(1.0));
        assert_eq!(state_label(Some(&"X".repeat(100))).len(), 32);
    }

    #[test]
    fn select_jobs_keeps_unfinished_oldest_first_up_to_max() {
        let jobs: JobsOverview = api::parse(
            br#"{"jobs":[
                {"jid":"c","state":"RUNNING","start-time":300},
                {"jid":"a","state":"RESTARTING","start-time":100},
                {"jid":"f","state":"FAILED","start-time":50},
                {"jid":"b","state":"NEW_STATE","start-time":200},
                {"state":"RUNNING","start-time":1},
                {"jid":"d","state":"RUNNING"}
            ]}"#,
        )
        .unwrap();
        let (selected, skipped) = select_jobs(&jobs.jobs, 3);
        let ids: Vec<&str> = selected.iter().filter_map(|j| j.jid.as_deref()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(skipped, 1, "d, without a start time, sorts last");
        let (selected, skipped) = select_jobs(&jobs.jobs, 0);
        assert!(selected.is_empty());
        assert_eq!(skipped, 4);
    }

    #[test]
    fn job_metrics_fixture() {
        let metrics: Vec<MetricValue> = api::parse_list(fixture!("job-metrics.json")).unwrap();
        let find = |id: &str| {
            metrics
                .iter()
                .find(|m| m.id.as_deref() == Some(id))
                .and_then(|m| m.value)
        };
        // Values arrive as strings and still parse.
        assert_eq!(find("uptime"), Some(50739.0));
        assert_eq!(find("numberOfCompletedCheckpoints"), Some(25.0));
        assert_eq!(
            find("lastCheckpointRestoreTimestamp"),
            Some(1_795_299_907_506.0)
        );
        let mut out = Families::new(None);
        out.job_metrics(job(), &metrics);
        let f = out.finish();
        let labels = [("job_id", JOB_ID), ("job_name", "picket-datagen-blackhole")];
        assert_eq!(value(&f, "flink_job_uptime_seconds", &labels), Some(50.739));
        assert_eq!(value(&f, "flink_job_restarts_total", &labels), Some(0.0));

        let after: Vec<MetricValue> =
            api::parse_list(fixture!("job-metrics-cancelled.json")).unwrap();
        assert_eq!(after.len(), 2);
    }

    #[test]
    fn requested_metric_names_exist_in_flink() {
        // The names this plugin asks for, checked against Flink's own lists of available
        // metrics (`.../metrics` without `get`).
        let job: Vec<MetricValue> = api::parse_list(fixture!("job-metrics-list.json")).unwrap();
        let job_ids: Vec<&str> = job.iter().filter_map(|m| m.id.as_deref()).collect();
        assert_eq!(job_ids.len(), 26);
        for id in JOB_METRIC_IDS {
            assert!(job_ids.contains(id), "{id}");
        }
        // Vertex-scope ids carry the subtask index.
        let vertex: Vec<MetricValue> =
            api::parse_list(fixture!("vertex-source-metrics-list.json")).unwrap();
        let vertex_ids: Vec<&str> = vertex.iter().filter_map(|m| m.id.as_deref()).collect();
        for id in VERTEX_METRIC_IDS {
            assert!(vertex_ids.contains(&format!("0.{id}").as_str()), "{id}");
            assert!(
                !vertex_ids.contains(id),
                "{id} is only known with a subtask prefix"
            );
        }
        let tm: Vec<MetricValue> =
            api::parse_list(fixture!("taskmanager-metrics-list.json")).unwrap();
        assert!(
            tm.iter()
                .any(|m| m.id.as_deref() == Some("Status.JVM.Memory.Heap.Used"))
        );
        assert!(tm.iter().all(|m| m.value.is_none()));
    }

    #[test]
    fn per_subtask_vertex_metric_fixtures() {
        // Not what the plugin requests (it uses the aggregated form), but the same shape.
        let calc: Vec<MetricValue> = api::parse_list(fixture!("vertex-calc-metrics.json")).unwrap();
        let find = |list: &[MetricValue], id: &str| {
            list.iter()
                .find(|m| m.id.as_deref() == Some(id))
                .and_then(|m| m.value)
        };
        assert_eq!(find(&calc, "0.numRecordsIn"), Some(50000.0));
        assert_eq!(find(&calc, "1.numRecordsOut"), Some(25134.0));
        assert_eq!(find(&calc, "0.numRecordsOut"), Some(25051.0));
        let source: Vec<MetricValue> =
            api::parse_list(fixture!("vertex-source-metrics.json")).unwrap();
        assert!(find(&source, "0.busyTimeMsPerSecond").is_some_and(f64::is_nan));
        assert_eq!(find(&source, "1.numRecordsOut"), Some(50000.0));
        let sink: Vec<MetricValue> = api::parse_list(fixture!("vertex-sink-metrics.json")).unwrap();
        assert_eq!(find(&sink, "1.numRecordsIn"), Some(25134.0));
        for body in [
            fixture!("vertex-source-metrics-unprefixed.json"),
            fixture!("vertex-calc-metrics-unprefixed.json"),
            fixture!("vertex-sink-metrics-unprefixed.json"),
        ] {
            assert!(api::parse_list::<MetricValue>(body).unwrap().is_empty());
        }
    }

    #[test]
    fn checkpoint_fixtures() {
        let c: Checkpoints = api::parse(fixture!("job-checkpoints.json")).unwrap();
        let mut out = Families::new(None);
        out.checkpoints(job(), &c);
        let f = out.finish();
        let l = [("job_id", JOB_ID)];
        assert_eq!(
            value(&f, "flink_job_checkpoints_completed_total", &l),
            Some(26.0)
        );
        // The first checkpoint fires before all tasks run and counts as failed.
        assert_eq!(
            value(&f, "flink_job_checkpoints_failed_total", &l),
            Some(1.0)
        );
        assert_eq!(
            value(&f, "flink_job_checkpoints_restored_total", &l),
            Some(0.0)
        );
        assert_eq!(
            value(&f, "flink_job_checkpoints_in_progress", &l),
            Some(0.0)
        );
        assert_eq!(
            value(&f, "flink_job_last_checkpoint_duration_seconds", &l),
            Some(0.021)
        );
        assert_eq!(
            value(&f, "flink_job_last_checkpoint_size_bytes", &l),
            Some(0.0)
        );
        assert_eq!(
            value(&f, "flink_job_last_checkpoint_full_size_bytes", &l),
            Some(0.0)
        );
        assert_eq!(
            value(&f, "flink_job_last_checkpoint_timestamp_seconds", &l),
            Some(1_795_299_958.788)
        );
        for family in &f {
            let counter = family.name.ends_with("_total");
            assert_eq!(
                matches!(family.kind, MetricKind::Counter),
                counter,
                "{}",
                family.name
            );
        }

        let after: Checkpoints = api::parse(fixture!("job-checkpoints-cancelled.json")).unwrap();
        let mut out = Families::new(None);
        out.checkpoints(job(), &after);
        let f = out.finish();
        assert_eq!(
            value(&f, "flink_job_checkpoints_completed_total", &l),
            Some(29.0)
        );
    }

    #[test]
    fn checkpoints_before_the_first_one_completes() {
        let c: Checkpoints = api::parse(
            br#"{"counts":{"restored":0,"total":1,"in_progress":1,"completed":0,"failed":0},
                 "latest":{"completed":null,"savepoint":null,"failed":null,"restored":null},
                 "history":[]}"#,
        )
        .unwrap();
        let mut out = Families::new(None);
        out.checkpoints(job(), &c);
        let f = out.finish();
        assert_eq!(
            value(&f, "flink_job_checkpoints_in_progress", &[]),
            Some(1.0)
        );
        assert_eq!(samples(&f, "flink_job_last_checkpoint_duration_seconds"), 0);
        assert_eq!(
            samples(&f, "flink_job_last_checkpoint_timestamp_seconds"),
            0
        );

        // Odd but survivable: counts as strings, latest not an object, no timestamp.
        let c: Checkpoints = api::parse(
            br#"{"counts":{"completed":"12","failed":null},"latest":[1,2],"extra":true}"#,
        )
        .unwrap();
        let mut out = Families::new(None);
        out.checkpoints(job(), &c);
        let f = out.finish();
        assert_eq!(
            value(&f, "flink_job_checkpoints_completed_total", &[]),
            Some(12.0)
        );
        assert_eq!(samples(&f, "flink_job_checkpoints_failed_total"), 0);
        assert_eq!(samples(&f, "flink_job_last_checkpoint_size_bytes"), 0);
    }

    #[test]
    fn job_fixture_lists_the_three_vertices() {
        let details: JobDetails = api::parse(fixture!("job.json")).unwrap();
        assert_eq!(details.state.as_deref(), Some("RUNNING"));
        let vertices: Vec<(&str, &str, Option<f64>, &str)> = details
            .vertices
            .iter()
            .map(|v| {
                (
                    v.id.as_deref().unwrap(),
                    v.name.as_deref().unwrap(),
                    v.parallelism,
                    v.status.as_deref().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            vertices,
            [
                (SOURCE_ID, "Source: events[1]", Some(2.0), "RUNNING"),
                (CALC_ID, "Calc[2]", Some(2.0), "RUNNING"),
                (SINK_ID, "sink[3]: Writer", Some(2.0), "RUNNING"),
            ]
        );
        let after: JobDetails = api::parse(fixture!("job-cancelled.json")).unwrap();
        assert_eq!(after.state.as_deref(), Some("CANCELED"));
        assert!(
            after
                .vertices
                .iter()
                .all(|v| v.status.as_deref() == Some("CANCELED"))
        );
    }

    #[test]
    fn aggregated_vertex_metric_fixtures() {
        let mut out = Families::new(None);
        for (id, name, body) in [
            (
                SOURCE_ID,
                "Source: events[1]",
                fixture!("vertex-source-subtasks-metrics.json"),
            ),
            (
                CALC_ID,
                "Calc[2]",
                fixture!("vertex-calc-subtasks-metrics.json"),
            ),
            (
                SINK_ID,
                "sink[3]: Writer",
                fixture!("vertex-sink-subtasks-metrics.json"),
            ),
        ] {
            let metrics: Vec<AggregatedMetric> = api::parse_list(body).unwrap();
            assert_eq!(metrics.len(), 5);
            out.vertex_metrics(vertex(id, name), &metrics);
        }
        let f = out.finish();
        let source = ("vertex", "Source: events[1]");
        let calc = ("vertex", "Calc[2]");
        let sink = ("vertex", "sink[3]: Writer");
        assert_eq!(
            value(&f, "flink_vertex_records_out_total", &[source]),
            Some(100_000.0)
        );
        assert_eq!(
            value(&f, "flink_vertex_records_in_total", &[calc]),
            Some(100_000.0)
        );
        assert_eq!(
            value(&f, "flink_vertex_records_out_total", &[calc]),
            Some(50185.0)
        );
        assert_eq!(
            value(&f, "flink_vertex_records_in_total", &[sink]),
            Some(50185.0)
        );
        assert_eq!(
            value(
                &f,
                "flink_vertex_idle_time_ms_per_second",
                &[calc, ("stat", "avg")]
            ),
            Some(1000.0)
        );
        assert_eq!(
            value(
                &f,
                "flink_vertex_busy_time_ms_per_second",
                &[calc, ("stat", "max")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &f,
                "flink_vertex_backpressured_time_ms_per_second",
                &[sink, ("stat", "max")]
            ),
            Some(0.0)
        );
        // The source's busy time is "NaN" in every aggregate: no sample rather than NaN.
        assert_eq!(
            value(
                &f,
                "flink_vertex_busy_time_ms_per_second",
                &[source, ("stat", "avg")]
            ),
            None
        );
        assert_eq!(samples(&f, "flink_vertex_busy_time_ms_per_second"), 4);
        assert_eq!(
            value(
                &f,
                "flink_vertex_records_in_total",
                &[calc, ("vertex_id", CALC_ID), ("job_id", JOB_ID)]
            ),
            Some(100_000.0)
        );

        let gone: Vec<AggregatedMetric> =
            api::parse_list(fixture!("vertex-calc-subtasks-metrics-cancelled.json")).unwrap();
        assert!(gone.is_empty());
    }

    #[test]
    fn backpressure_fixtures() {
        let mut out = Families::new(None);
        for (id, name, body) in [
            (
                SOURCE_ID,
                "Source: events[1]",
                fixture!("vertex-source-backpressure.json"),
            ),
            (
                CALC_ID,
                "Calc[2]",
                fixture!("vertex-calc-backpressure.json"),
            ),
            (
                SINK_ID,
                "sink[3]: Writer",
                fixture!("vertex-sink-backpressure.json"),
            ),
        ] {
            let bp: Backpressure = api::parse(body).unwrap();
            assert_eq!(bp.level(), Some("ok"));
            assert_eq!(bp.subtasks.len(), 2);
            out.backpressure(vertex(id, name), &bp);
        }
        let f = out.finish();
        let calc = ("vertex_id", CALC_ID);
        assert_eq!(
            value(
                &f,
                "flink_vertex_backpressure_level",
                &[calc, ("level", "ok")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &f,
                "flink_vertex_backpressure_level",
                &[calc, ("level", "low")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &f,
                "flink_vertex_backpressure_level",
                &[calc, ("level", "high")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&f, "flink_vertex_backpressure_ratio", &[calc]),
            Some(0.0)
        );
        assert_eq!(samples(&f, "flink_vertex_backpressure_level"), 9);
        assert_eq!(samples(&f, "flink_vertex_backpressure_ratio"), 3);

        // The first call of a vertex, and the answer after cancelling, parse the same way.
        for body in [
            fixture!("vertex-source-backpressure-first.json"),
            fixture!("vertex-calc-backpressure-first.json"),
            fixture!("vertex-sink-backpressure-first.json"),
            fixture!("vertex-calc-backpressure-cancelled.json"),
        ] {
            let bp: Backpressure = api::parse(body).unwrap();
            assert_eq!(bp.status.as_deref(), Some("ok"));
            assert_eq!(bp.level(), Some("ok"));
        }
    }

    #[test]
    fn backpressure_high_deprecated_and_odd_levels() {
        let high: Backpressure = api::parse(
            br#"{"status":"ok","backpressure-level":"high","subtasks":[
                {"subtask":0,"ratio":0.2},{"subtask":1,"ratio":"0.83"},{"subtask":2,"ratio":"NaN"}]}"#,
        )
        .unwrap();
        let mut out = Families::new(None);
        out.backpressure(vertex(CALC_ID, "Calc[2]"), &high);
        let f = out.finish();
        assert_eq!(
            value(&f, "flink_vertex_backpressure_level", &[("level", "high")]),
            Some(1.0)
        );
        assert_eq!(
            value(&f, "flink_vertex_backpressure_level", &[("level", "ok")]),
            Some(0.0)
        );
        assert_eq!(
            value(&f, "flink_vertex_backpressure_ratio", &[]),
            Some(0.83)
        );

        // Only the camel-case spelling, in upper case.
        let camel: Backpressure =
            api::parse(br#"{"status":"ok","backpressureLevel":"LOW","subtasks":null}"#).unwrap();
        let mut out = Families::new(None);
        out.backpressure(vertex(CALC_ID, "Calc[2]"), &camel);
        let f = out.finish();
        assert_eq!(
            value(&f, "flink_vertex_backpressure_level", &[("level", "low")]),
            Some(1.0)
        );
        assert_eq!(samples(&f, "flink_vertex_backpressure_ratio"), 0);

        // Old Flink while sampling; and a level nobody knows.
        for body in [
            &br#"{"status":"deprecated","backpressure-level":"ok"}"#[..],
            br#"{"status":"ok","backpressure-level":"purple","subtasks":[]}"#,
        ] {
            let bp: Backpressure = api::parse(body).unwrap();
            let mut out = Families::new(None);
            out.backpressure(vertex(CALC_ID, "Calc[2]"), &bp);
            assert_eq!(samples(&out.finish(), "flink_vertex_backpressure_level"), 0);
        }
    }

    #[test]
    fn long_names_are_cut() {
        let long = "x".repeat(1000);
        let mut out = Families::new(None);
        out.vertex(
            VertexRef {
                job: JobRef {
                    id: JOB_ID,
                    name: &long,
                },
                id: CALC_ID,
                name: &long,
            },
            Some(4.0),
        );
        let f = out.finish();
        for label in &f[0].samples[0].labels {
            assert!(label.value.len() <= MAX_NAME_BYTES, "{}", label.name);
        }
    }

    #[test]
    fn scrape_errors_have_a_series_per_endpoint() {
        let mut errors = ScrapeErrors::default();
        errors.add(Endpoint::VertexBackpressure);
        errors.add(Endpoint::VertexBackpressure);
        let mut out = Families::new(None);
        out.scrape_errors(&errors);
        let f = out.finish();
        assert_eq!(samples(&f, "flink_scrape_errors"), Endpoint::ALL.len());
        assert_eq!(
            value(
                &f,
                "flink_scrape_errors",
                &[("endpoint", "vertex_backpressure")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&f, "flink_scrape_errors", &[("endpoint", "job")]),
            Some(0.0)
        );
        assert_eq!(errors.total(), 2);
    }

    #[test]
    fn taskmanager_fixtures_agree_with_the_overview() {
        // Not turned into metrics yet; checked so the recorded cluster is self-consistent.
        let tms: serde_json::Value = api::parse(fixture!("taskmanagers.json")).unwrap();
        let list = tms["taskmanagers"].as_array().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["slotsNumber"], 2);
        assert_eq!(list[0]["freeSlots"], 0);
        let metrics: Vec<MetricValue> =
            api::parse_list(fixture!("taskmanager-metrics.json")).unwrap();
        let find = |id: &str| {
            metrics
                .iter()
                .find(|m| m.id.as_deref() == Some(id))
                .and_then(|m| m.value)
        };
        assert_eq!(find("Status.JVM.Memory.Heap.Max"), Some(301_989_888.0));
        assert_eq!(find("Status.JVM.Threads.Count"), Some(74.0));
        assert_eq!(
            find("Status.Shuffle.Netty.TotalMemorySegments"),
            Some(2662.0)
        );

        // The Prometheus reporter of the same cluster says the same (plain line match; the
        // prometheus plugin owns exposition-format parsing).
        let jm = include_str!("../fixtures/reporter-jobmanager.txt");
        assert!(jm.contains("flink_jobmanager_numRegisteredTaskManagers{host=\"127_0_0_1\",} 1.0"));
        assert!(jm.contains("flink_jobmanager_taskSlotsTotal{host=\"127_0_0_1\",} 2.0"));
        let tm = include_str!("../fixtures/reporter-taskmanager.txt");
        assert!(tm.contains(JOB_ID));
    }

    #[test]
    fn error_bodies_and_cancel_response() {
        assert_eq!(
            api::error_summary(fixture!("job-not-found-404.json")).as_deref(),
            Some(
                "org.apache.flink.runtime.rest.NotFoundException: Job 00000000000000000000000000000000 not found"
            )
        );
        let bad = api::error_summary(fixture!("job-bad-id-400.json")).unwrap();
        assert!(
            bad.starts_with(
                "org.apache.flink.runtime.rest.handler.RestHandlerException: Bad request"
            ),
            "{bad}"
        );
        assert!(bad.len() <= 300);
        assert_eq!(api::error_summary(b"<html>502 Bad Gateway</html>"), None);
        assert_eq!(api::error_summary(br#"{"errors":[]}"#), None);
        let cancel: serde_json::Value = api::parse(fixture!("job-cancel-response.json")).unwrap();
        assert_eq!(cancel, serde_json::json!({}));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert!(api::parse::<Overview>(b"").is_err());
        assert!(api::parse::<Overview>(b"not json").is_err());
        assert!(api::parse::<Overview>(b"[1,2]").is_err());
        assert!(api::parse::<JobsOverview>(br#"{"jobs":"#).is_err());
        assert!(
            api::parse_list::<MetricValue>(br#"{"id":"x"}"#)
                .unwrap_err()
                .contains("an object")
        );
        // Wrong field types degrade to missing values.
        let o: Overview = api::parse(
            br#"{"taskmanagers":"3","slots-total":{"x":1},"slots-available":null,"flink-version":2}"#,
        )
        .unwrap();
        assert_eq!(o.taskmanagers, Some(3.0));
        assert_eq!(o.slots_total, None);
        assert_eq!(o.slots_available, None);
        assert_eq!(o.flink_version.as_deref(), Some("2"));
        // A list with one broken element keeps the others.
        let m: Vec<MetricValue> =
            api::parse_list(br#"[{"id":"uptime","value":"12"},7,{"id":"numRestarts","value":""}]"#)
                .unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].value, None);
        let j: JobsOverview = api::parse(br#"{"jobs":null}"#).unwrap();
        assert!(j.jobs.is_empty());
        let j: JobsOverview = api::parse(br#"{"jobs":[{"jid":1},"x"]}"#).unwrap();
        assert_eq!(j.jobs.len(), 1);
        assert_eq!(j.jobs[0].jid.as_deref(), Some("1"));
        // Negative uptime (Flink: -1 once the job stopped) and restarts are dropped.
        let mut out = Families::new(None);
        out.job_metrics(
            job(),
            &api::parse_list::<MetricValue>(
                br#"[{"id":"uptime","value":"-1"},{"id":"numRestarts","value":"NaN"}]"#,
            )
            .unwrap(),
        );
        assert!(out.finish().is_empty());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(api::truncate("héllo", 2), "h");
        assert_eq!(api::truncate("héllo", 3), "hé");
        assert_eq!(api::truncate("abc", 10), "abc");
    }
}
