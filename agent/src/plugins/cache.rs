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
//! code, the engine's compatibility hash (wasmtime version, target, settings), the agent's
//! version and the entry format.
//!
//! An entry is the serialised component followed by its tag, so that once verified it can be
//! mapped as it is ([`super::code_file`]): only the pages the plugin runs then stay resident.
//! The agent verifies and maps the same open file, and never writes an entry in place (a new
//! one is renamed over the old), so what runs is what was verified. Editing or truncating an
//! entry in place while an agent maps it would crash that agent (`SIGBUS`), as it would for
//! any program's executable; removing entries, or the whole directory, is safe at any time.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read as _;
use std::io::Seek as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ring::hmac;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::catalog::{hex, sha256};
use super::code_file::{self, Loaded, MapError};

const KEY_FILE: &str = "key";
const TAG_LEN: usize = 32;

/// Part of every entry's name: entries of an earlier layout (the tag in front, before
/// 2026-12-04) are then never looked up, instead of being discarded one warning at a time.
const ENTRY_FORMAT: &[u8] = b"code, then tag";

pub struct CompileCache {
    dir: PathBuf,
    key: hmac::Key,
    /// Whether [`CompileCache::note_in_memory`] has spoken.
    said_in_memory: AtomicBool,
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
                write_atomically(&key_path, &[&key])
                    .map_err(|e| error("cannot write the key", e))?;
                key.to_vec()
            }
        };
        Ok(CompileCache {
            dir: dir.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            said_in_memory: AtomicBool::new(false),
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
        id.extend_from_slice(ENTRY_FORMAT);
        self.dir.join(format!("{}.cwasm", hex(&sha256(&id))))
    }

    /// The cached compilation of `wasm` for `engine`, if there is a valid one.
    pub fn load_entry(&self, engine: &Engine, wasm: &[u8]) -> Option<Loaded> {
        self.load(engine, &self.entry_path(engine, wasm))
    }

    /// Caches `code`, the serialised compilation of `wasm` for `engine`, and returns the
    /// entry's file, open, for [`code_file::load`]. A failure only costs a compilation on the
    /// next start, so it is logged, not returned. Not public: whatever is stored here is
    /// later loaded as native code, so only the runtime (with code it compiled or got from
    /// its trusted child compiler) may store.
    pub(super) fn store(&self, engine: &Engine, wasm: &[u8], code: &[u8]) -> Option<fs::File> {
        let path = self.entry_path(engine, wasm);
        let tag = self.tag(&path, code);
        match write_atomically(&path, &[code, tag.as_ref()]) {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache the compiled plugin");
                None
            }
        }
    }

    /// Removes the entry for `wasm`: its code, stored moments ago, turned out not to load.
    pub(super) fn discard(&self, engine: &Engine, wasm: &[u8]) {
        let _ = fs::remove_file(self.entry_path(engine, wasm));
    }

    fn load(&self, engine: &Engine, path: &Path) -> Option<Loaded> {
        let mut file = fs::OpenOptions::new()
            .read(true)
            // O_NONBLOCK: a FIFO under an entry's name must not hang the agent.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .ok()?;
        // The mapping reads the file again for every page not in memory, at any time: whoever
        // else could write the entry could change the code after its tag was checked.
        let meta = file.metadata().ok()?;
        if let Err(why) = entry_is_ours(&meta) {
            tracing::warn!(path = %path.display(), reason = %why, "discarding a cached plugin the agent cannot trust");
            let _ = fs::remove_file(path);
            return None;
        }
        let code_len = match self.verified_code_len(path, &mut file, meta.len()) {
            Ok(Some(len)) => len,
            Ok(None) => {
                tracing::warn!(path = %path.display(), "discarding a cached plugin the agent did not write (its tag does not verify)");
                let _ = fs::remove_file(path);
                return None;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a cached plugin; compiling it afresh");
                return None;
            }
        };
        // SAFETY: the file's bytes carry a valid tag under the key only this agent holds, so
        // they are exactly what this agent stored: `Component::serialize` output from its own
        // compilation or its own child compiler, for this engine's settings. The mapping is
        // of this same open file, which only this agent's user can write, and agents never
        // write entries in place.
        let mapped = unsafe { code_file::load(engine, &file, meta.len()) }.map(Loaded::mapped);
        let loaded = mapped.or_else(|why| {
            if !matches!(why, MapError::NoProc) {
                self.note_in_memory(path, &why);
            }
            read_code(&mut file, code_len).and_then(|code| {
                // SAFETY: as above; these are the verified bytes, read again.
                unsafe { Component::deserialize(engine, &code) }
                    .map(Loaded::in_memory)
                    .map_err(|e| format!("{e:#}"))
            })
        });
        match loaded {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding an unusable cached plugin");
                let _ = fs::remove_file(path);
                None
            }
        }
    }

    /// Says once why cached code is loaded into memory rather than mapped.
    fn note_in_memory(&self, path: &Path, why: &MapError) {
        if !self.said_in_memory.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %path.display(), reason = %why, "cannot map cached plugins; loading them into memory, where all of their code stays resident");
        }
    }

    /// Reads the entry through once: the length of its code if its tag verifies, `None` if it
    /// does not (or the file is too short to hold one).
    fn verified_code_len(
        &self,
        path: &Path,
        file: &mut fs::File,
        len: u64,
    ) -> std::io::Result<Option<usize>> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let Some(code_len) = len.checked_sub(TAG_LEN).filter(|&n| n > 0) else {
            return Ok(None);
        };
        let mut context = hmac::Context::with_key(&self.key);
        context.update(path.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        // In pieces: reading the whole entry into the heap would leave the allocator holding
        // its size, which is what mapping the entry is there to avoid.
        let mut piece = vec![0u8; 64 * 1024];
        let mut left = code_len;
        while left > 0 {
            let n = left.min(piece.len());
            file.read_exact(&mut piece[..n])?;
            context.update(&piece[..n]);
            left -= n;
        }
        let mut tag = [0u8; TAG_LEN];
        file.read_exact(&mut tag)?;
        Ok(equal_in_constant_time(context.sign().as_ref(), &tag).then_some(code_len))
    }
}

