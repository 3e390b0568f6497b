//! Trust boundaries (issue 21, items 3, 5, 6 and the stray-tensor part of 8): plugins load
//! only from where the user said and never by being listed; everything a run reads back
//! (checkpoints, shard state, configs, weights) is verified before it is believed.
//!
//! Each test here failed on the code before the fix; the item of the issue is in its name.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::plugins::library;

type Case = SpecCase;

/// Four sequences of `tokens_a.json` on a copy of `ckpt_a` (`@DIR@/ckpt`, so a test may
/// edit it), one sequence per batch, two resumable built-ins.
const SPEC: &str = r#"
name = "trust"
output = "@OUT@"
heads = "all"
[model]
path = "@DIR@/ckpt"
batch_size = 1
[[dataset]]
name = "tok"
kind = "tokens"
path = "@GOLDEN@/tokens_a.json"
[[metric]]
kind = "loss"
[[metric]]
kind = "projection_loss"
"#;

fn case_with_model() -> Case {
    let case = Case::new(SPEC);
    copy_dir(&fixture("ckpt_a"), &case.path("ckpt"));
    case
}

/// Reads a safetensors file's header JSON.
fn header(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (h, bytes[8 + n..].to_vec())
}

/// Writes a safetensors file from a header JSON and its data (the header padded to 8).
fn write_with_header(path: &Path, h: &serde_json::Value, data: &[u8]) {
    let mut text = serde_json::to_string(h).unwrap();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// Edits the progress record (JSON in the metadata) of a checkpoint file in place.
fn edit_progress(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let (mut h, data) = header(path);
    let meta = h["__metadata__"]["hookgraph_progress"].as_str().unwrap();
    let mut p: serde_json::Value = serde_json::from_str(meta).unwrap();
    edit(&mut p);
    h["__metadata__"]["hookgraph_progress"] = serde_json::Value::String(p.to_string());
    write_with_header(path, &h, &data);
}

// ---- 3. plugins load only from where the user said ---------------------------------------

/// A directory holding a copy of plugin `package`'s library, as `lib<name>.so`.
fn plugin_copy(dir: &Path, package: &str, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let to = dir.join(libloading::library_filename(name));
    std::fs::copy(library(package), &to).unwrap();
    to
}

#[test]
fn item3_list_does_not_search_or_load_from_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = plugin_copy(
        &tmp.path().join("target/debug"),
        "hg_test_panics",
        "hg_cwd_probe",
    );
    let mark = tmp.path().join("loaded");
    let out = runner()
        .arg("list")
        .current_dir(tmp.path())
        .env("HG_TEST_CTOR_MARK", &mark)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!stdout.contains(&lib.display().to_string()), "{stdout}");
    assert!(!mark.exists(), "`runner list` ran a library's constructor");
    // A bare name in a spec is not looked up in the working directory either.
    let case = Case::new(&SPEC.replace(
        "[[metric]]\nkind = \"projection_loss\"",
        "[[metric]]\nplugin = \"hg_cwd_probe\"",
    ));
    copy_dir(&fixture("ckpt_a"), &case.path("ckpt"));
    let out = runner()
        .args(["validate"])
        .arg(&case.spec)
        .current_dir(tmp.path())
        .env("HG_TEST_CTOR_MARK", &mark)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no libhg_cwd_probe.so on the plugin search path"),
        "{stderr}"
    );
    assert!(
        !mark.exists(),
        "a library in the working directory was loaded"
    );
}

