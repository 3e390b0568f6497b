//! Build-time facts for the run manifest: `built` writes `$OUT_DIR/built.rs` with, among
//! others, `DEPENDENCIES`, every package and version in Cargo.lock, so a crate linked in two
//! versions (gemm 0.15 through dfdx, 0.19 directly) is listed twice.
//! [`build_info`](src/build_info.rs) includes it and picks the crates that shape results.
fn main() {
    // Only the lock file changes what is recorded; without this, any edit reruns the script.
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=build.rs");
    built::write_built_file().expect("collecting build-time information for the manifest");
}
