//! Hands back the pages of the agent's binary, and of the shared libraries it loads, that
//! start-up read and the steady state does not use.
//!
//! Every page of its executable that the agent touches stays mapped into the process for
//! good, and the kernel maps them 64 KiB at a time around each fault. Start-up touches a lot
//! that never runs again: the dynamic loader's relocation tables (0.81 MiB on x86_64, 0.66 MiB
//! on aarch64, 0.23 MiB on armv7), config parsing, loading compiled plugins and the exchange
//! with the child compiler, TLS set-up, and the parts of glibc all that calls. All of it
//! counts in the resident memory that `ps`, `top` or a process exporter show, and mapped
//! code is the last thing the kernel reclaims under pressure.
//!
//! [`release`] drops the mapped pages of the read-only segments (code, read-only data, the
//! relocation tables) of every loaded object with `madvise(MADV_DONTNEED)`. The mappings
//! stay: what the agent goes on to run faults back in from the page cache at its next use,
//! so what stays resident is the steady state's working set. The plugin manager calls it
//! once the plugins it started have had time to collect (`plugins/manager.rs`).
//!
//! Only clean copies of the files are dropped: nothing in a writable segment or in RELRO
//! (the loader writes those), nothing of an object with text relocations, and no page that
//! `/proc/self/pagemap` shows as the process's own copy (one a debugger's breakpoint or a
//! uprobe wrote): dropping that would undo the write.

/// What [`release`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Bytes of read-only pages of the loaded objects that were mapped and are not any more.
    pub bytes: usize,
    /// Pages left alone because the process holds its own, written copy of them.
    pub written_pages_kept: usize,
    /// Whether `/proc/self/pagemap` could tell the process's own copies from file pages;
    /// nothing is dropped where it cannot.
    pub pagemap_usable: bool,
}

/// Drops the mapped, clean pages of the read-only segments of the running executable and
/// the shared libraries it loaded (glibc's among them: their code is shared with other
/// processes, but what is mapped into this one counts in its resident memory). An object
/// with text relocations is left alone. Nothing is dropped where `/proc/self/pagemap`
/// cannot tell the process's own copies from file pages: without `/proc`, or under an
/// emulator whose pagemap describes its own memory at other addresses than the guest's
/// (qemu-user 10 passes the check: its guest addresses are the host's).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release() -> Released {
    let mut released = Released::default();
    let Some((pagemap, page)) = usable_pagemap() else {
        return released;
    };
    released.pagemap_usable = true;
    // Inside the loader's walk over its objects: it holds the lock `dlclose` takes, so no
    // object goes away (and its addresses are not reused) between reading the state of its
    // pages and dropping them. Other threads' `dlopen` (glibc's NSS modules, say) waits
    // meanwhile: a few milliseconds of pagemap reads, once after start-up.
    for_each_loaded_image(&mut |image: Image| {
        if image.text_relocations != Some(false) {
            return;
        }
        for (first, last) in image.read_only_pages(page) {
            // SAFETY: [first, last) is whole pages of a read-only segment of a loaded object,
            // outside RELRO, in an object without text relocations; the loader's lock keeps
            // it mapped.
            unsafe { drop_clean_pages(&pagemap, first, last, page, &mut released) };
        }
    });
    released
}

/// Drops the mapped, clean pages of compiled plugin code that is mapped from a file
/// (`plugins/code_file.rs`): what loading and instantiating the plugins touched, most of
/// which they never run again.
///
/// # Safety
///
/// Each range must be the image of a loaded component (`Component::image_range`) that
/// wasmtime mapped from a file, read-only and never written, and must stay mapped for the
/// whole call: the caller holds the components. Never code in anonymous memory (compiled in
/// the agent's process, or loaded from bytes): dropping its pages would destroy it, and the
/// pagemap check cannot be trusted to keep them everywhere (under qemu-user's armv7 guests
/// it did not: the agent crashed).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub unsafe fn release_mapped_code(images: &[std::ops::Range<usize>]) -> Released {
    let mut released = Released::default();
    let Some((pagemap, page)) = usable_pagemap() else {
        return released;
    };
    released.pagemap_usable = true;
    for range in images {
        // A mapping starts on a page and covers its last page whole.
        let (first, Some(last)) = (
            range.start / page * page,
            range.end.checked_next_multiple_of(page),
        ) else {
            continue;
        };
        if first >= last {
            continue;
        }
        // SAFETY: the caller's contract: a read-only image, mapped during the call.
        unsafe { drop_clean_pages(&pagemap, first, last, page, &mut released) };
    }
    released
}

