//! Test plugin: a working metric with partial state whose descriptor says ABI version 2, as
//! a plugin built before version 3 (token text, answers, rows per batch, undefined-NaN
//! columns) exports it: 16 bytes shorter than version 3's. The host must still load, run,
//! shard and resume it.

use std::sync::OnceLock;

use hookgraph_plugin::abi::{
    HgPluginDescriptor, HgPluginDescriptorV2, HgPluginHeader, HG_PLUGIN_MAGIC,
};
use hookgraph_plugin::export::{descriptor, DescriptorHolder, PluginMeta};
use hookgraph_plugin::{BatchCtx, Ctx, Emitter, PluginMetric};

/// Counts, per selected head, the sequences it saw.
struct Count(Vec<u64>);

impl PluginMetric for Count {
    fn new(_options: &hookgraph_plugin::serde_json::Value) -> Result<Self, String> {
        Ok(Count(Vec::new()))
    }

    fn begin_dataset(&mut self, ctx: &Ctx) -> Result<(), String> {
        self.0 = vec![0; ctx.heads().len()];
        Ok(())
    }

    fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String> {
        let b = ctx.tokens().shape()[0] as u64;
        self.0.iter_mut().for_each(|n| *n += b);
        Ok(())
    }

    fn finish(&mut self, ctx: &Ctx, out: &mut Emitter) -> Result<(), String> {
        for (&(l, h), &n) in ctx.heads().iter().zip(&self.0) {
            out.row("abi_v2_count", &[l.into(), h.into(), (n as usize).into()])?;
        }
        Ok(())
    }

    const PARTIAL_STATE: bool = true;

    fn save_state(&self) -> Result<Vec<u8>, String> {
        Ok(self.0.iter().flat_map(|n| n.to_le_bytes()).collect())
    }

    fn merge_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.len() != 8 * self.0.len() {
            return Err(format!("state of {} bytes", state.len()));
        }
        for (n, c) in self.0.iter_mut().zip(state.chunks_exact(8)) {
            *n += u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        Ok(())
    }
}

static META: PluginMeta = PluginMeta {
    name: "hg_test_abi_v2",
    version: "0.1.0",
    description: "test plugin exporting an ABI version 2 descriptor",
    hooks: &[],
    tables: &[hookgraph_plugin::export::TableMeta {
        name: "abi_v2_count",
        columns: &["layer", "head", "n"],
        score: None,
        nan: &[],
    }],
    options: &[],
};

struct V2(HgPluginDescriptorV2);
// SAFETY: immutable once built; its pointers reach the static holder below.
unsafe impl Send for V2 {}
// SAFETY: as above.
unsafe impl Sync for V2 {}

#[no_mangle]
pub extern "C" fn hookgraph_plugin_descriptor() -> *const HgPluginDescriptorV2 {
    static HOLDER: OnceLock<Option<DescriptorHolder>> = OnceLock::new();
    static DESC: OnceLock<Option<V2>> = OnceLock::new();
    let d = DESC.get_or_init(|| {
        let p: *const HgPluginDescriptor = descriptor::<Count>(&META, &HOLDER);
        // SAFETY: `descriptor` returns null or a pointer into the static HOLDER.
        let d = unsafe { p.as_ref() }?;
        Some(V2(HgPluginDescriptorV2 {
            header: HgPluginHeader {
                magic: HG_PLUGIN_MAGIC,
                abi_version: 2,
                struct_size: std::mem::size_of::<HgPluginDescriptorV2>() as u32,
            },
            name: d.name,
            version: d.version,
            description: d.description,
            hooks: d.hooks,
            n_hooks: d.n_hooks,
            tables: d.tables,
            n_tables: d.n_tables,
            options: d.options,
            n_options: d.n_options,
            create: d.create,
            begin_dataset: d.begin_dataset,
            batch: d.batch,
            finish_dataset: d.finish_dataset,
            destroy: d.destroy,
            save_state: d.save_state,
            merge_state: d.merge_state,
        }))
    });
    d.as_ref().map_or(std::ptr::null(), |v| &v.0)
}
