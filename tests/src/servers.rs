//! Real time-series servers on loopback, for end-to-end tests of the aggregator's sinks:
//! Prometheus (remote-write receiver), InfluxDB 1.x, VictoriaMetrics and the Pushgateway,
//! from their Debian packages (`scripts/test` installs them). A missing server fails the
//! test with that instruction; nothing is skipped.
//!
//! Every server gets free loopback ports, its own data directory `<dir>/<name>-<port>/` and
//! a log file per start `<dir>/<name>-<port>-<n>.log`. Starting waits until the server
//! answers its readiness endpoint; should it exit first (say its port was taken) or not get
//! ready in time, the panic message carries the end of its log. Servers are killed when
//! dropped ([`Process`] does that); `stop`/`restart` shut them down with SIGTERM and start
//! them again on the same ports and data.
//!
//! What the servers do with data, as found with the Debian versions (Prometheus 2.42,
//! InfluxDB 1.6.7, VictoriaMetrics 1.79, Pushgateway 1.5):
//!
//! * Prometheus answers queries with timestamps as JSON numbers in float seconds (at most
//!   three decimals) and values as strings (`"NaN"`, `"+Inf"`, `"-Inf"`);
//!   [`Prometheus::raw_samples`] turns them back into exact milliseconds and `f64`s. Its
//!   TSDB rejects out-of-order samples per series (no out-of-order window is configured).
//! * InfluxDB 1.6 only has the v1 API: `/write?db=..&precision=..` and `/query`. It has no
//!   `/api/v2/write` (404) and no `Authorization: Token user:password` (401, "unable to parse
//!   authentication credentials"); with auth on, use HTTP basic auth or `u=`/`p=` parameters.
//!   JSON results do not tell a float field from an integer one (`3i` and `3.0` both come
//!   back as `3`).
//! * VictoriaMetrics names line-protocol series `<measurement>_<field>` (so `cpu usage=1`
//!   becomes `cpu_usage`, and `m value=1` becomes `m_value`), tags become labels; a `db`
//!   query parameter adds a `db` label, `bucket`/`org` add nothing. It drops NaN samples at
//!   ingestion, does not keep floats bit for bit (`0.30000000000000004` comes back as
//!   `0.3`, `-0` as `0`), reads small Prometheus-text timestamps as seconds (`1000` is
//!   stored as `1000000` ms) and refuses timestamps more than two days ahead. Even after
//!   `/internal/force_flush`, fresh rows can take about a second to be exported:
//!   [`VictoriaMetrics::wait_export`] polls. Its export writes `+Inf`/`-Inf` as bare
//!   (non-JSON) tokens, which [`VictoriaMetrics::export`] handles. Rows it cannot parse are
//!   logged and dropped while the request still gets 204.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use crate::{Process, free_port};

/// A series' labels, `__name__` included, sorted by name.
pub type Labels = BTreeMap<String, String>;

/// One series with its samples: (timestamp in ms since the epoch, value), oldest first.
pub type Series = (Labels, Vec<(i64, f64)>);

/// How long a server may take to answer its readiness endpoint (the machine is shared).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How many log lines a failed start shows.
const LOG_TAIL_LINES: usize = 40;

