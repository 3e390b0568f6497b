//! Finding a checkpoint: a directory, the HuggingFace cache, or a download into that cache.
//!
//! Owns: turning the spec's `model.name` / `model.path` into a [`CheckpointFiles`]. A hub id
//! (`gpt2`, `gpt2-medium`, ...) is looked up in the HuggingFace cache (`$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, as Python's huggingface_hub does) and, when
//! missing, downloaded into it with `hf-hub`, like TransformerLens's `from_pretrained`.
//! Must not: parse the files it finds.

use std::path::{Path, PathBuf};

use super::checkpoint::CheckpointFiles;
use crate::error::{Error, Result};

/// The GPT-2 family on the hub, with TransformerLens's aliases.
/// Ids are the legacy short ones TL and most caches use (`models--gpt2`); the hub redirects
/// them to `openai-community/...`, and the cache lookup tries both.
pub const KNOWN_MODELS: &[(&str, &str)] = &[
    ("gpt2", "gpt2"),
    ("gpt2-small", "gpt2"),
    ("gpt2-medium", "gpt2-medium"),
    ("gpt2-large", "gpt2-large"),
    ("gpt2-xl", "gpt2-xl"),
    ("distilgpt2", "distilgpt2"),
];

/// The files a run needs from the hub; the tokenizer's are optional (either form works).
const REQUIRED: &[&str] = &["config.json", "model.safetensors"];
const OPTIONAL: &[&str] = &["tokenizer.json", "vocab.json", "merges.txt"];

/// The hub repo id for a model name: a known alias or an `owner/name` id as given.
pub fn repo_id(name: &str) -> String {
    KNOWN_MODELS
        .iter()
        .find(|(alias, _)| *alias == name)
        .map(|(_, id)| id.to_string())
        .unwrap_or_else(|| name.to_string())
}

/// The HuggingFace hub cache directory, as huggingface_hub computes it.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// The snapshot directory of `repo` in `cache` holding the required files, if any:
/// `refs/main`'s revision first, then any complete snapshot.
pub fn find_in_cache(cache: &Path, repo: &str) -> Option<PathBuf> {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let complete = |dir: &Path| REQUIRED.iter().all(|f| dir.join(f).is_file());
    if let Ok(rev) = std::fs::read_to_string(root.join("refs").join("main")) {
        let dir = root.join("snapshots").join(rev.trim());
        if complete(&dir) {
            return Some(dir);
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| complete(p))
        .collect();
    snaps.sort();
    snaps.pop()
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

fn not_found_message(name: &str, repo: &str, cache: &Path, cause: &str) -> String {
    format!(
        "model '{name}' is not in the HuggingFace cache ({}) and could not be downloaded ({cause}). \
         Download config.json, model.safetensors, vocab.json and merges.txt from \
         https://huggingface.co/{repo} (e.g. `huggingface-cli download {repo}` on a machine with \
         internet, then copy its cache folder to {}), or put them in a directory and pass that \
         instead (`--model DIR`, or `path = \"DIR\"` under [model])",
        cache.display(),
        cache.join(format!("models--{}", repo.replace('/', "--"))).display()
    )
}

/// Resolves a hub id to a local checkpoint: the cache, else a download into the cache.
pub fn resolve_hub(name: &str) -> Result<CheckpointFiles> {
    let repo = repo_id(name);
    let cache = hf_cache_dir();
    let canonical = match repo.as_str() {
        "distilgpt2" => "distilbert/distilgpt2".to_string(),
        r if !r.contains('/') => format!("openai-community/{r}"),
        r => r.to_string(),
    };
    for candidate in [&repo, &canonical] {
        if let Some(dir) = find_in_cache(&cache, candidate) {
            return CheckpointFiles::in_dir(&dir);
        }
    }
    if offline() {
        return Err(Error::ModelNotFound(not_found_message(
            name,
            &repo,
            &cache,
            "HF_HUB_OFFLINE is set",
        )));
    }
    let dir = download(&repo, &cache)
        .map_err(|cause| Error::ModelNotFound(not_found_message(name, &repo, &cache, &cause)))?;
    CheckpointFiles::in_dir(&dir)
}

/// Downloads the checkpoint into the shared cache; returns the snapshot directory.
fn download(repo: &str, cache: &Path) -> std::result::Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let model = api.model(repo.to_string());
    let mut dir = None;
    for f in REQUIRED {
        let p = model.get(f).map_err(|e| format!("{f}: {e}"))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for f in OPTIONAL {
        // GPT-2 repos carry all three; a repo with only one tokenizer form is still fine.
        let _ = model.get(f);
    }
    dir.ok_or_else(|| "download returned no path".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_map_to_repos() {
        assert_eq!(repo_id("gpt2-small"), "gpt2");
        assert_eq!(repo_id("someone/tiny-gpt2"), "someone/tiny-gpt2");
    }
}
