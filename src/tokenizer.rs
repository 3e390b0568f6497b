//! GPT-2's byte-level BPE tokenizer with TransformerLens's `to_tokens` semantics.
//!
//! Owns: loading a tokenizer from a checkpoint directory (`tokenizer.json`, or `vocab.json` +
//! `merges.txt` as OpenAI published them), encoding texts, and batching them the way TL's
//! `to_tokens` does: prepend BOS, right-pad with the pad id (= BOS for GPT-2), truncate to
//! the context. Must not: know about models beyond the BOS id and context length.

use std::path::Path;

use ndarray::Array2;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// GPT-2's end-of-text token, also its BOS and pad.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// A GPT-2 tokenizer.
pub struct GptTokenizer {
    inner: Tokenizer,
}

impl GptTokenizer {
    /// Whether `dir` holds tokenizer files.
    pub fn present_in(dir: &Path) -> bool {
        dir.join("tokenizer.json").is_file()
            || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
    }

    /// Loads `dir/tokenizer.json`, or builds the tokenizer from `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            let inner = Tokenizer::from_file(&json)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?;
            return Ok(GptTokenizer { inner });
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vocab.is_file() || !merges.is_file() {
            return Err(Error::Tokenizer(format!(
                "{}: no tokenizer.json, nor vocab.json + merges.txt",
                dir.display()
            )));
        }
        Self::from_vocab_merges(&vocab, &merges)
    }

    /// GPT-2's tokenizer from OpenAI's two files: BPE, byte-level pre-tokenizer without a
    /// prefix space, byte-level decoder, `<|endoftext|>` special.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| {
                Error::Tokenizer(format!("{} / {}: {e}", vocab.display(), merges.display()))
            })?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner.add_special_tokens(&[AddedToken::from(ENDOFTEXT, true)]);
        Ok(GptTokenizer { inner })
    }

    /// Token ids of `text`, with no BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of one token, as TL's `to_str_tokens` shows it.
    pub fn decode_one(&self, id: u32) -> String {
        self.inner
            .decode(&[id], false)
            .unwrap_or_else(|_| format!("<{id}>"))
    }

    /// The texts of several tokens, one each.
    pub fn str_tokens(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| self.decode_one(i)).collect()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// TL's `to_tokens` for a batch of already-encoded texts: optional BOS first, truncation to
/// `max_len`, right padding with `pad` to the longest.
pub fn batch_tokens(
    encoded: &[Vec<u32>],
    bos: Option<u32>,
    pad: u32,
    max_len: usize,
) -> Array2<u32> {
    let rows: Vec<Vec<u32>> = encoded
        .iter()
        .map(|ids| {
            let mut r: Vec<u32> = bos.into_iter().chain(ids.iter().copied()).collect();
            r.truncate(max_len);
            r
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Array2::from_elem((rows.len(), width), pad);
    for (i, r) in rows.iter().enumerate() {
        for (j, &t) in r.iter().enumerate() {
            out[[i, j]] = t;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_like_to_tokens() {
        let t = batch_tokens(&[vec![5, 6, 7], vec![8]], Some(1), 1, 3);
        assert_eq!(t, ndarray::array![[1, 5, 6], [1, 8, 1]]);
    }
}
