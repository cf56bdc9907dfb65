//! The HTTP GET behind the `http` capability: one HTTP/1.1 request per call over plain TCP or
//! TLS, with the body size cap enforced while reading.
//!
//! `https://` is verified against the grant's own CA file when it names one (a Flink REST
//! endpoint with a self-signed certificate), otherwise against the system's CA bundle. There
//! is no connection pool: plugins call a handful of local endpoints per interval, and a
//! fresh connection per call keeps one slow server from holding state between calls.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::bindings::picket::plugin::http::Response;
use super::bindings::picket::plugin::types::HostError;

/// Where Debian, Raspberry Pi OS, Alpine (first) and Fedora/RHEL (second) keep their bundles.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

pub async fn get(
    url: &str,
    headers: &[(String, String)],
    cap: usize,
    ca_file: Option<&Path>,
) -> Result<Response, HostError> {
    let failed = |what: String| HostError::Failed(format!("{url}: {what}"));
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| HostError::Failed(format!("invalid URL {url:?}: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(failed(
                "only http:// and https:// URLs are supported".into(),
            ));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| failed("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let _ = tcp.set_nodelay(true);

    let mut request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str())).header(
        hyper::header::HOST,
        uri.authority().map_or(host.as_str(), |a| a.as_str()),
    );
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| HostError::Failed(format!("invalid request: {e}")))?;

    let response = if tls {
        let config = client_config(ca_file)?;
        let name = ServerName::try_from(host.clone())
            .map_err(|e| failed(format!("not a valid TLS server name: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| failed(format!("TLS: {e}")))?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
    .map_err(|e| failed(e.to_string()))?;

    let status = response.status().as_u16();
    let response_headers = response
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| failed(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            if bytes.len() + data.len() > cap {
                return Err(HostError::TooLarge);
            }
            bytes.extend_from_slice(data);
        }
    }
    Ok(Response {
        status,
        headers: response_headers,
        body: bytes,
    })
}

async fn send<S>(
    io: TokioIo<S>,
    request: hyper::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    // The connection task ends with the response body or when the call is dropped.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await
}

/// TLS settings for one call: the grant's CA alone when it names one, else the system's.
fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, HostError> {
    static SYSTEM: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    let roots = match ca_file {
        Some(path) => return config_from_roots(roots_from(&[path])?).map_err(HostError::Failed),
        None => SYSTEM.get_or_init(|| {
            let bundles: Vec<&Path> = SYSTEM_CA_BUNDLES.iter().map(Path::new).collect();
            let roots = roots_from(&bundles).map_err(|e| match e {
                HostError::Failed(m) => m,
                other => format!("{other:?}"),
            })?;
            config_from_roots(roots)
        }),
    };
    roots.clone().map_err(HostError::Failed)
}

fn config_from_roots(roots: RootCertStore) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Trust anchors from the first readable PEM file of `candidates`.
fn roots_from(candidates: &[&Path]) -> Result<RootCertStore, HostError> {
    let mut problems = Vec::new();
    for path in candidates {
        match picket_core::tls::read_certificates(path) {
            Ok(pem) => {
                let mut roots = RootCertStore::empty();
                let (added, _ignored) = roots.add_parsable_certificates(pem.certs);
                if added > 0 {
                    return Ok(roots);
                }
                problems.push(format!("{}: no usable CA certificate", path.display()));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    Err(HostError::Failed(format!(
        "TLS: no CA certificates to verify https with ({}); set the grant's http.ca",
        problems.join("; ")
    )))
}
