//! `runner` end to end: a spec in, CSVs and a manifest out, numbers equal to the notebook's
//! (TransformerLens goldens), and every kind of bad input a clear error that writes nothing.

use std::path::{Path, PathBuf};

use crate::common::*;

/// Writes `spec` into a temp dir whose paths point at the repo's fixtures; returns
/// (dir, spec path, output dir).
fn spec_in_tempdir(spec: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let text = spec
        .replace(
            "@FIXTURES@",
            &root().join("tests/fixtures").display().to_string(),
        )
        .replace(
            "@GOLDEN@",
            &root().join("tests/golden").display().to_string(),
        )
        .replace("@OUT@", &out.display().to_string());
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path, out)
}

const TOKENS_SPEC: &str = r#"
name = "parity"
output = "@OUT@"
heads = "all"
[model]
path = "@FIXTURES@/ckpt_a"
batch_size = 2
[[dataset]]
name = "tok"
kind = "tokens"
path = "@GOLDEN@/tokens_a.json"
[[metric]]
kind = "source_suppression"
[[metric]]
kind = "source_suppression"
name = "ss_neg"
only_negative = true
[[metric]]
kind = "projection_loss"
[[metric]]
kind = "loss"
"#;

fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| rec.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

fn column(path: &Path, name: &str) -> Vec<f32> {
    let (h, rows) = read_csv(path);
    let i = h
        .iter()
        .position(|c| c == name)
        .unwrap_or_else(|| panic!("{name} in {h:?}"));
    rows.iter().map(|r| r[i].parse().unwrap()).collect()
}

#[test]
fn run_writes_tables_equal_to_the_notebook() {
    let (_d, spec, out) = spec_in_tempdir(TOKENS_SPEC);
    runner().arg(&spec).arg("-q").assert().success();
    let gold = load_golden("a_metrics.safetensors");
    for (table, key) in [
        (
            "source_suppression.csv",
            "source_suppression.only_negative=0.score",
        ),
        ("ss_neg.csv", "source_suppression.only_negative=1.score"),
    ] {
        let ours = column(&out.join(table), "score");
        let theirs: Vec<f32> = gold[key].iter().copied().collect();
        assert_eq!(ours.len(), theirs.len());
        assert!(
            worst(&ours, &theirs, RTOL, ATOL).is_none(),
            "{table}: {ours:?} vs {theirs:?}"
        );
    }
    // per-position rows: layer, head, seq, pos in golden order.
    let ours = column(&out.join("source_suppression_per_position.csv"), "value");
    let theirs: Vec<f32> = gold["source_suppression.only_negative=0.per_position"]
        .iter()
        .copied()
        .collect();
    assert!(worst(&ours, &theirs, RTOL, ATOL).is_none());

    let (h, rows) = read_csv(&out.join("projection_loss.csv"));
    assert_eq!(&h[..3], ["dataset", "layer", "head"]);
    assert!(h.contains(&"loss_ablation_nopad".to_string()));
    assert_eq!(rows.len(), 8);
    let orig = gold["projection_loss.loss_orig"].mean().unwrap();
    for x in column(&out.join("projection_loss.csv"), "loss_orig") {
        assert!((x - orig).abs() < 1e-4);
    }
    let loss = column(&out.join("loss.csv"), "loss");
    let theirs: Vec<f32> = gold["projection_loss.loss_orig"].iter().copied().collect();
    assert!(worst(&loss, &theirs, RTOL, ATOL).is_none());

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["weights_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(manifest["datasets"][0]["n_sequences"], 3);
    assert!(manifest["crate_versions"]["dfdx"]
        .as_str()
        .unwrap()
        .starts_with("0.13"));
    assert!(manifest["spec_toml"].as_str().unwrap().contains("ss_neg"));
    // Nothing temporary left behind.
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".hookgraph-"), "{name}");
    }
}

