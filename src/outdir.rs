//! The output directory: what a results directory is, who may write it, and the swap that
//! replaces it.
//!
//! Owns: recognising a results directory by its content ([`classify`]: a `manifest.json`
//! with hookgraph's format marker and the run's identity, a resume checkpoint, shard state;
//! anything else is foreign and refused), [`Target`] (the checks before compute: symlinks
//! followed or named, loops called loops, `.prev` recognised too, write permission asked of
//! the kernel without writing a probe), [`Lock`] (one writer per output directory: an
//! advisory lock on `.<name>.lock` beside it), and [`Staging`] with its commit, the swap.
//! Must not: decide what a run writes (the runner and `output` do) or read the results'
//! tables.
//!
//! The swap (Linux): `renameat2(RENAME_EXCHANGE)` exchanges the staging directory and the
//! output directory in one step, so `results/NAME` is at every instant either the old or the
//! new complete set, `shards/` included (it is hard-linked into the new set first). The old
//! set then becomes `<name>.prev`. Where the exchange is not available (another OS, a file
//! system that refuses it) the fallback is two renames, `NAME` -> `.NAME.swap-old` and
//! staging -> `NAME`; a kill between them leaves `NAME` missing for that instant, and the
//! next run or merge that takes the lock puts `.NAME.swap-old` back first.
//!
//! Test hooks: `HOOKGRAPH_TEST_SWAP_PAUSE=<step>` sleeps (up to a minute, no signal ends it)
//! at a step of the commit (`linked`, `exchanged`, `prev`) after printing
//! `hookgraph: swap step <step>`, so a test can kill the process there;
//! `HOOKGRAPH_TEST_NO_EXCHANGE=1` uses the fallback.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `format` every results manifest carries.
pub const FORMAT: &str = "hookgraph-results";
/// The manifest format version this runner writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest `manifest.json` [`classify`] reads (a manifest holds the spec's text: KiBs).
const MAX_MANIFEST: u64 = 64 << 20;
/// Largest checkpoint header [`classify`] reads.
const MAX_HEADER: u64 = 100 << 20;

/// Test hook: the commit step to pause at.
pub const SWAP_PAUSE_ENV: &str = "HOOKGRAPH_TEST_SWAP_PAUSE";
/// Test hook: use the two-rename fallback instead of the exchange.
pub const NO_EXCHANGE_ENV: &str = "HOOKGRAPH_TEST_NO_EXCHANGE";

/// What recognises a results directory: the manifest's marker, its run, and its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestHead {
    pub format: String,
    pub format_version: u32,
    /// The run's identity ([`crate::shard::Identity`]); only its presence is checked here.
    pub identity: serde_json::Map<String, serde_json::Value>,
    /// The files the run wrote, beside `manifest.json`.
    pub files: Vec<String>,
}

/// Reads the head of a `manifest.json`: `Err` says why these bytes are not a hookgraph
/// results manifest. Never panics, whatever the bytes (fuzzed).
pub fn read_manifest_head(bytes: &[u8]) -> std::result::Result<ManifestHead, String> {
    #[derive(Deserialize)]
    struct Loose {
        format: Option<serde_json::Value>,
        format_version: Option<serde_json::Value>,
        identity: Option<serde_json::Value>,
        files: Option<serde_json::Value>,
    }
    let loose: Loose = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
    if loose.format.as_ref().and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(format!("no \"format\": \"{FORMAT}\" marker"));
    }
    let version = loose
        .format_version
        .as_ref()
        .and_then(|v| v.as_u64())
        .ok_or("no format_version")?;
    if version != u64::from(FORMAT_VERSION) {
        return Err(format!(
            "format version {version} (this runner reads version {FORMAT_VERSION})"
        ));
    }
    let Some(serde_json::Value::Object(identity)) = loose.identity else {
        return Err("no run identity".into());
    };
    if identity.is_empty() {
        return Err("an empty run identity".into());
    }
    let files = match loose.files {
        Some(serde_json::Value::Array(a)) => a
            .into_iter()
            .map(|f| match f {
                serde_json::Value::String(s)
                    if crate::output::file_in(Path::new("."), &s).is_ok() =>
                {
                    Ok(s)
                }
                other => Err(format!(
                    "a file entry {other} that is not a plain file name"
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        _ => return Err("no list of files".into()),
    };
    Ok(ManifestHead {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        identity,
        files,
    })
}

/// Whether these bytes start a hookgraph checkpoint: a safetensors header whose metadata
/// holds a progress record with a format and an identity. Never panics (fuzzed).
pub fn is_checkpoint_header(bytes: &[u8]) -> bool {
    let Some(len) = bytes.get(..8) else {
        return false;
    };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    let Some(header) = usize::try_from(n)
        .ok()
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
    else {
        return false;
    };
    let Ok(serde_json::Value::Object(h)) = serde_json::from_slice(header) else {
        return false;
    };
    let progress = h
        .get("__metadata__")
        .and_then(|m| m.get("hookgraph_progress"))
        .and_then(|p| p.as_str())
        .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok());
    progress
        .is_some_and(|p| p.get("format").is_some_and(|f| f.is_u64()) && p["identity"].is_object())
}

/// What is in a directory the run would replace.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Absent,
    /// A directory with nothing in it.
    Empty,
    /// Hookgraph's: results (`manifest` set), or only a resume checkpoint and/or shards.
    Ours {
        manifest: bool,
    },
    /// Anything else; the reason names the first entry that is not hookgraph's.
    Foreign(String),
}

fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)?.take(max).read_to_end(&mut v)?;
    Ok(v)
}

