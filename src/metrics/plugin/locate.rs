//! Finding plugin libraries: a spec's `plugin` value as a path or a name on the search
//! path, and discovery of every plugin on it for `runner list`.
//!
//! Owns: the search path (`HOOKGRAPH_PLUGIN_PATH`, then cargo's target directories) and the
//! path-or-name rule. Must not: load or call a library except through
//! `abi_check::open`, which checks it first.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::abi_check::{open, OpenError};
use super::{plugin_error, PluginInfo};
use crate::error::Result;

/// Directories (`:`-separated on Unix) searched first for a plugin given by name.
pub const PLUGIN_PATH_ENV: &str = "HOOKGRAPH_PLUGIN_PATH";

/// Every loadable hookgraph plugin on [`search_path`], first occurrence of a file name
/// winning (as loading by name would pick it). Libraries without the descriptor symbol and
/// plugins that fail their checks are skipped; [`discover_in`] reports the latter.
pub fn discover() -> Vec<PluginInfo> {
    discover_in(&search_path())
        .into_iter()
        .filter_map(|r| r.ok())
        .collect()
}

/// Like [`discover`] over `dirs`, with an error for each library that exports the descriptor
/// symbol but fails a check (wrong magic, other ABI version, bad metadata).
pub fn discover_in(dirs: &[PathBuf]) -> Vec<Result<PluginInfo>> {
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
        for (name, path) in files {
            if !seen_names.insert(name) {
                continue;
            }
            match open(&path) {
                Ok(p) => out.push(Ok(p.info.clone())),
                Err(OpenError::NotAPlugin(_)) => {}
                Err(OpenError::Invalid(msg)) => {
                    out.push(Err(plugin_error(&path.display().to_string(), msg)))
                }
            }
        }
    }
    out
}

/// Where plugins given by name are looked for, in order: each directory of
/// `HOOKGRAPH_PLUGIN_PATH`, then `release` and `debug` of the cargo target directory the
/// running executable was built in (when it lives in one), of `CARGO_TARGET_DIR`, and of
/// `./target`.
pub fn search_path() -> Vec<PathBuf> {
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
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        targets.push(match std::env::current_dir() {
            Ok(cwd) if t.is_relative() => cwd.join(t),
            _ => t,
        });
    }
    if let Ok(cwd) = std::env::current_dir() {
        targets.push(cwd.join("target"));
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
    let dirs = search_path();
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
