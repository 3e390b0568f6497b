//! `runner cache` end to end: the file it writes holds exactly the asked hook points, the
//! logits and the tokens, and every activation matches TransformerLens's goldens.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::*;

const HOOKS: &[&str] = &[
    "blocks.*.attn.hook_pattern",
    "blocks.1.hook_resid_post",
    "ln_final.hook_scale",
];

/// Runs `runner cache` on ckpt_a / tokens_a with `extra` switches; returns the file read back.
fn cache_a(out: &Path, hooks: &[&str], extra: &[&str]) -> TensorFile {
    runner()
        .args(["cache", "--model", "tests/fixtures/ckpt_a"])
        .args(["--tokens", "tests/golden/tokens_a.json", "--device", "cpu"])
        .arg("--hooks")
        .args(hooks)
        .arg("--out")
        .arg(out)
        .args(extra)
        .assert()
        .success();
    read_tensor_file(out)
}

/// Every f32 tensor of `file` equals the golden's tensor of the same name.
fn compare_all(file: &TensorFile, golden: &str) {
    let gold = load_golden(golden);
    for (name, ours) in &file.f32 {
        let g = gold
            .get(name)
            .unwrap_or_else(|| panic!("golden lacks {name}"));
        assert_close(name, ours, g, RTOL, ATOL);
    }
}

fn names(file: &TensorFile) -> BTreeSet<String> {
    file.f32
        .keys()
        .chain(file.i64.keys())
        .chain(file.bool.keys())
        .cloned()
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn check_tokens(file: &TensorFile) {
    let toks = load_tokens(&golden_path("tokens_a.json")).mapv(i64::from);
    assert_eq!(file.i64["tokens"], toks.into_dyn(), "tokens");
}

#[test]
fn cache_writes_asked_points_logits_and_tokens_matching_tl() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let file = cache_a(&out, HOOKS, &[]);
    assert_eq!(
        names(&file),
        set(&[
            "blocks.0.attn.hook_pattern",
            "blocks.1.attn.hook_pattern",
            "blocks.1.hook_resid_post",
            "ln_final.hook_scale",
            "logits",
            "tokens",
            "lengths",
            "mask",
        ])
    );
    compare_all(&file, "a_processed.safetensors");
    check_tokens(&file);
    assert_eq!(file.f32["ln_final.hook_scale"].shape(), &[3, 12, 1]);
    // A token file says nothing about padding: every position is a real token.
    assert_eq!(file.i64["lengths"].as_slice().unwrap(), &[12, 12, 12]);
    assert!(file.bool["mask"].iter().all(|&m| m));
    assert_eq!(file.bool["mask"].shape(), &[3, 12]);
    let sha = &file.metadata["weights_sha256"];
    assert_eq!(sha.len(), 64, "{sha}");
    for flag in [
        "fold_ln",
        "center_writing_weights",
        "center_unembed",
        "fold_value_biases",
    ] {
        assert_eq!(file.metadata[flag], "true", "{flag}");
    }
    assert_eq!(file.metadata["model"], "tests/fixtures/ckpt_a");
    assert!(file.metadata["model_path"].ends_with("ckpt_a"));
    // Written atomically: nothing but the output is left in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn no_processing_matches_unprocessed_tl() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("raw.safetensors");
    let hooks = [
        "blocks.*.attn.hook_pattern",
        "blocks.1.hook_resid_post",
        "ln_final.hook_scale",
        "blocks.0.ln1.hook_normalized",
        "blocks.0.attn.hook_v",
    ];
    let file = cache_a(&out, &hooks, &["--no-processing"]);
    assert_eq!(
        names(&file).len(),
        hooks.len() + 1 + 2 + 2, // the glob's second layer; logits, tokens; lengths, mask
        "{:?}",
        names(&file)
    );
    compare_all(&file, "a_raw.safetensors");
    check_tokens(&file);
    assert_eq!(file.metadata["fold_ln"], "false");
    assert_eq!(file.metadata["fold_value_biases"], "false");
}

