//! CPU time and memory of a process, read from `/proc/<pid>` (Linux).

use anyhow::{Context, Result, anyhow};

#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
    /// Resident set, bytes.
    pub rss: u64,
    /// The anonymous (private: heap, stacks, plugin memories) part of `rss`; the rest is
    /// mapped files, mostly the program's own code, which the kernel can drop and re-read.
    pub rss_anon: u64,
    /// Peak resident set, bytes.
    pub peak_rss: u64,
}

pub fn usage(pid: u32) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The command name (field 2) may hold spaces; fields after its ')' are fixed.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(Usage {
        cpu_s: ticks as f64 / per_second,
        rss: kib("VmRSS:"),
        rss_anon: kib("RssAnon:"),
        peak_rss: kib("VmHWM:"),
    })
}

/// CPU seconds of this process (the load generator), for reporting its share.
pub fn own_cpu_s() -> f64 {
    usage(std::process::id()).map(|u| u.cpu_s).unwrap_or(0.0)
}
