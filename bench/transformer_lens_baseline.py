#!/usr/bin/env python3
"""PyTorch baselines for `runner bench`, run by hand in a local venv (never in CI).

Times, on the same random GPT-2-small-shaped checkpoint and token files that `runner bench`
writes to target/bench-gpt2-small/ (run `runner bench` once first), with torch on 2 threads:
- MKL's sgemm (through torch) on the forward's matmul shapes: the machine's measured peak
  (`sgemm GFLOP/s`), the ceiling `runner bench` prints beside every GFLOP/s figure;
- the plain forward pass (10x30 and 60x100) in TransformerLens and HF's GPT2LMHeadModel;
- the one-pass vectorised peer of both sweeps (bench/onepass_peer.py: one run_with_cache per
  batch, every head at once, checked against the TransformerLens goldens with `--check`);
- the intervention cases (bench/tl_patching.py): TransformerLens's `patching.py` sweeps
  (`get_act_patch_attn_head_out_all_pos`, `get_act_patch_resid_pre`) on 20x16 and 10x100,
  written as `tl <case>`; `--patching` runs only those;
- optionally (`--notebook`) the notebook's procedure: `compute_weighted_avg_logit_suppression`
  once per head, 144 hooked forward passes per sweep, imported from
  tests/golden/make_golden.py where it is copied verbatim (with the edits listed there).
It writes a JSON of case name -> seconds (and `sgemm GFLOP/s`) that
`runner bench --baseline FILE` turns into ratios. Run it right before `runner bench`, on the
same machine: the ratios are only meaningful side by side.

    python3 -m venv .venv && .venv/bin/pip install torch "transformer_lens>=3,<4" safetensors
    .venv/bin/python bench/transformer_lens_baseline.py [--dir target/bench-gpt2-small] \
        [--out bench/baseline.json] [--notebook] [--peer-projection-60x100]
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
import onepass_peer  # noqa: E402  (bench/onepass_peer.py, next to this file)
import tl_patching  # noqa: E402  (bench/tl_patching.py, next to this file)

# The forward's matmuls per layer ([M, k] @ [k, n]) with M = batch x seq.
FORWARD_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]


def sgemm_peak(m, repeats=7):
    """GFLOP/s of MKL's sgemm (torch.mm) over one layer's matmul shapes at M = m: the sum of
    FLOPs over the sum of each shape's best time."""
    flop, secs = 0.0, 0.0
    for k, n in FORWARD_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        flop += 2.0 * m * k * n
        secs += best
    return flop / secs / 1e9


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "bench-gpt2-small"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "baseline.json"))
    ap.add_argument("--notebook", action="store_true",
                    help="also time the notebook's per-head procedure on 10x30 (~15 min on 2 cores)")
    ap.add_argument("--peer-projection-60x100", action="store_true",
                    help="also time the one-pass peer's projection_loss sweep on 60x100 (long)")
    ap.add_argument("--repeats", type=int, default=3, help="each case's best of this many runs")
    ap.add_argument("--patching", action="store_true",
                    help="only the intervention cases (TransformerLens's patching.py sweeps)")
    ap.add_argument("--only", metavar="TEXT",
                    help="only the cases whose name contains TEXT (as `runner bench --only`)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    # Same cores as `runner bench` (torch may default to fewer under a CPU quota).
    torch.set_num_threads(os.cpu_count())
    hf = GPT2LMHeadModel.from_pretrained(args.dir).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    model = mg.build_tl_model(hf, processed=True)
    mg.BOS_TOKEN_ID = hf.config.bos_token_id
    out = {}
    out["sgemm GFLOP/s"] = max(sgemm_peak(300), sgemm_peak(2000))
    print(f"sgemm (MKL via torch) on the forward's shapes: {out['sgemm GFLOP/s']:.0f} GFLOP/s", flush=True)
    bos = hf.config.bos_token_id

    def best_of(name, f, repeats):
        if args.only is not None and args.only not in name:
            return
        f_secs = min(_timed(f) for _ in range(repeats))
        out[name] = f_secs
        print(f"{name}: {f_secs:.3f} s (best of {repeats})", flush=True)

    # TransformerLens's patching.py sweeps, one hooked pass per intervention: seconds each,
    # so the best of fewer runs.
    tl_patching.cases(model, args.dir,
                      lambda name, f: best_of(f"tl {name}", f, max(1, min(args.repeats, 2))))
    for b, s in [] if args.patching else [(10, 30), (60, 100)]:
        toks = torch.tensor(json.load(open(os.path.join(args.dir, f"tokens_{b}x{s}.json"))))
        # The plain forward: TL without per-head results (the notebook's sweeps turn them on),
        # and HF's GPT2LMHeadModel, same weights, same batches of 20 as `runner bench`.
        model.set_use_attn_result(False)
        for name, fwd in [("forward", lambda x: model(x, return_type="logits")),
                          ("hf forward", lambda x: hf(x).logits)]:
            fwd(toks[:2])  # warm-up

            def run(fwd=fwd):
                for start in range(0, b, 20):
                    fwd(toks[start:start + 20])
            best_of(f"{name} {b}x{s}", run, args.repeats)
        # The strongest peer: one pass per batch, every head vectorised.
        best_of(f"peer source_suppression sweep {b}x{s}",
                lambda: onepass_peer.source_suppression(model, toks, bos, batch_size=20), args.repeats)
        if b == 10 or args.peer_projection_60x100:
            best_of(f"peer projection_loss sweep {b}x{s}",
                    lambda: onepass_peer.projection_loss(model, toks, batch_size=20), 1)
        model.set_use_attn_result(True)
        if b == 60 or not args.notebook:
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
