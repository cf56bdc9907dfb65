//! An InfluxDB 1.x `/write`-compatible receiver, for Flink's `InfluxdbReporter` (the
//! influxdb-java client) and anything else that writes line protocol over the v1 API:
//! `POST /write?db=..&rp=..&precision=..` with optional `u`/`p` parameters or basic auth and
//! an optional gzip body, plus `/ping` for clients that check the server first.
//!
//! Lines become samples as [`super::influx_line`] describes (`<measurement>_<field>`, tags as
//! labels). Like InfluxDB, a body with some bad lines stores the good ones and answers 400
//! `partial write` naming the first bad line; a body with only bad lines stores nothing.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use picket_core::model::now_ms;
use serde::Deserialize;

use super::influx_line::{self, Precision};
use super::{Intake, query_param};

const RECEIVER: &str = "influxdb";
/// The version `/ping` reports: the 1.x API this receiver implements.
const COMPATIBLE_VERSION: &str = "1.8.10-picket";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxWriteConfig {
    /// Serve `/write` and `/ping` on the HTTP port.
    pub enabled: bool,
    /// Databases (`db`) accepted; others get 404. Empty: any.
    pub databases: Vec<String>,
    /// When set, writers must authenticate as this user (`u`/`p` or basic auth).
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// The largest body accepted, after gzip decompression (413 above).
    pub max_body_bytes: usize,
}

impl Default for InfluxWriteConfig {
    fn default() -> Self {
        InfluxWriteConfig {
            enabled: false,
            databases: Vec::new(),
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            max_body_bytes: 32 * 1024 * 1024,
        }
    }
}

impl InfluxWriteConfig {
    pub fn password_source(&self) -> picket_core::secret::SecretSource<'_> {
        picket_core::secret::SecretSource {
            inline: self.password.as_deref(),
            file: self.password_file.as_deref(),
            env: self.password_env.as_deref(),
        }
    }

    /// The password from `password`, `password_file` (its first line) or `password_env`.
    pub fn resolved_password(&self) -> Result<Option<String>, String> {
        self.password_source()
            .resolve("password")
            .map_err(|e| e.to_string())
    }
}

pub struct InfluxWrite {
    config: InfluxWriteConfig,
    credentials: Option<(String, String)>,
    intake: Arc<Intake>,
}

/// An InfluxDB-style error answer: `{"error": "..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> (StatusCode, String) {
    let body = serde_json::json!({ "error": message.into() }).to_string();
    (status, body)
}

impl InfluxWrite {
    /// Fails when `password_file` cannot be read or a password is missing for `username`.
    pub fn new(config: InfluxWriteConfig, intake: Arc<Intake>) -> Result<Arc<InfluxWrite>, String> {
        let password = config.resolved_password()?;
        let credentials = match (&config.username, password) {
            (Some(user), Some(password)) => Some((user.clone(), password)),
            (Some(_), None) => return Err("username needs password or password_file".into()),
            (None, Some(_)) => return Err("password without username".into()),
            (None, None) => None,
        };
        Ok(Arc::new(InfluxWrite {
            config,
            credentials,
            intake,
        }))
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/write", post(write))
            .route("/ping", any(ping))
            .with_state(self.clone())
    }

