//! Datasets: token batches built from a spec's `[[dataset]]` tables.
//!
//! Owns: turning a [`DatasetSpec`] into a [`Dataset`] of right-padded token ids, for each kind:
//! `ioi` (generated in-process, [`ioi`]), `text` (a local corpus, [`text`]), `tokens` (a JSON
//! file of ids) and `prompts` (inline texts); each dataset's answers (a `tokens` dataset's
//! `answers` file, built in for `ioi`); corrupted counterparts of `ioi` datasets
//! (`counterpart_of` + `corrupt`); which keys each kind takes; and the checks every dataset
//! must pass (not empty, no longer than the model's context, ids inside its vocabulary, one
//! answer pair per sequence, a counterpart shaped as its original). Must not: run the model
//! or know about metrics.
//!
//! Every user mistake is an [`Error::Data`] naming the dataset; [`build_all`], which the
//! runner calls, adds where in the spec it is (`file:line:col`). Nothing here panics on
//! input.

pub mod ioi;
pub mod text;

use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::spec::{Corruption, DatasetKind, DatasetSpec, LoadedSpec};
use crate::tokenizer::{batch_tokens, GptTokenizer};

pub use ioi::IoiPrompt;

/// A dataset ready to run: `[n_sequences, seq_len]` token ids, right-padded with BOS.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub tokens: Array2<u32>,
    /// Each sequence's length without right padding.
    pub lengths: Vec<usize>,
    /// For `ioi`: the positions and answer of each prompt.
    pub ioi: Option<Vec<IoiPrompt>>,
    /// Per sequence, the token ids `[correct, wrong]` a logit difference is taken between
    /// (at position `len_i - 1`, see `docs/metrics.md`): from a `tokens` dataset's
    /// `answers = FILE`, built in for `ioi` (IO, S). `None`: no logit differences.
    pub answers: Option<Vec<[u32; 2]>>,
}

impl Dataset {
    pub fn n_sequences(&self) -> usize {
        self.tokens.nrows()
    }
    pub fn seq_len(&self) -> usize {
        self.tokens.ncols()
    }
    /// Whether position `pos` of sequence `seq` is right padding.
    pub fn is_pad(&self, seq: usize, pos: usize) -> bool {
        pos >= self.lengths[seq]
    }
}

/// What building a dataset may need from the run.
pub struct DataContext<'a> {
    pub tokenizer: Option<&'a GptTokenizer>,
    pub cfg: &'a ModelConfig,
    /// The spec's directory: relative dataset paths resolve against it.
    pub spec_dir: &'a Path,
}

impl DataContext<'_> {
    /// The tokenizer, or an error naming the dataset that needs one.
    pub fn tokenizer(&self, dataset: &str) -> Result<&GptTokenizer> {
        self.tokenizer.ok_or_else(|| Error::Data {
            dataset: dataset.to_string(),
            msg: "this dataset needs a tokenizer, and the model has none (add tokenizer files or set `tokenizer` under [model])".into(),
        })
    }
}

/// Lengths without right padding: everything after the last non-pad token (position 0, the
/// BOS, always counts).
pub fn unpadded_lengths(tokens: &Array2<u32>, pad: u32) -> Vec<usize> {
    tokens
        .rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .rposition(|&t| t != pad)
                .map_or(1, |p| p + 1)
                .max(1)
        })
        .collect()
}

/// Bytes this process can still allocate, as the kernel estimates (`MemAvailable`); `None`
/// where that is unknown.
pub(crate) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Refuses a dataset of `n` items of about `bytes_each` bytes that cannot fit in memory,
/// with a sentence instead of an allocation abort.
pub(crate) fn check_fits(dataset: &str, what: &str, n: usize, bytes_each: usize) -> Result<()> {
    let need = (n as u128) * (bytes_each as u128);
    let avail = available_memory().map_or(isize::MAX as u128, u128::from);
    if need > avail {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        return Err(err(
            dataset,
            format!(
                "n = {n} {what} need about {:.1} GiB, more than the {:.1} GiB of memory available; lower n",
                gib(need),
                gib(avail)
            ),
        ));
    }
    Ok(())
}

/// A data error for `dataset`.
pub(crate) fn err(dataset: &str, msg: impl Into<String>) -> Error {
    Error::Data {
        dataset: dataset.to_string(),
        msg: msg.into(),
    }
}

