//! Property tests ("fuzzing") of the readers of untrusted files: the spec parser, the
//! checkpoint loader (`config.json` and `model.safetensors`), the token-file reader, the
//! output directory's readers (manifest marker, checkpoint header, lock file), and the shard
//! state a resumed run or a merge reads back (the checkpoint file with its progress record,
//! `shard.json`, and each built-in's saved state). Each must turn any input into a value or
//! an error, never a panic or an abort.
//!
//! In `cargo test` each target runs a few cases (fast); `scripts/fuzz.sh` runs each for about
//! a minute (`HOOKGRAPH_FUZZ_SECONDS`, `PROPTEST_CASES` per round). Inputs are random text
//! and, more usefully, valid files with random edits: a value swapped for a hostile one, bytes
//! flipped, the safetensors header rewritten with other dtypes, shapes and offsets. A crash
//! found becomes a named regression test at the end of this file.

use std::path::Path;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use hookgraph::data::tokens_from_json;
use hookgraph::metrics::State;
use hookgraph::model::checkpoint::params_from_bytes;
use hookgraph::model::ModelConfig;
use hookgraph::shard::checkpoint::{Checkpoint, Progress};
use hookgraph::shard::{DatasetId, Identity, Shard, ShardDataset, ShardManifest};
use hookgraph::spec::LoadedSpec;

use crate::common::*;

/// Runs `test` on `strategy` for `PROPTEST_CASES` cases (default 16), in rounds with fresh
/// seeds until `HOOKGRAPH_FUZZ_SECONDS` have passed (default: one round).
fn fuzz<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("PROPTEST_CASES").unwrap_or(16) as u32;
    let seconds = env("HOOKGRAPH_FUZZ_SECONDS").unwrap_or(0);
    let start = Instant::now();
    let mut rounds = 0u64;
    loop {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{e}");
        }
        rounds += 1;
        if start.elapsed().as_secs() >= seconds {
            break;
        }
    }
    if seconds > 0 {
        eprintln!("{rounds} rounds of {cases} cases, no failure");
    }
}

/// Values that break naive parsers, for swapping into valid files.
const HOSTILE: &[&str] = &[
    "\"\"",
    "\"..\"",
    "\"/\"",
    "\"a/b\"",
    "\"all\"",
    "\"+1.0\"",
    "\"1.*\"",
    "\"-1\"",
    "0",
    "-1",
    "1",
    "3",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "1e400",
    "-0.0",
    "nan",
    "inf",
    "true",
    "[]",
    "[[]]",
    "[\"1.1\", 3]",
    "{}",
    "{ a = 1 }",
    "\"\\u0000\"",
    "\"é\"",
    "null",
    "[0]",
    "[1, 2, 3]",
    "\"F16\"",
    "\"BOOL\"",
];

/// A valid spec: every key a parser might trip on, with plain values.
const SPEC: &str = r#"name = "fuzz"
output = "out"
heads = ["1.2", "0", "1.*"]
[model]
path = "ckpt"
tokenizer = "tok"
device = "cpu"
batch_size = 4
fold_ln = true
[[dataset]]
name = "ioi"
kind = "ioi"
n = 4
seed = 1
names = ["Mary", "John"]
[[dataset]]
name = "t"
kind = "tokens"
path = "t.json"
n = 2
[[dataset]]
name = "p"
kind = "prompts"
prompts = ["hello"]
prepend_bos = false
[[metric]]
kind = "source_suppression"
only_negative = true
[[metric]]
plugin = "hg_x"
name = "x2"
opt = 1
[[view]]
heads = ["1.0"]
dataset = "ioi"
sequences = 3
"#;

/// Edits of a text file: replace a line's value with a hostile one, delete or duplicate a
/// line, or insert a random character.
#[derive(Debug, Clone)]
enum Edit {
    Value(prop::sample::Index, prop::sample::Index),
    DropLine(prop::sample::Index),
    DupLine(prop::sample::Index),
    Char(prop::sample::Index, char),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        3 => (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(l, v)| Edit::Value(l, v)),
        1 => any::<prop::sample::Index>().prop_map(Edit::DropLine),
        1 => any::<prop::sample::Index>().prop_map(Edit::DupLine),
        1 => (any::<prop::sample::Index>(), any::<char>()).prop_map(|(i, c)| Edit::Char(i, c)),
    ];
    prop::collection::vec(edit, 1..6)
}