#[test]
fn item3_list_lists_without_loading_and_load_loads() {
    let tmp = tempfile::tempdir().unwrap();
    plugin_copy(tmp.path(), "hg_test_panics", "hg_test_panics");
    plugin_copy(tmp.path(), "hg_attention_entropy", "hg_attention_entropy");
    let mark = tmp.path().join("loaded");
    let list = |args: &[&str]| {
        let out = runner()
            .arg("list")
            .args(args)
            .env("HOOKGRAPH_PLUGIN_PATH", tmp.path())
            .env("HG_TEST_CTOR_MARK", &mark)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plain = list(&[]);
    assert!(plain.contains("hg_attention_entropy"), "{plain}");
    assert!(
        !plain.contains("hg_test_"),
        "test-only plugins are listed by default: {plain}"
    );
    assert!(!mark.exists(), "`runner list` loaded a plugin");
    let all = list(&["--all"]);
    assert!(all.contains("hg_test_panics"), "{all}");
    assert!(!mark.exists(), "`runner list --all` loaded a plugin");
    let loaded = list(&["--load", "--all"]);
    assert!(
        loaded.contains("option mask_bos") && loaded.contains("hg_test_panics"),
        "{loaded}"
    );
    assert!(mark.exists(), "`--load` loads");
}

#[test]
fn item3_validate_does_not_load_a_library_that_is_not_a_plugin() {
    let case = Case::new(&SPEC.replace(
        "[[metric]]\nkind = \"projection_loss\"",
        &format!(
            "[[metric]]\nplugin = {:?}",
            library("hg_test_no_descriptor").display().to_string()
        ),
    ));
    copy_dir(&fixture("ckpt_a"), &case.path("ckpt"));
    let mark = case.path("loaded");
    let out = runner()
        .arg("validate")
        .arg(&case.spec)
        .env("HG_TEST_CTOR_MARK", &mark)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a hookgraph plugin"), "{stderr}");
    assert!(!mark.exists(), "validate ran the library's constructor");
}

#[cfg(unix)]
#[test]
fn item3_a_plugin_others_can_write_is_refused_naming_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let case = case_with_model();
    let dir = case.path("plugins");
    let lib = plugin_copy(&dir, "hg_attention_entropy", "hg_attention_entropy");
    let spec = |p: &Path| {
        SPEC.replace(
            "[[metric]]\nkind = \"projection_loss\"",
            &format!("[[metric]]\nplugin = {:?}", p.display().to_string()),
        )
    };
    case.write(&spec(&lib));
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    // Writable by group and others: refused, the metric fails, the message says the fix.
    mode(&lib, 0o777).unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("writable by group and others") && stderr.contains("chmod go-w"),
        "{stderr}"
    );
    // Its directory writable by others (no sticky bit): refused too.
    mode(&lib, 0o755).unwrap();
    mode(&dir, 0o777).unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("directory") && stderr.contains("writable by"),
        "{stderr}"
    );
    mode(&dir, 0o755).unwrap();
    // Owned by another (non-root) user: refused (needs root to set up).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(&lib, Some(4242), None).unwrap();
        let (code, _, stderr) = case.run(&[]);
        assert_eq!(code, Some(3), "{stderr}");
        assert!(
            stderr.contains("owned by another user (uid 4242"),
            "{stderr}"
        );
        std::os::unix::fs::chown(&lib, Some(0), None).unwrap();
    }
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(0), "a private copy loads: {stderr}");
}

#[test]
fn item3_a_bare_name_is_found_in_the_specs_own_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("experiments")).unwrap();
    std::fs::write(
        repo.join("Cargo.toml"),
        "[workspace]\nmembers = [\".\", \"hookgraph-plugin\"]\n[package]\nname = \"hookgraph\"\n",
    )
    .unwrap();
    plugin_copy(
        &repo.join("target/release"),
        "hg_attention_entropy",
        "hg_repo_probe",
    );
    let spec = SPEC
        .replace("@DIR@/ckpt", &fixture("ckpt_a").display().to_string())
        .replace("@GOLDEN@", &golden_path("").display().to_string())
        .replace("@OUT@", &tmp.path().join("out").display().to_string())
        .replace(
            "[[metric]]\nkind = \"projection_loss\"",
            "[[metric]]\nplugin = \"hg_repo_probe\"",
        );
    std::fs::write(repo.join("experiments/spec.toml"), spec).unwrap();
    runner()
        .arg("validate")
        .arg(repo.join("experiments/spec.toml"))
        .assert()
        .success();
}

// ---- 5. everything read back is verified -------------------------------------------------

