//! Markdown tables on stdout (and optionally appended to a file), medians and percentiles.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

pub struct Report {
    out: Option<PathBuf>,
}

impl Report {
    pub fn new(out: Option<PathBuf>) -> Report {
        Report { out }
    }

    /// Prints text as is.
    pub fn text(&mut self, text: &str) {
        println!("{text}");
        if let Some(path) = &self.out {
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{text}"));
            if let Err(e) = appended {
                eprintln!("cannot append to {}: {e}", path.display());
            }
        }
    }

    pub fn table(&mut self, title: &str, headers: &[&str], rows: &[Vec<String>]) {
        let mut t = format!("\n#### {title}\n\n| {} |\n|", headers.join(" | "));
        for _ in headers {
            t += "---|";
        }
        for row in rows {
            t += &format!("\n| {} |", row.join(" | "));
        }
        t.push('\n');
        self.text(&t);
    }

    /// What the figures were measured on: CPU, cores, memory, kernel, peers' versions.
    pub fn machine(&mut self) -> Result<()> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        // Debian's vmagent prints no version of its own; the packages' versions are exact.
        let version = |package: &str| {
            std::process::Command::new("dpkg-query")
                .args(["-W", "-f=${Version}", package])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "not installed".into())
        };
        self.text(&format!(
            "\n### picket-bench, {}\n\n{model}, {cores} cores, {:.1} GiB, Linux {}; \
             node_exporter: {}; vmagent: {}; Prometheus: {}\n",
            humantime_now(),
            mem as f64 / 1024.0 / 1024.0,
            kernel.trim(),
            version("prometheus-node-exporter"),
            version("victoria-metrics"),
            version("prometheus"),
        ));
        Ok(())
    }
}

fn humantime_now() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if !v.len().is_multiple_of(2) {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// The `q` quantile (0..=1) by nearest rank.
pub fn percentile<T: Copy + Ord>(values: &mut [T], q: f64) -> Option<T> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / 1024.0 / 1024.0)
}

pub fn ratio(ours: f64, peer: f64) -> String {
    if peer > 0.0 && ours.is_finite() {
        format!("{:.2}×", ours / peer)
    } else {
        "n/a".into()
    }
}

/// A count with thousands separators.
pub fn count(n: f64) -> String {
    let n = n.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let mut v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&mut v, 0.5), Some(50));
        assert_eq!(percentile(&mut v, 0.99), Some(99));
        assert_eq!(percentile(&mut v, 1.0), Some(100));
        assert_eq!(count(1234567.0), "1,234,567");
        assert_eq!(count(999.0), "999");
    }
}
