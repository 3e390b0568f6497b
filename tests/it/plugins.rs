//! Metric plugins through `hookgraph::plugin`: the example plugins are built with cargo from
//! the test (same profile and target directory as the test itself), loaded with
//! `load_metric`, and run as a `Metric` on a real forward pass of `ckpt_a` over
//! `tokens_a.json`. The source-suppression plugin must reproduce TransformerLens's golden
//! scores; each deliberately broken plugin (`tests/plugins/*`) must fail with an
//! `Error::Plugin` naming the plugin and the cause.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::data::{unpadded_lengths, Dataset};
use hookgraph::metrics::{Metric, RunContext};
use hookgraph::model::{self, CheckpointFiles, Processing};
use hookgraph::output::Table;
use hookgraph::plugin::{discover_in, load_metric};
use hookgraph::Error;

/// Every plugin package the tests load.
const PACKAGES: &[&str] = &[
    "hg_source_suppression",
    "hg_attention_entropy",
    "hg_direct_logit_attribution",
    "hg_test_bad_magic",
    "hg_test_bad_abi",
    "hg_test_no_descriptor",
    "hg_test_panics",
    "hg_test_errors",
    "hg_test_abi_v1",
    "hg_test_abi_v2",
];

/// Builds every plugin once (one cargo invocation for all tests) and returns the directory
/// the libraries land in: `<target>/<profile>`, where this test executable's `deps/` is.
fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("<target>").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .current_dir(root())
            .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        for p in PACKAGES {
            cmd.args(["-p", p]);
        }
        let out = cmd.output().expect("run cargo");
        assert!(
            out.status.success(),
            "building the plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir
    })
}

/// The path of a built plugin library.
pub(crate) fn library(package: &str) -> PathBuf {
    plugin_dir().join(libloading::library_filename(package))
}

fn load(package: &str, options: &str) -> hookgraph::Result<Box<dyn Metric>> {
    let options: toml::Table = toml::from_str(options).unwrap();
    load_metric(library(package).to_str().unwrap(), Path::new("."), &options)
}

/// Runs `metric` over `tokens_a.json` on `ckpt_a` (processed as TransformerLens does), every
/// head selected, `batch_size` sequences per forward pass, as the runner would: one pass per
/// batch caching exactly the hooks the metric declares.
fn run(metric: &mut dyn Metric, batch_size: usize) -> hookgraph::Result<Vec<Table>> {
    let files = CheckpointFiles::in_dir(&fixture("ckpt_a")).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let cfg = loaded.cfg();
    let heads: Vec<(usize, usize)> = (0..cfg.n_layers)
        .flat_map(|l| (0..cfg.n_heads).map(move |h| (l, h)))
        .collect();
    let ctx = RunContext {
        cfg,
        params: &loaded.params,
        heads: &heads,
        bos: cfg.bos_token_id,
        tokenizer: None,
    };
    let tokens = load_tokens(&golden_path("tokens_a.json"));
    let dataset = Dataset {
        name: "tokens_a".into(),
        lengths: unpadded_lengths(&tokens, cfg.bos_token_id),
        tokens,
        ioi: None,
        answers: None,
    };
    hookgraph::engine::run_metric(&loaded.model, &ctx, metric, &dataset, batch_size)
}

/// A per-head table's `column` as an `[n_layers, n_heads]` array.
fn per_head(table: &Table, column: &str, n_layers: usize, n_heads: usize) -> ndarray::ArrayD<f32> {
    let (l, h, c) = (
        table.col("layer").unwrap(),
        table.col("head").unwrap(),
        table.col(column).unwrap(),
    );
    let mut out = ndarray::ArrayD::from_elem(vec![n_layers, n_heads], f32::NAN);
    assert_eq!(table.rows.len(), n_layers * n_heads, "one row per head");
    for row in &table.rows {
        let idx = [
            row[l].as_f64().unwrap() as usize,
            row[h].as_f64().unwrap() as usize,
        ];
        out[&idx[..]] = row[c].as_f64().unwrap() as f32;
    }
    out
}

fn table<'a>(tables: &'a [Table], name: &str) -> &'a Table {
    tables
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no table {name}"))
}

/// The error's plugin name and message, or a panic if it is not `Error::Plugin`.
fn plugin_error(e: Error) -> (String, String) {
    match e {
        Error::Plugin { plugin, msg } => (plugin, msg),
        other => panic!("expected Error::Plugin, got {other:?}"),
    }
}

