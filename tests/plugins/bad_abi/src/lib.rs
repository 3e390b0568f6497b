//! Test plugin: a descriptor from an ABI version older than any the host reads (the oldest
//! one minus 1). The host has to reject it naming both versions, before reading past the
//! 16-byte header.

use hookgraph_plugin::abi::{HgPluginHeader, HG_PLUGIN_ABI_MIN_VERSION, HG_PLUGIN_MAGIC};

/// Only a header: an older descriptor's body is unknown to the host.
static HEADER: HgPluginHeader = HgPluginHeader {
    magic: HG_PLUGIN_MAGIC,
    abi_version: HG_PLUGIN_ABI_MIN_VERSION - 1,
    struct_size: 16,
};

#[no_mangle]
pub extern "C" fn hookgraph_plugin_descriptor() -> *const HgPluginHeader {
    &HEADER
}
