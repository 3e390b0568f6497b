//! Nothing lost, nothing escapes (issue 13): a run's output directory holds one whole run or
//! is left as it was; names stay names; what can be checked is checked before the forward
//! pass; NaN is never silently a result; signals stop a run cleanly.
//!
//! Each test here failed on the code before the fix (except the `guard` one, which keeps the
//! fix from going too far); the item of the issue is in its name.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::*;

type Case = SpecCase;

/// Every file of a directory (not its subdirectories, such as a run's `.partial/`
/// checkpoint) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Three sequences of `tokens_a.json` on `ckpt_a`, or the first `@N@`.
const TOKENS: &str = r#"
name = "rel"
output = "@OUT@"
heads = "all"
[model]
path = "@FIXTURES@/ckpt_a"
batch_size = 1
[[dataset]]
name = "tok"
kind = "tokens"
path = "@GOLDEN@/tokens_a.json"
n = @N@
[[metric]]
kind = "source_suppression"
[[metric]]
kind = "loss"
"#;

fn tokens_spec(n: usize) -> String {
    TOKENS.replace("@N@", &n.to_string())
}

// ---- 1. names are names, not paths -------------------------------------------------------

#[test]
fn item1_names_that_are_paths_are_refused_at_their_line_and_column() {
    let cases = [
        // (what replaces what, line:col of the bad name)
        (
            ("kind = \"loss\"", "kind = \"loss\"\nname = \"../escaped\""),
            "17:8",
        ),
        (
            (
                "kind = \"loss\"",
                "kind = \"loss\"\nname = \"/tmp/elsewhere\"",
            ),
            "17:8",
        ),
        (("kind = \"loss\"", "kind = \"loss\"\nname = \"\""), "17:8"),
        (("name = \"rel\"", "name = \"..\""), "2:8"),
        (("name = \"tok\"", "name = \"a/b\""), "9:8"),
        (("name = \"tok\"", "name = \".\""), "9:8"),
    ];
    for ((from, to), at) in cases {
        let case = Case::new(&tokens_spec(3).replace(from, to));
        let (code, _, stderr) = case.run(&[]);
        assert_eq!(code, Some(1), "{to}: {stderr}");
        let want = format!("{}:{at}:", case.spec.display());
        assert!(stderr.contains(&want), "{to}: want {want} in {stderr}");
        assert!(stderr.contains("name"), "{stderr}");
        assert_eq!(case.entries(), Vec::<String>::new(), "{to} wrote files");
    }
}

#[test]
fn item1_the_runs_name_dotdot_does_not_write_into_the_working_directory() {
    // No `output`: the results would go to results/.. = the working directory.
    let case = Case::new(
        &tokens_spec(3)
            .replace("output = \"@OUT@\"\n", "")
            .replace("name = \"rel\"", "name = \"..\""),
    );
    let out = runner()
        .current_dir(case.dir.path())
        .arg("spec.toml")
        .arg("-q")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(case.entries(), Vec::<String>::new());
}

// ---- 2. whole-run atomicity ----------------------------------------------------------------

#[test]
fn item2_a_rerun_replaces_the_whole_directory_and_keeps_the_previous_one() {
    let case = Case::new(&tokens_spec(3));
    assert_eq!(case.run(&[]).0, Some(0));
    let first = snapshot(&case.out);
    // Files only the first run writes (source_suppression's) must not survive into the
    // second run's directory. (A file the user adds is refused instead: tests/it/outdir.rs.)
    case.write(&tokens_spec(2).replace("[[metric]]\nkind = \"source_suppression\"\n", ""));
    let (code, stdout, stderr) = case.run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("out.prev"), "{stdout}");
    let m = manifest(&case.out);
    assert_eq!(m["datasets"][0]["n_sequences"], 2);
    // The directory holds exactly the files of one run: its manifest's list and itself.
    let mut listed: Vec<String> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    listed.push("manifest.json".into());
    listed.sort();
    let on_disk: Vec<String> = snapshot(&case.out).into_keys().collect();
    assert_eq!(on_disk, listed);
    // The previous results, whole, in out.prev.
    let prev = snapshot(&case.dir.path().join("out.prev"));
    assert_eq!(prev, first);
    // No staging directory left.
    assert_eq!(
        case.entries().iter().filter(|e| e.starts_with('.')).count(),
        0
    );
}

