//! Collected → visible in Prometheus. A real `picket-agent` (host metrics every 200 ms, each
//! round its own batch as with any `interval` ≥ `batch.max_delay`) is the probe: the bench polls Prometheus for `timestamp()` of the probe's newest sample and
//! notes when each new collection time first shows up. Background load comes from simulated
//! agents at 10 % and 80 % of the pipeline's measured maximum (aggregator → Prometheus).
//! The baseline, measured the same way in the same run, is a sample the bench remote-writes
//! straight to Prometheus: what Picket adds is the difference.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use picket_tests::servers::{Prometheus, Series};
use picket_tests::{Aggregator, bin};

use crate::loadgen::{self, LoadSpec, Pace};
use crate::report::{count, percentile};
use crate::wire::SeriesShape;
use crate::{Settings, setup};

const SINK: &str = "prom";
const PROBE: &str = "latency-probe";

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
    let (agents, window, measure) = if s.quick {
        (4, Duration::from_secs(3), Duration::from_secs(5))
    } else {
        (10, Duration::from_secs(10), Duration::from_secs(60))
    };
    let spec = |series: usize, pace: Pace| LoadSpec {
        endpoint: endpoint.clone(),
        ca: pki.ca(),
        agents,
        shape: SeriesShape { series, jobs: 4 },
        pace,
        compress: true,
        prefix: "lat".into(),
        rounds: None,
    };

    // The maximum: what reaches Prometheus per second while the agents send flat out.
    let load = loadgen::start(&spec(1000, Pace::Flood { window: 2 })).await?;
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
        // One batch per agent per second.
        let series = ((rate / agents as f64).round() as usize).max(1);
        let load = loadgen::start(&spec(
            series,
            Pace::Every {
                interval: Duration::from_secs(1),
            },
        ))
        .await?;
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
        let (picket, direct) = tokio::task::block_in_place(|| poll_probes(&prometheus, measure))?;
        if !probe.is_running() {
            return Err(anyhow!(
                "the probe agent exited; its log:\n{}",
                probe.log_text()
            ));
        }
        probe.terminate(Duration::from_secs(20));
        let stats = load.stop().await?;
        let skipped = stats.skipped_rounds.load(Ordering::Relaxed);
        let (mut picket, mut direct) = (picket, direct);
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

/// Polls Prometheus for `measure`; returns the ages (ms) at which new probe samples became
/// visible: (through Picket, written directly). A thread meanwhile remote-writes the direct
/// probe every 200 ms.
fn poll_probes(prometheus: &Prometheus, measure: Duration) -> Result<(Vec<i64>, Vec<i64>)> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
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
        let query = format!(
            "timestamp({{__name__=~\"picket_agent_collections_total|picket_bench_direct_probe\",instance=~\"{PROBE}|direct\"}})"
        );
        let (mut picket, mut direct) = (Vec::new(), Vec::new());
        let (mut last_picket, mut last_direct) = (0i64, 0i64);
        let deadline = Instant::now() + measure;
        while Instant::now() < deadline {
            let answer = prometheus.query(&query);
            let seen = crate::now_ms();
            let results = answer["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for r in results {
                let instance = r["metric"]["instance"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let Some(ts) = r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) else {
                    continue;
                };
                let ts = (ts * 1000.0).round() as i64;
                let (last, ages) = if instance == PROBE {
                    (&mut last_picket, &mut picket)
                } else {
                    (&mut last_direct, &mut direct)
                };
                // The first sighting only tells that it was there already.
                if *last != 0 && ts > *last {
                    ages.push(seen - ts);
                }
                if ts > *last {
                    *last = ts;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        writer
            .join()
            .map_err(|_| anyhow!("the direct-write thread panicked"))??;
        if picket.is_empty() || direct.is_empty() {
            return Err(anyhow!(
                "no probe samples seen in Prometheus (through Picket: {}, direct: {})",
                picket.len(),
                direct.len()
            ));
        }
        Ok((picket, direct))
    })
}
