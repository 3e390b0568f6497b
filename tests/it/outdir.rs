//! The output directory as a trust boundary (issue 21, items 1, 2, 4, 7, 8): a results
//! directory is recognised by its manifest's content, never by a file name; no command
//! writes over its own inputs; the swap leaves `results/NAME` whole at every instant; one
//! writer per directory; arguments and paths are checked with clear messages.
//!
//! Each test failed on the code before the fix; the item of the issue is in its name.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::common::*;

/// Three sequences of `tokens_a.json` on `ckpt_a`, written to `@OUT@`.
const SPEC: &str = r#"
name = "od"
output = "@OUT@"
heads = "all"
[model]
path = "@FIXTURES@/ckpt_a"
batch_size = 1
[[dataset]]
name = "tok"
kind = "tokens"
path = "@GOLDEN@/tokens_a.json"
n = 3
[[metric]]
kind = "loss"
"#;

type Case = SpecCase;

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

/// A web app's directory: a `manifest.json` of its own, and its files.
fn users_webapp(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        r#"{"name": "My App", "start_url": "/", "files": ["index.html"]}"#,
    )
    .unwrap();
    std::fs::write(dir.join("index.html"), "<h1>precious</h1>").unwrap();
}

// ---- 1. a results directory is recognised by content ----------------------------------------

#[test]
fn item1_a_users_directory_with_a_manifest_json_is_refused_in_a_fresh_run_and_a_rerun() {
    let case = Case::new(SPEC);
    users_webapp(&case.out);
    let before = case.entries();
    for _ in 0..2 {
        let (code, _, stderr) = case.run(&[]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains("not a hookgraph results directory")
                && stderr.contains("no \"format\": \"hookgraph-results\" marker"),
            "{stderr}"
        );
        // Refused before compute: nothing moved, nothing added (not even a lock file).
        assert_eq!(case.entries(), before);
    }
    // A web app where the previous results would go is refused too, and left alone.
    std::fs::rename(&case.out, case.path("out.prev")).unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("where the previous results go"), "{stderr}");
    assert!(!case.out.exists());
    assert_eq!(
        std::fs::read_to_string(case.path("out.prev/index.html")).unwrap(),
        "<h1>precious</h1>"
    );
}

#[test]
fn item1_partial_or_shards_subfolders_do_not_make_a_results_directory() {
    for sub in [".partial", "shards", "shards/0-of-2"] {
        let case = Case::new(SPEC);
        std::fs::create_dir_all(case.out.join(sub)).unwrap();
        std::fs::write(case.out.join(sub).join("notes.txt"), "mine").unwrap();
        std::fs::write(case.out.join("data.csv"), "a,b\n1,2\n").unwrap();
        let before = case.entries();
        let (code, _, stderr) = case.run(&[]);
        assert_eq!(code, Some(1), "{sub}: {stderr}");
        assert!(
            stderr.contains("not a hookgraph results directory"),
            "{stderr}"
        );
        assert_eq!(case.entries(), before, "{sub}");
    }
}

#[test]
fn item1_results_carry_the_marker_and_identity_and_a_file_added_to_them_is_never_moved() {
    let case = Case::new(SPEC);
    assert_eq!(case.run(&[]).0, Some(0));
    let m = manifest(&case.out);
    assert_eq!(m["format"], "hookgraph-results");
    assert_eq!(m["format_version"], 1);
    assert_eq!(
        m["identity"]["spec_sha256"].as_str().unwrap().len(),
        64,
        "{m}"
    );
    // A rerun replaces results...
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    // ...but not a file the user put beside them: it would go to .prev and then be deleted.
    std::fs::write(case.out.join("my_notes.md"), "mine").unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("my_notes.md was not written by hookgraph"),
        "{stderr}"
    );
    assert!(case.out.join("my_notes.md").is_file());
}

// ---- 2. no command writes over its own inputs -----------------------------------------------

fn cache(out: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    output3(
        runner()
            .args(["cache", "--model"])
            .arg(fixture("ckpt_a"))
            .args(["--tokens", "tests/golden/tokens_a.json", "--device", "cpu"])
            .args(["--hooks", "blocks.0.hook_resid_post", "--out"])
            .arg(out)
            .args(extra),
    )
}

