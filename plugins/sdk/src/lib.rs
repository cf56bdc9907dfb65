//! The guest side of Picket's plugin interface (`plugins/wit/plugin.wit`).
//!
//! A plugin crate (`crate-type = ["cdylib"]`, built for `wasm32-wasip2`) implements [`Guest`]
//! and calls [`export!`]:
//!
//! ```ignore
//! use picket_plugin_sdk::{Guest, export, families::FamilyBuilder, types::*};
//!
//! struct Hello;
//! impl Guest for Hello {
//!     fn describe() -> Description { /* name, version, capabilities, defaults */ }
//!     fn init(settings: String) -> Result<(), String> { Ok(()) }
//!     fn collect() -> Result<Vec<Family>, String> {
//!         let mut up = FamilyBuilder::gauge("hello_up", "Always 1.");
//!         up.sample(&[], 1.0);
//!         Ok(vec![up.build()])
//!     }
//! }
//! export!(Hello);
//! ```
//!
//! Host capabilities are the modules under [`host`]; each call fails with
//! `HostError::Denied` unless the operator granted it to this plugin instance.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "picket_plugin_sdk::bindings",
    });
}

pub use bindings::Guest;
pub use bindings::export;

/// The shared WIT types: families, samples, values, capabilities, errors.
pub mod types {
    pub use crate::bindings::picket::plugin::types::*;
}

/// Host capabilities, as granted per plugin instance.
pub mod host {
    pub use crate::bindings::picket::plugin::{exec, files, host_stats, http, log};
}

pub mod families;

/// Writes a line to the agent's log, tagged with this plugin instance.
pub fn log(level: host::log::Level, message: &str) {
    host::log::write(level, message);
}

/// A host error as one readable sentence (the generated `Display` is debug-shaped), for the
/// error strings a plugin returns from `collect`.
pub fn error_message(error: &types::HostError) -> String {
    match error {
        types::HostError::Denied(message) => format!("denied: {message}"),
        types::HostError::Timeout => "timed out (the grant's timeout)".to_owned(),
        types::HostError::TooLarge => "larger than the grant's size cap".to_owned(),
        types::HostError::Failed(message) => message.clone(),
    }
}
