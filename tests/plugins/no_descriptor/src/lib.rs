//! Test plugin: a shared library that exports something, but not the descriptor symbol.

#[no_mangle]
pub extern "C" fn hookgraph_not_a_plugin() -> u32 {
    42
}
