//! Hands the pages of the agent's relocation tables back to the kernel once the dynamic
//! loader has applied them.
//!
//! The agent is a position-independent executable, so its binary carries tables of
//! relocations (`.rela.dyn` and `.rela.plt` on 64-bit targets, `.rel.*` on armv7; 0.81 MiB on
//! x86_64, 0.66 MiB on aarch64, 0.23 MiB on armv7) that the loader applies once, before
//! `main`. It reads every page of them, and the kernel then leaves those pages mapped into
//! the process for good, where they count in its resident memory although nothing reads
//! them again. They are clean pages of the binary's read-only segment, so dropping them
//! (`madvise(MADV_DONTNEED)`; the mapping stays) loses nothing: a later read would fault them
//! back in from the file. Under memory pressure the kernel would reclaim them anyway;
//! dropping them at start makes the resident set that `ps`, `top` or a process exporter
//! shows what the agent uses.
//!
//! Linking with packed relative relocations (`-z pack-relative-relocs`) would shrink the
//! tables instead, but needs glibc 2.36 at run time, which Ubuntu 22.04 does not have.

/// Drops the whole pages of the running executable's relocation tables from the process;
/// returns how many bytes that covered (0 where there is nothing to drop or anything looks
/// unexpected). Under qemu-user the figure is what was asked of the emulator.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release() -> usize {
    let Some(image) = executable_image() else {
        return 0;
    };
    let Some(tables) = relocation_tables(&image) else {
        return 0;
    };
    let page = page_size();
    let mut released = 0;
    for (start, len) in merged(tables) {
        let (Some(start), Some(end)) = (
            image.bias.checked_add(start),
            image
                .bias
                .checked_add(start)
                .and_then(|s| s.checked_add(len)),
        ) else {
            continue;
        };
        if !image.is_read_only(start, end) {
            continue;
        }
        // Only pages wholly inside the table: its first and last page hold other sections.
        let (Some(first), last) = (start.checked_next_multiple_of(page), end / page * page) else {
            continue;
        };
        if first >= last {
            continue;
        }
        // SAFETY: [first, last) lies in a mapped, read-only segment of this executable, outside
        // its RELRO part, and the executable has no text relocations (both checked above), so
        // its pages cannot have been written: dropping them only drops clean copies of the
        // file, which a later read maps again.
        let done = unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_DONTNEED,
            )
        };
        if done == 0 {
            released += last - first;
        }
    }
    released
}

/// (start, length) ranges with overlapping or touching ones joined: some linkers count
/// `.rela.plt` in `DT_RELASZ` too, and the page between two adjacent tables is theirs alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn merged(mut ranges: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    ranges.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let end = start.saturating_add(len);
        match out.last_mut() {
            Some((last_start, last_len)) if start <= last_start.saturating_add(*last_len) => {
                *last_len = end.max(last_start.saturating_add(*last_len)) - *last_start;
            }
            _ => out.push((start, len)),
        }
    }
    out
}