/// The path of a server's executable: searched on `PATH` (and `/usr/bin`, `/usr/sbin`).
/// Panics when it is missing, so a test that needs a server fails rather than skips.
pub fn require(binary: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| {
            panic!(
                "`{binary}` not found: install the Debian package `{package}` (scripts/test does)"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_millis()).expect("time fits i64")
}

/// The last `lines` lines of a log file.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// A small HTTP/1.1 client.

/// An HTTP response read in full.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names as sent (compare with [`HttpResponse::header`], which ignores case).
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when the server answered chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response {} is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`): sends `headers` and
/// `body` (with its `Content-Length`), reads the whole response and undoes chunked transfer
/// encoding. `path` is the request target: path plus query, already percent-encoded.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    request_over(addr, None, method, path, headers, body)
}

/// The same request over TLS (HTTPS), verifying the server against `tls`'s CA and showing
/// its client certificate if it has one.
pub fn https_request(
    addr: SocketAddr,
    tls: &ClientTls,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    request_over(addr, Some(tls), method, path, headers, body)
}

/// How the harness talks HTTPS to a server: the CA that signed the server's certificate
/// (checked against the IP address it is reached on) and an optional client certificate
/// for servers that require mutual TLS.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    /// `ca`: PEM bundle; `client`: (certificate, key) PEM files.
    pub fn new(ca: &Path, client: Option<(&Path, &Path)>) -> ClientTls {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .unwrap_or_else(|e| panic!("read CA {}: {e}", ca.display()))
        {
            let cert = cert.unwrap_or_else(|e| panic!("CA {}: {e}", ca.display()));
            roots.add(cert).expect("add CA certificate");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS protocol versions")
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .unwrap_or_else(|e| panic!("client certificate {}: {e}", cert.display()));
                let key = PrivateKeyDer::from_pem_file(key)
                    .unwrap_or_else(|e| panic!("client key {}: {e}", key.display()));
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client certificate and key match")
            }
        };
        ClientTls {
            config: Arc::new(config),
        }
    }

    /// The rustls client configuration, for clients other than [`https_request`].
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }
}

/// A connection that is either plain TCP or TLS over it.
enum Connection {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Plain(s) => s.read(buf),
            Connection::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Plain(s) => s.write(buf),
            Connection::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Plain(s) => s.flush(),
            Connection::Tls(s) => s.flush(),
        }
    }
}

fn request_over(
    addr: SocketAddr,
    tls: Option<&ClientTls>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut stream = match tls {
        None => Connection::Plain(tcp),
        Some(tls) => {
            let name = ServerName::IpAddress(addr.ip().into());
            let session = rustls::ClientConnection::new(tls.config.clone(), name)
                .map_err(io::Error::other)?;
            Connection::Tls(Box::new(rustls::StreamOwned::new(session, tcp)))
        }
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    let sends_body = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if sends_body {
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request)?;
    stream.flush()?;

    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS server that closes without close_notify: the response is complete when
        // its head and body parse.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && tls.is_some() => {}
        Err(e) => return Err(e),
    }
    parse_response(&raw, method == "HEAD")
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn parse_response(raw: &[u8], head_only: bool) -> io::Result<HttpResponse> {
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| invalid("no end of response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| invalid("response head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &raw[end + 4..];
    if head_only || status < 200 || status == 204 || status == 304 {
        return Ok(response);
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    response.body = if chunked {
        dechunk(rest)?
    } else if let Some(length) = response.header("content-length") {
        let n: usize = length
            .parse()
            .map_err(|_| invalid(format!("bad Content-Length {length:?}")))?;
        if rest.len() < n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body has {} of {n} bytes", rest.len()),
            ));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(response)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end =
            find(rest, b"\r\n").ok_or_else(|| invalid("chunk size line unterminated"))?;
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| invalid("chunk size"))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let n = usize::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
        rest = &rest[line_end + 2..];
        if n == 0 {
            return Ok(out); // trailers, if any, are ignored
        }
        if rest.len() < n + 2 || &rest[n..n + 2] != b"\r\n" {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunk cut short",
            ));
        }
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n + 2..];
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for query strings and
/// form bodies.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// `name=value&...`, percent-encoded: a query string or an
/// `application/x-www-form-urlencoded` body.
pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(n, v)| format!("{}={}", percent_encode(n), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// An `Authorization` header value for HTTP basic auth.
pub fn basic_auth(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}").into_bytes();
    let mut out = String::from("Basic ");
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A Prometheus-style float: `NaN`, `+Inf`, `-Inf` or a decimal number.
pub fn parse_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

fn labels_of(metric: &Value) -> Labels {
    metric
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// A reference Prometheus remote-write request, encoded here by hand.

/// A remote-write 1.0 request body for `series`: a `prometheus.WriteRequest` protobuf,
/// snappy-compressed (block format, stored as literals only, which every decoder accepts).
/// Prometheus wants each series' labels sorted by name, which [`Labels`] is, and samples
/// oldest first. Both Prometheus and VictoriaMetrics accept it at `/api/v1/write`.
pub fn encode_remote_write(series: &[Series]) -> Vec<u8> {
    let mut request = Vec::new();
    for (labels, samples) in series {
        let mut ts = Vec::new();
        for (name, value) in labels {
            let mut label = Vec::new();
            put_bytes_field(&mut label, 1, name.as_bytes());
            put_bytes_field(&mut label, 2, value.as_bytes());
            put_bytes_field(&mut ts, 1, &label);
        }
        for &(timestamp, value) in samples {
            let mut sample = Vec::new();
            put_varint(&mut sample, 1 << 3 | 1); // value: double
            sample.extend_from_slice(&value.to_le_bytes());
            put_varint(&mut sample, 2 << 3); // timestamp: int64 varint
            put_varint(&mut sample, timestamp as u64);
            put_bytes_field(&mut ts, 2, &sample);
        }
        put_bytes_field(&mut request, 1, &ts);
    }
    snappy_literals(&request)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Snappy block format with literal elements only (no compression, valid input for any
/// snappy decoder): the uncompressed length, then literals of at most 64 KiB.
fn snappy_literals(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 1024 + 16);
    put_varint(&mut out, data.len() as u64);
    for chunk in data.chunks(1 << 16) {
        let n = chunk.len() - 1;
        if n < 60 {
            out.push((n as u8) << 2);
        } else if n < 256 {
            out.push(60 << 2);
            out.push(n as u8);
        } else {
            out.push(61 << 2);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        out.extend_from_slice(chunk);
    }
    out
}

/// POSTs `series` as a remote-write request to `addr` + `path`.
pub fn post_remote_write(
    addr: SocketAddr,
    path: &str,
    series: &[Series],
) -> io::Result<HttpResponse> {
    http_request(
        addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/x-protobuf"),
            ("Content-Encoding", "snappy"),
            ("X-Prometheus-Remote-Write-Version", "0.1.0"),
        ],
        &encode_remote_write(series),
    )
}

// ---------------------------------------------------------------------------------------
// Running a server.

/// A server process on one HTTP port, with its data directory and readiness check.
struct Daemon {
    name: &'static str,
    binary: PathBuf,
    args: Vec<OsString>,
    dir: PathBuf,
    home: PathBuf,
    addr: SocketAddr,
    ready_path: &'static str,
    ready_status: u16,
    process: Option<Process>,
    starts: usize,
    /// Set when the server serves HTTPS: readiness probes and requests then use TLS.
    client_tls: Option<ClientTls>,
}

impl Daemon {
    /// Picks a free port and makes `<dir>/<name>-<port>/`; `args` is called with the port
    /// and that directory. Does not start anything yet.
    fn new(
        dir: &Path,
        name: &'static str,
        binary: PathBuf,
        ready: (&'static str, u16),
        args: impl FnOnce(u16, &Path) -> Vec<OsString>,
    ) -> Daemon {
        let port = free_port();
        let home = dir.join(format!("{name}-{port}"));
        std::fs::create_dir_all(&home).expect("create server directory");
        Daemon {
            name,
            binary,
            args: args(port, &home),
            dir: dir.to_path_buf(),
            home,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ready_path: ready.0,
            ready_status: ready.1,
            process: None,
            starts: 0,
            client_tls: None,
        }
    }

    fn start(&mut self) {
        assert!(self.process.is_none(), "{} is already running", self.name);
        self.starts += 1;
        let log = self.dir.join(format!(
            "{}-{}-{}.log",
            self.name,
            self.addr.port(),
            self.starts
        ));
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args).current_dir(&self.home);
        self.process = Some(Process::spawn(cmd, log));
        self.wait_ready();
    }

    /// Polls the readiness endpoint; panics with the end of the log if the process exits
    /// first or `READY_TIMEOUT` passes.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            let process = self.process.as_mut().expect("server process");
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "{} exited ({status}) before it was ready on {}; the end of {}:\n{}",
                    self.name,
                    self.addr,
                    process.log.display(),
                    log_tail(&process.log, LOG_TAIL_LINES)
                );
            }
            let probe = request_over(
                self.addr,
                self.client_tls.as_ref(),
                "GET",
                self.ready_path,
                &[],
                b"",
            );
            // Whoever answered must be our process, not another one that took the port.
            if matches!(&probe, Ok(r) if r.status == self.ready_status) && process.is_running() {
                return;
            }
            if started.elapsed() > READY_TIMEOUT {
                panic!(
                    "{} not ready after {READY_TIMEOUT:?}: GET http://{}{} gave {:?}; the end of {}:\n{}",
                    self.name,
                    self.addr,
                    self.ready_path,
                    probe.map(|r| r.status),
                    process.log.display(),
                    log_tail(&process.log, LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait for the exit.
    fn stop(&mut self) {
        let mut process = self
            .process
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        process.terminate(STOP_TIMEOUT);
    }

    fn kill9(&mut self) {
        let mut process = self
            .process
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        process.kill9();
    }

    fn restart(&mut self) {
        self.stop();
        self.start();
    }

    fn log(&self) -> PathBuf {
        match &self.process {
            Some(p) => p.log.clone(),
            None => self.dir.join(format!(
                "{}-{}-{}.log",
                self.name,
                self.addr.port(),
                self.starts
            )),
        }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        request_over(
            self.addr,
            self.client_tls.as_ref(),
            method,
            path,
            headers,
            body,
        )
        .unwrap_or_else(|e| panic!("{} {} {method} {path}: {e}", self.name, self.addr))
    }
}

fn arg(s: impl Into<OsString>) -> OsString {
    s.into()
}

fn path_arg(flag: &str, path: &Path) -> OsString {
    let mut a = OsString::from(flag);
    a.push(path);
    a
}

/// Start, stop and log accessors every server has.
macro_rules! lifecycle {
    () => {
        /// The HTTP listen address (127.0.0.1 and a free port, kept across restarts).
        pub fn addr(&self) -> SocketAddr {
            self.daemon.addr
        }

        /// `http://127.0.0.1:<port>`, or `https://` for a server started with TLS.
        pub fn url(&self) -> String {
            let scheme = if self.daemon.client_tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", self.daemon.addr)
        }

        /// The server's own data directory.
        pub fn home(&self) -> &Path {
            &self.daemon.home
        }

        /// The current (or last) log file.
        pub fn log(&self) -> PathBuf {
            self.daemon.log()
        }

        /// SIGTERM, wait for the exit, start again on the same port and data; waits until
        /// ready.
        pub fn restart(&mut self) {
            self.daemon.restart();
        }

        /// SIGTERM and wait for the exit.
        pub fn stop(&mut self) {
            self.daemon.stop();
        }

        /// SIGKILL, as a crash would.
        pub fn kill9(&mut self) {
            self.daemon.kill9();
        }

        /// Starts a stopped or killed server again on the same port and data; waits until
        /// ready.
        pub fn start_again(&mut self) {
            self.daemon.start();
        }

        pub fn is_running(&mut self) -> bool {
            self.daemon
                .process
                .as_mut()
                .is_some_and(Process::is_running)
        }
    };
}

