//! What one plugin instance may touch: its capability grants, deny by default.
//!
//! Each host call checks its argument against the instance's grants before doing anything. A
//! call outside them fails inside the plugin with `denied(...)` naming the grant to add, is
//! counted in `picket_plugin_errors_total{kind="denied"}`, and is logged once per distinct
//! request so a misbehaving plugin cannot flood the log.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::bindings::picket::plugin::types::Capability;

/// Grants of one plugin instance, as written under `[plugins.instances.grants]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    pub http: HttpGrant,
    /// Programs with their exact argument lists, e.g.
    /// `exec = [{ program = "vcgencmd", args = ["measure_temp"] }]`. Never run through a shell.
    pub exec: Vec<ExecGrant>,
    #[serde(with = "humantime_serde")]
    pub exec_timeout: Option<Duration>,
    pub exec_max_output_bytes: Option<usize>,
    /// Readable paths or globs, e.g. `["/sys/class/thermal/thermal_zone*/temp"]`.
    pub read_file: Vec<String>,
    pub read_file_max_bytes: Option<usize>,
    /// A snapshot of CPU times, memory, load, filesystems, disks, networks and sensors.
    pub host_stats: bool,
    /// Writing to the agent's log. On by default: it cannot reach anything outside the agent.
    pub log: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HttpGrant {
    /// URL prefixes GET may reach, e.g. `["http://127.0.0.1:8081/"]`.
    pub allow: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub max_bytes: Option<usize>,
    /// CA certificate (PEM) that `https://` servers of this grant are verified against,
    /// instead of the system's bundle (e.g. a Flink REST endpoint with its own CA).
    pub ca: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecGrant {
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
}

/// Defaults for the per-call caps when a grant does not set them.
pub const DEFAULT_HOST_CALL_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_HTTP_MAX_BYTES: usize = 16 * 1024 * 1024;
pub const DEFAULT_EXEC_MAX_OUTPUT_BYTES: usize = 64 * 1024;
pub const DEFAULT_READ_FILE_MAX_BYTES: usize = 1024 * 1024;

impl Grants {
    /// Whether `url` is under an allowlisted prefix. Both are parsed: the scheme and the
    /// authority (host and port) must match exactly, and the path must start with the
    /// grant's path. URLs with user information, dot segments (also percent-encoded), `;`
    /// parameters or a fragment are refused outright, since servers disagree on what they
    /// mean and a prefix check on text could be walked around.
    pub fn http_allows(&self, url: &str) -> bool {
        let Some(target) = ParsedUrl::parse(url) else {
            return false;
        };
        self.http.allow.iter().any(|grant| {
            ParsedUrl::parse(grant).is_some_and(|g| {
                g.scheme == target.scheme
                    && g.authority == target.authority
                    && target.path.starts_with(&g.path)
            })
        })
    }

    /// Exact program (an absolute path, so `PATH` cannot redirect it) and exact arguments.
    pub fn exec_allows(&self, program: &str, args: &[String]) -> bool {
        self.exec
            .iter()
            .any(|g| g.program == program && g.args == args)
    }

    /// Whether `path` is readable under the grants. Paths must be absolute and free of `..`
    /// so a grant of `/sys/class/thermal/*` cannot be walked out of.
    pub fn read_allows(&self, path: &str) -> bool {
        let p = Path::new(path);
        p.is_absolute()
            && !p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            && self.read_file.iter().any(|g| {
                glob::Pattern::new(g)
                    .is_ok_and(|pattern| pattern.matches_path_with(p, GLOB_OPTIONS))
            })
    }

    /// The WIT name of a capability (`read-file`, `host-stats`, ...).
    pub fn capability_name(capability: Capability) -> &'static str {
        match capability {
            Capability::Http => "http",
            Capability::Exec => "exec",
            Capability::ReadFile => "read-file",
            Capability::HostStats => "host-stats",
            Capability::Log => "log",
        }
    }

    /// The distinct capabilities of a plugin's (untrusted, possibly huge) list, in WIT order.
    pub fn distinct(wanted: &[Capability]) -> Vec<Capability> {
        const ALL: [Capability; 5] = [
            Capability::Http,
            Capability::Exec,
            Capability::ReadFile,
            Capability::HostStats,
            Capability::Log,
        ];
        ALL.into_iter().filter(|c| wanted.contains(c)).collect()
    }

    /// For each capability a plugin says it wants but this grant set leaves out: its name
    /// and what to add to the instance's grants.
    pub fn missing(&self, wanted: &[Capability]) -> Vec<(&'static str, &'static str)> {
        Self::distinct(wanted)
            .iter()
            .filter_map(|capability| match capability {
                Capability::Http if self.http.allow.is_empty() => {
                    Some(("http", "http = { allow = [\"http://127.0.0.1:8081/\"] }"))
                }
                Capability::Exec if self.exec.is_empty() => Some((
                    "exec",
                    "exec = [{ program = \"/usr/bin/...\", args = [...] }]",
                )),
                Capability::ReadFile if self.read_file.is_empty() => {
                    Some(("read-file", "read_file = [\"/path/or/glob\"]"))
                }
                Capability::HostStats if !self.host_stats => {
                    Some(("host-stats", "host_stats = true"))
                }
                Capability::Log if !self.log_allowed() => Some(("log", "log = true")),
                _ => None,
            })
            .collect()
    }

    pub fn log_allowed(&self) -> bool {
        self.log.unwrap_or(true)
    }

    pub fn http_timeout(&self) -> Duration {
        self.http.timeout.unwrap_or(DEFAULT_HOST_CALL_TIMEOUT)
    }

    pub fn http_max_bytes(&self) -> usize {
        self.http.max_bytes.unwrap_or(DEFAULT_HTTP_MAX_BYTES)
    }

    pub fn exec_timeout(&self) -> Duration {
        self.exec_timeout.unwrap_or(DEFAULT_HOST_CALL_TIMEOUT)
    }

    pub fn exec_max_output_bytes(&self) -> usize {
        self.exec_max_output_bytes
            .unwrap_or(DEFAULT_EXEC_MAX_OUTPUT_BYTES)
    }

    pub fn read_file_max_bytes(&self) -> usize {
        self.read_file_max_bytes
            .unwrap_or(DEFAULT_READ_FILE_MAX_BYTES)
    }
}

