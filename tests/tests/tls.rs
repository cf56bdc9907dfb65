//! TLS and mutual TLS: who the aggregator lets in, and who an agent trusts.

use std::path::Path;
use std::time::Duration;

use picket_proto::v1;
use picket_tests::raw::{self, ClientTls};
use picket_tests::*;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
};

/// Opens a stream, sends one batch and returns the ack, or the error that stopped it.
async fn try_stream(
    agg: &Aggregator,
    tls: ClientTls<'_>,
    instance: &str,
) -> Result<v1::Ack, String> {
    let channel = raw::channel(&https(agg.grpc), Some(tls)).await?;
    let mut s = raw::open(channel, Some(raw::hello(instance, 1)))
        .await
        .map_err(|e| e.to_string())?;
    s.send_batch(raw::batch(
        1,
        instance,
        "tls_gauge",
        1,
        picket_core::model::now_ms(),
    ))
    .await;
    s.next().await.map_err(|e| e.to_string())
}

/// Signs a client certificate for `name` with the CA in `ca_dir`, valid between the two
/// offsets from now (days).
fn client_cert(
    ca_dir: &Path,
    out: &Path,
    name: &str,
    from_days: i64,
    to_days: i64,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        &ca_key,
    )
    .unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if !name.is_empty() {
        dn.push(DnType::CommonName, name);
    }
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(from_days);
    params.not_after = now + time::Duration::days(to_days);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (c, k) = (
        out.join(format!("{name}.pem")),
        out.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_accepts_fleet_certificates_and_rejects_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let agg = Aggregator::start_tls(dir.path(), &pki, true, None);
    let (cert, key) = pki.issue_agent("pi-01");

    // A fleet certificate: accepted, and its name is the identity whatever the hello claims.
    let ack = try_stream(
        &agg,
        ClientTls {
            ca: &pki.ca(),
            identity: Some((&cert, &key)),
        },
        "liar",
    )
    .await;
    assert!(ack.is_ok(), "valid client certificate refused: {ack:?}");
    let metrics = agg.metrics();
    assert!(
        metrics.contains("tls_gauge{instance=\"pi-01\",n=\"0\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("instance=\"liar\""), "{metrics}");

    // No client certificate while one is required.
    let r = try_stream(
        &agg,
        ClientTls {
            ca: &pki.ca(),
            identity: None,
        },
        "anon",
    )
    .await;
    assert!(r.is_err(), "stream without client certificate was accepted");

    // A certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    let other_pki = Pki::create(other.path());
    let (ocert, okey) = other_pki.issue_agent("intruder");
    let r = try_stream(
        &agg,
        ClientTls {
            ca: &pki.ca(),
            identity: Some((&ocert, &okey)),
        },
        "intruder",
    )
    .await;
    assert!(r.is_err(), "certificate from a foreign CA was accepted");

    // An expired certificate from the right CA, and one not yet valid.
    let (ecert, ekey) = client_cert(&pki.dir, dir.path(), "expired", -30, -1);
    let r = try_stream(
        &agg,
        ClientTls {
            ca: &pki.ca(),
            identity: Some((&ecert, &ekey)),
        },
        "expired",
    )
    .await;
    assert!(r.is_err(), "expired certificate was accepted");
    let (fcert, fkey) = client_cert(&pki.dir, dir.path(), "future", 1, 30);
    let r = try_stream(
        &agg,
        ClientTls {
            ca: &pki.ca(),
            identity: Some((&fcert, &fkey)),
        },
        "future",
    )
    .await;
    assert!(r.is_err(), "not-yet-valid certificate was accepted");

    // A fleet-signed certificate without a common name has no identity to use.
    let (ncert, nkey) = client_cert(&pki.dir, dir.path(), "", -1, 30);
    let r = try_stream(
        &agg,
        ClientTls {
            ca: &pki.ca(),
            identity: Some((&ncert, &nkey)),
        },
        "nameless",
    )
    .await;
    let err = r.expect_err("certificate without a name was accepted");
    assert!(err.contains("no common name"), "{err}");

    // None of the refused peers got in; the good one is still up.
    let metrics = agg.metrics();
    for name in ["anon", "intruder", "expired", "future", "nameless"] {
        assert!(
            !metrics.contains(&format!("agent=\"{name}\"")),
            "{name} got in:\n{metrics}"
        );
    }
    let again = try_stream(
        &agg,
        ClientTls {
            ca: &pki.ca(),
            identity: Some((&cert, &key)),
        },
        "pi-01",
    )
    .await;
    assert!(again.is_ok(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_tls_is_verified_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let agg = Aggregator::start_tls(dir.path(), &pki, false, None);

    // Server-only TLS: an agent with the right CA gets in.
    let ok = try_stream(
        &agg,
        ClientTls {
            ca: &pki.ca(),
            identity: None,
        },
        "tls-only",
    )
    .await;
    assert!(ok.is_ok(), "{ok:?}");

    // An agent that trusts another CA refuses the aggregator.
    let other = tempfile::tempdir().unwrap();
    let other_pki = Pki::create(other.path());
    let r = try_stream(
        &agg,
        ClientTls {
            ca: &other_pki.ca(),
            identity: None,
        },
        "wrong-ca",
    )
    .await;
    assert!(
        r.is_err(),
        "agent accepted a server certificate from an unknown CA"
    );

    // Plaintext gRPC against the TLS port fails.
    let plain = async {
        let channel = raw::channel(&http(agg.grpc), None).await?;
        let mut s = raw::open(channel, Some(raw::hello("plain", 1)))
            .await
            .map_err(|e| e.to_string())?;
        s.send_batch(raw::batch(1, "plain", "m", 1, picket_core::model::now_ms()))
            .await;
        s.next().await.map_err(|e| e.to_string())
    };
    let r = tokio::time::timeout(Duration::from_secs(20), plain)
        .await
        .expect("plaintext attempt hung");
    assert!(r.is_err(), "plaintext stream accepted by a TLS aggregator");
}

#[test]
fn real_agent_streams_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let agg = Aggregator::start_tls(dir.path(), &pki, true, None);
    let cert = pki.issue_agent("pi-mtls");
    let text = agent_config(
        "pi-mtls",
        &[https(agg.grpc)],
        Some(&pki),
        Some(&cert),
        "[labels]\nsite = \"lab\"",
    );
    let (_agent, _) = start_agent(dir.path(), "mtls", &text);
    let line = wait_for(
        "host metrics from the agent",
        Duration::from_secs(20),
        || {
            agg.metrics()
                .lines()
                .find(|l| l.starts_with("node_memory_MemTotal_bytes{"))
                .map(str::to_owned)
        },
    );
    assert!(
        line.contains("instance=\"pi-mtls\"") && line.contains("site=\"lab\""),
        "{line}"
    );

    // Without a client certificate the same agent is refused, and says so in its log.
    let text = agent_config("no-cert", &[https(agg.grpc)], Some(&pki), None, "");
    let (agent, _) = start_agent(dir.path(), "nocert", &text);
    wait_for(
        "the agent to log its refused connection",
        Duration::from_secs(20),
        || {
            agent
                .log_text()
                .contains("connection to aggregator lost")
                .then_some(())
                .or_else(|| {
                    agent
                        .log_text()
                        .contains("cannot connect to aggregator")
                        .then_some(())
                })
        },
    );
    assert!(!agg.metrics().contains("instance=\"no-cert\""));
}

/// Copies `from` over `to` the way rotation tools do: a new file renamed into place.
fn replace_file(from: &Path, to: &Path) {
    let temporary = to.with_extension("new");
    std::fs::copy(from, &temporary).unwrap();
    std::fs::rename(&temporary, to).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_certificates_and_client_ca_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old = Pki::create(&dir.path().join("old"));
    let new = Pki::create(&dir.path().join("new"));
    let spec = AggregatorSpec {
        pki: Some(&old),
        mutual_tls: true,
        journal: None,
        extra: String::new(),
    };
    // Reload checks every 200 ms here (10 s by default).
    let mut agg = Aggregator::start(dir.path(), &spec);
    let config = std::fs::read_to_string(&agg.config).unwrap();
    std::fs::write(
        &agg.config,
        config.replace("[tls]\n", "[tls]\nreload_interval = \"200ms\"\n"),
    )
    .unwrap();
    agg.process.kill9();
    agg.start_again(dir.path());

    let (old_cert, old_key) = old.issue_agent("pi-old");
    let (new_cert, new_key) = new.issue_agent("pi-new");
    let (new_ca, old_ca) = (new.ca(), old.ca());
    let as_new = || ClientTls {
        ca: &new_ca,
        identity: Some((&new_cert, &new_key)),
    };
    let as_old = || ClientTls {
        ca: &old_ca,
        identity: Some((&old_cert, &old_key)),
    };
    assert!(try_stream(&agg, as_old(), "pi-old").await.is_ok());
    assert!(
        try_stream(&agg, as_new(), "pi-new").await.is_err(),
        "the new fleet's agents cannot connect before the rotation"
    );
    // An established stream from before the rotation.
    let channel = raw::channel(&https(agg.grpc), Some(as_old()))
        .await
        .unwrap();
    let mut established = raw::open(channel, Some(raw::hello("pi-old", 7)))
        .await
        .unwrap();

    // A key that does not match the certificate (a rotation caught half-way) is not used.
    replace_file(
        &new.dir.join("aggregator.pem"),
        &old.dir.join("aggregator.pem"),
    );
    wait_for(
        "the refused half-rotation counted",
        Duration::from_secs(10),
        || {
            (agg.metric_value("picket_aggregator_tls_reloads_total{outcome=\"error\"}")
                >= Some(1.0))
            .then_some(())
        },
    );
    assert!(try_stream(&agg, as_old(), "pi-old").await.is_ok());

    // The rest of the rotation: key and client CA. New agents get in, old ones no more.
    replace_file(
        &new.dir.join("aggregator-key.pem"),
        &old.dir.join("aggregator-key.pem"),
    );
    // The aggregator's client_ca is old/tls/ca.pem.
    replace_file(&new.ca(), &old.ca());
    let connected = wait_for_async_ok(&agg, as_new, "pi-new").await;
    assert!(
        connected,
        "the new fleet could not connect after the rotation"
    );
    assert!(
        try_stream(&agg, as_old(), "pi-old").await.is_err(),
        "the old fleet's certificates are no longer trusted"
    );
    assert!(
        agg.metric_value("picket_aggregator_tls_reloads_total{outcome=\"success\"}") >= Some(1.0)
    );
    // The stream established before the rotation still works.
    established
        .send_batch(raw::batch(
            1,
            "pi-old",
            "tls_gauge",
            1,
            picket_core::model::now_ms(),
        ))
        .await;
    assert!(established.next().await.is_ok());
}

/// Retries `try_stream` until it succeeds (the reload is checked every 200 ms), for 10 s.
async fn wait_for_async_ok<'a>(
    agg: &Aggregator,
    tls: impl Fn() -> ClientTls<'a>,
    instance: &str,
) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if try_stream(agg, tls(), instance).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