/// Elsewhere there is nothing to release (or no way to tell clean pages from written ones).
///
/// # Safety
///
/// None needed; the signature matches the Linux one.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub unsafe fn release_mapped_code(_images: &[std::ops::Range<usize>]) -> Released {
    Released::default()
}

/// `/proc/self/pagemap` and the page size, where pagemap tells the process's own copies
/// from file pages (see [`pagemap_tells_copies_from_files`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn usable_pagemap() -> Option<(std::fs::File, usize)> {
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let page = page_size();
    pagemap_tells_copies_from_files(&pagemap, page).then_some((pagemap, page))
}

/// Drops the pages in [first, last) that pagemap shows as clean file pages (or unmapped),
/// and adds what it did to `released`.
///
/// # Safety
///
/// [first, last) must be whole pages of read-only mappings of files that nothing in the
/// process writes, mapped for the whole call, and `pagemap` must have passed
/// [`pagemap_tells_copies_from_files`].
#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe fn drop_clean_pages(
    pagemap: &std::fs::File,
    first: usize,
    last: usize,
    page: usize,
    released: &mut Released,
) {
    let Some(entries) = pagemap_entries(pagemap, first, last, page) else {
        return;
    };
    let runs = droppable_runs(&entries);
    released.written_pages_kept += runs.written_pages_kept;
    for &(index, count) in &runs.runs {
        let start = first + index * page;
        // SAFETY: [start, start + count pages) is read-only file memory (the caller's
        // contract), and pagemap (checked to tell them apart) showed none of its pages as a
        // private copy: its mapped pages are clean pages of the file, which a later access
        // maps again. A debugger's breakpoint or a uprobe written between the pagemap read
        // and here would be lost; nothing in the agent writes there.
        let done = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                count * page,
                libc::MADV_DONTNEED,
            )
        };
        if done == 0 {
            released.bytes += runs.mapped_in(index, count) * page;
        }
    }
}

/// Elsewhere there is nothing to release (or no way to tell clean pages from written ones).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release() -> Released {
    Released::default()
}

/// `/proc/<pid>/pagemap` bits of a page's entry.
const PAGE_PRESENT: u64 = 1 << 63;
/// Swapped out, or (for a file page) being migrated: either way not a page to drop.
const PAGE_SWAPPED: u64 = 1 << 62;
/// A page of a file (or shared memory), as opposed to the process's own anonymous copy.
const PAGE_FILE: u64 = 1 << 61;

/// Which pages of a range can be dropped, from their pagemap entries.
#[derive(Debug, Default, PartialEq, Eq)]
struct DroppableRuns {
    /// (first page, pages) of each stretch holding no page of the process's own.
    runs: Vec<(usize, usize)>,
    /// `mapped_before[i]` counts the mapped pages before page `i` (one entry more than
    /// there are pages).
    mapped_before: Vec<usize>,
    written_pages_kept: usize,
}

impl DroppableRuns {
    /// Mapped pages among `count` pages from `index`.
    fn mapped_in(&self, index: usize, count: usize) -> usize {
        self.mapped_before[index + count] - self.mapped_before[index]
    }
}

