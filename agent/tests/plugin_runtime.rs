//! The plugin runtime against a real compiled plugin (`plugins/testing/probe`): normal
//! collection, every capability allowed and denied, and plugins that misbehave on purpose.
//! Each misbehaviour must end in the right error kind, never hang or crash the host, and a
//! fresh instance must work afterwards.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::probe_wasm;
use picket_agent::plugin_stats::PluginStats;
use picket_agent::plugins::grants::{ExecGrant, Grants, HttpGrant};
use picket_agent::plugins::runtime::{Compiled, Instance, InstanceLimits, PluginError, Runtime};
use picket_core::model::{Family, Value};

struct Fixture {
    compiled: Compiled,
}

fn fixture() -> Fixture {
    let runtime = Runtime::new();
    let compiled = runtime
        .compile(&probe_wasm(), 256 * 1024)
        .expect("probe compiles");
    Fixture { compiled }
}

fn limits() -> InstanceLimits {
    common::probe_limits(Duration::from_millis(500))
}

async fn start(
    f: &Fixture,
    settings: &str,
    grants: Grants,
) -> (Result<Instance, PluginError>, Arc<PluginStats>) {
    let stats = Arc::new(PluginStats::default());
    let instance = Instance::start(
        &f.compiled,
        "probe/test".into(),
        Arc::new(grants),
        settings,
        limits(),
        stats.clone(),
    )
    .await;
    (instance, stats)
}

async fn collect(
    f: &Fixture,
    settings: &str,
    grants: Grants,
) -> (Result<Vec<Family>, PluginError>, Arc<PluginStats>) {
    let (instance, stats) = start(f, settings, grants).await;
    let mut instance = instance.expect("instance starts");
    (instance.collect(1_700_000_000_000).await, stats)
}