// ---------------------------------------------------------------------------------------
// Prometheus.

/// A server's HTTPS settings: its certificate and key, and the CA that must have signed a
/// client's certificate (None: no client certificate asked for).
pub struct WebTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Prometheus with the remote-write receiver on and no scrape jobs.
pub struct Prometheus {
    daemon: Daemon,
}

impl Prometheus {
    pub fn start(dir: &Path) -> Prometheus {
        Self::start_with_config(
            dir,
            "global:\n  scrape_interval: 1h\n  evaluation_interval: 1h\nscrape_configs: []\n"
                .to_owned(),
        )
    }

    /// Prometheus that also scrapes `target` (host:port, path `/metrics`) every second,
    /// keeping the target's own labels and timestamps (`honor_labels`, the default
    /// `honor_timestamps`), as one scrapes an aggregator.
    pub fn start_scraping(dir: &Path, target: SocketAddr) -> Prometheus {
        Self::start_with_config(
            dir,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1h\nscrape_configs:\n  - job_name: picket\n    honor_labels: true\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
    }

    /// Prometheus (remote-write receiver on, no scrapes) serving HTTPS only, with `web`'s
    /// certificate and, when `web.client_ca` is set, requiring a client certificate signed
    /// by it. `harness` is how the test's own queries reach it.
    pub fn start_tls(dir: &Path, web: &WebTls, harness: ClientTls) -> Prometheus {
        let mut web_config = format!(
            "tls_server_config:\n  cert_file: {:?}\n  key_file: {:?}\n",
            web.cert.display().to_string(),
            web.key.display().to_string()
        );
        if let Some(ca) = &web.client_ca {
            web_config += &format!(
                "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {:?}\n",
                ca.display().to_string()
            );
        }
        Self::build(
            dir,
            "global:\n  scrape_interval: 1h\n  evaluation_interval: 1h\nscrape_configs: []\n"
                .to_owned(),
            Some((web_config, harness)),
        )
    }

    /// Prometheus with `config_text` as its `prometheus.yml` (remote-write receiver on), for
    /// scrape jobs, rule files and the like.
    pub fn start_with_config(dir: &Path, config_text: String) -> Prometheus {
        Self::build(dir, config_text, None)
    }

    fn build(dir: &Path, config_text: String, tls: Option<(String, ClientTls)>) -> Prometheus {
        let binary = require("prometheus", "prometheus");
        let web_config = tls.as_ref().map(|(text, _)| text.clone());
        let mut daemon = Daemon::new(
            dir,
            "prometheus",
            binary,
            ("/-/ready", 200),
            move |port, home| {
                let config = home.join("prometheus.yml");
                std::fs::write(&config, &config_text).expect("write prometheus.yml");
                let mut args = vec![
                    path_arg("--config.file=", &config),
                    path_arg("--storage.tsdb.path=", &home.join("data")),
                    arg(format!("--web.listen-address=127.0.0.1:{port}")),
                    arg("--web.enable-remote-write-receiver"),
                ];
                if let Some(text) = web_config {
                    let web = home.join("web.yml");
                    std::fs::write(&web, text).expect("write web.yml");
                    args.push(path_arg("--web.config.file=", &web));
                }
                args
            },
        );
        daemon.client_tls = tls.map(|(_, harness)| harness);
        daemon.start();
        Prometheus { daemon }
    }

    lifecycle!();

    /// The remote-write receiver: `<url>/api/v1/write`.
    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    /// Sends `series` with the harness's own remote-write encoder (see
    /// [`encode_remote_write`]); returns the response (204 when accepted). Plain HTTP only.
    pub fn remote_write(&self, series: &[Series]) -> HttpResponse {
        post_remote_write(self.addr(), "/api/v1/write", series)
            .unwrap_or_else(|e| panic!("remote write to {}: {e}", self.addr()))
    }

    /// An instant query (`/api/v1/query`, now) of `expr`; returns the whole JSON answer
    /// (`{"status":"success","data":{"resultType":..,"result":..}}`). Panics unless it
    /// succeeded.
    pub fn query(&self, expr: &str) -> Value {
        self.query_at(expr, None)
    }

    /// An instant query evaluated at `time_ms` (None: now).
    pub fn query_at(&self, expr: &str, time_ms: Option<i64>) -> Value {
        let time = time_ms.map(|t| format!("{}.{:03}", t.div_euclid(1000), t.rem_euclid(1000)));
        let mut pairs = vec![("query", expr)];
        if let Some(time) = &time {
            pairs.push(("time", time));
        }
        let response = self.daemon.request(
            "POST",
            "/api/v1/query",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            form(&pairs).as_bytes(),
        );
        let json = response.json();
        assert!(
            response.status == 200 && json["status"] == "success",
            "query {expr:?} failed ({}): {json}",
            response.status
        );
        json
    }

    /// Every stored sample of the series `selector` (a plain vector selector such as
    /// `up{job="x"}`) matches, exactly as stored: queries `selector[100y]` at one day from
    /// now, which returns raw samples, and converts timestamps from float seconds to
    /// milliseconds. Sorted by labels; samples oldest first.
    pub fn raw_samples(&self, selector: &str) -> Vec<Series> {
        let expr = format!("{selector}[100y]");
        let json = self.query_at(&expr, Some(now_ms() + 86_400_000));
        let data = &json["data"];
        assert_eq!(data["resultType"], "matrix", "{expr}: {json}");
        let mut series: Vec<Series> = data["result"]
            .as_array()
            .expect("result array")
            .iter()
            .map(|s| {
                let samples = s["values"]
                    .as_array()
                    .expect("values")
                    .iter()
                    .map(|pair| {
                        let seconds = pair[0].as_f64().expect("timestamp");
                        let value = pair[1].as_str().and_then(parse_float).expect("value");
                        ((seconds * 1000.0).round() as i64, value)
                    })
                    .collect();
                (labels_of(&s["metric"]), samples)
            })
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        series
    }
}

// ---------------------------------------------------------------------------------------
// InfluxDB 1.x.

/// InfluxDB 1.x (the Debian package is 1.6): HTTP API on a free port, RPC (`bind-address`,
/// 8088 by default) on another, reporting and the `_internal` monitor store off.
pub struct InfluxDb {
    daemon: Daemon,
    credentials: Option<(String, String)>,
}

impl InfluxDb {
    pub fn start(dir: &Path) -> InfluxDb {
        Self::start_inner(dir, None)
    }

