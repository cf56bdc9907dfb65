//! A complete Picket plugin: reports the length of one file it is granted to read.
//!
//! Build: `cargo build -p picket-plugin-template --target wasm32-wasip2 --release`
//! Install: copy `picket_plugin_template.wasm` into the agent's `plugins.directory`.
//! Configure: see docs/plugins.md.

use std::cell::RefCell;

use picket_plugin_sdk::families::FamilyBuilder;
use picket_plugin_sdk::host::{files, log};
use picket_plugin_sdk::types::{Capability, Description, Family};
use picket_plugin_sdk::{Guest, error_message, export};

thread_local! {
    /// Settings from `init`, kept for every `collect`.
    static PATH: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Template;

impl Guest for Template {
    fn describe() -> Description {
        Description {
            name: "template".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![Capability::ReadFile, Capability::Log],
            default_settings: r#"{"path":"/etc/hostname"}"#.into(),
        }
    }

    fn init(settings: String) -> Result<(), String> {
        // Settings arrive as a JSON object; a real plugin would use serde_json.
        let path = settings
            .split("\"path\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("/etc/hostname")
            .to_owned();
        log::write(log::Level::Info, &format!("template watching {path}"));
        PATH.with(|p| *p.borrow_mut() = path);
        Ok(())
    }

    fn collect() -> Result<Vec<Family>, String> {
        let path = PATH.with(|p| p.borrow().clone());
        let bytes =
            files::read(&path).map_err(|e| format!("reading {path}: {}", error_message(&e)))?;
        let mut size = FamilyBuilder::gauge("template_file_bytes", "Size of the watched file.");
        size.sample(&[("path", &path)], bytes.len() as f64);
        Ok(vec![size.build()])
    }
}

export!(Template);