#[test]
fn item2_cache_never_replaces_its_checkpoint_even_with_force() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("ckpt_a"), &dir.path().join("ck"));
    let weights = dir.path().join("ck/model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    for force in [&[][..], &["--force"][..]] {
        let (code, _, stderr) = output3(
            runner()
                .args(["cache", "--model"])
                .arg(dir.path().join("ck"))
                .args(["--tokens", "tests/golden/tokens_a.json", "--device", "cpu"])
                .args(["--hooks", "blocks.0.hook_resid_post", "--out"])
                .arg(&weights)
                .args(force),
        );
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("which this command reads"), "{stderr}");
        assert_eq!(std::fs::read(&weights).unwrap(), before);
    }
    // Nor the token file it reads, nor a symlink to it.
    let tokens = dir.path().join("tokens.json");
    std::fs::copy(golden_path("tokens_a.json"), &tokens).unwrap();
    std::os::unix::fs::symlink(&tokens, dir.path().join("link.json")).unwrap();
    for out in [&tokens, &dir.path().join("link.json")] {
        let (code, _, stderr) = output3(
            runner()
                .args(["cache", "--model"])
                .arg(fixture("ckpt_a"))
                .arg("--tokens")
                .arg(&tokens)
                .args(["--hooks", "blocks.0.hook_resid_post", "--force", "--out"])
                .arg(out),
        );
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("which this command reads"), "{stderr}");
    }
}

