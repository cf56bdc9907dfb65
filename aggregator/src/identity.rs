//! An agent's identity from its TLS client certificate.
//!
//! With mutual TLS the certificate's common name is the agent's identity, whatever its hello
//! claims, so one agent cannot write series under another's `instance` label.

use x509_parser::prelude::{FromDer, X509Certificate};

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
