//! Collected → visible in Prometheus. A real `picket-agent` (host metrics every 200 ms, each
//! round its own batch as with any `interval` ≥ `batch.max_delay`) is the probe: the bench
//! polls Prometheus for the probe's recent samples and notes when each one collected in the
//! measuring window first shows up. Background load comes from simulated agents at 10 % and
//! 80 % of the pipeline's measured maximum (aggregator → Prometheus); it stops when the window
//! ends, and the bench goes on polling until every sample collected in the window has shown up,
//! so a slow sample is counted at its real age instead of falling out of the window.
//! The baseline, measured the same way in the same run, is a sample the bench remote-writes
//! straight to Prometheus: what Picket adds is the difference.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use picket_tests::servers::{Prometheus, Series};
use picket_tests::{Aggregator, bin};

use crate::loadgen::{self, LoadSpec, LoadStats, Pace};
use crate::report::{count, percentile};
use crate::wire::SeriesShape;
use crate::{Settings, setup};

const SINK: &str = "prom";
const PROBE: &str = "latency-probe";
/// Series in each simulated agent's batches, the same while the maximum is measured and at
/// each load level: a level is then a fraction of what the pipeline took of the very batches
/// it is sent. (With one batch a second sized to the level instead, 80 % meant batches of
/// about 35,000 series, which neither stay on the aggregator's fast paths nor match the maximum.)
const SERIES_PER_AGENT: usize = 1000;

