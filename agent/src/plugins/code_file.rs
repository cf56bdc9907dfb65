//! Loads compiled plugin code by mapping a file instead of copying it into memory.
//!
//! Why: wasmtime copies code it is handed as bytes (`Component::deserialize`) into anonymous
//! memory, and all of it stays resident for the agent's life: 2.2 MiB for the host, rpi and
//! flink plugins, a fifth of the whole agent (docs/performance.md, "Agent memory"). Mapped
//! from a file (`Component::deserialize_file`), only the pages the plugins run are resident,
//! and those are clean page-cache pages the kernel can reclaim under pressure, which anonymous
//! memory on a Pi without swap never is.
//!
//! The code comes from a compile-cache entry the cache has verified ([`super::cache`]) or from
//! the child compiler. Without a cache, the child's output goes to an unnamed file
//! (`O_TMPFILE`) in [`SCRATCH_DIRECTORY`], which no other process can open and which
//! disappears once the agent stops mapping it. A file system that lives in memory (tmpfs) is
//! not used: its pages would stay in RAM whether the agent maps them or not, so nothing would
//! be gained but a smaller figure. Where no file can be mapped (no `/proc`, a read-only,
//! `noexec` or memory-backed scratch directory, or wasmtime failing to map it) the caller
//! loads the bytes as before. The plugins' linear memories take their initial data from the
//! same files (wasmtime maps it copy-on-write), one more reason the files must never change.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Where the child compiler's output goes when there is no compile cache. `/var/tmp` rather
/// than `/tmp`: it is meant to be on disk, where `/tmp` is often tmpfs (Debian 13 and most
/// systemd distributions), and systemd's `PrivateTmp=` gives the service a private one.
pub const SCRATCH_DIRECTORY: &str = "/var/tmp";

/// `f_type` of file systems whose pages live in memory (`linux/magic.h`).
const TMPFS_MAGIC: u32 = 0x0102_1994;
const RAMFS_MAGIC: u32 = 0x8584_58f6;

/// A loaded component, and whether its code is mapped from a file: only such code may have
/// its pages dropped (`image_pages::release_mapped_code`), since dropping pages of code in
/// anonymous memory would destroy it.
pub struct Loaded {
    pub component: Component,
    pub mapped: bool,
}

impl Loaded {
    pub fn mapped(component: Component) -> Self {
        Loaded {
            component,
            mapped: true,
        }
    }

    pub fn in_memory(component: Component) -> Self {
        Loaded {
            component,
            mapped: false,
        }
    }
}

/// Why code could not be mapped from a file; the caller then keeps it in memory.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The file could not be created or written, or lives in memory.
    #[error(
        "no file for compiled code in {dir}: {why} (plugins.cache_directory on a disk gives one)"
    )]
    NoFile { dir: PathBuf, why: String },
    /// `/proc/self/fd` is missing, so the open file cannot be handed to wasmtime by name
    /// without a window in which the name could point elsewhere.
    #[error("/proc is not mounted")]
    NoProc,
    /// wasmtime could not map or load the file (the caller then tries the bytes in memory).
    #[error("{0}")]
    Load(String),
}

/// Whether the engine runs plugins as native code, which must be mapped executable; Pulley
/// (armv7, `runtime.rs`'s `engine_config`) interprets it and maps nothing executable.
pub(super) const CODE_IS_NATIVE: bool = !cfg!(target_arch = "arm");

/// Maps `file`, which must hold exactly what `Component::serialize` produced for `engine`,
/// possibly followed by bytes wasmtime does not read (the cache's tag).
///
/// The file is opened again through `/proc/self/fd`, so wasmtime maps the very file the
/// caller opened (and verified), even if its name has been replaced since.
///
/// # Safety
///
/// As for `Component::deserialize_file`: the contents must come from this agent's own
/// compilation for this engine (wasmtime runs them as native code without checking), and
/// nothing may write to or truncate the file while the component lives. The agent only ever
/// replaces files by renaming new ones over them, and writes its unnamed files before
/// mapping them and never after.
/// `len` is the file's length as the caller verified it: wasmtime measures the file again
/// when it maps it, and a different length means it changed in between.
pub unsafe fn load(engine: &Engine, file: &File, len: u64) -> Result<Component, MapError> {
    let fds = Path::new("/proc/self/fd");
    if !fds.is_dir() {
        return Err(MapError::NoProc);
    }
    let path = fds.join(file.as_raw_fd().to_string());
    // SAFETY: the caller vouches for the contents and for their not changing.
    let component = unsafe { Component::deserialize_file(engine, &path) }
        .map_err(|e| MapError::Load(format!("{e:#}")))?;
    let range = component.image_range();
    let mapped = (range.end as usize).saturating_sub(range.start as usize);
    if u64::try_from(mapped).ok() != Some(len) {
        return Err(MapError::Load(format!(
            "the file changed while it was mapped: {mapped} bytes mapped, {len} verified"
        )));
    }
    Ok(component)
}

