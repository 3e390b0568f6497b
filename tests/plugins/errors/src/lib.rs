//! Test plugin: a well-formed plugin whose `batch` returns an error. The host must report
//! it as the plugin's failure, with its message, and keep the run going.

use hookgraph_plugin::{export_plugin, BatchCtx, Ctx, Emitter, PluginMetric};

struct Broken;

impl PluginMetric for Broken {
    fn new(_options: &hookgraph_plugin::serde_json::Value) -> Result<Self, String> {
        Ok(Broken)
    }

    fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String> {
        let _scale = ctx.activation("ln_final.hook_scale")?;
        Err("deliberate error from batch (test plugin)".to_string())
    }

    fn finish(&mut self, _ctx: &Ctx, out: &mut Emitter) -> Result<(), String> {
        out.row("hg_test_errors", &[0usize.into()])
    }
}

export_plugin!(
    Broken,
    name = "hg_test_errors",
    version = env!("CARGO_PKG_VERSION"),
    description = "test plugin whose batch fails",
    hooks = ["ln_final.hook_scale"],
    tables = [{ name = "hg_test_errors", columns = ["value"] }],
    options = [],
);
