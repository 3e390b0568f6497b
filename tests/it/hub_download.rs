//! Downloads from a hub mirror: a real HTTP server on 127.0.0.1 speaks the hub's protocol
//! for a tiny checkpoint (ckpt_a), and the `runner` binary is pointed at it with
//! `HF_ENDPOINT`, as a user behind a mirror would be.
//!
//! The server does what huggingface.co does for `gpt2`: a relative 307 from the legacy id to
//! `openai-community/gpt2`, `x-repo-commit` and `etag` on small files, a 302 to a "CDN" URL
//! with `x-linked-etag` (the sha256) for the LFS weights, and `Range` requests answered with
//! 206 and `Content-Range`. It refuses requests without the bearer token, like a gated repo.
//! Every subprocess gets its own cache and no proxy; the test's own environment is untouched.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::common::*;
use hookgraph::model::hub::find_in_cache;

const COMMIT: &str = "4a2f0c19e0d3b8e2c6f5a7d9b1e3c5a7d9f1b3e5";
const TOKEN: &str = "hf_loopbackTestToken";

/// How the server answers the next body request for the weights (one shot, then `FULL`).
const FULL: u8 = 0;
/// Sends a full `Content-Length` and closes after half the bytes (a dropped connection).
const CUT_WITH_LENGTH: u8 = 1;
/// Sends no length and closes after half the bytes: the client cannot tell it was cut.
const CUT_WITHOUT_LENGTH: u8 = 2;

struct File {
    bytes: Vec<u8>,
    etag: String,
    lfs: bool,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

/// A loopback hub, serving until dropped. Connections are handled one at a time (the
/// client downloads sequentially) and every read has a timeout, so a confused client cannot
/// hang the test.
struct LoopbackHub {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackHub {
    fn start() -> Self {
        let mut files = HashMap::new();
        for (name, lfs) in [("config.json", false), ("model.safetensors", true)] {
            let bytes = std::fs::read(fixture("ckpt_a").join(name)).unwrap();
            let sha = hex::encode(Sha256::digest(&bytes));
            // Small files' etag is a git blob id (40 hex digits); LFS files' is the sha256.
            let etag = if lfs { sha } else { sha[..40].to_string() };
            files.insert(name.to_string(), File { bytes, etag, lfs });
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(AtomicU8::new(FULL));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, m, st) = (seen.clone(), mode.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, port, &files, &s, &m);
                }
            }
        });
        LoopbackHub {
            port,
            seen,
            mode,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        // A trailing slash, as users often write it: the client must not double it.
        format!("http://127.0.0.1:{}/", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn file(name: &str) -> (Vec<u8>, String) {
        let bytes = std::fs::read(fixture("ckpt_a").join(name)).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        (bytes, sha)
    }
}

impl Drop for LoopbackHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one request on `conn`, then closes it (`Connection: close`).
fn serve(
    mut conn: TcpStream,
    port: u16,
    files: &HashMap<String, File>,
    seen: &Mutex<Vec<Seen>>,
    mode: &AtomicU8,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Seen {
        path: path.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    };
    seen.lock().unwrap().push(req.clone());

    let respond = |conn: &mut TcpStream, status: &str, extra: &[(String, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        conn.write_all(head.as_bytes())?;
        conn.write_all(body)
    };
    let h = |k: &str, v: String| (k.to_string(), v);

    if let Some(file) = path.strip_prefix("/gpt2/resolve/main/") {
        // The legacy id moved: the hub answers with a redirect relative to itself.
        let to = format!("/openai-community/gpt2/resolve/main/{file}");
        return respond(
            &mut conn,
            "307 Temporary Redirect",
            &[h("Location", to)],
            b"",
        );
    }
    if let Some(name) = path.strip_prefix("/openai-community/gpt2/resolve/main/") {
        if req.auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            return respond(&mut conn, "401 Unauthorized", &[], b"gated repo");
        }
        let Some(f) = files.get(name) else {
            let hdr = [
                h("x-repo-commit", COMMIT.into()),
                h("x-error-code", "EntryNotFound".into()),
            ];
            return respond(&mut conn, "404 Not Found", &hdr, b"");
        };
        if f.lfs {
            // The "CDN" is another host name for the same server, as on huggingface.co:
            // huggingface_hub follows redirects that stay on the hub's host and reads the
            // metadata from the first one that leaves it.
            let to = format!("http://localhost:{port}/cdn/{}", f.etag);
            let hdr = [
                h("Location", to),
                h("x-repo-commit", COMMIT.into()),
                h("x-linked-etag", format!("\"{}\"", f.etag)),
                h("x-linked-size", f.bytes.len().to_string()),
                h(
                    "etag",
                    "\"0000000000000000000000000000000000000000\"".into(),
                ),
            ];
            return respond(&mut conn, "302 Found", &hdr, b"");
        }
        let hdr = [
            h("x-repo-commit", COMMIT.into()),
            h("etag", format!("\"{}\"", f.etag)),
        ];
        return send_range(&mut conn, &f.bytes, req.range.as_deref(), &hdr, FULL);
    }
    if let Some(sha) = path.strip_prefix("/cdn/") {
        if let Some(f) = files.values().find(|f| f.etag == sha) {
            // Only a body request is cut, never the 1-byte metadata probe.
            let body_request = req.range.as_deref() != Some("bytes=0-0");
            let cut = if body_request {
                mode.swap(FULL, Ordering::SeqCst)
            } else {
                FULL
            };
            return send_range(&mut conn, &f.bytes, req.range.as_deref(), &[], cut);
        }
    }
    respond(&mut conn, "404 Not Found", &[], b"")
}

/// Sends `bytes` or the part a `Range: bytes=a-b` / `bytes=a-` asks for, as a 206 with
/// `Content-Range`; `cut` stops after half the body and closes the connection.
fn send_range(
    conn: &mut TcpStream,
    bytes: &[u8],
    range: Option<&str>,
    extra: &[(String, String)],
    cut: u8,
) -> std::io::Result<()> {
    let total = bytes.len();
    let (status, start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse().unwrap()
            };
            ("206 Partial Content", a, b.min(total - 1))
        }
        None => ("200 OK", 0, total - 1),
    };
    let body = &bytes[start..=end];
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if range.is_some() {
        head.push_str(&format!("Content-Range: bytes {start}-{end}/{total}\r\n"));
    }
    if cut != CUT_WITHOUT_LENGTH {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if cut == FULL {
        conn.write_all(body)?;
    } else {
        conn.write_all(&body[..body.len() / 2])?;
        conn.flush()?;
        conn.shutdown(std::net::Shutdown::Both)?;
    }
    Ok(())
}