    /// With `[http] auth-enabled = true` and `user` created as an admin (the first admin
    /// user can be created without credentials). The harness's own queries then
    /// authenticate with basic auth.
    pub fn start_with_auth(dir: &Path, user: &str, password: &str) -> InfluxDb {
        let influx = Self::start_inner(dir, Some((user.to_owned(), password.to_owned())));
        let statement = format!(
            "CREATE USER {} WITH PASSWORD {} WITH ALL PRIVILEGES",
            influx_ident(user),
            influx_string(password)
        );
        let response = influx.daemon.request(
            "POST",
            "/query",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            form(&[("q", &statement)]).as_bytes(),
        );
        assert_eq!(
            response.status,
            200,
            "create admin user: {}",
            response.text()
        );
        influx
    }

    fn start_inner(dir: &Path, credentials: Option<(String, String)>) -> InfluxDb {
        let binary = require("influxd", "influxdb");
        let auth = credentials.is_some();
        let mut daemon = Daemon::new(dir, "influxdb", binary, ("/ping", 204), |port, home| {
            // The RPC port (`bind-address`) would otherwise be 8088 for every instance.
            let rpc_port = std::iter::repeat_with(free_port)
                .find(|&p| p != port)
                .expect("a second free port");
            let config = home.join("influxdb.conf");
            let text = format!(
                "reporting-disabled = true\n\
                 bind-address = \"127.0.0.1:{rpc_port}\"\n\
                 [meta]\n  dir = {meta:?}\n\
                 [data]\n  dir = {data:?}\n  wal-dir = {wal:?}\n  query-log-enabled = false\n\
                 [http]\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n  auth-enabled = {auth}\n\
                 [monitor]\n  store-enabled = false\n",
                meta = home.join("meta").display().to_string(),
                data = home.join("data").display().to_string(),
                wal = home.join("wal").display().to_string(),
            );
            std::fs::write(&config, text).expect("write influxdb.conf");
            vec![arg("-config"), config.into_os_string()]
        });
        daemon.start();
        InfluxDb {
            daemon,
            credentials,
        }
    }

