//! The wire protocol against a real aggregator process: acks, duplicate resends, and the clear
//! statuses for peers that break the rules, while good agents carry on.

use picket_proto::v1;
use picket_tests::raw::{self, RawStream};
use picket_tests::*;
use tonic::Code;

async fn open(agg: &Aggregator, hello: Option<v1::Hello>) -> Result<RawStream, tonic::Status> {
    let channel = raw::channel(&http(agg.grpc), None).await.expect("connect");
    raw::open(channel, hello).await
}

fn accepted(ack: &v1::Ack) -> Option<bool> {
    match &ack.outcome {
        Some(v1::ack::Outcome::Accepted(a)) => Some(a.duplicate),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_are_acked_in_order_and_resends_are_not_applied_twice() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.jsonl");
    let agg = Aggregator::start_plaintext(dir.path(), Some(journal.clone()));
    let now = picket_core::model::now_ms();

    let mut s = open(&agg, Some(raw::hello("raw-1", 42))).await.unwrap();
    for seq in 1..=3 {
        s.send_batch(raw::batch(
            seq,
            "raw-1",
            "roundtrip_gauge",
            5,
            now + seq as i64,
        ))
        .await;
    }
    for seq in 1..=3 {
        let ack = s.next().await.unwrap();
        assert_eq!(ack.sequence, seq);
        assert_eq!(accepted(&ack), Some(false));
    }
    drop(s);

    // Same session reconnects and resends batch 3 (its ack was "lost"), then sends 4.
    let mut s = open(&agg, Some(raw::hello("raw-1", 42))).await.unwrap();
    s.send_batch(raw::batch(3, "raw-1", "roundtrip_gauge", 5, now + 3))
        .await;
    s.send_batch(raw::batch(4, "raw-1", "roundtrip_gauge", 5, now + 4))
        .await;
    assert_eq!(
        accepted(&s.next().await.unwrap()),
        Some(true),
        "resend must be acked as duplicate"
    );
    assert_eq!(accepted(&s.next().await.unwrap()), Some(false));

    let j = picket_tests::journal::read(&journal);
    assert_eq!(
        j.commits.iter().map(|c| c.2).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(j.points.len(), 4 * 5);
    j.assert_each_series_once_in_order();
    // The values decoded by the aggregator are the ones sent.
    let p = j
        .points
        .iter()
        .find(|p| p.labels.get("n").map(String::as_str) == Some("3"))
        .unwrap();
    assert_eq!(p.value, Some(3.0));
    assert_eq!(p.timestamp_ms, now + 1);

    let metrics = agg.metrics();
    assert!(
        metrics.contains(&format!(
            "roundtrip_gauge{{instance=\"raw-1\",n=\"4\"}} 4 {}",
            now + 4
        )),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "picket_aggregator_agent_duplicate_batches_total{agent=\"raw-1\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_batch_is_rejected_and_the_stream_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_plaintext(dir.path(), None);
    let now = picket_core::model::now_ms();
    let mut s = open(&agg, Some(raw::hello("raw-2", 1))).await.unwrap();
    let mut bad = raw::batch(1, "raw-2", "m", 2, now);
    bad.families[0].series[0].labels[0] = 999;
    s.send_batch(bad).await;
    s.send_batch(raw::batch(2, "raw-2", "m", 2, now)).await;
    let ack = s.next().await.unwrap();
    match ack.outcome {
        Some(v1::ack::Outcome::Rejected(r)) => {
            assert!(r.reason.contains("symbol index 999"), "{}", r.reason)
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(accepted(&s.next().await.unwrap()), Some(false));
    assert_eq!(
        agg.metric_value("picket_aggregator_agent_rejected_batches_total{agent=\"raw-2\"}"),
        Some(1.0)
    );
}

/// A histogram batch of one series with `buckets` as (upper bound, cumulative count).
fn histogram_batch(
    sequence: u64,
    timestamp_ms: i64,
    count: u64,
    buckets: &[(f64, u64)],
) -> v1::Batch {
    use picket_core::model::{Family, Histogram, Labels, MetricType, Point, Value};
    let mut family = Family::new("job_latency", MetricType::Histogram, "");
    family.points.push(Point {
        labels: Labels::from_pairs([("operator", "map")]),
        timestamp_ms,
        value: Value::Histogram(Histogram {
            count,
            sum: 1.5,
            buckets: buckets.to_vec(),
        }),
    });
    let mut encoder =
        picket_core::codec::BatchEncoder::new(&Labels::from_pairs([("instance", "raw-k")]));
    encoder.push(&family);
    encoder.finish(sequence)
}

/// The reason of a rejection, or a panic naming what came instead.
fn rejection(ack: &v1::Ack) -> &str {
    match &ack.outcome {
        Some(v1::ack::Outcome::Rejected(r)) => &r.reason,
        other => panic!(
            "expected a rejection of batch {}, got {other:?}",
            ack.sequence
        ),
    }
}

/// Ingest checks a batch shaped like the stream's last valid one (the same skeleton) only
/// point by point: a bad timestamp or out-of-order buckets in such a batch must still be
/// rejected with the full check's reason, its neighbours accepted and stored, and a rejected
/// batch's shape must not count as known. With the `/metrics` store on and off.
#[tokio::test(flavor = "multi_thread")]
async fn batches_shaped_like_the_last_valid_one_still_have_their_points_checked() {
    for exposition in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let spec = AggregatorSpec {
            pki: None,
            mutual_tls: false,
            journal: None,
            extra: format!("\n[exposition]\nenabled = {exposition}\n"),
        };
        let agg = Aggregator::start(dir.path(), &spec);
        let now = picket_core::model::now_ms();
        let mut s = open(&agg, Some(raw::hello("raw-k", 7))).await.unwrap();
        let good = |seq, ts| histogram_batch(seq, ts, 4, &[(0.1, 1), (1.0, 3)]);
        // A bad batch first: its shape is not learnt, so the same shape is checked in full.
        s.send_batch(histogram_batch(1, now, 4, &[(0.1, 3), (1.0, 1)]))
            .await;
        s.send_batch(histogram_batch(2, now, 4, &[(0.1, 3), (1.0, 1)]))
            .await;
        s.send_batch(good(3, now)).await;
        // Same skeleton as batch 3, bad in its points only.
        s.send_batch(good(4, -5)).await;
        s.send_batch(histogram_batch(5, now + 1, 4, &[(0.1, 3), (1.0, 1)]))
            .await;
        s.send_batch(histogram_batch(6, now + 2, 2, &[(0.1, 1), (1.0, 3)]))
            .await;
        s.send_batch(good(7, now + 3)).await;
        let acks: Vec<v1::Ack> = futures_acks(&mut s, 7).await;
        assert!(
            rejection(&acks[0]).contains("bucket"),
            "{}",
            rejection(&acks[0])
        );
        assert!(
            rejection(&acks[1]).contains("bucket"),
            "{}",
            rejection(&acks[1])
        );
        assert_eq!(accepted(&acks[2]), Some(false));
        assert!(
            rejection(&acks[3]).contains("timestamp"),
            "{}",
            rejection(&acks[3])
        );
        assert!(
            rejection(&acks[4]).contains("bucket"),
            "{}",
            rejection(&acks[4])
        );
        assert!(
            rejection(&acks[5]).contains("bucket"),
            "{}",
            rejection(&acks[5])
        );
        assert_eq!(accepted(&acks[6]), Some(false));

        let metrics = agg.metrics();
        assert_eq!(
            metric_value(
                &metrics,
                "picket_aggregator_agent_rejected_batches_total{agent=\"raw-k\"}"
            ),
            Some(5.0)
        );
        // Two accepted batches of 5 samples each (two buckets, +Inf, sum and count).
        let samples = metric_value(
            &metrics,
            "picket_aggregator_agent_samples_total{agent=\"raw-k\"}",
        );
        assert_eq!(samples, Some(2.0 * 5.0), "{metrics}");
        let stored = format!(
            "job_latency_count{{instance=\"raw-k\",operator=\"map\"}} 4 {}",
            now + 3
        );
        assert_eq!(metrics.contains(&stored), exposition, "{metrics}");
    }
}

async fn futures_acks(s: &mut RawStream, n: usize) -> Vec<v1::Ack> {
    let mut acks = Vec::with_capacity(n);
    for _ in 0..n {
        acks.push(s.next().await.expect("an ack"));
    }
    acks
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_violations_end_only_that_stream_with_a_clear_status() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_plaintext(dir.path(), None);
    let now = picket_core::model::now_ms();

    // A good agent streams throughout.
    let mut good = open(&agg, Some(raw::hello("good", 7))).await.unwrap();
    good.send_batch(raw::batch(1, "good", "g", 1, now)).await;
    assert_eq!(accepted(&good.next().await.unwrap()), Some(false));

    // No hello: the first message is a batch.
    let mut s = open(&agg, None).await.unwrap();
    s.send_batch(raw::batch(1, "x", "m", 1, now)).await;
    let status = s.next().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("must be Hello"), "{status}");

    // Empty identity without a certificate.
    let mut s = open(&agg, Some(raw::hello("", 1))).await.unwrap();
    let status = s.next().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Oversized batch (limit is 4 MiB by default).
    let mut s = open(&agg, Some(raw::hello("big", 1))).await.unwrap();
    let mut big = raw::batch(1, "big", "m", 1, now);
    big.symbols.push("x".repeat(5 * 1024 * 1024));
    s.send_batch(big).await;
    let status = s.next().await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status}");

    // Sequence going backwards.
    let mut s = open(&agg, Some(raw::hello("seq", 1))).await.unwrap();
    s.send_batch(raw::batch(5, "seq", "m", 1, now)).await;
    s.send_batch(raw::batch(5, "seq", "m", 1, now + 1)).await;
    assert_eq!(accepted(&s.next().await.unwrap()), Some(false));
    let status = s.next().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("does not increase"), "{status}");

    // A batch whose bytes are not a picket.v1.Batch (field 1 with the wrong wire type).
    let channel = raw::channel(&http(agg.grpc), None).await.expect("connect");
    let mut s = raw::open_bytes(channel, raw::hello("junk", 1))
        .await
        .unwrap();
    let junk = v1::ReceivedAgentMessage {
        kind: Some(v1::received_agent_message::Kind::Batch(
            bytes::Bytes::from_static(b"\x0a\x01\x01").into(),
        )),
    };
    s.tx.send(junk).await.unwrap();
    let status = s.next().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(
        status.message().contains("not a valid picket.v1.Batch"),
        "{status}"
    );

    // The good agent never noticed.
    good.send_batch(raw::batch(2, "good", "g", 1, now + 1))
        .await;
    assert_eq!(accepted(&good.next().await.unwrap()), Some(false));
    let metrics = agg.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "picket_aggregator_streams_refused_total{reason=\"no_hello\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "picket_aggregator_agent_up{agent=\"good\"}"),
        Some(1.0)
    );
}