fn names(dir: &Path) -> Result<Vec<(String, std::fs::FileType)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let t = e.file_type().map_err(|x| Error::io(e.path(), x))?;
        v.push((e.file_name().to_string_lossy().into_owned(), t));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// A temporary file of [`crate::output::write_atomic`] left by a kill.
fn is_temp(name: &str) -> bool {
    name.starts_with(".hookgraph-") && name.ends_with(".tmp")
}

/// A checkpoint directory (`.partial/` or `shards/I-of-N/`): only a recognised checkpoint,
/// a shard manifest with an identity, and temporary files of an atomic write.
fn checkpoint_dir_foreign(dir: &Path) -> Result<Option<String>> {
    for (name, t) in names(dir)? {
        let p = dir.join(&name);
        let ok = t.is_file()
            && (is_temp(&name)
                || (name == crate::shard::checkpoint::STATE_FILE
                    && read_header(&p).is_some_and(|b| is_checkpoint_header(&b)))
                || (name == crate::shard::SHARD_MANIFEST
                    && read_bounded(&p, MAX_MANIFEST)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .is_some_and(|v| v["identity"].is_object() && v["shard"].is_object())));
        if !ok {
            return Ok(Some(p.display().to_string()));
        }
    }
    Ok(None)
}

/// The first 8 bytes and the header of a safetensors file, bounded.
fn read_header(path: &Path) -> Option<Vec<u8>> {
    let mut f = File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return None;
    }
    let mut v = len.to_vec();
    f.take(n).read_to_end(&mut v).ok()?;
    Some(v)
}

/// Classifies `dir` by content. Hookgraph's directories hold only: a `manifest.json` with
/// the format marker and the files it lists; `.partial/` with a resume checkpoint; `shards/`
/// with `I-of-N/` shard directories (checkpoint, `shard.json`) and their `.I-of-N.lock`
/// files; temporary files of an interrupted atomic write. Anything else makes it foreign.
pub fn classify(dir: &Path) -> Result<Kind> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Kind::Absent),
        Err(e) => return Err(Error::io(dir, e)),
        Ok(m) if !m.is_dir() => {
            return Ok(Kind::Foreign(format!(
                "{} is not a directory",
                dir.display()
            )))
        }
        Ok(_) => {}
    }
    let entries = names(dir)?;
    if entries.is_empty() {
        return Ok(Kind::Empty);
    }
    let mut listed: Vec<String> = Vec::new();
    let mut manifest = false;
    if entries.iter().any(|(n, _)| n == "manifest.json") {
        let p = dir.join("manifest.json");
        let bytes = read_bounded(&p, MAX_MANIFEST).map_err(|e| Error::io(&p, e))?;
        match read_manifest_head(&bytes) {
            Ok(head) => {
                listed = head.files;
                manifest = true;
            }
            Err(why) => {
                return Ok(Kind::Foreign(format!(
                    "{} is not a hookgraph results manifest: {why}",
                    p.display()
                )))
            }
        }
    }
    let foreign = |p: &Path| {
        Ok(Kind::Foreign(format!(
            "{} was not written by hookgraph",
            p.display()
        )))
    };
    for (name, t) in &entries {
        let p = dir.join(name);
        let ours = match name.as_str() {
            "manifest.json" => true,
            ".partial" if t.is_dir() => match checkpoint_dir_foreign(&p)? {
                None => true,
                Some(f) => return foreign(Path::new(&f)),
            },
            "shards" if t.is_dir() => {
                for (s, st) in names(&p)? {
                    let sp = p.join(&s);
                    let lock = s
                        .strip_prefix('.')
                        .and_then(|s| s.strip_suffix(".lock"))
                        .and_then(crate::shard::Shard::from_dir_name)
                        .is_some();
                    if st.is_file() && (lock || is_temp(&s)) {
                        continue;
                    }
                    if !(st.is_dir() && crate::shard::Shard::from_dir_name(&s).is_some()) {
                        return foreign(&sp);
                    }
                    if let Some(f) = checkpoint_dir_foreign(&sp)? {
                        return foreign(Path::new(&f));
                    }
                }
                true
            }
            n => t.is_file() && (listed.iter().any(|l| l == n) || is_temp(n)),
        };
        if !ours {
            return foreign(&p);
        }
    }
    Ok(Kind::Ours { manifest })
}

