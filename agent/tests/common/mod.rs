//! What the plugin tests share: the probe plugin's code and limits generous enough for it.

use std::path::PathBuf;
use std::time::Duration;

use picket_agent::plugins::convert::OutputLimits;
use picket_agent::plugins::runtime::InstanceLimits;

/// The probe plugin (`plugins/testing/probe`), built for wasm32-wasip2 by `scripts/test`.
pub fn probe_wasm() -> Vec<u8> {
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .expect("target dir");
    let path: PathBuf = target.join("wasm32-wasip2/release/picket_plugin_probe.wasm");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build it with `cargo build -p picket-plugin-probe --target wasm32-wasip2 --release` (scripts/test does)",
            path.display()
        )
    })
}

/// Limits the probe stays well inside, with calls cut off after `call_timeout`.
pub fn probe_limits(call_timeout: Duration) -> InstanceLimits {
    InstanceLimits {
        call_timeout,
        max_memory_bytes: 32 * 1024 * 1024,
        output: OutputLimits {
            max_series: 10_000,
            max_bytes: 4 * 1024 * 1024,
            max_label_value_bytes: 4096,
        },
    }
}
