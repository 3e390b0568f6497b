#!/usr/bin/env python3
"""TransformerLens baseline for `runner bench`, run by hand in a local venv (never in CI).

Times, on the same random GPT-2-small-shaped checkpoint and token files that `runner bench`
writes to target/bench-gpt2-small/ (run `runner bench` once first):
- the plain forward pass (10x30 and 60x100), and
- the notebook's procedure: `compute_weighted_avg_logit_suppression` once per head, 144
  hooked forward passes, for source_suppression (return_new_loss=False) and projection_loss
  (return_new_loss=True), on 10x30 and 60x100 tokens.
It writes a JSON of case name -> seconds that `runner bench --baseline FILE` turns into
speed-ups. The notebook's functions are imported from tests/golden/make_golden.py, where they
are copied verbatim (with the edits listed there).

    python3 -m venv .venv && .venv/bin/pip install torch "transformer_lens>=3,<4" safetensors
    .venv/bin/python bench/transformer_lens_baseline.py [--dir target/bench-gpt2-small] \
        [--out bench/baseline.json] [--skip-60x100-sweeps]
"""
import argparse
import json
import os
import sys
import time

import torch
from transformers import GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
import make_golden as mg  # noqa: E402  (the notebook's functions and the TL model builder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "bench-gpt2-small"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "baseline.json"))
    ap.add_argument("--skip-60x100-sweeps", action="store_true",
                    help="the 60x100 sweeps take tens of minutes on 2 cores")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    # Same cores as `runner bench` (torch may default to fewer under a CPU quota).
    torch.set_num_threads(os.cpu_count())
    hf = GPT2LMHeadModel.from_pretrained(args.dir).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    model = mg.build_tl_model(hf, processed=True)
    mg.BOS_TOKEN_ID = hf.config.bos_token_id
    out = {}
    for b, s in [(10, 30), (60, 100)]:
        toks = torch.tensor(json.load(open(os.path.join(args.dir, f"tokens_{b}x{s}.json"))))
        # The plain forward: TL without per-head results (the notebook's sweeps turn them on),
        # and HF's GPT2LMHeadModel, same weights, same batches of 20 as `runner bench`.
        model.set_use_attn_result(False)
        for name, fwd in [("forward", lambda x: model(x, return_type="logits")),
                          ("hf forward", lambda x: hf(x).logits)]:
            fwd(toks[:2])  # warm-up
            t = time.perf_counter()
            for start in range(0, b, 20):
                fwd(toks[start:start + 20])
            out[f"{name} {b}x{s}"] = time.perf_counter() - t
            print(f"{name} {b}x{s}: {out[f'{name} {b}x{s}']:.3f} s", flush=True)
        model.set_use_attn_result(True)
        if b == 60 and args.skip_60x100_sweeps:
            continue
        for kind, new_loss in [("source_suppression", False), ("projection_loss", True)]:
            t = time.perf_counter()
            for layer in range(model.cfg.n_layers):
                for head in range(model.cfg.n_heads):
                    mg.compute_weighted_avg_logit_suppression(
                        model=model, toks=toks, head=(layer, head),
                        only_use_neg_projections=False, return_new_loss=new_loss)
            name = f"{kind} sweep {b}x{s}"
            out[name] = time.perf_counter() - t
            print(f"{name}: {out[name]:.1f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