/// A dataset path from the spec, relative to the spec's directory.
pub(crate) fn resolve(ctx: &DataContext, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        ctx.spec_dir.join(p)
    }
}

/// The kind as the spec writes it.
pub fn kind_name(kind: DatasetKind) -> &'static str {
    match kind {
        DatasetKind::Ioi => "ioi",
        DatasetKind::Text => "text",
        DatasetKind::Tokens => "tokens",
        DatasetKind::Prompts => "prompts",
    }
}

/// The optional keys each kind takes (besides `name` and `kind`).
pub fn allowed_keys(kind: DatasetKind) -> &'static [&'static str] {
    match kind {
        DatasetKind::Ioi => &[
            "n",
            "seed",
            "symmetric",
            "names",
            "places",
            "objects",
            "templates",
            "counterpart_of",
            "corrupt",
        ],
        DatasetKind::Text => &[
            "path",
            "seq_len",
            "n",
            "shuffle",
            "seed",
            "short",
            "prepend_bos",
        ],
        DatasetKind::Tokens => &["path", "n", "answers"],
        DatasetKind::Prompts => &["prompts", "prepend_bos"],
    }
}

/// The keys each kind cannot do without.
pub fn required_keys(kind: DatasetKind) -> &'static [&'static str] {
    match kind {
        DatasetKind::Ioi => &[],
        DatasetKind::Text => &["path", "seq_len"],
        DatasetKind::Tokens => &["path"],
        DatasetKind::Prompts => &["prompts"],
    }
}

/// The optional keys a spec sets.
fn present_keys(s: &DatasetSpec) -> Vec<&'static str> {
    [
        ("n", s.n.is_some()),
        ("seed", s.seed.is_some()),
        ("symmetric", s.symmetric.is_some()),
        ("names", s.names.is_some()),
        ("places", s.places.is_some()),
        ("objects", s.objects.is_some()),
        ("templates", s.templates.is_some()),
        ("path", s.path.is_some()),
        ("seq_len", s.seq_len.is_some()),
        ("shuffle", s.shuffle.is_some()),
        ("short", s.short.is_some()),
        ("prompts", s.prompts.is_some()),
        ("prepend_bos", s.prepend_bos.is_some()),
        ("answers", s.answers.is_some()),
        ("counterpart_of", s.counterpart_of.is_some()),
        ("corrupt", s.corrupt.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect()
}

/// Rejects keys that do not apply to the kind and missing required keys. The spec parser
/// cannot do this (one table serves every kind), so a typo'd kind or a stray key is caught
/// here rather than silently ignored.
pub fn check_keys(spec: &DatasetSpec) -> Result<()> {
    let kind = kind_name(spec.kind);
    let allowed = allowed_keys(spec.kind);
    let present = present_keys(spec);
    if let Some(bad) = present.iter().find(|k| !allowed.contains(k)) {
        return Err(err(
            &spec.name,
            format!(
                "`{bad}` does not apply to kind = \"{kind}\" (it takes: {})",
                allowed.join(", ")
            ),
        ));
    }
    if let Some(missing) = required_keys(spec.kind)
        .iter()
        .find(|k| !present.contains(k))
    {
        return Err(err(
            &spec.name,
            format!("kind = \"{kind}\" needs `{missing}`"),
        ));
    }
    // A counterpart is its original's draws: it takes nothing else.
    if spec.counterpart_of.is_some() || spec.corrupt.is_some() {
        for (k, other) in [("counterpart_of", "corrupt"), ("corrupt", "counterpart_of")] {
            if present.contains(&k) && !present.contains(&other) {
                return Err(err(
                    &spec.name,
                    format!("`{k}` needs `{other}` (a corrupted counterpart names both its original and how it is corrupted)"),
                ));
            }
        }
        if let Some(bad) = present.iter().find(|k| !COUNTERPART_KEYS.contains(k)) {
            return Err(err(
                &spec.name,
                format!("`{bad}` does not apply to a corrupted counterpart: it is built from its original's n, seed, names, places, objects and templates (it takes only `counterpart_of` and `corrupt`)"),
            ));
        }
    }
    Ok(())
}

/// The keys a corrupted counterpart takes (besides `name` and `kind`).
const COUNTERPART_KEYS: &[&str] = &["counterpart_of", "corrupt"];

/// The corruption as the spec writes it.
pub fn corruption_name(c: Corruption) -> &'static str {
    match c {
        Corruption::Flip => "flip",
        Corruption::Abc => "abc",
    }
}