    lifecycle!();

    /// The user and password given to [`InfluxDb::start_with_auth`].
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    pub fn create_database(&self, name: &str) {
        self.query("", &format!("CREATE DATABASE {}", influx_ident(name)));
    }

    /// POSTs `q` to `/query` (with `db` unless empty, `epoch=ms`, and basic auth when
    /// enabled) and returns the raw response.
    pub fn query_response(&self, db: &str, q: &str) -> HttpResponse {
        let mut pairs = vec![("q", q), ("epoch", "ms")];
        if !db.is_empty() {
            pairs.push(("db", db));
        }
        let auth = self.credentials().map(|(u, p)| basic_auth(u, p));
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        self.daemon
            .request("POST", "/query", &headers, form(&pairs).as_bytes())
    }

    /// Runs `q` against `db` (empty: none) with `epoch=ms`; returns the whole JSON answer
    /// (`{"results":[...]}`). Panics on an HTTP error or a statement error.
    pub fn query(&self, db: &str, q: &str) -> Value {
        let response = self.query_response(db, q);
        let json = response.json();
        let failed = json.get("error").is_some()
            || json["results"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r.get("error").is_some()));
        assert!(
            response.status == 200 && !failed,
            "influx query {q:?} on {db:?} failed ({}): {json}",
            response.status
        );
        json
    }

