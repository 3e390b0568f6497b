//! Beyond one machine, end to end through the `runner` binary: 3 shards merged equal the
//! unsharded run for every built-in metric, a run killed after k batches and resumed equals
//! the uninterrupted one, and pieces of different runs are refused by name.

use std::path::{Path, PathBuf};

use crate::common::*;
use predicates::prelude::*;

/// A spec on the tiny GPT-2 with every built-in metric (from the registry, so a new
/// built-in is covered without touching this test), two datasets, 2 sequences per batch
/// (ioi: 5 batches, web: 3), written into `dir` with absolute paths.
fn write_spec(dir: &Path, model: &Path, corpus: &Path, extra: &str) -> PathBuf {
    let mut text = format!(
        r#"name = "shards"
output = "{out}"
heads = "all"
[model]
path = "{model}"
device = "cpu"
batch_size = 2
[[dataset]]
name = "ioi"
kind = "ioi"
n = 10
seed = 0
[[dataset]]
name = "web"
kind = "text"
path = "{corpus}"
n = 6
seq_len = 24
short = "pad"
"#,
        out = dir.join("out").display(),
        model = model.display(),
        corpus = corpus.display(),
    );
    for b in hookgraph::metrics::BUILTINS {
        text += &format!("[[metric]]\nkind = \"{}\"\n", b.name);
        // The direct-path metrics average another dataset (the paper takes 100 sequences).
        match b.name {
            "cspa" => text += "heads = [\"1.0\"]\nmean_over = \"web\"\nmean_sequences = 6\n",
            "direct_mean_ablation" => text += "mean_over = \"web\"\nmean_sequences = 6\n",
            _ => {}
        }
    }
    text += extra;
    let path = dir.join("spec.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn tiny() -> PathBuf {
    root().join("experiments/checkpoints/tiny-gpt2")
}

fn corpus() -> PathBuf {
    fixture("corpus").join("web.jsonl")
}

/// `runner run SPEC -q ARGS... --output OUT`, which must succeed.
fn run_ok(spec: &Path, out: &Path, args: &[&str]) {
    runner()
        .arg("run")
        .arg(spec)
        .arg("-q")
        .args(args)
        .arg("--output")
        .arg(out)
        .assert()
        .success();
}

fn csvs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".csv"))
        .collect();
    names.sort();
    names
}

/// Every CSV of `a` equals `b`'s: integers and text exactly, floats within 1e-12 relative
/// (f64 sums merged in another order), NaN equal to NaN.
fn assert_same_results(a: &Path, b: &Path) {
    let names = csvs(a);
    assert!(!names.is_empty(), "no CSVs in {}", a.display());
    assert_eq!(names, csvs(b), "the same tables");
    for name in names {
        let read = |d: &Path| std::fs::read_to_string(d.join(&name)).unwrap();
        let (ta, tb) = (read(a), read(b));
        let (la, lb): (Vec<&str>, Vec<&str>) = (ta.lines().collect(), tb.lines().collect());
        assert_eq!(la.len(), lb.len(), "{name}: row count");
        for (i, (ra, rb)) in la.iter().zip(&lb).enumerate() {
            let (ca, cb): (Vec<&str>, Vec<&str>) =
                (ra.split(',').collect(), rb.split(',').collect());
            assert_eq!(ca.len(), cb.len(), "{name} line {i}");
            for (x, y) in ca.iter().zip(&cb) {
                if x == y {
                    continue;
                }
                let (fx, fy): (f64, f64) = match (x.parse(), y.parse()) {
                    (Ok(fx), Ok(fy)) => (fx, fy),
                    _ => panic!("{name} line {i}: '{x}' vs '{y}'"),
                };
                assert!(
                    x.parse::<i64>().is_err() && y.parse::<i64>().is_err(),
                    "{name} line {i}: counts must be exact: {x} vs {y}"
                );
                let ok = (fx - fy).abs() <= 1e-12 * fx.abs().max(fy.abs());
                assert!(ok, "{name} line {i}: {x} vs {y} (more than 1e-12 relative)");
            }
        }
    }
}

