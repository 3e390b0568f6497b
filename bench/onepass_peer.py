#!/usr/bin/env python3
"""The strongest PyTorch peer for `runner bench`: both sweeps written the way a researcher who
cares about speed would write them in PyTorch (docs: /work/shared/docs/metrics.md §1-2).

Per batch: ONE `run_with_cache` caching `hook_v`, `hook_z`, `hook_pattern` of every layer and
`ln_final.hook_scale` (plus the logits for projection_loss); then every head of every layer
at once (source_suppression) or every head of a layer at once, in head chunks that bound the
[batch, heads, seq, vocab] temporaries (projection_loss), with the same factoring as hookgraph:
- source coefficients c[b, k, h] = v[b, k, h] . (W_O[h] @ u_k), `U_tok @ W_O^T` per layer;
- a head's logit changes `z_h @ (W_O[h] @ W_U)` and `(pattern * coef) @ (U_tok @ W_U)`;
- losses with `torch.logsumexp`.

`python bench/onepass_peer.py --check` runs both on the TransformerLens goldens
(tests/golden/{a,b}_metrics.safetensors, made by the notebook's own functions in
tests/golden/make_golden.py) and fails if any value differs by more than 1e-4 relative.
`bench/transformer_lens_baseline.py` imports the two functions and times them.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hooks(n_layers, names, extra=()):
    return [f"blocks.{l}.attn.{n}" for l in range(n_layers) for n in names] + list(extra)


@torch.no_grad()
def source_suppression(model, toks, bos, batch_size=20, only_negative=False):
    """metrics.md §1 for every head: per_position [L, H, N, S], per_sequence [L, H, N]."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    W_O = model.W_O  # [L, H, dh, D]
    W_U = model.W_U  # [D, V]
    names = _hooks(L, ["hook_v", "hook_pattern"], ["ln_final.hook_scale"])
    pp_out, ps_out = [], []
    for start in range(0, toks.shape[0], batch_size):
        t = toks[start:start + batch_size]
        _, cache = model.run_with_cache(t, names_filter=names, return_type=None)
        U = W_U.T[t]  # [B, S, D]
        v = torch.stack([cache[f"blocks.{l}.attn.hook_v"] for l in range(L)])  # [L, B, S, H, dh]
        pat = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(L)])  # [L,B,H,Q,K]
        scale = cache["ln_final.hook_scale"][..., 0]  # [B, S]
        # g[l, b, s, h, e] = (W_O[l, h] @ u_{b,s})[e]: one matmul for every head of every layer
        g = torch.einsum("bsd,lhed->lbshe", U, W_O)
        c = (g * v).sum(-1)  # [L, B, K, H]
        if only_negative:
            c = c * (c < 0)
        m = (t != bos).float()  # [B, S]
        a = pat * m[None, :, None, :, None] * m[None, :, None, None, :]  # [L, B, H, Q, K]
        x = c.permute(0, 1, 3, 2)[:, :, :, None, :] * a / scale[None, :, None, :, None]
        per_pos = x.sum(3)  # [L, B, H, K]
        w = a.sum(3)
        per_seq = (per_pos * w).sum(-1) / w.sum(-1)  # [L, B, H]
        pp_out.append(per_pos.permute(0, 2, 1, 3))
        ps_out.append(per_seq.permute(0, 2, 1))
    return torch.cat(pp_out, 2), torch.cat(ps_out, 2)