/// Splits a range into stretches that hold only file pages or unmapped ones; a page that may
/// be the process's own copy (present and not a file page, or swapped) ends a stretch and is
/// kept.
fn droppable_runs(entries: &[u64]) -> DroppableRuns {
    let mut out = DroppableRuns {
        mapped_before: Vec::with_capacity(entries.len() + 1),
        ..DroppableRuns::default()
    };
    let mut mapped = 0;
    let mut run_start = None;
    for (index, &entry) in entries.iter().enumerate() {
        out.mapped_before.push(mapped);
        let present = entry & PAGE_PRESENT != 0;
        let own_copy = entry & PAGE_SWAPPED != 0 || (present && entry & PAGE_FILE == 0);
        if own_copy {
            out.written_pages_kept += 1;
            if let Some(start) = run_start.take() {
                out.runs.push((start, index - start));
            }
            continue;
        }
        if present {
            mapped += 1;
        }
        run_start.get_or_insert(index);
    }
    out.mapped_before.push(mapped);
    if let Some(start) = run_start {
        out.runs.push((start, entries.len() - start));
    }
    out
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
use imp::*;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::os::unix::fs::FileExt;

    use super::{PAGE_FILE, PAGE_PRESENT};

    #[cfg(target_pointer_width = "64")]
    type ProgramHeader = libc::Elf64_Phdr;
    #[cfg(target_pointer_width = "32")]
    type ProgramHeader = libc::Elf32_Phdr;

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_GNU_RELRO: u32 = 0x6474_e552;
    const PF_W: u32 = 2;
    const DT_NULL: usize = 0;
    const DT_TEXTREL: usize = 22;
    const DT_FLAGS: usize = 30;
    const DF_TEXTREL: usize = 0x4;

    /// A segment of a loaded object as mapped: [start, end) in this process.
    #[derive(Clone, Copy)]
    pub(super) struct Mapped {
        pub start: usize,
        pub end: usize,
        pub writable: bool,
        /// Where `start` is in the file.
        #[cfg(test)]
        pub file_offset: u64,
    }

    /// A loaded object (the executable or a shared library): where it is loaded and its
    /// segments.
    pub struct Image {
        /// Load address minus link-time address.
        #[cfg_attr(not(test), allow(dead_code))]
        pub bias: usize,
        pub(super) loads: Vec<Mapped>,
        pub(super) relro: Vec<Mapped>,
        /// Whether its dynamic section asks for text relocations (the loader then made its
        /// read-only segments writable to apply them); `None` without a dynamic section.
        pub text_relocations: Option<bool>,
        /// File offset and size of its dynamic section.
        #[cfg(test)]
        pub dynamic: Option<(u64, usize)>,
    }

    impl Image {
        /// [first, last) page ranges of the read-only segments: whole pages only, leaving
        /// out every page that also holds part of a writable segment or of RELRO (which the
        /// loader writes before protecting it).
        pub fn read_only_pages(&self, page: usize) -> Vec<(usize, usize)> {
            let mut written: Vec<(usize, usize)> = self
                .loads
                .iter()
                .filter(|m| m.writable)
                .chain(&self.relro)
                .map(|w| {
                    let end = w.end.checked_next_multiple_of(page).unwrap_or(usize::MAX);
                    (w.start / page * page, end)
                })
                .collect();
            written.sort_unstable();
            let mut ranges = Vec::new();
            for segment in self.loads.iter().filter(|m| !m.writable) {
                let (Some(first), last) = (
                    segment.start.checked_next_multiple_of(page),
                    segment.end / page * page,
                ) else {
                    continue;
                };
                let mut from = first;
                for &(start, end) in &written {
                    if end <= from || start >= last {
                        continue;
                    }
                    if start > from {
                        ranges.push((from, start));
                    }
                    from = from.max(end);
                }
                if from < last {
                    ranges.push((from, last));
                }
            }
            ranges
        }

        /// Whether [start, end) lies within one read-only loaded segment, clear of RELRO.
        #[cfg(test)]
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

        /// [start, end) of the loaded segment that holds `address`.
        #[cfg(test)]
        pub fn segment_of(&self, address: usize) -> Option<(usize, usize)> {
            self.loads
                .iter()
                .find(|m| m.start <= address && address < m.end)
                .map(|m| (m.start, m.end))
        }
    }

    /// Calls `each` with every loaded object, the executable first, while the loader holds
    /// the lock that keeps objects from being unloaded. A panic in `each` ends the walk and
    /// carries on once the loader is out of it (unwinding through the loader would abort).
    pub fn for_each_loaded_image(each: &mut dyn FnMut(Image)) {
        struct Walk<'a> {
            each: &'a mut dyn FnMut(Image),
            panic: Option<Box<dyn std::any::Any + Send>>,
        }
        unsafe extern "C" fn visit(
            info: *mut libc::dl_phdr_info,
            _size: libc::size_t,
            data: *mut libc::c_void,
        ) -> libc::c_int {
            // SAFETY: the loader passes a valid `dl_phdr_info` for the duration of the call, and
            // `data` is the `Walk` that `for_each_loaded_image` lent for it.
            let (info, walk) = unsafe { (&*info, &mut *data.cast::<Walk>()) };
            let visited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: `info` is the loader's, for an object that stays loaded meanwhile.
                unsafe { visit_object(info, &mut *walk.each) }
            }));
            match visited {
                Ok(()) => 0, // On to the next object.
                Err(payload) => {
                    walk.panic = Some(payload);
                    1
                }
            }
        }
        let mut walk = Walk { each, panic: None };
        // SAFETY: the callback only reads what the loader hands it and calls `each`, which
        // outlives the walk; it unwinds no panic into the loader.
        unsafe {
            libc::dl_iterate_phdr(Some(visit), (&raw mut walk).cast());
        }
        if let Some(payload) = walk.panic {
            std::panic::resume_unwind(payload);
        }
    }

    /// Hands `each` the image of the object `info` describes.
    ///
    /// # Safety
    /// `info` must be the loader's, during its walk over loaded objects (the object stays
    /// loaded while `each` runs).
    unsafe fn visit_object(info: &libc::dl_phdr_info, each: &mut dyn FnMut(Image)) {
        // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers mapped for the life of
        // the object, which cannot be unloaded during the walk.
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
        let loads: Vec<Mapped> = headers
            .iter()
            .filter(|h| h.p_type == PT_LOAD)
            .map(mapped)
            .collect();
        let dynamic = headers.iter().find(|h| h.p_type == PT_DYNAMIC);
        let text_relocations = dynamic.and_then(|h| {
            let section = mapped(h);
            // The dynamic section must lie in a loaded segment to be read in memory.
            loads
                .iter()
                .any(|m| m.start <= section.start && section.end <= m.end)
                // SAFETY: it lies in a segment of the object, mapped while the walk lasts.
                .then(|| unsafe { asks_for_text_relocations(section.start, section.end) })
        });
        each(Image {
            bias,
            relro: headers
                .iter()
                .filter(|h| h.p_type == PT_GNU_RELRO)
                .map(mapped)
                .collect(),
            loads,
            text_relocations,
            #[cfg(test)]
            dynamic: dynamic.map(|h| (widen(h.p_offset), h.p_filesz as usize)),
        });
    }

    /// Whether the dynamic section in memory at [start, end) has `DT_TEXTREL` or
    /// `DF_TEXTREL`. The loader rewrites some entries' addresses in place, never these tags'
    /// values.
    ///
    /// # Safety
    /// [start, end) must be mapped and readable.
    unsafe fn asks_for_text_relocations(start: usize, end: usize) -> bool {
        let word = size_of::<usize>();
        let mut at = start;
        while at.checked_add(2 * word).is_some_and(|next| next <= end) {
            // SAFETY: [at, at + 2 words) is within [start, end), which the caller vouches for;
            // unaligned reads, since nothing here promises alignment.
            let (tag, value) = unsafe {
                (
                    std::ptr::read_unaligned(at as *const usize),
                    std::ptr::read_unaligned((at + word) as *const usize),
                )
            };
            match tag {
                DT_NULL => return false,
                DT_TEXTREL => return true,
                DT_FLAGS if value & DF_TEXTREL != 0 => return true,
                _ => {}
            }
            at += 2 * word;
        }
        false
    }

    /// Every loaded object, the executable first.
    #[cfg(test)]
    pub fn loaded_images() -> Vec<Image> {
        let mut images = Vec::new();
        for_each_loaded_image(&mut |image| images.push(image));
        images
    }

    /// Whether pagemap shows this process's pages as they are: a page of its stack, just
    /// written, as its own copy, and the page of code running now as a file page. Where an
    /// emulator maps the guest's memory at other addresses than the guest sees, the entries
    /// read belong to other memory and fail this.
    // Out of line: its own address must be code that runs.
    #[inline(never)]
    pub fn pagemap_tells_copies_from_files(pagemap: &std::fs::File, page: usize) -> bool {
        let mut written = [0u8; 1];
        std::hint::black_box(&mut written)[0] = 1;
        let stack = std::hint::black_box(&written).as_ptr() as usize / page * page;
        let code = pagemap_tells_copies_from_files as fn(&std::fs::File, usize) -> bool as usize
            / page
            * page;
        let entry = |address: usize| {
            pagemap_entries(pagemap, address, address + page, page).and_then(|e| e.first().copied())
        };
        let own_copy = |e: u64| e & PAGE_PRESENT != 0 && e & PAGE_FILE == 0;
        let file_page = |e: u64| e & PAGE_PRESENT != 0 && e & PAGE_FILE != 0;
        entry(stack).is_some_and(own_copy) && entry(code).is_some_and(file_page)
    }

    /// (link-time address, size) of each relocation table the object's dynamic section names,
    /// read from `file` (in memory the loader may have rewritten the addresses).
    #[cfg(test)]
    pub fn relocation_tables(image: &Image, file: &std::path::Path) -> Option<Vec<(usize, usize)>> {
        const DT_PLTRELSZ: usize = 2;
        const DT_RELA: usize = 7;
        const DT_RELASZ: usize = 8;
        const DT_REL: usize = 17;
        const DT_RELSZ: usize = 18;
        const DT_JMPREL: usize = 23;
        let (offset, size) = image.dynamic?;
        let word = size_of::<usize>();
        let mut bytes = vec![0u8; size];
        std::fs::File::open(file)
            .ok()?
            .read_exact_at(&mut bytes, offset)
            .ok()?;
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

    /// The pagemap entries of the pages in [first, last).
    pub fn pagemap_entries(
        pagemap: &std::fs::File,
        first: usize,
        last: usize,
        page: usize,
    ) -> Option<Vec<u64>> {
        let mut bytes = vec![0u8; (last - first) / page * 8];
        pagemap
            .read_exact_at(&mut bytes, (first / page * 8) as u64)
            .ok()?;
        Some(
            bytes
                .chunks_exact(8)
                .map(|e| {
                    let mut entry = [0u8; 8];
                    entry.copy_from_slice(e);
                    u64::from_ne_bytes(entry)
                })
                .collect(),
        )
    }

    /// An ELF offset as `u64`, whether the headers are 32- or 64-bit.
    #[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_the_process_holds_its_own_copy_of_ends_a_run_and_is_kept() {
        let file = PAGE_PRESENT | PAGE_FILE;
        let own = PAGE_PRESENT;
        let runs = droppable_runs(&[file, 0, file, own, own, 0, PAGE_SWAPPED, file, file]);
        assert_eq!(runs.runs, vec![(0, 3), (5, 1), (7, 2)]);
        assert_eq!(runs.written_pages_kept, 3);
        assert_eq!(
            [
                runs.mapped_in(0, 3),
                runs.mapped_in(5, 1),
                runs.mapped_in(7, 2)
            ],
            [2, 0, 2]
        );
        assert_eq!(droppable_runs(&[own]).runs, Vec::new());
        assert_eq!(droppable_runs(&[0, 0]).runs, vec![(0, 2)]);
        assert_eq!(
            droppable_runs(&[]),
            DroppableRuns {
                mapped_before: vec![0],
                ..DroppableRuns::default()
            }
        );
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod process_tests {
    use std::io::{Read, Seek, SeekFrom};

    use super::*;

    /// Pagemap entries of the pages in [start, end), which must be whole pages.
    fn entries(start: usize, end: usize) -> Vec<u64> {
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        pagemap_entries(&pagemap, start, end, page_size()).unwrap()
    }

    fn present(start: usize, end: usize) -> usize {
        entries(start, end)
            .iter()
            .filter(|&&e| e & PAGE_PRESENT != 0)
            .count()
    }

    /// Sets `protection` on the page at `address`, which is in this executable's image.
    fn protect(address: usize, protection: libc::c_int) {
        // SAFETY: the page is part of the executable's mapping, which lives as long as the
        // process; changing its protection affects no Rust object (it holds the loader's
        // relocation table).
        let done = unsafe { libc::mprotect(address as *mut libc::c_void, page_size(), protection) };
        assert_eq!(done, 0, "mprotect: {}", std::io::Error::last_os_error());
    }

    fn segment(start: usize, end: usize, writable: bool) -> Mapped {
        Mapped {
            start,
            end,
            writable,
            file_offset: 0,
        }
    }

    #[test]
    fn only_whole_pages_clear_of_writable_segments_and_relro_are_read_only() {
        let page = 0x1000;
        let image = Image {
            bias: 0,
            loads: vec![
                // Read-only data and code, sharing no page with anything writable.
                segment(0x0, 0x2800, false),
                segment(0x2800, 0x9100, false),
                // Read-only, but its last page holds the start of RELRO: that page is left out.
                segment(0xa000, 0xd000, false),
                segment(0xc800, 0xf000, true),
                // Too small for a whole page.
                segment(0x10100, 0x10f00, false),
            ],
            relro: vec![segment(0xc800, 0xe000, true)],
            text_relocations: Some(false),
            dynamic: None,
        };
        assert_eq!(
            image.read_only_pages(page),
            vec![(0x0, 0x2000), (0x3000, 0x9000), (0xa000, 0xc000)]
        );
        // A writable stretch inside a read-only segment splits it.
        let split = Image {
            bias: 0,
            loads: vec![
                segment(0x20000, 0x30000, false),
                segment(0x24800, 0x25100, true),
            ],
            relro: Vec::new(),
            text_relocations: Some(false),
            dynamic: None,
        };
        assert_eq!(
            split.read_only_pages(page),
            vec![(0x20000, 0x24000), (0x26000, 0x30000)]
        );
    }

    #[test]
    fn a_panic_while_walking_the_objects_reaches_the_caller() {
        let mut visited = 0;
        let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for_each_loaded_image(&mut |_| {
                visited += 1;
                panic!("inside the walk");
            })
        }));
        assert!(walked.is_err());
        assert_eq!(visited, 1, "the walk stops at the panic");
    }

    #[test]
    fn this_process_pagemap_tells_copies_from_files() {
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        assert!(pagemap_tells_copies_from_files(&pagemap, page_size()));
    }

    /// `release` acts on the whole process, and other tests running beside it map pages in
    /// while it is measured: the measuring runs in a test process of its own.
    #[test]
    fn start_up_pages_leave_the_process_and_written_ones_stay() {
        let test = "image_pages::process_tests::measure_release_in_a_quiet_process";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                test,
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{test} did not run:\n{text}");
    }

    #[test]
    #[ignore = "run in a process of its own by start_up_pages_leave_the_process_and_written_ones_stay"]
    fn measure_release_in_a_quiet_process() {
        // The test binary is a position-independent executable like the agent, and nothing
        // reads its relocation tables once the loader is done.
        let image = loaded_images()
            .into_iter()
            .next()
            .expect("the executable's program headers");
        assert_eq!(image.text_relocations, Some(false));
        let tables = relocation_tables(&image, std::path::Path::new("/proc/self/exe"))
            .expect("the executable's dynamic section");
        let (start, len) = tables
            .iter()
            .copied()
            .max_by_key(|&(_, len)| len)
            .expect("a relocation table");
        let (start, end) = (image.bias + start, image.bias + start + len);
        assert!(image.is_read_only(start, end), "the table is read-only");
        let page = page_size();
        let block = 64 * 1024;
        let (first, last) = (start.next_multiple_of(page), end / page * page);
        // The last whole page becomes the process's own copy; the 64 KiB blocks before its
        // block must leave (a read next to them may map a block again: the kernel maps
        // 64 KiB around each fault).
        let written = last - page;
        let clear = (first.next_multiple_of(block), written / block * block);
        assert!(
            clear.0 < clear.1,
            "a table of {len} bytes spans whole 64 KiB blocks"
        );

        // Map the table's pages in, as the loader did.
        let read = |address: usize| {
            // SAFETY: `address` is in a read-only segment of this executable, mapped for the
            // process's life.
            unsafe { std::ptr::read_volatile(address as *const u8) }
        };
        let mut sum = 0u8;
        for address in (first..last).step_by(page) {
            sum = sum.wrapping_add(read(address));
        }
        std::hint::black_box(sum);
        assert_eq!(present(first, last), (last - first) / page);

        // A write into the segment, as a debugger's breakpoint makes: the process now holds
        // its own copy of that page.
        let original = read(written);
        protect(written, libc::PROT_READ | libc::PROT_WRITE);
        // SAFETY: the page is writable now and belongs to no Rust object.
        unsafe { std::ptr::write_volatile(written as *mut u8, !original) };
        protect(written, libc::PROT_READ);
        let entry = entries(written, written + page)[0];
        assert!(entry & PAGE_PRESENT != 0 && entry & PAGE_FILE == 0);

        let code = image
            .segment_of(measure_release_in_a_quiet_process as fn() as usize)
            .expect("the segment holding this test's code");
        let code = (code.0.next_multiple_of(page), code.1 / page * page);
        let code_before = present(code.0, code.1);
        // glibc's code, which this process shares with every other.
        let libc_code = loaded_images()
            .iter()
            .find_map(|image| {
                image.segment_of(libc::getpid as unsafe extern "C" fn() -> libc::pid_t as usize)
            })
            .expect("the segment holding getpid");
        let libc_code = (
            libc_code.0.next_multiple_of(page),
            libc_code.1 / page * page,
        );
        let libc_before = present(libc_code.0, libc_code.1);

        let released = release();
        let code_after = present(code.0, code.1);
        let libc_after = present(libc_code.0, libc_code.1);
        eprintln!(
            "pages of code mapped: {code_before} before, {code_after} after; of glibc's: \
             {libc_before} before, {libc_after} after; {released:?}"
        );

        assert_eq!(present(clear.0, clear.1), 0);
        assert!(released.bytes >= clear.1 - clear.0, "released {released:?}");
        assert!(released.written_pages_kept >= 1, "released {released:?}");
        assert_eq!(read(written), !original, "the written page is kept");
        // Without the release, pages of code are only ever mapped in. The code that ran since
        // (`release` itself, this test's: in a debug build each call may land in another
        // 64 KiB window) is mapped again.
        assert!(
            code_after < code_before,
            "{code_before} pages of code mapped before, {code_after} after"
        );
        assert!(
            libc_after < libc_before,
            "{libc_before} pages of glibc's code mapped before, {libc_after} after"
        );
        // The memory still reads as the file.
        let mut exe = std::fs::File::open("/proc/self/exe").unwrap();
        let file_offset = image.file_offset(first).expect("the page's file offset");
        exe.seek(SeekFrom::Start(file_offset)).unwrap();
        let mut byte = [0u8];
        exe.read_exact(&mut byte).unwrap();
        assert_eq!(read(first), byte[0]);
    }
}