#[test]
fn source_suppression_plugin_matches_transformer_lens() {
    let gold = load_golden("a_metrics.safetensors");
    for only_negative in [false, true] {
        let mut m = load(
            "hg_source_suppression",
            &format!("only_negative = {only_negative}"),
        )
        .unwrap();
        assert_eq!(m.name(), "hg_source_suppression");
        // Batches of 2 over 3 sequences: the last batch is short, and the score must still be
        // the mean over sequences.
        let tables = run(m.as_mut(), 2).unwrap();
        let t = table(&tables, "plugin_source_suppression");
        assert_eq!(t.head_score.as_deref(), Some("score"));
        let key = format!("source_suppression.only_negative={}", only_negative as u8);
        let want = &gold[&format!("{key}.score")];
        let got = per_head(t, "score", want.shape()[0], want.shape()[1]);
        assert_close(&format!("{key}.score"), &got, want, RTOL, ATOL);

        // Per-sequence values too.
        let t = table(&tables, "plugin_source_suppression_per_sequence");
        let want = &gold[&format!("{key}.per_sequence")];
        assert_eq!(t.rows.len(), want.len());
        for row in &t.rows {
            let idx: Vec<usize> = row[..3]
                .iter()
                .map(|v| v.as_f64().unwrap() as usize)
                .collect();
            let (got, want) = (row[3].as_f64().unwrap() as f32, want[&idx[..]]);
            assert!(
                (got - want).abs() <= ATOL + RTOL * want.abs(),
                "{key}.per_sequence{idx:?}: plugin {got}, TransformerLens {want}"
            );
        }
    }
}

#[test]
fn plugin_results_do_not_depend_on_batch_size() {
    let mut one = load("hg_source_suppression", "").unwrap();
    let mut all = load("hg_source_suppression", "").unwrap();
    let a = run(one.as_mut(), 1).unwrap();
    let b = run(all.as_mut(), 3).unwrap();
    let (a, b) = (
        per_head(table(&a, "plugin_source_suppression"), "score", 2, 4),
        per_head(table(&b, "plugin_source_suppression"), "score", 2, 4),
    );
    assert_close("batch 1 vs 3", &a, &b, 1e-6, 1e-7);
}

#[test]
fn attention_entropy_plugin_matches_a_direct_computation() {
    for mask_bos in [true, false] {
        let mut m = load("hg_attention_entropy", &format!("mask_bos = {mask_bos}")).unwrap();
        let tables = run(m.as_mut(), 2).unwrap();
        let t = table(&tables, "attention_entropy");
        assert_eq!(t.columns, ["layer", "head", "entropy"]);
        assert_eq!(t.head_score.as_deref(), Some("entropy"));
        let got = per_head(t, "entropy", 2, 4);

        // The same definition, straight from the golden patterns.
        let gold = load_golden("a_processed.safetensors");
        let toks = load_tokens(&golden_path("tokens_a.json"));
        let lengths = unpadded_lengths(&toks, 511);
        let mut want = ndarray::ArrayD::<f32>::zeros(vec![2, 4]);
        for l in 0..2 {
            let p = &gold[&format!("blocks.{l}.attn.hook_pattern")];
            for h in 0..4 {
                let mut per_seq = Vec::new();
                for (b, &len) in lengths.iter().enumerate() {
                    let ents: Vec<f64> = (0..len)
                        .filter(|&q| !(mask_bos && toks[[b, q]] == 511))
                        .map(|q| {
                            (0..=q)
                                .map(|k| p[[b, h, q, k]] as f64)
                                .filter(|&x| x > 0.0)
                                .map(|x| -x * x.ln())
                                .sum()
                        })
                        .collect();
                    if !ents.is_empty() {
                        per_seq.push(ents.iter().sum::<f64>() / ents.len() as f64);
                    }
                }
                want[[l, h]] = (per_seq.iter().sum::<f64>() / per_seq.len() as f64) as f32;
            }
        }
        assert_close(
            &format!("attention_entropy mask_bos={mask_bos}"),
            &got,
            &want,
            RTOL,
            ATOL,
        );
        assert!(got.iter().all(|&e| e >= 0.0 && e <= (12f32).ln()));
    }
}

