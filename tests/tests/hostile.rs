//! Hostile peers and bad input: the aggregator keeps serving good agents while peers attack
//! its gRPC port, and its HTTP port limits how long and how much a client may send.
//!
//! The gRPC test runs one attack after another against one aggregator with mutual TLS while
//! good agents (harness clients with fleet certificates) stream a batch every 100 ms; for
//! each attack it asserts what the attacker got and that the good agents kept being acked
//! within a generous bound, and prints their ack latency.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use picket_tests::hostile::*;
use picket_tests::raw::{self, ClientTls};
use picket_tests::servers::http_request;
use picket_tests::*;

/// A good agent's p99 ack latency during an attack must stay under this. Acks normally take
/// a few milliseconds; the bound is generous for a loaded two-core CI machine.
const ACK_P99_BOUND: Duration = Duration::from_secs(3);

/// One row of the latency table.
struct Row {
    attack: &'static str,
    acks: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Batches the real `picket-agent` had acked in the window.
    real_batches: f64,
}

/// Each attack's measuring window lasts at least this long (the attack, then its aftermath),
/// so every window holds a fair number of acks (three agents, ten rounds a second each).
const MIN_WINDOW: Duration = Duration::from_secs(2);
/// Acks the good agents must have had in a window: a third of what they normally get.
const MIN_ACKS: usize = 20;
/// The real agent's name (and certificate).
const REAL_AGENT: &str = "real-agent";

/// Watches the good agents (and the real agent's accepted batches) one attack at a time.
struct Observer<'a> {
    agg: &'a Aggregator,
    good: GoodAgents,
    rows: Vec<Row>,
    since: Instant,
    real_batches: f64,
}