/// `~` or `~/...` at the start of a path, expanded with `$HOME`; `~user` is refused (no
/// shell here to ask). Other paths unchanged.
pub fn expand_tilde(p: &Path) -> std::result::Result<PathBuf, String> {
    let s = p.to_string_lossy();
    if !s.starts_with('~') {
        return Ok(p.to_path_buf());
    }
    let rest = match s.strip_prefix('~') {
        Some("") => "",
        Some(r) if r.starts_with('/') => &r[1..],
        _ => {
            return Err(format!(
                "{s}: `~user` paths are not expanded; write the directory out in full"
            ))
        }
    };
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{s}: `~` needs $HOME, which is not set"))?;
    Ok(PathBuf::from(home).join(rest))
}

fn is_loop(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ELOOP)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// `path` with a final symlink followed (the real directory is what gets replaced, and
/// `.prev` and the lock go beside it); errors name the symlink, its target, or the loop.
fn follow(abs: PathBuf, shown: &Path) -> Result<PathBuf> {
    let bad = |msg: String| Error::Other(format!("output directory {}: {msg}", shown.display()));
    match std::fs::symlink_metadata(&abs) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(&abs) {
            Ok(real) => Ok(real),
            Err(e) if is_loop(&e) => Err(bad("is a symlink loop".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad(format!(
                "is a symlink to {}, which does not exist; create that directory or point the link elsewhere",
                std::fs::read_link(&abs)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into())
            ))),
            Err(e) => Err(Error::io(&abs, e)),
        },
        Err(e) if is_loop(&e) => Err(bad(
            "a directory above it is a symlink loop".into(),
        )),
        _ => Ok(abs),
    }
}

/// Whether this process may create and remove entries in `dir`, asked of the kernel
/// (`faccessat` with the effective ids) rather than by writing a probe.
fn writable(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a NUL-terminated path; no memory is written.
        let r = unsafe {
            libc::faccessat(
                libc::AT_FDCWD,
                c.as_ptr(),
                libc::W_OK | libc::X_OK,
                libc::AT_EACCESS,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(unix))]
    {
        match std::fs::metadata(dir) {
            Ok(m) if m.permissions().readonly() => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "read-only",
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// An output directory a run may replace, made absolute.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where the results go (a symlink's target when the given path was a symlink).
    pub dir: PathBuf,
    /// Where the previous results go when they are replaced: `<dir>.prev`.
    pub prev: PathBuf,
    /// Whether `dir` holds earlier results now.
    pub exists: bool,
}

impl Target {
    /// Checks that `dir` can take a run's results, without writing anything: it is absent,
    /// empty, or hookgraph's by content ([`classify`]), and so is `<dir>.prev`; a final
    /// symlink is followed; the nearest existing ancestor is a directory this process can
    /// write in.
    pub fn check(dir: &Path) -> Result<Target> {
        let bad = |msg: String| Error::Other(format!("output directory {}: {msg}", dir.display()));
        let dir_expanded = expand_tilde(dir).map_err(bad)?;
        let abs = std::path::absolute(&dir_expanded).map_err(|e| Error::io(dir, e))?;
        // `..`, `.` or `/` as the last part: only an existing directory can be meant, and it
        // must pass the same checks under its real name.
        let abs = if abs.file_name().is_none() || abs.ends_with("..") {
            abs.canonicalize().map_err(|e| {
                if is_loop(&e) {
                    bad("is a symlink loop".into())
                } else {
                    Error::io(dir, e)
                }
            })?
        } else {
            abs
        };
        let abs = follow(abs, dir)?;
        let Some(name) = abs.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Err(bad("it has no name (the file system root?)".into()));
        };
        let prev = abs.with_file_name(format!("{name}.prev"));
        let mut exists = false;
        for (what, p) in [("", &abs), (" (where the previous results go)", &prev)] {
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(bad(format!(
                        "{}{what} is a symlink; a run replaces it, so it must be a directory (move the link away)",
                        p.display()
                    )))
                }
                Err(e) if is_loop(&e) => {
                    return Err(bad(format!(
                        "{}{what}: a directory above it is a symlink loop",
                        p.display()
                    )))
                }
                _ => {}
            }
            match classify(p)? {
                Kind::Absent => {}
                Kind::Empty | Kind::Ours { .. } => exists |= p == &abs,
                Kind::Foreign(why) => {
                    return Err(bad(format!(
                        "{}{what} is not a hookgraph results directory ({why}); a run replaces its whole output directory, so choose another output, or move what is there away",
                        p.display()
                    )))
                }
            }
        }
        // The nearest ancestor that exists must be a directory we can write in.
        let mut ancestor = abs.parent();
        while let Some(a) = ancestor {
            match std::fs::symlink_metadata(a) {
                Ok(_) => break,
                Err(e) if is_loop(&e) => {
                    return Err(bad(format!("{} is a symlink loop", a.display())))
                }
                Err(_) => ancestor = a.parent(),
            }
        }
        let ancestor = ancestor.ok_or_else(|| bad("no parent directory exists".into()))?;
        match std::fs::metadata(ancestor) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad(format!("{} is not a directory", ancestor.display()))),
            Err(e) if is_loop(&e) => {
                return Err(bad(format!("{} is a symlink loop", ancestor.display())))
            }
            Err(e) => return Err(Error::io(ancestor, e)),
        }
        writable(ancestor)
            .map_err(|e| bad(format!("cannot write in {}: {e}", ancestor.display())))?;
        Ok(Target {
            exists,
            dir: abs,
            prev,
        })
    }

    fn name(&self) -> String {
        self.dir
            .file_name()
            .expect("checked: has a name")
            .to_string_lossy()
            .into_owned()
    }

    fn parent(&self) -> &Path {
        self.dir.parent().expect("checked: has a name")
    }

    /// The lock file beside the directory.
    pub fn lock_path(&self) -> PathBuf {
        self.parent().join(format!(".{}.lock", self.name()))
    }

    /// Where the two-rename fallback parks the old results for an instant.
    fn swap_old(&self) -> PathBuf {
        self.parent().join(format!(".{}.swap-old", self.name()))
    }
}