/// Each dataset kind with its keys and what it makes, for `runner list` (the README's
/// table says the same at more length).
pub const KINDS: &[(&str, &str)] = &[
    (
        "ioi",
        "IOI prompts made in-process; keys n, seed, symmetric, names, places, objects, templates; answers built in (IO, S at the last position). A corrupted counterpart of another ioi dataset: counterpart_of = \"NAME\", corrupt = \"flip\" (S2 becomes the IO) | \"abc\" (S2 becomes a third name); same draws, shape and answers as the original",
    ),
    (
        "text",
        "a local corpus (.jsonl with a `text` field, or .txt); keys path, seq_len, n, shuffle, seed, short, prepend_bos",
    ),
    (
        "tokens",
        "exact token ids from a JSON list of equal-length lists; keys path, n, answers (a JSON list of [correct_id, wrong_id], one per sequence)",
    ),
    ("prompts", "inline texts; keys prompts, prepend_bos"),
];

/// Builds one dataset with its answers. A corrupted counterpart needs its original: build
/// it with [`build_all`].
pub fn build(spec: &DatasetSpec, ctx: &DataContext) -> Result<Dataset> {
    let mut ds = build_base(spec, ctx)?;
    ds.answers = match &spec.answers {
        Some(path) => Some(load_answers(spec, path.get_ref(), &ds, ctx)?),
        None => ds.answers,
    };
    Ok(ds)
}

/// One dataset without an answers file.
fn build_base(spec: &DatasetSpec, ctx: &DataContext) -> Result<Dataset> {
    check_keys(spec)?;
    if spec.counterpart_of.is_some() {
        return Err(err(
            &spec.name,
            "a corrupted counterpart is built with the spec it belongs to (data::build_all)",
        ));
    }
    let ds = match spec.kind {
        DatasetKind::Ioi => ioi::build(spec, ctx)?,
        DatasetKind::Text => text::build(spec, ctx)?,
        DatasetKind::Tokens => build_tokens(spec, ctx)?,
        DatasetKind::Prompts => build_prompts(spec, ctx)?,
    };
    check_dataset(&ds, ctx.cfg)?;
    Ok(ds)
}

/// Builds every dataset of `spec`, in the spec's order, originals before their corrupted
/// counterparts. Every error says where in the spec it belongs: an answers file's on its
/// `answers` key, a counterpart's on `counterpart_of` or `corrupt`, a file's on `path`,
/// anything else on the dataset's `kind`. All of it happens before any forward pass.
pub fn build_all(spec: &LoadedSpec, ctx: &DataContext) -> Result<Vec<Dataset>> {
    let specs = &spec.spec.datasets;
    // On the key's line (the dataset's `kind` where the key is not written).
    let at = |i: usize, key: &str, e: Error| -> Error {
        let span = spec
            .dataset_key_span(i, key)
            .or_else(|| spec.dataset_key_span(i, "kind"))
            .unwrap_or(0..0);
        spec.error_at(span, e.to_string())
    };
    // On a value.
    let at_value = |span: std::ops::Range<usize>, e: Error| spec.error_at(span, e.to_string());
    // The key a plain build error belongs on: the first key its message names, else `path`
    // when it names the dataset's file, else `kind`.
    let key_of = |d: &DatasetSpec, e: &Error| -> &'static str {
        let msg = e.to_string();
        let named = allowed_keys(DatasetKind::Ioi)
            .iter()
            .chain(allowed_keys(DatasetKind::Text))
            .chain(allowed_keys(DatasetKind::Tokens))
            .chain(allowed_keys(DatasetKind::Prompts))
            .filter_map(|k| msg.find(&format!("`{k}`")).map(|at| (at, *k)))
            .min();
        if let Some((_, k)) = named {
            return k;
        }
        match &d.path {
            Some(p) if msg.contains(&resolve(ctx, p.get_ref()).display().to_string()) => "path",
            _ => "kind",
        }
    };
    let mut built: Vec<Option<Dataset>> = vec![None; specs.len()];
    for (i, d) in specs.iter().enumerate() {
        if d.counterpart_of.is_some() || d.corrupt.is_some() {
            continue;
        }
        let mut ds = build_base(d, ctx).map_err(|e| at(i, key_of(d, &e), e))?;
        if let Some(path) = &d.answers {
            ds.answers = Some(
                load_answers(d, path.get_ref(), &ds, ctx).map_err(|e| at_value(path.span(), e))?,
            );
        }
        built[i] = Some(ds);
    }
    for (i, d) in specs.iter().enumerate() {
        if built[i].is_some() {
            continue;
        }
        check_keys(d).map_err(|e| at(i, key_of(d, &e), e))?;
        let (Some(of), Some(how)) = (&d.counterpart_of, &d.corrupt) else {
            continue; // check_keys refused it
        };
        let e = |msg: String| at_value(of.span(), err(&d.name, msg));
        let ioi_names = || {
            specs
                .iter()
                .filter(|o| o.kind == DatasetKind::Ioi && o.counterpart_of.is_none())
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(j) = specs.iter().position(|o| o.name == *of.get_ref()) else {
            return Err(e(format!(
                "counterpart_of = \"{}\" names no [[dataset]] of this spec (its ioi datasets: {})",
                of.get_ref(),
                ioi_names()
            )));
        };
        let original = &specs[j];
        if original.kind != DatasetKind::Ioi || original.counterpart_of.is_some() {
            return Err(e(format!(
                "counterpart_of = \"{}\" must name an ioi dataset that is not itself a counterpart (its ioi datasets: {})",
                of.get_ref(),
                ioi_names()
            )));
        }
        let Some(orig) = built[j].as_ref() else {
            return Err(e(format!("dataset '{}' was not built", original.name)));
        };
        let tok = ctx.tokenizer(&d.name).map_err(|x| at(i, "kind", x))?;
        let opts = ioi::IoiOptions::from_spec(original);
        let ds = ioi::generate_corrupted(&d.name, &opts, *how.get_ref(), tok, ctx)
            .and_then(|ds| {
                check_dataset(&ds, ctx.cfg)?;
                check_counterpart(&ds, orig)?;
                Ok(ds)
            })
            .map_err(|x| at_value(how.span(), x))?;
        built[i] = Some(ds);
    }
    Ok(built.into_iter().flatten().collect())
}

