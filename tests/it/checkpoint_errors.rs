//! Broken checkpoints give a one-line error naming the file and the problem, a non-zero exit
//! and no panic; F16 and BF16 checkpoints load exactly (conversion to f32 is lossless).

use std::path::{Path, PathBuf};

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::hooks::Hooks;
use hookgraph::model::{self, CheckpointFiles, Processing};
use ndarray::Array3;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A copy of ckpt_a in a fresh temporary directory.
fn ckpt_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_dir(&fixture("ckpt_a"), &dir);
    (tmp, dir)
}

/// `runner cache` on `dir` must fail with exit 1 and a one-line, panic-free error that
/// names `file` and contains every one of `want`; nothing is written.
fn assert_load_error(dir: &Path, file: &Path, want: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("x.safetensors");
    let a = runner()
        .arg("cache")
        .arg("--model")
        .arg(dir)
        .args([
            "--tokens",
            "tests/golden/tokens_a.json",
            "--hooks",
            "logits",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1);
    let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains(&file.display().to_string()),
        "does not name {}: {err}",
        file.display()
    );
    for w in want {
        assert!(err.contains(w), "lacks {w:?}: {err}");
    }
    assert!(!out.exists());
}

#[test]
fn truncated_weights() {
    let (_tmp, dir) = ckpt_copy();
    let w = dir.join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&w).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    assert_load_error(&dir, &w, &["not a valid safetensors file", "truncated"]);

    // Cut inside the header, and down to nothing.
    for len in [20, 0] {
        let f = std::fs::OpenOptions::new().write(true).open(&w).unwrap();
        f.set_len(len).unwrap();
        drop(f);
        assert_load_error(&dir, &w, &["not a valid safetensors file"]);
    }
}

#[test]
fn garbage_weights() {
    let (_tmp, dir) = ckpt_copy();
    let w = dir.join("model.safetensors");
    // Deterministic junk: a huge header length, then noise.
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&w, &junk).unwrap();
    assert_load_error(&dir, &w, &["not a valid safetensors file"]);
    // A plausible header length followed by text that is not JSON.
    let mut bytes = 64u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'x'; 64]);
    std::fs::write(&w, &bytes).unwrap();
    assert_load_error(&dir, &w, &["not a valid safetensors file", "header"]);
}

/// Rewrites `config.json` through `edit`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn config_missing_field() {
    let (_tmp, dir) = ckpt_copy();
    edit_config(&dir, |c| {
        c.remove("n_head");
    });
    assert_load_error(&dir, &dir.join("config.json"), &["missing field 'n_head'"]);
}

#[test]
fn config_malformed_json() {
    let (_tmp, dir) = ckpt_copy();
    std::fs::write(dir.join("config.json"), "{\"n_layer\": 2,").unwrap();
    assert_load_error(&dir, &dir.join("config.json"), &["malformed JSON"]);
}

#[test]
fn shapes_disagree_with_config() {
    let (_tmp, dir) = ckpt_copy();
    let w = dir.join("model.safetensors");
    edit_config(&dir, |c| {
        c.insert("n_embd".into(), 48.into());
    });
    assert_load_error(
        &dir,
        &w,
        &["'wte.weight'", "[512, 32]", "[512, 48]", "config.json"],
    );

    let (_tmp, dir) = ckpt_copy();
    let w = dir.join("model.safetensors");
    edit_config(&dir, |c| {
        c.insert("vocab_size".into(), 600.into());
    });
    assert_load_error(&dir, &w, &["'wte.weight'", "[600, 32]"]);

    // More layers in the config than in the file: the first missing tensor is named.
    let (_tmp, dir) = ckpt_copy();
    let w = dir.join("model.safetensors");
    edit_config(&dir, |c| {
        c.insert("n_layer".into(), 3.into());
    });
    assert_load_error(&dir, &w, &["missing tensor 'h.2."]);

    // Fewer layers in the config than in the file.
    let (_tmp, dir) = ckpt_copy();
    let w = dir.join("model.safetensors");
    edit_config(&dir, |c| {
        c.insert("n_layer".into(), 1.into());
    });
    assert_load_error(&dir, &w, &["more layers", "n_layer = 1"]);
}

