//! Which filesystems, disks and network interfaces are left out.
//!
//! node_exporter filters with Go regular expressions. A regex engine would be most of this
//! plugin's size, and the defaults need far less, so names are matched against small
//! patterns instead (the whole name must match):
//!
//! | pattern | matches |
//! |---|---|
//! | `*` | any run of characters, also none |
//! | `?` | exactly one character |
//! | `#` | one or more ASCII digits (regex `\d+`) |
//! | `[a-z]`, `[abc]`, `[!0-9]` | one character from (or, with `!`, not from) the set |
//! | anything else | itself |
//!
//! With `#` node_exporter's default disk regex `^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$`
//! becomes nine patterns that match exactly the same names ([`DEFAULT_DISK_EXCLUDE`]).
//!
//! Mount points are filtered by path prefix instead, on whole path segments, because that is
//! what every entry of node_exporter's mount point regex says: `/sys` leaves out `/sys` and
//! everything below it (not `/system`), and `/var/lib/docker/` with its trailing slash only
//! what is strictly below `/var/lib/docker` (the regex's `var/lib/docker/.+`).

/// node_exporter's current `--collector.filesystem.fs-types-exclude` default, one type each
/// (`cgroup2?` is `cgroup` and `cgroup2`).
pub const DEFAULT_FSTYPE_EXCLUDE: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "procfs",
    "pstore",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "erofs",
    "sysfs",
    "tracefs",
];

/// node_exporter's `--collector.filesystem.mount-points-exclude` default,
/// `^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)`,
/// as prefixes (see the module documentation for the trailing slash).
pub const DEFAULT_MOUNTPOINT_EXCLUDE: &[&str] = &[
    "/dev",
    "/proc",
    "/run/credentials/",
    "/sys",
    "/var/lib/docker/",
    "/var/lib/containers/storage/",
];

/// node_exporter's `--collector.diskstats.device-exclude` default: RAM disks, zram, loop and
/// floppy devices, and partitions of IDE, SCSI/SATA/USB, virtio, Xen and NVMe disks. Like
/// node_exporter it keeps `mmcblk0p1` and friends: on an SD-card Pi the partitions are the
/// only place the boot and root filesystems' I/O shows up separately.
pub const DEFAULT_DISK_EXCLUDE: &[&str] = &[
    "ram#",
    "zram#",
    "loop#",
    "fd#",
    "hd[a-z]#",
    "sd[a-z]#",
    "vd[a-z]#",
    "xvd[a-z]#",
    "nvme#n#p#",
];

