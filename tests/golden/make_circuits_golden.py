"""TransformerLens goldens for the weight-based metrics (docs/metrics.md §3-5).

What it makes (paths relative to the repository root):

  tests/golden/{a,b}_circuits.safetensors
      From the committed fixture checkpoints tests/fixtures/ckpt_{a,b}, processed by
      TransformerLens exactly as make_golden.py does (fold_ln, center_writing_weights,
      center_unembed, fold_value_biases), then computed in float64:
        W_E, W_EE, W_EE0, W_EE0A        §3, the notebook's get_effective_embedding_2
        ov.rank_neg, ov.rank_pos        §4, [n_layers, n_heads, d_vocab] (int64)
        ov.near_neg, ov.near_pos        how many other tokens t lie within TOL of the diagonal
                                        on the side that could flip that rank in float32
        ov.stats                        [L, H, 6]: frac_neg_top10, frac_neg_top5pct,
                                        median_rank_neg, frac_pos_top10, frac_pos_top5pct,
                                        median_rank_pos
        qk.rank, qk.near, qk.stats      §5, stats = frac_top1, frac_top10, median_rank
      b_circuits.safetensors also holds the same under `raw.` for the unprocessed model
      (LayerNorms with their affine parts, as TL's `from_pretrained_no_processing`).
  tests/fixtures/ckpt_planted/{config.json,model.safetensors}
      A planted GPT-2 (3 layers, 1 head of d_head = d_model = 32, vocab 400): block 0 is all
      zeros (so W_EE = W_E); every embedding row is centred and of the same norm, and the
      vocabulary mean is zero, so processing leaves W_E and W_U = W_E^T as they are.
      Layer 1's head has W_V = I, W_O = -I (its OV circuit is minus the unembedding of its
      input: a perfect suppressor, frac_neg_top10 = 1) and W_Q = W_K = I (attends back to the
      predicted token: frac_top1 = 1). Layer 2's head has W_V = W_O = I (a copier,
      frac_pos_top10 = 1) and W_K = -I (frac_top1 = 0). TransformerLens confirms all four
      below; the Rust test checks them through `runner`.

Float32 ties: Rust computes M = (LN(W_EE) @ W_V) @ (W_O @ W_U) in float32 with a different
summation order from this float64 reference, so an entry within rounding of the diagonal can
land on either side. TOL = 1e-5 * max_t |M[s, t]| bounds that rounding generously; the
`near` counts say, per token, how many such entries there are, and the Rust test accepts a
rank that differs by at most that many (in practice none differ on these fixtures).

Rerun from the repository root (reads ckpt_a and ckpt_b, never rewrites them). Like
make_golden.py it needs transformer_lens 3.x (`HookedTransformer`; 4.x removed it). Made with
transformer_lens 3.9.0 installed --no-deps into a venv that reuses /work/venv's torch 2.15 and
transformers 5.24 (a .pth file pointing at its site-packages):

    python -m venv /tmp/tl3 && echo /work/venv/lib/python3.11/site-packages \
        > /tmp/tl3/lib/python3.11/site-packages/work_venv.pth
    /tmp/tl3/bin/pip install --no-deps transformer_lens==3.9.0
    /tmp/tl3/bin/python tests/golden/make_circuits_golden.py
"""

import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_golden import FIX, GOLD, ROOT, build_tl_model, write_config  # noqa: E402

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

TOL = 1e-5


def get_effective_embedding_2(model):
    """The notebook's setup cell (`transformer_lens.rs.callum.keys_fixed.get_effective_embedding_2`,
    research repo, not on PyPI), as published: block 0's heads with full self-attention, no
    b_V / b_O, then MLP 0 with its biases."""
    W_E = model.W_E.clone()
    resid_pre = W_E.unsqueeze(0)
    pre_attention = model.blocks[0].ln1(resid_pre)
    attn_out = torch.einsum("bsd,hde,hef->bsf", pre_attention, model.W_V[0], model.W_O[0])
    resid_mid = attn_out + resid_pre
    normalized_resid_mid = model.blocks[0].ln2(resid_mid)
    mlp_out = model.blocks[0].mlp(normalized_resid_mid)
    return {
        "W_E (no MLPs)": W_E,
        "W_E (including MLPs)": resid_mid.squeeze(0) + mlp_out.squeeze(0),
        "W_E (only MLPs)": mlp_out.squeeze(0),
    }


