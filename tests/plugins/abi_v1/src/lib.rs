//! Test plugin: a working metric whose descriptor is ABI version 1's (no `save_state` /
//! `merge_state`, 16 bytes shorter), as a plugin built before version 2 would export it. The
//! host must still load and run it, and refuse `--shard` / `--resume` for it by name.

use std::sync::OnceLock;

use hookgraph_plugin::abi::HgPluginDescriptor;
use hookgraph_plugin::export::{as_older_version, descriptor, DescriptorHolder, PluginMeta};
use hookgraph_plugin::{BatchCtx, Ctx, Emitter, PluginMetric};

/// Counts, per selected head, the sequences it saw.
struct Count(Vec<usize>);

impl PluginMetric for Count {
    fn new(_options: &hookgraph_plugin::serde_json::Value) -> Result<Self, String> {
        Ok(Count(Vec::new()))
    }

    fn begin_dataset(&mut self, ctx: &Ctx) -> Result<(), String> {
        self.0 = vec![0; ctx.heads().len()];
        Ok(())
    }

    fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String> {
        let b = ctx.tokens().shape()[0];
        self.0.iter_mut().for_each(|n| *n += b);
        Ok(())
    }

    fn finish(&mut self, ctx: &Ctx, out: &mut Emitter) -> Result<(), String> {
        for (&(l, h), &n) in ctx.heads().iter().zip(&self.0) {
            out.row("abi_v1_count", &[l.into(), h.into(), n.into()])?;
        }
        Ok(())
    }
}

static META: PluginMeta = PluginMeta {
    name: "hg_test_abi_v1",
    version: "0.1.0",
    description: "test plugin exporting an ABI version 1 descriptor",
    hooks: &[],
    tables: &[hookgraph_plugin::export::TableMeta {
        name: "abi_v1_count",
        columns: &["layer", "head", "n"],
        score: None,
        nan: &[],
    }],
    options: &[],
};

#[no_mangle]
pub extern "C" fn hookgraph_plugin_descriptor() -> *const HgPluginDescriptor {
    static HOLDER: OnceLock<Option<DescriptorHolder>> = OnceLock::new();
    // The bytes a plugin built for ABI version 1 exports: the current descriptor's prefix.
    static DESC: OnceLock<Option<Vec<u64>>> = OnceLock::new();
    let d = DESC.get_or_init(|| {
        let p: *const HgPluginDescriptor = descriptor::<Count>(&META, &HOLDER);
        // SAFETY: `descriptor` returns null or a pointer into the static HOLDER.
        let d = unsafe { p.as_ref() }?;
        Some(as_older_version(d, 1))
    });
    d.as_ref().map_or(std::ptr::null(), |w| {
        w.as_ptr().cast::<HgPluginDescriptor>()
    })
}
