#!/usr/bin/env python3
"""PyTorch on the GPU, the peer of `runner bench --device cuda` (run by scripts/gpu/check.sh).

On the same random GPT-2-small-shaped checkpoint and token files that
`runner bench --device cuda --dir DIR` wrote, in float32 (TF32 off, as hookgraph computes in
plain f32), timed with CUDA events (warm-up first, then the median of repeats):
- HF `GPT2LMHeadModel`'s eager forward, per token file except the paper-scale one (the bench
  has no forward case there): `hf forward AxB`;
- the source_suppression sweep written the vectorised one-pass way (bench/onepass_peer.py's
  algorithm on HF modules, so the GPU machine needs only torch and transformers): one pass
  per batch with hooks on `c_attn` (v) and `ln_f` (the final scale) and the attention
  patterns, then every head of every layer at once, the unembedding skipped:
  `peer source_suppression sweep AxB`.
`python scripts/gpu/torch_peer.py --check` runs the sweep on the CPU against the
TransformerLens goldens (worst relative error 5e-5). Writes a JSON whose case names follow
`runner bench`'s baseline scheme (`src/bench.rs`, `Baseline`): the peer of bench case NAME
is `hf forward AxB` for `forward AxB`, else `peer NAME`; plus `device` and `torch` (strings).
"""
import argparse
import json
import os
import statistics

import torch
from transformers import GPT2LMHeadModel

# runner bench's paper-scale case and its sequences per pass (src/bench.rs: PAPER, PAPER_BATCH).
PAPER, PAPER_BATCH = "500x1000", 10


