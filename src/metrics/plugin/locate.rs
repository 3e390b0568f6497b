//! Finding plugin libraries: a spec's `plugin` value as a path or a name on the search
//! path, and discovery of every plugin on it for `runner list`.
//!
//! Owns: the search path (`HOOKGRAPH_PLUGIN_PATH`, then the runner's own cargo target
//! directory and that of the repository the spec lies in, never the working directory), the
//! path-or-name rule, and listing plugin files without loading them. Must not: load or
//! call a library except through `abi_check::open`, which checks it first (ownership and
//! permissions, see `trust`, then the ABI).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::abi_check::{open, OpenError};
use super::trust;
use super::{plugin_error, PluginInfo};
use crate::error::Result;

/// Directories (`:`-separated on Unix) searched first for a plugin given by name.
pub const PLUGIN_PATH_ENV: &str = "HOOKGRAPH_PLUGIN_PATH";

/// A plugin library file found on the search path, listed without loading it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginFile {
    /// The library's name as a spec names it (`libfoo.so` -> `foo`).
    pub name: String,
    pub path: PathBuf,
    /// A package of the repository's own tests (`hg_test_*`): deliberately broken
    /// plugins that `runner list` leaves out unless asked.
    pub test_only: bool,
    /// Why it would be refused before loading (permissions or owner), if it would be.
    pub refused: Option<String>,
}

/// Name prefix of the repository's test-only plugin packages (`tests/plugins/*`).
pub const TEST_PLUGIN_PREFIX: &str = "hg_test_";

/// Every hookgraph plugin library file in `dirs`, first occurrence of a file name winning
/// (as loading by name would pick it), found **without loading anything**: a library is
/// listed when its file carries the descriptor symbol's name ([`has_descriptor_name`]).
pub fn find_files(dirs: &[PathBuf]) -> Vec<PluginFile> {
    let prefix = std::env::consts::DLL_PREFIX;
    let suffix = std::env::consts::DLL_SUFFIX;
    let mut seen_names = std::collections::BTreeSet::new();
    let mut seen_dirs = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for dir in dirs {
        let canon = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        if !seen_dirs.insert(canon) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<(OsString, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with(prefix) && n.ends_with(suffix)
            })
            .map(|e| (e.file_name(), e.path()))
            .collect();
        files.sort();
        for (file, path) in files {
            if !seen_names.insert(file.clone()) || !has_descriptor_name(&path) {
                continue;
            }
            let f = file.to_string_lossy();
            let name = f[prefix.len()..f.len() - suffix.len()].to_string();
            out.push(PluginFile {
                test_only: name.starts_with(TEST_PLUGIN_PREFIX),
                refused: trust::check(&path).err(),
                name,
                path,
            });
        }
    }
    out
}

/// Loads and checks every plugin [`find_files`] lists in `dirs` (`runner list --load`;
/// loading runs each library's constructors), with an error for each that is refused or
/// fails a check (wrong magic, other ABI version, bad metadata).
pub fn discover_in(dirs: &[PathBuf]) -> Vec<Result<PluginInfo>> {
    find_files(dirs)
        .into_iter()
        .filter_map(|f| load_info(&f.path))
        .collect()
}

/// Loads and checks one library file for its metadata: `None` when it is not a plugin at
/// all, an error when it is refused or fails a check. Loading runs its constructors.
pub fn load_info(path: &Path) -> Option<Result<PluginInfo>> {
    match open(path) {
        Ok(p) => Some(Ok(p.info.clone())),
        Err(OpenError::NotAPlugin(_)) => None,
        Err(OpenError::Invalid(msg)) => Some(Err(plugin_error(&path.display().to_string(), msg))),
    }
}

