//! Harness for the hostile-peer tests: an aggregator started with chosen `[grpc]` and
//! `[http]` limits, good agents (gRPC clients over mutual TLS) that keep streaming and time
//! every ack while an attack runs, and the raw-socket attackers (idle and garbage
//! connections, stalled TLS handshakes, slow HTTP clients).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use picket_proto::v1::{self, agent_message};
use prost::Message;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::raw::{self, ClientTls};
use crate::{Aggregator, Pki, Process, bin, free_port, https};

/// Starts an aggregator whose `[grpc]` and `[http]` sections get `grpc` and `http` added
/// (TOML keys, one a line), with mutual TLS from `pki` or plaintext without, and `rest`
/// (further sections) at the end; waits until it is ready.
pub fn start_aggregator(
    dir: &Path,
    pki: Option<&Pki>,
    grpc: &str,
    http: &str,
    rest: &str,
) -> Aggregator {
    let grpc_addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http_addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tls = match pki {
        Some(pki) => format!(
            "cert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            pki.dir.join("aggregator.pem").display(),
            pki.dir.join("aggregator-key.pem").display(),
            pki.ca().display()
        ),
        None => "insecure = true\n".to_owned(),
    };
    let text = format!(
        "[grpc]\nlisten = \"{grpc_addr}\"\n{grpc}\n[http]\nlisten = \"{http_addr}\"\n{http}\n[tls]\n{tls}\n{rest}\n"
    );
    let config = dir.join(format!("aggregator-{}.toml", grpc_addr.port()));
    std::fs::write(&config, text).expect("write aggregator config");
    let mut cmd = Command::new(bin("picket-aggregator"));
    cmd.arg("--config").arg(&config);
    let process = Process::spawn(
        cmd,
        dir.join(format!("aggregator-{}.log", grpc_addr.port())),
    );
    let agg = Aggregator {
        process,
        grpc: grpc_addr,
        http: http_addr,
        config,
    };
    agg.wait_ready();
    agg
}

