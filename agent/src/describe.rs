//! `picket-agent plugins describe`: what each available plugin is and what it asks for, read
//! from the plugin itself (its `describe()` export), so an operator can write the grants and
//! settings before configuring an instance.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::config::AgentConfig;
use crate::plugin_stats::PluginStats;
use crate::plugins::catalog;
use crate::plugins::config::InstanceConfig;
use crate::plugins::grants::Grants;
use crate::plugins::runtime::Instance;

/// Plugins to describe: `name`, or every embedded plugin plus every `.wasm` file in
/// `plugins.directory`.
fn names(config: &AgentConfig, name: Option<&str>) -> Vec<String> {
    if let Some(name) = name {
        return vec![name.to_owned()];
    }
    let mut names: Vec<String> = catalog::first_party_names().map(str::to_owned).collect();
    if let Some(dir) = &config.plugins.directory {
        let mut custom: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                Some(name.strip_suffix(".wasm")?.to_owned())
            })
            .filter(|n| !catalog::is_first_party(n))
            .collect();
        custom.sort();
        names.extend(custom);
    }
    names
}

/// The text `plugins describe` prints; `Err` when a named plugin cannot be described.
pub async fn describe(config: &AgentConfig, name: Option<&str>) -> Result<String, String> {
    // No compile cache: a one-off command must not create or own the service's cache.
    let runtime = crate::plugins::runtime::Runtime::new();
    let mut out = String::new();
    let mut failures = Vec::new();
    for name in names(config, name) {
        let described = async {
            let code = catalog::load(&name, config.plugins.directory.as_deref())
                .map_err(|e| e.to_string())?;
            let compiled = runtime
                .compile_async(code.wasm.clone(), config.plugins.max_stack_bytes)
                .await
                .map_err(|e| e.to_string())?;
            // Instantiated with nothing granted and no init: describe() needs neither.
            let limits = InstanceConfig::new(&name, &name).limits();
            let mut instance = Instance::instantiate(
                &compiled,
                format!("{name}/describe"),
                Arc::new(Grants::default()),
                limits,
                Arc::new(PluginStats::default()),
            )
            .await
            .map_err(|e| e.to_string())?;
            let d = instance.describe().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((code, d))
        }
        .await;
        match described {
            Ok((code, d)) => {
                let capabilities: Vec<String> = Grants::distinct(&d.capabilities)
                    .iter()
                    .map(|c| Grants::capability_name(*c).to_owned())
                    .collect();
                let _ = writeln!(
                    out,
                    "{name}\n  describes itself as: {} {}\n  from: {}\n  sha256: {}\n  wants: {}\n  default settings: {}\n",
                    crate::plugins::host::sanitize(&d.name),
                    crate::plugins::host::sanitize(&d.version),
                    code.origin,
                    catalog::hex(&code.digest),
                    if capabilities.is_empty() {
                        "nothing".into()
                    } else {
                        capabilities.join(", ")
                    },
                    crate::plugins::host::sanitize(&d.default_settings),
                );
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        Err(format!("{out}{}", failures.join("\n")))
    }
}