/// Applies edits to a line-oriented text (`key = value` / `"key": value,`).
fn apply(text: &str, edits: &[Edit], sep: char) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for e in edits {
        if lines.is_empty() {
            break;
        }
        match e {
            Edit::Value(l, v) => {
                let i = l.index(lines.len());
                let line = &mut lines[i];
                if let Some(at) = line.find(sep) {
                    let comma = if line.trim_end().ends_with(',') {
                        ","
                    } else {
                        ""
                    };
                    *line = format!(
                        "{} {}{comma}",
                        &line[..=at],
                        HOSTILE[v.index(HOSTILE.len())]
                    );
                }
            }
            Edit::DropLine(l) => {
                lines.remove(l.index(lines.len()));
            }
            Edit::DupLine(l) => {
                let i = l.index(lines.len());
                let copy = lines[i].clone();
                lines.insert(i, copy);
            }
            Edit::Char(i, c) => {
                let mut s = lines.join("\n");
                let mut at = i.index(s.len() + 1);
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                s.insert(at, *c);
                lines = s.lines().map(String::from).collect();
            }
        }
    }
    lines.join("\n")
}

/// Everything the spec module offers on a parsed spec, on every model shape.
fn exercise_spec(text: &str) -> Result<(), TestCaseError> {
    match LoadedSpec::from_str(text, Path::new("f.toml")) {
        Ok(s) => {
            for (l, h) in [(1, 1), (2, 4), (12, 12), (0, 0), (3, 0)] {
                let _ = s.check_heads(l, h);
            }
            let _ = s.output_dir();
            for i in 0..s.spec.metrics.len() + 1 {
                let _ = s.metric_key_spans(i);
                let _ = s.metric_error(i, "opt", "x");
            }
            for d in &s.spec.datasets {
                let _ = hookgraph::data::check_keys(d);
                prop_assert!(hookgraph::spec::check_name(&d.name).is_ok());
            }
            prop_assert!(hookgraph::spec::check_name(&s.spec.name).is_ok());
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("f.toml"), "{msg}");
        }
    }
    Ok(())
}

#[test]
fn fuzz_spec_parser_on_edited_specs() {
    // The unedited spec parses: the edits start from a valid file.
    LoadedSpec::from_str(SPEC, Path::new("f.toml")).unwrap();
    fuzz(edits(), |e| exercise_spec(&apply(SPEC, &e, '=')));
}

#[test]
fn fuzz_spec_parser_on_random_text() {
    fuzz("(\\PC|\n|\\[|\\]|=|\"){0,200}", |t| exercise_spec(&t));
}

fn ckpt_config() -> String {
    std::fs::read_to_string(fixture("ckpt_a").join("config.json")).unwrap()
}

#[test]
fn fuzz_config_loader_on_edited_configs() {
    let text = ckpt_config();
    ModelConfig::from_json(&text).unwrap();
    let weights = std::fs::read(fixture("ckpt_a").join("model.safetensors")).unwrap();
    fuzz(edits(), |e| {
        if let Ok(cfg) = ModelConfig::from_json(&apply(&text, &e, ':')) {
            // A config that parses, against weights of another shape: an error, not a panic.
            let _ = params_from_bytes(&weights, &cfg);
        }
        Ok(())
    });
}

/// The safetensors header of `bytes`, as JSON, and where the data starts.
fn header(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), 8 + n)
}

/// Edits of a safetensors file: a tensor's dtype, shape or offsets rewritten, bytes flipped,
/// the file cut short, or the header length changed.
#[derive(Debug, Clone)]
enum StEdit {
    Dtype(prop::sample::Index, prop::sample::Index),
    Shape(prop::sample::Index, Vec<u64>),
    Offsets(prop::sample::Index, u64, u64),
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    HeaderLen(u64),
}

fn st_edits() -> impl Strategy<Value = Vec<StEdit>> {
    let big = prop_oneof![
        0u64..70,
        Just(u64::MAX),
        Just(1 << 40),
        Just(u32::MAX as u64 + 1)
    ];
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(t, d)| StEdit::Dtype(t, d)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(big.clone(), 0..4)
        )
            .prop_map(|(t, s)| StEdit::Shape(t, s)),
        (any::<prop::sample::Index>(), big.clone(), big.clone())
            .prop_map(|(t, a, b)| StEdit::Offsets(t, a, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| StEdit::Flip(i, b)),
        any::<prop::sample::Index>().prop_map(StEdit::Truncate),
        big.prop_map(StEdit::HeaderLen),
    ];
    prop::collection::vec(edit, 1..4)
}