/// How a [`Lock`] is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// A run or a merge: the only writer.
    Exclusive,
    /// A shard run: shards write side by side, but not beside a run or merge.
    Shared,
}

/// One writer per output directory: an advisory lock (`flock`, through `fs4`) on
/// `.<name>.lock` beside it, held until dropped (an exclusive holder then removes the file).
/// The kernel releases it when the process dies, so a killed run never blocks the next.
#[derive(Debug)]
pub struct Lock {
    file: File,
    pub path: PathBuf,
    /// Whether to remove the file when done (exclusive holders only).
    remove: bool,
}

/// Reads a lock file's content: the pid of the run that holds it, if it says one. Never
/// panics (fuzzed).
pub fn read_lock_pid(bytes: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(bytes.get(..64.min(bytes.len()))?).ok()?;
    let line = text.lines().next()?.trim();
    line.strip_prefix("pid ")?.parse().ok().filter(|&p| p > 0)
}

impl Lock {
    /// Takes the lock of `dir`'s output directory (creating its parent directories and the
    /// lock file), or fails at once naming the run that holds it. An exclusive lock also
    /// finishes an interrupted fallback swap and removes staging directories that killed
    /// runs left.
    pub fn acquire(dir: &Path, mode: LockMode) -> Result<Lock> {
        let target = Target::check(dir)?;
        let parent = target.parent().to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let lock = Lock::at(&target.lock_path(), mode, &dir.display().to_string())?;
        if mode == LockMode::Exclusive {
            recover(&target)?;
        }
        Ok(lock)
    }

    /// Takes a lock on the file `path` for writing `what`. The file an exclusive holder
    /// removes when it is done may have been opened by another process just before: a lock
    /// is only kept once `path` still names the locked file, otherwise taken again.
    fn at(path: &Path, mode: LockMode, what: &str) -> Result<Lock> {
        use fs4::FileExt;
        for _ in 0..100 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            let got = match mode {
                LockMode::Exclusive => FileExt::try_lock(&file),
                LockMode::Shared => FileExt::try_lock_shared(&file),
            };
            match got {
                Ok(()) => {}
                Err(fs4::TryLockError::WouldBlock) => {
                    let mut bytes = Vec::new();
                    let _ = (&file).take(64).read_to_end(&mut bytes);
                    let who = read_lock_pid(&bytes)
                        .map(|p| format!(" (pid {p})"))
                        .unwrap_or_default();
                    return Err(Error::Other(format!(
                        "another run{who} is writing {what}; wait for it to finish (the lock is {})",
                        path.display()
                    )));
                }
                Err(fs4::TryLockError::Error(e)) => return Err(Error::io(path, e)),
            }
            if !same_file(&file, path) {
                continue; // removed by the holder we raced with: take the new one
            }
            // Who holds it, for the message above (shard runs share it: the last one says).
            let _ = file.set_len(0);
            let _ = writeln!(file, "pid {}", std::process::id());
            let _ = file.flush();
            return Ok(Lock {
                file,
                path: path.to_path_buf(),
                remove: mode == LockMode::Exclusive,
            });
        }
        Err(Error::Other(format!(
            "{}: the lock file keeps changing; is another run starting and stopping?",
            path.display()
        )))
    }
}

