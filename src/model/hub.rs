//! Finding a checkpoint: a directory, the HuggingFace cache, or a download into that cache.
//!
//! Owns: turning the spec's `model.name` / `model.path` into a [`CheckpointFiles`], with the
//! hub's environment read as Python's huggingface_hub reads it ([`HubEnv`]): `HF_ENDPOINT`
//! (a mirror), `HF_TOKEN` / `HF_TOKEN_PATH` / `$HF_HOME/token`, `HF_HUB_OFFLINE`,
//! `HF_HUB_CACHE` / `$HF_HOME/hub`. A hub id (`gpt2`, `gpt2-medium`, ...) is looked up in that
//! cache and, when missing, downloaded into it in the layout Python reads
//! (`models--*/blobs`, `snapshots/<commit>/`, `refs/main`), like TransformerLens's
//! `from_pretrained`: with `hf-hub` (the `download` feature), or with a Python's
//! huggingface_hub (`HOOKGRAPH_PYTHON`, and always in a build without the feature: the
//! wheel). A downloaded LFS blob is checked against its sha256 etag, so a transfer
//! cut off early never becomes a file the next run takes for complete.
//! Must not: parse the files it finds.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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

/// The public hub, used unless `HF_ENDPOINT` names a mirror.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The hub repo id for a model name: a known alias or an `owner/name` id as given.
pub fn repo_id(name: &str) -> String {
    KNOWN_MODELS
        .iter()
        .find(|(alias, _)| *alias == name)
        .map(|(_, id)| id.to_string())
        .unwrap_or_else(|| name.to_string())
}

/// The hub settings from the environment, computed as `huggingface_hub.constants` does.
/// Built from a lookup function so tests can check the rules without touching the process
/// environment.
#[derive(Clone, PartialEq)]
pub struct HubEnv {
    /// `HF_ENDPOINT` without a trailing `/`, else [`DEFAULT_ENDPOINT`].
    pub endpoint: String,
    /// `HF_HUB_CACHE` (or the legacy `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`.
    pub cache: PathBuf,
    /// `HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`), else the file at `HF_TOKEN_PATH`
    /// (default `$HF_HOME/token`, where `huggingface-cli login` writes it).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is one of 1/ON/YES/TRUE, any case.
    pub offline: bool,
    /// False when `HF_HUB_DISABLE_PROGRESS_BARS` is true.
    pub progress: bool,
}

// The token must never reach a log or an error message.
impl std::fmt::Debug for HubEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubEnv")
            .field("endpoint", &self.endpoint)
            .field("cache", &self.cache)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubEnv {
    /// The settings from the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// The settings from `var` (a variable's value, `None` when unset).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        // Python treats an empty variable like an unset one for these paths (`os.getenv(..)
        // or default` in most places); doing the same keeps `HF_HOME= cmd` harmless.
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let home = get("HOME").map(PathBuf::from).unwrap_or_default();
        let expand = |p: String| match p.strip_prefix("~/") {
            Some(rest) => home.join(rest),
            None if p == "~" => home.clone(),
            None => PathBuf::from(p),
        };
        let hf_home = get("HF_HOME").map(expand).unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .map(expand)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_path = get("HF_TOKEN_PATH")
            .map(expand)
            .unwrap_or_else(|| hf_home.join("token"));
        let clean = |t: String| Some(t.trim().to_string()).filter(|t| !t.is_empty());
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .and_then(clean)
            .or_else(|| std::fs::read_to_string(token_path).ok().and_then(clean));
        let is_true = |k: &str| {
            get(k).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_uppercase().as_str(),
                    "1" | "ON" | "YES" | "TRUE"
                )
            })
        };
        let endpoint = get("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        HubEnv {
            endpoint,
            cache,
            token,
            offline: is_true("HF_HUB_OFFLINE") || is_true("TRANSFORMERS_OFFLINE"),
            progress: !is_true("HF_HUB_DISABLE_PROGRESS_BARS"),
        }
    }
}