fn apply_st(bytes: &[u8], edits: &[StEdit]) -> Vec<u8> {
    const DTYPES: &[&str] = &[
        "F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X",
    ];
    let (mut head, start) = header(bytes);
    let mut data = bytes[start..].to_vec();
    let mut raw: Option<Vec<u8>> = None;
    let keys: Vec<String> = head
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    for e in edits {
        match e {
            StEdit::Dtype(t, d) => {
                head[&keys[t.index(keys.len())]]["dtype"] = DTYPES[d.index(DTYPES.len())].into();
            }
            StEdit::Shape(t, s) => {
                head[&keys[t.index(keys.len())]]["shape"] = s.clone().into();
            }
            StEdit::Offsets(t, a, b) => {
                head[&keys[t.index(keys.len())]]["data_offsets"] = vec![*a, *b].into();
            }
            StEdit::Flip(i, b) if !data.is_empty() => {
                let i = i.index(data.len());
                data[i] ^= b;
            }
            StEdit::Flip(..) => {}
            StEdit::Truncate(i) => {
                let n = i.index(data.len() + 1);
                data.truncate(n);
            }
            StEdit::HeaderLen(n) => {
                let h = serde_json::to_vec(&head).unwrap();
                let mut out = n.to_le_bytes().to_vec();
                out.extend(h);
                out.extend(&data);
                raw = Some(out);
            }
        }
    }
    raw.unwrap_or_else(|| {
        let h = serde_json::to_vec(&head).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        out
    })
}

#[test]
fn fuzz_safetensors_loader_on_edited_checkpoints() {
    let cfg = ModelConfig::from_json(&ckpt_config()).unwrap();
    let weights = std::fs::read(fixture("ckpt_a").join("model.safetensors")).unwrap();
    params_from_bytes(&weights, &cfg).unwrap();
    fuzz(st_edits(), |e| {
        let _ = params_from_bytes(&apply_st(&weights, &e), &cfg);
        Ok(())
    });
}

#[test]
fn fuzz_safetensors_loader_on_random_bytes() {
    let cfg = ModelConfig::from_json(&ckpt_config()).unwrap();
    fuzz(prop::collection::vec(any::<u8>(), 0..300), |b| {
        let _ = params_from_bytes(&b, &cfg);
        Ok(())
    });
}

/// The reader's promises on success: the shape asked for, every id in the vocabulary,
/// one length per sequence.
fn exercise_tokens(text: &str, n: Option<usize>) -> Result<(), TestCaseError> {
    let cfg = ModelConfig::from_json(&ckpt_config()).unwrap();
    if let Ok(d) = tokens_from_json("t", Path::new("t.json"), text, n, &cfg) {
        prop_assert!(d.n_sequences() >= 1 && d.seq_len() >= 1);
        prop_assert!(d.seq_len() <= cfg.n_ctx);
        prop_assert!(d.tokens.iter().all(|&t| (t as usize) < cfg.d_vocab));
        prop_assert_eq!(d.lengths.len(), d.n_sequences());
        if let Some(n) = n {
            prop_assert_eq!(d.n_sequences(), n);
        }
    }
    Ok(())
}

#[test]
fn fuzz_token_reader_on_lists() {
    let id = prop_oneof![0u64..600, Just(u64::MAX), Just(511)];
    let rows = prop::collection::vec(prop::collection::vec(id, 0..40), 0..5);
    fuzz((rows, prop::option::of(0usize..7)), |(rows, n)| {
        exercise_tokens(&serde_json::to_string(&rows).unwrap(), n)
    });
}

#[test]
fn fuzz_token_reader_on_random_text() {
    fuzz(
        (
            "(\\[|\\]|,|-|[0-9]|e|\\.| |\"|\\PC){0,80}",
            prop::option::of(0usize..4),
        ),
        |(t, n)| exercise_tokens(&t, n),
    );
}

// ---- the output directory's readers: the manifest marker, checkpoint headers, lock files ----