def processed_weights(model):
    """TransformerLens's processing (from_pretrained's defaults) of what the sweep reads: W_U
    with ln_f folded in and centred over the vocabulary, W_O centred over d_model
    ([L, H, dh, D]), and per layer the bias that fold_ln plus fold_value_biases take out of
    hook_v (ln_1's bias through W_V, plus b_V): TL's v is HF's minus it. The patterns and the
    final scale are the same either way."""
    tr, cfg = model.transformer, model.config
    h, d = cfg.n_head, cfg.n_embd
    w_u = tr.ln_f.weight[:, None] * tr.wte.weight.T  # [D, V]
    w_u = w_u - w_u.mean(-1, keepdim=True)
    w_o = torch.stack([blk.attn.c_proj.weight.view(h, d // h, d) for blk in tr.h])
    v_bias = [blk.ln_1.bias @ blk.attn.c_attn.weight[:, 2 * d:] + blk.attn.c_attn.bias[2 * d:]
              for blk in tr.h]
    return w_u, w_o - w_o.mean(-1, keepdim=True), v_bias


@torch.no_grad()
def source_suppression(model, weights, toks, bos, batch_size):
    """docs/metrics.md section 1 for every head: per_position [L, H, N, S], per_sequence [L, H, N]."""
    tr, cfg = model.transformer, model.config
    L, H, D = cfg.n_layer, cfg.n_head, cfg.n_embd
    dh, eps = D // H, cfg.layer_norm_epsilon
    w_u, w_o, v_bias = weights
    vs, resid = {}, {}
    handles = [blk.attn.c_attn.register_forward_hook(
        lambda m, i, o, l=l: vs.__setitem__(l, o[..., 2 * D:] - v_bias[l]))
        for l, blk in enumerate(tr.h)]
    handles.append(tr.ln_f.register_forward_pre_hook(lambda m, a: resid.__setitem__(0, a[0])))
    pp_out, ps_out = [], []
    try:
        for start in range(0, toks.shape[0], batch_size):
            t = toks[start:start + batch_size]
            B, S = t.shape
            pat = torch.stack(tr(t, output_attentions=True).attentions)  # [L, B, H, Q, K]
            v = torch.stack([vs[l] for l in range(L)]).view(L, B, S, H, dh)
            x = resid[0]
            xc = x - x.mean(-1, keepdim=True)
            scale = (xc.pow(2).mean(-1) + eps).sqrt()  # [B, S], TL's ln_final.hook_scale
            U = w_u.T[t]  # [B, S, D]
            g = torch.einsum("bsd,lhed->lbshe", U, w_o)
            c = (g * v).sum(-1)  # [L, B, K, H]
            m = (t != bos).float()
            a = pat * m[None, :, None, :, None] * m[None, :, None, None, :]
            xx = c.permute(0, 1, 3, 2)[:, :, :, None, :] * a / scale[None, :, None, :, None]
            per_pos = xx.sum(3)
            w = a.sum(3)
            per_seq = (per_pos * w).sum(-1) / w.sum(-1)
            pp_out.append(per_pos.permute(0, 2, 1, 3))
            ps_out.append(per_seq.permute(0, 2, 1))
    finally:
        for hd in handles:
            hd.remove()
    return torch.cat(pp_out, 2), torch.cat(ps_out, 2)


def timed(f, repeats):
    for _ in range(2):
        f()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def check():
    """The sweep against the TransformerLens goldens (tests/golden, both random checkpoints),
    on the CPU: fails if any value differs by more than 1e-4 relative."""
    from safetensors.torch import load_file

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worst = 0.0
    for name in ("a", "b"):
        model = GPT2LMHeadModel.from_pretrained(
            os.path.join(root, "tests", "fixtures", f"ckpt_{name}"), attn_implementation="eager").eval()
        toks = torch.tensor(json.load(open(os.path.join(root, "tests", "golden", f"tokens_{name}.json"))))
        gold = load_file(os.path.join(root, "tests", "golden", f"{name}_metrics.safetensors"))
        # batch_size 2 on 3 sequences: the batch loop is exercised too
        pp, ps = source_suppression(model, processed_weights(model), toks, model.config.bos_token_id, 2)
        for key, got in (("per_position", pp), ("per_sequence", ps)):
            want = gold[f"source_suppression.only_negative=0.{key}"].float()
            nan = want.isnan()
            assert torch.equal(nan, got.isnan()), f"{name} {key}: NaNs differ"
            err = ((got[~nan] - want[~nan]).abs() / (want[~nan].abs() + 1e-3)).max().item()
            worst = max(worst, err)
            assert err < 1e-4, f"{name} {key}: relative error {err:.2e}"
    print(f"GPU peer's source_suppression matches the TransformerLens goldens (worst relative error {worst:.1e})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true",
                    help="compare the sweep with tests/golden on the CPU and exit")
    ap.add_argument("--dir")
    ap.add_argument("--out")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.check:
        check()
        return
    if not (args.dir and args.out):
        ap.error("--dir and --out are required")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    # Eager attention: the sweep reads the patterns, which SDPA does not return.
    model = GPT2LMHeadModel.from_pretrained(args.dir, attn_implementation="eager").to(dev).eval()
    bos = model.config.bos_token_id
    weights = processed_weights(model)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name in sorted(os.listdir(args.dir)):
        if not (name.startswith("tokens_") and name.endswith(".json")):
            continue
        shape = name[len("tokens_"):-len(".json")]  # e.g. 60x100
        toks = torch.tensor(json.load(open(os.path.join(args.dir, name))), device=dev)
        paper = shape == PAPER
        reps = min(args.repeats, 3) if paper else args.repeats
        if not paper:
            def forward():
                for i in range(0, toks.shape[0], args.batch_size):
                    model(toks[i:i + args.batch_size]).logits
            key = f"hf forward {shape}"
            results[key] = timed(forward, reps)
            print(f"{key}: {results[key]:.4f} s (median of {reps})", flush=True)
        bs = min(args.batch_size, PAPER_BATCH) if paper else args.batch_size
        key = f"peer source_suppression sweep {shape}"
        results[key] = timed(lambda: source_suppression(model, weights, toks, bos, bs), reps)
        print(f"{key}: {results[key]:.4f} s (median of {reps})", flush=True)
    json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