/// `runner cache --model gpt2` with a clean hub environment plus `vars`, bounded in time.
fn run_gpt2<V: AsRef<std::ffi::OsStr>>(
    out: &Path,
    vars: &[(&str, V)],
) -> assert_cmd::assert::Assert {
    run_gpt2_in(&root(), out, vars)
}

/// [`run_gpt2`] with `cwd` as the working directory.
fn run_gpt2_in<V: AsRef<std::ffi::OsStr>>(
    cwd: &Path,
    out: &Path,
    vars: &[(&str, V)],
) -> assert_cmd::assert::Assert {
    let mut cmd = runner();
    cmd.current_dir(cwd);
    for k in [
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HF_HOME",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HUGGING_FACE_HUB_TOKEN",
        "HUGGINGFACE_HUB_CACHE",
        "TRANSFORMERS_OFFLINE",
        "XDG_CACHE_HOME",
        // ureq honours these: a CI proxy must not see (or swallow) loopback requests.
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in vars {
        cmd.env(k, v.as_ref());
    }
    cmd.args(["cache", "--model", "gpt2", "--tokens"])
        .arg(root().join("tests/golden/tokens_a.json"))
        .args(["--hooks", "logits", "--out"])
        .arg(out)
        .timeout(Duration::from_secs(120))
        .assert()
}

fn check_logits(out: &Path) {
    let file = read_tensor_file(out);
    let gold = load_golden("a_processed.safetensors");
    assert_close("logits", &file.f32["logits"], &gold["logits"], RTOL, ATOL);
}

fn stderr(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&a.get_output().stderr).into_owned()
}

/// The repo folder in the cache, and the layout check Python's `huggingface_hub` relies on:
/// `refs/main` holds the commit, `snapshots/<commit>/<file>` links to `../../blobs/<etag>`,
/// and each blob holds the served bytes.
fn check_layout(cache: &Path) -> PathBuf {
    let root = cache.join("models--gpt2");
    let main = std::fs::read_to_string(root.join("refs/main")).unwrap();
    assert_eq!(main.trim(), COMMIT);
    let snap = root.join("snapshots").join(COMMIT);
    for name in ["config.json", "model.safetensors"] {
        let (bytes, sha) = LoopbackHub::file(name);
        let etag = if name == "model.safetensors" {
            sha
        } else {
            sha[..40].to_string()
        };
        let link = std::fs::read_link(snap.join(name)).unwrap();
        assert_eq!(link, Path::new("../../blobs").join(&etag), "{name}");
        assert_eq!(
            std::fs::read(root.join("blobs").join(&etag)).unwrap(),
            bytes,
            "{name}"
        );
    }
    for e in std::fs::read_dir(root.join("blobs")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".part"), "left a partial download: {name}");
    }
    assert_eq!(find_in_cache(cache, "gpt2"), Some(snap.clone()));
    snap
}

