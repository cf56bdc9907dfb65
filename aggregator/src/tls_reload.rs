//! The gRPC port's TLS, reloaded when its files change: certificates rotate without a
//! restart.
//!
//! tonic's own TLS reads the certificate, key and client CA once. Here the aggregator runs
//! the handshakes itself (tokio-rustls, bounded by `grpc.handshake_timeout`) with the current
//! [`rustls::ServerConfig`], and a task checks the files every `tls.reload_interval`: when
//! one changed (modification time, size or inode — a renamed-in file counts), the config is
//! built again and used for every later handshake. Established streams keep the session
//! they negotiated. Files caught half-written (a key that does not match the certificate)
//! fail to build; the old config stays and the next check tries again.
//!
//! tonic sees `TlsStream`s, so `Request::peer_certs()` (the agent's identity) works as with
//! its own TLS.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use picket_core::model::{Family, Labels, MetricType, now_ms};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsConfig;
use crate::grpc_listener::GuardedStream;

/// What identifies a version of a file without reading it.
type Fingerprint = Option<(i64, i64, u64, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let m = std::fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.len(), m.ino()))
}

/// The server TLS config in use, and what it was built from.
pub struct ReloadingTls {
    files: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
    built_from: RwLock<Vec<Fingerprint>>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl ReloadingTls {
    /// Builds the first config; an error here stops the aggregator (bad files at start).
    pub fn new(files: &TlsConfig) -> anyhow::Result<Arc<ReloadingTls>> {
        let fingerprints = fingerprints(files);
        let config = build(files)?;
        Ok(Arc::new(ReloadingTls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            built_from: RwLock::new(fingerprints),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }))
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rebuilds the config if a file changed since the last successful build. Returns
    /// whether a new config is in use.
    pub fn check(&self) -> bool {
        let now = fingerprints(&self.files);
        if *self.built_from.read().unwrap_or_else(|e| e.into_inner()) == now {
            return false;
        }
        match build(&self.files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                *self.built_from.write().unwrap_or_else(|e| e.into_inner()) = now;
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %self.files.cert.display(),
                    "TLS files changed: new connections use the new certificate and CA");
                true
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    error = format!("{e:#}"),
                    "TLS files changed but cannot be used; keeping the previous ones (checked again at the next tls.reload_interval)"
                );
                false
            }
        }
    }

    /// Checks the files every `interval`, for ever (the task is aborted at shutdown).
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Reading and parsing PEM files is blocking work, if brief.
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.check()).await;
        }
    }

    /// `picket_aggregator_tls_reloads_total{outcome}`.
    pub fn families(&self) -> Vec<Family> {
        let mut reloads = Family::new(
            "picket_aggregator_tls_reloads_total",
            MetricType::Counter,
            "Changes of the gRPC port's TLS files: used (success) or refused and the old ones kept (error).",
        );
        let ts = now_ms();
        for (outcome, counter) in [("success", &self.reloads), ("error", &self.failures)] {
            reloads.push(
                Labels::from_pairs([("outcome", outcome)]),
                ts,
                counter.load(Ordering::Relaxed) as f64,
            );
        }
        vec![reloads]
    }

    /// Runs a TLS handshake (with the config current at accept time, bounded by `timeout`)
    /// on each admitted connection, concurrently, and yields the finished ones to tonic.
    pub fn incoming(
        self: &Arc<Self>,
        plain: ReceiverStream<io::Result<GuardedStream>>,
        timeout: Duration,
    ) -> ReceiverStream<io::Result<TlsStream<GuardedStream>>> {
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let mut plain = plain;
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    next = plain.next() => next,
                };
                let stream = match next {
                    None => return,
                    Some(Ok(stream)) => stream,
                    Some(Err(_)) => continue,
                };
                let acceptor = TlsAcceptor::from(this.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "gRPC TLS handshake failed"),
                        Err(_) => {
                            tracing::debug!(
                                ?timeout,
                                "gRPC TLS handshake timed out (grpc.handshake_timeout)"
                            )
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

fn fingerprints(files: &TlsConfig) -> Vec<Fingerprint> {
    let mut paths: Vec<&PathBuf> = vec![&files.cert, &files.key];
    paths.extend(files.client_ca.iter());
    paths.into_iter().map(|p| fingerprint(p)).collect()
}

/// A rustls server config from the files: the certificate chain and key, and with
/// `client_ca` the verifier of agent certificates. HTTP/2 only, as gRPC needs.
fn build(files: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let chain = picket_core::tls::read_certificates(&files.cert).context("tls.cert")?;
    let key_pem = picket_core::tls::read_private_key(&files.key).context("tls.key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", files.key.display()))
        .context("tls.key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let ca = picket_core::tls::read_certificates(ca).context("tls.client_ca")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in ca.certs {
                roots.add(cert).context("tls.client_ca")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().context("tls.client_ca")?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain.certs, key)
        .context("tls.cert and tls.key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn changed_files_are_used_and_broken_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "first.example");
        let files = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ..TlsConfig::default()
        };
        let tls = ReloadingTls::new(&files).unwrap();
        assert!(!tls.check(), "nothing changed");
        let before = tls.current();

        // Half-way through a rotation: a new certificate with the old key.
        let other = tempfile::tempdir().unwrap();
        let (new_cert, new_key) = write_pair(other.path(), "second.example");
        std::fs::copy(&new_cert, &cert).unwrap();
        assert!(!tls.check(), "a mismatched pair must not be used");
        assert!(Arc::ptr_eq(&before, &tls.current()));
        assert_eq!(tls.failures.load(Ordering::Relaxed), 1);

        // The key arrives: the pair is used.
        std::fs::copy(&new_key, &key).unwrap();
        assert!(tls.check());
        assert!(!Arc::ptr_eq(&before, &tls.current()));
        assert_eq!(tls.reloads.load(Ordering::Relaxed), 1);
        assert!(!tls.check(), "and only once");
    }
}
