//! Hub ids resolved through a fake HuggingFace cache laid out as huggingface_hub writes it
//! (`models--X/{refs/main, snapshots/REV/* -> ../../blobs/HASH}`), and the offline error.
//! Every subprocess gets HF_HUB_OFFLINE=1 and its own HF_HUB_CACHE: no network, and the test
//! process's environment is never changed.

use std::path::{Path, PathBuf};

use crate::common::*;
use hookgraph::model::hub::find_in_cache;

/// `cache/models--{repo}/snapshots/{rev}/` holding ckpt_a's files as symlinks into `blobs/`.
fn add_snapshot(cache: &Path, repo: &str, rev: &str) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let (blobs, snap) = (root.join("blobs"), root.join("snapshots").join(rev));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors"] {
        // The hub names blobs by content hash; any unique name will do here.
        let blob = format!("{rev}-{}", f.replace('.', "-"));
        std::fs::copy(fixture("ckpt_a").join(f), blobs.join(&blob)).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snap.join(f)).unwrap();
    }
    snap
}

fn set_main(cache: &Path, repo: &str, rev: &str) {
    let refs = cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    // The hub writes the bare hash; a trailing newline must not matter.
    std::fs::write(refs.join("main"), format!("{rev}\n")).unwrap();
}

fn cache_gpt2(cache: &Path, out: &Path) -> assert_cmd::assert::Assert {
    runner()
        .env("HF_HUB_CACHE", cache)
        .args(["cache", "--model", "gpt2"])
        .args([
            "--tokens",
            "tests/golden/tokens_a.json",
            "--hooks",
            "logits",
        ])
        .arg("--out")
        .arg(out)
        .assert()
}

#[test]
fn hub_id_loads_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let rev = "3f4ad1c0ffee00000000000000000000deadbeef";
    let snap = add_snapshot(&cache, "gpt2", rev);
    set_main(&cache, "gpt2", rev);
    assert!(snap.join("model.safetensors").is_symlink());

    let out = tmp.path().join("x.safetensors");
    cache_gpt2(&cache, &out).success();
    let file = read_tensor_file(&out);
    let gold = load_golden("a_processed.safetensors");
    assert_close("logits", &file.f32["logits"], &gold["logits"], RTOL, ATOL);
    assert_eq!(file.metadata["model"], "gpt2");
    assert!(
        file.metadata["model_path"].ends_with(rev),
        "{}",
        file.metadata["model_path"]
    );
}

#[test]
fn canonical_repo_name_is_found_too() {
    // Newer caches hold gpt2 under its redirect target, openai-community/gpt2.
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    add_snapshot(&cache, "openai-community/gpt2", "abc");
    set_main(&cache, "openai-community/gpt2", "abc");
    cache_gpt2(&cache, &tmp.path().join("x.safetensors")).success();
}

#[test]
fn offline_with_empty_cache_says_what_to_download_and_where() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("empty-hub");
    std::fs::create_dir_all(&cache).unwrap();
    let out = tmp.path().join("x.safetensors");
    let a = cache_gpt2(&cache, &out).code(1);
    let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for want in [
        "'gpt2' is not in the HuggingFace cache",
        &cache.display().to_string(),
        "HF_HUB_OFFLINE",
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "https://huggingface.co/gpt2",
        &cache.join("models--gpt2").display().to_string(),
        // A key that exists, and what runs offline now.
        "`path = \"DIR\"` under [model]",
        "experiments/smoke.toml",
    ] {
        assert!(err.contains(want), "lacks {want:?}: {err}");
    }
    // `runner run` and `validate` have no --model flag: only `runner cache` is told of it.
    assert!(!err.contains("(`--model DIR`"), "{err}");
    assert!(!out.exists());
}

#[test]
fn find_in_cache_prefers_refs_main() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    // "zzz" sorts last, so a fallback that ignored refs/main would pick it.
    let main = add_snapshot(cache, "gpt2", "aaa");
    let other = add_snapshot(cache, "gpt2", "zzz");
    set_main(cache, "gpt2", "aaa");
    assert_eq!(find_in_cache(cache, "gpt2"), Some(main));

    // Without refs/main (or with it pointing at an incomplete snapshot) a complete one is used.
    set_main(cache, "gpt2", "missing-rev");
    assert_eq!(find_in_cache(cache, "gpt2"), Some(other.clone()));
    std::fs::remove_file(cache.join("models--gpt2/refs/main")).unwrap();
    assert_eq!(find_in_cache(cache, "gpt2"), Some(other.clone()));

    // An incomplete snapshot (a dangling blob link) is never returned.
    std::fs::remove_file(cache.join("models--gpt2/blobs/zzz-model-safetensors")).unwrap();
    assert_eq!(
        find_in_cache(cache, "gpt2"),
        Some(cache.join("models--gpt2/snapshots/aaa"))
    );
    assert_eq!(find_in_cache(cache, "gpt2-medium"), None);
}