/// The first `len` bytes of `file`.
fn read_code(file: &mut fs::File, len: usize) -> Result<Vec<u8>, String> {
    let mut code = vec![0u8; len];
    file.rewind()
        .and_then(|()| file.read_exact(&mut code))
        .map_err(|e| format!("cannot read it again: {e}"))?;
    Ok(code)
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

/// Whether a cache entry is a regular file of this agent's user, with one name, that no one
/// else can write.
fn entry_is_ours(meta: &fs::Metadata) -> Result<(), String> {
    if !meta.file_type().is_file() {
        return Err("it is not a regular file".into());
    }
    if meta.nlink() != 1 {
        return Err(format!(
            "it has {} names (hard links), so it can be written through another",
            meta.nlink()
        ));
    }
    private_to_us(meta, 0o022)
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
/// and a rename, so a power cut leaves the old file or the new one, never half of it. Returns
/// the written file (`parts` one after the other), open.
fn write_atomically(path: &Path, parts: &[&[u8]]) -> std::io::Result<fs::File> {
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
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(file)
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
        assert!(
            cache.load(&engine, &path).is_some_and(|l| l.mapped),
            "a fresh entry loads, mapped"
        );

        // Tampering with one byte of the code, or of the tag after it, or cutting the entry
        // short breaks the tag: discarded, not loaded.
        let good = fs::read(&path).unwrap();
        let tampered_code = {
            let mut entry = good.clone();
            entry[good.len() / 3] ^= 1;
            entry
        };
        let tampered_tag = {
            let mut entry = good.clone();
            entry[good.len() - 1] ^= 1;
            entry
        };
        let cut = good[..good.len() - 1].to_vec();
        for (what, entry) in [
            ("code", tampered_code),
            ("tag", tampered_tag),
            ("cut", cut),
            ("tag only", good[good.len() - TAG_LEN..].to_vec()),
        ] {
            fs::write(&path, &entry).unwrap();
            assert!(cache.load(&engine, &path).is_none(), "{what}");
            assert!(!path.exists(), "{what}: the bad entry is removed");
        }

        // An entry others could write, through its mode or another name, is refused: the
        // mapped code is read from the file again long after the tag was checked.
        fill(&cache, &engine);
        let mut permissions = fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o620);
        fs::set_permissions(&path, permissions).unwrap();
        assert!(cache.load(&engine, &path).is_none(), "group-writable");
        assert!(!path.exists(), "group-writable: removed");
        fill(&cache, &engine);
        let other_name = dir.path().join("elsewhere");
        fs::hard_link(&path, &other_name).unwrap();
        assert!(cache.load(&engine, &path).is_none(), "two names");
        fs::remove_file(&other_name).unwrap();

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

    /// A loaded entry is the entry's file mapped (code and tag), not a copy of its code; the
    /// file the store hands back maps the same way.
    #[test]
    fn entries_are_mapped_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path()).unwrap();
        let engine = engine();
        let code = Component::new(&engine, EMPTY_COMPONENT)
            .and_then(|c| c.serialize())
            .unwrap();
        let stored = cache.store(&engine, EMPTY_COMPONENT, &code).unwrap();
        let path = cache.entry_path(&engine, EMPTY_COMPONENT);
        let entry_len = fs::metadata(&path).unwrap().len() as usize;
        assert_eq!(entry_len, code.len() + TAG_LEN);
        let image_len = |component: &Component| {
            let range = component.image_range();
            range.end as usize - range.start as usize
        };
        let loaded = cache.load(&engine, &path).unwrap().component;
        assert_eq!(image_len(&loaded), entry_len, "loaded from the cache");
        // SAFETY: the file holds this engine's own serialisation and its tag.
        let from_store = unsafe { code_file::load(&engine, &stored, entry_len as u64) }.unwrap();
        assert_eq!(image_len(&from_store), entry_len, "the file store returned");
        // Anything the agent maps is the file's: an address inside the image is in a
        // mapping of the entry, per /proc/self/maps.
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        let inside = loaded.image_range().start as usize;
        let mapping = maps
            .lines()
            .find(|line| {
                let Some((range, _)) = line.split_once(' ') else {
                    return false;
                };
                let Some((start, end)) = range.split_once('-') else {
                    return false;
                };
                let start = usize::from_str_radix(start, 16).unwrap();
                let end = usize::from_str_radix(end, 16).unwrap();
                (start..end).contains(&inside)
            })
            .unwrap();
        assert!(
            mapping.ends_with(path.to_str().unwrap()),
            "the image is not a mapping of the entry: {mapping}"
        );
    }
}