#[test]
fn three_shards_merged_equal_the_unsharded_run_for_every_builtin() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &tiny(), &corpus(), "");
    let whole = dir.path().join("whole");
    run_ok(&spec, &whole, &[]);
    assert!(
        !whole.join(".partial").exists(),
        "a finished run removes its checkpoint"
    );

    let sharded = dir.path().join("sharded");
    for i in 0..3 {
        run_ok(&spec, &sharded, &["--shard", &format!("{i}/3")]);
    }
    // The shards wrote partial state only, no tables.
    assert!(csvs(&sharded).is_empty());
    for i in 0..3 {
        let s = sharded.join(format!("shards/{i}-of-3"));
        assert!(s.join("state.safetensors").is_file() && s.join("shard.json").is_file());
    }
    merge_ok(&sharded);
    assert_same_results(&whole, &sharded);
    // Every built-in wrote at least one table in both.
    for b in hookgraph::metrics::BUILTINS {
        assert!(
            b.tables
                .iter()
                .any(|t| sharded.join(format!("{t}.csv")).is_file()),
            "{} wrote no table",
            b.name
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["merged_shards"], 3);
    assert_eq!(manifest["failures"].as_array().unwrap().len(), 0);

    // Writing the results keeps the shards (a merge can be redone, e.g. after a report
    // change), and merging again gives the same tables.
    for i in 0..3 {
        let s = sharded.join(format!("shards/{i}-of-3/shard.json"));
        assert!(s.is_file(), "{} lost by the merge", s.display());
    }
    merge_ok(&sharded);
    assert_same_results(&whole, &sharded);
}

#[test]
fn a_run_killed_after_k_batches_and_resumed_equals_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &tiny(), &corpus(), "");
    let whole = dir.path().join("whole");
    run_ok(&spec, &whole, &[]);
    // k = 3: inside the first dataset; k = 6: the first dataset done, inside the second.
    for k in [3, 6] {
        let out = dir.path().join(format!("killed{k}"));
        runner()
            .args(["run", "-q", "--output"])
            .arg(&out)
            .arg(&spec)
            .env("HOOKGRAPH_TEST_ABORT_AFTER_BATCHES", k.to_string())
            .assert()
            .failure();
        assert!(csvs(&out).is_empty(), "a killed run wrote no tables");
        assert!(out.join(".partial/state.safetensors").is_file());
        run_ok(&spec, &out, &["--resume"]);
        assert_same_results(&whole, &out);
        assert!(!out.join(".partial").exists());
    }

    // A shard killed and resumed (a requeued Slurm task) merges as if it had not been.
    let sharded = dir.path().join("sharded");
    for i in [0, 2] {
        run_ok(&spec, &sharded, &["--shard", &format!("{i}/3")]);
    }
    runner()
        .args(["run", "-q", "--shard", "1/3", "--resume", "--output"])
        .arg(&sharded)
        .arg(&spec)
        .env("HOOKGRAPH_TEST_ABORT_AFTER_BATCHES", "1")
        .assert()
        .failure();
    // Not mergeable while a shard is incomplete, and the error says what to do.
    runner()
        .args(["merge", "-q"])
        .arg(&sharded)
        .assert()
        .failure()
        .stderr(
            predicates::str::contains("shard 1-of-3 is not complete")
                .and(predicates::str::contains("--resume")),
        );
    run_ok(&spec, &sharded, &["--shard", "1/3", "--resume"]);
    merge_ok(&sharded);
    assert_same_results(&whole, &sharded);
}

/// Runs shard 0 of 2 with `spec0` and shard 1 with `spec1` (after `between`) into one
/// directory, then merges; returns the merge's stderr, which must be a refusal.
fn merge_refusal(spec0: &Path, spec1: &Path, out: &Path, between: impl FnOnce()) -> String {
    run_ok(spec0, out, &["--shard", "0/2"]);
    between();
    run_ok(spec1, out, &["--shard", "1/2"]);
    let assert = runner().args(["merge", "-q"]).arg(out).assert().failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(
        stderr.contains("refusing to merge shards of different runs"),
        "{stderr}"
    );
    assert!(csvs(out).is_empty(), "a refused merge writes nothing");
    stderr
}

