//! `picket-aggregator certs`: a fleet CA and its certificates, so nobody needs openssl.
//!
//! `init` creates a CA and a server certificate for the aggregator; `issue-agent NAME` signs a
//! client certificate whose common name is the agent's identity. Keys are ECDSA P-256 (fast on
//! a Pi, supported by every TLS stack we talk to). Every file is written with mode 0600 and
//! never overwritten: replacing a CA by accident would cut off a whole fleet.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} already exists; refusing to overwrite it (move it away first)")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}; run `picket-aggregator certs init` first")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    BadCa { path: PathBuf, source: rcgen::Error },
    #[error(
        "invalid name {0:?}: use letters, digits, '.', '-' and '_' (it becomes the agent's instance label)"
    )]
    BadName(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "aggregator.pem";
pub const SERVER_KEY: &str = "aggregator-key.pem";

/// How long issued certificates are valid.
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            // A little slack for clocks that run behind (Pis without RTC before NTP sync).
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

fn write_new(path: &Path, contents: &str) -> Result<(), CertError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CertError::Exists(path.to_owned()),
            _ => CertError::Write {
                path: path.to_owned(),
                source,
            },
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|source| CertError::Write {
            path: path.to_owned(),
            source,
        })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })
}

fn ca_params(validity: &Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Picket fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params
}

/// Creates `ca.pem`, `ca-key.pem`, `aggregator.pem` and `aggregator-key.pem` in `dir`. The
/// server certificate is valid for `hosts` (DNS names or IP addresses) besides localhost.
pub fn init(dir: &Path, hosts: &[String], days: i64) -> Result<Vec<PathBuf>, CertError> {
    create_dir(dir)?;
    for name in [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY] {
        if dir.join(name).exists() {
            return Err(CertError::Exists(dir.join(name)));
        }
    }
    let validity = Validity::days_from_now(days);
    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params(&Validity::days_from_now(days.max(3650)));
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = hostname::get()
        && let Some(host) = host.to_str()
    {
        names.push(host.to_owned());
    }
    names.extend(hosts.iter().cloned());
    names.dedup();
    let server_key = KeyPair::generate()?;
    let server_cert = server_params(&names, &validity)?.signed_by(&server_key, &issuer)?;

    let written = vec![
        dir.join(CA_CERT),
        dir.join(CA_KEY),
        dir.join(SERVER_CERT),
        dir.join(SERVER_KEY),
    ];
    write_new(&written[0], &ca_cert.pem())?;
    write_new(&written[1], &ca_key.serialize_pem())?;
    write_new(&written[2], &server_cert.pem())?;
    write_new(&written[3], &server_key.serialize_pem())?;
    Ok(written)
}

fn server_params(names: &[String], validity: &Validity) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "picket-aggregator");
    params.distinguished_name = dn;
    for name in names {
        let san = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    Ok(params)
}

/// Is `name` usable as an agent identity (and a file name)?
pub fn is_valid_agent_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Signs a client certificate for agent `name` with the CA in `ca_dir`, writing
/// `<out_dir>/<name>.pem` and `<out_dir>/<name>-key.pem`.
pub fn issue_agent(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    validity: &Validity,
) -> Result<Vec<PathBuf>, CertError> {
    if !is_valid_agent_name(name) {
        return Err(CertError::BadName(name.to_owned()));
    }
    let read = |file: &str| {
        let path = ca_dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| CertError::ReadCa { path, source })
    };
    let ca_pem = read(CA_CERT)?;
    let ca_key_pem = read(CA_KEY)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| CertError::BadCa {
        path: ca_dir.join(CA_KEY),
        source,
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(|source| CertError::BadCa {
        path: ca_dir.join(CA_CERT),
        source,
    })?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    create_dir(out_dir)?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}-key.pem"));
    if cert_path.exists() {
        return Err(CertError::Exists(cert_path));
    }
    write_new(&key_path, &key.serialize_pem())?;
    write_new(&cert_path, &cert.pem())?;
    Ok(vec![cert_path, key_path])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_and_issue_write_private_files_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), &["agg.example".into()], 365).unwrap();
        assert_eq!(files.len(), 4);
        for f in &files {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        assert!(matches!(
            init(dir.path(), &[], 365),
            Err(CertError::Exists(_))
        ));

        let agents = dir.path().join("agents");
        let issued =
            issue_agent(dir.path(), &agents, "pi-07", &Validity::days_from_now(30)).unwrap();
        let pem = std::fs::read_to_string(&issued[0]).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
        let mode = std::fs::metadata(&issued[1]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            issue_agent(dir.path(), &agents, "pi-07", &Validity::days_from_now(30)),
            Err(CertError::Exists(_))
        ));
    }

    #[test]
    fn rejects_names_that_are_not_identities() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a b", ".hidden", "ä"] {
            assert!(matches!(
                issue_agent(dir.path(), dir.path(), bad, &Validity::days_from_now(1)),
                Err(CertError::BadName(_))
            ));
        }
        assert!(matches!(
            issue_agent(dir.path(), dir.path(), "ok", &Validity::days_from_now(1)),
            Err(CertError::ReadCa { .. })
        ));
    }
}
