//! Test plugin: a descriptor whose magic number is wrong. Must not be loaded: the host has to
//! stop at the magic check, before reading anything past the 16-byte header.

use hookgraph_plugin::abi::{HgPluginHeader, HG_PLUGIN_ABI_VERSION};

/// Only a header: the host must not read further.
static HEADER: HgPluginHeader = HgPluginHeader {
    magic: u64::from_le_bytes(*b"NOTAPLUG"),
    abi_version: HG_PLUGIN_ABI_VERSION,
    struct_size: 16,
};

#[no_mangle]
pub extern "C" fn hookgraph_plugin_descriptor() -> *const HgPluginHeader {
    &HEADER
}
