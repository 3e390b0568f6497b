//! Test plugin: a working metric with partial state whose descriptor says ABI version 2, as
//! a plugin built before version 3 (token text, answers, rows per batch, undefined-NaN
//! columns) exports it: 16 bytes shorter than version 3's. The host must still load, run,
//! shard and resume it.

use std::sync::OnceLock;

use hookgraph_plugin::abi::HgPluginDescriptor;
use hookgraph_plugin::export::{as_older_version, descriptor, DescriptorHolder, PluginMeta};
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

#[no_mangle]
pub extern "C" fn hookgraph_plugin_descriptor() -> *const HgPluginDescriptor {
    static HOLDER: OnceLock<Option<DescriptorHolder>> = OnceLock::new();
    // The bytes a plugin built for ABI version 2 exports: the current descriptor's prefix.
    static DESC: OnceLock<Option<Vec<u64>>> = OnceLock::new();
    let d = DESC.get_or_init(|| {
        let p: *const HgPluginDescriptor = descriptor::<Count>(&META, &HOLDER);
        // SAFETY: `descriptor` returns null or a pointer into the static HOLDER.
        let d = unsafe { p.as_ref() }?;
        Some(as_older_version(d, 2))
    });
    d.as_ref().map_or(std::ptr::null(), |w| {
        w.as_ptr().cast::<HgPluginDescriptor>()
    })
}