pub async fn run(s: &mut Settings) -> Result<()> {
    setup::require("prometheus", "prometheus")?;
    let dir = tempfile::tempdir()?;
    let pki = setup::pki(dir.path())?;
    let prometheus = Prometheus::start(dir.path());
    let sink = format!(
        "[[sinks]]\ntype = \"prometheus_remote_write\"\nname = \"{SINK}\"\nurl = \"{}\"\n\
         [sinks.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"500ms\"\n",
        prometheus.write_url()
    );
    let agg = setup::aggregator(dir.path(), &pki, &sink)?;
    let endpoint = format!("https://{}", agg.grpc);
    // `drain`: how long after the window the last of its probe samples may take to show up
    // before the run counts as failed (the pipeline lost them or is stuck).
    let (agents, window, measure, drain) = if s.quick {
        (
            4,
            Duration::from_secs(3),
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
    } else {
        (
            10,
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_secs(180),
        )
    };
    let spec = |pace: Pace| LoadSpec {
        endpoint: endpoint.clone(),
        ca: pki.ca(),
        agents,
        shape: SeriesShape {
            series: SERIES_PER_AGENT,
            jobs: 4,
        },
        pace,
        compress: true,
        prefix: "lat".into(),
        rounds: None,
    };

    // The maximum: what reaches Prometheus per second while the agents send flat out.
    let load = loadgen::start(&spec(Pace::Flood { window: 2 })).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (sent0, t0) = (sent(&agg), Instant::now());
    tokio::time::sleep(window).await;
    let maximum = (sent(&agg) - sent0) / t0.elapsed().as_secs_f64();
    load.stop().await?;
    // Let the backlog drain before measuring latency.
    setup::until(
        "the sink's queue to drain",
        Duration::from_secs(300),
        || agg.metric_sum("picket_sink_queue_samples", &[&format!("sink=\"{SINK}\"")]) == 0.0,
    )
    .await?;
    let rejected = sink_samples(&agg, "rejected");
    if rejected > 0.0 {
        return Err(anyhow!(
            "Prometheus rejected {rejected} samples while measuring the maximum; see {}",
            agg.process.log.display()
        ));
    }

    let mut rows = Vec::new();
    for fraction in [0.1, 0.8] {
        let rate = maximum * fraction;
        // The flood's batches, each agent sending one every `interval`.
        let interval = Duration::from_secs_f64((agents * SERIES_PER_AGENT) as f64 / rate.max(1.0));
        let load = loadgen::start(&spec(Pace::Every { interval })).await?;
        let probe_config = dir.path().join(format!("probe-{fraction}.toml"));
        std::fs::write(
            &probe_config,
            format!(
                "instance = \"{PROBE}\"\ninterval = \"200ms\"\njitter = \"0ms\"\n\
                 [batch]\nmax_delay = \"100ms\"\n\
                 [aggregator]\nendpoints = [\"{endpoint}\"]\n[aggregator.tls]\nca = \"{}\"\n\
                 [spool]\ndirectory = \"{}\"\n",
                pki.ca().display(),
                dir.path().join(format!("probe-spool-{fraction}")).display()
            ),
        )?;
        let mut cmd = std::process::Command::new(bin("picket-agent"));
        cmd.arg("--config").arg(&probe_config);
        let mut probe = setup::spawn(cmd, dir.path().join(format!("probe-{fraction}.log")))?;
        // What the sink delivered while the load ran: below `rate`, its queue grew.
        let (sent_before, started) = (sent(&agg), Instant::now());
        let mut delivered = f64::NAN;
        let watched = tokio::task::block_in_place(|| {
            watch_probes(&prometheus, measure, drain, || {
                delivered = (sent(&agg) - sent_before) / started.elapsed().as_secs_f64();
                tokio::runtime::Handle::current().block_on(load.stop())
            })
        })
        .with_context(|| {
            format!(
                "at {:.0} % load; the aggregator's log: {}",
                fraction * 100.0,
                agg.process.log.display()
            )
        });
        if !probe.is_running() {
            return Err(anyhow!(
                "the probe agent exited; its log:\n{}",
                probe.log_text()
            ));
        }
        probe.terminate(Duration::from_secs(20));
        let Watched {
            mut picket,
            mut direct,
            load,
        } = watched?;
        // A refused sample would be missing from the probe's count rather than late.
        let rejected = sink_samples(&agg, "rejected");
        if rejected > 0.0 {
            return Err(anyhow!(
                "Prometheus rejected {rejected} samples by the end of the {:.0} % level; see {}",
                fraction * 100.0,
                agg.process.log.display()
            ));
        }
        let skipped = load.skipped_rounds.load(Ordering::Relaxed);
        let p = |v: &mut Vec<i64>, q| percentile(v, q).map_or(f64::NAN, |x| x as f64);
        let (p50, p99, d50, d99) = (
            p(&mut picket, 0.5),
            p(&mut picket, 0.99),
            p(&mut direct, 0.5),
            p(&mut direct, 0.99),
        );
        rows.push(vec![
            format!("{:.0} %", fraction * 100.0),
            count(rate),
            format!("{} ms", interval.as_millis()),
            count(delivered),
            format!("{}", picket.len()),
            format!("{p50:.0} ms / {p99:.0} ms"),
            format!("{d50:.0} ms / {d99:.0} ms"),
            format!("**{:.0} ms / {:.0} ms**", p50 - d50, p99 - d99),
            skipped.to_string(),
        ]);
    }
    s.report.table(
        &format!(
            "Collected → visible in Prometheus (maximum through aggregator → Prometheus on this machine: {} samples/s; {}s per load level; goal: p99 added ≤ 50 ms at 10 %)",
            count(maximum),
            measure.as_secs()
        ),
        &[
            "load",
            "samples/s",
            "each agent's batch every",
            "delivered to Prometheus while loaded (samples/s)",
            "probe samples seen",
            "Picket p50 / p99",
            "direct remote write p50 / p99",
            "added by Picket p50 / p99",
            "background rounds skipped",
        ],
        &rows,
    );
    Ok(())
}

fn sink_samples(agg: &Aggregator, outcome: &str) -> f64 {
    agg.metric_sum(
        "picket_sink_samples_total",
        &[
            &format!("sink=\"{SINK}\""),
            &format!("outcome=\"{outcome}\""),
        ],
    )
}

fn sent(agg: &Aggregator) -> f64 {
    sink_samples(agg, "sent")
}

/// What [`watch_probes`] saw: the age (ms) of each probe sample collected in the window when it
/// first showed up in Prometheus, through Picket and written directly, and the background
/// load's counters.
struct Watched {
    picket: Vec<i64>,
    direct: Vec<i64>,
    load: Arc<LoadStats>,
}

/// Polls Prometheus (on a thread of its own) while another remote-writes the direct probe
/// every 200 ms. When `measure` is over, this thread stops the background load
/// (`stop_load`) and the polls go on until, for both probes, a sample collected after the
/// window is visible: Prometheus takes a series' samples in timestamp order only, so every
/// sample of the window that will arrive has arrived by then. Fails if that is not so
/// `drain` after the window.
fn watch_probes(
    prometheus: &Prometheus,
    measure: Duration,
    drain: Duration,
    stop_load: impl FnOnce() -> Result<Arc<LoadStats>>,
) -> Result<Watched> {
    let stop = AtomicBool::new(false);
    let start = crate::now_ms();
    let window = Window {
        start,
        end: start + measure.as_millis() as i64,
    };
    std::thread::scope(|scope| {
        // However this ends (a failed query panics), the writer stops, or the scope would
        // wait for it for ever.
        let _stop_writer = SetOnDrop(&stop);
        let writer = scope.spawn(|| -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let now = crate::now_ms();
                let labels: Series = (
                    [
                        (
                            "__name__".to_owned(),
                            "picket_bench_direct_probe".to_owned(),
                        ),
                        ("instance".to_owned(), "direct".to_owned()),
                    ]
                    .into_iter()
                    .collect(),
                    vec![(now, 1.0)],
                );
                let response = prometheus.remote_write(&[labels]);
                if !response.is_success() {
                    return Err(anyhow!("direct remote write answered {}", response.status));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        });
        let poller = scope.spawn(|| poll(prometheus, window, drain));
        // The measuring window itself, not a wait for something to be ready.
        std::thread::sleep(measure);
        let load = stop_load();
        let sightings = poller
            .join()
            .map_err(|_| anyhow!("the polling thread panicked"));
        stop.store(true, Ordering::Relaxed);
        writer
            .join()
            .map_err(|_| anyhow!("the direct-write thread panicked"))??;
        let (picket, direct) = sightings??;
        Ok(Watched {
            picket,
            direct,
            load: load?,
        })
    })
}

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// [`watch_probes`]'s polls: the ages of the probes' samples of `window`, through Picket and
/// direct, once both are complete.
fn poll(prometheus: &Prometheus, window: Window, drain: Duration) -> Result<(Vec<i64>, Vec<i64>)> {
    let (mut picket, mut direct) = (Sightings::default(), Sightings::default());
    let deadline = window.end + drain.as_millis() as i64;
    loop {
        if picket.complete(window) && direct.complete(window) {
            if picket.ages.is_empty() || direct.ages.is_empty() {
                return Err(anyhow!(
                    "no probe samples collected in the window seen in Prometheus (through Picket: {}, direct: {})",
                    picket.ages.len(),
                    direct.ages.len()
                ));
            }
            return Ok((picket.ages, direct.ages));
        }
        let now = crate::now_ms();
        if now > deadline {
            return Err(anyhow!(
                "the probe samples collected in the {}s window were not all visible in Prometheus {}s \
                 after it (through Picket: {}; direct: {})",
                (window.end - window.start) / 1000,
                drain.as_secs(),
                picket.describe(window),
                direct.describe(window)
            ));
        }
        // Everything newer than what was seen of either probe, so a sample that arrives late
        // is still in the answer; evaluated at `now`, which the range is counted from.
        let since = picket
            .newest
            .max(window.start)
            .min(direct.newest.max(window.start));
        let lookback = now - since + 1000;
        let answer = prometheus.query_at(
            &format!(
                "{{__name__=~\"picket_agent_collections_total|picket_bench_direct_probe\",instance=~\"{PROBE}|direct\"}}[{lookback}ms]"
            ),
            Some(now),
        );
        let seen = crate::now_ms();
        for series in answer["data"]["result"].as_array().into_iter().flatten() {
            let timestamps: Vec<i64> = series["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|pair| pair[0].as_f64())
                .map(|seconds| (seconds * 1000.0).round() as i64)
                .collect();
            let sightings = if series["metric"]["instance"] == PROBE {
                &mut picket
            } else {
                &mut direct
            };
            sightings.note(&timestamps, seen, window);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The measuring window, in ms since the Unix epoch (both ends included).
#[derive(Clone, Copy, Debug)]
struct Window {
    start: i64,
    end: i64,
}

/// One probe's samples as the polls showed them.
#[derive(Default, Debug)]
struct Sightings {
    /// The newest sample timestamp seen so far (ms).
    newest: i64,
    /// For each sample collected in the window: how old it was when first seen (ms).
    ages: Vec<i64>,
}

impl Sightings {
    /// Notes one answer's sample timestamps, read at `seen`: a sample newer than any seen
    /// before has just shown up.
    fn note(&mut self, timestamps: &[i64], seen: i64, window: Window) {
        let mut newest = self.newest;
        for &ts in timestamps {
            if ts > self.newest && (window.start..=window.end).contains(&ts) {
                self.ages.push(seen - ts);
            }
            newest = newest.max(ts);
        }
        self.newest = newest;
    }

    /// Whether a sample collected after the window has shown up, and so every sample of the
    /// window that Prometheus will take.
    fn complete(&self, window: Window) -> bool {
        self.newest > window.end
    }

    fn describe(&self, window: Window) -> String {
        match self.newest {
            0 => "nothing seen".to_owned(),
            _ if self.complete(window) => format!("{} seen, all there", self.ages.len()),
            newest => format!(
                "{} seen, the newest collected {} ms before the window ended",
                self.ages.len(),
                window.end - newest
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Window = Window {
        start: 1_000,
        end: 2_000,
    };

    #[test]
    fn a_sample_is_aged_when_it_first_shows_up_and_counted_once() {
        let mut s = Sightings::default();
        s.note(&[1_100], 1_105, WINDOW);
        s.note(&[1_100, 1_300], 1_310, WINDOW);
        s.note(&[1_100, 1_300], 1_400, WINDOW);
        assert_eq!(s.ages, vec![5, 10]);
    }

    #[test]
    fn samples_that_show_up_together_each_get_their_own_age() {
        let mut s = Sightings::default();
        s.note(&[1_100, 1_300, 1_500], 1_600, WINDOW);
        assert_eq!(s.ages, vec![500, 300, 100]);
    }

    #[test]
    fn a_sample_of_the_window_that_shows_up_late_still_counts_at_its_age() {
        let mut s = Sightings::default();
        s.note(&[1_900], 1_950, WINDOW);
        assert!(!s.complete(WINDOW));
        // Long after the window: the backlog drains.
        s.note(&[1_900, 2_000, 2_200], 9_000, WINDOW);
        assert_eq!(s.ages, vec![50, 7_000]);
        assert!(s.complete(WINDOW));
    }

    #[test]
    fn a_sample_at_the_windows_last_instant_counts_and_does_not_complete_it() {
        let mut s = Sightings::default();
        s.note(&[2_000], 2_010, WINDOW);
        assert_eq!(s.ages, vec![10]);
        assert!(!s.complete(WINDOW));
        s.note(&[2_000, 2_001], 2_020, WINDOW);
        assert_eq!(s.ages, vec![10]);
        assert!(s.complete(WINDOW));
    }

    #[test]
    fn samples_from_before_the_window_are_not_counted() {
        let mut s = Sightings::default();
        s.note(&[400, 900], 1_010, WINDOW);
        assert!(s.ages.is_empty());
        assert_eq!(s.newest, 900);
        assert!(!s.complete(WINDOW));
    }
}
