//! Where plugin code comes from: the first-party plugins embedded in the binary (built by
//! `agent/build.rs`), and the operator's `.wasm` files in `plugins.directory`.
//!
//! First-party names (`host`, `rpi`, `prometheus`, `flink`) always mean the embedded plugin,
//! so a stray file in the directory cannot replace what the agent ships; custom plugins use
//! other names. Code is identified by its SHA-256, which is what reloads compare and what the
//! compile cache is keyed by.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/first_party.rs"));
}

/// Names of the embedded plugins.
pub fn first_party_names() -> impl Iterator<Item = &'static str> {
    embedded::FIRST_PARTY.iter().map(|(name, _)| *name)
}

pub fn is_first_party(name: &str) -> bool {
    first_party_names().any(|n| n == name)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Embedded,
    File(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Embedded => f.write_str("embedded"),
            Origin::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A plugin's code, ready to compile.
#[derive(Clone)]
pub struct PluginCode {
    /// Shared, not copied: embedded code stays in the binary's static data.
    pub wasm: bytes::Bytes,
    pub origin: Origin,
    /// SHA-256 of `wasm`.
    pub digest: [u8; 32],
    /// The file's size and modification time when it was read, to notice replacements
    /// cheaply; `None` for embedded code.
    pub stamp: Option<FileStamp>,
}

/// What changes when a file is replaced (rename over it, or rewrite in place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "plugin {name:?} is not a first-party plugin ({first_party}) and plugins.directory is not set"
    )]
    NoDirectory { name: String, first_party: String },
    #[error("cannot read plugin {name:?} from {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The file a custom plugin `name` is loaded from.
pub fn file_path(name: &str, directory: Option<&Path>) -> Result<PathBuf, CatalogError> {
    match directory {
        Some(dir) => Ok(dir.join(format!("{name}.wasm"))),
        None => Err(CatalogError::NoDirectory {
            name: name.to_owned(),
            first_party: first_party_names().collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Loads plugin `name`: embedded if it is first-party, else `<directory>/<name>.wasm`.
pub fn load(name: &str, directory: Option<&Path>) -> Result<PluginCode, CatalogError> {
    if let Some((_, wasm)) = embedded::FIRST_PARTY.iter().find(|(n, _)| *n == name) {
        return Ok(PluginCode {
            wasm: bytes::Bytes::from_static(wasm),
            origin: Origin::Embedded,
            digest: sha256(wasm),
            stamp: None,
        });
    }
    let path = file_path(name, directory)?;
    let read_error = |source| CatalogError::Read {
        name: name.to_owned(),
        path: path.clone(),
        source,
    };
    // Stamp first: if the file is replaced while we read it, the next check sees a newer
    // stamp and reloads, rather than missing the change.
    let stamp = FileStamp::of(&path).map_err(read_error)?;
    let wasm = std::fs::read(&path).map_err(read_error)?;
    Ok(PluginCode {
        digest: sha256(&wasm),
        wasm: bytes::Bytes::from(wasm),
        origin: Origin::File(path),
        stamp: Some(stamp),
    })
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_party_plugins_are_embedded_and_valid_components() {
        let names: Vec<_> = first_party_names().collect();
        assert_eq!(names, ["host", "rpi", "prometheus", "flink"]);
        for name in names {
            let code = load(name, None).unwrap();
            assert_eq!(code.origin, Origin::Embedded);
            // The component binary format's magic and layer: `\0asm`, version 0x0d, layer 1.
            assert_eq!(&code.wasm[..4], b"\0asm", "{name}");
            assert_eq!(
                &code.wasm[6..8],
                &[1, 0],
                "{name} is a component, not a core module"
            );
        }
    }

    #[test]
    fn custom_plugins_come_from_the_directory_with_a_stamp() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load("mine", None),
            Err(CatalogError::NoDirectory { .. })
        ));
        assert!(matches!(
            load("mine", Some(dir.path())),
            Err(CatalogError::Read { .. })
        ));
        std::fs::write(dir.path().join("mine.wasm"), b"v1").unwrap();
        let first = load("mine", Some(dir.path())).unwrap();
        assert_eq!(first.digest, sha256(b"v1"));
        assert!(first.stamp.is_some());
        // A file named like a first-party plugin does not replace it.
        std::fs::write(dir.path().join("host.wasm"), b"impostor").unwrap();
        assert_eq!(
            load("host", Some(dir.path())).unwrap().origin,
            Origin::Embedded
        );
    }
}
