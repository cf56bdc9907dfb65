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
//! Plugins work with ordinary nested [`types::Family`] values; the SDK turns them into the
//! flat tables the WIT `collect` returns (see `output` in the WIT for why it is flat).
//!
//! Host capabilities are the modules under [`host`]; each call fails with
//! `HostError::Denied` unless the operator granted it to this plugin instance.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_bindings",
        default_bindings_module: "picket_plugin_sdk::bindings",
    });
}

pub mod families;
#[doc(hidden)]
pub mod flatten;
pub mod types;

/// What a plugin implements: the three exports of the `plugin` world, with the collection
/// as ordinary nested families.
pub trait Guest {
    /// Name, version, the capabilities wanted and the default settings.
    fn describe() -> types::Description;
    /// Called once per instance (and again after a restart) with the instance's settings as
    /// a JSON object. An error here is shown to the operator as a configuration error.
    fn init(settings: String) -> Result<(), String>;
    /// One collection round.
    fn collect() -> Result<Vec<types::Family>, String>;
}

/// Exports a type implementing [`Guest`] as the plugin's component exports.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        #[doc(hidden)]
        struct __PicketPluginExports;

        impl $crate::bindings::Guest for __PicketPluginExports {
            fn describe() -> $crate::types::Description {
                <$plugin as $crate::Guest>::describe()
            }
            fn init(settings: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                <$plugin as $crate::Guest>::init(settings)
            }
            fn collect() -> ::std::result::Result<
                $crate::bindings::picket::plugin::types::Output,
                ::std::string::String,
            > {
                <$plugin as $crate::Guest>::collect().and_then(|families| $crate::flatten::flatten(&families))
            }
        }

        $crate::bindings::__export_plugin_bindings!(__PicketPluginExports with_types_in $crate::bindings);
    };
}

/// Host capabilities, as granted per plugin instance.
pub mod host {
    pub use crate::bindings::picket::plugin::{exec, files, host_stats, http, log};
}

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
