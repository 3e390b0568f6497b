//! What the binary was built from, for the run manifest.
//!
//! Owns: the versions of the crates that shape a run's numbers (the tensor library, the
//! matmul kernels, the tokenizer, the checkpoint reader, ...), read from the Cargo.lock the
//! binary was built with (embedded at compile time, parsed with the `toml` crate the specs
//! already use). Must not: run anything.
//!
//! Why not a build-script crate (`built` with `cargo-lock`, as before): that compiled a
//! second TOML parser, `url`, `idna` and ICU for the build host, about 15 s of CPU in every
//! fresh build, the `pip install` of the wheel included, to read one file this crate can read.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The lock file the binary was built from (the workspace root's; cargo rebuilds this crate
/// when it changes).
const CARGO_LOCK: &str = include_str!("../Cargo.lock");

#[derive(Deserialize)]
struct Lock {
    package: Vec<Package>,
}

#[derive(Deserialize)]
struct Package {
    name: String,
    version: String,
}

/// The git commit the runner was built from ("unknown" outside a git checkout).
pub const GIT_COMMIT: &str = env!("HOOKGRAPH_GIT_COMMIT");

/// The crates whose versions can change results.
pub const RESULT_CRATES: &[&str] = &[
    "dfdx",
    "gemm",
    "ndarray",
    "safetensors",
    "tokenizers",
    "toml",
    "libloading",
];

/// Each of [`RESULT_CRATES`] with every version in the lock file, ascending and joined by
/// `", "` (`gemm` -> `"0.15.5, 0.19.0"`: dfdx's kernels and ours).
pub fn crate_versions() -> BTreeMap<&'static str, String> {
    // The file is cargo's own output, embedded at build time: failing to parse it is a bug.
    let lock: Lock = toml::from_str(CARGO_LOCK).expect("the embedded Cargo.lock parses");
    let deps: Vec<(&str, &str)> = lock
        .package
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    versions(&deps, RESULT_CRATES)
}

fn versions(deps: &[(&str, &str)], wanted: &[&'static str]) -> BTreeMap<&'static str, String> {
    wanted
        .iter()
        .filter_map(|&name| {
            let mut vs: Vec<&str> = deps
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .collect();
            // Numeric order: 0.9 before 0.15.
            vs.sort_by_key(|v| {
                v.split(['.', '-', '+'])
                    .map(|p| p.parse::<u64>().unwrap_or(0))
                    .collect::<Vec<_>>()
            });
            vs.dedup();
            (!vs.is_empty()).then(|| (name, vs.join(", ")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_is_recorded() {
        let v = crate_versions();
        assert!(v["dfdx"].starts_with("0.13"), "{v:?}");
        // dfdx 0.13 pins gemm 0.15; the linear layers call gemm 0.19 directly.
        let gemm: Vec<&str> = v["gemm"].split(", ").collect();
        assert_eq!(gemm.len(), 2, "{v:?}");
        assert!(
            gemm[0].starts_with("0.15") && gemm[1].starts_with("0.19"),
            "{v:?}"
        );
    }

    #[test]
    fn versions_sort_numerically() {
        let deps = [
            ("a", "0.15.0"),
            ("a", "0.9.1"),
            ("b", "1.0.0"),
            ("a", "0.9.1"),
        ];
        let v = versions(&deps, &["a", "c"]);
        assert_eq!(v["a"], "0.9.1, 0.15.0");
        assert!(!v.contains_key("c"));
    }
}