/// Whether the file names the descriptor symbol anywhere: every library exporting it
/// holds the name in its dynamic symbol table, so a file without it is certainly not a
/// plugin, found without loading it (loading runs its constructors).
pub fn has_descriptor_name(path: &Path) -> bool {
    use std::io::Read;
    let needle = hookgraph_plugin::abi::HG_DESCRIPTOR_SYMBOL.as_bytes();
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    // Streamed in blocks that overlap by the needle's length.
    let mut buf = vec![0u8; 1 << 16];
    let mut keep = 0usize;
    loop {
        let n = match f.read(&mut buf[keep..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let end = keep + n;
        if buf[..end].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        keep = needle.len().saturating_sub(1).min(end);
        buf.copy_within(end - keep..end, 0);
    }
}

/// Where plugins given by name are looked for, in order: each directory of
/// `HOOKGRAPH_PLUGIN_PATH`; then `release` and `debug` of the cargo target directory the
/// running executable was built in (when it lives in one); then, for a spec in
/// `spec_dir`, of the hookgraph repository that directory lies in (found by walking up to
/// its workspace `Cargo.toml`). Never the working directory: running in a directory
/// someone else can write must not run their code.
pub fn search_path(spec_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os(PLUGIN_PATH_ENV) {
        dirs.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    let mut targets = Vec::new();
    if let Some(t) = std::env::current_exe()
        .ok()
        .and_then(|exe| cargo_target_dir_of(&exe))
    {
        targets.push(t);
    }
    if let Some(root) = spec_dir.and_then(repository_of) {
        targets.push(root.join("target"));
    }
    for t in targets {
        dirs.push(t.join("release"));
        dirs.push(t.join("debug"));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// The hookgraph repository `dir` lies in: the nearest ancestor whose `Cargo.toml` is
/// hookgraph's workspace (it names the `hookgraph` package and the plugin crate).
fn repository_of(dir: &Path) -> Option<PathBuf> {
    let dir = std::path::absolute(dir).ok()?;
    dir.ancestors()
        .find(|d| {
            std::fs::read_to_string(d.join("Cargo.toml")).is_ok_and(|t| {
                t.contains("[workspace]")
                    && t.contains("name = \"hookgraph\"")
                    && t.contains("hookgraph-plugin")
            })
        })
        .map(Path::to_path_buf)
}

/// The cargo target directory an executable sits in (`target/<profile>/exe` or, for tests,
/// `target/<profile>/deps/exe`), recognised by cargo's `CACHEDIR.TAG`.
fn cargo_target_dir_of(exe: &Path) -> Option<PathBuf> {
    let mut dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent()?;
    }
    let target = dir.parent()?;
    target
        .join("CACHEDIR.TAG")
        .is_file()
        .then(|| target.to_path_buf())
}

/// Whether a spec's `plugin` value is a path rather than a name.
fn looks_like_path(spec: &str) -> bool {
    spec.contains('/')
        || spec.contains(std::path::MAIN_SEPARATOR)
        || [".so", ".dylib", ".dll"].iter().any(|s| spec.ends_with(s))
}

/// The library file a spec's `plugin` value names.
pub fn locate(spec: &str, spec_dir: &Path) -> Result<PathBuf> {
    if spec.trim().is_empty() {
        return Err(plugin_error(spec, "`plugin` is empty".into()));
    }
    if looks_like_path(spec) {
        let p = Path::new(spec);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            spec_dir.join(p)
        };
        // Absolute: the dynamic loader looks a path without a `/` (`libfoo.so` next to a spec
        // run as `runner spec.toml`) up on its search path, not in the working directory.
        let p = std::path::absolute(&p).unwrap_or(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(plugin_error(
                spec,
                format!("no such library file: {}", p.display()),
            ))
        };
    }
    // Cargo turns `-` into `_` in library names: accept the package name either way.
    let mut files = vec![libloading::library_filename(spec)];
    if spec.contains('-') {
        files.push(libloading::library_filename(spec.replace('-', "_")));
    }
    let dirs = search_path(Some(spec_dir));
    for dir in &dirs {
        for f in &files {
            let p = dir.join(f);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(plugin_error(
        spec,
        format!(
            "no {} on the plugin search path ({}); build it (`cargo build --release -p {spec}`), set {PLUGIN_PATH_ENV}, or give a path",
            files[0].to_string_lossy(),
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_names_are_told_apart() {
        assert!(looks_like_path("plugins/libx.so"));
        assert!(looks_like_path("libx.dylib"));
        assert!(!looks_like_path("hg_attention_entropy"));
        let err = locate("surely_not_a_plugin_xyz", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("surely_not_a_plugin_xyz") && err.contains("search path"),
            "{err}"
        );
        let err = locate("nope/libx.so", Path::new("/tmp"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/tmp/nope/libx.so"), "{err}");
    }
}