/// Runs a broken spec: non-zero exit, the expected message, nothing written.
fn fails_with(spec: &str, expected: &[&str]) {
    let (_d, path, out) = spec_in_tempdir(spec);
    let assert = runner().arg(&path).arg("-q").assert().failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    for e in expected {
        let e = e.replace("@SPEC@", &path.display().to_string());
        assert!(stderr.contains(&e), "expected {e:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "a failed run wrote {}", out.display());
}

#[test]
fn unknown_key_is_an_error_with_line_and_column() {
    fails_with(
        &TOKENS_SPEC.replace("batch_size = 2", "batch_size = 2\nbatchsize = 3"),
        &["@SPEC@:8:1:", "unknown field `batchsize`"],
    );
}

#[test]
fn malformed_toml_is_an_error_with_line_and_column() {
    fails_with(
        &TOKENS_SPEC.replace("name = \"tok\"", "name = \"tok"),
        &["@SPEC@:9:12:", "invalid basic string"],
    );
}

#[test]
fn unknown_metric_is_an_error_at_its_kind() {
    fails_with(
        &TOKENS_SPEC.replace("kind = \"loss\"", "kind = \"losss\""),
        &["@SPEC@:21:8:", "unknown metric", "losss"],
    );
}

#[test]
fn head_out_of_range_is_an_error_at_heads() {
    // ckpt_a has 2 layers: "2.0" is as wrong there as "12.0" on GPT-2 small.
    fails_with(
        &TOKENS_SPEC.replace("heads = \"all\"", "heads = [\"1.1\", \"2.0\"]"),
        &["@SPEC@:4:9:", "layer 2 is out of range"],
    );
    fails_with(
        &TOKENS_SPEC.replace("heads = \"all\"", "heads = [\"1.4\"]"),
        &["@SPEC@:4:9:", "head 4 is out of range"],
    );
}

#[test]
fn missing_dataset_file_is_an_error() {
    fails_with(
        &TOKENS_SPEC.replace("tokens_a.json", "nope.json"),
        &["dataset 'tok'", "nope.json"],
    );
}

#[test]
fn empty_dataset_is_an_error() {
    let (_d, path, out) = spec_in_tempdir(TOKENS_SPEC);
    let empty = path.parent().unwrap().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let tiny = root().join("experiments/checkpoints/tiny-gpt2");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            &fixture("ckpt_a").display().to_string(),
            &tiny.display().to_string(),
        )
        .replace(
            "kind = \"tokens\"\npath = \"",
            "kind = \"text\"\nseq_len = 5\npath = \"empty.jsonl\"\n#",
        );
    std::fs::write(&path, text).unwrap();
    let assert = runner().arg(&path).arg("-q").assert().failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(
        stderr.contains("dataset 'tok'") && stderr.contains("no documents"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn missing_webtext_says_how_to_make_it() {
    let spec = format!(
        r#"
name = "web"
output = "@OUT@"
[model]
path = "{}"
[[dataset]]
name = "web"
kind = "text"
path = "data/webtext.jsonl"
seq_len = 8
[[metric]]
kind = "loss"
"#,
        root().join("experiments/checkpoints/tiny-gpt2").display()
    );
    fails_with(
        &spec,
        &[
            "dataset 'web'",
            "webtext.jsonl",
            "python3 scripts/fetch_webtext.py",
            "experiments/smoke.toml",
        ],
    );
}

#[test]
fn overrides_set_spec_keys_and_the_manifest_records_them() {
    let (_d, path, out) = spec_in_tempdir(TOKENS_SPEC);
    runner()
        .arg(&path)
        .args([
            "-q",
            "--set",
            "heads=[\"1.*\"]",
            "--set",
            "model.batch_size=2",
        ])
        .assert()
        .success();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        m["spec_overrides"],
        serde_json::json!(["heads=[\"1.*\"]", "model.batch_size=2"])
    );
    assert_eq!(m["spec"]["model"]["batch_size"], 2);
    assert_eq!(m["heads"], 4, "layer 1's heads only");
    // The runner's commit, so a result says which code made it.
    let commit = m["git_commit"].as_str().unwrap();
    assert!(commit == "unknown" || commit.len() == 40, "{commit}");
    // A bad override is an error before anything runs.
    let a = runner()
        .arg(&path)
        .args(["-q", "--set", "dataset.4.n=1"])
        .assert()
        .code(1);
    let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(
        err.contains("--set dataset.4.n=1") && err.contains("no index 4"),
        "{err}"
    );
}

#[test]
fn ioi_name_that_is_not_one_token_is_an_error() {
    let spec = format!(
        r#"
name = "ioi"
output = "@OUT@"
[model]
path = "{}"
[[dataset]]
name = "ioi"
kind = "ioi"
n = 4
names = ["Mary", "John", "Bartholomew"]
[[metric]]
kind = "loss"
"#,
        root().join("experiments/checkpoints/tiny-gpt2").display()
    );
    fails_with(&spec, &["dataset 'ioi'", "Bartholomew"]);
}

#[test]
fn validate_checks_without_running() {
    let (_d, path, out) = spec_in_tempdir(TOKENS_SPEC);
    let assert = runner().arg("validate").arg(&path).assert().success();
    let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    assert!(
        stdout.contains("ok") && stdout.contains("dataset tok: 3 sequences x 12 tokens"),
        "{stdout}"
    );
    assert!(!out.exists());
    let (_d, path, _) = spec_in_tempdir(&TOKENS_SPEC.replace("heads = \"all\"", "heads = [\"7\"]"));
    runner().arg("validate").arg(&path).assert().failure();
}

#[test]
fn smoke_experiment_runs() {
    let out = tempfile::tempdir().unwrap();
    runner()
        .arg(root().join("experiments/smoke.toml"))
        .arg("-q")
        .arg("--output")
        .arg(out.path())
        .assert()
        .success();
    for f in [
        "source_suppression.csv",
        "projection_loss.csv",
        "loss.csv",
        "manifest.json",
    ] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
    let (h, rows) = read_csv(&out.path().join("source_suppression.csv"));
    assert_eq!(h[0], "dataset");
    let datasets: std::collections::BTreeSet<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(datasets.into_iter().collect::<Vec<_>>(), ["ioi", "web"]);
}

#[test]
fn list_shows_metrics_and_hook_points() {
    let assert = runner()
        .arg("list")
        .arg("--model")
        .arg(fixture("ckpt_a"))
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    for s in [
        "source_suppression",
        "projection_loss",
        "blocks.1.attn.hook_pattern",
        "ln_final.hook_scale",
    ] {
        assert!(stdout.contains(s), "{s} in {stdout}");
    }
}