/// One character class of a pattern.
#[derive(Debug, Clone, PartialEq)]
enum Class {
    Any,
    Digit,
    Char(char),
    /// Inclusive ranges (a single character is a range of one).
    Set {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Class {
    fn matches(&self, c: char) -> bool {
        match self {
            Class::Any => true,
            Class::Digit => c.is_ascii_digit(),
            Class::Char(expected) => c == *expected,
            Class::Set { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Exactly one character of the class.
    One(Class),
    /// Any number of characters of the class, also none.
    Many(Class),
}

/// A compiled name pattern (see the module documentation for the syntax).
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    steps: Vec<Step>,
}

impl Pattern {
    /// Compiles `source`; the error says what is wrong with it, for the operator.
    pub fn parse(source: &str) -> Result<Pattern, String> {
        if source.is_empty() {
            return Err("an empty pattern matches nothing".to_owned());
        }
        let mut steps = Vec::new();
        let mut chars = source.chars();
        while let Some(c) = chars.next() {
            match c {
                '*' => steps.push(Step::Many(Class::Any)),
                '?' => steps.push(Step::One(Class::Any)),
                '#' => {
                    steps.push(Step::One(Class::Digit));
                    steps.push(Step::Many(Class::Digit));
                }
                '[' => steps.push(Step::One(parse_set(&mut chars)?)),
                ']' => return Err("`]` without an opening `[`".to_owned()),
                c => steps.push(Step::One(Class::Char(c))),
            }
        }
        Ok(Pattern { steps })
    }

    /// True when the whole of `name` matches.
    ///
    /// Runs the pattern as a set of positions advanced one character at a time, so the work
    /// is bounded by name length times pattern length whatever the pattern (no backtracking
    /// blow-up from an operator's `*a*a*a*`).
    pub fn matches(&self, name: &str) -> bool {
        let n = self.steps.len();
        let mut active = vec![false; n + 1];
        active[0] = true;
        self.close(&mut active);
        for c in name.chars() {
            let mut next = vec![false; n + 1];
            for (i, step) in self.steps.iter().enumerate() {
                if !active[i] {
                    continue;
                }
                match step {
                    Step::One(class) if class.matches(c) => next[i + 1] = true,
                    Step::Many(class) if class.matches(c) => next[i] = true,
                    _ => {}
                }
            }
            self.close(&mut next);
            if !next.iter().any(|&a| a) {
                return false;
            }
            active = next;
        }
        active[n]
    }

    /// Adds the positions reachable by letting `Many` steps match nothing.
    fn close(&self, active: &mut [bool]) {
        for (i, step) in self.steps.iter().enumerate() {
            if active[i] && matches!(step, Step::Many(_)) {
                active[i + 1] = true;
            }
        }
    }
}

/// Reads a `[...]` set after its `[`.
fn parse_set(chars: &mut std::str::Chars<'_>) -> Result<Class, String> {
    let mut items: Vec<char> = Vec::new();
    loop {
        match chars.next() {
            None => return Err("`[` without a closing `]`".to_owned()),
            Some(']') => break,
            Some(c) => items.push(c),
        }
    }
    let negated = items.first() == Some(&'!');
    let body = if negated { &items[1..] } else { &items[..] };
    if body.is_empty() {
        return Err("`[]` is an empty set".to_owned());
    }
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < body.len() {
        // `a-z` is a range; a `-` first or last is itself.
        if i + 2 < body.len() && body[i + 1] == '-' {
            let (lo, hi) = (body[i], body[i + 2]);
            if lo > hi {
                return Err(format!("`{lo}-{hi}` is a backwards range"));
            }
            ranges.push((lo, hi));
            i += 3;
        } else {
            ranges.push((body[i], body[i]));
            i += 1;
        }
    }
    Ok(Class::Set { negated, ranges })
}

/// Compiles a list of patterns from the setting `key`, naming the bad entry on error.
pub fn compile(key: &str, sources: &[String]) -> Result<Vec<Pattern>, String> {
    sources
        .iter()
        .map(|source| Pattern::parse(source).map_err(|e| format!("{key}: pattern {source:?}: {e}")))
        .collect()
}

/// True when any of `patterns` matches `name`.
pub fn any_matches(patterns: &[Pattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

/// Checks a mount point prefix from the setting `key`.
pub fn check_prefix(key: &str, prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err(format!(
            "{key}: {prefix:?} is not an absolute path (mount points are, e.g. \"/var/lib/docker/\")"
        ));
    }
    Ok(())
}

/// True when `mountpoint` is left out by `prefix`: `/sys` covers `/sys` and `/sys/...`;
/// `/var/lib/docker/` covers only what is below `/var/lib/docker`.
pub fn prefix_covers(prefix: &str, mountpoint: &str) -> bool {
    if prefix.ends_with('/') {
        // `/` alone (strictly below the root) leaves out everything but `/`.
        return mountpoint.len() > prefix.len() && mountpoint.starts_with(prefix);
    }
    match mountpoint.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(list: &[&str]) -> Vec<Pattern> {
        let owned: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
        match compile("test", &owned) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    fn matches(pattern: &str, name: &str) -> bool {
        match Pattern::parse(pattern) {
            Ok(p) => p.matches(name),
            Err(e) => panic!("{pattern}: {e}"),
        }
    }

    #[test]
    fn default_disk_patterns_follow_node_exporter_regex() {
        let patterns = defaults(DEFAULT_DISK_EXCLUDE);
        // Left out by ^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$
        for name in [
            "ram0",
            "ram15",
            "zram0",
            "loop0",
            "loop12",
            "fd0",
            "hda1",
            "sda1",
            "sdb12",
            "vda1",
            "xvda1",
            "nvme0n1p1",
            "nvme10n2p33",
        ] {
            assert!(any_matches(&patterns, name), "{name} should be left out");
        }
        // Kept: whole disks, SD cards and their partitions, device mapper, md, digits missing.
        for name in [
            "sda",
            "vda",
            "xvda",
            "nvme0n1",
            "mmcblk0",
            "mmcblk0p1",
            "mmcblk0p2",
            "mmcblk0boot0",
            "dm-0",
            "md0",
            "sdaa1",
            "ram",
            "loop",
            "nvme0n1p",
            "sda1x",
            "zzram0",
        ] {
            assert!(!any_matches(&patterns, name), "{name} should be kept");
        }
    }

    #[test]
    fn wildcards_and_sets() {
        assert!(matches("veth*", "veth"));
        assert!(matches("veth*", "veth12ab"));
        assert!(!matches("veth*", "xveth"));
        assert!(matches("*", ""));
        assert!(matches("e?h0", "eth0"));
        assert!(!matches("e?h0", "eh0"));
        assert!(matches("[!l]*", "eth0"));
        assert!(!matches("[!l]*", "lo"));
        assert!(matches("[ab-]x", "-x"));
        assert!(matches("[a-cx]1", "x1"));
        assert!(!matches("[a-c]1", "d1"));
        assert!(matches("fuse.*", "fuse.sshfs"));
        assert!(matches("lo", "lo"));
        assert!(!matches("lo", "lo0"));
        assert!(matches("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaab"));
        assert!(!matches("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
        assert!(matches("éth#", "éth3"));
    }

    #[test]
    fn bad_patterns_are_explained() {
        for (pattern, why) in [
            ("", "empty pattern"),
            ("sd[a-z", "without a closing"),
            ("sd]", "without an opening"),
            ("sd[]", "empty set"),
            ("sd[!]", "empty set"),
            ("sd[z-a]", "backwards"),
        ] {
            match Pattern::parse(pattern) {
                Ok(_) => panic!("{pattern:?} should be refused"),
                Err(e) => assert!(e.contains(why), "{pattern:?}: {e}"),
            }
        }
        let e = compile("disk_exclude", &["ok".to_owned(), "x[".to_owned()]).unwrap_err();
        assert!(e.starts_with("disk_exclude: pattern \"x[\""), "{e}");
    }

    #[test]
    fn default_mountpoints_follow_node_exporter_regex() {
        let covered = |m: &str| {
            DEFAULT_MOUNTPOINT_EXCLUDE
                .iter()
                .any(|p| prefix_covers(p, m))
        };
        for m in [
            "/dev",
            "/dev/shm",
            "/proc",
            "/proc/sys/fs/binfmt_misc",
            "/sys",
            "/sys/fs/cgroup",
            "/run/credentials/getty@tty1.service",
            "/var/lib/docker/overlay2/abc/merged",
            "/var/lib/containers/storage/overlay",
        ] {
            assert!(covered(m), "{m} should be left out");
        }
        for m in [
            "/",
            "/boot",
            "/boot/firmware",
            "/run",
            "/run/credentials",
            "/run/user/1000",
            "/devices",
            "/system",
            "/var/lib/docker",
            "/var/lib/containers/storage",
            "/home",
            "/media/usb",
        ] {
            assert!(!covered(m), "{m} should be kept");
        }
    }

    #[test]
    fn root_prefix() {
        assert!(prefix_covers("/", "/boot"));
        assert!(!prefix_covers("/", "/"));
        assert!(check_prefix("k", "relative").is_err());
        assert!(check_prefix("k", "/mnt").is_ok());
    }
}