def rank_stats(ranks, top1=False):
    """ranks: [V] int64, 1-based. docs/metrics.md §4: lower median, floor(0.05 V)."""
    V = ranks.numel()
    k5 = math.floor(0.05 * V)
    med = ranks.sort().values[(V - 1) // 2].item()
    if top1:
        return [(ranks <= 1).double().mean().item(), (ranks <= 10).double().mean().item(), med]
    return [(ranks <= 10).double().mean().item(), (ranks <= k5).double().mean().item(), med]


def circuits(model):
    """§3-5 in float64 on `model` (already converted to float64)."""
    out = {}
    eff = get_effective_embedding_2(model)
    W_E = eff["W_E (no MLPs)"]
    W_EE = eff["W_E (including MLPs)"]
    out["W_E"] = W_E
    out["W_EE"] = W_EE
    out["W_EE0"] = eff["W_E (only MLPs)"]
    out["W_EE0A"] = W_EE - W_E
    L, H, V = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_vocab
    ov = {k: torch.zeros(L, H, V, dtype=torch.int64) for k in ("rank_neg", "rank_pos", "near_neg", "near_pos")}
    qk = {k: torch.zeros(L, H, V, dtype=torch.int64) for k in ("rank", "near")}
    ov_stats = torch.zeros(L, H, 6, dtype=torch.float64)
    qk_stats = torch.zeros(L, H, 3, dtype=torch.float64)
    eye = torch.eye(V, dtype=torch.bool)
    for layer in range(L):
        ln1 = model.blocks[layer].ln1  # LayerNormPre when processed, LN (affine) when raw
        src = ln1(W_EE.unsqueeze(0)).squeeze(0)  # [V, D]
        q_in = ln1(model.W_U.T.unsqueeze(0)).squeeze(0)  # [V, D]
        for h in range(H):
            # §4: M[s, t] = LN(W_EE[s]) W_V W_O W_U[:, t]
            M = src @ model.W_V[layer, h] @ model.W_O[layer, h] @ model.W_U
            d = M.diagonal().unsqueeze(1)
            tol = TOL * M.abs().amax(1, keepdim=True)
            below = (M < d) & ~eye
            above = (M > d) & ~eye
            near = ((M - d).abs() <= tol) & ~eye
            ov["rank_neg"][layer, h] = 1 + below.sum(1)
            ov["rank_pos"][layer, h] = 1 + above.sum(1)
            ov["near_neg"][layer, h] = near.sum(1)
            ov["near_pos"][layer, h] = near.sum(1)
            ov_stats[layer, h] = torch.tensor(
                rank_stats(ov["rank_neg"][layer, h]) + rank_stats(ov["rank_pos"][layer, h])
            )
            # §5: S[t, s] = LN(W_U[:, t]) W_Q W_K^T LN(W_EE[s])^T / sqrt(d_head)
            S = (q_in @ model.W_Q[layer, h]) @ (src @ model.W_K[layer, h]).T / math.sqrt(model.cfg.d_head)
            d = S.diagonal().unsqueeze(1)
            tol = TOL * S.abs().amax(1, keepdim=True)
            qk["rank"][layer, h] = 1 + ((S > d) & ~eye).sum(1)
            qk["near"][layer, h] = (((S - d).abs() <= tol) & ~eye).sum(1)
            qk_stats[layer, h] = torch.tensor(rank_stats(qk["rank"][layer, h], top1=True))
    for k, v in ov.items():
        out[f"ov.{k}"] = v
    for k, v in qk.items():
        out[f"qk.{k}"] = v
    out["ov.stats"] = ov_stats
    out["qk.stats"] = qk_stats
    return out


def to_file(d):
    """float tensors as float32 (the Rust side is f32), ints as int64."""
    return {
        k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach().to(torch.int64)).contiguous()
        for k, v in d.items()
    }


def tl_float64(hf_model, processed):
    # TL processes the weights in float32 as from_pretrained does; only §3-5 run in float64.
    model = build_tl_model(hf_model, processed=processed)
    return model.to(torch.float64)