/// A counterpart must have its original's shape, lengths and answers (the draws are the
/// same and every name is one token, so anything else is a bug worth a sentence).
fn check_counterpart(ds: &Dataset, original: &Dataset) -> Result<()> {
    if ds.tokens.dim() != original.tokens.dim() || ds.lengths != original.lengths {
        return Err(err(
            &ds.name,
            format!(
                "the counterpart is {:?} tokens, its original '{}' {:?}: they must have the same shape",
                ds.tokens.dim(),
                original.name,
                original.tokens.dim()
            ),
        ));
    }
    if ds.answers != original.answers {
        return Err(err(
            &ds.name,
            format!(
                "the counterpart's answers differ from its original '{}'",
                original.name
            ),
        ));
    }
    Ok(())
}

/// Reads a `tokens` dataset's answers file: a JSON list of `[correct_id, wrong_id]`, one
/// pair per sequence of the token file (the first `n` with `n`), ids inside the vocabulary.
fn load_answers(
    spec: &DatasetSpec,
    path: &Path,
    ds: &Dataset,
    ctx: &DataContext,
) -> Result<Vec<[u32; 2]>> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map_err(|x| err(&spec.name, format!("cannot read {}: {x}", p.display())))
    };
    // With `n` the dataset is the token file's first n sequences; the answers file still
    // holds one pair per sequence of the token file, so a file for another token file (or
    // shifted by one) cannot pass.
    let in_file = match (spec.n, &spec.path) {
        (Some(_), Some(tokens)) => {
            let rows: Vec<serde::de::IgnoredAny> =
                serde_json::from_str(&read(&resolve(ctx, tokens.get_ref()))?)
                    .map_err(|x| err(&spec.name, x.to_string()))?;
            rows.len()
        }
        _ => ds.n_sequences(),
    };
    let path = resolve(ctx, path);
    answers_from_json(
        &spec.name,
        &path,
        &read(&path)?,
        in_file,
        ds.n_sequences(),
        ctx.cfg,
    )
}

