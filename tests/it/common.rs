//! Helpers shared by the integration tests: goldens from TransformerLens and tolerances.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, IxDyn};

/// f32 parity tolerance against TransformerLens: |a - b| <= ATOL + RTOL * |b|.
pub const RTOL: f32 = 1e-4;
pub const ATOL: f32 = 1e-5;

/// The repository root: where the test binary was built, or `HOOKGRAPH_ROOT` when the binary
/// was carried to another machine (the GPU check, `scripts/gpu/check.sh`).
pub fn root() -> PathBuf {
    std::env::var_os("HOOKGRAPH_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests").join("fixtures").join(name)
}

pub fn golden_path(name: &str) -> PathBuf {
    root().join("tests").join("golden").join(name)
}

/// Every tensor of a golden safetensors file, as f32 arrays.
pub fn load_golden(name: &str) -> HashMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(golden_path(name)).expect("golden file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden parses");
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k}");
            let data: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, ArrayD::from_shape_vec(IxDyn(v.shape()), data).unwrap())
        })
        .collect()
}

/// Token ids from a JSON list of equal-length lists.
pub fn load_tokens(path: &Path) -> Array2<u32> {
    let rows: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (b, s) = (rows.len(), rows[0].len());
    Array2::from_shape_vec((b, s), rows.into_iter().flatten().collect()).unwrap()
}

/// Largest violation of the tolerance, as (index, ours, theirs), or None if all close.
/// Infinities must match exactly (TL's masked attention scores are -inf).
pub fn worst(ours: &[f32], theirs: &[f32], rtol: f32, atol: f32) -> Option<(usize, f32, f32)> {
    let mut worst: Option<(usize, f32, f32, f32)> = None;
    for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
        let bad = if b.is_infinite() || a.is_infinite() {
            if a == b {
                0.0
            } else {
                f32::INFINITY
            }
        } else if a.is_nan() || b.is_nan() {
            if a.is_nan() && b.is_nan() {
                0.0
            } else {
                f32::INFINITY
            }
        } else {
            (a - b).abs() - (atol + rtol * b.abs())
        };
        if bad > 0.0 && worst.map_or(true, |w| bad > w.3) {
            worst = Some((i, a, b, bad));
        }
    }
    worst.map(|(i, a, b, _)| (i, a, b))
}

/// Asserts `ours` equals `theirs` in shape and within tolerance.
pub fn assert_close(name: &str, ours: &ArrayD<f32>, theirs: &ArrayD<f32>, rtol: f32, atol: f32) {
    assert_eq!(ours.shape(), theirs.shape(), "{name}: shape");
    let a: Vec<f32> = ours.iter().copied().collect();
    let b: Vec<f32> = theirs.iter().copied().collect();
    if let Some((i, x, y)) = worst(&a, &b, rtol, atol) {
        panic!("{name}: element {i} is {x}, TransformerLens has {y} (rtol {rtol}, atol {atol})");
    }
}

/// The tensors of any safetensors file: F32 ones as f32, I64 ones as i64, BOOL ones as
/// bool, and the metadata.
pub struct TensorFile {
    pub f32: HashMap<String, ArrayD<f32>>,
    pub i64: HashMap<String, ArrayD<i64>>,
    pub bool: HashMap<String, ArrayD<bool>>,
    pub metadata: HashMap<String, String>,
}