def make_planted(out_dir):
    """The planted checkpoint described in the module docstring; returns the HF model."""
    D, V = 32, 400
    cfg = GPT2Config(
        n_layer=3, n_head=1, n_embd=D, n_inner=4 * D, vocab_size=V, n_positions=16,
        bos_token_id=V - 1, eos_token_id=V - 1, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    torch.manual_seed(99)
    model = GPT2LMHeadModel(cfg).eval().float()
    g = torch.Generator().manual_seed(99)
    E = torch.randn(V, D, generator=g, dtype=torch.float64)
    E -= E.mean(1, keepdim=True)  # centred along d_model
    E /= E.norm(dim=1, keepdim=True)  # every row the same norm...
    E -= E.mean(0, keepdim=True)  # ...and zero mean over the vocabulary
    E -= E.mean(1, keepdim=True)
    E = E / E.norm(dim=1, keepdim=True) * 3.0
    eye = torch.eye(D)
    for name, p in model.transformer.named_parameters():
        if name.startswith("ln_f.") or ".ln_" in name:
            p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
        elif name == "wte.weight":
            p.copy_(E.float())
        else:
            p.zero_()
    for layer, (w_o, w_k) in [(1, (-eye, eye)), (2, (eye, -eye))]:
        blk = model.transformer.h[layer].attn
        # c_attn.weight is [D, 3D] (Conv1D: x @ W): Q | K | V blocks.
        blk.c_attn.weight[:, :D] = eye
        blk.c_attn.weight[:, D:2 * D] = w_k
        blk.c_attn.weight[:, 2 * D:] = eye
        blk.c_proj.weight[:] = w_o
    os.makedirs(out_dir, exist_ok=True)
    sd = {k[len("transformer."):]: v.detach().clone().contiguous() for k, v in model.state_dict().items()
          if k.startswith("transformer.") and not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias")}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    write_config(model.config, os.path.join(out_dir, "config.json"), n_ctx=True)
    return GPT2LMHeadModel.from_pretrained(out_dir, dtype=torch.float32).eval()


def main():
    from importlib.metadata import version
    print(f"transformer_lens {version('transformer_lens')}, torch {torch.__version__}")
    written = []
    for name in ("a", "b"):
        hf = GPT2LMHeadModel.from_pretrained(os.path.join(FIX, f"ckpt_{name}"), dtype=torch.float32).eval()
        out = circuits(tl_float64(hf, processed=True))
        if name == "b":
            raw = circuits(tl_float64(hf, processed=False))
            out.update({f"raw.{k}": v for k, v in raw.items()})
        for k in ("ov.near_neg", "qk.near"):
            n = out[k]
            print(f"  {name} {k}: {int((n > 0).sum())} of {n.numel()} tokens have a near-tie (max {int(n.max())})")
        path = os.path.join(GOLD, f"{name}_circuits.safetensors")
        save_file(to_file(out), path, metadata={"format": "pt", "tol": str(TOL)})
        written.append(path)

    planted_dir = os.path.join(FIX, "ckpt_planted")
    hf = make_planted(planted_dir)
    p = circuits(tl_float64(hf, processed=True))
    ov, qk = p["ov.stats"], p["qk.stats"]
    print(f"  planted: ov 1.0 {ov[1, 0].tolist()}\n           ov 2.0 {ov[2, 0].tolist()}")
    print(f"           qk 1.0 {qk[1, 0].tolist()}\n           qk 2.0 {qk[2, 0].tolist()}")
    assert torch.equal(p["W_EE"], p["W_E"]), "block 0 is zero: W_EE = W_E"
    assert ov[1, 0, 0] == 1.0 and ov[2, 0, 3] == 1.0, "planted suppressor / copier"
    assert qk[1, 0, 0] == 1.0 and qk[2, 0, 0] == 0.0, "planted QK diagonal"
    written += [os.path.join(planted_dir, "config.json"), os.path.join(planted_dir, "model.safetensors")]
    for p in written:
        os.chmod(p, 0o644)
        print(f"  {os.path.relpath(p, ROOT):45s} {os.path.getsize(p):>9d} bytes")


if __name__ == "__main__":
    main()