    /// Every point of `measurement` in `db` (`SELECT * FROM "<measurement>"`), oldest first,
    /// each as column -> value: `time` in ms since the epoch, tags as strings, fields as
    /// JSON numbers/strings/booleans, `null` where a point lacks a column.
    pub fn points(&self, db: &str, measurement: &str) -> Vec<BTreeMap<String, Value>> {
        let json = self.query(db, &format!("SELECT * FROM {}", influx_ident(measurement)));
        let mut rows = Vec::new();
        for series in json["results"][0]["series"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let columns: Vec<&str> = series["columns"]
                .as_array()
                .expect("columns")
                .iter()
                .map(|c| c.as_str().expect("column name"))
                .collect();
            for values in series["values"].as_array().into_iter().flatten() {
                let values = values.as_array().expect("row");
                rows.push(
                    columns
                        .iter()
                        .zip(values)
                        .map(|(c, v)| ((*c).to_owned(), v.clone()))
                        .collect::<BTreeMap<_, _>>(),
                );
            }
        }
        rows.sort_by_key(|row| row.get("time").and_then(Value::as_i64));
        rows
    }
}

/// An InfluxQL identifier in double quotes.
fn influx_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An InfluxQL string literal in single quotes.
fn influx_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

// ---------------------------------------------------------------------------------------
// VictoriaMetrics.