/// A results manifest's head as a run writes it (pretty JSON, one key per line).
const MANIFEST: &str = r#"{
  "format": "hookgraph-results",
  "format_version": 1,
  "identity": {
    "runner_version": "0.1.0",
    "spec_sha256": "00ff"
  },
  "hookgraph_version": "0.1.0",
  "files": [
    "loss.csv",
    "index.html"
  ],
  "total_seconds": 1.5
}"#;

#[test]
fn fuzz_outdir_manifest_reader_on_edited_manifests() {
    use hookgraph::outdir::read_manifest_head;
    assert_eq!(
        read_manifest_head(MANIFEST.as_bytes()).unwrap().files.len(),
        2
    );
    fuzz(edits(), |e| {
        let text = apply(MANIFEST, &e, ':');
        if let Ok(head) = read_manifest_head(text.as_bytes()) {
            // Whatever passes names only plain files inside the directory.
            for f in &head.files {
                prop_assert!(
                    hookgraph::output::file_in(Path::new("/r"), f).is_ok(),
                    "{f}"
                );
            }
            prop_assert!(!head.identity.is_empty());
        }
        Ok(())
    });
}

#[test]
fn fuzz_outdir_readers_on_random_bytes() {
    use hookgraph::outdir::{is_checkpoint_header, read_lock_pid, read_manifest_head};
    fuzz(prop::collection::vec(any::<u8>(), 0..300), |b| {
        let _ = read_manifest_head(&b);
        let _ = is_checkpoint_header(&b);
        let _ = read_lock_pid(&b);
        Ok(())
    });
}