/// A URL reduced to what grants compare.
struct ParsedUrl {
    scheme: String,
    /// `host:port`, lower-case, with the scheme's default port filled in.
    authority: String,
    path: String,
}

impl ParsedUrl {
    fn parse(url: &str) -> Option<ParsedUrl> {
        let uri: hyper::Uri = url.parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let authority = uri.authority()?;
        if authority.as_str().contains('@') || url.contains('#') {
            return None;
        }
        let port = authority.port_u16().or(match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        })?;
        let path = uri.path();
        let lowered = path.to_ascii_lowercase();
        let ambiguous = path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
            || lowered.contains("%2e")
            || lowered.contains("%2f")
            || lowered.contains("%5c")
            || path.contains(';')
            || path.contains('\\');
        if ambiguous {
            return None;
        }
        Some(ParsedUrl {
            scheme,
            authority: format!("{}:{port}", authority.host().to_ascii_lowercase()),
            path: path.to_owned(),
        })
    }
}

/// `*` stays within one path segment, as in a shell.
pub const GLOB_OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn grants() -> Grants {
        Grants {
            http: HttpGrant {
                allow: vec!["http://127.0.0.1:8081/".into()],
                ..Default::default()
            },
            exec: vec![ExecGrant {
                program: "/usr/bin/vcgencmd".into(),
                args: vec!["measure_temp".into()],
            }],
            read_file: vec!["/sys/class/thermal/thermal_zone*/temp".into()],
            ..Default::default()
        }
    }

    #[test]
    fn http_matches_scheme_authority_and_path_prefix() {
        let g = grants();
        assert!(g.http_allows("http://127.0.0.1:8081/jobs/overview"));
        assert!(g.http_allows("http://127.0.0.1:8081/"));
        assert!(!g.http_allows("http://127.0.0.1:80810/"));
        assert!(!g.http_allows("http://127.0.0.1:8081/../admin"));
        assert!(!g.http_allows("http://127.0.0.1:8081/a/%2e%2e/admin"));
        assert!(!g.http_allows("http://127.0.0.1:8081/a/..;/admin"));
        assert!(!g.http_allows("http://127.0.0.1:8081@evil.example/"));
        assert!(!g.http_allows("http://user@127.0.0.1:8081/"));
        assert!(!g.http_allows("https://127.0.0.1:8081/"));
        assert!(!g.http_allows("http://example.com/"));
        // A grant without a trailing slash still cannot reach another host or port.
        let loose = Grants {
            http: HttpGrant {
                allow: vec!["http://localhost".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(loose.http_allows("http://localhost/metrics"));
        assert!(loose.http_allows("http://localhost:80/metrics"));
        assert!(!loose.http_allows("http://localhost.evil.example/"));
        assert!(!loose.http_allows("http://localhost:8080/"));
    }

    #[test]
    fn exec_needs_exact_program_and_arguments() {
        let g = grants();
        assert!(g.exec_allows("/usr/bin/vcgencmd", &["measure_temp".into()]));
        assert!(!g.exec_allows("vcgencmd", &["measure_temp".into()]));
        assert!(!g.exec_allows("/usr/bin/vcgencmd", &["get_throttled".into()]));
        assert!(!g.exec_allows("/bin/sh", &["-c".into(), "vcgencmd measure_temp".into()]));
    }

    #[test]
    fn files_match_globs_within_segments_and_never_walk_up() {
        let g = grants();
        assert!(g.read_allows("/sys/class/thermal/thermal_zone0/temp"));
        assert!(!g.read_allows("/sys/class/thermal/thermal_zone0/../../../../etc/shadow"));
        assert!(!g.read_allows("/sys/class/thermal/thermal_zone0/sub/temp"));
        assert!(!g.read_allows("sys/class/thermal/thermal_zone0/temp"));
        assert!(!g.read_allows("/etc/shadow"));
    }

    #[test]
    fn log_is_granted_unless_turned_off() {
        assert!(Grants::default().log_allowed());
        let g = Grants {
            log: Some(false),
            ..Default::default()
        };
        assert!(!g.log_allowed());
    }
}