/// Stops a run after `k` checkpoints (as a kill would), leaving `.partial/`.
fn killed_after(case: &Case, k: usize) -> PathBuf {
    let out = runner()
        .args(["run", "-q"])
        .arg(&case.spec)
        .env("HOOKGRAPH_TEST_ABORT_AFTER_BATCHES", k.to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let ck = case.out.join(".partial/state.safetensors");
    assert!(ck.is_file());
    ck
}

#[test]
fn item5_an_edited_progress_record_is_refused_on_resume() {
    // Moved forward (skipping sequences: tables from 3 of 4 sequences with exit 0 before)
    // and moved past the data (an index out of bounds before).
    for (field, value) in [
        ("next_sequence", serde_json::json!(3)),
        ("datasets_done", serde_json::json!(5)),
    ] {
        let case = case_with_model();
        let ck = killed_after(&case, 2);
        edit_progress(&ck, |p| p[field] = value.clone());
        let (code, _, stderr) = case.run(&["--resume"]);
        assert_eq!(code, Some(1), "{field}: {stderr}");
        assert!(
            stderr.contains("changed after it was written") && stderr.contains("state.safetensors"),
            "{field}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!case.out.join("loss.csv").exists());
    }
}

#[test]
fn item5_a_progress_record_that_does_not_fit_the_run_is_refused() {
    // Even with a matching digest (a consistent forgery, or a bug), a record that points
    // past the data or between batches is refused by the plan check.
    use hookgraph::shard::checkpoint::Checkpoint;
    use hookgraph::shard::Shard;
    let case = case_with_model();
    let ck = Checkpoint::read(&killed_after(&case, 2)).unwrap();
    assert!(ck.check_against("ck", &[3], 2, Shard::WHOLE, 1).is_ok());
    let bad = |f: &dyn Fn(&mut Checkpoint)| {
        let mut c = ck.clone();
        f(&mut c);
        c.check_against("ck", &[3], 2, Shard::WHOLE, 1)
            .unwrap_err()
            .to_string()
    };
    assert!(bad(&|c| c.progress.datasets_done = 5).contains("5 datasets are done"));
    assert!(bad(&|c| c.progress.next_sequence = 9).contains("sequence 9"));
    assert!(bad(&|c| {
        c.progress.complete = true;
        c.progress.datasets_done = 0;
    })
    .contains("complete after 0"));
    assert!(bad(&|c| {
        let st = c.states.values().next().unwrap().clone();
        c.states.insert((0, 7), st);
    })
    .contains("metric 7"));
    let mut c = ck.clone();
    c.progress.next_sequence = 1;
    let r = c.check_against("ck", &[3], 2, Shard::WHOLE, 2);
    assert!(r.unwrap_err().to_string().contains("batch boundary"));
}

#[test]
fn item5_a_changed_config_is_another_run() {
    let case = case_with_model();
    killed_after(&case, 2);
    // Same weights, another config.json (an extra field changes nothing numerically, but
    // the run is no longer provably the same model).
    let cfg = case.path("ckpt/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replacen('{', "{\"note\": \"edited\",", 1)).unwrap();
    let (code, _, stderr) = case.run(&["--resume"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("config.json: sha256"), "{stderr}");

    // Shards run under different configs do not merge.
    let case = case_with_model();
    case.run(&["--shard", "0/2"]);
    std::fs::write(
        cfg_of(&case),
        text.replacen('{', "{\"note\": \"edited\",", 1),
    )
    .unwrap();
    case.run(&["--shard", "1/2"]);
    let out = runner()
        .args(["merge", "-q"])
        .arg(&case.out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("config.json"), "{stderr}");
}

fn cfg_of(case: &Case) -> PathBuf {
    case.path("ckpt/config.json")
}

#[test]
fn item5_a_shard_count_beyond_the_data_is_refused_before_compute() {
    let case = case_with_model();
    // Refused as an argument, before anything is touched.
    let (code, _, stderr) = case.run(&["--shard", "0/18446744073709551615"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("more than hookgraph accepts"), "{stderr}");
    assert!(!case.out.exists());
    // More shards than sequences: refused at planning, before compute; no shard state.
    let (code, _, stderr) = case.run(&["--shard", "0/5"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("use N <= 3"), "{stderr}");
    assert!(!case.out.join("shards/0-of-5").exists());
    // A merge finding a directory that claims such a split neither hangs nor allocates.
    std::fs::create_dir_all(case.out.join("shards/0-of-18446744073709551615")).unwrap();
    let t = std::time::Instant::now();
    let out = runner()
        .args(["merge", "-q"])
        .arg(&case.out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("0-of-18446744073709551615"), "{stderr}");
    assert!(t.elapsed().as_secs() < 20);
}

#[test]
fn item5_layer_norm_epsilon_outside_gpt2_is_an_error() {
    for eps in ["1e300", "1.0", "-1.0"] {
        let case = case_with_model();
        let cfg = cfg_of(&case);
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(
            &cfg,
            text.replace(
                "\"layer_norm_epsilon\": 1e-05",
                &format!("\"layer_norm_epsilon\": {eps}"),
            ),
        )
        .unwrap();
        let (code, _, stderr) = case.run(&[]);
        assert_eq!(code, Some(1), "{eps}: {stderr}");
        assert!(stderr.contains("layer_norm_epsilon"), "{eps}: {stderr}");
        assert!(!case.out.exists(), "{eps}: wrote results");
    }
}

#[test]
fn item5_a_table_picture_that_would_overwrite_a_view_is_refused_before_compute() {
    let case = case_with_model();
    case.write(&format!(
        "{SPEC}\n[[metric]]\nkind = \"source_suppression\"\nname = \"B\"\n[[metric]]\nkind = \"source_suppression\"\nname = \"view_B_tok\"\n[[view]]\nmetric = \"B\"\ndataset = \"tok\"\nheads = [\"0.1\"]\n"
    ));
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("view_B_tok.svg") && stderr.contains("spec.toml:"),
        "{stderr}"
    );
    assert!(!case.out.exists());
}

#[test]
fn item5_a_misspelt_plugin_option_is_a_spec_error_before_compute() {
    let case = case_with_model();
    case.write(&format!(
        "{SPEC}\n[[metric]]\nplugin = {:?}\nmask_boss = true\n",
        library("hg_attention_entropy").display().to_string()
    ));
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown option 'mask_boss'") && stderr.contains("spec.toml:"),
        "{stderr}"
    );
    let written = std::fs::read_to_string(&case.spec).unwrap();
    let line = 1 + written
        .lines()
        .position(|l| l.starts_with("mask_boss"))
        .unwrap();
    assert!(stderr.contains(&format!("spec.toml:{line}:")), "{stderr}");
    assert!(!case.out.exists(), "computed before refusing");
    // An option the plugin's `create` refuses is the spec's error too.
    case.write(&format!(
        "{SPEC}\n[[metric]]\nplugin = {:?}\nmask_bos = 3\n",
        library("hg_attention_entropy").display().to_string()
    ));
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        // Typed by the registry's one option checker, from the plugin's declaration.
        stderr.contains("option 'mask_bos' must be a bool, not 3"),
        "{stderr}"
    );
}

#[cfg(unix)]
#[test]
fn item5_weights_that_shrink_while_loading_are_an_error_not_a_signal() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let case = case_with_model();
    let weights = case.path("ckpt/model.safetensors");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("runner"))
        .current_dir(root())
        .env(hookgraph::interrupt::PAUSE_ENV, "weights")
        .args(["run", "-q"])
        .arg(&case.spec)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    let mut paused = false;
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !paused && line.contains("paused at weights") {
            // Truncate the file under the loader to half (whole pages: the header stays
            // readable, the tensor data past it is gone), then let it go on. A memory map
            // dies of SIGBUS on the first page past the new end.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&weights)
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len / 2 / 4096 * 4096).unwrap();
            let st = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            paused = true;
        }
        stderr += &line;
        stderr += "\n";
    }
    let status = child.wait().unwrap();
    assert!(paused, "never paused: {stderr}");
    assert_eq!(status.signal(), None, "killed by a signal: {stderr}");
    assert!(status.code().is_some_and(|c| c != 0), "{stderr}");
}