/// The answers-file reader behind `answers = FILE`: `text` is the file's content, `path`
/// only names it in errors. Every malformed input is an [`Error::Data`].
/// `in_file` is the number of sequences of the token file, of which the dataset holds the
/// first `n_sequences`.
pub fn answers_from_json(
    name: &str,
    path: &Path,
    text: &str,
    in_file: usize,
    n_sequences: usize,
    cfg: &ModelConfig,
) -> Result<Vec<[u32; 2]>> {
    let e = |msg: String| err(name, msg);
    // u64, so that a too-large id is reported as out of vocabulary rather than as bad JSON.
    let pairs: Vec<[u64; 2]> = serde_json::from_str(text).map_err(|x| {
        e(format!(
            "{}: expected a JSON list of [correct_id, wrong_id] pairs, one per sequence: {x}",
            path.display()
        ))
    })?;
    if pairs.len() != in_file || pairs.len() < n_sequences {
        return Err(e(format!(
            "{}: {} answer pairs for {} sequences (one [correct_id, wrong_id] per sequence of the token file)",
            path.display(),
            pairs.len(),
            in_file
        )));
    }
    pairs[..n_sequences]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if let Some(&id) = p.iter().find(|&&id| id >= cfg.d_vocab as u64) {
                return Err(e(format!(
                    "{}: pair {i}: token id {id} is outside the model's vocabulary (d_vocab = {})",
                    path.display(),
                    cfg.d_vocab
                )));
            }
            Ok([p[0] as u32, p[1] as u32])
        })
        .collect()
}

/// What every dataset must satisfy to be run, whatever its kind.
pub fn check_dataset(ds: &Dataset, cfg: &ModelConfig) -> Result<()> {
    let e = |msg: String| err(&ds.name, msg);
    if ds.n_sequences() == 0 || ds.seq_len() == 0 {
        return Err(e("the dataset is empty".into()));
    }
    if ds.seq_len() > cfg.n_ctx {
        return Err(e(format!(
            "sequences are {} tokens, longer than the model's context ({})",
            ds.seq_len(),
            cfg.n_ctx
        )));
    }
    if ds.lengths.len() != ds.n_sequences() {
        return Err(e(format!(
            "{} lengths for {} sequences",
            ds.lengths.len(),
            ds.n_sequences()
        )));
    }
    if let Some(((seq, pos), id)) = ds
        .tokens
        .indexed_iter()
        .find(|(_, &id)| id as usize >= cfg.d_vocab)
    {
        return Err(e(format!(
            "sequence {seq}, position {pos}: token id {id} is outside the model's vocabulary (d_vocab = {})",
            cfg.d_vocab
        )));
    }
    Ok(())
}

/// `kind = "tokens"`: a JSON list of equal-length lists of token ids, used exactly as given
/// (no BOS added), optionally only the first `n`.
fn build_tokens(spec: &DatasetSpec, ctx: &DataContext) -> Result<Dataset> {
    let name = spec.name.as_str();
    let Some(path) = &spec.path else {
        return Err(err(name, "kind = \"tokens\" needs `path`"));
    };
    let path = resolve(ctx, path.get_ref());
    let text = std::fs::read_to_string(&path)
        .map_err(|x| err(name, format!("cannot read {}: {x}", path.display())))?;
    tokens_from_json(name, &path, &text, spec.n, ctx.cfg)
}

/// The token-file reader behind `kind = "tokens"`: `text` is the file's content, `path`
/// only names it in errors. Every malformed input is an [`Error::Data`] (the fuzz tests
/// hold it to that).
pub fn tokens_from_json(
    name: &str,
    path: &Path,
    text: &str,
    n: Option<usize>,
    cfg: &ModelConfig,
) -> Result<Dataset> {
    let e = |msg: String| err(name, msg);
    // u64, so that a too-large id is reported as out of vocabulary rather than as bad JSON.
    let rows: Vec<Vec<u64>> = serde_json::from_str(text).map_err(|x| {
        e(format!(
            "{}: expected a JSON list of lists of token ids: {x}",
            path.display()
        ))
    })?;
    let rows = match n {
        Some(0) => return Err(e("n must be at least 1".into())),
        Some(n) if n > rows.len() => {
            return Err(e(format!(
                "n = {n}, but {} has only {} sequences",
                path.display(),
                rows.len()
            )))
        }
        Some(n) => &rows[..n],
        None => &rows[..],
    };
    let Some(first) = rows.first() else {
        return Err(e(format!("{} has no sequences", path.display())));
    };
    let width = first.len();
    if width == 0 {
        return Err(e(format!("{}: sequence 0 is empty", path.display())));
    }
    if width > cfg.n_ctx {
        return Err(e(format!(
            "{}: sequences are {width} tokens, longer than the model's context ({})",
            path.display(),
            cfg.n_ctx
        )));
    }
    let mut flat = Vec::with_capacity(rows.len() * width);
    for (i, row) in rows.iter().enumerate() {
        if row.len() != width {
            return Err(e(format!(
                "{}: sequence {i} has {} tokens, sequence 0 has {width} (all must have the same length)",
                path.display(),
                row.len()
            )));
        }
        for (j, &id) in row.iter().enumerate() {
            if id >= cfg.d_vocab as u64 {
                return Err(e(format!(
                    "{}: sequence {i}, position {j}: token id {id} is outside the model's vocabulary (d_vocab = {})",
                    path.display(),
                    cfg.d_vocab
                )));
            }
            flat.push(id as u32);
        }
    }
    let tokens = Array2::from_shape_vec((rows.len(), width), flat)
        .map_err(|x| e(format!("{}: {x}", path.display())))?;
    let lengths = unpadded_lengths(&tokens, cfg.bos_token_id);
    Ok(Dataset {
        name: name.to_string(),
        tokens,
        lengths,
        ioi: None,
        answers: None,
    })
}

