//! Reading PEM certificates and private keys, with errors that say which file and what it
//! should contain.
//!
//! Both binaries read their TLS material through here before handing the PEM bytes to tonic,
//! so `check-config` and start-up catch an empty file, a key where a certificate belongs, or
//! a missing file with a message naming the config key that points at it.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} contains no PEM certificate (expected a \"-----BEGIN CERTIFICATE-----\" block)"
    )]
    NoCertificate { path: PathBuf },
    #[error("{path} is not valid PEM: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("{path} contains no private key (expected a \"-----BEGIN PRIVATE KEY-----\" block)")]
    NoKey { path: PathBuf },
}

/// PEM text of a file together with what it parsed to.
pub struct PemCertificates {
    pub pem: Vec<u8>,
    pub certs: Vec<CertificateDer<'static>>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a file of one or more PEM certificates.
pub fn read_certificates(path: &Path) -> Result<PemCertificates, TlsFileError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsFileError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(PemCertificates { pem, certs })
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1) and returns its PEM text.
pub fn read_private_key(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let pem = read(path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(_) => Ok(pem),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(TlsFileError::NoKey {
            path: path.to_owned(),
        }),
        Err(e) => Err(TlsFileError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_empty_and_wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let err = read_certificates(&missing).err().unwrap();
        assert!(err.to_string().contains("ca.pem"), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            read_certificates(&empty),
            Err(TlsFileError::NoCertificate { .. })
        ));
        assert!(matches!(
            read_private_key(&empty),
            Err(TlsFileError::NoKey { .. })
        ));
    }
}