/// Single-node VictoriaMetrics: 100 years retention, no deduplication, no query latency
/// offset, no rollup cache.
pub struct VictoriaMetrics {
    daemon: Daemon,
}

impl VictoriaMetrics {
    pub fn start(dir: &Path) -> VictoriaMetrics {
        let binary = require("victoria-metrics", "victoria-metrics");
        let mut daemon = Daemon::new(
            dir,
            "victoria-metrics",
            binary,
            ("/health", 200),
            |port, home| {
                vec![
                    arg(format!("-httpListenAddr=127.0.0.1:{port}")),
                    path_arg("-storageDataPath=", &home.join("data")),
                    arg("-retentionPeriod=100y"),
                    arg("-search.latencyOffset=0s"),
                    arg("-search.disableCache"),
                ]
            },
        );
        daemon.start();
        VictoriaMetrics { daemon }
    }

    lifecycle!();

    /// Prometheus remote write: `http://127.0.0.1:<port>/api/v1/write`.
    pub fn remote_write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    /// The base URL for the InfluxDB v2 write API (VictoriaMetrics serves `/api/v2/write`,
    /// and the v1 `/write`). See the module docs for how it names series.
    pub fn influx_v2_url(&self) -> String {
        self.url()
    }

    /// Sends `series` with the harness's own remote-write encoder.
    pub fn remote_write(&self, series: &[Series]) -> HttpResponse {
        post_remote_write(self.addr(), "/api/v1/write", series)
            .unwrap_or_else(|e| panic!("remote write to {}: {e}", self.addr()))
    }