#[test]
fn downloads_from_hf_endpoint_into_the_python_cache_layout_then_runs_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let cache_s = cache.to_str().unwrap();
    let hub = LoopbackHub::start();
    let ep = hub.endpoint();
    let out = tmp.path().join("a.safetensors");

    // Without the token the gated repo refuses, and the error names the mirror.
    let a = run_gpt2(
        &out,
        &[("HF_ENDPOINT", ep.as_str()), ("HF_HUB_CACHE", cache_s)],
    )
    .code(1);
    let err = stderr(&a);
    assert!(
        err.contains("401") && err.contains(ep.trim_end_matches('/')),
        "{err}"
    );
    assert!(!out.exists());

    let vars = [
        ("HF_ENDPOINT", ep.as_str()),
        ("HF_HUB_CACHE", cache_s),
        ("HF_TOKEN", TOKEN),
    ];
    let a = run_gpt2(&out, &vars).success();
    assert!(!stderr(&a).contains(TOKEN), "the token leaked into the log");
    check_logits(&out);
    let snap = check_layout(&cache);
    let meta = read_tensor_file(&out).metadata;
    assert_eq!(meta["model_path"], snap.display().to_string());

    let seen = hub.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert!(
        paths.contains(&"/gpt2/resolve/main/model.safetensors"),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p.contains("//")),
        "doubled slash: {paths:?}"
    );
    for s in seen
        .iter()
        .filter(|s| s.path.starts_with("/openai-community/"))
    {
        assert!(s.range.is_some(), "hub probes by range: {s:?}");
    }
    let weights_body = seen
        .iter()
        .any(|s| s.path.starts_with("/cdn/") && s.range.as_deref() == Some("bytes=0-"));
    assert!(weights_body, "{seen:?}");

    // The mirror gone and HF_HUB_OFFLINE set: the cache alone serves the second run.
    drop(hub);
    let out2 = tmp.path().join("b.safetensors");
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache_s)];
    run_gpt2(&out2, &offline).success();
    check_logits(&out2);
}

#[test]
fn token_file_under_hf_home_and_its_hub_cache() {
    // No HF_TOKEN, no HF_HUB_CACHE: `huggingface-cli login`'s token file and $HF_HOME/hub.
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), format!("{TOKEN}\n")).unwrap();
    let hub = LoopbackHub::start();
    let out = tmp.path().join("a.safetensors");
    let vars = [
        ("HF_ENDPOINT", hub.endpoint()),
        ("HF_HOME", home.display().to_string()),
    ];
    run_gpt2(&out, &vars).success();
    check_logits(&out);
    check_layout(&home.join("hub"));
}

#[test]
fn a_download_cut_off_halfway_is_never_taken_for_a_complete_file() {
    for cut in [CUT_WITH_LENGTH, CUT_WITHOUT_LENGTH] {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("hub");
        let cache_s = cache.to_str().unwrap();
        let hub = LoopbackHub::start();
        let ep = hub.endpoint();
        let vars = [
            ("HF_ENDPOINT", ep.as_str()),
            ("HF_HUB_CACHE", cache_s),
            ("HF_TOKEN", TOKEN),
        ];
        let out = tmp.path().join("a.safetensors");

        hub.mode.store(cut, Ordering::SeqCst);
        let a = run_gpt2(&out, &vars).code(1);
        let err = stderr(&a);
        assert!(err.contains("model.safetensors"), "cut {cut}: {err}");
        assert!(!out.exists());
        let (bytes, sha) = LoopbackHub::file("model.safetensors");
        let root = cache.join("models--gpt2");
        let snap_file = root
            .join("snapshots")
            .join(COMMIT)
            .join("model.safetensors");
        assert!(
            snap_file.symlink_metadata().is_err(),
            "cut {cut}: snapshot link left"
        );
        if let Ok(b) = std::fs::read(root.join("blobs").join(&sha)) {
            assert_eq!(
                b, bytes,
                "cut {cut}: a short blob under the complete file's name"
            );
        }
        assert_eq!(find_in_cache(&cache, "gpt2"), None, "cut {cut}");

        // Offline, the half file is not a checkpoint: "not in the cache", not a parse error.
        let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache_s)];
        let err = stderr(&run_gpt2(&out, &offline).code(1));
        assert!(
            err.contains("is not in the HuggingFace cache"),
            "cut {cut}: {err}"
        );

        // Online again, the download completes (resuming with a range where it can).
        run_gpt2(&out, &vars).success();
        check_logits(&out);
        check_layout(&cache);
        if cut == CUT_WITH_LENGTH {
            let half = format!("bytes={}-", bytes.len() / 2);
            let resumed = hub.seen().iter().any(|s| s.range.as_deref() == Some(&half));
            assert!(
                resumed,
                "no resume from byte {}: {:?}",
                bytes.len() / 2,
                hub.seen()
            );
        }
    }
}