    fn authorized(&self, query: Option<&str>, headers: &HeaderMap) -> bool {
        let Some((user, password)) = &self.credentials else {
            return true;
        };
        let from_query = query_param(query, "u").zip(query_param(query, "p"));
        let from_header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_basic_auth);
        [from_query, from_header]
            .into_iter()
            .flatten()
            .any(|(u, p)| {
                constant_time_eq(u.as_bytes(), user.as_bytes())
                    & constant_time_eq(p.as_bytes(), password.as_bytes())
            })
    }

    async fn write(
        &self,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<StatusCode, (StatusCode, String)> {
        if !self.authorized(query, headers) {
            return Err(error(StatusCode::UNAUTHORIZED, "authorization failed"));
        }
        let database = query_param(query, "db")
            .filter(|d| !d.is_empty())
            .ok_or_else(|| error(StatusCode::BAD_REQUEST, "database is required"))?;
        if !self.config.databases.is_empty() && !self.config.databases.contains(&database) {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("database not found: {database:?}"),
            ));
        }
        let precision = Precision::from_param(query_param(query, "precision").as_deref())
            .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
        let limit = self.config.max_body_bytes;
        let too_large = move || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than receivers.influxdb.max_body_bytes ({limit})"),
            )
        };
        let raw = self.intake.read_body(body, limit).await.map_err(|e| {
            let (status, message) = e.answer(
                "the request body",
                "receivers.influxdb.max_body_bytes",
                limit,
            );
            error(status, message)
        })?;
        let gzip = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
        // Decompressing and parsing are CPU work: off the async workers.
        let parsed = tokio::task::spawn_blocking(move || {
            let text = if gzip {
                gunzip(&raw, limit).map_err(|e| match e {
                    Gunzip::TooLarge => too_large(),
                    Gunzip::Invalid(e) => {
                        error(StatusCode::BAD_REQUEST, format!("bad gzip body: {e}"))
                    }
                })?
            } else {
                raw
            };
            Ok(influx_line::parse(&text, precision, now_ms()))
        })
        .await
        .unwrap_or_else(|e| {
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("parsing failed: {e}"),
            ))
        })?;
        if parsed.families.is_empty() {
            return match parsed.errors.first() {
                Some(first) => Err(error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unable to parse line {} '{}': {}",
                        first.line, first.excerpt, first.reason
                    ),
                )),
                None => Ok(StatusCode::NO_CONTENT),
            };
        }
        self.intake
            .deliver(format!("{RECEIVER}:{database}"), parsed.families)
            .await
            .map_err(|e| {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the aggregator cannot store the points right now: {e}"),
                )
            })?;
        match parsed.errors.first() {
            Some(first) => Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "partial write: unable to parse line {} '{}': {} ({} bad lines dropped, {} points stored)",
                    first.line,
                    first.excerpt,
                    first.reason,
                    parsed.errors.len(),
                    parsed.points
                ),
            )),
            None => Ok(StatusCode::NO_CONTENT),
        }
    }
}

async fn write(
    State(receiver): State<Arc<InfluxWrite>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match receiver.write(uri.query(), &headers, body).await {
        Ok(status) => {
            receiver.intake.count(RECEIVER, "accepted");
            status.into_response()
        }
        Err((status, body)) => {
            let outcome = match status {
                StatusCode::BAD_REQUEST if body.contains("partial write") => "partial",
                StatusCode::BAD_REQUEST => "bad_request",
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::NOT_FOUND => "not_found",
                StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                StatusCode::SERVICE_UNAVAILABLE => "unavailable",
                StatusCode::REQUEST_TIMEOUT => "timeout",
                _ => "other",
            };
            receiver.intake.count(RECEIVER, outcome);
            tracing::warn!(%status, error = %body, "influxdb write refused");
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}

async fn ping() -> impl IntoResponse {
    (
        StatusCode::NO_CONTENT,
        [("X-Influxdb-Version", COMPATIBLE_VERSION)],
    )
}

enum Gunzip {
    TooLarge,
    Invalid(std::io::Error),
}

/// Decompresses at most `limit` bytes, so a small bomb cannot take the memory. Every member
/// of a multi-member body is read, as gzip tools and InfluxDB do.
fn gunzip(body: &[u8], limit: usize) -> Result<Bytes, Gunzip> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::MultiGzDecoder::new(body).take(limit as u64 + 1);
    decoder.read_to_end(&mut out).map_err(Gunzip::Invalid)?;
    if out.len() > limit {
        return Err(Gunzip::TooLarge);
    }
    Ok(Bytes::from(out))
}

/// `Basic base64(user:password)` → (user, password).
fn parse_basic_auth(value: &str) -> Option<(String, String)> {
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = super::decode_base64(encoded)?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Compares without returning early, so the time taken does not tell how much of a guessed
/// password was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_and_comparison() {
        assert_eq!(
            parse_basic_auth("Basic Zmxpbms6czNjcmV0OnB3"),
            Some(("flink".into(), "s3cret:pw".into()))
        );
        assert_eq!(parse_basic_auth("Bearer x"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn gzip_bodies_are_bounded() {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&vec![b'a'; 10_000]).unwrap();
        let compressed = encoder.finish().unwrap();
        assert_eq!(
            gunzip(&compressed, 10_000).ok().map(|b| b.len()),
            Some(10_000)
        );
        assert!(matches!(gunzip(&compressed, 9_999), Err(Gunzip::TooLarge)));
        assert!(matches!(gunzip(b"not gzip", 100), Err(Gunzip::Invalid(_))));
        // Two members, as `cat a.gz b.gz` makes: both are read.
        let twice = [compressed.clone(), compressed].concat();
        assert_eq!(gunzip(&twice, 20_000).ok().map(|b| b.len()), Some(20_000));
    }
}
