//! Compiled plugins kept on disk, so a restart (or a Pi with a slow CPU) skips compilation.
//!
//! Loading precompiled code means trusting it completely: wasmtime maps it as executable
//! without verification. So the agent only loads what it wrote itself. Each entry is
//! authenticated with HMAC-SHA256 under a random key the agent creates in the cache directory
//! on first use. The directory must belong to the agent's user and be writable by no one else
//! (the agent creates it 0700), and the key must be private (0600, not a symlink): otherwise
//! the cache is not used at all, since whoever can write the key can forge entries. An entry
//! whose tag does not verify (written by anyone else, truncated by a power cut, produced by
//! another agent build, or moved from another entry's name: the tag covers the name too) is
//! discarded and the plugin compiled afresh. Entries are named by the SHA-256 of the plugin's
//! code, the engine's compatibility hash (wasmtime version, target, settings) and the agent's
//! version.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::catalog::{hex, sha256};

const KEY_FILE: &str = "key";
const TAG_LEN: usize = 32;

pub struct CompileCache {
    dir: PathBuf,
    key: hmac::Key,
}

#[derive(Debug, thiserror::Error)]
#[error("plugin cache {dir}: {what}: {source}")]
pub struct CacheError {
    dir: PathBuf,
    what: &'static str,
    source: std::io::Error,
}

impl CompileCache {
    /// Opens (creating it and its key if needed) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let error = |what, source| CacheError {
            dir: dir.to_owned(),
            what,
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| error("cannot create it", e))?;
        let dir_meta = fs::symlink_metadata(dir).map_err(|e| error("cannot inspect it", e))?;
        // Others may list it, not write it: a writable directory lets them replace the key.
        private_to_us(&dir_meta, 0o022)
            .map_err(|why| error("refusing to use it", std::io::Error::other(why)))?;
        let key_path = dir.join(KEY_FILE);
        let key = match read_private(&key_path) {
            Ok(key) if key.len() == 32 => key,
            Ok(_) => {
                return Err(error(
                    "the key file is not 32 bytes; remove it to start afresh",
                    std::io::Error::other(key_path.display().to_string()),
                ));
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(error("refusing the key file", e));
            }
            Err(_) => {
                let mut key = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                    .map_err(|_| error("no randomness for a key", std::io::Error::other("ring")))?;
                write_atomically(&key_path, &key).map_err(|e| error("cannot write the key", e))?;
                key.to_vec()
            }
        };
        Ok(CompileCache {
            dir: dir.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        })
    }

    /// The tag of an entry: over its name and its code, so entries cannot be swapped.
    fn tag(&self, path: &Path, code: &[u8]) -> hmac::Tag {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(path.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        context.update(code);
        context.sign()
    }

    fn entry_path(&self, engine: &Engine, wasm: &[u8]) -> PathBuf {
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let mut id = sha256(wasm).to_vec();
        id.extend_from_slice(&engine_hash.finish().to_le_bytes());
        id.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
        self.dir.join(format!("{}.cwasm", hex(&sha256(&id))))
    }

    /// The cached compilation of `wasm` for `engine`, if there is a valid one.
    pub fn load_entry(&self, engine: &Engine, wasm: &[u8]) -> Option<Component> {
        self.load(engine, &self.entry_path(engine, wasm))
    }

    /// Caches `code`, the serialised compilation of `wasm` for `engine`. A failure only costs
    /// a compilation on the next start, so it is logged, not returned. Not public: whatever
    /// is stored here is later loaded as native code, so only the runtime (with code it
    /// compiled or got from its trusted child compiler) may store.
    pub(super) fn store(&self, engine: &Engine, wasm: &[u8], code: &[u8]) {
        let path = self.entry_path(engine, wasm);
        let tag = self.tag(&path, code);
        let mut entry = Vec::with_capacity(TAG_LEN + code.len());
        entry.extend_from_slice(tag.as_ref());
        entry.extend_from_slice(code);
        if let Err(e) = write_atomically(&path, &entry) {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache the compiled plugin");
        }
    }

    fn load(&self, engine: &Engine, path: &Path) -> Option<Component> {
        let entry = fs::read(path).ok()?;
        let verified = entry.len() > TAG_LEN
            && equal_in_constant_time(
                self.tag(path, &entry[TAG_LEN..]).as_ref(),
                &entry[..TAG_LEN],
            );
        if !verified {
            tracing::warn!(path = %path.display(), "discarding a cached plugin the agent did not write (its tag does not verify)");
            let _ = fs::remove_file(path);
            return None;
        }
        // SAFETY: the bytes carry a valid tag under the key only this agent holds, so they
        // are exactly what this agent stored: `Component::serialize` output from its own
        // compilation or its own child compiler, for this engine's settings.
        match unsafe { Component::deserialize(engine, &entry[TAG_LEN..]) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding an unusable cached plugin");
                let _ = fs::remove_file(path);
                None
            }
        }
    }
}

/// Compares two tags without stopping at the first difference, so timing says nothing
/// about how much of a forged tag was right.
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a file or directory belongs to this process's user and grants nothing in `mask`
/// to anyone else; a symlink is refused.
fn private_to_us(meta: &fs::Metadata, mask: u32) -> Result<(), String> {
    // SAFETY: geteuid only reads the process's credentials.
    let uid = unsafe { libc::geteuid() };
    if meta.file_type().is_symlink() {
        return Err("it is a symlink".into());
    }
    if meta.uid() != uid {
        return Err(format!(
            "it belongs to uid {}, not this agent's {uid}",
            meta.uid()
        ));
    }
    if meta.mode() & mask != 0 {
        return Err(format!(
            "mode {:o} lets others in (chmod {:o} it)",
            meta.mode() & 0o777,
            meta.mode() & 0o777 & !mask
        ));
    }
    Ok(())
}

/// Reads a file that must be ours and private (not a symlink, owner only).
fn read_private(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    private_to_us(&file.metadata()?, 0o077).map_err(std::io::Error::other)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes through a fresh temporary file (never an existing one, never through a symlink)
/// and a rename, so a power cut leaves the old file or the new one, never half of it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "tmp-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    /// The smallest valid component: the component preamble and nothing else.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    /// Compiles the empty component and stores it in `cache`.
    fn fill(cache: &CompileCache, engine: &Engine) {
        let code = Component::new(engine, EMPTY_COMPONENT)
            .and_then(|c| c.serialize())
            .unwrap();
        cache.store(engine, EMPTY_COMPONENT, &code);
    }

    #[test]
    fn only_entries_written_by_this_cache_are_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path()).unwrap();
        let engine = engine();
        fill(&cache, &engine);
        let path = cache.entry_path(&engine, EMPTY_COMPONENT);
        assert!(cache.load(&engine, &path).is_some(), "a fresh entry loads");

        // Tampering with one byte of the code breaks the tag: discarded, not loaded.
        let mut entry = fs::read(&path).unwrap();
        let last = entry.len() - 1;
        entry[last] ^= 1;
        fs::write(&path, &entry).unwrap();
        assert!(cache.load(&engine, &path).is_none());
        assert!(!path.exists(), "the bad entry is removed");

        // An entry from another agent (another key) is refused too.
        fill(&cache, &engine);
        let other = tempfile::tempdir().unwrap();
        let other_cache = CompileCache::open(other.path()).unwrap();
        assert!(other_cache.load(&engine, &path).is_none());

        // The key survives a reopen, so entries do too.
        let reopened = CompileCache::open(dir.path()).unwrap();
        fill(&cache, &engine);
        assert!(reopened.load(&engine, &path).is_some());
        let mode = fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }
}