#[test]
fn missing_config_and_missing_directory() {
    let (_tmp, dir) = ckpt_copy();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_load_error(&dir, &dir.join("config.json"), &["not found"]);

    let (_tmp, dir) = ckpt_copy();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_load_error(&dir, &dir.join("model.safetensors"), &["not found"]);

    let tmp = tempfile::tempdir().unwrap();
    let gone = tmp.path().join("no-such-checkpoint");
    assert_load_error(&gone, &gone, &["no such directory"]);
    // A relative path that does not exist is a path, not a hub id to go and download.
    let rel = Path::new("tests/fixtures/no_such_ckpt");
    assert_load_error(rel, rel, &["no such directory"]);
}

/// Writes ckpt_a's tensors into `dir` converted by `conv` (bytes of one f32 -> new bytes).
fn write_converted(dir: &Path, dtype: Dtype, conv: impl Fn(f32) -> Vec<u8>) {
    copy_dir(&fixture("ckpt_a"), dir);
    let bytes = std::fs::read(fixture("ckpt_a").join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), Dtype::F32);
            let out = v
                .data()
                .chunks_exact(4)
                .flat_map(|c| conv(f32::from_le_bytes(c.try_into().unwrap())))
                .collect();
            (name, v.shape().to_vec(), out)
        })
        .collect();
    let views = data
        .iter()
        .map(|(n, s, d)| (n.clone(), TensorView::new(dtype, s.clone(), d).unwrap()));
    safetensors::tensor::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
}

fn logits_of(dir: &Path) -> Array3<f32> {
    let files = CheckpointFiles::in_dir(dir).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let toks = load_tokens(&golden_path("tokens_a.json"));
    loaded
        .model
        .logits_host(&toks, &mut Hooks::default())
        .unwrap()
}

/// A half-precision checkpoint runs exactly like an f32 one holding the same (rounded)
/// values, and close to the full-precision golden.
fn check_half(
    dtype: Dtype,
    to_bytes: impl Fn(f32) -> Vec<u8>,
    round: impl Fn(f32) -> f32,
    loose: f32,
) {
    let tmp = tempfile::tempdir().unwrap();
    let (half, rounded) = (tmp.path().join("half"), tmp.path().join("rounded"));
    write_converted(&half, dtype, to_bytes);
    write_converted(&rounded, Dtype::F32, |x| round(x).to_le_bytes().to_vec());
    let st_bytes = std::fs::read(half.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    assert!(st.tensors().iter().all(|(_, v)| v.dtype() == dtype));

    let (a, b) = (logits_of(&half), logits_of(&rounded));
    assert_close(
        &format!("{dtype:?} vs f32-rounded logits"),
        &a.clone().into_dyn(),
        &b.into_dyn(),
        0.0,
        1e-5,
    );
    let gold = load_golden("a_processed.safetensors");
    assert_close(
        &format!("{dtype:?} logits vs golden"),
        &a.into_dyn(),
        &gold["logits"],
        loose,
        loose,
    );
}

#[test]
fn f16_checkpoint_loads_exactly() {
    check_half(
        Dtype::F16,
        |x| half::f16::from_f32(x).to_le_bytes().to_vec(),
        |x| half::f16::from_f32(x).to_f32(),
        0.02,
    );
}

#[test]
fn bf16_checkpoint_loads_exactly() {
    check_half(
        Dtype::BF16,
        |x| half::bf16::from_f32(x).to_le_bytes().to_vec(),
        |x| half::bf16::from_f32(x).to_f32(),
        0.1,
    );
}

#[test]
fn f16_checkpoint_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("half");
    write_converted(&dir, Dtype::F16, |x| {
        half::f16::from_f32(x).to_le_bytes().to_vec()
    });
    let out = tmp.path().join("x.safetensors");
    runner()
        .arg("cache")
        .arg("--model")
        .arg(&dir)
        .args([
            "--tokens",
            "tests/golden/tokens_a.json",
            "--hooks",
            "logits",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let file = read_tensor_file(&out);
    assert_close(
        "cli f16 logits",
        &file.f32["logits"],
        &logits_of(&dir).into_dyn(),
        0.0,
        1e-6,
    );
}