#[test]
fn merging_shards_of_different_specs_weights_or_datasets_is_refused_naming_what_differs() {
    // Specs: the same file, edited between the two shards.
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &tiny(), &corpus(), "");
    let text = std::fs::read_to_string(&spec).unwrap();
    let err = merge_refusal(&spec, &spec, &dir.path().join("o1"), || {
        std::fs::write(&spec, text.replace("seed = 0", "seed = 1")).unwrap()
    });
    assert!(err.contains("spec:"), "{err}");
    // The edit changed the ioi dataset too, and the message says so.
    assert!(err.contains("dataset 'ioi'"), "{err}");

    // Weights: one byte of the checkpoint changed between the shards.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&tiny(), &model);
    let spec = write_spec(dir.path(), &model, &corpus(), "");
    let err = merge_refusal(&spec, &spec, &dir.path().join("o2"), || {
        let w = model.join("model.safetensors");
        let mut bytes = std::fs::read(&w).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 1;
        std::fs::write(&w, bytes).unwrap();
    });
    assert!(err.contains("model weights: sha256"), "{err}");
    assert!(!err.contains("spec:"), "only the weights differ: {err}");

    // Datasets: the corpus file changed between the shards.
    let dir = tempfile::tempdir().unwrap();
    let corpus_copy = dir.path().join("web.jsonl");
    std::fs::copy(corpus(), &corpus_copy).unwrap();
    let spec = write_spec(dir.path(), &tiny(), &corpus_copy, "");
    let err = merge_refusal(&spec, &spec, &dir.path().join("o3"), || {
        let t = std::fs::read_to_string(&corpus_copy).unwrap();
        std::fs::write(&corpus_copy, t.replacen("the", "a", 3)).unwrap();
    });
    assert!(err.contains("dataset 'web'"), "{err}");
    assert!(
        !err.contains("spec:") && !err.contains("weights"),
        "only the dataset differs: {err}"
    );
}

#[test]
fn resuming_another_runs_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &tiny(), &corpus(), "");
    let out = dir.path().join("out");
    runner()
        .args(["run", "-q", "--output"])
        .arg(&out)
        .arg(&spec)
        .env("HOOKGRAPH_TEST_ABORT_AFTER_BATCHES", "2")
        .assert()
        .failure();
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("batch_size = 2", "batch_size = 3")).unwrap();
    runner()
        .args(["run", "-q", "--resume", "--output"])
        .arg(&out)
        .arg(&spec)
        .assert()
        .failure()
        .stderr(
            predicates::str::contains("is not this run's").and(predicates::str::contains("spec:")),
        );
}

#[test]
fn a_plugin_without_partial_state_is_refused_by_name_when_sharding() {
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin_spec(dir.path(), "hg_source_suppression");
    for args in [&["--shard", "0/2"][..], &["--resume"][..]] {
        runner()
            .args(["run", "-q"])
            .arg(&spec)
            .args(args)
            .assert()
            .failure()
            .stderr(
                predicates::str::contains("plugin 'hg_source_suppression'")
                    .and(predicates::str::contains("cannot be sharded or resumed"))
                    .and(predicates::str::contains("PARTIAL_STATE")),
            );
    }
    // Without --shard or --resume the run works as before (it just keeps no checkpoint).
    let out = dir.path().join("plain");
    run_ok(&spec, &out, &[]);
    assert!(out.join("plugin_source_suppression.csv").is_file());
}

/// `runner merge` of `out`, which must succeed.
fn merge_ok(out: &Path) {
    runner().args(["merge", "-q"]).arg(out).assert().success();
}

/// Runs `spec` as `n` shards into `sharded`, merges them, and checks the merge equals the
/// uninterrupted run in `whole`.
fn shards_merged_equal(spec: &Path, sharded: &Path, n: usize, whole: &Path) {
    for i in 0..n {
        run_ok(spec, sharded, &["--shard", &format!("{i}/{n}")]);
    }
    merge_ok(sharded);
    assert_same_results(whole, sharded);
}

/// Runs `spec` as three shards merged, and killed after 4 batches then resumed, into
/// directories under `dir`; both must equal the uninterrupted run in `whole`.
fn sharded_and_resumed_equal(dir: &Path, spec: &Path, whole: &Path) {
    let sharded = dir.join("sharded");
    shards_merged_equal(spec, &sharded, 3, whole);

    let killed = dir.join("killed");
    runner()
        .args(["run", "-q", "--output"])
        .arg(&killed)
        .arg(spec)
        .env("HOOKGRAPH_TEST_ABORT_AFTER_BATCHES", "4")
        .assert()
        .failure();
    run_ok(spec, &killed, &["--resume"]);
    assert_same_results(whole, &killed);
}

#[test]
fn a_plugin_with_partial_state_shards_and_resumes_like_a_builtin() {
    // hg_attention_entropy implements ABI version 2's save_state / merge_state.
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin_spec(dir.path(), "hg_attention_entropy");
    let whole = dir.path().join("whole");
    run_ok(&spec, &whole, &[]);
    assert!(whole.join("attention_entropy.csv").is_file());
    sharded_and_resumed_equal(dir.path(), &spec, &whole);
}