impl<'a> Observer<'a> {
    fn new(agg: &'a Aggregator, good: GoodAgents) -> Observer<'a> {
        let mut observer = Observer {
            agg,
            good,
            rows: Vec::new(),
            since: Instant::now(),
            real_batches: 0.0,
        };
        observer.begin();
        observer
    }

    fn real_batches(&self) -> f64 {
        self.agg
            .metric_value(&format!(
                "picket_aggregator_agent_batches_total{{agent=\"{REAL_AGENT}\"}}"
            ))
            .unwrap_or(0.0)
    }

    /// Starts the window of the next attack.
    fn begin(&mut self) {
        self.good.take();
        self.since = Instant::now();
        self.real_batches = self.real_batches();
    }

    /// Waits out the rest of the window, then checks what the good agents saw in it: no
    /// failed stream, enough acks, p99 under the bound, and the real agent's batches still
    /// accepted. Adds the row for `attack`.
    async fn end(&mut self, attack: &'static str) {
        // A measuring window, not a wait for readiness.
        tokio::time::sleep_until((self.since + MIN_WINDOW).into()).await;
        let window = self.good.take();
        let real_batches = self.real_batches() - self.real_batches;
        assert!(
            real_batches >= 1.0,
            "{attack}: the real agent's batches stopped being accepted"
        );
        check_window(&mut self.rows, attack, window, MIN_ACKS, real_batches);
    }
}

/// Checks the good agents' window for `attack` and adds its row.
fn check_window(
    rows: &mut Vec<Row>,
    attack: &'static str,
    window: Window,
    min_acks: usize,
    real_batches: f64,
) {
    assert!(
        window.errors.is_empty(),
        "{attack}: good agents' streams failed: {:?}",
        window.errors
    );
    assert!(
        window.acks.len() >= min_acks,
        "{attack}: good agents got only {} acks (want at least {min_acks})",
        window.acks.len()
    );
    let row = Row {
        attack,
        acks: window.acks.len(),
        p50: window.quantile(0.5),
        p99: window.quantile(0.99),
        max: window.quantile(1.0),
        real_batches,
    };
    assert!(
        row.p99 <= ACK_P99_BOUND,
        "{attack}: good agents' p99 ack latency {:?} is over {ACK_P99_BOUND:?}",
        row.p99
    );
    rows.push(row);
}

fn print_table(rows: &[Row]) {
    println!("\ngood agents' ack latency per attack (and the real agent's accepted batches)");
    println!(
        "{:<50} {:>6} {:>10} {:>10} {:>10} {:>6}",
        "attack", "acks", "p50", "p99", "max", "real"
    );
    for r in rows {
        println!(
            "{:<50} {:>6} {:>10.1?} {:>10.1?} {:>10.1?} {:>6}",
            r.attack, r.acks, r.p50, r.p99, r.max, r.real_batches
        );
    }
}

/// Opens a stream with `tls`, sends one batch and returns the ack, or what stopped it.
async fn try_stream(grpc: SocketAddr, tls: ClientTls<'_>, name: &str) -> Result<(), String> {
    let channel = raw::channel(&https(grpc), Some(tls)).await?;
    let mut s = raw::open(channel, Some(raw::hello(name, 1)))
        .await
        .map_err(|e| e.to_string())?;
    s.send_batch(raw::batch(1, name, "m", 1, picket_core::model::now_ms()))
        .await;
    s.next().await.map(|_| ()).map_err(|e| e.to_string())
}

fn counter(agg: &Aggregator, name: &str) -> f64 {
    agg.metric_value(name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn good_agents_are_served_while_hostile_peers_attack_the_grpc_port() {
    // 2,000 idle connections, 200 stalled handshakes and the clients: well over the 1,024
    // open files many systems allow by default. The aggregator inherits the limit.
    let limit = raise_open_file_limit(8192);
    assert!(
        limit >= 4096,
        "open-file limit {limit}: this test needs 4096"
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let agg = start_aggregator(
        dir.path(),
        Some(&pki),
        "max_message_bytes = 262144\nhello_timeout = \"2s\"\nidle_timeout = \"4s\"\n\
         handshake_timeout = \"2s\"\nidle_connection_timeout = \"3s\"\nmax_connections = 1000\n",
        "",
        "",
    );
    let certs: Vec<(String, AgentCert)> = (1..=3)
        .map(|i| {
            let name = format!("good-{i}");
            let cert = AgentCert::issue(&pki, &name);
            (name, cert)
        })
        .collect();
    let good = GoodAgents::start(agg.grpc, certs).await;
    // And a real agent, whose batches must keep being accepted too.
    let real_cert = pki.issue_agent(REAL_AGENT);
    let text = agent_config(
        REAL_AGENT,
        &[https(agg.grpc)],
        Some(&pki),
        Some(&real_cert),
        "",
    );
    let (_real_agent, _) = start_agent(dir.path(), "real", &text);
    let real_batches = format!("picket_aggregator_agent_batches_total{{agent=\"{REAL_AGENT}\"}}");
    wait_until(
        "the real agent's first batch",
        Duration::from_secs(60),
        || (agg.metric_value(&real_batches).unwrap_or(0.0) > 0.0).then_some(()),
    )
    .await;
    let mut obs = Observer::new(&agg, good);

    // Baseline: nothing but the good agents.
    obs.end("none (baseline)").await;

    // No client certificate, and a certificate from another CA: refused, every time.
    let other = tempfile::tempdir().unwrap();
    let other_pki = Pki::create(other.path());
    let intruder = AgentCert::issue(&other_pki, "intruder");
    let ca = pki.ca();
    obs.begin();
    let started = Instant::now();
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..100 {
        let (grpc, ca, intruder) = (agg.grpc, ca.clone(), intruder.clone());
        attempts.spawn(async move {
            if i % 2 == 0 {
                let tls = ClientTls {
                    ca: &ca,
                    identity: None,
                };
                try_stream(grpc, tls, "anonymous").await
            } else {
                let tls = ClientTls {
                    ca: &ca,
                    identity: Some((&intruder.cert, &intruder.key)),
                };
                try_stream(grpc, tls, "intruder").await
            }
        });
    }
    while let Some(result) = attempts.join_next().await {
        let result = result.unwrap();
        assert!(
            result.is_err(),
            "a client without a fleet certificate got in"
        );
    }
    let metrics = agg.metrics();
    assert!(!metrics.contains("agent=\"anonymous\""), "{metrics}");
    assert!(!metrics.contains("agent=\"intruder\""), "{metrics}");
    let refused_in = started.elapsed();
    assert!(refused_in < Duration::from_secs(30), "{refused_in:?}");
    obs.end("100 clients without or with a foreign certificate")
        .await;

    // Garbage on the gRPC port: random bytes, and HTTP/1 text. Each connection is closed.
    obs.begin();
    let mut streams = Vec::new();
    for seed in 0..100u64 {
        streams.extend(open_connections(agg.grpc, 1, &garbage(4096, seed)).await);
    }
    streams.extend(
        open_connections(
            agg.grpc,
            100,
            b"GET /metrics HTTP/1.1\r\nHost: picket\r\n\r\n",
        )
        .await,
    );
    let n = streams.len();
    let (closed, took) = closed_within(streams, Duration::from_secs(10)).await;
    assert_eq!(closed, n, "garbage connections left open");
    println!("garbage: {n} connections closed by the aggregator within {took:?}");
    obs.end("200 connections sending garbage").await;

    // An oversized message ends only its own stream, with OUT_OF_RANGE.
    obs.begin();
    let big = AgentCert::issue(&pki, "big");
    let channel = raw::channel(&https(agg.grpc), Some(big.tls()))
        .await
        .unwrap();
    let mut s = raw::open(channel, Some(raw::hello("big", 1)))
        .await
        .unwrap();
    s.send_batch(raw::batch(
        1,
        "big",
        "huge",
        40_000,
        picket_core::model::now_ms(),
    ))
    .await;
    let status = s.next().await.expect_err("an oversized batch was accepted");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
    obs.end("an oversized message (over 256 KiB)").await;

    // Streams that never send a Hello are ended after hello_timeout.
    obs.begin();
    let silent = AgentCert::issue(&pki, "silent");
    let mut silent_streams = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (grpc, silent) = (agg.grpc, silent.clone());
        silent_streams.spawn(async move {
            let channel = raw::channel(&https(grpc), Some(silent.tls())).await?;
            let mut s = raw::open(channel, None).await.map_err(|e| e.to_string())?;
            let started = Instant::now();
            let status = s.next().await.err().ok_or("an ack without a hello")?;
            Ok::<_, String>((status, started.elapsed()))
        });
    }
    while let Some(result) = silent_streams.join_next().await {
        let (status, took) = result.unwrap().unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    obs.end("20 streams that never send Hello").await;

    // A client that sends batches and never reads its acks: its unread acks back up until
    // the aggregator stops reading it, then idle_timeout ends its stream.
    obs.begin();
    let deaf = AgentCert::issue(&pki, "deaf");
    let mut stuck = deaf_stream(agg.grpc, &deaf, "deaf").await.unwrap();
    let mut sent = 0u64;
    let mut stalled = false;
    for sequence in 1..=50_000u64 {
        let message = picket_proto::v1::AgentMessage {
            kind: Some(picket_proto::v1::agent_message::Kind::Batch(raw::batch(
                sequence,
                "deaf",
                "deaf_gauge",
                20,
                picket_core::model::now_ms(),
            ))),
        };
        match stuck.send(&message, Duration::from_secs(2)).await {
            Ok(true) => sent += 1,
            // The aggregator stopped reading (backpressure reached the client), or on a
            // slow machine has already ended the stream; the log below says which.
            Ok(false) | Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    assert!(
        stalled,
        "the aggregator kept reading a client that never reads its acks ({sent} batches)"
    );
    let stalled_at = Instant::now();
    wait_until(
        "the deaf client's stream to be closed",
        Duration::from_secs(20),
        || {
            let open = agg
                .metric_value("picket_aggregator_agent_open_streams{agent=\"deaf\"}")
                .unwrap_or(1.0);
            (open == 0.0).then_some(())
        },
    )
    .await;
    let closed_after = stalled_at.elapsed();
    // Closed for not reading its acks, not for going quiet.
    let log = agg.process.log_text();
    assert!(log.contains("acks not read"), "{log}");
    // With its stream gone the connection carries none, and is closed in its turn.
    wait_until(
        "the deaf client's connection to be closed",
        Duration::from_secs(20),
        || stuck.connection_closed().then_some(()),
    )
    .await;
    obs.end("a client that never reads its acks").await;
    println!(
        "deaf client: {sent} batches sent before backpressure stopped it; stream closed {closed_after:?} later"
    );

    // 2,000 idle TCP connections and 200 stalled TLS handshakes against max_connections =
    // 1000: the oldest idle ones make room for newer ones, the good agents' connections
    // (which stream) are never touched, a new good agent still gets in, and every idle or
    // stalled connection is closed within its timeout.
    let evicted_before = counter(
        &agg,
        "picket_aggregator_grpc_connections_closed_total{reason=\"evicted\"}",
    );
    obs.begin();
    let flood_started = Instant::now();
    let idle = open_connections(agg.grpc, 2000, &[]).await;
    let stalled = open_connections(agg.grpc, 200, PARTIAL_CLIENT_HELLO).await;
    println!(
        "flood: {} idle and {} stalled connections opened in {:?}",
        idle.len(),
        stalled.len(),
        flood_started.elapsed()
    );
    let newcomer = AgentCert::issue(&pki, "newcomer");
    try_stream(agg.grpc, newcomer.tls(), "newcomer")
        .await
        .expect("a new agent was locked out by idle connections");
    let (idle_n, stalled_n) = (idle.len(), stalled.len());
    let (idle_task, stalled_task) = (
        tokio::spawn(closed_within(idle, Duration::from_secs(15))),
        tokio::spawn(closed_within(stalled, Duration::from_secs(15))),
    );
    let (idle_closed, idle_took) = idle_task.await.unwrap();
    let (stalled_closed, stalled_took) = stalled_task.await.unwrap();
    assert_eq!(idle_closed, idle_n, "idle connections left open");
    assert_eq!(stalled_closed, stalled_n, "stalled handshakes left open");
    println!(
        "flood: all idle closed within {idle_took:?}, all stalled handshakes within {stalled_took:?}"
    );
    let evicted = counter(
        &agg,
        "picket_aggregator_grpc_connections_closed_total{reason=\"evicted\"}",
    ) - evicted_before;
    assert!(evicted > 0.0, "no connection was evicted at the cap");
    obs.end("2,000 idle TCP + 200 stalled TLS handshakes").await;

    let metrics = agg.metrics();
    for name in [
        "picket_aggregator_grpc_connections ",
        "picket_aggregator_grpc_connections_accepted_total",
        "picket_aggregator_grpc_connections_closed_total",
        "picket_aggregator_streams_refused_total",
    ] {
        for line in metrics.lines().filter(|l| l.starts_with(name)) {
            println!("{line}");
        }
    }
    let Observer { good, rows, .. } = obs;
    good.stop().await;
    print_table(&rows);
}

/// An aggregator with both push receivers and a journal, plaintext, and these `[http]` keys.
fn http_aggregator(dir: &std::path::Path, http: &str) -> Aggregator {
    let rest = format!(
        "[receivers.pushgateway]\nenabled = true\nmax_body_bytes = 4096\n\
         [receivers.influxdb]\nenabled = true\nmax_body_bytes = 4096\n\
         [[sinks]]\ntype = \"file\"\npath = \"{}\"\n",
        dir.join("journal.jsonl").display()
    );
    start_aggregator(dir, None, "", http, &rest)
}

/// Sends a request head announcing `length` body bytes, then the body one byte every
/// `every`; returns the status and text the server answered with, and when.
fn trickle(
    addr: SocketAddr,
    head: &str,
    length: usize,
    every: Duration,
) -> (u16, String, Duration) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let started = Instant::now();
    write!(stream, "{head}Content-Length: {length}\r\n\r\n").unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next_byte = Instant::now();
    let mut sent = 0;
    // Bounded: the body's bytes plus a few seconds to read the answer.
    let give_up = started + every * length as u32 + Duration::from_secs(5);
    while Instant::now() < give_up {
        if sent < length && Instant::now() >= next_byte {
            // A refused write means the server closed; the answer may still be readable.
            let _ = stream.write_all(b"x");
            sent += 1;
            next_byte += every;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        if response.windows(4).any(|w| w == b"\r\n\r\n") && response.ends_with(b"\n") {
            break;
        }
    }
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text, elapsed)
}

#[test]
fn http_bodies_that_are_too_large_malformed_or_too_slow_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agg = http_aggregator(dir.path(), "body_read_timeout = \"2s\"\n");
    let text = [("Content-Type", "text/plain; version=0.0.4")];

    // Over max_body_bytes: 413, saying which limit.
    let big = "x 1\n".repeat(2000);
    let r = http_request(agg.http, "PUT", "/metrics/job/big", &text, big.as_bytes()).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.text()
            .contains("receivers.pushgateway.max_body_bytes (4096 bytes)"),
        "{}",
        r.text()
    );
    let line = "m,host=a v=1i\n".repeat(400);
    let r = http_request(agg.http, "POST", "/write?db=x", &[], line.as_bytes()).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.text().contains("receivers.influxdb.max_body_bytes"),
        "{}",
        r.text()
    );

    // Malformed: 400 with what is wrong and where.
    let r = http_request(
        agg.http,
        "PUT",
        "/metrics/job/bad",
        &text,
        b"# TYPE m gauge\nm{a=\"unterminated} 1\n",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("cannot parse the push"), "{}", r.text());
    let r = http_request(agg.http, "POST", "/write?db=x", &[], b"m,host=a\n").unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("unable to parse line 1"), "{}", r.text());
    let r = http_request(
        agg.http,
        "POST",
        "/write?db=x",
        &[("Content-Encoding", "gzip")],
        b"not gzip at all",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("bad gzip body"), "{}", r.text());

    // A body that trickles in, a byte every 300 ms: cut off with 408 after
    // body_read_timeout, on both receivers.
    for (head, receiver) in [
        (
            "PUT /metrics/job/slow HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n",
            "pushgateway",
        ),
        ("POST /write?db=x HTTP/1.1\r\nHost: a\r\n", "influxdb"),
    ] {
        let (status, response, took) = trickle(agg.http, head, 100, Duration::from_millis(300));
        assert_eq!(status, 408, "{receiver}: {response}");
        assert!(response.contains("http.body_read_timeout"), "{response}");
        assert!(
            took >= Duration::from_millis(1800) && took < Duration::from_secs(10),
            "{receiver}: answered after {took:?}"
        );
        let outcome = agg
            .metric_value(&format!(
                "picket_receiver_requests_total{{outcome=\"timeout\",receiver=\"{receiver}\"}}"
            ))
            .unwrap_or(0.0);
        assert_eq!(outcome, 1.0, "{receiver}");
    }
    assert_eq!(
        agg.metric_value("picket_aggregator_http_body_timeouts_total"),
        Some(2.0)
    );

    // Nothing of the refused requests arrived; a good push still does.
    let r = http_request(
        agg.http,
        "PUT",
        "/metrics/job/good",
        &text,
        b"# TYPE ok gauge\nok 1\n",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = agg.metrics();
    assert!(metrics.contains("ok{job=\"good\"} 1"), "{metrics}");
    assert!(!metrics.contains("job=\"slow\""), "{metrics}");
    assert!(!metrics.contains("job=\"big\""), "{metrics}");
}

#[test]
fn http_slow_loris_clients_are_cut_off_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let agg = http_aggregator(dir.path(), "header_read_timeout = \"3s\"\n");
    let head = b"GET /metrics HTTP/1.1\r\nHost: picket\r\nUser-Agent: slow\r\nAccept: */*\r\n\r\n";

    // Twenty clients send their request head one byte per second, each in a thread.
    let started = Instant::now();
    let lorises: Vec<_> = (0..20)
        .map(|_| {
            let addr = agg.http;
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_millis(1000)))
                    .unwrap();
                let mut buf = [0u8; 1024];
                for byte in head {
                    if stream.write_all(&[*byte]).is_err() {
                        return Instant::now();
                    }
                    // Waiting a second between bytes, noticing a close meanwhile.
                    match stream.read(&mut buf) {
                        Ok(0) => return Instant::now(),
                        Ok(_) => return Instant::now(), // an error answer, then the close
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => return Instant::now(),
                    }
                }
                panic!("a slow-loris client sent its whole head and was not cut off");
            })
        })
        .collect();

    // Meanwhile, on other connections, requests are served at once.
    let mut served = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let (status, _) = http_get(agg.http, "/healthz").unwrap();
        assert_eq!(status, 200);
        served.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(200)); // spreads the requests over the attack
    }
    let slowest = served.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(1),
        "a normal request took {slowest:?} during the slow-loris attack"
    );
    for loris in lorises {
        let cut = loris.join().unwrap().duration_since(started);
        assert!(
            cut >= Duration::from_millis(2500) && cut < Duration::from_secs(8),
            "slow-loris client cut off after {cut:?} (header_read_timeout is 3s)"
        );
    }
    println!("slow-loris: 20 clients cut off; normal requests took at most {slowest:?}");
    wait_for(
        "header timeouts to be counted",
        Duration::from_secs(5),
        || {
            (agg.metric_value("picket_aggregator_http_header_timeouts_total") >= Some(20.0))
                .then_some(())
        },
    );
}

#[test]
fn http_connections_over_the_cap_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let agg = http_aggregator(
        dir.path(),
        "max_connections = 10\nheader_read_timeout = \"30s\"\n",
    );
    // Ten idle connections fill the port (each waits for a request head).
    let held: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(agg.http).unwrap())
        .collect();
    // The kernel hands connections over in the order they came, so by the time the
    // aggregator accepts the next one it has accepted (and counted) these ten.
    // Over the cap: closed at once, not queued.
    for _ in 0..5 {
        let started = Instant::now();
        let mut extra = TcpStream::connect(agg.http).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n");
        let mut buf = [0u8; 64];
        let n = extra.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "a connection over the cap was served");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Once the idle ones go, requests are served again and the refusals were counted.
    drop(held);
    wait_for("the port to serve again", Duration::from_secs(10), || {
        matches!(http_get(agg.http, "/healthz"), Ok((200, _))).then_some(())
    });
    let refused = agg
        .metric_value("picket_aggregator_http_connections_refused_total")
        .unwrap_or(0.0);
    assert!(refused >= 5.0, "refused {refused}");
}
