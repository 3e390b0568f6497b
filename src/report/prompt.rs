//! TransformerLens's `utils.test_prompt` for the terminal: how a model ranks the answer to a
//! prompt, and its top k next tokens.
//!
//! Owns: the computation ([`test_prompt`] on text, [`test_prompt_ids`] on token ids) and
//! the printout in TL's exact layout ([`PromptReport`]'s `Display`), including
//! multi-token answers (one block per answer token) and several single-token answers
//! (compared at the next position only, as TL does). Must not: parse arguments or load
//! models (`cli::prompt` does).
//!
//! TL's layout (`transformer_lens/utilities/exploratory_utils.py`):
//! ```text
//! Tokenized prompt: ['<|endoftext|>', 'Why', ' did', ' the', ' elephant', ' cross', ' the']
//! Tokenized answer: [' road']
//! Performance on answer token:
//! Rank: 2        Logit: 14.24 Prob:  3.51% Token: | road|
//! Top 0th token. Logit: 14.51 Prob:  4.59% Token: | ground|
//! ...
//! Ranks of the answer tokens: [(' road', 2)]
//! ```

use std::fmt;

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::model::HookedGpt2;
use crate::seam::SeamDevice;
use crate::tokenizer::GptTokenizer;

/// How to build the tokens, as TL's `test_prompt` arguments.
#[derive(Debug, Clone, Copy)]
pub struct PromptOptions {
    /// Prepend BOS to the prompt (TL's default for GPT-2).
    pub prepend_bos: bool,
    /// Prepend a space to an answer that does not start with one (TL's default).
    pub prepend_space_to_answer: bool,
    pub top_k: usize,
}

impl Default for PromptOptions {
    fn default() -> Self {
        PromptOptions {
            prepend_bos: true,
            prepend_space_to_answer: true,
            top_k: 10,
        }
    }
}

/// One token's logit and probability at a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub id: u32,
    pub text: String,
    pub logit: f32,
    pub prob: f32,
    /// 0 = the most probable next token.
    pub rank: usize,
}

/// What the model predicts at one answer position.
#[derive(Debug, Clone)]
pub struct AnswerPosition {
    /// The answer token(s) expected here, one per answer.
    pub answers: Vec<Scored>,
    /// The top k tokens, most probable first.
    pub top: Vec<Scored>,
}

/// The result of [`test_prompt`].
#[derive(Debug, Clone)]
pub struct PromptReport {
    pub prompt_tokens: Vec<String>,
    /// Each answer's tokens.
    pub answer_tokens: Vec<Vec<String>>,
    /// One entry per answer position (several for a multi-token answer, one when several
    /// answers are compared).
    pub positions: Vec<AnswerPosition>,
}

/// Every token at a position, ranked: `(id, logit, prob)` most probable first. Ties keep the
/// lower id first, so ranks are deterministic.
pub fn ranked(logits: &[f32]) -> Vec<(u32, f32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let mut out: Vec<(u32, f32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, x, (((x - max) as f64).exp() / sum) as f32))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

/// `test_prompt` on token ids: `prompt` (BOS included if wanted) and the answers' ids.
/// `text` gives a token's display text.
pub fn test_prompt_ids<D: SeamDevice>(
    model: &HookedGpt2<D>,
    prompt: &[u32],
    answers: &[Vec<u32>],
    top_k: usize,
    text: &dyn Fn(u32) -> String,
) -> Result<PromptReport> {
    if prompt.is_empty() {
        return Err(Error::Other("the prompt has no tokens".into()));
    }
    if answers.is_empty() || answers.iter().any(Vec::is_empty) {
        return Err(Error::Other("every answer needs at least one token".into()));
    }
    // Several answers: only their first token is compared, at the position after the prompt
    // (TL truncates them to one token). One answer: every one of its tokens, each predicted
    // from the prompt and the answer tokens before it.
    let multiple = answers.len() > 1;
    let answer_len = if multiple { 1 } else { answers[0].len() };
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&answers[0][..answer_len - 1]);
    let tokens = Array2::from_shape_vec((1, ids.len()), ids)
        .map_err(|e| Error::Other(format!("prompt tokens: {e}")))?;
    let logits = model.logits_host(&tokens, &mut Hooks::default())?;
    let mut positions = Vec::with_capacity(answer_len);
    for j in 0..answer_len {
        let row = logits.slice(ndarray::s![0, prompt.len() - 1 + j, ..]);
        let row: Vec<f32> = row.iter().copied().collect();
        let ranking = ranked(&row);
        let mut rank_of = vec![0usize; row.len()];
        for (r, &(id, _, _)) in ranking.iter().enumerate() {
            rank_of[id as usize] = r;
        }
        let scored = |id: u32| -> Result<Scored> {
            let i = id as usize;
            let (&logit, &rank) = row.get(i).zip(rank_of.get(i)).ok_or_else(|| {
                Error::Other(format!(
                    "answer token id {id} is outside the vocabulary ({})",
                    row.len()
                ))
            })?;
            Ok(Scored {
                id,
                text: text(id),
                logit,
                prob: ranking[rank].2,
                rank,
            })
        };
        let answers = answers
            .iter()
            .map(|a| scored(a[j]))
            .collect::<Result<Vec<_>>>()?;
        let top = ranking
            .iter()
            .take(top_k)
            .enumerate()
            .map(|(rank, &(id, logit, prob))| Scored {
                id,
                text: text(id),
                logit,
                prob,
                rank,
            })
            .collect();
        positions.push(AnswerPosition { answers, top });
    }
    Ok(PromptReport {
        prompt_tokens: prompt.iter().map(|&t| text(t)).collect(),
        answer_tokens: answers
            .iter()
            .map(|a| a.iter().map(|&t| text(t)).collect())
            .collect(),
        positions,
    })
}