/// Starts `runner -q SPEC extra...` paused at checkpoint `at` (`point` or `point#k`), sends
/// SIGTERM once it says so, and returns (exit code, stderr).
#[cfg(unix)]
fn terminate_at(spec: &Path, at: &str) -> (Option<i32>, String) {
    terminate_at_with(spec, at, &[])
}

#[cfg(unix)]
fn terminate_at_with(spec: &Path, at: &str, extra: &[&str]) -> (Option<i32>, String) {
    let point = at.split('#').next().unwrap();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("runner"))
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .env(hookgraph::interrupt::PAUSE_ENV, at)
        .arg(spec)
        .arg("-q")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    let mut sent = false;
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !sent && line.contains(&format!("paused at {point}")) {
            let st = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            sent = true;
        }
        stderr += &line;
        stderr += "\n";
    }
    let status = child.wait().unwrap();
    assert!(sent, "the run never paused at {at}:\n{stderr}");
    (status.code(), stderr)
}

#[cfg(unix)]
#[test]
fn item2_sigterm_while_writing_keeps_the_previous_results_untouched() {
    let case = Case::new(&tokens_spec(3));
    assert_eq!(case.run(&[]).0, Some(0));
    let before = snapshot(&case.out);
    case.write(&tokens_spec(2));
    // Paused after every file of the new run is written into the staging directory, before
    // the swap: the worst moment for a half-written result set.
    let (code, stderr) = terminate_at(&case.spec, "write");
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(
        stderr.contains("still holds the previous results"),
        "{stderr}"
    );
    assert_eq!(snapshot(&case.out), before);
    assert_eq!(
        case.entries()
            .iter()
            .filter(|e| !e.starts_with("out/"))
            .collect::<Vec<_>>(),
        ["out"]
    );
}

#[cfg(unix)]
#[test]
fn item2_sigterm_during_the_forward_passes_writes_no_results() {
    let case = Case::new(&tokens_spec(3));
    let (code, stderr) = terminate_at(&case.spec, "batch");
    assert_eq!(code, Some(130), "{stderr}");
    // Only the checkpoint after the first batch, which `--resume` continues from.
    assert!(stderr.contains("no results were written"), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert_eq!(
        case.entries(),
        ["out", "out/.partial", "out/.partial/state.safetensors"]
    );
    // And it does: the resumed run's results are the whole run's.
    let (code, _, stderr) = case.run(&["--resume"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(manifest(&case.out)["datasets"][0]["n_sequences"], 3);
    assert!(!case.out.join(".partial").exists());
}

#[cfg(unix)]
#[test]
fn item2_a_signal_keeps_the_latest_batch_even_between_timed_checkpoints() {
    // Checkpoints at most hourly: only the first batch's would be on disk, but a run that
    // is stopping writes the batch it just finished.
    let case = Case::new(&tokens_spec(3));
    let (code, stderr) = terminate_at_with(&case.spec, "batch#2", &["--checkpoint-every", "3600"]);
    assert_eq!(code, Some(130), "{stderr}");
    let bytes = std::fs::read(case.out.join(".partial/state.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let progress: serde_json::Value = serde_json::from_str(&meta["hookgraph_progress"]).unwrap();
    assert_eq!(progress["next_sequence"], 2, "{progress}");
}

#[test]
fn item2_a_directory_with_other_files_is_not_replaced() {
    let case = Case::new(&tokens_spec(3));
    std::fs::create_dir(&case.out).unwrap();
    std::fs::write(case.out.join("thesis.tex"), "precious").unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("not a hookgraph results directory"),
        "{stderr}"
    );
    assert_eq!(case.entries(), ["out", "out/thesis.tex"]);
}

// ---- 3. fail before computing ---------------------------------------------------------------

#[test]
fn item3_an_unusable_output_directory_is_found_before_anything_else() {
    // The spec is also wrong in a way found only once the model is loaded (layer 7 of 2):
    // the output directory's error must come first, and `validate` must find it too.
    let case = Case::new(
        &tokens_spec(3)
            .replace("@OUT@", "@DIR@/a_file/out")
            .replace("heads = \"all\"", "heads = [\"7.0\"]"),
    );
    std::fs::write(case.dir.path().join("a_file"), "").unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("a_file"), "{stderr}");
    assert!(!stderr.contains("out of range"), "{stderr}");
    let (code, stderr) = case.validate();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("a_file"), "{stderr}");
}

// ---- 4. non-finite results are failures ----------------------------------------------------

#[test]
fn item4_all_nan_scores_fail_the_metric_with_count_and_row() {
    // One token per sequence, and that one BOS: no source a head may attend to, every
    // sequence undefined, every score 0/0.
    let case = Case::new(&tokens_spec(2).replace("@GOLDEN@/tokens_a.json", "one.json"));
    std::fs::write(case.dir.path().join("one.json"), "[[511], [511]]").unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("metric 'source_suppression'")
            && stderr.contains("8 non-finite value(s)")
            && stderr.contains("score=NaN in row 1"),
        "{stderr}"
    );
    let m = manifest(&case.out);
    let nf = &m["non_finite"][0];
    assert_eq!(nf["metric"], "source_suppression");
    assert_eq!(nf["table"], "source_suppression");
    assert_eq!(nf["count"], 8);
    assert_eq!(nf["csv_row"], 1);
    assert!(m["failures"][0]["error"]
        .as_str()
        .unwrap()
        .contains("non-finite"));
    // The failed metric's tables are not written; the other metric's are.
    assert!(!case.out.join("source_suppression.csv").exists());
    assert!(case.out.join("loss.csv").exists());
}

#[test]
fn item4_a_broken_config_that_makes_nan_everywhere_exits_3() {
    let case = Case::new(&tokens_spec(3).replace("@FIXTURES@/ckpt_a", "@DIR@/ckpt"));
    let ckpt = case.dir.path().join("ckpt");
    copy_dir(&fixture("ckpt_a"), &ckpt);
    // NaN in the final LayerNorm's bias makes every logit NaN. (A negative epsilon did
    // this before; it is now refused when config.json is read, issue 21.)
    let weights = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let key = ["ln_f.bias", "transformer.ln_f.bias"]
        .into_iter()
        .find(|k| header.get(*k).is_some())
        .unwrap();
    let offsets = &header[key]["data_offsets"];
    let (a, b) = (
        8 + n + offsets[0].as_u64().unwrap() as usize,
        8 + n + offsets[1].as_u64().unwrap() as usize,
    );
    assert_eq!(header[key]["dtype"], "F32");
    for c in bytes[a..b].chunks_exact_mut(4) {
        c.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&weights, bytes).unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("metric 'loss'") && stderr.contains("non-finite"),
        "{stderr}"
    );
}

