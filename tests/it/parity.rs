//! The forward pass and weight processing against TransformerLens goldens
//! (`tests/golden/make_golden.py`): every hook point, the logits, the per-token loss and
//! the processed weights, on two configs, with processing on and off, on a right-padded
//! batch.

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::hooks::{HookFilter, Hooks};
use hookgraph::model::{self, CheckpointFiles, HookedGpt2, Processing};

fn check(ckpt: &str, golden: &str, tokens: &str, processing: Processing) {
    check_on(Cpu::default(), ckpt, golden, tokens, processing)
}

/// The parity check on any device (the `cuda` module runs it on the GPU).
pub fn check_on<D: hookgraph::seam::SeamDevice>(
    dev: D,
    ckpt: &str,
    golden: &str,
    tokens: &str,
    processing: Processing,
) {
    let files = CheckpointFiles::in_dir(&fixture(ckpt)).unwrap();
    let loaded = model::load(dev, files, processing, None).unwrap();
    let gold = load_golden(golden);
    let toks = load_tokens(&golden_path(tokens));

    // Weights, after processing, under TL's state-dict names.
    let named = loaded.params.named();
    for (name, w) in &named {
        let key = format!("weights.{name}");
        let g = gold
            .get(&key)
            .unwrap_or_else(|| panic!("golden lacks {key}"));
        assert_close(&key, &w.to_owned(), g, RTOL, ATOL);
    }
    let n_weights = gold.keys().filter(|k| k.starts_with("weights.")).count();
    assert_eq!(named.len(), n_weights, "weights we have vs TL has");

    // Every hook point TL cached, from one pass: with the device's own kernels (on the CPU
    // the host kernels a run uses) and on the device-generic dfdx tensor path (what CUDA
    // runs; on the CPU only these tests take it).
    let generic = HookedGpt2::new_generic(
        loaded.model.device().clone(),
        loaded.cfg().clone(),
        &loaded.params,
    )
    .unwrap();
    for (path, model) in [("host", &loaded.model), ("dfdx", &generic)] {
        let mut hooks =
            Hooks::caching(HookFilter::checked(&["*".to_string()], loaded.cfg().n_layers).unwrap());
        let logits = model.logits_host(&toks, &mut hooks).unwrap();
        let cache = hooks.take_cache();
        let mut compared = 0;
        for (name, g) in gold.iter().filter(|(k, _)| k.contains("hook_")) {
            assert_close(
                &format!("{path} {name}"),
                cache.get(name).unwrap(),
                g,
                RTOL,
                ATOL,
            );
            compared += 1;
        }
        assert!(
            compared >= 2 + 18 * loaded.cfg().n_layers,
            "only {compared} hook points compared"
        );
        assert_close(
            &format!("{path} logits"),
            &logits.clone().into_dyn(),
            &gold["logits"],
            RTOL,
            ATOL,
        );
        assert_close(
            &format!("{path} cached logits"),
            cache.get("logits").unwrap(),
            &gold["logits"],
            RTOL,
            ATOL,
        );
        let loss = model::per_token_loss(logits.view(), toks.view());
        assert_close("loss", &loss.into_dyn(), &gold["loss"], RTOL, ATOL);
    }
}

#[test]
fn ckpt_a_processed_matches_transformer_lens() {
    check(
        "ckpt_a",
        "a_processed.safetensors",
        "tokens_a.json",
        Processing::ALL,
    );
}

#[test]
fn ckpt_a_unprocessed_matches_transformer_lens() {
    check(
        "ckpt_a",
        "a_raw.safetensors",
        "tokens_a.json",
        Processing::NONE,
    );
}

#[test]
fn ckpt_b_processed_matches_transformer_lens() {
    check(
        "ckpt_b",
        "b_processed.safetensors",
        "tokens_b.json",
        Processing::ALL,
    );
}

#[test]
fn ckpt_b_unprocessed_matches_transformer_lens() {
    check(
        "ckpt_b",
        "b_raw.safetensors",
        "tokens_b.json",
        Processing::NONE,
    );
}

/// The tolerance check itself must be able to fail: a 1e-3 relative error is caught.
#[test]
fn tolerance_catches_small_errors() {
    assert!(worst(&[1.001], &[1.0], RTOL, ATOL).is_some());
    assert!(worst(&[1.00001], &[1.0], RTOL, ATOL).is_none());
    assert!(worst(&[0.0], &[f32::NEG_INFINITY], RTOL, ATOL).is_some());
}
