//! The GPU path (built with `--features cuda`, run by `scripts/gpu/check.sh` on the GPU
//! machine): the TransformerLens parity checks on device `cuda`, and CPU and GPU agreeing on a
//! GPT-2-shaped forward pass. Without the feature this module is empty.

use dfdx::prelude::{Cpu, Cuda};
use hookgraph::hooks::{HookFilter, Hooks};
use hookgraph::model::{self, CheckpointFiles, Processing};

use crate::common::*;
use crate::parity::check_on;

fn gpu() -> Cuda {
    Cuda::try_build(0, 0).expect("a CUDA device (this module runs only in the GPU check)")
}

#[test]
fn cuda_ckpt_a_processed_matches_transformer_lens() {
    check_on(
        gpu(),
        "ckpt_a",
        "a_processed.safetensors",
        "tokens_a.json",
        Processing::ALL,
    );
}

#[test]
fn cuda_ckpt_a_unprocessed_matches_transformer_lens() {
    check_on(
        gpu(),
        "ckpt_a",
        "a_raw.safetensors",
        "tokens_a.json",
        Processing::NONE,
    );
}

#[test]
fn cuda_ckpt_b_processed_matches_transformer_lens() {
    check_on(
        gpu(),
        "ckpt_b",
        "b_processed.safetensors",
        "tokens_b.json",
        Processing::ALL,
    );
}

#[test]
fn cuda_ckpt_b_unprocessed_matches_transformer_lens() {
    check_on(
        gpu(),
        "ckpt_b",
        "b_raw.safetensors",
        "tokens_b.json",
        Processing::NONE,
    );
}

/// The shipped tiny GPT-2 (real vocabulary, so a [tokens, 50257] unembedding): every hook
/// point and the logits agree between the CPU and the GPU within the parity tolerance.
#[test]
fn cuda_and_cpu_agree_on_the_smoke_checkpoint() {
    let dir = root().join("experiments/checkpoints/tiny-gpt2");
    let toks = load_tokens(&golden_path("tokens_a.json"));
    let run = |cache_all: bool, gpu_side: bool| {
        let files = CheckpointFiles::in_dir(&dir).unwrap();
        let filter = if cache_all {
            vec!["*".to_string()]
        } else {
            vec![]
        };
        if gpu_side {
            let m = model::load(gpu(), files, Processing::ALL, None).unwrap();
            let mut hooks = Hooks::caching(HookFilter::checked(&filter, m.cfg().n_layers).unwrap());
            let logits = m.model.logits_host(&toks, &mut hooks).unwrap();
            (logits, hooks.take_cache())
        } else {
            let m = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
            let mut hooks = Hooks::caching(HookFilter::checked(&filter, m.cfg().n_layers).unwrap());
            let logits = m.model.logits_host(&toks, &mut hooks).unwrap();
            (logits, hooks.take_cache())
        }
    };
    let (cpu_logits, cpu_cache) = run(true, false);
    let (gpu_logits, gpu_cache) = run(true, true);
    assert_close(
        "logits",
        &gpu_logits.into_dyn(),
        &cpu_logits.into_dyn(),
        RTOL,
        ATOL,
    );
    let mut compared = 0;
    for (name, cpu_value) in cpu_cache.iter() {
        assert_close(&name, gpu_cache.get(&name).unwrap(), cpu_value, RTOL, ATOL);
        compared += 1;
    }
    assert!(compared > 20, "only {compared} hook points compared");
}

/// The built-in metrics with their per-head math on the GPU give the CPU host kernels' tables
/// (every table, per position and per token included), and bring no activation to the host.
#[test]
fn cuda_metrics_match_the_cpu_tables() {
    crate::metrics::check_device_tables(gpu());
}