/// Raises this process's open-file limit to at least `want` (up to the hard limit), for
/// tests that hold thousands of sockets; child processes inherit it. Returns the limit now
/// in force.
pub fn raise_open_file_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes (the async twin of
/// [`crate::wait_for`]).
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent certificate's files.
#[derive(Clone)]
pub struct AgentCert {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl AgentCert {
    pub fn issue(pki: &Pki, name: &str) -> AgentCert {
        let (cert, key) = pki.issue_agent(name);
        AgentCert {
            ca: pki.ca(),
            cert,
            key,
        }
    }

    pub fn tls(&self) -> ClientTls<'_> {
        ClientTls {
            ca: &self.ca,
            identity: Some((&self.cert, &self.key)),
        }
    }
}

/// What the good agents saw in one window of time.
#[derive(Debug, Default)]
pub struct Window {
    /// Time from sending each batch to its ack.
    pub acks: Vec<Duration>,
    /// Streams that failed (the agent reconnected after each).
    pub errors: Vec<String>,
}

impl Window {
    /// The `p`-quantile (0..=1) of the ack latencies.
    pub fn quantile(&self, p: f64) -> Duration {
        let mut sorted = self.acks.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }
}

/// Good agents: each streams a small batch every 100 ms over mutual TLS, waits for its ack
/// and records how long it took. They run until [`GoodAgents::stop`].
pub struct GoodAgents {
    stop: watch::Sender<bool>,
    window: Arc<Mutex<Window>>,
    tasks: JoinSet<()>,
}

impl GoodAgents {
    /// Starts `certs.len()` agents against `grpc` and waits until each has had an ack.
    pub async fn start(grpc: SocketAddr, certs: Vec<(String, AgentCert)>) -> GoodAgents {
        let (stop, stop_rx) = watch::channel(false);
        let window = Arc::new(Mutex::new(Window::default()));
        let first_acks = Arc::new(Mutex::new(0usize));
        let mut tasks = JoinSet::new();
        let count = certs.len();
        for (name, cert) in certs {
            tasks.spawn(good_agent(
                grpc,
                name,
                cert,
                stop_rx.clone(),
                window.clone(),
                first_acks.clone(),
            ));
        }
        wait_until(
            "every good agent's first ack",
            Duration::from_secs(30),
            || (*first_acks.lock().unwrap() >= count).then_some(()),
        )
        .await;
        let agents = GoodAgents {
            stop,
            window,
            tasks,
        };
        agents.take();
        agents
    }

    /// What was recorded since the last call.
    pub fn take(&self) -> Window {
        std::mem::take(&mut *self.window.lock().unwrap())
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let deadline = Duration::from_secs(30);
        let _ = tokio::time::timeout(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// Rounds one good agent makes at most (10 per second): a bound on its loop.
const GOOD_AGENT_MAX_ROUNDS: u64 = 100_000;

async fn good_agent(
    grpc: SocketAddr,
    name: String,
    cert: AgentCert,
    mut stop: watch::Receiver<bool>,
    window: Arc<Mutex<Window>>,
    first_acks: Arc<Mutex<usize>>,
) {
    let session = picket_core::model::now_ms() as u64;
    let mut sequence = 0u64;
    let mut first = true;
    let mut rounds = 0u64;
    'connect: while !*stop.borrow() && rounds < GOOD_AGENT_MAX_ROUNDS {
        let stream = match raw::channel(&https(grpc), Some(cert.tls())).await {
            Ok(channel) => raw::open(channel, Some(raw::hello(&name, session)))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                window.lock().unwrap().errors.push(format!("{name}: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while rounds < GOOD_AGENT_MAX_ROUNDS {
            rounds += 1;
            sequence += 1;
            let sent = Instant::now();
            stream
                .send_batch(raw::batch(
                    sequence,
                    &name,
                    "good_gauge",
                    5,
                    picket_core::model::now_ms(),
                ))
                .await;
            match stream.next().await {
                Ok(_) => {
                    window.lock().unwrap().acks.push(sent.elapsed());
                    if first {
                        first = false;
                        *first_acks.lock().unwrap() += 1;
                    }
                }
                Err(status) => {
                    window
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("{name}: {status}"));
                    continue 'connect;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => break 'connect,
            }
        }
    }
}

/// A gRPC stream whose acks are never read, written on a raw HTTP/2 connection: its receive
/// windows are small (64 KiB) and it buffers any number of small frames, so unread acks fill
/// the window and the aggregator's writes back up, as with a peer that is stuck or hostile.
/// (tonic's client would end its own connection after a few hundred unread acks: h2 limits
/// how many small DATA frames it buffers.) The connection itself keeps working: it answers
/// the aggregator's pings.
pub struct DeafStream {
    send: h2::SendStream<Bytes>,
    _response: h2::client::ResponseFuture,
    connection: tokio::task::JoinHandle<()>,
}

/// Opens a [`DeafStream`] with `cert` and sends its Hello as `name`.
pub async fn deaf_stream(
    grpc: SocketAddr,
    cert: &AgentCert,
    name: &str,
) -> Result<DeafStream, String> {
    let tls = crate::servers::ClientTls::new(&cert.ca, Some((&cert.cert, &cert.key)));
    let mut config = (*tls.rustls_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(grpc).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::from(grpc.ip()), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(65_535)
        .data_frame_budget(1 << 40)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::post(format!("https://{grpc}/picket.v1.Ingest/Stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, send) = client
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    let mut deaf = DeafStream {
        send,
        _response: response,
        connection,
    };
    let hello = v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(raw::hello(name, 1))),
    };
    match deaf.send(&hello, Duration::from_secs(10)).await? {
        true => Ok(deaf),
        false => Err("no window for the hello".into()),
    }
}

impl DeafStream {
    /// Sends one gRPC message; `Ok(false)` when the aggregator has not opened its window
    /// for it within `wait`: it stopped reading this stream.
    pub async fn send(
        &mut self,
        message: &v1::AgentMessage,
        wait: Duration,
    ) -> Result<bool, String> {
        let body = message.encode_to_vec();
        let mut frame = Vec::with_capacity(5 + body.len());
        frame.push(0); // not compressed
        frame.extend_from_slice(
            &u32::try_from(body.len())
                .map_err(|e| e.to_string())?
                .to_be_bytes(),
        );
        frame.extend_from_slice(&body);
        let mut rest = Bytes::from(frame);
        // Bounded by the message's length: each round sends at least one byte or returns.
        while !rest.is_empty() {
            self.send.reserve_capacity(rest.len());
            let granted =
                tokio::time::timeout(wait, std::future::poll_fn(|cx| self.send.poll_capacity(cx)))
                    .await;
            let n = match granted {
                Err(_) => return Ok(false),
                Ok(None) => return Err("the stream was closed".into()),
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(0))) => return Ok(false),
                Ok(Some(Ok(n))) => n.min(rest.len()),
            };
            self.send
                .send_data(rest.split_to(n), false)
                .map_err(|e| e.to_string())?;
        }
        Ok(true)
    }

    /// Whether the connection has ended (closed by the aggregator).
    pub fn connection_closed(&self) -> bool {
        self.connection.is_finished()
    }
}

/// Opens `n` TCP connections to `addr` and, when `first_bytes` is not empty, writes them
/// on each (a stalled TLS handshake, garbage). Connections the server refuses at once are
/// kept as they are: [`closed_within`] sees them closed.
pub async fn open_connections(addr: SocketAddr, n: usize, first_bytes: &[u8]) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
        else {
            continue;
        };
        if !first_bytes.is_empty() {
            let _ = stream.write_all(first_bytes).await;
        }
        out.push(stream);
    }
    out
}

/// How many of `streams` the server closed (end of stream or a reset) within `timeout`,
/// and how long the last of those took.
pub async fn closed_within(streams: Vec<TcpStream>, timeout: Duration) -> (usize, Duration) {
    let started = Instant::now();
    let mut reads = JoinSet::new();
    for mut stream in streams {
        reads.spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            // The server may answer something (a TLS alert, an HTTP/2 GOAWAY) before it
            // closes; read until the end. Bounded by the timeout and the byte budget.
            let mut budget = 1024 * 1024;
            let closed = tokio::time::timeout(timeout, async {
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return true,
                        Ok(n) if n >= budget => return false,
                        Ok(n) => budget -= n,
                    }
                }
            })
            .await
            .unwrap_or(false);
            closed.then(|| started.elapsed())
        });
    }
    let mut closed = 0;
    let mut last = Duration::ZERO;
    while let Some(result) = reads.join_next().await {
        if let Ok(Some(elapsed)) = result {
            closed += 1;
            last = last.max(elapsed);
        }
    }
    (closed, last)
}

/// The start of a TLS ClientHello whose record header promises 512 bytes: a server reading
/// it waits for the rest, which never comes.
pub const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, // handshake record, TLS 1.0 framing, 512 bytes
    0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes
    0x03, 0x03, // TLS 1.2
];

/// `n` bytes that are neither TLS nor HTTP/2 (a fixed pseudo-random sequence).
pub fn garbage(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