/// Elsewhere there is no table to release (or no glibc loader to have applied it).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release() -> usize {
    0
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
use imp::*;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::os::unix::fs::FileExt;

    #[cfg(target_pointer_width = "64")]
    type ProgramHeader = libc::Elf64_Phdr;
    #[cfg(target_pointer_width = "32")]
    type ProgramHeader = libc::Elf32_Phdr;

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_GNU_RELRO: u32 = 0x6474_e552;
    const PF_W: u32 = 2;
    const DT_NULL: usize = 0;
    const DT_PLTRELSZ: usize = 2;
    const DT_RELA: usize = 7;
    const DT_RELASZ: usize = 8;
    const DT_REL: usize = 17;
    const DT_RELSZ: usize = 18;
    const DT_TEXTREL: usize = 22;
    const DT_JMPREL: usize = 23;
    const DT_FLAGS: usize = 30;
    const DF_TEXTREL: usize = 0x4;

    /// A segment of the executable as mapped: [start, end) in this process.
    #[derive(Clone, Copy)]
    struct Mapped {
        start: usize,
        end: usize,
        writable: bool,
        /// Where `start` is in the file.
        #[cfg(test)]
        file_offset: u64,
    }

    /// The running executable: where it is loaded and its segments.
    pub struct Image {
        /// Load address minus link-time address.
        pub bias: usize,
        loads: Vec<Mapped>,
        relro: Vec<Mapped>,
        /// File offset and size of its dynamic section.
        dynamic: Option<(u64, usize)>,
    }

    impl Image {
        /// Whether [start, end) lies within one read-only loaded segment, clear of RELRO (which
        /// the loader writes before protecting it).
        pub fn is_read_only(&self, start: usize, end: usize) -> bool {
            let inside = |m: &Mapped| m.start <= start && end <= m.end;
            let overlaps = |m: &Mapped| start < m.end && m.start < end;
            self.loads.iter().any(|m| !m.writable && inside(m)) && !self.relro.iter().any(overlaps)
        }

        /// Where the byte at `address` of a loaded segment comes from in the file.
        #[cfg(test)]
        pub fn file_offset(&self, address: usize) -> Option<u64> {
            let m = self
                .loads
                .iter()
                .find(|m| m.start <= address && address < m.end)?;
            Some(m.file_offset + (address - m.start) as u64)
        }
    }

    /// The executable's image, from the loader's list of loaded objects (the executable comes
    /// first in it).
    pub fn executable_image() -> Option<Image> {
        unsafe extern "C" fn first_object(
            info: *mut libc::dl_phdr_info,
            _size: libc::size_t,
            data: *mut libc::c_void,
        ) -> libc::c_int {
            // SAFETY: the loader passes a valid `dl_phdr_info` for the duration of the call, and
            // `data` is the `Option<Image>` that `executable_image` lent for it.
            let (info, out) = unsafe { (&*info, &mut *data.cast::<Option<Image>>()) };
            // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers mapped for the life of
            // the object (the executable's stay mapped until exit).
            let headers: &[ProgramHeader] = if info.dlpi_phdr.is_null() {
                &[]
            } else {
                unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
            };
            let bias = info.dlpi_addr as usize;
            let mapped = |h: &ProgramHeader| Mapped {
                start: bias.wrapping_add(h.p_vaddr as usize),
                end: bias
                    .wrapping_add(h.p_vaddr as usize)
                    .wrapping_add(h.p_memsz as usize),
                writable: h.p_flags & PF_W != 0,
                #[cfg(test)]
                file_offset: widen(h.p_offset),
            };
            *out = Some(Image {
                bias,
                loads: headers
                    .iter()
                    .filter(|h| h.p_type == PT_LOAD)
                    .map(mapped)
                    .collect(),
                relro: headers
                    .iter()
                    .filter(|h| h.p_type == PT_GNU_RELRO)
                    .map(mapped)
                    .collect(),
                dynamic: headers
                    .iter()
                    .find(|h| h.p_type == PT_DYNAMIC)
                    .map(|h| (widen(h.p_offset), h.p_filesz as usize)),
            });
            1 // Stop after the first object.
        }
        let mut image: Option<Image> = None;
        // SAFETY: the callback only reads what the loader hands it and writes `image`, which
        // outlives the call.
        unsafe {
            libc::dl_iterate_phdr(Some(first_object), (&raw mut image).cast());
        }
        image
    }

    /// (link-time address, size) of each relocation table the executable's dynamic section
    /// names, read from the executable's file: in memory the loader may have rewritten the
    /// addresses to run-time ones. `None` when the executable has text relocations: the
    /// loader then made its read-only segments writable to apply them.
    pub fn relocation_tables(image: &Image) -> Option<Vec<(usize, usize)>> {
        let (offset, size) = image.dynamic?;
        let word = size_of::<usize>();
        if size > 64 * 1024 || !size.is_multiple_of(2 * word) {
            return None;
        }
        let file = std::fs::File::open("/proc/self/exe").ok()?;
        let mut bytes = vec![0u8; size];
        file.read_exact_at(&mut bytes, offset).ok()?;
        let mut entry = [0u8; size_of::<usize>()];
        let mut words = bytes.chunks_exact(word).map(|chunk| {
            entry.copy_from_slice(chunk);
            usize::from_ne_bytes(entry)
        });
        let (mut rela, mut rel, mut plt) = ((None, None), (None, None), (None, None));
        while let (Some(tag), Some(value)) = (words.next(), words.next()) {
            match tag {
                DT_NULL => break,
                DT_RELA => rela.0 = Some(value),
                DT_RELASZ => rela.1 = Some(value),
                DT_REL => rel.0 = Some(value),
                DT_RELSZ => rel.1 = Some(value),
                DT_JMPREL => plt.0 = Some(value),
                DT_PLTRELSZ => plt.1 = Some(value),
                DT_TEXTREL => return None,
                DT_FLAGS if value & DF_TEXTREL != 0 => return None,
                _ => {}
            }
        }
        Some(
            [rela, rel, plt]
                .into_iter()
                .filter_map(|table| match table {
                    (Some(address), Some(len)) if len > 0 => Some((address, len)),
                    _ => None,
                })
                .collect(),
        )
    }

    /// An ELF offset as `u64`, whether the headers are 32- or 64-bit.
    fn widen(offset: impl Into<u64>) -> u64 {
        offset.into()
    }

    pub fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .unwrap_or(4096)
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use std::io::{Read, Seek, SeekFrom};

    use super::*;

    /// Of the pages in [start, end), how many are mapped into this process
    /// (`/proc/self/pagemap`, bit 63 of each page's entry).
    fn present_pages(start: usize, end: usize) -> usize {
        let page = page_size();
        let mut pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        pagemap
            .seek(SeekFrom::Start((start / page * 8) as u64))
            .unwrap();
        let mut entries = vec![0u8; (end - start).div_ceil(page) * 8];
        pagemap.read_exact(&mut entries).unwrap();
        entries
            .chunks_exact(8)
            .filter(|e| u64::from_ne_bytes((*e).try_into().unwrap()) >> 63 == 1)
            .count()
    }

    #[test]
    fn overlapping_and_touching_tables_are_joined() {
        assert_eq!(
            merged(vec![(300, 50), (100, 100), (150, 100), (250, 10), (400, 0)]),
            vec![(100, 160), (300, 50), (400, 0)]
        );
    }

    #[test]
    fn the_loaders_relocation_pages_leave_the_process() {
        // The test binary is a position-independent executable like the agent.
        let image = executable_image().expect("the executable's program headers");
        let tables = relocation_tables(&image).expect("the executable's dynamic section");
        let (start, len) = tables
            .iter()
            .copied()
            .max_by_key(|&(_, len)| len)
            .expect("a relocation table");
        let (start, end) = (image.bias + start, image.bias + start + len);
        assert!(
            image.is_read_only(start, end),
            "the table is in a read-only segment"
        );
        let page = page_size();
        let inner = (start.div_ceil(page) * page, end / page * page);
        assert!(
            inner.0 < inner.1,
            "a table of {len} bytes spans whole pages"
        );
        let before = present_pages(inner.0, inner.1);
        assert!(before > 0, "the loader left the table's pages mapped");

        let released = release();
        assert!(released >= inner.1 - inner.0, "released {released} bytes");
        // A read next to the table (other tests run in this process) may map the cached
        // pages of its 64 KiB block again (the kernel's fault-around): look past those.
        let block = 64 * 1024;
        let clear = (inner.0.next_multiple_of(block), inner.1 / block * block);
        assert!(
            clear.0 < clear.1,
            "a table of {len} bytes spans whole 64 KiB blocks"
        );
        assert_eq!(present_pages(clear.0, clear.1), 0);
        // The memory still reads as the file: the loader would not notice.
        // SAFETY: `inner.0` is in a read-only segment of this executable, mapped for the
        // process's life; reading it faults the dropped page back in from the file.
        let first = unsafe { std::ptr::read_volatile(inner.0 as *const u8) };
        let mut exe = std::fs::File::open("/proc/self/exe").unwrap();
        let file_offset = image.file_offset(inner.0).expect("the page's file offset");
        exe.seek(SeekFrom::Start(file_offset)).unwrap();
        let mut byte = [0u8];
        exe.read_exact(&mut byte).unwrap();
        assert_eq!(first, byte[0]);
    }
}