// ---- 6. shard state is checked -----------------------------------------------------------

fn two_shards() -> Case {
    let case = case_with_model();
    for s in ["0/2", "1/2"] {
        let (code, _, stderr) = case.run(&["--shard", s]);
        assert_eq!(code, Some(0), "{stderr}");
    }
    case
}

fn merge(case: &Case) -> (Option<i32>, String) {
    let out = runner()
        .args(["merge", "-q"])
        .arg(&case.out)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn item6_edited_shard_state_is_refused_naming_the_shard_and_file() {
    let case = two_shards();
    let state = case.out.join("shards/1-of-2/state.safetensors");
    // One byte of the sums changed (the last byte of the data).
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();
    let (code, stderr) = merge(&case);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("shard 1-of-2")
            && stderr.contains("state.safetensors")
            && stderr.contains("sha256"),
        "{stderr}"
    );
    assert!(!case.out.join("loss.csv").exists());
}

#[test]
fn item6_counts_beyond_the_dataset_are_refused_even_with_a_matching_hash() {
    let case = two_shards();
    let dir = case.out.join("shards/0-of-2");
    let state = dir.join("state.safetensors");
    // projection_loss's counts set to 1e15, the digest and shard.json's hash recomputed.
    let (h, mut data) = header(&state);
    let key = h
        .as_object()
        .unwrap()
        .keys()
        .find(|k| k.ends_with("/counts"))
        .unwrap()
        .clone();
    let [a, _] = [
        h[&key]["data_offsets"][0].as_u64().unwrap() as usize,
        h[&key]["data_offsets"][1].as_u64().unwrap() as usize,
    ];
    data[a..a + 8].copy_from_slice(&1_000_000_000_000_000u64.to_le_bytes());
    data[a + 8..a + 16].copy_from_slice(&1_000_000_000_000_000u64.to_le_bytes());
    write_with_header(&state, &h, &data);
    // Recompute the checkpoint's digest through the library (a consistent forgery).
    rewrite_digest(&state);
    let manifest = dir.join("shard.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["state_sha256"]["state.safetensors"] =
        serde_json::Value::String(hookgraph::model::checkpoint::sha256_file(&state).unwrap());
    std::fs::write(&manifest, m.to_string()).unwrap();
    let (code, stderr) = merge(&case);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("projection_loss") && stderr.contains("exceeds dataset 'tok'"),
        "{stderr}"
    );
}