#[test]
fn item4_guard_undefined_sequences_alone_are_counted_not_failed() {
    // Sequence 1 is all BOS (undefined: 0/0), sequence 0 is real: the per-sequence table
    // holds NaN for it, counted in n_undefined, and the run succeeds.
    let case = Case::new(&tokens_spec(2).replace("@GOLDEN@/tokens_a.json", "mixed.json"));
    std::fs::write(
        case.dir.path().join("mixed.json"),
        "[[511, 3, 4, 5], [511, 511, 511, 511]]",
    )
    .unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    let t = std::fs::read_to_string(case.out.join("source_suppression_per_sequence.csv")).unwrap();
    assert!(t.contains("NaN"), "{t}");
    let t = std::fs::read_to_string(case.out.join("source_suppression.csv")).unwrap();
    assert!(t.lines().nth(1).unwrap().ends_with(",1,1"), "{t}");
}

// ---- 5. a dataset that cannot fit ----------------------------------------------------------

#[test]
fn item5_an_ioi_n_that_cannot_fit_is_a_clear_error_in_run_and_validate() {
    let case = Case::new(
        r#"
name = "big"
output = "@OUT@"
[model]
path = "@TINY@"
[[dataset]]
name = "ioi"
kind = "ioi"
n = 3000000000000
[[metric]]
kind = "loss"
"#,
    );
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("dataset 'ioi'") && stderr.contains("GiB") && stderr.contains("lower n"),
        "{stderr}"
    );
    let (code, stderr) = case.validate();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("lower n"), "{stderr}");
}

// ---- 6. a plugin file next to a spec given without a directory -----------------------------