#[test]
fn item2_cache_replaces_an_existing_file_only_with_force_and_never_a_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("acts.safetensors");
    std::fs::write(&out, "older work").unwrap();
    let (code, _, stderr) = cache(&out, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("exists; pass --force"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "older work");
    let (code, _, stderr) = cache(&out, &["--force"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(read_tensor_file(&out).f32.contains_key("logits"));

    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    for force in [&[][..], &["--force"][..]] {
        let (code, _, stderr) = cache(&fifo, force);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("not a regular file"), "{stderr}");
        let m = std::fs::symlink_metadata(&fifo).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
    }
    let (code, _, stderr) = cache(dir.path(), &["--force"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
}

#[test]
fn item2_a_run_whose_spec_or_data_lies_in_its_output_is_refused() {
    // The dataset's token file lies in the results the run would replace: it is listed in
    // their manifest (so the directory is hookgraph's) yet read by the run.
    let case = Case::new(SPEC);
    assert_eq!(case.run(&[]).0, Some(0));
    let m = manifest(&case.out);
    let listed = m["files"][0].as_str().unwrap().to_string();
    std::fs::copy(golden_path("tokens_a.json"), case.out.join(&listed)).unwrap();
    case.write(&SPEC.replace(
        "@GOLDEN@/tokens_a.json",
        &case.out.join(&listed).display().to_string(),
    ));
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is an input of this run"), "{stderr}");
}

// ---- 4. the swap never leaves the results missing --------------------------------------------

/// Starts `runner -q ARGS` with `env`, waits until stderr says `wait_for`, then calls `then`
/// with the child; returns (exit code, stderr).
fn at_line(
    args: &[&str],
    env: &[(&str, &str)],
    wait_for: &str,
    then: impl FnOnce(&mut Child),
) -> (Option<i32>, String) {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("runner"));
    cmd.current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stderr = String::new();
    let mut then = Some(then);
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        stderr += &line;
        stderr += "\n";
        if line.contains(wait_for) {
            if let Some(f) = then.take() {
                f(&mut child);
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(then.is_none(), "never saw {wait_for:?}:\n{stderr}");
    (status.code(), stderr)
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// The directory is one whole result set: its manifest is hookgraph's and every file it
/// lists is there; returns the manifest's `total_seconds` to tell two runs apart.
fn whole(dir: &Path) -> f64 {
    let m = manifest(dir);
    assert_eq!(m["format"], "hookgraph-results", "{}", dir.display());
    for f in m["files"].as_array().unwrap() {
        assert!(dir.join(f.as_str().unwrap()).is_file(), "{f} missing");
    }
    m["total_seconds"].as_f64().unwrap()
}

/// Two shards of SPEC, merged once: the state for the swap tests (results and shards/).
fn sharded() -> Case {
    let case = Case::new(&SPEC.replace("batch_size = 1", "batch_size = 1\ndevice = \"cpu\""));
    for s in ["0/2", "1/2"] {
        let (code, _, stderr) = case.run(&["--shard", s]);
        assert_eq!(code, Some(0), "{stderr}");
    }
    merge(&case, &[]);
    case
}

fn merge(case: &Case, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = runner();
    cmd.arg("-q").arg("merge").arg(&case.out);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (code, _, stderr) = output3(&mut cmd);
    assert_eq!(code, Some(0), "{stderr}");
    (code, stderr)
}

#[cfg(target_os = "linux")]
#[test]
fn item4_a_kill_at_any_step_of_the_swap_leaves_the_old_or_the_new_results_whole() {
    let case = sharded();
    let out = case.out.display().to_string();
    let mut seen = Vec::new();
    for step in ["linked", "exchanged", "prev"] {
        let old = whole(&case.out);
        let (code, stderr) = at_line(
            &["merge", &out, "-q"],
            &[(hookgraph::outdir::SWAP_PAUSE_ENV, step)],
            &format!("swap step {step}"),
            |child| {
                // At this instant, and after the kill, the directory is whole.
                whole(Path::new(&out));
                assert!(Path::new(&out).join("shards/0-of-2/shard.json").is_file());
                signal(child, "-KILL");
            },
        );
        assert_eq!(code, None, "killed: {stderr}");
        let now = whole(&case.out);
        // Before the exchange: the old set; after it: the new one.
        assert_eq!(now == old, step == "linked", "{step}");
        seen.push(now);
        // The shards survived, and the next merge finds them (and clears what the kill left).
        merge(&case, &[]);
        whole(&case.out);
        let hidden: Vec<String> = case
            .entries()
            .into_iter()
            .filter(|e| e.starts_with(".out.staging"))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
    }
    assert!(case.path("out.prev/manifest.json").is_file());
}

#[cfg(unix)]
#[test]
fn item4_the_fallback_swap_is_repaired_by_the_next_command() {
    let case = sharded();
    let out = case.out.display().to_string();
    let (code, _) = at_line(
        &["merge", &out, "-q"],
        &[
            (hookgraph::outdir::NO_EXCHANGE_ENV, "1"),
            (hookgraph::outdir::SWAP_PAUSE_ENV, "parked"),
        ],
        "swap step parked",
        |child| signal(child, "-KILL"),
    );
    assert_eq!(code, None);
    // The one instant the fallback leaves: the next command that takes the lock repairs it.
    merge(&case, &[(hookgraph::outdir::NO_EXCHANGE_ENV, "1")]);
    whole(&case.out);
    assert!(case.out.join("shards/1-of-2/shard.json").is_file());
    assert!(!case.path(".out.swap-old").exists());
}

#[cfg(target_os = "linux")]
#[test]
fn item4_a_second_signal_during_the_swap_says_what_the_directory_holds() {
    let case = sharded();
    let out = case.out.display().to_string();
    let (code, stderr) = at_line(
        &["merge", &out, "-q"],
        &[(hookgraph::outdir::SWAP_PAUSE_ENV, "exchanged")],
        "swap step exchanged",
        |child| {
            signal(child, "-INT");
            std::thread::sleep(std::time::Duration::from_millis(300));
            signal(child, "-INT");
        },
    );
    assert_eq!(code, Some(130), "{stderr}");
    assert!(!stderr.contains("was not changed"), "{stderr}");
    assert!(
        stderr.contains("new results were already in place"),
        "{stderr}"
    );
    whole(&case.out);
    merge(&case, &[]);
}

// ---- 7. one writer per output directory -----------------------------------------------------

#[cfg(unix)]
#[test]
fn item7_a_second_run_fails_at_once_and_a_killed_runs_lock_does_not_block() {
    let case = Case::new(SPEC);
    let spec = case.spec.display().to_string();
    let (code, stderr) = at_line(
        &["run", &spec, "-q"],
        &[(hookgraph::interrupt::PAUSE_ENV, "batch")],
        "paused at batch",
        |child| {
            let t = std::time::Instant::now();
            let (code, _, stderr) = case.run(&[]);
            assert_eq!(code, Some(1), "{stderr}");
            let want = format!(
                "another run (pid {}) is writing {}",
                child.id(),
                case.out.display()
            );
            assert!(stderr.contains(&want), "{stderr}");
            assert!(t.elapsed().as_secs() < 20, "not at once");
            // A shard run is refused too, and a merge.
            let (code, _, stderr) = case.run(&["--shard", "0/2"]);
            assert_eq!(code, Some(1), "{stderr}");
            assert!(stderr.contains("another run"), "{stderr}");
            signal(child, "-KILL");
        },
    );
    assert_eq!(code, None, "{stderr}");
    // The killed run's lock is gone with it.
    let (code, _, stderr) = case.run(&["--resume"]);
    assert_eq!(code, Some(0), "{stderr}");
    whole(&case.out);
}

// ---- 8. arguments and paths ---------------------------------------------------------------

#[test]
fn item8_checkpoint_every_takes_finite_seconds_up_to_a_day() {
    let case = Case::new(SPEC);
    for bad in ["1e20", "NaN", "inf", "-1", "86401", "soon"] {
        let (code, _, stderr) = case.run(&["--checkpoint-every", bad]);
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--checkpoint-every"), "{stderr}");
    }
    let (code, _, stderr) = case.run(&["--checkpoint-every", "86400"]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn item8_global_flags_work_before_or_after_the_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    std::fs::create_dir(&dir).unwrap();
    for args in [
        vec!["-q", "merge"],
        vec!["merge", "-q"],
        vec!["--quiet", "merge"],
    ] {
        let (code, _, stderr) = output3(runner().args(&args).arg(&dir));
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("no shards to merge"), "{args:?}: {stderr}");
    }
}

#[cfg(unix)]
#[test]
fn item8_an_output_that_is_a_symlink_to_a_directory_is_followed() {
    let case = Case::new(SPEC);
    std::fs::create_dir(case.path("real")).unwrap();
    std::os::unix::fs::symlink(case.path("real"), &case.out).unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    // The link stays a link; the results are in its target; a rerun keeps it so.
    assert!(std::fs::symlink_metadata(&case.out).unwrap().is_symlink());
    whole(&case.path("real"));
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(std::fs::symlink_metadata(&case.out).unwrap().is_symlink());
    assert!(case.path("real.prev/manifest.json").is_file());
}

#[cfg(unix)]
#[test]
fn item8_symlink_loops_are_called_loops_and_dangling_links_named() {
    let case = Case::new(SPEC);
    std::os::unix::fs::symlink(case.path("b"), case.path("a")).unwrap();
    std::os::unix::fs::symlink(case.path("a"), case.path("b")).unwrap();
    for out in ["a", "a/sub"] {
        let (code, _, stderr) = case.run(&["--output", case.path(out).to_str().unwrap()]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("symlink loop"), "{out}: {stderr}");
        assert!(!stderr.contains("not found"), "{stderr}");
    }
    std::os::unix::fs::symlink(case.path("nowhere"), &case.out).unwrap();
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is a symlink to"), "{stderr}");
}

#[cfg(unix)]
#[test]
fn item8_validate_writes_nothing() {
    use std::os::unix::fs::MetadataExt;
    let case = Case::new(SPEC);
    let mtime = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    let before = (mtime(case.dir.path()), case.entries());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (code, _, stderr) = output3(runner().arg("validate").arg(&case.spec));
    assert_eq!(code, Some(0), "{stderr}");
    // Not even a probe created and removed: the directory's mtime would move.
    assert_eq!((mtime(case.dir.path()), case.entries()), before);
}

#[test]
fn item8_a_tilde_in_output_is_home() {
    let case = Case::new(&SPEC.replace("output = \"@OUT@\"", "output = \"~/res/od\""));
    let home = tempfile::tempdir().unwrap();
    let (code, _, stderr) = output3(
        runner()
            .env("HOME", home.path())
            .arg("run")
            .arg(&case.spec)
            .arg("-q"),
    );
    assert_eq!(code, Some(0), "{stderr}");
    whole(&home.path().join("res/od"));
    assert!(!root().join("~").exists());
    // `~user` is refused at its line.
    case.write(&SPEC.replace("output = \"@OUT@\"", "output = \"~bob/od\""));
    let (code, _, stderr) = case.run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("spec.toml:3:1") && stderr.contains("~user"),
        "{stderr}"
    );
}

#[test]
fn item8_spec_errors_have_line_and_column() {
    let cases = [
        (
            SPEC.replace("batch_size = 1", "batch_size = 0"),
            "spec.toml:7:1",
            "batch_size",
        ),
        (
            SPEC.replace(
                "kind = \"tokens\"\npath = \"@GOLDEN@/tokens_a.json\"\nn = 3",
                "kind = \"prompts\"\nprompts = [\"When Mary\", \"\"]",
            ),
            "spec.toml:11:1",
            "prompt 2 is empty",
        ),
        (
            SPEC.replace("n = 3", "n = 3\nseq_len = 4"),
            // At the key itself (`data::build_all` locates dataset errors by their key).
            "spec.toml:13:1",
            "seq_len",
        ),
        (
            SPEC.replace(
                "path = \"@FIXTURES@/ckpt_a\"",
                "path = \"@FIXTURES@/ckpt_a\"\nname = \"gpt2\"",
            ),
            "spec.toml:6:1",
            "not both",
        ),
    ];
    for (spec, at, what) in cases {
        let case = Case::new(&spec);
        let (code, _, stderr) = case.run(&[]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(at) && stderr.contains(what),
            "want {at} {what}: {stderr}"
        );
    }
}
