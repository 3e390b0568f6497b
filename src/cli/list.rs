//! `runner list`: what a spec can name — built-in metrics, plugins found, hook points.
//!
//! Owns: printing those lists. Must not: load weights (only `config.json` when `--model` is
//! given, for the hook point names of that model).

use std::process::ExitCode;

use crate::hooks::{hook_point_names, BLOCK_HOOKS};
use crate::metrics::BUILTINS;
use crate::model::{ModelConfig, ModelSource};

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// List the hook points of this model (a checkpoint directory or hub id) by full name.
    #[arg(long)]
    pub model: Option<String>,
}

pub fn list(args: &ListArgs) -> crate::Result<ExitCode> {
    println!("Built-in metrics ([[metric]] kind = \"...\"):");
    for b in BUILTINS {
        println!("  {:<20} {}", b.name, b.about);
        for o in b.options {
            println!("  {:<20}   option {}: {}", "", o.name, o.describe());
        }
        println!("  {:<20}   tables: {}", "", b.tables.join(", "));
    }
    print_plugins();
    match &args.model {
        Some(m) => {
            let files = ModelSource::parse(m).resolve()?;
            let cfg = ModelConfig::from_file(&files.config)?;
            println!(
                "\nHook points of {} ({} layers):",
                files.dir.display(),
                cfg.n_layers
            );
            for name in hook_point_names(cfg.n_layers) {
                println!("  {name}");
            }
        }
        None => {
            println!("\nHook points (TransformerLens names; L is a layer):");
            println!("  hook_embed\n  hook_pos_embed");
            for h in BLOCK_HOOKS {
                println!("  blocks.L.{h}");
            }
            println!("  ln_final.hook_scale\n  ln_final.hook_normalized\n  logits");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plugins() {
    let found = crate::metrics::plugin::discover_in(&crate::metrics::plugin::search_path());
    println!("\nPlugins ([[metric]] plugin = \"NAME\"; search path: HOOKGRAPH_PLUGIN_PATH, then target/{{release,debug}}):");
    if found.is_empty() {
        println!("  (none found; build one with `cargo build --release -p hg_attention_entropy`)");
    }
    for p in found {
        match p {
            Ok(i) => {
                println!("  {:<20} {} {}", i.name, i.version, i.description);
                println!("  {:<20}   {}", "", i.path.display());
                println!("  {:<20}   reads: {}", "", i.hooks.join(", "));
            }
            Err(e) => println!("  (not loadable) {e}"),
        }
    }
}