#[test]
fn single_switches_change_only_their_step() {
    // fold_ln and fold_value_biases leave the logits unchanged, so without either the
    // logits are still TL's processed ones; the flags land in the metadata.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let file = cache_a(
        &out,
        &["logits"],
        &["--no-fold-ln", "--no-fold-value-biases"],
    );
    assert_eq!(names(&file), set(&["logits", "tokens", "lengths", "mask"]));
    compare_all(&file, "a_processed.safetensors");
    let m = &file.metadata;
    assert_eq!(
        (m["fold_ln"].as_str(), m["center_writing_weights"].as_str()),
        ("false", "true")
    );
    assert_eq!(
        (
            m["center_unembed"].as_str(),
            m["fold_value_biases"].as_str()
        ),
        ("true", "false")
    );
}

/// Runs `runner cache` expecting failure; returns stderr after checking no file was written
/// and nothing panicked.
fn cache_fails(args: &[&str], code: i32) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let a = runner()
        .arg("cache")
        .args(args)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(code);
    let stderr = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "a failed run wrote {}", out.display());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    stderr
}

#[test]
fn unknown_hook_fails_naming_it_and_writes_nothing() {
    let model = ["--model", "tests/fixtures/ckpt_a"];
    let toks = ["--tokens", "tests/golden/tokens_a.json"];
    let err = cache_fails(
        &[
            &model[..],
            &toks[..],
            &[
                "--hooks",
                "blocks.0.hook_resid_pre",
                "blocks.0.attn.hook_nope",
            ],
        ]
        .concat(),
        1,
    );
    assert!(err.contains("'blocks.0.attn.hook_nope'"), "{err}");
    assert!(err.contains("runner list"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A layer the model does not have, and a glob that matches nothing.
    let err = cache_fails(
        &[
            &model[..],
            &toks[..],
            &["--hooks", "blocks.2.hook_resid_pre"],
        ]
        .concat(),
        1,
    );
    assert!(
        err.contains("blocks.2.hook_resid_pre") && err.contains("2-layer"),
        "{err}"
    );
    let err = cache_fails(
        &[&model[..], &toks[..], &["--hooks", "blocks.*.mlp.nope"]].concat(),
        1,
    );
    assert!(
        err.contains("blocks.*.mlp.nope") && err.contains("runner list"),
        "{err}"
    );
}

#[test]
fn bad_token_files_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "ragged.json",
            "[[511, 1, 2], [511, 1]]",
            "row 1 has 2 tokens",
        ),
        ("oov.json", "[[511, 1, 512]]", "token id 512"),
        ("negative.json", "[[511, -1]]", "token id -1"),
        ("notjson.json", "[[511, 1", "expected a JSON list"),
        ("empty.json", "[]", "no tokens"),
        (
            "toolong.json",
            &format!("[{:?}]", vec![1; 33]),
            "n_ctx = 32",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let err = cache_fails(
            &[
                "--model",
                "tests/fixtures/ckpt_a",
                "--tokens",
                path.to_str().unwrap(),
                "--hooks",
                "logits",
            ],
            1,
        );
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn argument_errors_are_clap_errors() {
    // --tokens and --prompt together; neither; no --hooks.
    let base = ["--model", "tests/fixtures/ckpt_a", "--hooks", "logits"];
    cache_fails(
        &[
            &base[..],
            &["--tokens", "tests/golden/tokens_a.json", "--prompt", "hi"],
        ]
        .concat(),
        2,
    );
    cache_fails(&base, 2);
    cache_fails(
        &[
            "--model",
            "tests/fixtures/ckpt_a",
            "--tokens",
            "tests/golden/tokens_a.json",
        ],
        2,
    );
}

#[test]
fn prompt_needs_a_tokenizer() {
    let err = cache_fails(
        &[
            "--model",
            "tests/fixtures/ckpt_a",
            "--prompt",
            "hi",
            "--hooks",
            "logits",
        ],
        1,
    );
    assert!(err.contains("tokenizer") && err.contains("ckpt_a"), "{err}");
}

#[test]
fn prompts_are_batched_with_bos_and_right_padding() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.safetensors");
    runner()
        .args(["cache", "--model", "experiments/checkpoints/tiny-gpt2"])
        .args(["--prompt", "Then, Sarah and Arthur went to the store."])
        .args(["--prompt", "Arthur gave a bone to"])
        .args([
            "--hooks",
            "blocks.0.attn.hook_pattern",
            "--device",
            "cpu",
            "--out",
        ])
        .arg(&out)
        .assert()
        .success()
        .stdout(predicates::str::contains("blocks.0.attn.hook_pattern"));
    let file = read_tensor_file(&out);
    let toks = &file.i64["tokens"];
    let bos = 50256;
    let first = [bos, 6423, 11, 10490, 290, 13514, 1816, 284, 262, 3650, 13];
    // "Arthur" without a leading space is a different token from " Arthur" (13514).
    let second = [bos, 29874, 2921, 257, 9970, 284, bos, bos, bos, bos, bos];
    assert_eq!(toks.shape(), &[2, 11]);
    assert_eq!(
        toks.as_slice().unwrap(),
        [first, second].concat().as_slice()
    );
    // The second prompt is 6 tokens with BOS; the rest is BOS padding, which `mask` tells
    // apart from a real BOS.
    assert_eq!(file.i64["lengths"].as_slice().unwrap(), &[11, 6]);
    let mask = &file.bool["mask"];
    for (s, len) in [(0, 11), (1, 6)] {
        for p in 0..11 {
            assert_eq!(mask[[s, p]], p < len, "mask[{s}, {p}]");
        }
    }
    assert_eq!(file.f32["logits"].shape(), &[2, 11, 50257]);
    assert_eq!(
        file.f32["blocks.0.attn.hook_pattern"].shape(),
        &[2, 4, 11, 11]
    );
    assert!(file.f32["logits"].iter().all(|x| x.is_finite()));
}

/// `--spec SPEC --dataset NAME`: the dataset the run builds (IOI prompts made in-process),
/// in the spec's batches, with its lengths and padding; the spec's model and processing.
#[test]
fn spec_dataset_caches_the_batches_a_run_sees() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("s.toml");
    let root = root();
    std::fs::write(
        &spec,
        format!(
            r#"name = "s"
[model]
path = "{model}"
batch_size = 3
center_unembed = false

[[dataset]]
name = "web"
kind = "text"
path = "{corpus}"
n = 5
seq_len = 16
short = "pad"

[[metric]]
kind = "loss"
"#,
            model = root.join("experiments/checkpoints/tiny-gpt2").display(),
            corpus = root.join("tests/fixtures/corpus/web.jsonl").display(),
        ),
    )
    .unwrap();
    let out = dir.path().join("web.safetensors");
    let hooks = ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post"];
    runner()
        .args(["cache", "--spec"])
        .arg(&spec)
        .args(["--dataset", "web", "--device", "cpu", "--hooks"])
        .args(hooks)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let file = read_tensor_file(&out);
    let (tokens, lengths, mask) = (
        &file.i64["tokens"],
        &file.i64["lengths"],
        &file.bool["mask"],
    );
    assert_eq!(tokens.shape(), &[5, 16]);
    assert_eq!(file.f32["blocks.0.attn.hook_pattern"].shape()[0], 5);
    assert_eq!(file.f32["logits"].shape()[..2], [5, 16]);
    // Some sequence is padded (short = "pad"), with BOS, and the mask says so.
    assert!(lengths.iter().any(|&l| l < 16), "{lengths:?}");
    for s in 0..5 {
        for p in 0..16 {
            let real = (p as i64) < lengths[s];
            assert_eq!(mask[[s, p]], real);
            if !real {
                assert_eq!(tokens[[s, p]], 50256);
            }
        }
    }
    let m = &file.metadata;
    assert_eq!(m["dataset"], "web");
    assert_eq!(m["batch_size"], "3");
    assert_eq!(m["center_unembed"], "false", "the spec's processing");
    assert_eq!(m["fold_ln"], "true");

    // Batches of 3 joined equal one pass over the same tokens (what a token file gives).
    let ids: Vec<Vec<i64>> = tokens
        .outer_iter()
        .map(|r| r.iter().copied().collect())
        .collect();
    let tok_file = dir.path().join("t.json");
    std::fs::write(&tok_file, serde_json::to_string(&ids).unwrap()).unwrap();
    let whole = dir.path().join("whole.safetensors");
    runner()
        .args(["cache", "--model", "experiments/checkpoints/tiny-gpt2"])
        .args(["--no-center-unembed", "--device", "cpu", "--tokens"])
        .arg(&tok_file)
        .arg("--hooks")
        .args(hooks)
        .arg("--out")
        .arg(&whole)
        .assert()
        .success();
    let whole = read_tensor_file(&whole);
    for name in hooks.iter().chain(&["logits"]) {
        assert_close(name, &file.f32[*name], &whole.f32[*name], 1e-5, 1e-6);
    }

    // A dataset the spec does not have is named, with the ones it has.
    let err = cache_fails(
        &[
            "--spec",
            spec.to_str().unwrap(),
            "--dataset",
            "ioi",
            "--hooks",
            "logits",
        ],
        1,
    );
    assert!(
        err.contains("--dataset ioi") && err.contains("web"),
        "{err}"
    );
    // --dataset needs --spec; processing switches belong in the spec.
    let err = cache_fails(
        &["--model", "x", "--dataset", "web", "--hooks", "logits"],
        1,
    );
    assert!(err.contains("--spec SPEC"), "{err}");
    cache_fails(
        &[
            "--spec",
            spec.to_str().unwrap(),
            "--dataset",
            "web",
            "--no-fold-ln",
            "--hooks",
            "logits",
        ],
        2,
    );
}

