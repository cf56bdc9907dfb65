//! Relay efficiency: the aggregator and vmagent each take the same series from the same
//! number of senders over TLS (gRPC streams for the aggregator, remote-write POSTs for
//! vmagent) and forward them by remote write to one null endpoint. The figure is samples
//! delivered per CPU-second of the relay process, from `/proc`. The aggregator runs twice per
//! run: as configured by default (it also keeps every series' latest sample for `/metrics`)
//! and relaying only (`exposition.enabled = false`), which is what vmagent does.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::loadgen::{self, LoadSpec, Pace};
use crate::proc_stats::usage;
use crate::receiver::NullReceiver;
use crate::report::{count, median, mib, ratio};
use crate::wire::{self, SeriesShape};
use crate::{Settings, setup};

struct Sizes {
    agents: usize,
    series: usize,
    rounds: u64,
}

pub async fn run(s: &mut Settings) -> Result<()> {
    let sizes = if s.quick {
        Sizes {
            agents: 10,
            series: 500,
            rounds: 10,
        }
    } else {
        Sizes {
            agents: 100,
            series: 1000,
            rounds: 40,
        }
    };
    let total = (sizes.agents * sizes.series) as u64 * sizes.rounds;
    let dir = tempfile::tempdir()?;
    let pki = setup::pki(dir.path())?;
    let mut rows = Vec::new();
    let (mut ours, mut relay_only, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratios, mut relay_only_ratios) = (Vec::new(), Vec::new());
    let mut label_caches = Vec::new();
    for run in 0..s.runs {
        let run_dir = dir.path().join(format!("run-{run}"));
        let mut picket = Vec::new();
        for (mode, exposition) in [("default", true), ("only", false)] {
            let mode_dir = run_dir.join(mode);
            std::fs::create_dir_all(mode_dir.join("queues"))?;
            let profile = format!("relay-aggregator-{mode}-{run}");
            picket.push(
                relay_through_aggregator(s, &mode_dir, &pki, &sizes, total, &profile, exposition)
                    .await?,
            );
        }
        let vm = relay_through_vmagent(&run_dir, &pki, &sizes, total).await?;
        label_caches.extend(picket.iter().filter_map(|cost| cost.label_cache));
        let per_cpu_s = |cost: &Cost| total as f64 / cost.cpu_s;
        let (p, o, v) = (per_cpu_s(&picket[0]), per_cpu_s(&picket[1]), per_cpu_s(&vm));
        ours.push(p);
        relay_only.push(o);
        theirs.push(v);
        ratios.push(p / v);
        relay_only_ratios.push(o / v);
        let mut row = vec![format!("{}", run + 1)];
        for (rate, cost) in [(p, &picket[0]), (o, &picket[1]), (v, &vm)] {
            row.extend([
                count(rate),
                format!("{:.2} s", cost.cpu_s),
                mib(cost.peak_rss as f64),
            ]);
        }
        row.extend([format!("{:.2}×", p / v), format!("{:.2}×", o / v)]);
        rows.push(row);
    }
    let mut median_row = vec!["**median**".to_owned()];
    for rates in [&ours, &relay_only, &theirs] {
        median_row.extend([count(median(rates)), String::new(), String::new()]);
    }
    median_row.extend([
        format!("**{}**", ratio(median(&ratios), 1.0)),
        format!("**{}**", ratio(median(&relay_only_ratios), 1.0)),
    ]);
    rows.push(median_row);
    s.report.table(
        &format!(
            "Relay: {} agents × {} Flink-like series × {} rounds = {} samples over TLS to one remote-write endpoint (goal ≥ 2×)",
            sizes.agents,
            sizes.series,
            sizes.rounds,
            count(total as f64)
        ),
        &[
            "run",
            "Picket samples/CPU-s",
            "Picket CPU",
            "Picket peak RSS",
            "Picket relay-only samples/CPU-s",
            "relay-only CPU",
            "relay-only peak RSS",
            "vmagent samples/CPU-s",
            "vmagent CPU",
            "vmagent peak RSS",
            "ratio",
            "relay-only ratio",
        ],
        &rows,
    );
    let hit_rates: Vec<f64> = label_caches
        .iter()
        .map(|c| c.hits / (c.hits + c.misses + c.uncached).max(1.0))
        .collect();
    let cache_bytes: Vec<f64> = label_caches.iter().map(|c| c.bytes).collect();
    let busy: f64 = label_caches.iter().map(|c| c.busy).sum();
    if !label_caches.is_empty() {
        s.report.text(&format!(
            "Remote-write label cache, median over the aggregator's runs: {:.1} % of batches \
             replayed their labels, {} held at the end; {busy} batches found it busy.\n",
            median(&hit_rates) * 100.0,
            mib(median(&cache_bytes)),
        ));
    }
    // What a queue record costs on the aggregator's disk per sample: the wire batch as sent.
    let shape = SeriesShape {
        series: sizes.series,
        jobs: 4,
    };
    let batch = wire::batch_template("relay-0", &wire::flink_like_series(0, shape));
    s.report.text(&format!(
        "Wire (and disk-queue) size of these batches: {:.1} bytes per sample uncompressed.\n",
        batch.bytes.len() as f64 / sizes.series as f64
    ));
    Ok(())
}

struct Cost {
    cpu_s: f64,
    peak_rss: u64,
    /// `None` for vmagent, and for aggregator builds without the cache (comparing builds).
    label_cache: Option<LabelCacheUse>,
}

