//! The first-party `flink` plugin: an Apache Flink session cluster's health from its REST API
//! (the JobManager's web UI port), through the agent's `http` capability.
//!
//! One collection asks, in this order:
//!
//! 1. `/overview`: TaskManagers, slots, version. If this fails the collection fails: without
//!    it nothing says the cluster is there at all, and the agent's plugin error metrics carry
//!    the reason.
//! 2. `/jobs/overview`: jobs per state.
//! 3. For each unfinished job, at most `max_jobs` of them: `/jobs/<id>/metrics?get=uptime,numRestarts`
//!    and `/jobs/<id>/checkpoints`.
//! 4. For each RUNNING job: `/jobs/<id>` for its vertices, then per running vertex
//!    `/jobs/<id>/vertices/<vid>/subtasks/metrics?get=...` and (setting `backpressure`)
//!    `/jobs/<id>/vertices/<vid>/backpressure`.
//!
//! Any request after the first may fail without spoiling the rest: it is counted in
//! `flink_scrape_errors{endpoint}`, the collection goes on, and one warning per collection
//! names the first failure. A 404 on a job's endpoints is not a failure: the job finished or
//! expired between two requests, or (for `/checkpoints`) does not checkpoint.
//!
//! Modules: [`api`] (response shapes), [`metrics`] (responses → families), [`settings`].
//! The collection talks HTTP through the small [`Http`] trait so it runs natively in tests
//! against recorded responses; [`SdkHttp`] is the agent.

pub mod api;
pub mod metrics;
pub mod settings;

use std::cell::RefCell;

use picket_plugin_sdk::host::{http, log};
use picket_plugin_sdk::types::{Capability, Description, Family};
use picket_plugin_sdk::{Guest, error_message, export};

use api::{AggregatedMetric, Backpressure, Checkpoints, JobDetails, JobsOverview, MetricValue};
use metrics::{Endpoint, Families, JobRef, ScrapeErrors, VertexRef};
use settings::{DEFAULT_SETTINGS_JSON, Settings};

/// An HTTP answer, whatever its status.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// What the collection needs from the host.
pub trait Http {
    /// GET `url`; `Err` when no answer arrived (denied, timeout, connection refused...).
    fn get(&mut self, url: &str) -> Result<Reply, String>;
    /// A warning in the agent's log.
    fn warn(&mut self, message: &str);
}

/// The agent, through the SDK's imports.
pub struct SdkHttp;

impl Http for SdkHttp {
    fn get(&mut self, url: &str) -> Result<Reply, String> {
        let headers = [("Accept".to_owned(), "application/json".to_owned())];
        http::get(url, &headers)
            .map(|r| Reply {
                status: r.status,
                body: r.body,
            })
            .map_err(|e| error_message(&e))
    }

    fn warn(&mut self, message: &str) {
        log::write(log::Level::Warn, message);
    }
}

/// Outcome of one request that is allowed to fail.
enum Fetched<T> {
    Ok(T),
    /// 404: the thing is gone or never existed; not an error.
    Gone,
    Failed(String),
}

/// GETs `base + path` and parses a 2xx body with `parse`.
fn fetch<T>(
    http: &mut dyn Http,
    base: &str,
    path: &str,
    parse: fn(&[u8]) -> Result<T, String>,
) -> Fetched<T> {
    let reply = match http.get(&format!("{base}{path}")) {
        Ok(reply) => reply,
        Err(e) => return Fetched::Failed(format!("GET {path}: {e}")),
    };
    match reply.status {
        200..=299 => match parse(&reply.body) {
            Ok(value) => Fetched::Ok(value),
            Err(e) => Fetched::Failed(format!("GET {path}: {e}")),
        },
        404 => Fetched::Gone,
        status => {
            let why = api::error_summary(&reply.body).unwrap_or_else(|| "no error message".into());
            Fetched::Failed(format!("GET {path}: HTTP {status}: {why}"))
        }
    }
}

/// Flink ids are 32 hex digits. They go into URL paths, so anything else (which only a broken
/// or hostile endpoint would send) is refused instead of being spliced into a path.
fn usable_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Keeps the first failure message for the warning and counts every failure.
struct Failures {
    errors: ScrapeErrors,
    first: Option<String>,
}