/// Whether `path` names the open `file` (same device and inode).
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        path.exists()
    }
}

impl Drop for Lock {
    /// An exclusive holder removes the lock file while still holding the lock (a racing
    /// opener then sees that its file is gone and takes a new one, see `Lock::at`). Shared
    /// holders leave it: another shard may hold it still. A killed process leaves it too,
    /// harmlessly: the kernel released its lock.
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = &self.file;
    }
}

/// The locks a run holds: the output directory's (exclusive; shared for a shard run), and
/// a shard run's own `.NAME.I-of-N.lock` beside it (exclusive: one task per shard).
pub fn lock_for_run(out_dir: &Path, shard: Option<crate::shard::Shard>) -> Result<Vec<Lock>> {
    let Some(s) = shard else {
        return Ok(vec![Lock::acquire(out_dir, LockMode::Exclusive)?]);
    };
    let dir = Lock::acquire(out_dir, LockMode::Shared)?;
    // Beside the directory too: a refused shard run must not create `shards/`.
    let t = Target::check(out_dir)?;
    let own = Lock::at(
        &t.parent()
            .join(format!(".{}.{}.lock", t.name(), s.dir_name())),
        LockMode::Exclusive,
        &format!("shard {s} of {}", out_dir.display()),
    )?;
    Ok(vec![dir, own])
}

/// Whether a fallback swap into `dir` was killed with the old results parked beside it
/// (the next exclusive [`Lock`] puts them back).
pub fn swap_parked(dir: &Path) -> bool {
    Target::check(dir).is_ok_and(|t| t.swap_old().is_dir())
}

/// Under the exclusive lock: puts back results a fallback swap parked and was killed
/// before replacing, and removes staging directories of killed runs.
fn recover(target: &Target) -> Result<()> {
    let parked = target.swap_old();
    if parked.is_dir() {
        if !target.dir.exists() {
            std::fs::rename(&parked, &target.dir).map_err(|e| Error::io(&parked, e))?;
        } else {
            let _ = std::fs::remove_dir_all(&parked);
        }
    }
    let prefix = format!(".{}.staging-", target.name());
    if let Ok(entries) = std::fs::read_dir(target.parent()) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) && e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// Staging directories of runs in progress, for [`abandon_staging`].
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Where a commit is: 0 none, 1 before the exchange, 2 after it.
static SWAP_PHASE: AtomicU8 = AtomicU8::new(0);

/// Removes every staging directory of a run in progress (best effort) and says what the
/// output directory holds. For the signal handler's second signal, which ends the process
/// without unwinding (so no `Drop` runs).
pub fn abandon_staging() -> &'static str {
    if let Ok(dirs) = IN_PROGRESS.lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    match SWAP_PHASE.load(Ordering::SeqCst) {
        2 => "the new results were already in place (the previous ones may not have reached <dir>.prev)",
        _ => "the output directory was not changed",
    }
}

/// A run's results being written: a fresh directory `.<name>.staging-XXXX` beside the
/// output directory. Dropping it without [`Staging::commit`] removes it and everything in
/// it; the output directory is never touched until the commit.
#[derive(Debug)]
pub struct Staging {
    target: Target,
    dir: Option<tempfile::TempDir>,
}

/// What a commit did.
#[derive(Debug, Clone)]
pub struct Committed {
    pub dir: PathBuf,
    /// Where the previous results were moved, if there were any.
    pub previous: Option<PathBuf>,
}

/// The test pause of [`SWAP_PAUSE_ENV`].
fn step(point: &str) {
    if std::env::var(SWAP_PAUSE_ENV).is_ok_and(|p| p == point) {
        eprintln!("hookgraph: swap step {point}");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

fn os_path(p: &Path) -> Result<std::ffi::CString> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::Other(format!("{}: a path with a NUL byte", p.display())))
    }
    #[cfg(not(unix))]
    {
        let _ = p;
        Err(Error::Other("no renameat2".into()))
    }
}

/// Exchanges two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); `Ok(false)` when
/// the OS or the file system cannot, so the caller falls back.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    if std::env::var_os(NO_EXCHANGE_ENV).is_some() {
        return Ok(false);
    }
    #[cfg(target_os = "linux")]
    {
        let (ca, cb) = (os_path(a)?, os_path(b)?);
        // SAFETY: two NUL-terminated paths; the syscall writes no memory.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTSUP) => Ok(false),
            _ => Err(Error::Other(format!(
                "cannot exchange {} and {}: {e}",
                a.display(),
                b.display()
            ))),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b, os_path);
        Ok(false)
    }
}

