//! Datasets built from `[[dataset]]` tables: ioi, text, tokens, prompts.

use std::path::{Path, PathBuf};

use hookgraph::data::{build, ioi, DataContext, Dataset};
use hookgraph::model::ModelConfig;
use hookgraph::spec::DatasetSpec;
use hookgraph::tokenizer::GptTokenizer;

use crate::common::root;

fn gpt2_tok() -> GptTokenizer {
    let dir = root().join("experiments/checkpoints/tiny-gpt2");
    GptTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap()
}

/// GPT-2 small's shapes (what the tokenizer's ids need).
fn gpt2_cfg(n_ctx: usize) -> ModelConfig {
    ModelConfig {
        n_layers: 12,
        n_heads: 12,
        d_model: 768,
        d_head: 64,
        d_mlp: 3072,
        d_vocab: 50257,
        n_ctx,
        eps: 1e-5,
        bos_token_id: 50256,
    }
}

/// The tiny checkpoint's config (d_vocab 512, n_ctx 32, BOS 511).
fn tiny_cfg() -> ModelConfig {
    ModelConfig::from_file(&root().join("tests/fixtures/ckpt_a/config.json")).unwrap()
}

fn spec(toml: &str) -> DatasetSpec {
    toml::from_str(&format!("name = \"d\"\n{toml}")).expect("test spec parses")
}

fn corpus_dir() -> PathBuf {
    root().join("tests/fixtures/corpus")
}

/// Builds with the GPT-2 tokenizer and config, paths relative to `dir`.
fn build_gpt2(toml: &str, dir: &Path, n_ctx: usize) -> hookgraph::Result<Dataset> {
    let tok = gpt2_tok();
    let cfg = gpt2_cfg(n_ctx);
    let ctx = DataContext {
        tokenizer: Some(&tok),
        cfg: &cfg,
        spec_dir: dir,
    };
    build(&spec(toml), &ctx)
}

fn ok(toml: &str) -> Dataset {
    build_gpt2(toml, &corpus_dir(), 1024).unwrap()
}

fn fails(toml: &str) -> String {
    build_gpt2(toml, &corpus_dir(), 1024)
        .unwrap_err()
        .to_string()
}

fn row(ds: &Dataset, i: usize) -> Vec<u32> {
    ds.tokens.row(i).to_vec()
}

// ---------------------------------------------------------------- ioi

#[test]
fn ioi_defaults_and_reproducible_for_a_seed() {
    let a = ok("kind = \"ioi\"");
    assert_eq!(a.n_sequences(), ioi::DEFAULT_N);
    let b = ok("kind = \"ioi\"\nseed = 0");
    assert_eq!(a.tokens, b.tokens);
    let ta: Vec<_> = a.ioi.as_ref().unwrap().iter().map(|p| &p.text).collect();
    let tb: Vec<_> = b.ioi.as_ref().unwrap().iter().map(|p| &p.text).collect();
    assert_eq!(ta, tb);
    let c = ok("kind = \"ioi\"\nseed = 1");
    let tc: Vec<_> = c.ioi.as_ref().unwrap().iter().map(|p| &p.text).collect();
    assert_ne!(ta, tc, "different seeds gave the same prompts");
}