/// The token ids TL's `test_prompt` runs: the prompt (BOS first if `opts` says so) and each
/// answer (with a leading space added unless `opts` says not to).
pub fn prompt_ids(
    tokenizer: &GptTokenizer,
    bos: u32,
    prompt: &str,
    answers: &[String],
    opts: PromptOptions,
) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    let mut prompt_ids: Vec<u32> = Vec::new();
    if opts.prepend_bos {
        prompt_ids.push(bos);
    }
    prompt_ids.extend(tokenizer.encode(prompt)?);
    let answer_ids = answers
        .iter()
        .map(|a| {
            let a = if opts.prepend_space_to_answer && !a.starts_with(' ') {
                format!(" {a}")
            } else {
                a.clone()
            };
            tokenizer.encode(&a)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((prompt_ids, answer_ids))
}

/// TL's `test_prompt(prompt, answer, model)` with a tokenizer: [`prompt_ids`], then
/// [`test_prompt_ids`].
pub fn test_prompt<D: SeamDevice>(
    model: &HookedGpt2<D>,
    tokenizer: &GptTokenizer,
    prompt: &str,
    answers: &[String],
    opts: PromptOptions,
) -> Result<PromptReport> {
    let (prompt_ids, answer_ids) =
        prompt_ids(tokenizer, model.cfg.bos_token_id, prompt, answers, opts)?;
    let text = |id: u32| tokenizer.decode_one(id);
    test_prompt_ids(model, &prompt_ids, &answer_ids, opts.top_k, &text)
}

/// Python's `repr` of a string: single quotes unless the text has a single quote and no
/// double quote, backslash escapes for the quote, backslash and non-printable characters.
pub fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::new();
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            // Python prints these escaped: controls, separators other than the ASCII space,
            // and format characters (soft hyphen, zero-width space, BOM, ...).
            c if c.is_control()
                || (c.is_whitespace() && c != ' ')
                || matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{2060}'..='\u{2064}' | '\u{feff}') =>
            {
                let n = c as u32;
                if n <= 0xff {
                    out.push_str(&format!("\\x{n:02x}"));
                } else if n <= 0xffff {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn py_list(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(", "))
}

/// Python's `f"{p:6.2%}"`.
fn percent(p: f32) -> String {
    format!("{:>6}", format!("{:.2}%", p as f64 * 100.0))
}

impl fmt::Display for PromptReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let multiple = self.answer_tokens.len() > 1;
        writeln!(
            f,
            "Tokenized prompt: {}",
            py_list(self.prompt_tokens.iter().map(|t| py_repr(t)))
        )?;
        if multiple {
            writeln!(
                f,
                "Tokenized answers: {}",
                py_list(
                    self.answer_tokens
                        .iter()
                        .map(|a| py_list(a.iter().map(|t| py_repr(t))))
                )
            )?;
        } else {
            writeln!(
                f,
                "Tokenized answer: {}",
                py_list(self.answer_tokens[0].iter().map(|t| py_repr(t)))
            )?;
        }
        for pos in &self.positions {
            writeln!(
                f,
                "Performance on answer token{}:",
                if multiple { "s" } else { "" }
            )?;
            for a in &pos.answers {
                writeln!(
                    f,
                    "Rank: {:<8} Logit: {:5.2} Prob: {} Token: |{}|",
                    a.rank,
                    a.logit,
                    percent(a.prob),
                    a.text
                )?;
            }
            for (i, t) in pos.top.iter().enumerate() {
                writeln!(
                    f,
                    "Top {i}th token. Logit: {:5.2} Prob: {} Token: |{}|",
                    t.logit,
                    percent(t.prob),
                    t.text
                )?;
            }
        }
        // TL unwraps the per-position lists when there is one answer.
        let per_position: Vec<String> = self
            .positions
            .iter()
            .map(|p| {
                let ranks: Vec<String> = p
                    .answers
                    .iter()
                    .map(|a| format!("({}, {})", py_repr(&a.text), a.rank))
                    .collect();
                if multiple {
                    py_list(ranks)
                } else {
                    ranks.into_iter().next().unwrap_or_default()
                }
            })
            .collect();
        writeln!(f, "Ranks of the answer tokens: {}", py_list(per_position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_reprs() {
        assert_eq!(py_repr(" Sarah"), "' Sarah'");
        assert_eq!(py_repr("it's"), "\"it's\"");
        assert_eq!(py_repr("a'b\""), "'a\\'b\"'");
        assert_eq!(py_repr("\n\u{a0}é"), "'\\n\\xa0é'");
        assert_eq!(percent(0.4679), "46.79%");
        assert_eq!(percent(0.0585), " 5.85%");
        assert_eq!(format!("{:<8}|{:5.2}", 0, 1.23456), "0       | 1.23");
    }

    #[test]
    fn ranks_by_logit() {
        let r = ranked(&[1.0, 3.0, 2.0, 3.0]);
        let ids: Vec<u32> = r.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 3, 2, 0]);
        let total: f32 = r.iter().map(|x| x.2).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