/// `--weights`: the processed parameters under TransformerLens state-dict names, equal to
/// TL's processed state dict (the goldens' `weights.*`), with the processing in the metadata.
#[test]
fn weights_are_tl_processed_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    runner()
        .args([
            "cache",
            "--model",
            "tests/fixtures/ckpt_a",
            "--weights",
            "--out",
        ])
        .arg(&out)
        .assert()
        .success();
    let file = read_tensor_file(&out);
    let gold = load_golden("a_processed.safetensors");
    let want: BTreeSet<String> = gold
        .keys()
        .filter_map(|k| k.strip_prefix("weights."))
        .map(str::to_string)
        .collect();
    assert!(want.contains("blocks.0.attn.W_O"), "{want:?}");
    assert_eq!(
        names(&file),
        want,
        "exactly TL's processed names (no ln weights once folded)"
    );
    for name in &want {
        assert_close(
            name,
            &file.f32[name],
            &gold[&format!("weights.{name}")],
            RTOL,
            ATOL,
        );
    }
    assert_eq!(file.metadata["fold_ln"], "true");
    assert_eq!(file.metadata["weights_sha256"].len(), 64);
    // Unprocessed: the LayerNorm weights are there again.
    let raw = dir.path().join("raw.safetensors");
    runner()
        .args(["cache", "--model", "tests/fixtures/ckpt_a", "--weights"])
        .args(["--no-processing", "--out"])
        .arg(&raw)
        .assert()
        .success();
    let raw = read_tensor_file(&raw);
    assert!(raw.f32.contains_key("blocks.0.ln1.w") && raw.f32.contains_key("ln_final.b"));
    assert_eq!(raw.metadata["fold_ln"], "false");
}
