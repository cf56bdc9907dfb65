//! Runs the aggregator: binds the gRPC and HTTP listeners, serves until SIGTERM/SIGINT,
//! re-reads the config on SIGHUP, and expires state in the background.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use picket_core::logging::LogHandle;
use picket_proto::v1::ingest_server::IngestServer;
use tokio::signal::unix::{SignalKind, signal};
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::agents::Registry;
use crate::config::AggregatorConfig;
use crate::grpc_listener::{GrpcConnections, Limits};
use crate::grpc_zstd::ZstdFrames;
use crate::http::{HttpState, HttpStats, router};
use crate::ingest::IngestService;
use crate::receivers::Intake;
use crate::receivers::influx_write::InfluxWrite;
use crate::receivers::pushgateway::Pushgateway;
use crate::sinks::Sinks;
use crate::store::LatestStore;
use crate::tls_reload::ReloadingTls;

/// How often series TTLs and forgotten agents are swept.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(5);
/// How long open streams get to finish after SIGTERM. Unacked batches are resent by their
/// agents, so cutting streams loses nothing.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub async fn run(
    config: AggregatorConfig,
    config_path: Option<PathBuf>,
    log: LogHandle,
) -> anyhow::Result<()> {
    let registry = Arc::new(Registry::new(config.agents.clone()));
    let latest = LatestStore::new(config.exposition.series_ttl);
    latest.set_enabled(config.exposition.enabled);
    let sinks = Arc::new(
        Sinks::open(&config.sinks, latest, &config.queues.directory).context("opening sinks")?,
    );
    let intake = Arc::new(Intake::new(sinks.clone(), config.http.body_read_timeout));
    let grpc_connections = GrpcConnections::new(Limits {
        max_connections: config.grpc.max_connections,
        idle_connection_timeout: config.grpc.idle_connection_timeout,
    });
    let http_stats = Arc::new(HttpStats::default());
    let tls = if config.tls.insecure {
        None
    } else {
        Some(ReloadingTls::new(&config.tls).context("invalid TLS configuration")?)
    };
    let state = Arc::new(HttpState {
        registry: registry.clone(),
        sinks: sinks.clone(),
        grpc_listening: false.into(),
        intake: intake.clone(),
        grpc_connections: grpc_connections.clone(),
        http_stats: http_stats.clone(),
        tls: tls.clone(),
    });
    let mut receivers = Vec::new();
    let pushgateway = config
        .receivers
        .pushgateway
        .enabled
        .then(|| Pushgateway::new(config.receivers.pushgateway.clone(), intake.clone()));
    if let Some(gateway) = &pushgateway {
        receivers.push(gateway.router());
    }
    if config.receivers.influxdb.enabled {
        let influx = InfluxWrite::new(config.receivers.influxdb.clone(), intake.clone())
            .map_err(anyhow::Error::msg)
            .context("receivers.influxdb")?;
        receivers.push(influx.router());
    }

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for gRPC on {} (grpc.listen)",
                config.grpc.listen
            )
        })?;
    let http_listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for HTTP on {} (http.listen)",
                config.http.listen
            )
        })?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    // No `Server::timeout`: it bounds whole requests, and an agent's stream lasts for ever.
    // Streams are bounded by hello_timeout and idle_timeout (ingest.rs), connections by
    // grpc_listener.rs.
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(config.grpc.keepalive_interval))
        .http2_keepalive_timeout(Some(config.grpc.keepalive_timeout))
        .max_concurrent_streams(config.grpc.max_streams_per_connection)
        .tcp_keepalive(Some(Duration::from_secs(60)));
    if config.tls.insecure {
        tracing::warn!(
            "tls.insecure = true: agents connect in plaintext and are not authenticated; use only on a trusted network"
        );
    }
    // zstd messages are decompressed in front of tonic (grpc_zstd.rs); gzip ones by tonic.
    let service = IngestServer::new(IngestService {
        registry: registry.clone(),
        sinks: sinks.clone(),
        hello_timeout: config.grpc.hello_timeout,
        idle_timeout: config.grpc.idle_timeout,
        connections: grpc_connections.clone(),
    })
    .max_decoding_message_size(config.grpc.max_message_bytes)
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Zstd);
    let service = ZstdFrames::new(service, config.grpc.max_message_bytes);

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let wait_shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let incoming = grpc_connections.incoming(
        TcpIncoming::from(grpc_listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60))),
    );
    let grpc_router = builder.add_service(service);
    let stopped = wait_shutdown(shutdown_rx.clone());
    let mut tls_watch = None;
    let grpc = match &tls {
        // TLS handshakes run in tls_reload.rs with whatever certificate is current.
        Some(tls) => {
            tls_watch = Some(tokio::spawn(tls.clone().watch(config.tls.reload_interval)));
            let incoming = tls.incoming(incoming, config.grpc.handshake_timeout);
            tokio::spawn(grpc_router.serve_with_incoming_shutdown(incoming, stopped))
        }
        None => tokio::spawn(grpc_router.serve_with_incoming_shutdown(incoming, stopped)),
    };
    state.grpc_listening.store(true, Ordering::Relaxed);
    let http = tokio::spawn(crate::http::serve(
        http_listener,
        router(state.clone(), receivers),
        config.http.clone(),
        http_stats,
        shutdown_rx.clone(),
    ));
    tracing::info!(grpc = %grpc_addr, http = %http_addr, tls = !config.tls.insecure,
        mutual_tls = config.tls.client_ca.is_some(),
        pushgateway = config.receivers.pushgateway.enabled,
        influxdb_write = config.receivers.influxdb.enabled, "picket-aggregator listening");

    let housekeeping = {
        let registry = registry.clone();
        let sinks = sinks.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
            loop {
                tick.tick().await;
                sinks.latest.expire();
                registry.forget_silent();
            }
        })
    };

    // Push groups expire in a task of their own: expiry waits for the groups' lock and for
    // delivery, which must not hold up the housekeeping above.
    let push_expiry = pushgateway.map(|gateway| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
            loop {
                tick.tick().await;
                gateway.expire().await;
            }
        })
    });

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut current = config;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                match crate::config::load(config_path.as_deref()) {
                    Ok(loaded) => {
                        apply_reload(&current, &loaded.config, &registry, &sinks, &log);
                        current = loaded.config;
                    }
                    Err(e) => tracing::error!("SIGHUP: keeping the running config; the new one is invalid:\n{e}"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    state.grpc_listening.store(false, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    grpc_connections.shut_down();
    housekeeping.abort();
    if let Some(task) = tls_watch {
        task.abort();
    }
    if let Some(task) = push_expiry {
        task.abort();
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = grpc.await;
        let _ = http.await;
    })
    .await;
    Ok(())
}

fn apply_reload(
    old: &AggregatorConfig,
    new: &AggregatorConfig,
    registry: &Registry,
    sinks: &Sinks,
    log: &LogHandle,
) {
    if let Err(e) = log.set_level(&new.log.level) {
        tracing::error!("SIGHUP: {e}");
    }
    registry.reconfigure(new.agents.clone());
    sinks.latest.set_ttl(new.exposition.series_ttl);
    sinks.latest.set_enabled(new.exposition.enabled);
    let needs_restart = old.grpc != new.grpc
        || old.http != new.http
        || old.tls != new.tls
        || old.sinks != new.sinks
        || old.receivers != new.receivers
        || old.log.format != new.log.format;
    if needs_restart {
        tracing::warn!(
            "SIGHUP: listener, TLS, sink, receiver or log-format changes take effect after a restart"
        );
    }
    tracing::info!("SIGHUP: configuration reloaded");
}
