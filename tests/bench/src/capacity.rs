//! The aggregator alone, with no network sink (only the latest-sample store every aggregator
//! keeps for `/metrics`): the most samples per second it takes on this machine, and how its
//! CPU and memory grow with the number of agents and of active series.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::loadgen::{self, LoadSpec, Pace};
use crate::proc_stats::{own_cpu_s, usage};
use crate::report::{count, median, mib};
use crate::wire::SeriesShape;
use crate::{Settings, setup};

pub async fn run(s: &mut Settings) -> Result<()> {
    maximum(s).await?;
    series_scaling(s).await?;
    agent_scaling(s).await?;
    Ok(())
}

fn spec(
    endpoint: String,
    ca: std::path::PathBuf,
    agents: usize,
    series: usize,
    pace: Pace,
) -> LoadSpec {
    LoadSpec {
        endpoint,
        ca,
        agents,
        shape: SeriesShape { series, jobs: 4 },
        pace,
        compress: true,
        prefix: "cap".into(),
        rounds: None,
    }
}

/// Flood the aggregator from 20 agents (4 batches in flight each) and count acked samples
/// over a measured window after a warm-up.
async fn maximum(s: &mut Settings) -> Result<()> {
    let (agents, series, warmup, window) = if s.quick {
        (4, 1000, Duration::from_secs(1), Duration::from_secs(3))
    } else {
        (20, 1000, Duration::from_secs(3), Duration::from_secs(10))
    };
    let dir = tempfile::tempdir()?;
    let pki = setup::pki(dir.path())?;
    let mut rows = Vec::new();
    let mut rates = Vec::new();
    let mut per_cpu = Vec::new();
    for run in 0..s.runs {
        let run_dir = dir.path().join(format!("run-{run}"));
        std::fs::create_dir_all(&run_dir)?;
        let agg = setup::aggregator(&run_dir, &pki, "")?;
        let pid = agg.process.pid();
        let load = loadgen::start(&spec(
            format!("https://{}", agg.grpc),
            pki.ca(),
            agents,
            series,
            Pace::Flood { window: 4 },
        ))
        .await?;
        tokio::time::sleep(warmup).await;
        let profiler = setup::Profiler::attach(s, pid, &format!("null-sink-aggregator-{run}"))?;
        let (a0, u0, g0, t0) = (
            load.stats.acked_samples.load(Ordering::Relaxed),
            usage(pid)?,
            own_cpu_s(),
            Instant::now(),
        );
        tokio::time::sleep(window).await;
        let (a1, u1, g1, elapsed) = (
            load.stats.acked_samples.load(Ordering::Relaxed),
            usage(pid)?,
            own_cpu_s(),
            t0.elapsed().as_secs_f64(),
        );
        profiler.finish();
        let stats = load.stop().await?;
        if stats.rejected.load(Ordering::Relaxed) > 0 {
            return Err(anyhow!(
                "the aggregator rejected batches; see {}",
                agg.process.log.display()
            ));
        }
        let rate = (a1 - a0) as f64 / elapsed;
        let cpu = u1.cpu_s - u0.cpu_s;
        rates.push(rate);
        per_cpu.push((a1 - a0) as f64 / cpu);
        rows.push(vec![
            format!("{}", run + 1),
            count(rate),
            format!("{:.2}", cpu / elapsed),
            count((a1 - a0) as f64 / cpu),
            format!("{:.2}", (g1 - g0) / elapsed),
            mib(u1.rss as f64),
        ]);
    }
    rows.push(vec![
        "**median**".into(),
        format!("**{}**", count(median(&rates))),
        String::new(),
        count(median(&per_cpu)),
        String::new(),
        String::new(),
    ]);
    s.report.table(
        &format!(
            "Null sink: {agents} agents flooding ({series} series per batch, 4 batches in flight, zstd, TLS), {}s window after {}s warm-up (goal ≥ 1,000,000 samples/s)",
            window.as_secs(),
            warmup.as_secs()
        ),
        &[
            "run",
            "samples/s acked",
            "aggregator CPU (cores)",
            "samples per aggregator CPU-s",
            "load generator CPU (cores)",
            "aggregator RSS",
        ],
        &rows,
    );
    Ok(())
}