/// The HuggingFace hub cache directory, as huggingface_hub computes it.
pub fn hf_cache_dir() -> PathBuf {
    HubEnv::from_env().cache
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

fn not_found_message(name: &str, repo: &str, env: &HubEnv, cause: &str) -> String {
    format!(
        "model '{name}' is not in the HuggingFace cache ({}) and could not be downloaded ({cause}). \
         Download config.json, model.safetensors, vocab.json and merges.txt from \
         {}/{repo} (e.g. `huggingface-cli download {repo}` on a machine with \
         internet, then copy its cache folder to {}), or put them in a directory and set \
         `path = \"DIR\"` under [model] in the spec instead of `name` (`runner cache \
         --model DIR`). To try hookgraph offline now: `runner experiments/smoke.toml` runs a \
         tiny GPT-2 shipped in the repository",
        env.cache.display(),
        env.endpoint,
        env.cache
            .join(format!("models--{}", repo.replace('/', "--")))
            .display()
    )
}

/// Resolves a hub id to a local checkpoint: the cache, else a download into the cache.
pub fn resolve_hub(name: &str) -> Result<CheckpointFiles> {
    let env = HubEnv::from_env();
    let repo = repo_id(name);
    let canonical = match repo.as_str() {
        "distilgpt2" => "distilbert/distilgpt2".to_string(),
        r if !r.contains('/') => format!("openai-community/{r}"),
        r => r.to_string(),
    };
    for candidate in [&repo, &canonical] {
        if let Some(dir) = find_in_cache(&env.cache, candidate) {
            return CheckpointFiles::in_dir(&dir);
        }
    }
    if env.offline {
        return Err(Error::ModelNotFound(not_found_message(
            name,
            &repo,
            &env,
            "HF_HUB_OFFLINE is set",
        )));
    }
    let dir = download(&repo, &env)
        .map_err(|cause| Error::ModelNotFound(not_found_message(name, &repo, &env, &cause)))?;
    CheckpointFiles::in_dir(&dir)
}

/// Downloads the checkpoint into the shared cache; returns the snapshot directory.
///
/// Two clients, one cache layout: the huggingface_hub of a Python when `HOOKGRAPH_PYTHON`
/// names one (`hookgraph.run` names its own interpreter) or when this binary was built
/// without hf-hub (the wheel, whose environment has a Python by definition), else hf-hub.
/// Either way every file is checked against its hash before the run uses it.
fn download(repo: &str, env: &HubEnv) -> std::result::Result<PathBuf, String> {
    let dir = match python_downloader(|k| std::env::var_os(k)) {
        Some(python) => download_with_python(&python, repo, env)?,
        None => rust_client::download(repo, env)?,
    };
    for f in REQUIRED.iter().chain(OPTIONAL) {
        let p = dir.join(f);
        if p.exists() {
            verify_blob(&p).map_err(|e| format!("{f}: {e}"))?;
        }
    }
    Ok(dir)
}

/// The Python whose huggingface_hub downloads, if downloads go through Python:
/// `HOOKGRAPH_PYTHON`; without the Rust client, the `python3` (or `python`) beside this
/// binary (a venv's scripts directory, where the wheel installs it), else `python3` on PATH.
fn python_downloader(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    if let Some(p) = var("HOOKGRAPH_PYTHON").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if rust_client::AVAILABLE {
        return None;
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let names = if cfg!(windows) {
        ["python.exe", "python3.exe"]
    } else {
        ["python3", "python"]
    };
    beside
        .and_then(|dir| names.iter().map(|n| dir.join(n)).find(|p| p.is_file()))
        .or_else(|| Some(PathBuf::from(names[0])))
}

/// Downloads with `python -m hookgraph._download` (python/src/hookgraph/_download.py):
/// huggingface_hub's `hf_hub_download` into `env.cache` from `env.endpoint`, the token
/// from the environment by the same rules as [`HubEnv`] (never on a command line). Its
/// progress bars reach the terminal (stderr is inherited); its last stdout line is
/// `ok <snapshot dir>` or `error <message>`.
///
/// `python -m` would put the working directory first on `sys.path`, so a `hookgraph/` or
/// `huggingface_hub.py` lying in whatever directory the user ran from would be imported and
/// run: the helper runs in the cache directory (the user's own, created here as
/// huggingface_hub would) with `PYTHONSAFEPATH=1` (Python 3.11+ then adds no directory at
/// all), and relative `PYTHONPATH` entries are made absolute first, so they still mean
/// what the user meant.
fn download_with_python(
    python: &Path,
    repo: &str,
    env: &HubEnv,
) -> std::result::Result<PathBuf, String> {
    let cache = std::fs::create_dir_all(&env.cache)
        .and_then(|()| std::fs::canonicalize(&env.cache))
        .map_err(|e| format!("creating the cache {}: {e}", env.cache.display()))?;
    let mut cmd = std::process::Command::new(python);
    if let (Some(paths), Ok(here)) = (std::env::var_os("PYTHONPATH"), std::env::current_dir()) {
        let absolute = std::env::split_paths(&paths).map(|p| here.join(p));
        if let Ok(joined) = std::env::join_paths(absolute) {
            cmd.env("PYTHONPATH", joined);
        }
    }
    let out = cmd
        .current_dir(&cache)
        .env("PYTHONSAFEPATH", "1")
        .args(["-m", "hookgraph._download", repo, "--cache"])
        .arg(&cache)
        .args(["--endpoint", &env.endpoint, "--required"])
        .args(REQUIRED)
        .arg("--optional")
        .args(OPTIONAL)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| {
            format!(
                "could not run {} to download with huggingface_hub ({e}); set \
                 HOOKGRAPH_PYTHON to a Python with hookgraph and huggingface_hub installed",
                python.display()
            )
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    match last.split_once(' ') {
        Some(("ok", dir)) if out.status.success() => Ok(PathBuf::from(dir)),
        Some(("error", msg)) => Err(format!("huggingface_hub in {}: {msg}", python.display())),
        _ => Err(format!(
            "{} -m hookgraph._download exited with {} (is hookgraph installed for it?)",
            python.display(),
            out.status
        )),
    }
}

/// The Rust client (hf-hub), when built with the `download` feature.
#[cfg(feature = "download")]
mod rust_client {
    use super::{HubEnv, OPTIONAL, REQUIRED};
    use std::path::{Path, PathBuf};

    pub const AVAILABLE: bool = true;

    pub fn download(repo: &str, env: &HubEnv) -> std::result::Result<PathBuf, String> {
        // Not `ApiBuilder::new()` (always huggingface.co) nor `from_env()` alone (HF_ENDPOINT
        // and HF_HOME only, and it panics without a home directory): every setting comes
        // from HubEnv, so each variable follows Python's rules.
        let cache = hf_hub::Cache::new(env.cache.clone());
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
            .with_endpoint(env.endpoint.clone())
            .with_token(env.token.clone())
            .with_progress(env.progress)
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
}

/// Without the `download` feature there is no Rust client: [`python_downloader`] always
/// names a Python, so this is never called.
#[cfg(not(feature = "download"))]
mod rust_client {
    use super::HubEnv;
    use std::path::PathBuf;

    pub const AVAILABLE: bool = false;

    pub fn download(_repo: &str, _env: &HubEnv) -> std::result::Result<PathBuf, String> {
        Err("built without the `download` feature".into())
    }
}

/// Checks a snapshot file against its blob's name when that name is a sha256 (the etag of
/// every LFS file, e.g. `model.safetensors`), and removes both on a mismatch.
///
/// hf-hub renames its `.part` file into `blobs/` once the body ends; a server or proxy that
/// closes the connection early without a `Content-Length` ends the body too, and the short
/// file would then be served from the cache forever. huggingface_hub checks the size; the
/// hash catches that and a resumed download that appended to the wrong bytes.
fn verify_blob(snapshot_file: &Path) -> std::result::Result<(), String> {
    let blob = std::fs::canonicalize(snapshot_file).map_err(|e| e.to_string())?;
    let name = blob.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(()); // a git blob id (small files): nothing cheap to check against
    }
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(&blob).map_err(|e| e.to_string())?;
    std::io::copy(&mut file, &mut hasher).map_err(|e| e.to_string())?;
    let got = hex::encode(hasher.finalize());
    if got.eq_ignore_ascii_case(name) {
        return Ok(());
    }
    let _ = std::fs::remove_file(snapshot_file);
    let _ = std::fs::remove_file(&blob);
    Err(format!(
        "the downloaded file's sha256 is {got}, the hub says {name} (a transfer cut off?); \
         removed it, run again to download it afresh"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn aliases_map_to_repos() {
        assert_eq!(repo_id("gpt2-small"), "gpt2");
        assert_eq!(repo_id("someone/tiny-gpt2"), "someone/tiny-gpt2");
    }

    fn env(vars: &[(&str, &str)]) -> HubEnv {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_follow_huggingface_hub() {
        let e = env(&[("HOME", "/h")]);
        assert_eq!(e.endpoint, "https://huggingface.co");
        assert_eq!(e.cache, Path::new("/h/.cache/huggingface/hub"));
        assert_eq!(e.token, None);
        assert!(!e.offline && e.progress);
        let e = env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(e.cache, Path::new("/x/huggingface/hub"));
    }

    #[test]
    fn variables_override_in_python_order() {
        let e = env(&[
            ("HOME", "/h"),
            ("HF_HOME", "~/hf"),
            ("HF_ENDPOINT", "https://mirror.example/"),
            ("HF_HUB_OFFLINE", "yes"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("HF_TOKEN", " hf_abc \n"),
        ]);
        assert_eq!(e.endpoint, "https://mirror.example");
        assert_eq!(e.cache, Path::new("/h/hf/hub"));
        assert_eq!(e.token.as_deref(), Some("hf_abc"));
        assert!(e.offline && !e.progress);
        assert!(!format!("{e:?}").contains("hf_abc"));
        let e = env(&[
            ("HF_HOME", "/a"),
            ("HF_HUB_CACHE", "/b"),
            ("HF_HUB_OFFLINE", "0"),
        ]);
        assert_eq!(e.cache, Path::new("/b"));
        assert!(!e.offline);
        let e = env(&[
            ("HUGGINGFACE_HUB_CACHE", "/c"),
            ("TRANSFORMERS_OFFLINE", "1"),
        ]);
        assert_eq!(e.cache, Path::new("/c"));
        assert!(e.offline);
    }

    #[test]
    fn token_file_is_read_when_no_variable_is_set() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().to_str().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_file\n").unwrap();
        assert_eq!(env(&[("HF_HOME", home)]).token.as_deref(), Some("hf_file"));
        let e = env(&[("HF_HOME", home), ("HF_TOKEN", "hf_var")]);
        assert_eq!(e.token.as_deref(), Some("hf_var"));
        std::fs::write(tmp.path().join("other"), "hf_other").unwrap();
        let other = tmp.path().join("other");
        let e = env(&[
            ("HF_HOME", "/none"),
            ("HF_TOKEN_PATH", other.to_str().unwrap()),
        ]);
        assert_eq!(e.token.as_deref(), Some("hf_other"));
    }

    #[test]
    fn a_blob_that_is_not_its_hash_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let good = b"all of it";
        let sha = hex::encode(Sha256::digest(good));
        let (blobs, snap) = (tmp.path().join("blobs"), tmp.path().join("snap"));
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        std::os::unix::fs::symlink(blobs.join(&sha), snap.join("f")).unwrap();
        std::fs::write(blobs.join(&sha), good).unwrap();
        verify_blob(&snap.join("f")).unwrap();
        std::fs::write(blobs.join(&sha), b"all o").unwrap();
        let err = verify_blob(&snap.join("f")).unwrap_err();
        assert!(err.contains(&sha), "{err}");
        assert!(!blobs.join(&sha).exists() && snap.join("f").symlink_metadata().is_err());
    }

    #[test]
    fn downloads_go_through_python_when_named_or_without_the_rust_client() {
        let named = |v: Option<&str>| {
            python_downloader(|k| {
                (k == "HOOKGRAPH_PYTHON")
                    .then(|| v.map(Into::into))
                    .flatten()
            })
        };
        assert_eq!(
            named(Some("/opt/py/bin/python3")),
            Some(PathBuf::from("/opt/py/bin/python3"))
        );
        // Unset or empty: the Rust client when built in; else a Python beside the binary or
        // on PATH.
        for v in [None, Some("")] {
            let got = named(v);
            assert_eq!(got.is_none(), rust_client::AVAILABLE, "{got:?}");
            if let Some(p) = got {
                assert!(p.to_string_lossy().contains("python"), "{p:?}");
            }
        }
    }
}
