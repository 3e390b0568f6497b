//! The tiny F16 GPT-2 shipped for experiments/smoke.toml
//! (`tests/golden/make_smoke_checkpoint.py`): it loads with GPT-2's real tokenizer, runs the
//! smoke prompt, and agrees with HuggingFace's forward of the same weights.

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::hooks::Hooks;
use hookgraph::model::{self, CheckpointFiles, Processing};
use hookgraph::tokenizer::batch_tokens;

const PROMPT: &str = "Then, Sarah and Arthur went to the store. Arthur gave a bone to";

#[derive(serde::Deserialize)]
struct Golden {
    prompt: String,
    tokens: Vec<u32>,
    top5_ids: Vec<Vec<usize>>,
    top5_centered_logits: Vec<Vec<f32>>,
}

#[test]
fn smoke_checkpoint_runs_the_prompt() {
    let dir = root().join("experiments/checkpoints/tiny-gpt2");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(
        st.tensors()
            .iter()
            .all(|(_, v)| v.dtype() == safetensors::Dtype::F16),
        "the smoke checkpoint is stored as F16"
    );

    let files = CheckpointFiles::in_dir(&dir).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let cfg = loaded.cfg().clone();
    assert_eq!(
        (
            cfg.n_layers,
            cfg.n_heads,
            cfg.d_model,
            cfg.d_vocab,
            cfg.n_ctx
        ),
        (2, 4, 64, 50257, 256)
    );
    let tok = loaded.tokenizer().unwrap();
    let ids = tok.encode(PROMPT).unwrap();
    let tokens = batch_tokens(&[ids], Some(cfg.bos_token_id), cfg.bos_token_id, cfg.n_ctx);

    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(golden_path("smoke_logits.json")).unwrap())
            .unwrap();
    assert_eq!(golden.prompt, PROMPT);
    assert_eq!(tokens.row(0).to_vec(), golden.tokens, "tokenization");
    assert_eq!(tok.encode(" Sarah").unwrap(), vec![10490]);

    let logits = loaded
        .model
        .logits_host(&tokens, &mut Hooks::default())
        .unwrap();
    assert_eq!(logits.shape(), &[1, golden.tokens.len(), 50257]);
    assert!(logits.iter().all(|x| x.is_finite()), "non-finite logits");

    // center_unembed makes our logits zero-mean per position, so they equal HF's minus
    // HF's per-position mean.
    for (pos, (ids, vals)) in golden
        .top5_ids
        .iter()
        .zip(&golden.top5_centered_logits)
        .enumerate()
    {
        for (&id, &want) in ids.iter().zip(vals) {
            let got = logits[[0, pos, id]];
            assert!(
                (got - want).abs() <= 1e-4 + 1e-3 * want.abs(),
                "position {pos}, token {id}: {got} vs HF {want}"
            );
        }
    }
}