impl Failures {
    fn record(&mut self, endpoint: Endpoint, message: String) {
        self.errors.add(endpoint);
        if self.first.is_none() {
            self.first = Some(message);
        }
    }

    /// The value of a fetch that may fail, recording a failure.
    fn take<T>(&mut self, endpoint: Endpoint, fetched: Fetched<T>) -> Option<T> {
        match fetched {
            Fetched::Ok(value) => Some(value),
            Fetched::Gone => None,
            Fetched::Failed(message) => {
                self.record(endpoint, message);
                None
            }
        }
    }
}

/// One collection round (see the crate docs for the requests).
pub fn scrape(settings: &Settings, http: &mut dyn Http) -> Result<Vec<Family>, String> {
    let base = settings.url.as_str();
    let mut out = Families::new(settings.cluster.as_deref());
    let mut failures = Failures {
        errors: ScrapeErrors::default(),
        first: None,
    };

    let overview = match fetch(http, base, "/overview", api::parse::<api::Overview>) {
        Fetched::Ok(overview) => overview,
        Fetched::Gone => {
            return Err(format!(
                "GET {base}/overview: HTTP 404 (is `url` the JobManager's REST address?)"
            ));
        }
        Fetched::Failed(e) => return Err(format!("{base}: {e}")),
    };
    out.overview(&overview);

    let jobs = fetch(http, base, "/jobs/overview", api::parse::<JobsOverview>);
    // A 404 here would be a proxy in the way; it is a failure like any other.
    let jobs = match jobs {
        Fetched::Gone => Fetched::Failed("GET /jobs/overview: HTTP 404".to_owned()),
        other => other,
    };
    if let Some(jobs) = failures.take(Endpoint::JobsOverview, jobs) {
        out.jobs_by_state(&jobs.jobs);
        let (selected, skipped) = metrics::select_jobs(&jobs.jobs, settings.max_jobs);
        out.jobs_skipped(skipped);
        for job in selected {
            let Some(id) = job.jid.as_deref() else {
                continue;
            };
            if !usable_id(id) {
                failures.record(Endpoint::Job, format!("job id {id:?} is not a Flink id"));
                continue;
            }
            let job_ref = JobRef {
                id,
                name: job.name.as_deref().unwrap_or(""),
            };
            let state = metrics::state_label(job.state.as_deref());
            collect_job(settings, http, &mut out, &mut failures, job_ref, &state);
        }
    }

    out.scrape_errors(&failures.errors);
    if let Some(first) = &failures.first {
        let total = failures.errors.total();
        http.warn(&format!(
            "{total} Flink REST request(s) failed at {base}; the first: {first}"
        ));
    }
    Ok(out.finish())
}

fn collect_job(
    settings: &Settings,
    http: &mut dyn Http,
    out: &mut Families,
    failures: &mut Failures,
    job: JobRef,
    state: &str,
) {
    let base = settings.url.as_str();
    out.job_state(job, Some(state));

    let path = format!(
        "/jobs/{}/metrics?get={}",
        job.id,
        metrics::JOB_METRIC_IDS.join(",")
    );
    let fetched = fetch(http, base, &path, api::parse_list::<MetricValue>);
    if let Some(values) = failures.take(Endpoint::JobMetrics, fetched) {
        out.job_metrics(job, &values);
    }

    let path = format!("/jobs/{}/checkpoints", job.id);
    let fetched = fetch(http, base, &path, api::parse::<Checkpoints>);
    if let Some(checkpoints) = failures.take(Endpoint::JobCheckpoints, fetched) {
        out.checkpoints(job, &checkpoints);
    }

    // Per-vertex series only for RUNNING jobs: the cardinality rule, and other states have
    // no live tasks to report on anyway.
    if state != "running" {
        return;
    }
    let path = format!("/jobs/{}", job.id);
    let fetched = fetch(http, base, &path, api::parse::<JobDetails>);
    let Some(details) = failures.take(Endpoint::Job, fetched) else {
        return;
    };
    for vertex in &details.vertices {
        let (Some(id), Some(status)) = (vertex.id.as_deref(), vertex.status.as_deref()) else {
            continue;
        };
        // Finished vertices (bounded sources) and not-yet-deployed ones have no live metrics.
        if status != "RUNNING" {
            continue;
        }
        if !usable_id(id) {
            failures.record(Endpoint::Job, format!("vertex id {id:?} is not a Flink id"));
            continue;
        }
        let vertex_ref = VertexRef {
            job,
            id,
            name: vertex.name.as_deref().unwrap_or(""),
        };
        out.vertex(vertex_ref, vertex.parallelism);

        let path = format!(
            "/jobs/{}/vertices/{id}/subtasks/metrics?get={}",
            job.id,
            metrics::VERTEX_METRIC_IDS.join(",")
        );
        let fetched = fetch(http, base, &path, api::parse_list::<AggregatedMetric>);
        if let Some(values) = failures.take(Endpoint::VertexMetrics, fetched) {
            out.vertex_metrics(vertex_ref, &values);
        }

        if settings.backpressure {
            let path = format!("/jobs/{}/vertices/{id}/backpressure", job.id);
            let fetched = fetch(http, base, &path, api::parse::<Backpressure>);
            if let Some(backpressure) = failures.take(Endpoint::VertexBackpressure, fetched) {
                out.backpressure(vertex_ref, &backpressure);
            }
        }
    }
}