#[test]
fn hooks_expand_only_for_layers_with_selected_heads() {
    let m = load("hg_source_suppression", "").unwrap();
    let files = CheckpointFiles::in_dir(&fixture("ckpt_a")).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let heads = [(1, 2), (1, 3)];
    let ctx = RunContext {
        cfg: loaded.cfg(),
        params: &loaded.params,
        heads: &heads,
        bos: 511,
        tokenizer: None,
    };
    assert_eq!(
        m.hooks(&ctx),
        [
            "blocks.1.attn.hook_v",
            "blocks.1.attn.hook_pattern",
            "ln_final.hook_scale"
        ]
    );
}

#[test]
fn unknown_and_ill_typed_options_are_rejected() {
    let (plugin, msg) = plugin_error(
        load("hg_attention_entropy", "mask_boss = true")
            .err()
            .unwrap(),
    );
    assert_eq!(plugin, "hg_attention_entropy");
    assert!(
        msg.contains("unknown option 'mask_boss'") && msg.contains("mask_bos"),
        "{msg}"
    );
    let (_, msg) = plugin_error(load("hg_attention_entropy", "mask_bos = 3").err().unwrap());
    // The declared type ("bool, ...") is checked by the host, as a built-in's is, before
    // the plugin's `create` sees the value.
    assert!(
        msg.contains("option 'mask_bos' must be a bool, not 3") && !msg.contains("create"),
        "{msg}"
    );
}

#[test]
fn a_missing_library_is_a_plugin_error() {
    let (plugin, msg) = plugin_error(
        load_metric(
            "no/such/libplugin.so",
            Path::new("/tmp"),
            &toml::Table::new(),
        )
        .err()
        .unwrap(),
    );
    assert_eq!(plugin, "no/such/libplugin.so");
    assert!(msg.contains("/tmp/no/such/libplugin.so"), "{msg}");
    let (plugin, msg) = plugin_error(
        load_metric("hg_no_such_plugin", Path::new("."), &toml::Table::new())
            .err()
            .unwrap(),
    );
    assert_eq!(plugin, "hg_no_such_plugin");
    assert!(msg.contains("search path"), "{msg}");
}

#[test]
fn wrong_magic_is_rejected() {
    let (plugin, msg) = plugin_error(load("hg_test_bad_magic", "").err().unwrap());
    assert!(plugin.contains("hg_test_bad_magic"), "{plugin}");
    assert!(msg.contains("wrong magic number"), "{msg}");
}

#[test]
fn an_older_abi_version_is_rejected_naming_both_versions() {
    let (plugin, msg) = plugin_error(load("hg_test_bad_abi", "").err().unwrap());
    assert!(plugin.contains("hg_test_bad_abi"), "{plugin}");
    let (theirs, ours) = (
        hookgraph_plugin::abi::HG_PLUGIN_ABI_MIN_VERSION - 1,
        hookgraph_plugin::abi::HG_PLUGIN_ABI_VERSION,
    );
    assert!(
        msg.contains(&format!(
            "ABI version {theirs} vs this runner's version {ours}"
        )) && msg.contains("older"),
        "{msg}"
    );
}

#[test]
fn a_library_without_the_descriptor_is_rejected() {
    let (plugin, msg) = plugin_error(load("hg_test_no_descriptor", "").err().unwrap());
    assert!(plugin.contains("hg_test_no_descriptor"), "{plugin}");
    assert!(
        msg.contains("not a hookgraph plugin") && msg.contains("hookgraph_plugin_descriptor"),
        "{msg}"
    );
}

#[test]
fn a_panic_in_batch_is_reported_with_its_message_and_not_called_again() {
    let mut m = load("hg_test_panics", "").unwrap();
    let (plugin, msg) = plugin_error(run(m.as_mut(), 3).unwrap_err());
    assert_eq!(plugin, "hg_test_panics");
    assert!(
        msg.contains("batch") && msg.contains("panicked: deliberate panic in batch (test plugin)"),
        "{msg}"
    );
    // Poisoned: later calls fail without entering the plugin.
    let (_, msg) = plugin_error(run(m.as_mut(), 3).unwrap_err());
    assert!(msg.contains("not called again"), "{msg}");
}

#[test]
fn an_error_from_batch_is_reported_with_its_text() {
    let mut m = load("hg_test_errors", "").unwrap();
    let (plugin, msg) = plugin_error(run(m.as_mut(), 3).unwrap_err());
    assert_eq!(plugin, "hg_test_errors");
    assert!(
        msg.contains("batch (dataset 'tokens_a', sequences 0..3) failed: deliberate error from batch (test plugin)"),
        "{msg}"
    );
}

