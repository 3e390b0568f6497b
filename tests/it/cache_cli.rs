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
    file.f32.keys().chain(file.i64.keys()).cloned().collect()
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
        ])
    );
    compare_all(&file, "a_processed.safetensors");
    check_tokens(&file);
    assert_eq!(file.f32["ln_final.hook_scale"].shape(), &[3, 12, 1]);
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
        hooks.len() + 1 + 2,
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
    assert_eq!(names(&file), set(&["logits", "tokens"]));
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
    assert_eq!(file.f32["logits"].shape(), &[2, 11, 50257]);
    assert_eq!(
        file.f32["blocks.0.attn.hook_pattern"].shape(),
        &[2, 4, 11, 11]
    );
    assert!(file.f32["logits"].iter().all(|x| x.is_finite()));
}