thread_local! {
    /// Settings from `init`, kept for every `collect`.
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

struct Flink;

impl Guest for Flink {
    fn describe() -> Description {
        Description {
            name: "flink".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![Capability::Http, Capability::Log],
            default_settings: DEFAULT_SETTINGS_JSON.into(),
        }
    }

    fn init(settings: String) -> Result<(), String> {
        let settings = Settings::parse(&settings)?;
        log::write(
            log::Level::Info,
            &format!(
                "flink: watching {} (max_jobs {})",
                settings.url, settings.max_jobs
            ),
        );
        SETTINGS.with(|s| *s.borrow_mut() = Some(settings));
        Ok(())
    }

    fn collect() -> Result<Vec<Family>, String> {
        let settings = SETTINGS
            .with(|s| s.borrow().clone())
            .ok_or_else(|| "collect called before init".to_owned())?;
        scrape(&settings, &mut SdkHttp)
    }
}

export!(Flink);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::metrics::tests::{CALC_ID, JOB_ID, SINK_ID, SOURCE_ID, fixture, samples, value};

    const BASE: &str = "http://127.0.0.1:8081";

    /// Serves recorded responses by path; anything unknown is Flink's 404.
    struct FakeFlink {
        routes: BTreeMap<String, Result<Reply, String>>,
        requests: Vec<String>,
        warnings: Vec<String>,
    }

    impl FakeFlink {
        /// The recorded cluster while the job was running.
        fn running() -> Self {
            let mut fake = FakeFlink {
                routes: BTreeMap::new(),
                requests: Vec::new(),
                warnings: Vec::new(),
            };
            let job = format!("/jobs/{JOB_ID}");
            let vertex_get = metrics::VERTEX_METRIC_IDS.join(",");
            fake.ok("/overview", fixture!("overview.json"))
                .ok("/jobs/overview", fixture!("jobs-overview.json"))
                .ok(&job, fixture!("job.json"))
                .ok(
                    &format!("{job}/metrics?get=uptime,numRestarts"),
                    fixture!("job-metrics.json"),
                )
                .ok(
                    &format!("{job}/checkpoints"),
                    fixture!("job-checkpoints.json"),
                );
            for (vid, name) in [(SOURCE_ID, "source"), (CALC_ID, "calc"), (SINK_ID, "sink")] {
                let metrics = match name {
                    "source" => fixture!("vertex-source-subtasks-metrics.json"),
                    "calc" => fixture!("vertex-calc-subtasks-metrics.json"),
                    _ => fixture!("vertex-sink-subtasks-metrics.json"),
                };
                let backpressure = match name {
                    "source" => fixture!("vertex-source-backpressure.json"),
                    "calc" => fixture!("vertex-calc-backpressure.json"),
                    _ => fixture!("vertex-sink-backpressure.json"),
                };
                fake.ok(
                    &format!("{job}/vertices/{vid}/subtasks/metrics?get={vertex_get}"),
                    metrics,
                )
                .ok(&format!("{job}/vertices/{vid}/backpressure"), backpressure);
            }
            fake
        }

        /// The recorded cluster after the job was cancelled.
        fn cancelled() -> Self {
            let mut fake = FakeFlink::running();
            fake.ok("/overview", fixture!("overview-cancelled.json"))
                .ok("/jobs/overview", fixture!("jobs-overview-cancelled.json"))
                .ok(&format!("/jobs/{JOB_ID}"), fixture!("job-cancelled.json"));
            fake
        }

        fn ok(&mut self, path: &str, body: &[u8]) -> &mut Self {
            self.reply(path, 200, body)
        }

        fn reply(&mut self, path: &str, status: u16, body: &[u8]) -> &mut Self {
            let reply = Reply {
                status,
                body: body.to_vec(),
            };
            self.routes.insert(format!("{BASE}{path}"), Ok(reply));
            self
        }

        fn fail(&mut self, path: &str, error: &str) -> &mut Self {
            self.routes
                .insert(format!("{BASE}{path}"), Err(error.to_owned()));
            self
        }
    }

    impl Http for FakeFlink {
        fn get(&mut self, url: &str) -> Result<Reply, String> {
            self.requests.push(url.to_owned());
            self.routes.get(url).cloned().unwrap_or_else(|| {
                Ok(Reply {
                    status: 404,
                    body: fixture!("job-not-found-404.json").to_vec(),
                })
            })
        }

        fn warn(&mut self, message: &str) {
            self.warnings.push(message.to_owned());
        }
    }

    fn settings() -> Settings {
        Settings::default()
    }

    fn errors(families: &[Family], endpoint: &str) -> Option<f64> {
        value(families, "flink_scrape_errors", &[("endpoint", endpoint)])
    }

    #[test]
    fn a_running_cluster_end_to_end() {
        let mut flink = FakeFlink::running();
        let f = scrape(&settings(), &mut flink).unwrap();
        assert!(flink.warnings.is_empty(), "{:?}", flink.warnings);
        // 2 cluster requests, 3 per job, 2 per vertex: nothing else.
        assert_eq!(flink.requests.len(), 2 + 3 + 3 * 2, "{:#?}", flink.requests);
        assert!(flink.requests.iter().all(|r| r.starts_with(BASE)));

        assert_eq!(value(&f, "flink_taskmanagers", &[]), Some(1.0));
        assert_eq!(value(&f, "flink_task_slots", &[]), Some(2.0));
        assert_eq!(value(&f, "flink_jobs", &[("state", "running")]), Some(1.0));
        assert_eq!(value(&f, "flink_jobs_skipped", &[]), Some(0.0));
        let job = [("job_id", JOB_ID), ("job_name", "picket-datagen-blackhole")];
        assert_eq!(
            value(
                &f,
                "flink_job_state",
                &[job[0], job[1], ("state", "running")]
            ),
            Some(1.0)
        );
        assert_eq!(value(&f, "flink_job_uptime_seconds", &job), Some(50.739));
        assert_eq!(value(&f, "flink_job_restarts_total", &job), Some(0.0));
        assert_eq!(
            value(&f, "flink_job_checkpoints_completed_total", &job),
            Some(26.0)
        );
        assert_eq!(
            value(&f, "flink_vertex_parallelism", &[("vertex", "Calc[2]")]),
            Some(2.0)
        );
        assert_eq!(samples(&f, "flink_vertex_parallelism"), 3);
        assert_eq!(
            value(
                &f,
                "flink_vertex_records_out_total",
                &[("vertex_id", CALC_ID)]
            ),
            Some(50185.0)
        );
        assert_eq!(
            value(
                &f,
                "flink_vertex_backpressure_level",
                &[("vertex_id", SINK_ID), ("level", "ok")]
            ),
            Some(1.0)
        );
        for endpoint in metrics::Endpoint::ALL {
            assert_eq!(errors(&f, endpoint.label()), Some(0.0), "{endpoint:?}");
        }
        // Every family is one of the documented specs, and none is empty.
        for family in &f {
            assert!(
                metrics::ALL.iter().any(|s| s.name == family.name),
                "{}",
                family.name
            );
            assert!(!family.samples.is_empty(), "{}", family.name);
        }
    }

    #[test]
    fn a_cancelled_job_gets_no_job_requests() {
        let mut flink = FakeFlink::cancelled();
        let f = scrape(&settings(), &mut flink).unwrap();
        assert_eq!(flink.requests.len(), 2, "{:#?}", flink.requests);
        assert_eq!(value(&f, "flink_jobs", &[("state", "canceled")]), Some(1.0));
        assert_eq!(value(&f, "flink_jobs", &[("state", "running")]), Some(0.0));
        assert_eq!(value(&f, "flink_task_slots_available", &[]), Some(2.0));
        assert_eq!(samples(&f, "flink_job_state"), 0);
        assert_eq!(samples(&f, "flink_vertex_parallelism"), 0);
    }

    #[test]
    fn overview_failures_fail_the_collection() {
        let mut flink = FakeFlink::running();
        flink.fail("/overview", "connection refused");
        let err = scrape(&settings(), &mut flink).unwrap_err();
        assert!(
            err.contains("connection refused") && err.contains("/overview"),
            "{err}"
        );
        assert_eq!(flink.requests.len(), 1);

        let mut flink = FakeFlink::running();
        flink.reply("/overview", 404, b"");
        let err = scrape(&settings(), &mut flink).unwrap_err();
        assert!(err.contains("404"), "{err}");

        let mut flink = FakeFlink::running();
        flink.reply("/overview", 503, br#"{"errors":["Service temporarily unavailable due to an ongoing leader election. Please refresh."]}"#);
        let err = scrape(&settings(), &mut flink).unwrap_err();
        assert!(
            err.contains("HTTP 503") && err.contains("leader election"),
            "{err}"
        );

        let mut flink = FakeFlink::running();
        flink.ok("/overview", b"<html>proxy login</html>");
        let err = scrape(&settings(), &mut flink).unwrap_err();
        assert!(err.contains("unexpected JSON"), "{err}");
    }

    #[test]
    fn one_failing_endpoint_does_not_spoil_the_rest() {
        let mut flink = FakeFlink::running();
        let job = format!("/jobs/{JOB_ID}");
        flink
            .reply(
                &format!("{job}/checkpoints"),
                500,
                fixture!("job-bad-id-400.json"),
            )
            .fail(
                &format!("{job}/vertices/{CALC_ID}/backpressure"),
                "timed out (the grant's timeout)",
            )
            .ok(
                &format!(
                    "{job}/vertices/{SOURCE_ID}/subtasks/metrics?get={}",
                    metrics::VERTEX_METRIC_IDS.join(",")
                ),
                b"{\"not\":\"a list\"}",
            );
        let f = scrape(&settings(), &mut flink).unwrap();
        assert_eq!(errors(&f, "job_checkpoints"), Some(1.0));
        assert_eq!(errors(&f, "vertex_backpressure"), Some(1.0));
        assert_eq!(errors(&f, "vertex_metrics"), Some(1.0));
        assert_eq!(errors(&f, "job"), Some(0.0));
        // Everything else still arrived.
        assert_eq!(samples(&f, "flink_job_checkpoints_completed_total"), 0);
        assert_eq!(value(&f, "flink_job_uptime_seconds", &[]), Some(50.739));
        assert_eq!(samples(&f, "flink_vertex_backpressure_ratio"), 2);
        assert_eq!(samples(&f, "flink_vertex_records_in_total"), 2);
        // One warning per collection, naming the first failure.
        assert_eq!(flink.warnings.len(), 1, "{:?}", flink.warnings);
        let warning = &flink.warnings[0];
        assert!(
            warning.starts_with("3 Flink REST request(s) failed"),
            "{warning}"
        );
        assert!(
            warning.contains("/checkpoints: HTTP 500: org.apache.flink"),
            "{warning}"
        );
    }

    #[test]
    fn a_job_that_vanished_is_not_an_error() {
        // The job finished between /jobs/overview and the next requests: everything 404s.
        let mut flink = FakeFlink::running();
        let job = format!("/jobs/{JOB_ID}");
        for path in [
            job.clone(),
            format!("{job}/checkpoints"),
            format!("{job}/metrics?get=uptime,numRestarts"),
        ] {
            flink.routes.remove(&format!("{BASE}{path}"));
        }
        let f = scrape(&settings(), &mut flink).unwrap();
        assert!(flink.warnings.is_empty(), "{:?}", flink.warnings);
        assert_eq!(errors(&f, "job"), Some(0.0));
        assert_eq!(value(&f, "flink_jobs", &[("state", "running")]), Some(1.0));
        assert_eq!(samples(&f, "flink_job_uptime_seconds"), 0);
        assert_eq!(samples(&f, "flink_vertex_parallelism"), 0);
    }

    #[test]
    fn jobs_overview_failure_keeps_the_cluster_series() {
        let mut flink = FakeFlink::running();
        flink.reply("/jobs/overview", 404, b"");
        let f = scrape(&settings(), &mut flink).unwrap();
        assert_eq!(errors(&f, "jobs_overview"), Some(1.0));
        assert_eq!(value(&f, "flink_task_slots", &[]), Some(2.0));
        assert_eq!(samples(&f, "flink_jobs"), 0);
        assert_eq!(flink.requests.len(), 2);
    }

    #[test]
    fn settings_shape_the_requests_and_labels() {
        let mut flink = FakeFlink::running();
        let s = Settings {
            backpressure: false,
            cluster: Some("lab".into()),
            ..Settings::default()
        };
        let f = scrape(&s, &mut flink).unwrap();
        assert!(!flink.requests.iter().any(|r| r.ends_with("/backpressure")));
        assert_eq!(samples(&f, "flink_vertex_backpressure_level"), 0);
        assert_eq!(
            value(&f, "flink_task_slots", &[("cluster", "lab")]),
            Some(2.0)
        );

        let mut flink = FakeFlink::running();
        let s = Settings {
            max_jobs: 0,
            ..Settings::default()
        };
        let f = scrape(&s, &mut flink).unwrap();
        assert_eq!(flink.requests.len(), 2);
        assert_eq!(value(&f, "flink_jobs_skipped", &[]), Some(1.0));
        assert_eq!(samples(&f, "flink_job_state"), 0);
    }

    #[test]
    fn ids_that_are_not_flink_ids_never_reach_a_url() {
        let mut flink = FakeFlink::running();
        flink.ok(
            "/jobs/overview",
            br#"{"jobs":[{"jid":"../../taskmanagers","name":"x","state":"RUNNING"}]}"#,
        );
        let f = scrape(&settings(), &mut flink).unwrap();
        assert_eq!(flink.requests.len(), 2, "{:#?}", flink.requests);
        assert_eq!(errors(&f, "job"), Some(1.0));
        assert!(usable_id(JOB_ID));
        assert!(!usable_id(""));
        assert!(!usable_id("a/b"));
        assert!(!usable_id("a?b"));
    }

    #[test]
    fn non_running_unfinished_jobs_get_job_series_but_no_vertices() {
        let mut flink = FakeFlink::running();
        flink.ok(
            "/jobs/overview",
            format!(r#"{{"jobs":[{{"jid":"{JOB_ID}","name":"j","state":"RESTARTING","start-time":1}}]}}"#)
                .as_bytes(),
        );
        let f = scrape(&settings(), &mut flink).unwrap();
        assert_eq!(
            value(&f, "flink_job_state", &[("state", "restarting")]),
            Some(1.0)
        );
        assert_eq!(
            value(&f, "flink_job_restarts_total", &[("job_name", "j")]),
            Some(0.0)
        );
        assert_eq!(samples(&f, "flink_vertex_parallelism"), 0);
        assert_eq!(flink.requests.len(), 4, "{:#?}", flink.requests);
    }

    #[test]
    fn describe_reports_the_defaults() {
        let d = <Flink as Guest>::describe();
        assert_eq!(d.name, "flink");
        assert_eq!(
            Settings::parse(&d.default_settings).unwrap(),
            Settings::default()
        );
    }
}