#[test]
fn discovery_lists_plugins_and_skips_other_libraries() {
    let found = discover_in(&[plugin_dir().to_path_buf()]);
    let ok: Vec<_> = found.iter().filter_map(|r| r.as_ref().ok()).collect();
    let names: Vec<&str> = ok.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "hg_source_suppression",
        "hg_attention_entropy",
        "hg_test_panics",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    let entropy = ok
        .iter()
        .find(|p| p.name == "hg_attention_entropy")
        .unwrap();
    assert_eq!(entropy.hooks, ["blocks.{layer}.attn.hook_pattern"]);
    assert_eq!(entropy.tables, ["attention_entropy"]);
    assert_eq!(entropy.options[0].0, "mask_bos");
    assert!(!entropy.description.is_empty() && !entropy.version.is_empty());
    // The broken ones are reported, not listed; a library without the symbol is skipped.
    let errors: Vec<String> = found
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("hg_test_bad_magic")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("hg_test_bad_abi")),
        "{errors:?}"
    );
    assert!(
        !errors.iter().any(|e| e.contains("no_descriptor")),
        "{errors:?}"
    );
}

#[test]
fn a_bare_name_is_found_next_to_the_executable() {
    // The search path includes the cargo target directory this test runs from.
    plugin_dir();
    let m = load_metric("hg_attention_entropy", Path::new("."), &toml::Table::new()).unwrap();
    assert_eq!(m.name(), "hg_attention_entropy");
    // Package names with `-` find the `_` library too.
    let m = load_metric("hg-attention-entropy", Path::new("."), &toml::Table::new()).unwrap();
    assert_eq!(m.name(), "hg_attention_entropy");
}

// ---------------------------------------------------------------------------------------
// End to end through the `runner` binary.
// ---------------------------------------------------------------------------------------