#[test]
fn rows_a_plugin_emits_per_batch_shard_and_resume_exactly() {
    // hg_direct_logit_attribution emits its per-position and per-sequence rows in `batch`
    // (ABI version 3): the host keeps them in the plugin's partial state.
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin_spec(dir.path(), "hg_direct_logit_attribution");
    let whole = dir.path().join("whole");
    run_ok(&spec, &whole, &[]);
    let rows = std::fs::read_to_string(whole.join("plugin_dla_per_position.csv")).unwrap();
    let builtin =
        std::fs::read_to_string(whole.join("direct_logit_attribution_per_position.csv")).unwrap();
    assert_eq!(
        rows.lines().count(),
        builtin.lines().count(),
        "one row per position"
    );
    sharded_and_resumed_equal(dir.path(), &spec, &whole);
}

#[test]
fn a_plugin_built_for_abi_version_1_still_runs_and_is_refused_by_name_when_sharding() {
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin_spec(dir.path(), "hg_test_abi_v1");
    runner()
        .args(["run", "-q", "--shard", "1/2"])
        .arg(&spec)
        .assert()
        .failure()
        .stderr(
            predicates::str::contains("plugin 'hg_test_abi_v1'")
                .and(predicates::str::contains("plugin ABI version 1")),
        );
    let out = dir.path().join("plain");
    run_ok(&spec, &out, &[]);
    let t = std::fs::read_to_string(out.join("abi_v1_count.csv")).unwrap();
    // 2 layers x 4 heads, per dataset; every head saw all 10 ioi sequences.
    assert!(t.contains("ioi,1,3,10"), "{t}");
}

#[test]
fn a_plugin_built_for_abi_version_2_still_shards() {
    // Version 3 only appended to the host's call context: a version-2 plugin with partial
    // state loads, shards and merges as before.
    let dir = tempfile::tempdir().unwrap();
    let spec = plugin_spec(dir.path(), "hg_test_abi_v2");
    let whole = dir.path().join("whole");
    run_ok(&spec, &whole, &[]);
    let t = std::fs::read_to_string(whole.join("abi_v2_count.csv")).unwrap();
    assert!(t.contains("ioi,1,3,10"), "{t}");
    let sharded = dir.path().join("sharded");
    shards_merged_equal(&spec, &sharded, 2, &whole);
}

/// A spec in `dir` running the example or test plugin `name` alone on the tiny checkpoint.
fn plugin_spec(dir: &Path, name: &str) -> PathBuf {
    let lib = crate::plugins::library(name);
    write_spec(
        dir,
        &tiny(),
        &corpus(),
        &format!("[[metric]]\nplugin = \"{}\"\n", lib.display()),
    )
}

/// Intervention tables: 3 shards merged equal the unsharded run, and so does another
/// batch size (every sequence's scores are kept apart and pooled in sequence order).
#[test]
fn intervention_tables_merge_across_shards_and_ignore_the_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let spec_text = |batch: usize| {
        format!(
            r#"name = "iv"
heads = "all"
[model]
path = "{model}"
device = "cpu"
batch_size = {batch}
[[dataset]]
name = "web"
kind = "text"
path = "{corpus}"
n = 6
seq_len = 12
short = "drop"
[[dataset]]
name = "web2"
kind = "text"
path = "{corpus}"
n = 6
seq_len = 12
short = "drop"
shuffle = true
seed = 5
[[intervention]]
kind = "ablate"
value = "mean"
hook = "z"
[[intervention]]
kind = "patch"
hook = "resid_pre"
dataset = "web"
source = "web2"
per_position = true
"#,
            model = tiny().display(),
            corpus = corpus().display(),
        )
    };
    let write = |name: &str, batch: usize| {
        let p = dir.path().join(name);
        std::fs::write(&p, spec_text(batch)).unwrap();
        p
    };
    let spec = write("iv.toml", 2);
    let whole = dir.path().join("whole");
    run_ok(&spec, &whole, &[]);
    let sharded = dir.path().join("sharded");
    shards_merged_equal(&spec, &sharded, 3, &whole);
    let other = dir.path().join("batch5");
    run_ok(&write("iv5.toml", 5), &other, &[]);
    assert_same_results(&whole, &other);
}