/// A Python with hookgraph's module and huggingface_hub: `HOOKGRAPH_TEST_PYTHON`, which
/// `.ci/run` sets to its venv's (so there this test always runs); unset, it is skipped.
fn test_python() -> Option<PathBuf> {
    let p = std::env::var_os("HOOKGRAPH_TEST_PYTHON").filter(|p| !p.is_empty());
    if p.is_none() {
        eprintln!("skipped: HOOKGRAPH_TEST_PYTHON is not set (a Python with huggingface_hub)");
    }
    p.map(PathBuf::from)
}

/// The wheel's runner has no Rust client: it downloads with the huggingface_hub of the
/// Python beside it, or of `HOOKGRAPH_PYTHON` (what this test sets, on the cargo-built
/// runner). Same mirror, same cache layout, same hash check as the Rust client.
#[test]
fn downloads_through_python_huggingface_hub() {
    let Some(python) = test_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let hub = LoopbackHub::start();
    // The runner's environment: downloads through `python`, from the loopback hub, into
    // `cache`, with the token or without.
    let env = |cache: &Path, token: bool| {
        let mut v = vec![
            ("HOOKGRAPH_PYTHON", python.display().to_string()),
            (
                "PYTHONPATH",
                root().join("python/src").display().to_string(),
            ),
            ("HF_HUB_DISABLE_TELEMETRY", "1".to_string()),
            ("HF_ENDPOINT", hub.endpoint()),
            ("HF_HUB_CACHE", cache.display().to_string()),
        ];
        if token {
            v.push(("HF_TOKEN", TOKEN.to_string()));
        }
        v
    };
    let cache = tmp.path().join("hub");
    let out = tmp.path().join("a.safetensors");

    // Without the token: huggingface_hub's own error, through the runner's message.
    let err = stderr(&run_gpt2(&out, &env(&cache, false)).code(1));
    assert!(
        err.contains("huggingface_hub") && err.contains("401"),
        "{err}"
    );
    assert!(!out.exists());

    let a = run_gpt2(&out, &env(&cache, true)).success();
    assert!(!stderr(&a).contains(TOKEN), "the token leaked into the log");
    check_logits(&out);
    check_layout(&cache);

    // A body cut off without a length: huggingface_hub cannot tell, the hash check can.
    let cache2 = tmp.path().join("hub2");
    hub.mode.store(CUT_WITHOUT_LENGTH, Ordering::SeqCst);
    let out2 = tmp.path().join("b.safetensors");
    let err = stderr(&run_gpt2(&out2, &env(&cache2, true)).code(1));
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(!out2.exists());
    assert_eq!(find_in_cache(&cache2, "gpt2"), None);
    run_gpt2(&out2, &env(&cache2, true)).success();
    check_logits(&out2);

    // Run from a directory holding a planted `hookgraph` package, with a relative
    // PYTHONPATH: the helper imports the real module (the relative entry still resolves
    // from where the user ran), never the planted one (`python -m` puts the working
    // directory first on sys.path; the runner runs it elsewhere, with PYTHONSAFEPATH).
    let planted = tmp.path().join("planted");
    std::fs::create_dir_all(planted.join("hookgraph")).unwrap();
    let marker = tmp.path().join("planted-code-ran");
    std::fs::write(planted.join("hookgraph/__init__.py"), "").unwrap();
    std::fs::write(
        planted.join("hookgraph/_download.py"),
        format!(
            "open({:?}, 'w').close()\nprint('ok /nowhere')\n",
            marker.display().to_string()
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink(root().join("python/src"), planted.join("src")).unwrap();
    let mut relative = env(&tmp.path().join("hub4"), true);
    relative[1].1 = "src".into();
    let out4 = tmp.path().join("d.safetensors");
    run_gpt2_in(&planted, &out4, &relative).success();
    assert!(!marker.exists(), "the planted hookgraph/_download.py ran");
    check_logits(&out4);

    // A Python that cannot run the helper: a clear error, nothing written.
    let mut missing = env(&tmp.path().join("hub3"), true);
    missing[0].1 = "/nonexistent/python3".into();
    let out3 = tmp.path().join("c.safetensors");
    let err = stderr(&run_gpt2(&out3, &missing).code(1));
    assert!(
        err.contains("/nonexistent/python3") && err.contains("HOOKGRAPH_PYTHON"),
        "{err}"
    );
    assert!(!out3.exists());
}
