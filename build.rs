//! Build-time facts for the run manifest. The crate versions come from Cargo.lock, which
//! [`build_info`](src/build_info.rs) embeds and reads itself; this script adds only what the
//! source tree cannot say: the git commit the runner is built from, in
//! `HOOKGRAPH_GIT_COMMIT` ("unknown" outside a git checkout, e.g. a wheel built from a source
//! archive).
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    // Only the checked-out commit changes what is recorded; without these, any edit reruns
    // the script.
    println!("cargo:rerun-if-changed=build.rs");

    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HOOKGRAPH_GIT_COMMIT={commit}");
    // HEAD moves on commit and checkout; in a worktree it lives in its own git dir and the
    // branch refs in the common one.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let common = git(&["rev-parse", "--git-common-dir"]).unwrap_or(dir);
            println!("cargo:rerun-if-changed={common}/{head}");
            println!("cargo:rerun-if-changed={common}/packed-refs");
        }
    }
}