@torch.no_grad()
def projection_loss(model, toks, batch_size=20, only_negative=False, chunk_bytes=1 << 30):
    """metrics.md §2 for every head: (loss_orig [N, S-1], {proj, perp, ablation}: [L, H, N, S-1])."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    W_O, W_U = model.W_O, model.W_U
    V = W_U.shape[1]
    names = _hooks(L, ["hook_v", "hook_z", "hook_pattern"], ["ln_final.hook_scale"])
    orig_out, out = [], {k: [] for k in ("proj", "perp", "ablation")}
    for start in range(0, toks.shape[0], batch_size):
        t = toks[start:start + batch_size]
        B, S = t.shape
        logits, cache = model.run_with_cache(t, names_filter=names)
        tgt = t[:, 1:]  # [B, S-1]
        tgt_h = tgt[:, None]  # [B, 1, S-1]

        def loss_of(lg, tgt):  # lg [B, ..., S, V], tgt [B, ..., S-1] -> [B, ..., S-1]
            lg = lg[..., :-1, :]
            target = lg.gather(-1, tgt.expand(lg.shape[:-1]).unsqueeze(-1))[..., 0]
            return torch.logsumexp(lg, -1) - target

        orig_out.append(loss_of(logits, tgt))
        U = W_U.T[t]  # [B, S, D]
        UU = U @ W_U  # [B, S, V]: U_tok @ W_U, shared by every head
        u_sq = (U * U).sum(-1)  # [B, S]
        inv = 1.0 / cache["ln_final.hook_scale"]  # [B, S, 1]
        per_layer = {k: [] for k in out}
        # heads per chunk: ~6 [B, hc, S, V] temporaries alive at once
        hc = max(1, min(H, chunk_bytes // (6 * B * S * V * 4)))
        for l in range(L):
            v = cache[f"blocks.{l}.attn.hook_v"]  # [B, S, H, dh]
            z = cache[f"blocks.{l}.attn.hook_z"]
            pat = cache[f"blocks.{l}.attn.hook_pattern"]  # [B, H, Q, K]
            coef = torch.einsum("bsd,hed,bshe->bsh", U, W_O[l], v) / u_sq[..., None]
            if only_negative:
                coef = coef * (coef < 0)
            res = {k: [] for k in out}
            for h0 in range(0, H, hc):
                hs = slice(h0, min(H, h0 + hc))
                wou = W_O[l, hs] @ W_U  # [hc, dh, V]
                pc = pat[:, hs] * coef[:, None, :, hs].permute(0, 3, 1, 2)  # [B, hc, Q, K]
                new_u = torch.einsum("bhqk,bkv->bhqv", pc, UU) * inv[:, None]
                orig_u = torch.einsum("bqhe,hev->bhqv", z[:, :, hs], wou) * inv[:, None]
                lg = logits[:, None]
                res["proj"].append(loss_of(lg + new_u - orig_u, tgt_h))
                res["perp"].append(loss_of(lg - new_u, tgt_h))
                res["ablation"].append(loss_of(lg - orig_u, tgt_h))
                del new_u, orig_u
            for k in out:
                per_layer[k].append(torch.cat(res[k], 1).permute(1, 0, 2))  # [H, B, S-1]
        for k in out:
            out[k].append(torch.stack(per_layer[k]))  # [L, H, B, S-1]
    return torch.cat(orig_out), {k: torch.cat(v, 2) for k, v in out.items()}


def check():
    """Both functions against the notebook's goldens on both random checkpoints."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
    import make_golden as mg

    worst = 0.0

    def close(name, got, want):
        nonlocal worst
        got, want = got.float(), want.float()
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
        nan = want.isnan()
        assert torch.equal(nan, got.isnan()), f"{name}: NaNs differ"
        g, w = got[~nan], want[~nan]
        err = ((g - w).abs() / (w.abs() + 1e-3)).max().item() if w.numel() else 0.0
        worst = max(worst, err)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"

    for name in ("a", "b"):
        hf = GPT2LMHeadModel.from_pretrained(os.path.join(ROOT, "tests", "fixtures", f"ckpt_{name}")).eval()
        model = mg.build_tl_model(hf, processed=True)
        model.set_use_attn_result(False)
        toks = torch.tensor(json.load(open(os.path.join(ROOT, "tests", "golden", f"tokens_{name}.json"))))
        gold = load_file(os.path.join(ROOT, "tests", "golden", f"{name}_metrics.safetensors"))
        bos = hf.config.bos_token_id
        for neg in (0, 1):
            # batch_size 2 on 3 sequences: the batch loop is exercised too
            pp, ps = source_suppression(model, toks, bos, batch_size=2, only_negative=bool(neg))
            pre = f"source_suppression.only_negative={neg}"
            close(f"{name} {pre}.per_position", pp, gold[f"{pre}.per_position"])
            close(f"{name} {pre}.per_sequence", ps, gold[f"{pre}.per_sequence"])
            orig, losses = projection_loss(model, toks, batch_size=2, only_negative=bool(neg),
                                           chunk_bytes=1)  # one head per chunk: the chunking too
            pre = f"projection_loss.only_negative={neg}"
            for k, v in losses.items():
                close(f"{name} {pre}.loss_{k}", v, gold[f"{pre}.loss_{k}"])
            close(f"{name} loss_orig", orig, gold["projection_loss.loss_orig"])
    print(f"one-pass peer matches the TransformerLens goldens (worst relative error {worst:.1e})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with tests/golden and exit")
    if ap.parse_args().check:
        torch.set_grad_enabled(False)
        check()
    else:
        ap.print_help()