/// Agents compress with zstd by default, and the aggregator decompresses their messages
/// itself (aggregator/src/grpc_zstd.rs): batches of either compression are acked alike, and
/// a message that decompresses past `max_message_bytes` ends its stream with the status tonic
/// gives for it, while a stream on the same connection carries on.
#[tokio::test(flavor = "multi_thread")]
async fn compressed_batches_are_read_and_decompression_is_bounded() {
    use tonic::codec::CompressionEncoding::{Gzip, Zstd};
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_plaintext(dir.path(), None);
    let now = picket_core::model::now_ms();
    let channel = raw::channel(&http(agg.grpc), None).await.expect("connect");

    for (n, compression) in [None, Some(Zstd), Some(Gzip)].into_iter().enumerate() {
        let agent = format!("compressed-{n}");
        let mut s = raw::open_compressed(channel.clone(), Some(raw::hello(&agent, 1)), compression)
            .await
            .unwrap();
        for seq in 1..=3 {
            let batch = raw::batch(seq, &agent, "m", 500, now + seq as i64);
            s.send_batch(batch).await;
            let ack = s.next().await.unwrap();
            assert_eq!(
                (ack.sequence, accepted(&ack)),
                (seq, Some(false)),
                "{compression:?}"
            );
        }
    }
    let metrics = agg.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "picket_aggregator_agent_samples_total{agent=\"compressed-1\"}"
        ),
        Some(1500.0),
        "every sample of the zstd stream counted"
    );

    // 5 MiB of one symbol, a few KiB compressed: past the 4 MiB limit once decompressed.
    let mut good = raw::open_compressed(channel.clone(), Some(raw::hello("good", 1)), Some(Zstd))
        .await
        .unwrap();
    let mut bomb = raw::open_compressed(channel.clone(), Some(raw::hello("bomb", 1)), Some(Zstd))
        .await
        .unwrap();
    let mut big = raw::batch(1, "bomb", "m", 1, now);
    big.symbols.push("x".repeat(5 * 1024 * 1024));
    bomb.send_batch(big).await;
    let status = bomb.next().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("size limit, of 4194304 bytes"),
        "{status}"
    );
    good.send_batch(raw::batch(1, "good", "g", 1, now)).await;
    assert_eq!(accepted(&good.next().await.unwrap()), Some(false));
}

#[test]
fn health_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_plaintext(dir.path(), None);
    assert_eq!(
        http_get(agg.http, "/healthz").unwrap(),
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        http_get(agg.http, "/readyz").unwrap(),
        (200, "ready\n".to_owned())
    );
    assert_eq!(http_get(agg.http, "/nonexistent").unwrap().0, 404);
    let metrics = agg.metrics();
    assert!(
        metrics.contains("# TYPE picket_aggregator_build_info gauge"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_grpc_port_does_not_hurt_the_aggregator() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_plaintext(dir.path(), None);
    for _ in 0..20 {
        let mut c = std::net::TcpStream::connect(agg.grpc).unwrap();
        let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\x01\x02garbage\xff\xfe");
    }
    let now = picket_core::model::now_ms();
    let mut s = open(&agg, Some(raw::hello("after-garbage", 1)))
        .await
        .unwrap();
    s.send_batch(raw::batch(1, "after-garbage", "m", 1, now))
        .await;
    assert_eq!(accepted(&s.next().await.unwrap()), Some(false));
}
