//! `runner list`: what a spec can name — built-in metrics, plugins found, dataset kinds, hook
//! points.
//!
//! Owns: printing those lists. Must not: load weights (only `config.json` when `--model` is
//! given, for the hook point names of that model), or load a plugin library unless `--load`
//! asks (loading runs the library's code; without it plugins are listed from their files).

use std::process::ExitCode;

use crate::hooks::{hook_point_names, BLOCK_HOOKS};
use crate::metrics::BUILTINS;
use crate::model::{ModelConfig, ModelSource};

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// List the hook points of this model (a checkpoint directory or hub id) by full name.
    #[arg(long)]
    pub model: Option<String>,
    /// Load each plugin found to show its version, hooks, tables and options (this runs
    /// the libraries' code; without it, plugins are listed by file only).
    #[arg(long)]
    pub load: bool,
    /// Also list the repository's test-only plugins (`hg_test_*`, deliberately broken).
    #[arg(long)]
    pub all: bool,
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
    {
        use crate::interventions::{HOOKS, KINDS, MEASURES, VALUES};
        println!("\nInterventions ([[intervention]]):");
        println!("  kind      {}", KINDS.join(" | "));
        println!("  value     {} (kind = \"ablate\")", VALUES.join(" | "));
        println!(
            "  hook      {} (z, result: one per head; the others: one per layer)",
            HOOKS.join(" | ")
        );
        println!(
            "  measure   {} (default: all; logit_diff needs answers)",
            MEASURES.join(" | ")
        );
        println!("  keys      kind, value, hook, dataset, mean_over, source, per_position, heads, together, measure, name");
    }
    print_plugins(args.load, args.all);
    println!("\nDataset kinds ([[dataset]] kind = \"...\"):");
    for (kind, about) in crate::data::KINDS {
        println!("  {kind:<20} {about}");
    }
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

fn print_plugins(load: bool, all: bool) {
    use crate::metrics::plugin::{find_files, search_path};
    let dirs = search_path(None);
    println!("\nPlugins ([[metric]] plugin = \"NAME\"; search path: HOOKGRAPH_PLUGIN_PATH, then the runner's own target/{{release,debug}}):");
    let files: Vec<_> = find_files(&dirs)
        .into_iter()
        .filter(|f| all || !f.test_only)
        .collect();
    if files.is_empty() {
        println!("  (none found; build one with `cargo build --release -p hg_attention_entropy`)");
    }
    if !load {
        for f in &files {
            println!("  {:<20} {}", f.name, f.path.display());
            if let Some(why) = &f.refused {
                println!("  {:<20}   (would be refused) {why}", "");
            }
        }
        if !files.is_empty() {
            println!("  (listed by file, not loaded; `runner list --load` loads them to show their hooks, tables and options)");
        }
        return;
    }
    for f in &files {
        match crate::metrics::plugin::load_info(&f.path) {
            Some(Ok(i)) => {
                println!("  {:<20} {} {}", i.name, i.version, i.description);
                println!("  {:<20}   {}", "", i.path.display());
                println!("  {:<20}   reads: {}", "", i.hooks.join(", "));
                for (opt, about) in &i.options {
                    println!("  {:<20}   option {opt}: {about}", "");
                }
            }
            None => {}
            Some(Err(e)) => println!("  (not loadable) {e}"),
        }
    }
}