fn number(families: &[Family], name: &str) -> Option<f64> {
    let f = families.iter().find(|f| f.name == name)?;
    match f.points.first()?.value {
        Value::Number(v) => Some(v),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_well_behaved_plugin_collects_with_host_timestamps() {
    let f = fixture();
    let (instance, stats) = start(&f, r#"{"mode":"ok"}"#, Grants::default()).await;
    let mut instance = instance.unwrap();
    let first = instance.collect(1_700_000_000_000).await.unwrap();
    assert_eq!(number(&first, "probe_up"), Some(1.0));
    assert_eq!(number(&first, "probe_collections_total"), Some(1.0));
    assert!(first.iter().all(|fam| {
        fam.points
            .iter()
            .all(|p| p.timestamp_ms == 1_700_000_000_000)
    }));
    let second = instance.collect(1_700_000_010_000).await.unwrap();
    assert_eq!(
        number(&second, "probe_collections_total"),
        Some(2.0),
        "state persists between calls"
    );
    assert!(PluginStats::get(&stats.memory_bytes) > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_plugins_fail_with_the_right_kind_and_a_fresh_instance_recovers() {
    let f = fixture();
    for (mode, expected) in [
        ("loop", &["timeout"][..]),
        ("memory", &["memory"]),
        ("recursion", &["trap"]),
        ("panic", &["trap"]),
        // Ten million series hit either the memory cap or the series cap first.
        ("series", &["memory", "limit"]),
        ("long-label", &["limit"]),
    ] {
        let (result, _) = collect(&f, &format!(r#"{{"mode":"{mode}"}}"#), Grants::default()).await;
        let err = result.expect_err(mode);
        assert!(
            expected.contains(&err.kind()),
            "{mode}: got {} ({err})",
            err.kind()
        );
        assert!(err.needs_restart(), "{mode}: {err}");
    }
    // The host is fine and the same component starts cleanly again.
    let (result, _) = collect(&f, r#"{"mode":"ok"}"#, Grants::default()).await;
    assert_eq!(number(&result.unwrap(), "probe_up"), Some(1.0));

    let (instance, _) = start(&f, r#"{"mode":"bad-init"}"#, Grants::default()).await;
    match instance {
        Err(PluginError::Init(message)) => assert!(message.contains("bad-init"), "{message}"),
        Err(other) => panic!("expected an init error, got {other}"),
        Ok(_) => panic!("bad-init was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_are_denied_unless_granted() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("temp");
    std::fs::write(&allowed, "48300\n").unwrap();

    // Nothing granted: file, exec and http are all refused, with the grant to add.
    for settings in [
        format!(r#"{{"mode":"read","path":"{}"}}"#, allowed.display()),
        r#"{"mode":"read","path":"/etc/shadow"}"#.to_owned(),
        r#"{"mode":"exec","program":"/bin/sh","args":"-c id"}"#.to_owned(),
        r#"{"mode":"http","url":"http://127.0.0.1:9/"}"#.to_owned(),
    ] {
        let (result, stats) = collect(&f, &settings, Grants::default()).await;
        match result {
            Err(PluginError::Collect(message)) => {
                assert!(
                    message.to_lowercase().contains("denied"),
                    "{settings}: {message}"
                )
            }
            other => panic!("{settings}: expected a denied error, got {other:?}"),
        }
        assert_eq!(stats.errors().get("denied"), Some(&1), "{settings}");
    }

    // Granted: the file is read, and a path outside the glob still is not.
    let grants = Grants {
        read_file: vec![format!("{}/*", dir.path().display())],
        ..Default::default()
    };
    let settings = format!(r#"{{"mode":"read","path":"{}"}}"#, allowed.display());
    let (result, _) = collect(&f, &settings, grants.clone()).await;
    assert_eq!(number(&result.unwrap(), "probe_read_bytes"), Some(6.0));
    // A symlink inside the granted directory pointing outside it is refused; a FIFO there
    // neither hangs the call nor is read.
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
    let settings = format!(
        r#"{{"mode":"read","path":"{}/link"}}"#,
        dir.path().display()
    );
    let (result, _) = collect(&f, &settings, grants.clone()).await;
    assert!(
        matches!(&result, Err(PluginError::Collect(m)) if m.to_lowercase().contains("denied") && m.contains("/etc/passwd")),
        "{result:?}"
    );
    let fifo = dir.path().join("fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let settings = format!(r#"{{"mode":"read","path":"{}"}}"#, fifo.display());
    let (result, _) = collect(&f, &settings, grants.clone()).await;
    assert!(
        matches!(&result, Err(PluginError::Collect(m)) if m.contains("not a regular file")),
        "{result:?}"
    );
    let sneaky = format!(
        r#"{{"mode":"read","path":"{}/../etc/passwd"}}"#,
        dir.path().display()
    );
    let (result, _) = collect(&f, &sneaky, grants).await;
    assert!(matches!(result, Err(PluginError::Collect(m)) if m.to_lowercase().contains("denied")));
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_only_the_granted_command_and_is_bounded() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("vcgencmd");
    std::fs::write(
        &script,
        "#!/bin/sh\nif [ \"$1\" = hang ]; then exec sleep 30; fi\necho \"temp=48.3'C\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let program = script.display().to_string();
    let grants = Grants {
        exec: vec![
            ExecGrant {
                program: program.clone(),
                args: vec!["measure_temp".into()],
            },
            ExecGrant {
                program: program.clone(),
                args: vec!["hang".into()],
            },
        ],
        exec_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let ok = format!(r#"{{"mode":"exec","program":"{program}","args":"measure_temp"}}"#);
    let (result, _) = collect(&f, &ok, grants.clone()).await;
    assert_eq!(
        number(&result.unwrap(), "probe_exec_stdout_bytes"),
        Some(12.0)
    );

    let other_args = format!(r#"{{"mode":"exec","program":"{program}","args":"get_throttled"}}"#);
    let (result, _) = collect(&f, &other_args, grants.clone()).await;
    assert!(matches!(result, Err(PluginError::Collect(m)) if m.to_lowercase().contains("denied")));

    // A command that hangs is killed at the grant's timeout; the plugin sees "timed out".
    let hang = format!(r#"{{"mode":"exec","program":"{program}","args":"hang"}}"#);
    let (result, stats) = collect(&f, &hang, grants).await;
    assert!(
        matches!(&result, Err(PluginError::Collect(m)) if m.to_lowercase().contains("timeout")),
        "{result:?}"
    );
    assert_eq!(stats.errors().get("host_timeout"), Some(&1));
}

#[tokio::test(flavor = "multi_thread")]
async fn http_reaches_only_allowlisted_prefixes_with_a_size_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let body = if request.starts_with("GET /big") {
                    "x".repeat(100_000)
                } else {
                    "{\"jobs\":[]}".to_owned()
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    let f = fixture();
    let grants = Grants {
        http: HttpGrant {
            allow: vec![format!("http://{addr}/jobs/"), format!("http://{addr}/big")],
            max_bytes: Some(10_000),
            ..Default::default()
        },
        ..Default::default()
    };
    let (result, _) = collect(
        &f,
        &format!(r#"{{"mode":"http","url":"http://{addr}/jobs/overview"}}"#),
        grants.clone(),
    )
    .await;
    let families = result.unwrap();
    assert_eq!(number(&families, "probe_http_body_bytes"), Some(11.0));
    let (result, _) = collect(
        &f,
        &format!(r#"{{"mode":"http","url":"http://{addr}/taskmanagers"}}"#),
        grants.clone(),
    )
    .await;
    assert!(matches!(result, Err(PluginError::Collect(m)) if m.to_lowercase().contains("denied")));
    let (result, _) = collect(
        &f,
        &format!(r#"{{"mode":"http","url":"http://{addr}/big"}}"#),
        grants,
    )
    .await;
    assert!(
        matches!(&result, Err(PluginError::Collect(m)) if m.to_lowercase().contains("toolarge")),
        "{result:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_spinning_plugin_does_not_hold_the_async_runtime() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let f = fixture();
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // One thread only: if the plugin's 500 ms spin never yielded, the ticker could not run.
    let (result, _) = collect(&f, r#"{"mode":"loop"}"#, Grants::default()).await;
    assert_eq!(result.expect_err("spinner").kind(), "timeout");
    let during = ticks.load(Ordering::Relaxed);
    ticker.abort();
    assert!(
        during >= 10,
        "the runtime was blocked while the plugin spun ({during} ticks)"
    );
}

/// Lists of strings whose elements all point at the same megabyte would make a host that
/// copies element by element allocate hundreds of gigabytes. The agent checks counts and
/// sizes before copying: the call fails inside the plugin as too large, quickly, and the
/// agent's own memory stays put.
#[tokio::test(flavor = "multi_thread")]
async fn aliased_argument_lists_are_refused_before_they_are_copied() {
    let f = fixture();
    let grants = Grants {
        exec: vec![ExecGrant {
            program: "/bin/true".into(),
            args: vec![],
        }],
        http: HttpGrant {
            allow: vec!["http://127.0.0.1:9/".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let url = r#","url":"http://127.0.0.1:9/x""#;
    // The first two trip the count checks, the last two the size checks.
    for (mode, extra) in [
        ("alias-exec", ""),
        ("alias-http", url),
        ("alias-exec-size", ""),
        ("alias-http-size", url),
    ] {
        reset_peak_resident();
        let rss_before = resident_bytes("VmRSS");
        let (result, _) = collect(
            &f,
            &format!(r#"{{"mode":"{mode}"{extra}}}"#),
            grants.clone(),
        )
        .await;
        match result {
            Err(PluginError::Collect(message)) => {
                assert!(message.contains("larger than"), "{mode}: {message}")
            }
            other => panic!("{mode}: expected a too-large error inside the plugin, got {other:?}"),
        }
        // The peak, not the current size: a copy made and freed must show too.
        let grown = resident_bytes("VmHWM").saturating_sub(rss_before);
        assert!(
            grown < 256 * 1024 * 1024,
            "{mode}: the agent grew by {grown} bytes while refusing the call"
        );
    }
}

/// Starts a new peak-resident measurement (`VmHWM`).
fn reset_peak_resident() {
    std::fs::write("/proc/self/clear_refs", "5").expect("/proc/self/clear_refs");
}

/// A resident-set figure of this process (`VmRSS`, or the peak `VmHWM`), from /proc.
fn resident_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("the field in /proc/self/status")
}

/// A CA and a server certificate for 127.0.0.1, as PEM, plus the server's TLS config.
fn tls_server_config(
    dir: &std::path::Path,
    server_ip: &str,
) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let mut server_params = CertificateParams::default();
    server_params
        .subject_alt_names
        .push(SanType::IpAddress(server_ip.parse().unwrap()));
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![server_cert.der().clone()], key)
    .unwrap();
    (ca_path, Arc::new(config))
}

/// `https://` works against the grant's own CA, and a server the grant's CA did not sign is
/// refused with a TLS error the plugin can read.
#[tokio::test(flavor = "multi_thread")]
async fn https_is_verified_against_the_grants_ca() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (ca_path, server_config) = tls_server_config(dir.path(), "127.0.0.1");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = vec![0u8; 4096];
                let _ = tls.read(&mut request).await;
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsecure",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let settings = format!(r#"{{"mode":"http","url":"https://{addr}/jobs/overview"}}"#);
    let grant = |ca: Option<std::path::PathBuf>| Grants {
        http: HttpGrant {
            allow: vec![format!("https://{addr}/jobs/")],
            ca,
            ..Default::default()
        },
        ..Default::default()
    };
    let (result, _) = collect(&f, &settings, grant(Some(ca_path))).await;
    let families = result.expect("https GET with the grant's CA");
    assert_eq!(number(&families, "probe_http_body_bytes"), Some(6.0));

    // Another CA does not vouch for this server, and neither does the system bundle.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _) = tls_server_config(other.path(), "127.0.0.1");
    for ca in [Some(other_ca), None] {
        let (result, _) = collect(&f, &settings, grant(ca.clone())).await;
        match result {
            Err(PluginError::Collect(message)) => assert!(message.contains("TLS"), "{message}"),
            other => panic!("an unverified server was accepted with {ca:?}: {other:?}"),
        }
    }
}

/// A certificate from the granted CA but for another address is refused: the name is checked,
/// not only the signature.
#[tokio::test(flavor = "multi_thread")]
async fn https_checks_the_servers_name() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (ca_path, server_config) = tls_server_config(dir.path(), "127.0.0.2");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let settings = format!(r#"{{"mode":"http","url":"https://{addr}/x"}}"#);
    let grants = Grants {
        http: HttpGrant {
            allow: vec![format!("https://{addr}/")],
            ca: Some(ca_path),
            ..Default::default()
        },
        ..Default::default()
    };
    match collect(&f, &settings, grants).await.0 {
        Err(PluginError::Collect(message)) => assert!(message.contains("TLS"), "{message}"),
        other => panic!("a certificate for another address was accepted: {other:?}"),
    }
}