pub fn read_tensor_file(path: &Path) -> TensorFile {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header parses");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("file parses");
    let mut out = TensorFile {
        f32: HashMap::new(),
        i64: HashMap::new(),
        bool: HashMap::new(),
        metadata: meta.metadata().clone().unwrap_or_default(),
    };
    for (k, v) in st.tensors() {
        let shape = IxDyn(v.shape());
        match v.dtype() {
            safetensors::Dtype::F32 => {
                let d = v.data().chunks_exact(4);
                let d = d
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                out.f32.insert(k, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            safetensors::Dtype::I64 => {
                let d = v.data().chunks_exact(8);
                let d = d
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                out.i64.insert(k, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            safetensors::Dtype::BOOL => {
                let d = v.data().iter().map(|&b| b != 0).collect();
                out.bool
                    .insert(k, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            other => panic!("{}: {k} has dtype {other:?}", path.display()),
        }
    }
    out
}

/// Copies a checkpoint directory's files (not subdirectories) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// The `runner` binary, with the HF cache pointed at nothing and offline, so no test can
/// reach the network or a real cache unless it says so.
pub fn runner() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("runner").unwrap();
    cmd.current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "HF_HUB_CACHE",
            root().join("tests").join("no-such-hf-cache"),
        )
        .env_remove("HF_HOME");
    cmd
}

/// A spec in a fresh temp dir, for the tests that run the `runner` CLI on it. In the spec
/// text `@FIXTURES@`, `@GOLDEN@`, `@TINY@` (the tiny GPT-2 with a tokenizer), `@DIR@` (the
/// temp dir) and `@OUT@` (`@DIR@/out`) are filled in.
pub struct SpecCase {
    pub dir: tempfile::TempDir,
    pub spec: PathBuf,
    pub out: PathBuf,
}

impl SpecCase {
    pub fn new(spec: &str) -> SpecCase {
        let dir = tempfile::tempdir().unwrap();
        let case = SpecCase {
            spec: dir.path().join("spec.toml"),
            out: dir.path().join("out"),
            dir,
        };
        case.write(spec);
        case
    }

    /// Rewrites the spec (placeholders filled in).
    pub fn write(&self, spec: &str) {
        let tiny = root().join("experiments/checkpoints/tiny-gpt2");
        let text = spec
            .replace("@FIXTURES@", &fixture("").display().to_string())
            .replace("@GOLDEN@", &golden_path("").display().to_string())
            .replace("@TINY@", &tiny.display().to_string())
            .replace("@OUT@", &self.out.display().to_string())
            .replace("@DIR@", &self.dir.path().display().to_string());
        std::fs::write(&self.spec, text).unwrap();
    }

    /// A path inside the temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `runner run -q SPEC extra...`: (exit code, stdout, stderr).
    pub fn run(&self, extra: &[&str]) -> (Option<i32>, String, String) {
        output3(runner().args(["run", "-q"]).arg(&self.spec).args(extra))
    }

    /// `runner validate SPEC`: (exit code, stderr).
    pub fn validate(&self) -> (Option<i32>, String) {
        let (code, _, stderr) = output3(runner().arg("validate").arg(&self.spec));
        (code, stderr)
    }

    /// Every entry under the temp dir but the spec, recursively (links not followed), sorted.
    pub fn entries(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(root).unwrap().display().to_string());
                if p.is_dir() && !p.is_symlink() {
                    walk(root, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out.retain(|e| e != "spec.toml");
        out.sort();
        out
    }
}

/// Runs a command: (exit code, stdout, stderr).
pub fn output3(cmd: &mut assert_cmd::Command) -> (Option<i32>, String, String) {
    let o = cmd.output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Spreads of the uniform init of a generated checkpoint: each weight is
/// `center + spread * U(-1, 1)` (LayerNorm weights centre on 1, everything else on 0).
/// Chosen per checkpoint so logits are far from uniform and interventions move them far
/// above f32 noise (a GPT-2-style 0.02 init gives near-uniform logits).
#[derive(Clone, Copy, Debug)]
pub struct InitScales {
    pub wte: f32,
    pub wpe: f32,
    pub ln_weight: f32,
    pub ln_bias: f32,
    pub attn_in: f32,
    pub attn_out: f32,
    pub mlp_in: f32,
    pub mlp_out: f32,
    pub bias: f32,
}

/// A checkpoint generated at test time (too large to commit), with the sha256 of its
/// `model.safetensors`. The goldens record that hash, so a changed generator fails as
/// "checkpoint changed", not as a numeric mismatch.
pub struct GeneratedCheckpoint {
    /// Kept alive so the directory outlives the test (None: a directory the user asked for).
    pub _tmp: Option<tempfile::TempDir>,
    pub dir: PathBuf,
    pub sha256: String,
}

/// Writes a GPT-2 checkpoint of shape `cfg` (hub layout: unprefixed keys, tied lm_head,
/// `config.json`) from a ChaCha8 stream seeded with `seed`, tensor by tensor in a fixed order.
///
/// `HOOKGRAPH_GOLDEN_CKPT_DIR=/some/dir` makes it write to `/some/dir/<name>` and keep it:
/// that is how the golden scripts (tests/golden/make_intervention_golden.py,
/// make_cspa_golden.py) get the very same file.
pub fn generated_checkpoint(
    name: &str,
    cfg: &hookgraph::model::ModelConfig,
    seed: u64,
    sc: InitScales,
) -> GeneratedCheckpoint {
    use rand::{Rng, SeedableRng};
    use sha2::{Digest, Sha256};
    let (tmp, dir) = match std::env::var_os("HOOKGRAPH_GOLDEN_CKPT_DIR") {
        Some(d) => (None, PathBuf::from(d).join(name)),
        None => {
            let t = tempfile::tempdir().unwrap();
            let d = t.path().to_path_buf();
            (Some(t), d)
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (d, m, v) = (cfg.d_model, cfg.d_mlp, cfg.d_vocab);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, center: f32, spread: f32| {
        let n: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(4 * n);
        for _ in 0..n {
            let x = center + spread * (rng.gen::<f32>() * 2.0 - 1.0);
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        tensors.push((name, shape, bytes));
    };
    add("wte.weight".into(), vec![v, d], 0.0, sc.wte);
    add("wpe.weight".into(), vec![cfg.n_ctx, d], 0.0, sc.wpe);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        for ln in ["ln_1", "ln_2"] {
            add(p(&format!("{ln}.weight")), vec![d], 1.0, sc.ln_weight);
            add(p(&format!("{ln}.bias")), vec![d], 0.0, sc.ln_bias);
        }
        add(p("attn.c_attn.weight"), vec![d, 3 * d], 0.0, sc.attn_in);
        add(p("attn.c_attn.bias"), vec![3 * d], 0.0, sc.bias);
        add(p("attn.c_proj.weight"), vec![d, d], 0.0, sc.attn_out);
        add(p("attn.c_proj.bias"), vec![d], 0.0, sc.bias);
        add(p("mlp.c_fc.weight"), vec![d, m], 0.0, sc.mlp_in);
        add(p("mlp.c_fc.bias"), vec![m], 0.0, sc.bias);
        add(p("mlp.c_proj.weight"), vec![m, d], 0.0, sc.mlp_out);
        add(p("mlp.c_proj.bias"), vec![d], 0.0, sc.bias);
    }
    add("ln_f.weight".into(), vec![d], 1.0, sc.ln_weight);
    add("ln_f.bias".into(), vec![d], 0.0, sc.ln_bias);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .unwrap();
            (n.clone(), view)
        })
        .collect();
    let st_path = dir.join("model.safetensors");
    safetensors::tensor::serialize_to_file(views, &None, &st_path).unwrap();
    drop(tensors);
    let config = serde_json::json!({
        "model_type": "gpt2", "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_embd": d,
        "n_positions": cfg.n_ctx, "n_ctx": cfg.n_ctx, "vocab_size": v,
        "layer_norm_epsilon": cfg.eps, "activation_function": "gelu_new", "n_inner": m,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.bos_token_id,
        "architectures": ["GPT2LMHeadModel"]
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(&st_path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    GeneratedCheckpoint {
        _tmp: tmp,
        dir,
        sha256: hex::encode(h.finalize()),
    }
}

/// The vocab-50k checkpoint: tiny layers (2 x 4 heads, d_model 64), GPT-2's 50257 tokens.
pub fn vocab50k_checkpoint() -> GeneratedCheckpoint {
    let cfg = hookgraph::model::ModelConfig {
        n_layers: 2,
        n_heads: 4,
        d_model: 64,
        d_head: 16,
        d_mlp: 256,
        d_vocab: 50257,
        n_ctx: 64,
        eps: 1e-5,
        bos_token_id: 50256,
    };
    // wte 0.5: logits (LN output, norm ~8, against rows of std 0.29) have std ~2.3.
    let sc = InitScales {
        wte: 0.5,
        wpe: 0.2,
        ln_weight: 0.2,
        ln_bias: 0.1,
        attn_in: 0.4,
        attn_out: 0.3,
        mlp_in: 0.3,
        mlp_out: 0.15,
        bias: 0.05,
    };
    generated_checkpoint("vocab50k", &cfg, 50_257, sc)
}

/// The GPT-2-small-shaped checkpoint: 12 layers x 12 heads, d_model 768, 50257 tokens, 1024
/// positions (~500 MB, so generated, never committed).
pub fn small_checkpoint() -> GeneratedCheckpoint {
    // wte 0.15: logits have std ~2.4; attn_in 0.08 gives attention scores of std ~1.5, so
    // patterns are far from uniform; attn_out 0.04 makes one head move the residual by
    // roughly as much as the embeddings.
    let sc = InitScales {
        wte: 0.15,
        wpe: 0.05,
        ln_weight: 0.2,
        ln_bias: 0.1,
        attn_in: 0.08,
        attn_out: 0.04,
        mlp_in: 0.06,
        mlp_out: 0.03,
        bias: 0.02,
    };
    generated_checkpoint("small", &hookgraph::bench::SMALL, 124_439_808, sc)
}
