//! Local text corpora (`kind = "text"`).
//!
//! Owns: reading a corpus file into documents (`.jsonl`: one JSON object per line with a
//! string `text` field; `.txt`: documents separated by one or more blank lines), the optional
//! seeded shuffle, and cutting documents into fixed-length token rows the way the notebook
//! did (`model.to_tokens(docs)[:, :seq_len]`: BOS first, BOS counts toward `seq_len`).
//! Must not: download anything (a corpus is a local file) or run the model.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{err, DataContext, Dataset};
use crate::error::Result;
use crate::spec::{DatasetSpec, ShortDocs};
use crate::tokenizer::batch_tokens;

/// Default seed for `shuffle = true`.
pub const DEFAULT_SEED: u64 = 0;

/// The documents of a corpus file, chosen by its extension. Documents that are empty or only
/// whitespace are skipped: they have no tokens to measure.
pub fn read_documents(dataset: &str, path: &Path) -> Result<Vec<String>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "jsonl" && ext != "txt" {
        return Err(err(
            dataset,
            format!(
                "{}: a text corpus must be .jsonl (one {{\"text\": ...}} per line) or .txt (documents separated by blank lines)",
                path.display()
            ),
        ));
    }
    let content = std::fs::read_to_string(path).map_err(|e| {
        // The web-text specs' corpus is fetched, not shipped: say how to get it.
        let hint = if e.kind() == std::io::ErrorKind::NotFound
            && path.file_name().is_some_and(|n| n == "webtext.jsonl")
        {
            " (make it with `python3 scripts/fetch_webtext.py`, which needs internet; \
             `runner experiments/smoke.toml` runs offline)"
        } else {
            ""
        };
        err(
            dataset,
            format!("cannot read {}: {e}{hint}", path.display()),
        )
    })?;
    let docs = if ext == "jsonl" {
        parse_jsonl(&content)
            .map_err(|(line, msg)| err(dataset, format!("{}:{line}: {msg}", path.display())))?
    } else {
        split_txt(&content)
    };
    Ok(docs.into_iter().filter(|d| !d.trim().is_empty()).collect())
}

/// The `text` field of each non-blank line; the error is (1-based line, message).
pub fn parse_jsonl(content: &str) -> std::result::Result<Vec<String>, (usize, String)> {
    let mut docs = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| (i + 1, format!("not valid JSON: {e}")))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(_) => return Err((i + 1, "the `text` field is not a string".into())),
            None => {
                return Err((
                    i + 1,
                    "expected a JSON object with a string `text` field".into(),
                ))
            }
        }
    }
    Ok(docs)
}

/// Documents of a `.txt` corpus: runs of non-blank lines, separated by one or more blank
/// (empty or whitespace-only) lines; a document's lines are joined with '\n'. Prose keeps
/// its line breaks inside a paragraph, unlike one-document-per-line.
pub fn split_txt(content: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for line in content.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                docs.push(cur.join("\n"));
                cur.clear();
            }
        } else {
            cur.push(line);
        }
    }
    if !cur.is_empty() {
        docs.push(cur.join("\n"));
    }
    docs
}

/// Builds a `text` dataset: the first `n` documents (after the optional shuffle) that are
/// kept, each tokenized (BOS first unless `prepend_bos = false`) and cut to `seq_len`.
/// With `short = "drop"` documents shorter than `seq_len` are skipped and `n` counts kept
/// documents; with `short = "pad"` they are right-padded with BOS, and the batch is as wide
/// as its longest row (at most `seq_len`), as TL's `to_tokens(...)[:, :seq_len]`.
pub fn build(spec: &DatasetSpec, ctx: &DataContext) -> Result<Dataset> {
    let name = spec.name.as_str();
    let e = |msg: String| err(name, msg);
    let tok = ctx.tokenizer(name)?;
    // `build` in mod.rs has checked that both are present.
    let (Some(path), Some(seq_len)) = (&spec.path, spec.seq_len) else {
        return Err(e("a text dataset needs `path` and `seq_len`".into()));
    };
    if seq_len < 2 {
        return Err(e(format!(
            "seq_len = {seq_len}: needs at least 2 tokens (BOS included)"
        )));
    }
    if seq_len > ctx.cfg.n_ctx {
        return Err(e(format!(
            "seq_len = {seq_len} is longer than the model's context ({})",
            ctx.cfg.n_ctx
        )));
    }
    if spec.n == Some(0) {
        return Err(e("n must be at least 1".into()));
    }
    if spec.seed.is_some() && spec.shuffle != Some(true) {
        return Err(e(
            "`seed` only applies with `shuffle = true` on a text dataset".into(),
        ));
    }
    let path = super::resolve(ctx, path.get_ref());
    let mut docs = read_documents(name, &path)?;
    let total = docs.len();
    if total == 0 {
        return Err(e(format!("no documents in {}", path.display())));
    }
    if spec.shuffle == Some(true) {
        docs.shuffle(&mut ChaCha8Rng::seed_from_u64(
            spec.seed.unwrap_or(DEFAULT_SEED),
        ));
    }
    let short = spec.short.unwrap_or_default();
    let bos = ctx.cfg.bos_token_id;
    let prepend = spec.prepend_bos.unwrap_or(true);
    let mut rows: Vec<Vec<u32>> = Vec::new();
    for doc in &docs {
        if spec.n.is_some_and(|n| rows.len() >= n) {
            break;
        }
        let mut ids: Vec<u32> = Vec::with_capacity(seq_len);
        if prepend {
            ids.push(bos);
        }
        ids.extend(tok.encode(doc)?);
        ids.truncate(seq_len);
        if ids.len() < seq_len && short == ShortDocs::Drop {
            continue;
        }
        rows.push(ids);
    }
    if rows.is_empty() {
        return Err(e(format!(
            "no documents left: all {total} documents in {} are shorter than seq_len = {seq_len} tokens (short = \"drop\"); lower seq_len or set short = \"pad\"",
            path.display()
        )));
    }
    if let Some(n) = spec.n {
        if rows.len() < n {
            return Err(e(format!(
                "n = {n}, but only {} of the {total} documents in {} are at least seq_len = {seq_len} tokens long",
                rows.len(),
                path.display()
            )));
        }
    }
    let tokens = batch_tokens(&rows, None, bos, seq_len);
    let lengths = rows.iter().map(Vec::len).collect();
    Ok(Dataset {
        name: name.to_string(),
        tokens,
        lengths,
        ioi: None,
        answers: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_documents_are_separated_by_blank_lines() {
        let docs = split_txt("one\ntwo\n\n\n  \nthree\r\n\nfour\n");
        assert_eq!(docs, vec!["one\ntwo", "three", "four"]);
        assert!(split_txt("\n\n").is_empty());
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let ok = parse_jsonl("{\"text\": \"a\"}\n\n{\"text\": \"b\", \"url\": 1}\n").unwrap();
        assert_eq!(ok, vec!["a", "b"]);
        let (line, msg) = parse_jsonl("{\"text\": \"a\"}\n{\"text\": \"b\"\n").unwrap_err();
        assert_eq!(line, 2, "{msg}");
        let (line, msg) = parse_jsonl("{\"text\": \"a\"}\n\n{\"body\": \"b\"}\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(msg.contains("`text`"), "{msg}");
        let (line, _) = parse_jsonl("{\"text\": 3}").unwrap_err();
        assert_eq!(line, 1);
    }
}