/// Re-reads a checkpoint ignoring its digest and writes it back with a fresh one (what a
/// careful forger would do).
fn rewrite_digest(path: &Path) {
    let (mut h, data) = header(path);
    h["__metadata__"]
        .as_object_mut()
        .unwrap()
        .remove("hookgraph_digest");
    write_with_header(path, &h, &data);
    let ck = hookgraph::shard::checkpoint::Checkpoint::read_unverified(path).unwrap();
    ck.write(path).unwrap();
}

#[test]
fn item6_a_shard_json_without_hashes_is_refused() {
    let case = two_shards();
    let manifest = case.out.join("shards/0-of-2/shard.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("state_sha256");
    std::fs::write(&manifest, m.to_string()).unwrap();
    let (code, stderr) = merge(&case);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("shard 0-of-2") && stderr.contains("records no sha256"),
        "{stderr}"
    );
}

// ---- 8. stray tensors --------------------------------------------------------------------

#[test]
fn item8_stray_tensors_are_an_error_naming_them() {
    let case = case_with_model();
    let weights = case.path("ckpt/model.safetensors");
    let (mut h, mut data) = header(&weights);
    // `h.7.attn.c_proj.bias` and `v_head.weight` on a 2-layer config: four floats each.
    for name in ["h.7.attn.c_proj.bias", "v_head.weight"] {
        let a = data.len();
        data.extend_from_slice(&[0u8; 16]);
        h[name] = serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [a, a + 16]});
    }
    write_with_header(&weights, &h, &data);
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("h.7.attn.c_proj.bias") && stderr.contains("v_head.weight"),
        "{stderr}"
    );
}