/// `kind = "prompts"`: inline texts, BOS first (unless `prepend_bos = false`), right-padded
/// with BOS. A prompt longer than the model's context is refused, as a tokens dataset's
/// sequence or `runner prompt`'s text is: cutting it would run a different prompt.
fn build_prompts(spec: &DatasetSpec, ctx: &DataContext) -> Result<Dataset> {
    let name = spec.name.as_str();
    let e = |msg: String| err(name, msg);
    let prompts = spec.prompts.as_deref().unwrap_or_default();
    if prompts.is_empty() {
        return Err(e("`prompts` is empty".into()));
    }
    let tok = ctx.tokenizer(name)?;
    let bos = ctx.cfg.bos_token_id;
    let prepend = spec.prepend_bos.unwrap_or(true);
    let encoded = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<Vec<_>>>()?;
    let lengths: Vec<usize> = encoded
        .iter()
        .map(|ids| ids.len() + usize::from(prepend))
        .collect();
    if let Some(i) = lengths.iter().position(|&l| l > ctx.cfg.n_ctx) {
        let shown: String = prompts[i].chars().take(40).collect();
        return Err(e(format!(
            "prompt {} ({shown:?}...) is {} tokens{}, longer than the model's context ({})",
            i + 1,
            lengths[i],
            if prepend { " with BOS" } else { "" },
            ctx.cfg.n_ctx
        )));
    }
    if let Some(i) = lengths.iter().position(|&l| l == 0) {
        return Err(e(format!(
            "prompt {} ({:?}) has no tokens",
            i + 1,
            prompts[i]
        )));
    }
    let tokens = batch_tokens(&encoded, prepend.then_some(bos), bos, ctx.cfg.n_ctx);
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

    fn spec(toml: &str) -> DatasetSpec {
        toml::from_str(&format!("name = \"d\"\n{toml}")).unwrap()
    }

    #[test]
    fn keys_are_checked_per_kind() {
        check_keys(&spec("kind = \"ioi\"\nn = 4\nseed = 1")).unwrap();
        let e = check_keys(&spec("kind = \"ioi\"\nseq_len = 4"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`seq_len`") && e.contains("\"ioi\""), "{e}");
        let e = check_keys(&spec(
            "kind = \"text\"\npath = \"a.txt\"\nseq_len = 4\nprompts = [\"x\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("`prompts`") && e.contains("\"text\""), "{e}");
        let e = check_keys(&spec("kind = \"text\"\npath = \"a.txt\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `seq_len`"), "{e}");
        let e = check_keys(&spec("kind = \"tokens\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `path`"), "{e}");
        let e = check_keys(&spec("kind = \"prompts\"\nprepend_bos = false"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `prompts`"), "{e}");
        // Every key is allowed by some kind, and required keys are allowed.
        for kind in [
            DatasetKind::Ioi,
            DatasetKind::Text,
            DatasetKind::Tokens,
            DatasetKind::Prompts,
        ] {
            for k in required_keys(kind) {
                assert!(allowed_keys(kind).contains(k));
            }
        }
    }

    #[test]
    fn unpadded_lengths_keep_bos() {
        let t = ndarray::array![[9, 1, 2, 9], [9, 9, 9, 9], [9, 3, 9, 4]];
        assert_eq!(unpadded_lengths(&t, 9), vec![3, 1, 4]);
    }
}
