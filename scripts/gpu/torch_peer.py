#!/usr/bin/env python3
"""PyTorch on the GPU, the peer of `runner bench --device cuda` (run by scripts/gpu/check.sh).

Times HF `GPT2LMHeadModel` eager forward passes in float32 (TF32 off, as hookgraph computes in
plain f32) on the same random GPT-2-small-shaped checkpoint and token files that
`runner bench --dir DIR` wrote, with CUDA events: warm-up first, then the median of repeats.
Writes a JSON of case name -> seconds, named as `runner bench` names its cases.
"""
import argparse
import json
import os
import statistics

import torch
from transformers import GPT2LMHeadModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = GPT2LMHeadModel.from_pretrained(args.dir).to(dev).eval()
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name in sorted(os.listdir(args.dir)):
        if not (name.startswith("tokens_") and name.endswith(".json")):
            continue
        shape = name[len("tokens_"):-len(".json")]  # e.g. 60x100
        toks = torch.tensor(json.load(open(os.path.join(args.dir, name))), device=dev)

        def forward():
            for i in range(0, toks.shape[0], args.batch_size):
                model(toks[i:i + args.batch_size]).logits

        for _ in range(2):
            forward()
        times = []
        for _ in range(args.repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            forward()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        results[f"forward {shape}"] = statistics.median(times)
        print(f"forward {shape}: {results[f'forward {shape}']:.4f} s (median of {args.repeats})")
    json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