/// Writes a spec running on `ckpt_a` over `tokens_a.json` with the given `[[metric]]`
/// tables; returns (spec path, output dir) inside `dir`.
fn e2e_spec(dir: &Path, metrics: &str) -> (PathBuf, PathBuf) {
    let spec = format!(
        r#"
name = "plugin_e2e"
[model]
path = {model:?}
batch_size = 2

[[dataset]]
name = "a"
kind = "tokens"
path = {tokens:?}

{metrics}
"#,
        model = fixture("ckpt_a"),
        tokens = golden_path("tokens_a.json"),
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    (path, dir.join("out"))
}

/// A CSV's rows as maps from column name to text.
/// `runner run --quiet --output OUT SPEC`, as a user would run it.
fn run_e2e(spec: &Path, out: &Path) -> std::process::Output {
    runner()
        .args(["run", "--quiet", "--output"])
        .arg(out)
        .arg(spec)
        .output()
        .unwrap()
}

fn read_csv(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    r.records()
        .map(|rec| {
            header
                .iter()
                .cloned()
                .zip(rec.unwrap().iter().map(str::to_string))
                .collect()
        })
        .collect()
}

/// Per-head `column` by (layer, head).
fn scores(path: &Path, column: &str) -> std::collections::BTreeMap<(u32, u32), f64> {
    read_csv(path)
        .into_iter()
        .map(|r| {
            (
                (r["layer"].parse().unwrap(), r["head"].parse().unwrap()),
                r[column].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn runner_plugin_score_equals_the_builtin() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = library("hg_source_suppression");
    let (spec, out) = e2e_spec(
        tmp.path(),
        &format!("[[metric]]\nkind = \"source_suppression\"\n\n[[metric]]\nplugin = {plugin:?}\n"),
    );
    let result = run_e2e(&spec, &out);
    assert!(
        result.status.success(),
        "runner failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let builtin = scores(&out.join("source_suppression.csv"), "score");
    let plugin = scores(&out.join("plugin_source_suppression.csv"), "score");
    assert_eq!(builtin.len(), 8, "2 layers x 4 heads");
    assert_eq!(
        builtin.keys().collect::<Vec<_>>(),
        plugin.keys().collect::<Vec<_>>()
    );
    for (head, &b) in &builtin {
        let p = plugin[head];
        assert!(
            (p - b).abs() <= 1e-6 * b.abs().max(1.0),
            "head {head:?}: plugin {p}, built-in {b}"
        );
    }
}

#[test]
fn runner_keeps_other_results_when_a_plugin_fails() {
    for (package, cause) in [
        (
            "hg_test_panics",
            "panicked: deliberate panic in batch (test plugin)",
        ),
        (
            "hg_test_errors",
            "failed: deliberate error from batch (test plugin)",
        ),
        ("hg_test_bad_abi", "ABI version"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let plugin = library(package);
        let (spec, out) = e2e_spec(
            tmp.path(),
            &format!("[[metric]]\nkind = \"loss\"\n\n[[metric]]\nplugin = {plugin:?}\n"),
        );
        let result = run_e2e(&spec, &out);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(3), "{package}: {stderr}");
        assert!(
            stderr.contains(package) && stderr.contains(cause),
            "{package}: stderr should name the plugin and '{cause}':\n{stderr}"
        );
        let loss = read_csv(&out.join("loss.csv"));
        assert!(!loss.is_empty(), "{package}: loss.csv is empty");
    }
}

// ---- ABI version 3: token text, rows per batch, answers, contractions; the harness ----

use hookgraph::output::Value;
use hookgraph::plugin::testing::Harness;

/// Three texts (batches of 2 leave a short last batch) with answers, on the tiny GPT-2.
fn dla_harness(batch_size: usize) -> Harness {
    Harness::tiny()
        .unwrap()
        .texts(&[
            "When Mary and John went to the store, John gave a drink to",
            "The quick brown fox jumps over the lazy dog",
            "Hello",
        ])
        .unwrap()
        .answers(vec![[5335, 1757], [3290, 2068], [11, 13]])
        .batch_size(batch_size)
}

/// `t`'s rows by the values of its `key` columns (as text), in the table's order.
fn keyed(t: &Table, key: &[&str]) -> Vec<(Vec<String>, Vec<Value>)> {
    let k: Vec<usize> = key.iter().map(|c| t.col(c).unwrap()).collect();
    t.rows
        .iter()
        .map(|r| {
            let kv = k.iter().map(|&i| r[i].to_string()).collect();
            let rest = (0..r.len())
                .filter(|i| !k.contains(i))
                .map(|i| r[i].clone())
                .collect();
            (kv, rest)
        })
        .collect()
}

/// Equal cells: text and integers exactly, floats within `rtol` (and 1e-6 absolute), NaN
/// equal to NaN.
fn assert_same_cells(what: &str, a: &[Value], b: &[Value], rtol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: cells");
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (Value::Float(fx), Value::Float(fy)) => assert!(
                (fx.is_nan() && fy.is_nan()) || (fx - fy).abs() <= 1e-6 + rtol * fy.abs(),
                "{what}: {fx} vs {fy}"
            ),
            _ => assert_eq!(x, y, "{what}"),
        }
    }
}

/// Plugin table `ours` holds exactly the rows of built-in table `theirs` (any order), keyed
/// by `key`, with the same columns.
fn assert_same_table(ours: &Table, theirs: &Table, key: &[&str]) {
    assert_eq!(ours.columns, theirs.columns, "{} columns", ours.name);
    let mut a = keyed(ours, key);
    let mut b = keyed(theirs, key);
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(a.len(), b.len(), "{}: rows", ours.name);
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb, "{}: keys", ours.name);
        assert_same_cells(&format!("{} {ka:?}", ours.name), va, vb, 1e-4);
    }
}

#[test]
fn dla_plugin_equals_the_builtin_direct_logit_attribution() {
    let h = dla_harness(2);
    let ours = h
        .run_plugin(library("hg_direct_logit_attribution"), "")
        .unwrap();
    let theirs = h.run_builtin("direct_logit_attribution", "").unwrap();
    for (o, t, key) in [
        (
            "plugin_dla",
            "direct_logit_attribution",
            &["layer", "head"][..],
        ),
        (
            "plugin_dla_per_sequence",
            "direct_logit_attribution_per_sequence",
            &["layer", "head", "seq"],
        ),
        (
            "plugin_dla_per_position",
            "direct_logit_attribution_per_position",
            &["layer", "head", "seq", "pos"],
        ),
    ] {
        assert_same_table(ours.get(o).unwrap(), theirs.get(t).unwrap(), key);
    }
    let summary = ours.get("plugin_dla").unwrap();
    assert_eq!(summary.head_score.as_deref(), Some("dla"));
    // The logit differences are real numbers (the answers reached the plugin) ...
    let ld = summary.col("logit_diff").unwrap();
    assert!(summary
        .rows
        .iter()
        .all(|r| r[ld].as_f64().unwrap().is_finite()));
    // ... and the token column is the tokenizer's text, not empty: ` quick` follows `The`.
    let pp = ours.get("plugin_dla_per_position").unwrap();
    let tok = pp.col("token").unwrap();
    assert!(
        pp.rows
            .iter()
            .any(|r| r[tok] == Value::Str(" quick".into())),
        "no ' quick' token"
    );
    // Rows were emitted in `batch`: every position of every head and sequence is there,
    // across the short last batch too.
    let lens: usize = h.dataset().lengths.iter().sum();
    assert_eq!(pp.rows.len(), lens * 8);
}

#[test]
fn rows_emitted_per_batch_do_not_depend_on_the_batch_size() {
    let lib = library("hg_direct_logit_attribution");
    let a = dla_harness(1).run_plugin(&lib, "").unwrap();
    let b = dla_harness(3).run_plugin(&lib, "").unwrap();
    for name in ["plugin_dla_per_position", "plugin_dla_per_sequence"] {
        let (ta, tb) = (a.get(name).unwrap(), b.get(name).unwrap());
        let key = ["layer", "head", "seq"];
        let (ka, kb) = (keyed(ta, &key), keyed(tb, &key));
        assert_eq!(ka.len(), kb.len(), "{name}");
        // The same order too: sequence by sequence, whatever the batches.
        for ((xa, va), (xb, vb)) in ka.iter().zip(&kb) {
            assert_eq!(xa, xb, "{name}");
            assert_same_cells(name, va, vb, 1e-5);
        }
    }
}

#[test]
fn the_harness_runs_the_example_plugins_in_a_few_lines() {
    let h = Harness::tiny().unwrap();
    let t = h
        .run_plugin(library("hg_attention_entropy"), "mask_bos = false")
        .unwrap();
    let e = t.get("attention_entropy").unwrap();
    assert_eq!(e.rows.len(), 2 * 4);
    assert!(e.rows.iter().all(|r| r[2].as_f64().unwrap() >= 0.0));
    let s = h.run_plugin(library("hg_source_suppression"), "").unwrap();
    assert!(s.get("plugin_source_suppression").is_ok());
    assert!(s.get("no_such_table").is_err());
}

#[test]
fn a_plugin_per_position_table_gets_a_view() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = library("hg_direct_logit_attribution");
    let (spec, out) = e2e_spec(
        tmp.path(),
        &format!(
            "[[metric]]\nplugin = {plugin:?}\n\n[[view]]\nmetric = \"hg_direct_logit_attribution\"\nheads = [\"0.1\", \"1.2\"]\n"
        ),
    );
    let result = run_e2e(&spec, &out);
    assert!(
        result.status.success(),
        "runner failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    // The view reads the plugin's declared per-position table, as a built-in's.
    let svg = std::fs::read_to_string(out.join("view_plugin_dla_a.svg")).unwrap();
    assert!(svg.contains("<svg"), "not an SVG");
}

#[test]
fn a_view_of_a_plugin_without_a_per_position_table_is_a_located_error_before_compute() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = library("hg_attention_entropy");
    let (spec, out) = e2e_spec(
        tmp.path(),
        &format!(
            "[[metric]]\nplugin = {plugin:?}\n\n[[view]]\nmetric = \"hg_attention_entropy\"\nheads = [\"0.1\"]\n"
        ),
    );
    let result = run_e2e(&spec, &out);
    assert!(
        !result.status.success(),
        "a view with nothing to show must fail"
    );
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains("declares no per-position table"), "{err}");
    // file:line:col of the [[metric]]'s `plugin` key (line 14 of e2e_spec's text).
    let at = format!("{}:", spec.display());
    let rest = &err[err.find(&at).unwrap_or_else(|| panic!("no {at} in {err}")) + at.len()..];
    let mut parts = rest.splitn(3, ':');
    let (line, col) = (parts.next().unwrap(), parts.next().unwrap());
    assert!(
        line.parse::<usize>().is_ok() && col.parse::<usize>().is_ok(),
        "{err}"
    );
    assert!(
        !out.join("attention_entropy.csv").exists(),
        "nothing was computed"
    );
}