/// The remote-write sink's label cache at the end of a run, from the aggregator's `/metrics`.
#[derive(Clone, Copy, Default)]
struct LabelCacheUse {
    hits: f64,
    misses: f64,
    uncached: f64,
    busy: f64,
    bytes: f64,
}

impl LabelCacheUse {
    fn scrape(http: SocketAddr) -> Result<Option<LabelCacheUse>> {
        let (status, body) = picket_tests::http_get(http, "/metrics")
            .context("reading the aggregator's /metrics")?;
        if status != 200 {
            return Err(anyhow!("aggregator /metrics answered {status}"));
        }
        let mut found = LabelCacheUse::default();
        let mut seen = false;
        for line in body.lines() {
            let value = || -> Result<f64> {
                let text = line.rsplit(' ').next().unwrap_or("");
                text.parse()
                    .with_context(|| format!("value of {line:?} in /metrics"))
            };
            if line.starts_with("picket_sink_label_cache_batches_total{") {
                seen = true;
                if line.contains("result=\"hit\"") {
                    found.hits = value()?;
                } else if line.contains("result=\"miss\"") {
                    found.misses = value()?;
                } else if line.contains("result=\"uncached\"") {
                    found.uncached = value()?;
                } else if line.contains("result=\"busy\"") {
                    found.busy = value()?;
                }
            } else if line.starts_with("picket_sink_label_cache_bytes{") {
                found.bytes = value()?;
            }
        }
        Ok(seen.then_some(found))
    }
}

async fn relay_through_aggregator(
    s: &Settings,
    dir: &std::path::Path,
    pki: &picket_tests::Pki,
    sizes: &Sizes,
    total: u64,
    profile: &str,
    exposition: bool,
) -> Result<Cost> {
    let receiver = NullReceiver::start().await?;
    let sink = format!(
        "[exposition]\nenabled = {exposition}\n\n[[sinks]]\ntype = \"prometheus_remote_write\"\nname = \"relay\"\nurl = \"{}\"\n",
        receiver.url()
    );
    let agg = setup::aggregator(dir, pki, &sink)?;
    let pid = agg.process.pid();
    let profiler = setup::Profiler::attach(s, pid, profile)?;
    let before = usage(pid)?;
    let load = loadgen::start(&LoadSpec {
        endpoint: format!("https://{}", agg.grpc),
        ca: pki.ca(),
        agents: sizes.agents,
        shape: SeriesShape {
            series: sizes.series,
            jobs: 4,
        },
        pace: Pace::Flood { window: 1 },
        compress: true,
        prefix: "relay".into(),
        rounds: Some(sizes.rounds),
    })
    .await?;
    setup::until(
        "every sample at the endpoint (aggregator)",
        Duration::from_secs(600),
        || receiver.samples() >= total,
    )
    .await?;
    let after = usage(pid)?;
    profiler.finish();
    let label_cache = LabelCacheUse::scrape(agg.http)?;
    let stats = load.stop().await?;
    let acked = stats
        .acked_samples
        .load(std::sync::atomic::Ordering::Relaxed);
    if acked != total {
        return Err(anyhow!(
            "aggregator acknowledged {acked} of {total} samples"
        ));
    }
    Ok(Cost {
        cpu_s: after.cpu_s - before.cpu_s,
        peak_rss: after.peak_rss,
        label_cache,
    })
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

async fn relay_through_vmagent(
    dir: &std::path::Path,
    pki: &picket_tests::Pki,
    sizes: &Sizes,
    total: u64,
) -> Result<Cost> {
    let receiver = NullReceiver::start().await?;
    let (vmagent, addr) = setup::vmagent(dir, pki, &receiver.url())?;
    let pid = vmagent.pid();
    let before = usage(pid)?;
    let tls = picket_tests::servers::ClientTls::new(&pki.ca(), None).rustls_config();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_only()
        .enable_http1()
        .build();
    let client: HttpsClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(sizes.agents)
        .build(connector);
    let mut senders = Vec::new();
    for n in 0..sizes.agents {
        let series = wire::flink_like_series(
            n,
            SeriesShape {
                series: sizes.series,
                jobs: 4,
            },
        );
        let template = wire::remote_write_template(&format!("relay-{n}"), &series);
        senders.push(tokio::spawn(post_rounds(
            client.clone(),
            addr,
            template,
            sizes.rounds,
        )));
    }
    for sender in senders {
        sender.await??;
    }
    setup::until(
        "every sample at the endpoint (vmagent)",
        Duration::from_secs(600),
        || receiver.samples() >= total,
    )
    .await?;
    let after = usage(pid)?;
    drop(vmagent);
    Ok(Cost {
        cpu_s: after.cpu_s - before.cpu_s,
        peak_rss: after.peak_rss,
        label_cache: None,
    })
}

/// One simulated sender: `rounds` remote-write requests, one after the other (as an agent
/// waits for each ack), each with fresh timestamps.
async fn post_rounds(
    client: HttpsClient,
    addr: SocketAddr,
    mut template: wire::Template,
    rounds: u64,
) -> Result<()> {
    let uri: http::Uri = format!("https://{addr}/api/v1/write").parse()?;
    let mut encoder = snap::raw::Encoder::new();
    for round in 0..rounds {
        template.patch(crate::now_ms(), round as f64);
        let body = encoder.compress_vec(&template.bytes)?;
        let request = http::Request::post(uri.clone())
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(Full::new(Bytes::from(body)))?;
        let response = client
            .request(request)
            .await
            .context("remote write to vmagent")?;
        if !response.status().is_success() {
            return Err(anyhow!("vmagent answered {}", response.status()));
        }
        // Drain the (empty) body so the connection goes back to the pool.
        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    }
    Ok(())
}