#[test]
fn item6_a_plugin_file_next_to_the_spec_is_found_from_a_bare_spec_path() {
    // Under a name no library directory holds (cargo puts target/debug on the test's
    // LD_LIBRARY_PATH, where the original name would be found by the loader's own search).
    let lib = crate::plugins::library("hg_attention_entropy");
    let case = Case::new(
        &tokens_spec(3).replace("kind = \"loss\"", "plugin = \"libentropy_next_to_spec.so\""),
    );
    std::fs::copy(&lib, case.dir.path().join("libentropy_next_to_spec.so")).unwrap();
    let out = runner()
        .current_dir(case.dir.path())
        .env_remove("LD_LIBRARY_PATH")
        .args(["spec.toml", "-q"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(case.out.join("attention_entropy.csv").is_file());
}

// ---- 7. `name` renames a plugin's tables; clashes are found before the forward pass --------

#[test]
fn item7_one_plugin_runs_twice_under_two_names() {
    let case = Case::new(&tokens_spec(3).replace(
        "kind = \"loss\"",
        "plugin = \"hg_attention_entropy\"\n[[metric]]\nplugin = \"hg_attention_entropy\"\nname = \"entropy_all\"\nmask_bos = false",
    ));
    let _ = crate::plugins::library("hg_attention_entropy"); // built
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    let a = std::fs::read_to_string(case.out.join("attention_entropy.csv")).unwrap();
    let b = std::fs::read_to_string(case.out.join("entropy_all.csv")).unwrap();
    assert_ne!(a, b, "mask_bos changes the entropies");
}

#[test]
fn item7_two_metrics_writing_one_table_fail_before_the_forward_pass() {
    // `ss` writes ss, ss_per_sequence and ss_per_position; a loss named ss_per_sequence
    // would overwrite one of them.
    let case = Case::new(
        &tokens_spec(3)
            .replace(
                "kind = \"source_suppression\"",
                "kind = \"source_suppression\"\nname = \"ss\"",
            )
            .replace(
                "kind = \"loss\"",
                "kind = \"loss\"\nname = \"ss_per_sequence\"",
            ),
    );
    let out = runner()
        .env(hookgraph::interrupt::PAUSE_ENV, "prepared")
        .arg(&case.spec)
        .arg("-q")
        .timeout(std::time::Duration::from_secs(30))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Reported at the second metric's `name`, before the run could pause after preparing.
    let want = format!("{}:18:1:", case.spec.display());
    assert!(stderr.contains(&want), "{want} in {stderr}");
    assert!(stderr.contains("'ss_per_sequence'"), "{stderr}");
    assert!(!stderr.contains("paused"), "{stderr}");
}

// ---- 8. prompts longer than the context ----------------------------------------------------

#[test]
fn item8_a_prompt_longer_than_the_context_is_refused() {
    let long = vec!["word"; 600].join(" ");
    let case = Case::new(&format!(
        r#"
name = "long"
output = "@OUT@"
[model]
path = "@TINY@"
[[dataset]]
name = "p"
kind = "prompts"
prompts = ["short", "{long}"]
[[metric]]
kind = "loss"
"#
    ));
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("dataset 'p'")
            && stderr.contains("prompt 2")
            && stderr.contains("longer than the model's context (256)"),
        "{stderr}"
    );
    assert_eq!(case.entries(), Vec::<String>::new());
}

// ---- 9. small things -----------------------------------------------------------------------

#[cfg(unix)]
#[test]
fn item9_list_into_a_closed_pipe_does_not_panic() {
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("runner"))
        .arg("list")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the runner writes: its first line meets a closed pipe,
    // as `runner list | head -1` does once head has exited.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

#[test]
fn item9_heads_as_a_number_gets_a_readable_message() {
    let case = Case::new(&tokens_spec(3).replace("heads = \"all\"", "heads = 3"));
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1));
    assert!(!stderr.contains("untagged"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:4:9:", case.spec.display())) && stderr.contains("\"all\""),
        "{stderr}"
    );
}

#[test]
fn item9_a_head_with_a_plus_sign_is_refused() {
    let case = Case::new(&tokens_spec(3).replace("heads = \"all\"", "heads = [\"+1.0\"]"));
    let (code, stderr) = case.validate();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("'+1.0' is not"), "{stderr}");
}

#[test]
fn item9_an_unknown_metric_option_is_reported_on_its_own_line() {
    let case = Case::new(
        &tokens_spec(3).replace("kind = \"loss\"", "kind = \"loss\"\nonly_negtive = true"),
    );
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1));
    let want = format!("{}:17:1:", case.spec.display());
    assert!(stderr.contains(&want), "{want} in {stderr}");
    assert!(stderr.contains("unknown option 'only_negtive'"), "{stderr}");
}