/// Hard-links the tree `from` into `to` (copying where a link is refused: another file
/// system, a link limit), so the new results hold `shards/` before they become visible and
/// the old ones keep it until then.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir(to).map_err(|e| Error::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type().map_err(|x| Error::io(&src, x))?;
        if t.is_dir() {
            link_tree(&src, &dst)?;
        } else if t.is_symlink() {
            #[cfg(unix)]
            {
                let target = std::fs::read_link(&src).map_err(|x| Error::io(&src, x))?;
                std::os::unix::fs::symlink(target, &dst).map_err(|x| Error::io(&dst, x))?;
            }
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(|x| Error::io(&src, x))?;
        }
    }
    Ok(())
}

impl Staging {
    /// Checks the target ([`Target::check`]), creates its parent directories and the staging
    /// directory beside it.
    pub fn begin(dir: &Path) -> Result<Staging> {
        let target = Target::check(dir)?;
        let parent = target.parent().to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.staging-", target.name()))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        // Results are for sharing: rwxr-xr-x, not a temporary directory's 0700.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::io(tmp.path(), e))?;
        }
        if let Ok(mut v) = IN_PROGRESS.lock() {
            v.push(tmp.path().to_path_buf());
        }
        Ok(Staging {
            target,
            dir: Some(tmp),
        })
    }

    /// Where to write the run's files.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("until commit").path()
    }

    /// The output directory the results will land in.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Swaps the staging directory into place. The entries of `<dir>` named in `carry`
    /// (`shards/`) are hard-linked into the staging directory first; then the two are
    /// exchanged in one step, so `<dir>` is at every instant the old or the new complete
    /// set; then the old set, less `carry` and `discard` (`.partial/`), becomes `<dir>.prev`
    /// (replacing an older `.prev`, which was checked to be hookgraph's) if it held results.
    pub fn commit(mut self, carry: &[&str], discard: &[&str]) -> Result<Committed> {
        let tmp = self.dir.take().expect("commit once");
        let staged = tmp.keep();
        let cleanup = |e: Error| {
            let _ = std::fs::remove_dir_all(&staged);
            unregister(&staged);
            e
        };
        // Checked again: the directory may have changed during the run.
        let target = Target::check(&self.target.dir).map_err(cleanup)?;
        if target.exists {
            for name in carry {
                let from = target.dir.join(name);
                if from.is_dir() && !staged.join(name).exists() {
                    link_tree(&from, &staged.join(name)).map_err(cleanup)?;
                }
            }
        }
        sync_dir(&staged);
        step("linked");
        // From here the staging directory is not removed by a second signal: after the
        // exchange it holds the previous results.
        SWAP_PHASE.store(1, Ordering::SeqCst);
        unregister(&staged);
        let result = swap(&target, &staged, carry, discard);
        SWAP_PHASE.store(0, Ordering::SeqCst);
        let previous = result?;
        sync_dir(target.parent());
        Ok(Committed {
            dir: target.dir,
            previous,
        })
    }
}

/// The swap proper; returns where the previous results went.
fn swap(
    target: &Target,
    staged: &Path,
    carry: &[&str],
    discard: &[&str],
) -> Result<Option<PathBuf>> {
    if !target.dir.exists() {
        std::fs::rename(staged, &target.dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(staged);
            Error::io(&target.dir, e)
        })?;
        SWAP_PHASE.store(2, Ordering::SeqCst);
        return Ok(None);
    }
    let old: PathBuf = if exchange(staged, &target.dir).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(staged);
    })? {
        staged.to_path_buf()
    } else {
        // The documented fallback: `<dir>` is missing between these two renames; a lock
        // taker puts `.NAME.swap-old` back if a kill lands there.
        let parked = target.swap_old();
        let _ = std::fs::remove_dir_all(&parked);
        std::fs::rename(&target.dir, &parked).map_err(|e| Error::io(&target.dir, e))?;
        step("parked");
        if let Err(e) = std::fs::rename(staged, &target.dir) {
            let _ = std::fs::rename(&parked, &target.dir);
            let _ = std::fs::remove_dir_all(staged);
            return Err(Error::io(&target.dir, e));
        }
        parked
    };
    SWAP_PHASE.store(2, Ordering::SeqCst);
    step("exchanged");
    // `old` holds the previous set now: its shards live on (linked) in the new one, its
    // resume checkpoint has served its purpose.
    for name in carry.iter().chain(discard) {
        let p = old.join(name);
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(&p);
        } else if p.exists() {
            let _ = std::fs::remove_file(&p);
        }
    }
    if !old.join("manifest.json").is_file() {
        let _ = std::fs::remove_dir_all(&old);
        return Ok(None);
    }
    step("prev");
    if target.prev.exists() {
        // Checked to be hookgraph's; exchanged so that `.prev` is never missing either.
        if exchange(&old, &target.prev)? {
            let _ = std::fs::remove_dir_all(&old);
            return Ok(Some(target.prev.clone()));
        }
        std::fs::remove_dir_all(&target.prev).map_err(|e| Error::io(&target.prev, e))?;
    }
    std::fs::rename(&old, &target.prev).map_err(|e| Error::io(&target.prev, e))?;
    Ok(Some(target.prev.clone()))
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(tmp) = &self.dir {
            unregister(tmp.path());
        }
    }
}

