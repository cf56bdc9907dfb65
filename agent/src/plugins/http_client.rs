//! The HTTP GET behind the `http` capability: plain HTTP/1.1 to loopback-style endpoints
//! (Flink's REST API and reporters), with a body size cap enforced while reading.

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::bindings::picket::plugin::http::Response;
use super::bindings::picket::plugin::types::HostError;

pub async fn get(
    url: &str,
    headers: &[(String, String)],
    cap: usize,
) -> Result<Response, HostError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| HostError::Failed(format!("invalid URL {url:?}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(HostError::Failed(format!(
            "{url}: only http:// is supported by the http capability today"
        )));
    }
    let mut request = hyper::Request::get(uri);
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| HostError::Failed(format!("invalid request: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(request)
        .await
        .map_err(|e| HostError::Failed(format!("{url}: {e}")))?;
    let status = response.status().as_u16();
    let response_headers = response
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| HostError::Failed(format!("{url}: {e}")))?;
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
