//! Test plugin: a shared library that exports something, but not the descriptor symbol.

#[no_mangle]
pub extern "C" fn hookgraph_not_a_plugin() -> u32 {
    42
}

/// A constructor, run by the dynamic loader when the library is loaded: it writes the file
/// named by `HG_TEST_CTOR_MARK`, so a test can tell whether anything loaded the library
/// (hookgraph must not load a library it cannot first see is a plugin).
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static CTOR: extern "C" fn() = mark_loaded;

#[cfg(target_os = "linux")]
extern "C" fn mark_loaded() {
    if let Some(p) = std::env::var_os("HG_TEST_CTOR_MARK") {
        let _ = std::fs::write(p, b"hg_test_no_descriptor was loaded\n");
    }
}
