//! Builds the first-party plugins (`plugins/{host,rpi,prometheus,flink}`) for `wasm32-wasip2`
//! and embeds them in the agent, so a node needs nothing but the binary.
//!
//! The plugins are compiled by a nested `cargo build` into their own target directory
//! (`<target>/plugins-wasm`): the outer build holds the lock on its own directory, and the
//! wasm artifacts are shared by every host target and profile. Packagers who build the
//! plugins separately can point `PICKET_PLUGINS_WASM_DIR` at a directory holding
//! `picket_plugin_<name>.wasm` instead.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Embedded plugin name → its crate.
const FIRST_PARTY: &[(&str, &str)] = &[
    ("host", "picket-plugin-host"),
    ("rpi", "picket-plugin-rpi"),
    ("prometheus", "picket-plugin-prometheus"),
    ("flink", "picket-plugin-flink"),
];

/// Variables the outer cargo sets for this build that must not leak into the nested one
/// (target flags for the host triple, clippy's wrapper, the outer target directory).
const NOT_INHERITED: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_PATH",
];

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let registry = out_dir.join("first_party.rs");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest_dir
        .parent()
        .expect("the agent crate sits in the workspace")
        .to_path_buf();
    println!("cargo:rerun-if-env-changed=PICKET_PLUGINS_WASM_DIR");
    let wasm_dir = match env::var_os("PICKET_PLUGINS_WASM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => build_plugins(&root),
    };
    let mut source = String::from("pub static FIRST_PARTY: &[(&str, &[u8])] = &[\n");
    for (name, krate) in FIRST_PARTY {
        let file = wasm_dir.join(format!("{}.wasm", krate.replace('-', "_")));
        if !file.is_file() {
            fail(&format!("{} is missing", file.display()));
        }
        println!("cargo:rerun-if-changed={}", file.display());
        let _ = writeln!(
            source,
            "    ({name:?}, include_bytes!({:?})),",
            file.display().to_string()
        );
    }
    source.push_str("];\n");
    write(&registry, &source);
    order_symbols(&manifest_dir);
}

/// With `PICKET_SYMBOL_ORDER=on` (set by `cross/build.sh`), hands lld the trained symbol
/// order for this target (`symbol-order/<target>.txt`, from `picket-bench symbol-order`):
/// the functions a running agent executes end up next to each other, so the kernel maps
/// fewer pages of code into it (docs/performance.md, "Agent memory"). Opt-in because only
/// lld reads the file and because symbol names carry a hash of the exact build (features,
/// target, profile, dependencies), so the order fits the build it was trained on: the
/// release build `cross/build.sh` makes.
fn order_symbols(manifest_dir: &Path) {
    println!("cargo:rerun-if-env-changed=PICKET_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=PICKET_LINK_MAP");
    // The directory, not the file: cargo reruns a build script every time when a path it
    // watches does not exist, and most targets have no order file.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("symbol-order").display()
    );
    // Training the order needs the stripped binary's symbol addresses: lld's link map
    // (build-script link arguments do not change symbol names, unlike `cargo rustc` flags).
    if let Some(map) = env::var_os("PICKET_LINK_MAP") {
        let map = PathBuf::from(map);
        if let Some(arg) = linker_path_arg(&map) {
            println!("cargo:rustc-link-arg-bin=picket-agent=-Wl,-Map={arg}");
            // The order file needs the names as they are in the objects.
            println!("cargo:rustc-link-arg-bin=picket-agent=-Wl,--no-demangle");
        }
    }
    if env::var("PICKET_SYMBOL_ORDER").as_deref() != Ok("on") {
        return;
    }
    let target = env::var("TARGET").unwrap_or_default();
    let file = manifest_dir
        .join("symbol-order")
        .join(format!("{target}.txt"));
    if !file.is_file() {
        println!(
            "cargo:warning=no symbol order for {target} ({} is missing)",
            file.display()
        );
        return;
    }
    if let Some(arg) = linker_path_arg(&file) {
        println!("cargo:rustc-link-arg-bin=picket-agent=-Wl,--symbol-ordering-file={arg}");
        // Functions renamed since the file was trained are skipped, not errors;
        // cross/build.sh reports how much of the file the link found.
        println!("cargo:rustc-link-arg-bin=picket-agent=-Wl,--no-warn-symbol-ordering");
    }
}

/// `path` as the linker's argument: absolute (the linker runs in another directory) and
/// without commas (`-Wl,` splits at them); `None`, with a warning, otherwise.
fn linker_path_arg(path: &Path) -> Option<String> {
    let text = path.display().to_string();
    if !path.is_absolute() || text.contains(',') {
        println!("cargo:warning=ignoring {text}: the linker needs an absolute path without commas");
        return None;
    }
    Some(text)
}

/// Runs the nested build; returns the directory holding the `.wasm` files.
fn build_plugins(root: &Path) -> PathBuf {
    for dir in ["plugins/wit", "plugins/sdk", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    for (name, _) in FIRST_PARTY {
        println!(
            "cargo:rerun-if-changed={}",
            root.join("plugins").join(name).display()
        );
    }
    let outer_target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                root.join(dir)
            }
        })
        .unwrap_or_else(|| root.join("target"));
    let target_dir = outer_target.join("plugins-wasm");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    for (_, krate) in FIRST_PARTY {
        command.args(["-p", krate]);
    }
    for var in NOT_INHERITED {
        command.env_remove(var);
    }
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "`cargo build --target wasm32-wasip2` of the first-party plugins failed ({status}); \
             is the target installed? `rustup target add wasm32-wasip2`"
        )),
        Err(e) => fail(&format!(
            "cannot run cargo for the first-party plugins: {e}"
        )),
    }
    target_dir.join("wasm32-wasip2/release")
}

fn write(path: &Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