#[test]
fn fuzz_outdir_checkpoint_header_on_edited_headers() {
    use hookgraph::outdir::is_checkpoint_header;
    let progress = r#"{"format":1,"identity":{"spec_sha256":"ab"},"shard":{"index":0,"count":1}}"#;
    let header = serde_json::json!({"__metadata__": {"hookgraph_progress": progress}}).to_string();
    let file = |h: &str, len: Option<u64>| {
        let mut b = len.unwrap_or(h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b
    };
    assert!(is_checkpoint_header(&file(&header, None)));
    let lens = prop_oneof![
        Just(None),
        any::<u64>().prop_map(Some),
        (0u64..400).prop_map(Some)
    ];
    fuzz((edits(), lens), |(e, len)| {
        let _ = is_checkpoint_header(&file(&apply(&header, &e, ':'), len));
        Ok(())
    });
}

#[test]
fn fuzz_outdir_lock_reader() {
    use hookgraph::outdir::read_lock_pid;
    assert_eq!(read_lock_pid(b"pid 42\n"), Some(42));
    fuzz("(pid |\\PC|[0-9]|\n| ){0,80}", |t| {
        if let Some(p) = read_lock_pid(t.as_bytes()) {
            prop_assert!(p > 0);
        }
        Ok(())
    });
}

// ---- shard state: the checkpoint file, shard.json, and the metrics' saved states ---------

/// A checkpoint as a 2-dataset, 3-metric run with batch size 2 writes it mid-way through
/// its second dataset (states of `loss` and `projection_loss` in their own formats).
fn sample_checkpoint() -> Checkpoint {
    use hookgraph::metrics::state::Array;
    let mut states = std::collections::BTreeMap::new();
    for d in 0..2 {
        let mut loss = State::new();
        loss.put("seq", Array::U64(vec![0, 0, 1]))
            .put("pos", Array::U64(vec![0, 1, 0]))
            .put("token", Array::U32(vec![511, 3, 511]))
            .put("target", Array::U32(vec![3, 4, 9]))
            .put("loss", Array::F32(vec![1.5, 2.0, f32::NAN]))
            .put("is_pad", Array::U64(vec![0, 0, 1]));
        states.insert((d, 0), loss);
        let mut pl = State::new();
        pl.put("sums", Array::F64(vec![0.5; 16]))
            .put("counts", Array::U64(vec![6, 4]));
        states.insert((d, 1), pl);
    }
    let ds = |name: &str| DatasetId {
        name: name.into(),
        n_sequences: 3,
        seq_len: 4,
        tokens_sha256: "ab".repeat(32),
    };
    Checkpoint {
        progress: Progress {
            format: 1,
            identity: Identity {
                runner_version: "0.1.0".into(),
                spec_path: "/s/spec.toml".into(),
                spec_sha256: "cd".repeat(32),
                weights_sha256: "ef".repeat(32),
                config_sha256: "01".repeat(32),
                processing: Some(hookgraph::model::Processing::ALL),
                datasets: vec![ds("a"), ds("b")],
                metrics: vec!["loss".into(), "projection_loss".into(), "x".into()],
            },
            shard: Shard { index: 0, count: 1 },
            batch_size: 2,
            datasets_done: 1,
            next_sequence: 2,
            complete: false,
            failures: Vec::new(),
            timings: Vec::new(),
        },
        states,
    }
}

/// What the runner does with a checkpoint it reads back: check it against the run, compare
/// identities (messages slice hashes), and look at every state.
fn exercise_checkpoint(path: &Path, original: &Checkpoint) {
    if let Ok(ck) = Checkpoint::read(path) {
        let _ = ck.check_against("ck", &[3, 3], 3, Shard::WHOLE, 2);
        let _ = ck.check_against("ck", &[0], 1, Shard { index: 1, count: 2 }, 0);
        let _ = ck
            .progress
            .identity
            .differences("a", &original.progress.identity, "b");
        let _ = original
            .progress
            .identity
            .differences("a", &ck.progress.identity, "b");
    }
}

#[test]
fn fuzz_shard_state_reader_on_edited_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let original = sample_checkpoint();
    let path = dir.path().join("state.safetensors");
    original.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let ck = Checkpoint::read(&path).unwrap();
    ck.check_against("ck", &[3, 3], 3, Shard::WHOLE, 2).unwrap();
    // The progress record as lines (`"key": value,`) for the text edits.
    let progress = serde_json::to_string_pretty(&original.progress).unwrap();
    fuzz(
        (st_edits(), edits(), any::<bool>()),
        |(st, text, resign)| {
            // Tensor edits to the file: refused by the digest, or by the readers.
            std::fs::write(&path, apply_st(&bytes, &st)).unwrap();
            exercise_checkpoint(&path, &original);
            // Progress edits, signed again (a consistent forgery): the plan check must hold.
            let edited = apply(&progress, &text, ':');
            if let Ok(p) = serde_json::from_str::<Progress>(&edited) {
                let ck = Checkpoint {
                    progress: p,
                    states: original.states.clone(),
                };
                if ck.write(&path).is_ok() {
                    if !resign {
                        // Unsigned: the same edit pasted into the original's metadata.
                        let (mut head, start) = header(&bytes);
                        head["__metadata__"]["hookgraph_progress"] = edited.clone().into();
                        let h = serde_json::to_vec(&head).unwrap();
                        let mut out = (h.len() as u64).to_le_bytes().to_vec();
                        out.extend(h);
                        out.extend(&bytes[start..]);
                        std::fs::write(&path, out).unwrap();
                        prop_assert!(
                            edited == progress || Checkpoint::read(&path).is_err(),
                            "an edited progress record was read back as valid"
                        );
                    }
                    exercise_checkpoint(&path, &original);
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_shard_manifest_reader_on_edited_manifests() {
    let original = sample_checkpoint();
    let manifest = ShardManifest {
        identity: original.progress.identity.clone(),
        shard: Shard { index: 1, count: 2 },
        spec_toml: SPEC.into(),
        spec_path_given: "spec.toml".into(),
        device: "cpu".into(),
        hook_points: vec!["hook_embed".into()],
        datasets: vec![ShardDataset {
            name: "a".into(),
            sequences: [2, 3],
            timings: Default::default(),
        }],
        failures: Vec::new(),
        load_seconds: 0.5,
        total_seconds: 1.0,
        state_sha256: [("state.safetensors".to_string(), "00".repeat(32))].into(),
    };
    let text = serde_json::to_string_pretty(&manifest).unwrap();
    fuzz(edits(), |e| {
        if let Ok(m) = serde_json::from_str::<ShardManifest>(&apply(&text, &e, ':')) {
            let _ = m.identity.differences("a", &manifest.identity, "b");
            let _ = m.shard.check_fits(&[3, 0]);
            for d in &m.datasets {
                let _ = m.shard.range(d.sequences[1], 2);
            }
        }
        Ok(())
    });
}

/// Random saved states handed to the built-ins' `merge_state`, then `finish_dataset`: a
/// state from an edited file is refused or merged, never a panic.
#[test]
fn fuzz_shard_metric_states_on_random_arrays() {
    use dfdx::prelude::Cpu;
    use hookgraph::data::{unpadded_lengths, Dataset};
    use hookgraph::metrics::state::Array;
    use hookgraph::metrics::RunContext;
    use hookgraph::model::{self, CheckpointFiles, Processing};
    let files = CheckpointFiles::in_dir(&fixture("ckpt_a")).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let heads = [(0usize, 1usize), (1, 3)];
    let ctx = RunContext::of(&loaded, &heads);
    let tokens = load_tokens(&golden_path("tokens_a.json"));
    let dataset = Dataset {
        name: "tok".into(),
        lengths: unpadded_lengths(&tokens, 511),
        tokens,
        ioi: None,
        answers: None,
    };
    const KEYS: &[&str] = &[
        "seq",
        "pos",
        "token",
        "target",
        "loss",
        "is_pad",
        "sums",
        "counts",
        "per_sequence",
        "per_position",
    ];
    let value = prop_oneof![0u64..12, Just(511), Just(u64::MAX), Just(1 << 40)];
    let array = (0usize..5, prop::collection::vec(value, 0..40)).prop_map(|(t, v)| match t {
        0 => Array::U8(v.iter().map(|&x| x as u8).collect()),
        1 => Array::F32(v.iter().map(|&x| x as f32).collect()),
        2 => Array::F64(v.iter().map(|&x| x as f64).collect()),
        3 => Array::U32(v.iter().map(|&x| x as u32).collect()),
        _ => Array::U64(v),
    });
    let state = prop::collection::vec((prop::sample::select(KEYS), array), 0..8);
    const KINDS: &[&str] = &["loss", "projection_loss", "source_suppression"];
    fuzz(
        (prop::sample::select(KINDS), state, 1usize..3),
        |(kind, st, times)| {
            let mut m = hookgraph::metrics::builtin(kind, &toml::Table::new()).unwrap();
            m.start_dataset(&ctx, &dataset).unwrap();
            let mut state = State::new();
            for (k, a) in st {
                state.put(k, a);
            }
            for _ in 0..times {
                if m.merge_state(&ctx, &dataset, &state).is_err() {
                    return Ok(());
                }
            }
            let _ = m.finish_dataset(&ctx, &dataset);
            Ok(())
        },
    );
}

// ---- crashes the fuzzing found, kept as regression tests ---------------------------------

#[test]
fn regression_heads_on_a_model_without_layers_or_heads() {
    // Panicked ("attempt to subtract with overflow") building the out-of-range message.
    use hookgraph::spec::{parse_heads, Heads};
    for (l, h) in [(0, 0), (0, 4), (3, 0)] {
        let e = parse_heads(&Heads::List(vec!["0".into()]), l, h).unwrap_err();
        assert!(e.contains("no head"), "{e}");
    }
}

#[test]
fn regression_config_sizes_beyond_any_gpt2_are_refused() {
    // n_layer = 2^64-1 parsed, then overflowed a capacity in the checkpoint loader.
    let weights = std::fs::read(fixture("ckpt_a").join("model.safetensors")).unwrap();
    for (key, value) in [
        ("\"n_layer\": 2", "\"n_layer\": 18446744073709551615"),
        ("\"n_embd\": 32", "\"n_embd\": 9223372036854775808"),
        ("\"n_inner\": null", "\"n_inner\": 18446744073709551615"),
    ] {
        let text = ckpt_config().replace(key, value);
        assert_ne!(text, ckpt_config(), "{key}");
        match ModelConfig::from_json(&text) {
            Ok(cfg) => assert!(params_from_bytes(&weights, &cfg).is_err()),
            Err(e) => assert!(e.contains("larger than"), "{e}"),
        }
    }
}

#[test]
fn regression_shard_manifest_with_a_huge_shard_count_is_refused() {
    // A shard.json edited to index 9799832789158199296 of 8070450532247928832 parsed, then
    // overflowed `(index + 1) * batches` in `Shard::range` (CI, 2026-12-06).
    let text = r#"{"index": 9799832789158199296, "count": 8070450532247928832}"#;
    assert!(serde_json::from_str::<Shard>(text).is_err());
    let s = Shard {
        index: 9799832789158199296,
        count: 8070450532247928832,
    };
    let r = s.range(3, 2);
    assert!(r.start <= r.end && r.end <= 3, "{r:?}");
}