fn unregister(p: &Path) {
    if let Ok(mut v) = IN_PROGRESS.lock() {
        v.retain(|d| d != p);
    }
}

/// Makes a directory's entries durable (best effort: not every file system can).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// The identity of a file (device and inode), following symlinks; `None` if it is absent.
fn file_id(p: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        std::fs::canonicalize(p).ok().map(|c| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            c.hash(&mut h);
            (0, h.finish())
        })
    }
}

/// Checks a single output file (`runner cache --out`) before any work: never one of the
/// command's `inputs` (compared as files, so a symlink or hard link to an input counts),
/// never anything but a regular file (a FIFO, a device, a directory), and an existing file
/// only with `force`.
pub fn check_out_file(out: &Path, inputs: &[PathBuf], force: bool) -> Result<()> {
    let bad = |msg: String| Error::Other(format!("--out {}: {msg}", out.display()));
    if let Some(id) = file_id(out) {
        if let Some(input) = inputs.iter().find(|i| file_id(i) == Some(id)) {
            return Err(bad(format!(
                "is {}, which this command reads; write the output elsewhere (--force does not change this)",
                input.display()
            )));
        }
    }
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if is_loop(&e) => Err(bad("is under a symlink loop".into())),
        Err(e) => Err(Error::io(out, e)),
        Ok(m) => {
            let meta = if m.file_type().is_symlink() {
                std::fs::metadata(out).ok()
            } else {
                Some(m)
            };
            match meta {
                Some(m) if m.is_file() => {
                    if force {
                        Ok(())
                    } else {
                        Err(bad(
                            "exists; pass --force to replace it, or choose another file".into(),
                        ))
                    }
                }
                Some(m) if m.is_dir() => Err(bad("is a directory; name a file".into())),
                Some(_) => Err(bad(
                    "exists and is not a regular file (a FIFO, socket or device); name a regular file"
                        .into(),
                )),
                None => Err(bad("is a dangling symlink; remove it or name another file".into())),
            }
        }
    }
}

