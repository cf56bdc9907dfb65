//! A plugin that does what its `mode` setting says, to test the host runtime:
//!
//! | mode | behaviour |
//! |---|---|
//! | `ok` (default) | one gauge `probe_up 1` and a counter of collections |
//! | `loop` | spins forever |
//! | `memory` | allocates without bound |
//! | `recursion` | recurses without bound |
//! | `panic` | panics (a trap) |
//! | `series` | returns ten million series |
//! | `wide` | returns setting `count` (default 1000) gauges `probe_wide{i}` whose values change each round |
//! | `long-label` | returns a label value of one megabyte |
//! | `read` | reads the file in setting `path` and returns its length |
//! | `exec` | runs setting `program` with `args` and returns its output length |
//! | `http` | GETs setting `url` and returns the body length and status |
//! | `bad-init` | refuses its settings |
//! | `trap-while-file` | panics while the file in setting `path` is readable, then behaves |
//! | `alias-exec` | calls `exec` with 200,000 arguments that all point at one 1 MiB string |
//! | `alias-http` | calls `http` with 100,000 headers that all point at one 1 MiB string |
//! | `alias-exec-size` | calls `exec` with 64 arguments (the count allowed) that all point at one 1 MiB string |
//! | `alias-http-size` | calls `http` with 32 headers (the count allowed) that all point at one 1 MiB string |

use std::cell::RefCell;

use picket_plugin_sdk::families::FamilyBuilder;
use picket_plugin_sdk::host::{exec, files, http};
use picket_plugin_sdk::types::{Capability, Description, Family};
use picket_plugin_sdk::{Guest, error_message, export};

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

#[derive(Default)]
struct State {
    mode: String,
    settings: String,
    collections: u64,
}

/// The value of a string setting in the flat JSON object the host passes. Kept dependency
/// free on purpose: a test plugin should be small.
fn setting(settings: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":\"");
    let start = settings.find(&needle)? + needle.len();
    let end = settings[start..].find('"')? + start;
    Some(settings[start..end].to_owned())
}

fn args(settings: &str) -> Vec<String> {
    setting(settings, "args")
        .map(|a| {
            a.split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

struct Probe;

impl Guest for Probe {
    fn describe() -> Description {
        Description {
            name: "probe".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![Capability::Log],
            default_settings: r#"{"mode":"ok"}"#.into(),
        }
    }

    fn init(settings: String) -> Result<(), String> {
        let mode = setting(&settings, "mode").unwrap_or_else(|| "ok".into());
        if mode == "bad-init" {
            return Err("setting `mode`: bad-init refuses on purpose".into());
        }
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.mode = mode;
            s.settings = settings;
        });
        Ok(())
    }

    fn collect() -> Result<Vec<Family>, String> {
        let (mode, settings, n) = STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.collections += 1;
            (s.mode.clone(), s.settings.clone(), s.collections)
        });
        let mut up = FamilyBuilder::gauge("probe_up", "1 when the probe collected.");
        up.sample(&[], 1.0);
        let mut count = FamilyBuilder::counter("probe_collections_total", "Collections so far.");
        count.sample(&[], n as f64);
        let mut out = vec![up.build(), count.build()];
        match mode.as_str() {
            "ok" => {}
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "recursion" => {
                // Each frame keeps a buffer alive across the call so the stack really grows.
                #[allow(unconditional_recursion)]
                fn deeper(depth: u64) -> u64 {
                    let frame = std::hint::black_box([depth; 64]);
                    std::hint::black_box(deeper(frame[0] + 1)) + frame[63]
                }
                std::hint::black_box(deeper(0));
            }
            "panic" => panic!("probe panics on purpose"),
            "series" => {
                let mut flood = FamilyBuilder::gauge("probe_flood", "");
                for i in 0..10_000_000u64 {
                    flood.sample(&[("i", &i.to_string())], 1.0);
                }
                out.push(flood.build());
            }
            "wide" => {
                let count: u64 = setting(&settings, "count")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1000);
                let mut wide = FamilyBuilder::gauge("probe_wide", "");
                for i in 0..count {
                    wide.sample(&[("i", &i.to_string())], (n * count + i) as f64 / 7.0);
                }
                out.push(wide.build());
            }
            "long-label" => {
                let mut f = FamilyBuilder::gauge("probe_long", "");
                f.sample(&[("big", &"x".repeat(1 << 20))], 1.0);
                out.push(f.build());
            }
            "read" => {
                let path = setting(&settings, "path").unwrap_or_default();
                let bytes = files::read(&path).map_err(|e| format!("read {path}: {e}"))?;
                let mut f = FamilyBuilder::gauge("probe_read_bytes", "");
                f.sample(&[], bytes.len() as f64);
                out.push(f.build());
            }
            "exec" => {
                let program = setting(&settings, "program").unwrap_or_default();
                let output = exec::run(&program, &args(&settings))
                    .map_err(|e| format!("exec {program}: {e}"))?;
                let mut f = FamilyBuilder::gauge("probe_exec_stdout_bytes", "");
                f.sample(&[], output.stdout.len() as f64);
                out.push(f.build());
            }
            "http" => {
                let url = setting(&settings, "url").unwrap_or_default();
                let response = http::get(&url, &[]).map_err(|e| format!("GET {url}: {e}"))?;
                let mut f = FamilyBuilder::gauge("probe_http_body_bytes", "");
                f.sample(
                    &[("status", &response.status.to_string())],
                    response.body.len() as f64,
                );
                out.push(f.build());
            }
            "trap-while-file" => {
                let path = setting(&settings, "path").unwrap_or_default();
                if files::read(&path).is_ok() {
                    panic!("probe traps while {path} exists");
                }
            }
            "alias-exec" | "alias-exec-size" => {
                let big = "a".repeat(1 << 20);
                let count = if mode == "alias-exec" { 200_000 } else { 64 };
                let args = aliases(&big, count);
                let result = exec::run("/bin/true", &args);
                let _ = std::mem::ManuallyDrop::new(args);
                result.map_err(|e| format!("alias-exec: {}", error_message(&e)))?;
            }
            "alias-http" | "alias-http-size" => {
                let big = "h".repeat(1 << 20);
                let count = if mode == "alias-http" { 100_000 } else { 32 };
                let values = aliases(&big, count);
                let headers: Vec<(String, String)> = values
                    .iter()
                    .map(|v| {
                        // SAFETY: see `aliases`; these copies are never dropped either.
                        unsafe { (alias(v), alias(v)) }
                    })
                    .collect();
                let url = setting(&settings, "url").unwrap_or_default();
                let result = http::get(&url, &headers);
                let _ = std::mem::ManuallyDrop::new(headers);
                let _ = std::mem::ManuallyDrop::new(values);
                result.map_err(|e| format!("alias-http: {}", error_message(&e)))?;
            }
            other => return Err(format!("unknown mode {other:?}")),
        }
        Ok(out)
    }
}

/// `count` strings that all share `big`'s buffer: what a hostile plugin hands the host to make
/// it copy the same bytes over and over. The result must never be dropped (wrap it in
/// `ManuallyDrop`), since every element claims to own the same allocation.
fn aliases(big: &str, count: usize) -> Vec<String> {
    // SAFETY: a deliberately hostile test plugin; the strings are only read (by the host
    // while lowering the call) and are leaked rather than freed.
    (0..count).map(|_| unsafe { alias(big) }).collect()
}

unsafe fn alias(s: &str) -> String {
    unsafe { String::from_raw_parts(s.as_ptr() as *mut u8, s.len(), s.len()) }
}

export!(Probe);
