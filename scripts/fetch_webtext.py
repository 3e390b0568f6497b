#!/usr/bin/env python3
"""Writes data/webtext.jsonl: an OpenWebText sample for the web-text experiments.

Needs internet and `pip install datasets`. The notebook used TransformerLens's
`get_webtext(seed=6)`, which reads the `stas/openwebtext-10k` dataset; this writes its
documents, unshuffled, one JSON object per line with a `text` field (the specs shuffle with
seed 6 themselves).

    python3 scripts/fetch_webtext.py [--n 2000] [--out data/webtext.jsonl]
"""
import argparse
import json
import os

from datasets import load_dataset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", default="data/webtext.jsonl")
    args = ap.parse_args()
    ds = load_dataset("stas/openwebtext-10k", split="train")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        for row in ds.select(range(min(args.n, len(ds)))):
            f.write(json.dumps({"text": row["text"]}) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