/// One paced load: `agents` × `series` every `interval`, measured over two intervals after
/// one full interval; returns (idle RSS, RSS, CPU cores, samples/s acked, skipped rounds).
async fn paced_point(
    dir: &std::path::Path,
    pki: &picket_tests::Pki,
    agents: usize,
    series: usize,
    interval: Duration,
) -> Result<(u64, u64, f64, f64, u64)> {
    std::fs::create_dir_all(dir)?;
    let agg = setup::aggregator(dir, pki, "")?;
    let pid = agg.process.pid();
    let idle = usage(pid)?.rss;
    let load = loadgen::start(&spec(
        format!("https://{}", agg.grpc),
        pki.ca(),
        agents,
        series,
        Pace::Every { interval },
    ))
    .await?;
    tokio::time::sleep(interval + interval / 2).await;
    let (a0, u0, t0) = (
        load.stats.acked_samples.load(Ordering::Relaxed),
        usage(pid)?,
        Instant::now(),
    );
    tokio::time::sleep(interval * 2).await;
    let (a1, u1, elapsed) = (
        load.stats.acked_samples.load(Ordering::Relaxed),
        usage(pid)?,
        t0.elapsed().as_secs_f64(),
    );
    let stats = load.stop().await?;
    Ok((
        idle,
        u1.rss,
        (u1.cpu_s - u0.cpu_s) / elapsed,
        (a1 - a0) as f64 / elapsed,
        stats.skipped_rounds.load(Ordering::Relaxed),
    ))
}

async fn series_scaling(s: &mut Settings) -> Result<()> {
    let (agents, totals, interval): (usize, &[usize], _) = if s.quick {
        (10, &[10_000, 100_000], Duration::from_secs(2))
    } else {
        (100, &[10_000, 100_000, 1_000_000], Duration::from_secs(5))
    };
    let dir = tempfile::tempdir()?;
    let pki = setup::pki(dir.path())?;
    let mut rows = Vec::new();
    for &total in totals {
        let (mut rss, mut per_100k, mut cores, mut rate, mut skipped) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
        for run in 0..s.runs {
            let (idle, r, c, sps, sk) = paced_point(
                &dir.path().join(format!("series-{total}-{run}")),
                &pki,
                agents,
                total / agents,
                interval,
            )
            .await?;
            rss.push(r as f64);
            per_100k.push((r.saturating_sub(idle)) as f64 * 100_000.0 / total as f64);
            cores.push(c);
            rate.push(sps);
            skipped += sk;
        }
        rows.push(vec![
            count(total as f64),
            count(median(&rate)),
            format!("{:.3}", median(&cores)),
            mib(median(&rss)),
            mib(median(&per_100k)),
            skipped.to_string(),
        ]);
    }
    s.report.table(
        &format!(
            "Active series: {agents} agents, one batch each every {}s, null sink (medians of {} runs)",
            interval.as_secs(),
            s.runs
        ),
        &[
            "active series",
            "samples/s",
            "aggregator CPU (cores)",
            "aggregator RSS",
            "RSS above idle per 100k series",
            "rounds skipped (aggregator behind)",
        ],
        &rows,
    );
    Ok(())
}

async fn agent_scaling(s: &mut Settings) -> Result<()> {
    let (counts, interval): (&[usize], _) = if s.quick {
        (&[10, 100, 1000], Duration::from_secs(2))
    } else {
        (&[10, 100, 1000, 10_000], Duration::from_secs(5))
    };
    let series = 100;
    let dir = tempfile::tempdir()?;
    let pki = setup::pki(dir.path())?;
    let mut rows = Vec::new();
    for &agents in counts {
        let (mut rss, mut per_agent, mut cores, mut rate, mut skipped) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
        for run in 0..s.runs {
            let (idle, r, c, sps, sk) = paced_point(
                &dir.path().join(format!("agents-{agents}-{run}")),
                &pki,
                agents,
                series,
                interval,
            )
            .await?;
            rss.push(r as f64);
            per_agent.push(r.saturating_sub(idle) as f64 / agents as f64);
            cores.push(c);
            rate.push(sps);
            skipped += sk;
        }
        rows.push(vec![
            count(agents as f64),
            count(median(&rate)),
            format!("{:.3}", median(&cores)),
            format!("{:.1} µs", median(&cores) / median(&rate) * 1e6),
            mib(median(&rss)),
            format!("{:.1} KiB", median(&per_agent) / 1024.0),
            skipped.to_string(),
        ]);
    }
    s.report.table(
        &format!(
            "Agents: {series} series each, one batch every {}s over its own TLS connection, null sink (medians of {} runs)",
            interval.as_secs(),
            s.runs
        ),
        &[
            "agents",
            "samples/s",
            "aggregator CPU (cores)",
            "CPU per sample",
            "aggregator RSS",
            "RSS above idle per agent",
            "rounds skipped",
        ],
        &rows,
    );
    Ok(())
}
