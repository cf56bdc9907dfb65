//! The HTTP client the network sinks share: pooled keep-alive HTTP/1.1 connections, TLS with
//! the system's CA bundle or a configured CA (and an optional client certificate), basic or
//! bearer authentication, and a deadline per request.
//!
//! Secrets can live in files (`password_file`, `bearer_token_file`) so the config itself can
//! be world-readable; they are read when the sink starts and never logged.

use picket_core::secret::{SecretError, SecretSource};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::driver::Retry;
use super::metrics::SinkMetrics;

/// Where Debian, Raspberry Pi OS, Alpine (first) and Fedora/RHEL (second) keep their bundles.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Most of an error response kept for logs and counters.
const MAX_ERROR_BODY: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    /// CA bundle (PEM) that signs the server's certificate; the system bundle when unset.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that require mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    pub bearer_token: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    pub bearer_token_env: Option<String>,
}

impl AuthConfig {
    pub fn password_source(&self) -> SecretSource<'_> {
        SecretSource {
            inline: self.password.as_deref(),
            file: self.password_file.as_deref(),
            env: self.password_env.as_deref(),
        }
    }

    pub fn bearer_token_source(&self) -> SecretSource<'_> {
        SecretSource {
            inline: self.bearer_token.as_deref(),
            file: self.bearer_token_file.as_deref(),
            env: self.bearer_token_env.as_deref(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Tls(#[from] picket_core::tls::TlsFileError),
    #[error("{0}")]
    Secret(#[from] SecretError),
    #[error("{0}")]
    Config(String),
}

/// Why a request got no HTTP response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
}

pub struct Response {
    pub status: u16,
    /// `Retry-After` in seconds, when the server sent one.
    pub retry_after: Option<Duration>,
    /// The body, cut to a few KiB (only error bodies are read for logs).
    pub body: String,
}

/// One sink's client: connection pool, TLS and credentials.
pub struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    authorization: Option<HeaderValue>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(
        tls: &ClientTlsConfig,
        auth: &AuthConfig,
        timeout: Duration,
    ) -> Result<HttpClient, ClientError> {
        let config = rustls_config(tls)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(HttpClient {
            client,
            authorization: authorization(auth)?,
            timeout,
        })
    }

    /// POSTs `body`; any HTTP status is a `Response`, only transport failures are errors.
    pub async fn post(
        &self,
        url: &hyper::Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> Result<Response, RequestError> {
        let mut request = hyper::Request::post(url.clone());
        if let Some(auth) = &self.authorization {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RequestError::Transport(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| RequestError::Transport(error_chain(&e)))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let mut body = Vec::new();
            let mut incoming = response.into_body();
            // Success bodies are ignored; error bodies are read up to a cap for the log.
            while body.len() < MAX_ERROR_BODY {
                match incoming.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            body.extend_from_slice(data);
                        }
                    }
                    Some(Err(e)) => return Err(RequestError::Transport(e.to_string())),
                    None => break,
                }
            }
            body.truncate(MAX_ERROR_BODY);
            Ok(Response {
                status,
                retry_after,
                body: String::from_utf8_lossy(&body).trim().to_owned(),
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::Timeout(self.timeout)),
        }
    }
}

impl HttpClient {
    /// [`HttpClient::post`], timed and counted in the sink's metrics; a request that got no
    /// answer becomes a [`Retry`] (`transport` or `timeout`).
    pub async fn post_counted(
        &self,
        metrics: &SinkMetrics,
        url: &hyper::Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> Result<Response, Retry> {
        let started = std::time::Instant::now();
        match self.post(url, headers, body).await {
            Ok(response) => {
                metrics.request(&response.status.to_string(), started.elapsed());
                Ok(response)
            }
            Err(e) => {
                let reason = match e {
                    RequestError::Timeout(_) => "timeout",
                    RequestError::Transport(_) => "transport",
                };
                metrics.request(reason, started.elapsed());
                Err(Retry {
                    reason: reason.into(),
                    detail: e.to_string(),
                    after: None,
                })
            }
        }
    }
}

/// hyper's errors hide the useful part (connection refused, certificate unknown) in sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn authorization(auth: &AuthConfig) -> Result<Option<HeaderValue>, ClientError> {
    let password = auth.password_source().resolve("auth.password")?;
    let token = auth.bearer_token_source().resolve("auth.bearer_token")?;
    let value = match (&auth.username, password, token) {
        (Some(user), password, None) => {
            let credentials = format!("{user}:{}", password.unwrap_or_default());
            format!("Basic {}", base64(credentials.as_bytes()))
        }
        (None, None, Some(token)) => format!("Bearer {token}"),
        (None, None, None) => return Ok(None),
        (None, Some(_), _) => {
            return Err(ClientError::Config(
                "a password without a username; set auth.username".into(),
            ));
        }
        (Some(_), _, Some(_)) => {
            return Err(ClientError::Config(
                "set either basic auth (username/password) or a bearer token, not both".into(),
            ));
        }
    };
    let mut header = HeaderValue::from_str(&value).map_err(|_| {
        ClientError::Config("credentials contain characters not allowed in an HTTP header".into())
    })?;
    header.set_sensitive(true);
    Ok(Some(header))
}

/// Standard base64 with padding (RFC 4648), for basic auth.
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn rustls_config(tls: &ClientTlsConfig) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            let pem = picket_core::tls::read_certificates(ca)?;
            roots.add_parsable_certificates(pem.certs);
        }
        None => {
            // A machine without a bundle can still talk plain HTTP; https then fails with an
            // unknown-issuer error that names the problem.
            if let Some(path) = SYSTEM_CA_BUNDLES.iter().map(Path::new).find(|p| p.exists())
                && let Ok(pem) = picket_core::tls::read_certificates(path)
            {
                roots.add_parsable_certificates(pem.certs);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let certs = picket_core::tls::read_certificates(cert)?.certs;
            let key_pem = picket_core::tls::read_private_key(key)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| ClientError::Config(format!("{}: {e}", key.display())))?;
            let certs: Vec<CertificateDer<'static>> = certs;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| ClientError::Config(format!("client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(ClientError::Config(
            "tls.cert and tls.key go together; set both or neither".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn credentials_from_files_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let auth = AuthConfig {
            bearer_token_file: Some(file.clone()),
            ..Default::default()
        };
        let header = authorization(&auth).unwrap().unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer s3cret");
        assert!(header.is_sensitive(), "never shown in debug output");
        // From the environment: PATH is set wherever tests run and stands in for a token.
        let from_env = AuthConfig {
            bearer_token_env: Some("PATH".into()),
            ..Default::default()
        };
        let header = authorization(&from_env).unwrap().unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(header.to_str().unwrap(), format!("Bearer {path}"));
        let ambiguous = AuthConfig {
            bearer_token: Some("t".into()),
            bearer_token_file: Some(file.clone()),
            ..Default::default()
        };
        let e = authorization(&ambiguous).unwrap_err().to_string();
        assert!(
            e.contains("bearer_token_file") && !e.contains("s3cret"),
            "{e}"
        );

        let both = AuthConfig {
            username: Some("u".into()),
            bearer_token: Some("t".into()),
            ..Default::default()
        };
        assert!(authorization(&both).is_err());
        let basic = AuthConfig {
            username: Some("user".into()),
            password: Some("pass".into()),
            ..Default::default()
        };
        assert_eq!(
            authorization(&basic).unwrap().unwrap().to_str().unwrap(),
            "Basic dXNlcjpwYXNz"
        );
    }
}