/// Refuses a run whose inputs (spec, checkpoint, tokenizer, dataset files) lie in the
/// output directory or its `.prev`, which the run replaces. `shards/` is the exception: a
/// merge reads it and the swap keeps it.
pub fn check_inputs_outside(target: &Target, inputs: &[PathBuf]) -> Result<()> {
    let real = |p: &Path| std::fs::canonicalize(p).ok();
    let (dir, prev) = (real(&target.dir), real(&target.prev));
    for input in inputs {
        let Some(i) = real(input) else { continue };
        let inside = |d: &Option<PathBuf>| d.as_ref().is_some_and(|d| i.starts_with(d));
        let in_shards = dir
            .as_ref()
            .is_some_and(|d| i.starts_with(crate::shard::shards_dir(d)));
        if (inside(&dir) && !in_shards) || inside(&prev) {
            return Err(Error::Other(format!(
                "{} is an input of this run but lies in {}, which the run replaces; move it out or choose another output",
                input.display(),
                (if inside(&dir) { &target.dir } else { &target.prev }).display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn manifest(files: &[&str]) -> String {
        serde_json::json!({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "identity": {"spec_sha256": "ab"},
            "files": files,
        })
        .to_string()
    }

    #[test]
    fn staging_swaps_whole_directories_and_drops_cleanly() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("deep").join("out");
        // Dropped without commit: nothing left, not even the parent's new entries.
        let s = Staging::begin(&out).unwrap();
        crate::output::write_atomic(&s.path().join("a.csv"), b"1").unwrap();
        drop(s);
        assert!(names(&root.path().join("deep")).is_empty());
        // First commit creates the directory; the second moves it to .prev.
        for (i, file) in ["a.csv", "b.csv"].iter().enumerate() {
            let s = Staging::begin(&out).unwrap();
            crate::output::write_atomic(&s.path().join(file), b"1").unwrap();
            std::fs::write(s.path().join("manifest.json"), manifest(&[file])).unwrap();
            let c = s.commit(&[], &[]).unwrap();
            assert_eq!(c.previous.is_some(), i == 1);
        }
        assert_eq!(names(&out), ["b.csv", "manifest.json"]);
        assert_eq!(
            names(&root.path().join("deep/out.prev")),
            ["a.csv", "manifest.json"]
        );
        assert_eq!(names(&root.path().join("deep")), ["out", "out.prev"]);
        // A third commit replaces .prev (hookgraph's) with the second run.
        let s = Staging::begin(&out).unwrap();
        std::fs::write(s.path().join("manifest.json"), manifest(&[])).unwrap();
        s.commit(&[], &[]).unwrap();
        assert_eq!(
            names(&root.path().join("deep/out.prev")),
            ["b.csv", "manifest.json"]
        );
        // A directory that is not a run's is refused.
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = Staging::begin(&out).unwrap_err().to_string();
        assert!(e.contains("not a hookgraph results directory"), "{e}");
        assert!(e.contains("notes.txt was not written by hookgraph"), "{e}");
        assert!(Target::check(&out.join("manifest.json")).is_err());
    }

    #[test]
    fn shards_are_in_both_sets_across_the_exchange() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        std::fs::create_dir_all(out.join("shards/0-of-1")).unwrap();
        std::fs::write(
            out.join("shards/0-of-1/shard.json"),
            r#"{"identity":{"a":1},"shard":{"index":0,"count":1}}"#,
        )
        .unwrap();
        std::fs::create_dir_all(out.join(".partial")).unwrap();
        std::fs::write(out.join("manifest.json"), manifest(&[])).unwrap();
        assert_eq!(classify(&out).unwrap(), Kind::Ours { manifest: true });
        let s = Staging::begin(&out).unwrap();
        std::fs::write(s.path().join("manifest.json"), manifest(&["x.csv"])).unwrap();
        std::fs::write(s.path().join("x.csv"), "1").unwrap();
        s.commit(&["shards"], &[".partial"]).unwrap();
        assert_eq!(names(&out), ["manifest.json", "shards", "x.csv"]);
        assert!(out.join("shards/0-of-1/shard.json").is_file());
        // The previous set keeps neither shards nor the spent checkpoint.
        assert_eq!(names(&root.path().join("out.prev")), ["manifest.json"]);
    }

    #[test]
    fn only_hookgraphs_own_content_is_recognised() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("d");
        assert_eq!(classify(&d).unwrap(), Kind::Absent);
        std::fs::create_dir(&d).unwrap();
        assert_eq!(classify(&d).unwrap(), Kind::Empty);
        for (bytes, why) in [
            (r#"{"name": "app"}"#.to_string(), "marker"),
            (r#"{"format": "hookgraph-results", "format_version": 2, "identity": {"a": 1}, "files": []}"#.into(), "version 2"),
            (r#"{"format": "hookgraph-results", "format_version": 1, "files": []}"#.into(), "identity"),
            (manifest(&["../escape"]), "plain file name"),
            ("not json".into(), "not JSON"),
        ] {
            std::fs::write(d.join("manifest.json"), &bytes).unwrap();
            match classify(&d).unwrap() {
                Kind::Foreign(w) => assert!(w.contains(why), "{w}"),
                k => panic!("{bytes}: {k:?}"),
            }
        }
        std::fs::remove_file(d.join("manifest.json")).unwrap();
        // A checkpoint directory with something else in it.
        std::fs::create_dir(d.join(".partial")).unwrap();
        std::fs::write(
            d.join(".partial/state.safetensors"),
            b"\x02\0\0\0\0\0\0\0{}",
        )
        .unwrap();
        assert!(matches!(classify(&d).unwrap(), Kind::Foreign(_)));
    }

    #[test]
    fn tilde_is_home_and_tilde_user_is_refused() {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        if let Some(h) = home {
            assert_eq!(expand_tilde(Path::new("~/r/x")).unwrap(), h.join("r/x"));
            assert_eq!(expand_tilde(Path::new("~")).unwrap(), h);
        }
        assert!(expand_tilde(Path::new("~bob/x")).is_err());
        assert_eq!(
            expand_tilde(Path::new("a/~")).unwrap(),
            PathBuf::from("a/~")
        );
    }

    #[test]
    fn an_existing_output_file_needs_force_and_an_input_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let (input, out) = (d.path().join("in"), d.path().join("out"));
        std::fs::write(&input, "x").unwrap();
        assert!(check_out_file(&out, std::slice::from_ref(&input), false).is_ok());
        std::fs::write(&out, "y").unwrap();
        assert!(check_out_file(&out, std::slice::from_ref(&input), false).is_err());
        assert!(check_out_file(&out, std::slice::from_ref(&input), true).is_ok());
        std::fs::hard_link(&input, d.path().join("hl")).unwrap();
        let e = check_out_file(&d.path().join("hl"), &[input], true).unwrap_err();
        assert!(e.to_string().contains("which this command reads"), "{e}");
    }
}
