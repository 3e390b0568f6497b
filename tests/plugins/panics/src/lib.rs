//! Test plugin: a well-formed plugin whose `batch` panics. The host must report
//! it as the plugin's failure, with its message, and keep the run going.

use hookgraph_plugin::{export_plugin, BatchCtx, Ctx, Emitter, PluginMetric};

struct Broken;

impl PluginMetric for Broken {
    fn new(_options: &hookgraph_plugin::serde_json::Value) -> Result<Self, String> {
        Ok(Broken)
    }

    fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String> {
        let _scale = ctx.activation("ln_final.hook_scale")?;
        panic!("deliberate panic in batch (test plugin)")
    }

    fn finish(&mut self, _ctx: &Ctx, out: &mut Emitter) -> Result<(), String> {
        out.row("hg_test_panics", &[0usize.into()])
    }
}

export_plugin!(
    Broken,
    name = "hg_test_panics",
    version = env!("CARGO_PKG_VERSION"),
    description = "test plugin whose batch panics",
    hooks = ["ln_final.hook_scale"],
    tables = [{ name = "hg_test_panics", columns = ["value"] }],
    options = [],
);

/// A constructor, run by the dynamic loader when the library is loaded: it writes the file
/// named by `HG_TEST_CTOR_MARK`, so a test can tell whether `runner list` loaded it (it
/// must not without `--load`).
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static CTOR: extern "C" fn() = mark_loaded;

#[cfg(target_os = "linux")]
extern "C" fn mark_loaded() {
    if let Some(p) = std::env::var_os("HG_TEST_CTOR_MARK") {
        let _ = std::fs::write(p, b"hg_test_panics was loaded\n");
    }
}
