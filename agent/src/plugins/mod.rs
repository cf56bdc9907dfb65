//! Sandboxed WebAssembly collector plugins (wasmtime, component model). All collection in the
//! agent except its own `picket_agent_*` metrics goes through here.
//!
//! The contract is `plugins/wit/plugin.wit` (`picket:plugin@0.2.0`). The [`manager`] runs the
//! configured instances (plus the default ones) and keeps them in step with the config
//! (SIGHUP) and with the files in `plugins.directory` (replaced files are reloaded). Each
//! instance gets its own store and its own [`supervisor`] task: it instantiates the plugin,
//! passes it its settings, collects on the instance's interval, and sends the rounds to the
//! shipper. A plugin that traps, runs past its deadline, grows past its memory cap or returns
//! more than its output caps is torn down and started again with backoff; the agent and the
//! other plugins carry on. Health per instance is reported as `picket_plugin_*` metrics by
//! the `internal` source.
//!
//! Module map: [`config`] (`[plugins]`), [`catalog`] (embedded and directory plugins),
//! [`cache`] (compiled code kept on disk, authenticated), [`compiler`] (compiling in a
//! short-lived child process), [`grants`] (what an instance may
//! touch), [`host`] (the host functions and the sandboxed store state), [`runtime`] (engines,
//! limits, calls), [`convert`] (output checks), `crate::plugin_stats` (per-instance health).

pub mod cache;
pub mod catalog;
pub mod code_file;
pub mod compiler;
pub mod config;
pub mod convert;
pub mod grants;
pub mod host;
mod http_client;
pub mod manager;
pub mod runtime;
pub mod stats_snapshot;
pub mod supervisor;

pub use config::{InstanceConfig, PluginsConfig};

/// Host bindings generated from the WIT world.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../plugins/wit",
        imports: { default: async },
        exports: { default: async },
    });
}
