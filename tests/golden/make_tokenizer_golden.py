"""GPT-2 token ids of awkward texts, from Hugging Face's own tokenizer: the reference for
hookgraph's tokenizer (tests/it/data.rs `tokenizer_matches_hugging_face`).

Why: hookgraph builds the `tokenizers` crate with its pure-Rust regex engine (fancy-regex)
instead of the default Oniguruma (Cargo.toml says why). TransformerLens's `to_tokens` goes
through the Python `tokenizers` package, whose wheel is built with Oniguruma. GPT-2's
pre-tokenizer pattern has a lookahead (`\\s+(?!\\S)`) and Unicode classes (`\\p{L}`, `\\p{N}`),
so the texts below stress exactly those: runs of spaces, tabs and newlines before words,
contractions in both cases, digits and letters of other scripts, emoji, combining marks,
the special token inside text.

What it makes: tests/golden/tokenizer_gpt2.json, [{"text": ..., "ids": [...]}, ...], from
GPT-2's vocab.json + merges.txt as experiments/checkpoints/tiny-gpt2 ships them, built the
way `GptTokenizer::from_vocab_merges` builds it (byte-level, no prefix space,
`<|endoftext|>` special).

Rerun by hand, from the repository root (needs only `pip install tokenizers`; generated with
tokenizers 0.23.3):

    /work/.pyvenv/bin/python tests/golden/make_tokenizer_golden.py
"""

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CKPT = os.path.join(ROOT, "experiments", "checkpoints", "tiny-gpt2")
OUT = os.path.join(ROOT, "tests", "golden", "tokenizer_gpt2.json")

TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "I'm sure they'll say it's fine; we've seen what you'd do.",
    "I'M SURE THEY'LL SAY IT'S FINE; WE'VE SEEN WHAT YOU'D DO.",
    "don't  won't   can't\tshan't",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\t\ttabs\t",
    "line one\nline two\n\n\nline five\r\nwindows line",
    "a   \n   b \n\n  c",
    "numbers 12345 and 3.14159, 1,000,000 and 2024-12-06",
    "x1y2z3 abc123 123abc",
    "Ünïcödé façade naïve coöperate Straße",
    "Ελληνικά, русский текст, עברית, العربية",
    "中文字符和日本語のテキスト、한국어",
    "emoji 🙂🚀 and flags 🇫🇷 and a family 👨‍👩‍👧",
    "combining e\u0301 and a\u030a and zero\u200bwidth",
    "punctuation!!! ??? ... --- ((( ))) [[ ]] {{ }} <<>>",
    "code: fn main() { println!(\"{}\", x); } // done",
    "<|endoftext|>The end.<|endoftext|> And again",
    "    ",
    "\n",
    "",
    "mixed\u00a0non-breaking\u2003em-space\u3000ideographic",
    "'s 't 're 've 'm 'll 'd 'S 'T",
]


def tokenizer():
    tok = Tokenizer(
        models.BPE.from_file(
            os.path.join(CKPT, "vocab.json"), os.path.join(CKPT, "merges.txt")
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok


def main():
    tok = tokenizer()
    rows = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in TEXTS]
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        f.write("\n]\n")
    print(f"wrote {OUT}: {len(rows)} texts")


if __name__ == "__main__":
    main()