#[test]
fn ioi_symmetric_pairs_are_name_swaps() {
    let ds = ok("kind = \"ioi\"\nn = 40\nseed = 3");
    let p = ds.ioi.as_ref().unwrap();
    assert_eq!(p.len(), 40);
    for pair in p.chunks(2) {
        let (x, y) = (&pair[0], &pair[1]);
        assert_eq!(
            (x.io_name.as_str(), x.s_name.as_str()),
            (y.s_name.as_str(), y.io_name.as_str())
        );
        assert_ne!(x.io_name, x.s_name);
        assert_eq!(x.template, y.template);
        assert_eq!(
            (x.io_pos, x.s1_pos, x.s2_pos, x.end_pos),
            (y.io_pos, y.s1_pos, y.s2_pos, y.end_pos)
        );
        // Swapping the two names in one text gives the other.
        let swapped: String = x
            .text
            .split(' ')
            .map(|w| {
                let core = w.trim_end_matches([',', '.']);
                let rest = &w[core.len()..];
                if core == x.io_name {
                    format!("{}{rest}", x.s_name)
                } else if core == x.s_name {
                    format!("{}{rest}", x.io_name)
                } else {
                    w.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(swapped, y.text);
    }
    // Without symmetry, odd n is fine and neighbours are independent draws.
    let ds = ok("kind = \"ioi\"\nn = 7\nsymmetric = false");
    assert_eq!(ds.n_sequences(), 7);
    let e = fails("kind = \"ioi\"\nn = 7");
    assert!(e.contains("n = 7") && e.contains("even"), "{e}");
}

#[test]
fn ioi_positions_point_at_the_names() {
    let tok = gpt2_tok();
    let ds = ok("kind = \"ioi\"\nn = 200\nseed = 11");
    let prompts = ds.ioi.as_ref().unwrap();
    let k = ioi::BABA_TEMPLATES.len();
    let (mut baba, mut abba) = (0, 0);
    for (i, p) in prompts.iter().enumerate() {
        let t = row(&ds, i);
        let io = tok.encode(&format!(" {}", p.io_name)).unwrap();
        let s = tok.encode(&format!(" {}", p.s_name)).unwrap();
        assert_eq!(t[0], 50256, "BOS first");
        assert_eq!(t[p.io_pos], io[0], "{}", p.text);
        assert_eq!(t[p.s1_pos], s[0], "{}", p.text);
        assert_eq!(t[p.s2_pos], s[0], "{}", p.text);
        assert_eq!(p.answer, io[0]);
        assert_eq!(tok.decode_one(t[p.end_pos]), " to", "{}", p.text);
        assert_eq!(p.end_pos + 1, ds.lengths[i]);
        assert!(
            t[ds.lengths[i]..].iter().all(|&x| x == 50256),
            "right padding is BOS"
        );
        assert_eq!(tok.encode(&p.text).unwrap(), t[1..ds.lengths[i]].to_vec());
        assert!(p.s1_pos < p.s2_pos && p.io_pos < p.s2_pos);
        if p.template < k {
            baba += 1;
            assert!(p.s1_pos < p.io_pos, "BABA: {}", p.text);
        } else {
            abba += 1;
            assert!(p.io_pos < p.s1_pos, "ABBA: {}", p.text);
        }
        assert!(p.template < 2 * k);
    }
    assert!(baba > 0 && abba > 0, "{baba} BABA, {abba} ABBA");
    assert_eq!(ds.seq_len(), ds.lengths.iter().copied().max().unwrap());
}

/// Our tokenizer (the `tokenizers` crate on fancy-regex, Cargo.toml says why) against
/// Hugging Face's Python tokenizer (Oniguruma), which TL's `to_tokens` uses, on texts that
/// stress GPT-2's pattern: whitespace runs before words (its lookahead), contractions, other
/// scripts, emoji, combining marks, the special token. tests/golden/make_tokenizer_golden.py.
#[test]
fn tokenizer_matches_hugging_face() {
    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
    }
    let golden = std::fs::read_to_string(root().join("tests/golden/tokenizer_gpt2.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&golden).unwrap();
    assert!(cases.len() >= 20);
    let tok = gpt2_tok();
    for c in &cases {
        assert_eq!(tok.encode(&c.text).unwrap(), c.ids, "{:?}", c.text);
    }
}

#[test]
fn ioi_builtin_names_are_single_gpt2_tokens() {
    let tok = gpt2_tok();
    assert!(ioi::NAMES.len() >= 90);
    for name in ioi::NAMES {
        let ids = tok.encode(&format!(" {name}")).unwrap();
        assert_eq!(ids.len(), 1, "' {name}' -> {ids:?}");
    }
}

#[test]
fn ioi_overrides_are_used_and_checked() {
    let ds = ok(r#"kind = "ioi"
n = 6
names = ["Mary", "John"]
places = ["park"]
objects = ["book"]
templates = ["Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]"]"#);
    for p in ds.ioi.as_ref().unwrap() {
        assert!(
            p.text == "Then, John and Mary went to the park. John gave a book to"
                || p.text == "Then, Mary and John went to the park. Mary gave a book to"
                || p.text == "Then, Mary and John went to the park. John gave a book to"
                || p.text == "Then, John and Mary went to the park. Mary gave a book to",
            "{}",
            p.text
        );
    }
    let e = fails("kind = \"ioi\"\nnames = [\"Mary\", \"Bartholomew\", \"John\"]");
    assert!(e.contains("dataset 'd'"), "{e}");
    assert!(e.contains("'Bartholomew'") && e.contains("3 tokens"), "{e}");
    let e = fails("kind = \"ioi\"\ntemplates = [\"Then, [A] and [B] left. [B] said to\"]");
    assert!(e.contains("template 1") && e.contains("BABA"), "{e}");
    let e = fails("kind = \"ioi\"\nplaces = []");
    assert!(e.contains("`places`"), "{e}");
}

#[test]
fn ioi_prompt_longer_than_context_errors() {
    let e = build_gpt2("kind = \"ioi\"", &corpus_dir(), 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("context"), "{e}");
}

// ---------------------------------------------------------------- text

fn jsonl_docs() -> Vec<String> {
    std::fs::read_to_string(corpus_dir().join("web.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// [BOS] + ids of each document, as the notebook's `to_tokens`.
fn with_bos(tok: &GptTokenizer, docs: &[String]) -> Vec<Vec<u32>> {
    docs.iter()
        .map(|d| {
            std::iter::once(50256)
                .chain(tok.encode(d).unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn text_jsonl_drop_keeps_long_documents_in_order() {
    let tok = gpt2_tok();
    let full = with_bos(&tok, &jsonl_docs());
    let seq_len = 20;
    let long: Vec<&Vec<u32>> = full.iter().filter(|r| r.len() >= seq_len).collect();
    assert!(
        long.len() >= 6 && long.len() < full.len(),
        "fixture needs short and long docs"
    );

    let ds = ok("kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 20");
    assert_eq!(ds.n_sequences(), long.len());
    assert_eq!(ds.seq_len(), seq_len);
    for (i, r) in long.iter().enumerate() {
        assert_eq!(row(&ds, i), r[..seq_len].to_vec());
        assert_eq!(ds.lengths[i], seq_len);
    }
    // n counts kept documents.
    let ds = ok("kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 20\nn = 3");
    assert_eq!(ds.n_sequences(), 3);
    assert_eq!(row(&ds, 2), long[2][..seq_len].to_vec());
    let e = fails("kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 20\nn = 12");
    assert!(e.contains("n = 12"), "{e}");
}

#[test]
fn text_pad_keeps_short_documents_padded_with_bos() {
    let tok = gpt2_tok();
    let full = with_bos(&tok, &jsonl_docs());
    let ds = ok("kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 20\nshort = \"pad\"");
    assert_eq!(ds.n_sequences(), full.len());
    assert_eq!(ds.seq_len(), 20);
    for (i, r) in full.iter().enumerate() {
        let len = r.len().min(20);
        assert_eq!(ds.lengths[i], len);
        assert_eq!(row(&ds, i)[..len], r[..len]);
        assert!(row(&ds, i)[len..].iter().all(|&t| t == 50256));
    }
    // "Click here to subscribe." is short: padded, and its length is its real length.
    assert!(ds.lengths[1] < 20);
}

#[test]
fn text_txt_documents_split_on_blank_lines() {
    let tok = gpt2_tok();
    let ds = ok("kind = \"text\"\npath = \"notes.txt\"\nseq_len = 12\nshort = \"pad\"");
    assert_eq!(ds.n_sequences(), 5);
    let first = "The lighthouse on the north cape was built in 1874 and still guides fishing boats\nhome through the narrow channel between the rocks, although its keeper retired long ago.";
    let want = with_bos(&tok, &[first.to_string()]);
    assert_eq!(row(&ds, 0), want[0][..12].to_vec());
    let ds = ok("kind = \"text\"\npath = \"notes.txt\"\nseq_len = 12");
    assert_eq!(ds.n_sequences(), 3, "the two short notes are dropped");
}

#[test]
fn text_shuffle_is_reproducible() {
    let base =
        "kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 8\nshort = \"pad\"\nshuffle = true";
    let a = ok(&format!("{base}\nseed = 5"));
    let b = ok(&format!("{base}\nseed = 5"));
    let c = ok(&format!("{base}\nseed = 6"));
    let plain = ok("kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 8\nshort = \"pad\"");
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
    assert_ne!(a.tokens, plain.tokens);
    // Same documents, another order.
    let mut ra: Vec<_> = (0..a.n_sequences()).map(|i| row(&a, i)).collect();
    let mut rp: Vec<_> = (0..plain.n_sequences()).map(|i| row(&plain, i)).collect();
    ra.sort();
    rp.sort();
    assert_eq!(ra, rp);
    let e = fails("kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 8\nseed = 5");
    assert!(e.contains("shuffle"), "{e}");
}

#[test]
fn text_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"text\": \"ok\"}\n{\"text\": \"oops}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("empty.txt"), "\n\n  \n").unwrap();
    std::fs::write(dir.path().join("c.csv"), "text\n").unwrap();
    let f = |toml: &str| build_gpt2(toml, dir.path(), 1024).unwrap_err().to_string();

    let e = f("kind = \"text\"\npath = \"bad.jsonl\"\nseq_len = 4");
    assert!(e.contains("bad.jsonl:2:"), "{e}");
    let e = f("kind = \"text\"\npath = \"missing.jsonl\"\nseq_len = 4");
    assert!(
        e.contains("missing.jsonl") && e.contains("dataset 'd'"),
        "{e}"
    );
    let e = f("kind = \"text\"\npath = \"empty.txt\"\nseq_len = 4");
    assert!(e.contains("no documents"), "{e}");
    let e = f("kind = \"text\"\npath = \"c.csv\"\nseq_len = 4");
    assert!(e.contains(".jsonl"), "{e}");
    // Everything is too short to keep: empty, so an error.
    let e = fails("kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 1000");
    assert!(e.contains("no documents left"), "{e}");
    let e = fails("kind = \"text\"\npath = \"web.jsonl\"\nseq_len = 2000");
    assert!(e.contains("context"), "{e}");
    let e = fails("kind = \"text\"\npath = \"web.jsonl\"");
    assert!(e.contains("needs `seq_len`"), "{e}");
}

// ---------------------------------------------------------------- tokens

fn tokens_ds(json: &str, extra: &str) -> hookgraph::Result<Dataset> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.json"), json).unwrap();
    let cfg = tiny_cfg();
    let ctx = DataContext {
        tokenizer: None,
        cfg: &cfg,
        spec_dir: dir.path(),
    };
    build(
        &spec(&format!("kind = \"tokens\"\npath = \"t.json\"\n{extra}")),
        &ctx,
    )
}

#[test]
fn tokens_file_is_used_exactly() {
    let ds = tokens_ds("[[511, 5, 6, 511], [7, 8, 9, 10], [511, 1, 511, 511]]", "").unwrap();
    assert_eq!(
        ds.tokens,
        ndarray::array![[511, 5, 6, 511], [7, 8, 9, 10], [511, 1, 511, 511]]
    );
    assert_eq!(ds.lengths, vec![3, 4, 2]);
    let ds = tokens_ds("[[1, 2], [3, 4], [5, 6]]", "n = 2").unwrap();
    assert_eq!(ds.tokens, ndarray::array![[1, 2], [3, 4]]);
}

#[test]
fn tokens_file_validation_errors() {
    let e = |json: &str, extra: &str| tokens_ds(json, extra).unwrap_err().to_string();
    let m = e("[[1, 2, 3], [4, 5]]", "");
    assert!(m.contains("sequence 1 has 2 tokens"), "{m}");
    let m = e("[[1, 2, 512]]", "");
    assert!(m.contains("512") && m.contains("vocabulary"), "{m}");
    let m = e("[]", "");
    assert!(m.contains("no sequences"), "{m}");
    let m = e("[[]]", "");
    assert!(m.contains("empty"), "{m}");
    let long = format!("[[{}]]", vec!["1"; 33].join(", "));
    let m = e(&long, "");
    assert!(m.contains("context"), "{m}");
    let m = e("[[1, -2]]", "");
    assert!(m.contains("list of lists"), "{m}");
    let m = e("[[1, 2]]", "n = 3");
    assert!(m.contains("n = 3"), "{m}");
    let m = e("[[1, 2]]", "seq_len = 3");
    assert!(m.contains("`seq_len`") && m.contains("\"tokens\""), "{m}");
    let cfg = tiny_cfg();
    let ctx = DataContext {
        tokenizer: None,
        cfg: &cfg,
        spec_dir: Path::new("/nonexistent"),
    };
    let m = build(&spec("kind = \"tokens\"\npath = \"t.json\""), &ctx)
        .unwrap_err()
        .to_string();
    assert!(m.contains("/nonexistent/t.json"), "{m}");
}

// ---------------------------------------------------------------- prompts

#[test]
fn prompts_are_bos_prefixed_padded_and_refused_beyond_the_context() {
    let tok = gpt2_tok();
    let texts = ["Hello there, general Kenobi.", "Hi"];
    let ds = ok(r#"kind = "prompts"
prompts = ["Hello there, general Kenobi.", "Hi"]"#);
    let a = tok.encode(texts[0]).unwrap();
    let b = tok.encode(texts[1]).unwrap();
    assert_eq!(ds.seq_len(), a.len() + 1);
    assert_eq!(ds.lengths, vec![a.len() + 1, b.len() + 1]);
    assert_eq!(row(&ds, 0)[1..], a[..]);
    assert_eq!(row(&ds, 1)[..2], [50256, b[0]]);
    assert!(row(&ds, 1)[2..].iter().all(|&t| t == 50256));

    let ds = ok("kind = \"prompts\"\nprompts = [\"Hello there\"]\nprepend_bos = false");
    assert_eq!(row(&ds, 0), tok.encode("Hello there").unwrap());

    // Longer than the context: refused, as a tokens dataset's sequence is (cutting it would
    // run another prompt than the one written).
    let e = build_gpt2(
        "kind = \"prompts\"\nprompts = [\"one two three four five six seven\"]",
        &corpus_dir(),
        4,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("prompt 1")
            && e.contains("8 tokens with BOS, longer than the model's context (4)"),
        "{e}"
    );

    let e = fails("kind = \"prompts\"\nprompts = []");
    assert!(e.contains("empty"), "{e}");
    let e = fails("kind = \"prompts\"\nprompts = [\"\"]\nprepend_bos = false");
    assert!(e.contains("no tokens"), "{e}");
    let e = fails("kind = \"prompts\"\nprompts = [\"x\"]\nn = 1");
    assert!(e.contains("`n`") && e.contains("\"prompts\""), "{e}");
    let e = fails("kind = \"prompts\"\nseed = 1\nprompts = [\"x\"]");
    assert!(e.contains("`seed`"), "{e}");
}

#[test]
fn tokenizer_needed_but_missing_is_an_error() {
    let cfg = gpt2_cfg(1024);
    let ctx = DataContext {
        tokenizer: None,
        cfg: &cfg,
        spec_dir: Path::new("."),
    };
    let e = build(&spec("kind = \"ioi\""), &ctx)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer"), "{e}");
}

#[test]
fn ids_outside_the_model_vocabulary_are_rejected() {
    // GPT-2 ids into the tiny model (d_vocab 512): caught whatever the kind.
    let tok = gpt2_tok();
    let cfg = tiny_cfg();
    let ctx = DataContext {
        tokenizer: Some(&tok),
        cfg: &cfg,
        spec_dir: Path::new("."),
    };
    let e = build(
        &spec("kind = \"prompts\"\nprompts = [\"Hello world\"]"),
        &ctx,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("vocabulary"), "{e}");
}

// ---------------------------------------------------------------- answers and counterparts

/// A whole spec around `datasets` (its `[[dataset]]` tables), written to `spec.toml` in a
/// fresh directory with `files` beside it; returns the directory and the datasets built the
/// way a run builds them (`build_all`), with the GPT-2 tokenizer and `cfg`.
fn build_spec(
    datasets: &str,
    files: &[(&str, &str)],
    cfg: &ModelConfig,
) -> (tempfile::TempDir, hookgraph::Result<Vec<Dataset>>) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"t\"\n[model]\npath = \"ckpt\"\n{datasets}\n[[metric]]\nkind = \"loss\"\n"
    );
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, &text).unwrap();
    for (name, body) in files {
        std::fs::write(dir.path().join(name), body).unwrap();
    }
    let spec = hookgraph::spec::LoadedSpec::from_str(&text, &path).unwrap();
    let tok = gpt2_tok();
    let ctx = DataContext {
        tokenizer: Some(&tok),
        cfg,
        spec_dir: dir.path(),
    };
    let built = hookgraph::data::build_all(&spec, &ctx);
    (dir, built)
}

/// `spec.toml:LINE:COL: ...` with the line and column of `needle`'s first character in the
/// spec text (line 1 is `name = "t"`).
fn located_at(err: &str, dir: &Path, line: usize, col: usize) {
    let want = format!("{}:{line}:{col}: ", dir.join("spec.toml").display());
    assert!(err.starts_with(&want), "want {want:?}, got {err}");
}

const TOKENS_WITH_ANSWERS: &str = r#"[[dataset]]
name = "tok"
kind = "tokens"
path = "t.json"
answers = "a.json"
"#;

#[test]
fn tokens_answers_are_read_one_pair_per_sequence() {
    let cfg = tiny_cfg();
    let toks = ("t.json", "[[511, 5, 6], [511, 7, 8], [511, 9, 10]]");
    let (_d, built) = build_spec(
        TOKENS_WITH_ANSWERS,
        &[toks, ("a.json", "[[1, 2], [3, 4], [510, 0]]")],
        &cfg,
    );
    let ds = built.unwrap();
    assert_eq!(ds[0].answers, Some(vec![[1, 2], [3, 4], [510, 0]]));
    // With n, the first n pairs of the file's.
    let with_n = TOKENS_WITH_ANSWERS.replace("answers =", "n = 2\nanswers =");
    let (_d, built) = build_spec(
        &with_n,
        &[toks, ("a.json", "[[1, 2], [3, 4], [510, 0]]")],
        &cfg,
    );
    assert_eq!(built.unwrap()[0].answers, Some(vec![[1, 2], [3, 4]]));
    // Without answers: none.
    let (_d, built) = build_spec(
        &TOKENS_WITH_ANSWERS.replace("answers = \"a.json\"\n", ""),
        &[toks],
        &cfg,
    );
    assert_eq!(built.unwrap()[0].answers, None);
}

#[test]
fn answers_errors_name_the_spec_line_and_column() {
    let cfg = tiny_cfg();
    let toks = ("t.json", "[[511, 5, 6], [511, 7, 8]]");
    // `answers = "a.json"` is line 8 of the spec; its value starts at column 11.
    for (answers, want) in [
        ("[[1, 2]]", "1 answer pairs for 2 sequences"),
        ("[[1, 2], [3, 4], [5, 6]]", "3 answer pairs for 2 sequences"),
        (
            "[[1, 2], [3, 512]]",
            "pair 1: token id 512 is outside the model's vocabulary",
        ),
        (
            "[[1, 2], [3]]",
            "expected a JSON list of [correct_id, wrong_id] pairs",
        ),
        ("[[1, 2], [3, -4]]", "expected a JSON list"),
        ("{\"a\": 1}", "expected a JSON list"),
    ] {
        let (dir, built) = build_spec(TOKENS_WITH_ANSWERS, &[toks, ("a.json", answers)], &cfg);
        let e = built.unwrap_err().to_string();
        located_at(&e, dir.path(), 8, 11);
        assert!(
            e.contains("dataset 'tok'") && e.contains(want),
            "{answers}: {e}"
        );
    }
    // With n, the count is the token file's, not n's.
    let with_n = TOKENS_WITH_ANSWERS.replace("answers =", "n = 1\nanswers =");
    let (dir, built) = build_spec(&with_n, &[toks, ("a.json", "[[1, 2]]")], &cfg);
    let e = built.unwrap_err().to_string();
    located_at(&e, dir.path(), 9, 11);
    assert!(e.contains("1 answer pairs for 2 sequences"), "{e}");
    // A missing file.
    let (dir, built) = build_spec(TOKENS_WITH_ANSWERS, &[toks], &cfg);
    let e = built.unwrap_err().to_string();
    located_at(&e, dir.path(), 8, 11);
    assert!(e.contains("cannot read") && e.contains("a.json"), "{e}");
    // answers on another kind: on its own key.
    let (dir, built) = build_spec(
        "[[dataset]]\nname = \"p\"\nkind = \"prompts\"\nprompts = [\"x\"]\nanswers = \"a.json\"\n",
        &[],
        &cfg,
    );
    let e = built.unwrap_err().to_string();
    located_at(&e, dir.path(), 8, 1);
    assert!(e.contains("`answers` does not apply"), "{e}");
}

#[test]
fn ioi_answers_are_io_then_s() {
    let ds = ok("kind = \"ioi\"\nn = 8");
    let answers = ds.answers.as_ref().unwrap();
    let tok = gpt2_tok();
    for (i, p) in ds.ioi.as_ref().unwrap().iter().enumerate() {
        let io = tok.encode(&format!(" {}", p.io_name)).unwrap()[0];
        let s = tok.encode(&format!(" {}", p.s_name)).unwrap()[0];
        assert_eq!(answers[i], [io, s], "{}", p.text);
        assert_eq!(p.s2_name, p.s_name);
    }
}

const CLEAN_AND: &str = r#"[[dataset]]
name = "clean"
kind = "ioi"
n = 12
seed = 3
"#;

fn counterpart(corrupt: &str) -> String {
    format!("{CLEAN_AND}[[dataset]]\nname = \"bad\"\nkind = \"ioi\"\ncounterpart_of = \"clean\"\ncorrupt = \"{corrupt}\"\n")
}

#[test]
fn flip_swaps_io_and_s_at_the_second_mention() {
    let cfg = gpt2_cfg(1024);
    let (_d, built) = build_spec(&counterpart("flip"), &[], &cfg);
    let ds = built.unwrap();
    let (clean, flip) = (&ds[0], &ds[1]);
    assert_eq!(flip.name, "bad");
    assert_eq!(flip.tokens.dim(), clean.tokens.dim());
    assert_eq!(flip.lengths, clean.lengths);
    assert_eq!(flip.answers, clean.answers);
    let tok = gpt2_tok();
    for (i, (c, f)) in clean
        .ioi
        .as_ref()
        .unwrap()
        .iter()
        .zip(flip.ioi.as_ref().unwrap())
        .enumerate()
    {
        // Same draws and positions; S2 now holds the IO's name, so IO and S swap roles.
        assert_eq!(
            (c.io_pos, c.s1_pos, c.s2_pos),
            (f.io_pos, f.s1_pos, f.s2_pos)
        );
        assert_eq!((&f.io_name, &f.s_name), (&c.io_name, &c.s_name));
        assert_eq!(f.s2_name, c.io_name);
        for p in 0..clean.seq_len() {
            let (a, b) = (clean.tokens[[i, p]], flip.tokens[[i, p]]);
            if p == c.s2_pos {
                assert_eq!((a, b), (c.s_token, c.answer), "{} / {}", c.text, f.text);
            } else {
                assert_eq!(a, b, "position {p}: {} / {}", c.text, f.text);
            }
        }
        // The text says the same as the tokens.
        assert_eq!(
            tok.encode(&f.text).unwrap()[..],
            flip.tokens.row(i).to_vec()[1..f.end_pos + 1]
        );
    }
}

#[test]
fn abc_writes_a_third_name_distinct_from_both() {
    let cfg = gpt2_cfg(1024);
    let (_d, built) = build_spec(&counterpart("abc"), &[], &cfg);
    let ds = built.unwrap();
    let (clean, abc) = (&ds[0], &ds[1]);
    assert_eq!(abc.tokens.dim(), clean.tokens.dim());
    assert_eq!(abc.lengths, clean.lengths);
    assert_eq!(abc.answers, clean.answers);
    let mut thirds = std::collections::BTreeSet::new();
    for (i, (c, a)) in clean
        .ioi
        .as_ref()
        .unwrap()
        .iter()
        .zip(abc.ioi.as_ref().unwrap())
        .enumerate()
    {
        assert_ne!(a.s2_name, c.io_name);
        assert_ne!(a.s2_name, c.s_name);
        thirds.insert(a.s2_name.clone());
        let c_id = gpt2_tok().encode(&format!(" {}", a.s2_name)).unwrap()[0];
        for p in 0..clean.seq_len() {
            let want = if p == c.s2_pos {
                c_id
            } else {
                clean.tokens[[i, p]]
            };
            assert_eq!(abc.tokens[[i, p]], want, "position {p}: {}", a.text);
        }
    }
    // Drawn, not one fixed name.
    assert!(thirds.len() > 3, "{thirds:?}");
    // Reproducible: the same spec, the same third names.
    let (_d, again) = build_spec(&counterpart("abc"), &[], &cfg);
    assert_eq!(again.unwrap()[1].tokens, abc.tokens);
    // With three names the third is the one left: never IO or S.
    let three = counterpart("abc").replace(
        "seed = 3",
        "seed = 3\nnames = [\"Mary\", \"John\", \"Kate\"]",
    );
    let (_d, built) = build_spec(&three, &[], &cfg);
    let ds = built.unwrap();
    for p in ds[1].ioi.as_ref().unwrap() {
        let mut all = vec![p.io_name.as_str(), p.s_name.as_str(), p.s2_name.as_str()];
        all.sort();
        assert_eq!(all, ["John", "Kate", "Mary"], "{}", p.text);
    }
}

#[test]
fn counterpart_errors_name_the_spec_line_and_column() {
    let cfg = gpt2_cfg(1024);
    // Lines: 1-3 run and model, 4-8 clean, 9 [[dataset]], 10 name, 11 kind,
    // 12 counterpart_of, 13 corrupt.
    let cases = [
        (
            counterpart("flip").replace("= \"clean\"\ncorrupt", "= \"nope\"\ncorrupt"),
            (12, 18),
            "names no [[dataset]]",
        ),
        (
            counterpart("flip").replace("corrupt = \"flip\"\n", ""),
            (12, 1),
            "`counterpart_of` needs `corrupt`",
        ),
        (
            counterpart("flip").replace("counterpart_of = \"clean\"\n", ""),
            (12, 1),
            "`corrupt` needs `counterpart_of`",
        ),
        (
            counterpart("flip").replace(
                "kind = \"ioi\"\ncounterpart_of",
                "kind = \"ioi\"\nseed = 4\ncounterpart_of",
            ),
            (12, 1),
            "`seed` does not apply to a corrupted counterpart",
        ),
        (
            counterpart("flip").replace("counterpart_of = \"clean\"", "counterpart_of = \"bad\""),
            (12, 18),
            "not itself a counterpart",
        ),
        (
            counterpart("flip").replace(
                "kind = \"ioi\"\ncounterpart_of",
                "kind = \"tokens\"\ncounterpart_of",
            ),
            (12, 1),
            "`counterpart_of` does not apply to kind = \"tokens\"",
        ),
    ];
    for (text, (line, col), want) in cases {
        let (dir, built) = build_spec(&text, &[], &cfg);
        let e = built.unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
        located_at(&e, dir.path(), line, col);
    }
    // An unknown corruption is a parse error with its location.
    let text = counterpart("xyz");
    let dir = tempfile::tempdir().unwrap();
    let full =
        format!("name = \"t\"\n[model]\npath = \"ckpt\"\n{text}\n[[metric]]\nkind = \"loss\"\n");
    let e = hookgraph::spec::LoadedSpec::from_str(&full, &dir.path().join("spec.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(":13:11:") && e.contains("flip"), "{e}");
    // ABC with two names: no third.
    let two = CLEAN_AND.replace("seed = 3", "seed = 3\nnames = [\"Mary\", \"John\"]");
    let text = counterpart("abc").replace(CLEAN_AND, &two);
    let (dir, built) = build_spec(&text, &[], &cfg);
    let e = built.unwrap_err().to_string();
    assert!(e.contains("needs a third name"), "{e}");
    located_at(&e, dir.path(), 14, 11);
}