    /// `/internal/force_flush`: writes buffered rows to storage. Fresh rows can still take
    /// about a second to show in exports (see [`VictoriaMetrics::wait_export`]).
    pub fn flush(&self) {
        let response = self
            .daemon
            .request("GET", "/internal/force_flush", &[], b"");
        assert_eq!(response.status, 200, "force_flush: {}", response.text());
    }

    /// Flushes, then exports every sample of the series `selector` matches (any series
    /// selector, e.g. `{__name__=~"cpu_.*"}`) with `/api/v1/export`. Sorted by labels;
    /// samples oldest first.
    pub fn export(&self, selector: &str) -> Vec<Series> {
        self.flush();
        let path = format!("/api/v1/export?{}", form(&[("match[]", selector)]));
        let response = self.daemon.request("GET", &path, &[], b"");
        let text = response.text();
        assert_eq!(response.status, 200, "export {selector}: {text}");
        let mut series: Vec<Series> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                parse_export_line(line)
                    .unwrap_or_else(|| panic!("unexpected export line from {selector}: {line}"))
            })
            .collect();
        for (_, samples) in &mut series {
            samples.sort_by_key(|(t, _)| *t);
        }
        series.sort_by(|a, b| a.0.cmp(&b.0));
        series
    }

    /// Exports `selector` until `done` holds for the result (fresh rows can take a moment to
    /// become searchable); panics with the last export after 30 s.
    pub fn wait_export(&self, selector: &str, done: impl Fn(&[Series]) -> bool) -> Vec<Series> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = self.export(selector);
            if done(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "export of {selector} never became what the test waits for; last: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One line of `/api/v1/export`: `{"metric":{..},"values":[..],"timestamps":[..]}`. The
/// values array may hold bare `+Inf`/`-Inf`/`NaN`, which are not JSON, so it is cut out and
/// parsed here. (`"values":[` cannot occur inside a JSON string: a quote there is escaped.)
fn parse_export_line(line: &str) -> Option<Series> {
    const KEY: &str = "\"values\":[";
    let start = line.find(KEY)? + KEY.len();
    let end = start + line[start..].find(']')?;
    let values: Vec<f64> = line[start..end]
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(parse_float)
        .collect::<Option<_>>()?;
    let rest = format!("{}{}", &line[..start], &line[end..]);
    let json: Value = serde_json::from_str(&rest).ok()?;
    let timestamps: Vec<i64> = json["timestamps"]
        .as_array()?
        .iter()
        .map(Value::as_i64)
        .collect::<Option<_>>()?;
    if timestamps.len() != values.len() {
        return None;
    }
    Some((
        labels_of(&json["metric"]),
        timestamps.into_iter().zip(values).collect(),
    ))
}

// ---------------------------------------------------------------------------------------
// Pushgateway.

/// The Prometheus Pushgateway, persisting to its own directory (the Debian default is
/// `/var/lib/prometheus/pushgateway.data`).
pub struct Pushgateway {
    daemon: Daemon,
}

impl Pushgateway {
    pub fn start(dir: &Path) -> Pushgateway {
        let binary = require("prometheus-pushgateway", "prometheus-pushgateway");
        let mut daemon = Daemon::new(
            dir,
            "pushgateway",
            binary,
            ("/-/ready", 200),
            |port, home| {
                vec![
                    arg(format!("--web.listen-address=127.0.0.1:{port}")),
                    path_arg("--persistence.file=", &home.join("pushgateway.data")),
                ]
            },
        );
        daemon.start();
        Pushgateway { daemon }
    }

    lifecycle!();

    /// Its `/metrics` page (pushed groups plus its own metrics).
    pub fn metrics(&self) -> String {
        let response = self.daemon.request("GET", "/metrics", &[], b"");
        assert_eq!(response.status, 200, "pushgateway /metrics");
        response.text()
    }
}