/// Writes `code` to a new unnamed file in `dir` (`O_TMPFILE`, mode 0600), refusing file
/// systems whose pages live in memory and, for native code, `noexec` mounts (where wasmtime
/// could not make the code executable). The data is synced, so that pages dropped from the
/// agent's memory come back from the disk as written, and so that the kernel may reclaim
/// them at once.
pub fn unnamed_file(dir: &Path, code: &[u8]) -> Result<File, MapError> {
    let no_file = |why: String| MapError::NoFile {
        dir: dir.to_owned(),
        why,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        // O_EXCL: the file can never be given a name (linkat), so it stays ours.
        .custom_flags(libc::O_TMPFILE | libc::O_EXCL)
        .mode(0o600)
        .open(dir)
        .map_err(|e| no_file(format!("cannot create an unnamed file: {e}")))?;
    if let Some(kind) = memory_backed(&file) {
        return Err(no_file(format!(
            "it is {kind}, whose pages stay in memory anyway"
        )));
    }
    if CODE_IS_NATIVE && mounted_noexec(&file) {
        return Err(no_file(
            "it is mounted noexec, so code mapped from it cannot run".into(),
        ));
    }
    file.write_all(code)
        .and_then(|()| file.sync_data())
        .map_err(|e| no_file(format!("cannot write the compiled code: {e}")))?;
    Ok(file)
}

/// Whether `file` is on a file system mounted `noexec`.
fn mounted_noexec(file: &File) -> bool {
    // SAFETY: an all-zero statvfs is a valid value for fstatvfs to fill in.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call's duration and `stats` is writable.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut stats) } != 0 {
        return false;
    }
    stats.f_flag & libc::ST_NOEXEC != 0
}

/// The kind of file system `file` is on, if its pages live in memory.
fn memory_backed(file: &File) -> Option<&'static str> {
    // SAFETY: an all-zero statfs is a valid value for fstatfs to fill in.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call's duration and `stats` is writable.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stats) } != 0 {
        return None;
    }
    // `f_type`'s C type differs between targets (and is signed on 32-bit ones); the magic
    // numbers are 32-bit values.
    #[allow(clippy::unnecessary_cast)]
    match stats.f_type as u32 {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest valid component: the component preamble and nothing else.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    /// A directory on a disk-backed file system: next to the test binary (in the target
    /// directory), since the machine's temporary directory may be tmpfs.
    fn disk_dir() -> tempfile::TempDir {
        let exe = std::env::current_exe().unwrap();
        tempfile::tempdir_in(exe.parent().unwrap()).unwrap()
    }

    #[test]
    fn code_in_an_unnamed_file_loads_and_leaves_no_name_behind() {
        let engine = engine();
        let code = Component::new(&engine, EMPTY_COMPONENT)
            .and_then(|c| c.serialize())
            .unwrap();
        let dir = disk_dir();
        let file = unnamed_file(dir.path(), &code).unwrap();
        // SAFETY: `code` is this engine's own serialisation, and nothing writes the file.
        let component = unsafe { load(&engine, &file, code.len() as u64) }.unwrap();
        let start = component.image_range().start as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapping = maps
            .lines()
            .find(|line| {
                let range = line.split(' ').next().unwrap_or_default();
                let (from, to) = range.split_once('-').unwrap();
                let parse = |hex| usize::from_str_radix(hex, 16).unwrap();
                (parse(from)..parse(to)).contains(&start)
            })
            .unwrap();
        assert!(
            mapping.contains(&format!("{}/", dir.path().display()))
                && mapping.ends_with("(deleted)"),
            "the component's image is not the unnamed file: {mapping}"
        );
        // A length other than the one verified is refused.
        // SAFETY: as above.
        let changed = unsafe { load(&engine, &file, code.len() as u64 + 1) };
        assert!(matches!(changed, Err(MapError::Load(_))), "{changed:?}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the file has no name"
        );
        // The mapping outlives the descriptor the file was written through.
        drop(file);
        let again = component.serialize().unwrap();
        assert_eq!(again.len(), code.len());
    }

    #[test]
    fn memory_backed_directories_are_refused() {
        // /dev/shm is tmpfs wherever glibc's POSIX shared memory works.
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            panic!("this test needs /dev/shm (tmpfs) to check the refusal");
        }
        match unnamed_file(shm, b"code") {
            Err(MapError::NoFile { why, .. }) => assert!(why.contains("tmpfs"), "{why}"),
            other => panic!("tmpfs was not refused: {other:?}"),
        }
    }

    #[test]
    fn code_that_is_not_a_component_is_refused_not_run() {
        let dir = disk_dir();
        let file = unnamed_file(dir.path(), b"not an ELF file at all").unwrap();
        // SAFETY: wasmtime rejects these bytes before running anything (not an ELF image).
        let refused = unsafe { load(&engine(), &file, 22) };
        assert!(matches!(refused, Err(MapError::Load(_))), "{refused:?}");
    }
}
