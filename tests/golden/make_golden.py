"""Generate the TransformerLens golden files for hookgraph's tests.

What it makes (all paths relative to the repository root):

  tests/fixtures/ckpt_a/{config.json,model.safetensors}
      Random GPT-2 (2 layers, 4 heads, d_model 32, d_mlp 128, vocab 512, n_ctx 32,
      BOS = EOS = 511) in the *hub* layout: unprefixed keys (`wte.weight`, `h.0.attn.c_attn.weight`,
      ..., `ln_f.bias`), no `lm_head`, plus the `h.N.attn.bias` causal-mask buffers
      [1, 1, 32, 32] that a loader must ignore.
  tests/fixtures/ckpt_b/{config.json,model.safetensors}
      Random GPT-2 (3 layers, 2 heads, d_model 48, n_inner 80, vocab 300, n_ctx 24,
      BOS = EOS = 299, eps 1e-5) written by `GPT2LMHeadModel.save_pretrained(...,
      safe_serialization=True)` (`transformer.`-prefixed keys, lm_head tied and absent).
  tests/golden/tokens_a.json, tokens_b.json      3 x 12 tokens, BOS first, right-padded with BOS
  tests/golden/tokens_a_long.json                5 x 20 tokens for ckpt_a
  tests/golden/{a,b}_{processed,raw}.safetensors every hook activation, logits, per-token loss
      and every TL weight (`weights.<TL name>`) of TransformerLens's HookedTransformer run on
      the checkpoint, "processed" = fold_ln, center_writing_weights, center_unembed,
      fold_value_biases all True (TL's from_pretrained defaults), "raw" = all four False.
  tests/golden/a_long_processed.safetensors      logits, loss, hook_pattern on tokens_a_long
  tests/golden/{a,b}_metrics.safetensors         the two copy-suppression metrics for every
      (layer, head), computed by the research notebook's own functions (copied below).

Every parameter is drawn from fixed torch seeds, so rerunning reproduces the files bit for
bit on the same torch build (small last-ulp differences are possible across torch versions).

Rerun by hand, from the repository root:

    /work/.tlvenv/bin/python tests/golden/make_golden.py

It needs torch, transformers, safetensors and transformer_lens 3.x (the last line with
`HookedTransformer`; TL 4.x removed it: `pip install "transformer_lens>=3,<4"`).  Generated
with transformer_lens 3.9.0, transformers 5.24.0, torch 2.15.0 (CPU, float32).
"""

import json
import os
import shutil
import sys
from functools import partial
from typing import Tuple

import einops
import torch
import torch as t
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import transformer_lens
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import utils  # deprecated alias of transformer_lens.utilities; the notebook uses it
from transformer_lens.hook_points import HookPoint

try:  # TL >= 2.x
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
except ImportError:  # older TL
    from transformer_lens.loading_from_pretrained import convert_gpt2_weights

from jaxtyping import Float, Int
from torch import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
GOLD = os.path.join(ROOT, "tests", "golden")

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # fixed reduction order


# --------------------------------------------------------------------------------------------
# 1. Random checkpoints
# --------------------------------------------------------------------------------------------

CKPT_CONFIGS = {
    "a": dict(
        n_layer=2, n_head=4, n_embd=32, n_inner=None, vocab_size=512, n_positions=32,
        bos_token_id=511, eos_token_id=511, activation_function="gelu_new",
    ),
    "b": dict(
        n_layer=3, n_head=2, n_embd=48, n_inner=80, vocab_size=300, n_positions=24,
        bos_token_id=299, eos_token_id=299, activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
    ),
}
SEEDS = {"a": 1234, "b": 5678}

# Standard deviations of the random parameters.
STD_EMBED = 0.3  # wte, wpe
STD_W = 0.15  # every Conv1D weight (c_attn, c_proj, c_fc)
STD_W_QK_EXTRA = 2.0  # extra factor on the Q and K blocks of c_attn: sharper attention patterns
STD_BIAS = 0.1  # every Conv1D bias
STD_LN_W = 0.3  # LayerNorm weight = 1 + STD_LN_W * randn
STD_LN_B = 0.2  # LayerNorm bias


def make_random_gpt2(name: str) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        **CKPT_CONFIGS[name],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEEDS[name])
    model = GPT2LMHeadModel(cfg).eval().float()
    g = torch.Generator().manual_seed(SEEDS[name])

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    for pname, p in sorted(model.transformer.named_parameters()):
        if pname in ("wte.weight", "wpe.weight"):
            new = STD_EMBED * randn(p.shape)
        elif ".ln_" in pname or pname.startswith("ln_f."):
            new = (1.0 + STD_LN_W * randn(p.shape)) if pname.endswith("weight") else STD_LN_B * randn(p.shape)
        elif pname.endswith(".bias"):
            new = STD_BIAS * randn(p.shape)
        elif pname.endswith(".weight"):
            new = STD_W * randn(p.shape)
            if pname.endswith("attn.c_attn.weight"):
                d = cfg.n_embd
                new[:, : 2 * d] *= STD_W_QK_EXTRA
        else:
            raise RuntimeError(f"unexpected parameter {pname}")
        p.copy_(new)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    return model


def write_config(cfg: GPT2Config, path: str, n_ctx: bool = False):
    """config.json with every GPT-2 field the loader reads spelled out explicitly.

    n_ctx=True also writes the legacy `n_ctx` (= n_positions), as the hub's gpt2 config.json does
    (TL 3.9's own GPT-2 config conversion reads `hf_config.n_ctx`)."""
    d = json.loads(cfg.to_json_string(use_diff=True))
    full = cfg.to_dict()
    for k in [
        "n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon",
        "activation_function", "n_inner", "bos_token_id", "eos_token_id",
        "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
        "tie_word_embeddings",
    ]:
        d[k] = full[k]
    if n_ctx:
        d["n_ctx"] = full["n_positions"]
    d["architectures"] = ["GPT2LMHeadModel"]
    d["model_type"] = "gpt2"
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def save_ckpt_a(model: GPT2LMHeadModel, out_dir: str):
    """Hub layout: unprefixed keys, no lm_head, plus h.N.attn.bias mask buffers."""
    os.makedirs(out_dir, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("lm_head."):
            continue
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # re-added below in the hub's form
        sd[k] = v.detach().clone().contiguous().float()
    n = model.config.n_positions
    for layer in range(model.config.n_layer):
        sd[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n).contiguous()
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    write_config(model.config, os.path.join(out_dir, "config.json"), n_ctx=True)


def save_ckpt_b(model: GPT2LMHeadModel, out_dir: str):
    """save_pretrained layout (transformer.-prefixed); keep only config.json + model.safetensors."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in os.listdir(out_dir):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out_dir, f))
    write_config(model.config, os.path.join(out_dir, "config.json"))


def check_saved_matches(model: GPT2LMHeadModel, out_dir: str):
    """The file on disk holds exactly the in-memory parameters (and loads back through HF)."""
    sd = load_file(os.path.join(out_dir, "model.safetensors"))
    for k, v in model.transformer.state_dict().items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        key = k if k in sd else "transformer." + k
        assert torch.equal(sd[key], v), k
    assert not any(k.startswith("lm_head") for k in sd), "lm_head must be absent"
    reloaded = GPT2LMHeadModel.from_pretrained(out_dir, dtype=torch.float32).eval()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), (k1, k2)
    return reloaded


# --------------------------------------------------------------------------------------------
# 2. Tokens
# --------------------------------------------------------------------------------------------

def make_tokens(vocab: int, n_seq: int, seq_len: int, pads, seed: int):
    """BOS first, random non-BOS tokens, some copies of earlier tokens, right padding with BOS."""
    bos = vocab - 1
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n_seq):
        n_real = seq_len - pads[i]
        toks = torch.randint(0, vocab - 1, (n_real,), generator=g).tolist()
        toks[0] = bos
        # repeats: copy a few earlier tokens to later positions
        for _ in range(max(1, (n_real - 1) // 3)):
            if n_real < 4:
                break
            src = int(torch.randint(1, n_real - 2, (1,), generator=g))
            dst = int(torch.randint(src + 1, n_real, (1,), generator=g))
            toks[dst] = toks[src]
        seqs.append(toks + [bos] * pads[i])
    return seqs


# --------------------------------------------------------------------------------------------
# 3. TransformerLens model, built as HookedTransformer.from_pretrained(hf_model=...) would
# --------------------------------------------------------------------------------------------

def build_tl_model(hf_model: GPT2LMHeadModel, processed: bool) -> HookedTransformer:
    """Mirror of TL 3.9 `HookedTransformer.from_pretrained` for a GPT-2 given as `hf_model`.

    The official-name path cannot be used for random checkpoints (and TL's GPT-2 config
    conversion hard-codes d_mlp = 4 * n_embd, ignoring n_inner), so the config is made by hand
    with the fields `get_pretrained_model_config` / `convert_hf_model_config` would set.
    from_pretrained turns normalization_type "LN" into "LNPre" when fold_ln is on; it then
    calls `cls(cfg, tokenizer, move_to_device=False)`, `load_and_process_state_dict(...)`
    with refactor_factored_attn_matrices=False (its default), and `move_model_modules_to_device()`.
    The notebook then calls set_use_split_qkv_input(False) (the default) and set_use_attn_result(True).
    """
    hc = hf_model.config
    flag = processed
    cfg = HookedTransformerConfig(
        n_layers=hc.n_layer,
        d_model=hc.n_embd,
        d_head=hc.n_embd // hc.n_head,
        n_heads=hc.n_head,
        d_mlp=hc.n_inner if hc.n_inner is not None else 4 * hc.n_embd,
        d_vocab=hc.vocab_size,
        n_ctx=hc.n_positions,
        act_fn=hc.activation_function,
        normalization_type="LNPre" if flag else "LN",
        eps=hc.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel",
        positional_embedding_type="standard",
        default_prepend_bos=True,
        use_attn_scale=hc.scale_attn_weights,
        use_local_attn=False,
        scale_attn_by_inverse_layer_idx=hc.scale_attn_by_inverse_layer_idx,
        init_weights=False,
        model_name="random-gpt2",
        device="cpu",
        n_devices=1,
        dtype=torch.float32,
    )
    state_dict = convert_gpt2_weights(hf_model, cfg)
    model = HookedTransformer(cfg, None, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=flag,
        center_writing_weights=flag,
        center_unembed=flag,
        fold_value_biases=flag,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    model.set_use_split_qkv_input(False)
    model.set_use_attn_result(True)
    model.eval()
    return model


PER_LAYER_HOOKS = [
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid",
    "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out",
    "hook_resid_post",
]


def f32(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32).contiguous().clone()


def activation_golden(model: HookedTransformer, tokens: Tensor, full: bool = True):
    logits, cache = model.run_with_cache(tokens)
    loss = model(tokens, return_type="loss", loss_per_token=True)
    out = {"logits": f32(logits), "loss": f32(loss)}
    if full:
        names = ["hook_embed", "hook_pos_embed"]
        for L in range(model.cfg.n_layers):
            names += [f"blocks.{L}.{h}" for h in PER_LAYER_HOOKS]
        names += ["ln_final.hook_scale", "ln_final.hook_normalized"]
        for n in names:
            out[n] = f32(cache[n])
        for k, v in model.state_dict().items():
            if k.endswith(".IGNORE") or k.endswith(".mask"):
                continue
            out["weights." + k] = f32(v)
    else:
        for L in range(model.cfg.n_layers):
            n = f"blocks.{L}.attn.hook_pattern"
            out[n] = f32(cache[n])
    return out


# --------------------------------------------------------------------------------------------
# 4. The notebook's metric functions (copy_suppression_notebook.txt, cell In [43]), verbatim
#    except for the edits marked "# EDIT:".
# --------------------------------------------------------------------------------------------

# EDIT: the notebook reads `model.tokenizer.bos_token_id`; our random checkpoints have no
# tokenizer, so the BOS id is set here per checkpoint before the functions are run.
BOS_TOKEN_ID = None


def project(vectors, proj_directions, return_type="both"):
    """Stand-in for `transformer_lens.rs.callum.keys_fixed.project` (research repo, not on PyPI).

    Single-direction case only (proj_directions has vectors' shape). Like the notebook's helper,
    the direction is orthonormalised (via SVD of the [d, 1] matrix; its basis vector has an
    arbitrary sign) and the projection is taken on it:
        projection    = (r . e) e  = coef * u   with coef = (r . u) / (u . u)
        perpendicular = r - projection
    The returned coefficient is coef = (r . u) / (u . u), shape [..., 1] (the helper keeps a
    trailing "num directions" dim). DEVIATION, documented in docs/metrics.md: the helper's own
    coefficient is r . e, whose sign follows the SVD's arbitrary sign of e; we return the
    intended sign sign(r . u), so `only_use_neg_projections` keeps exactly the sources the head
    pushes down. Only the sign of this coefficient is used by the notebook.
    """
    assert proj_directions.shape == vectors.shape
    dirs = proj_directions.unsqueeze(-1)  # [..., d, 1]
    basis = torch.linalg.svd(dirs, full_matrices=False).U  # [..., d, 1], orthonormal, sign arbitrary
    coeffs_on_basis = einops.einsum(vectors, basis, "... d, ... d num -> ... num")
    projection = einops.einsum(coeffs_on_basis, basis, "... num, ... d num -> ... d")
    perpendicular = vectors - projection
    coef = (vectors * proj_directions).sum(-1, keepdim=True) / (proj_directions * proj_directions).sum(-1, keepdim=True)
    assert return_type == "both"
    return projection, perpendicular, coef


def hook_fn_cache_v(
    v: Float[Tensor, "batch seq n_heads d_head"],
    hook: HookPoint,
    model: HookedTransformer,
    head_idx: int,
):
    result_hook = model.hook_dict[utils.get_act_name("result", hook.layer())]
    result_hook.ctx["v"] = v[:, :, head_idx]



def hook_fn_cache_attn(
    pattern: Float[Tensor, "batch n_heads seqQ seqK"],
    hook: HookPoint,
    model: HookedTransformer,
    head_idx: int,
):
    result_hook = model.hook_dict[utils.get_act_name("result", hook.layer())]
    result_hook.ctx["pattern"] = pattern[:, head_idx]



def hook_fn_at_result(
    result: Float[Tensor, "batch seq n_heads d_head"],
    hook: HookPoint,
    toks: Int[Tensor, "batch seq"],
    model: HookedTransformer,
    head_idx: int,
    only_use_neg_projections: bool,
    return_new_loss: bool,
):
    '''
    If `return_new_loss` is True, then we want to compute the projected result (using cached v and pattern), so we can eventually
    calculate change in logits, and then calculate change in loss. So we store result_diff in the cache.

    If `return_new_loss` is False, then we don't need to project results in the unembedding direction - we just need the coeffs of
    that projection. So we store the coeffs in the cache. Note that we can't finish here, because we'll need to apply ln_scale when 
    we compute it.
    '''
    v = hook.ctx.pop("v")
    
    unembeddings = model.W_U.T[toks]
    result_pre_attn = einops.einsum(
        v, model.W_O[hook.layer(), head_idx],
        "batch seqK d_head, d_head d_model -> batch seqK d_model"
    )

    if return_new_loss:
        pattern = hook.ctx.pop("pattern")
        result_pre_attn_projected, result_pre_attn_perp, unembedding_coeffs = project(result_pre_attn, unembeddings, return_type="both")
        if only_use_neg_projections: 
            result_pre_attn_projected *= (unembedding_coeffs < 0).float()
        result_post_attn_projected = einops.einsum(
            result_pre_attn_projected, pattern,
            "batch seqK d_model, batch seqQ seqK -> batch seqQ d_model"
        )
        hook.ctx["result_orig"] = result[:, :, head_idx]
        hook.ctx["result_new"] = result_post_attn_projected
    
    else:
        # Figure out the direct effect the result vector at each source token has on the corresponding source logit
        unembedding_coeffs = einops.einsum(result_pre_attn, unembeddings, "batch seqK d_model, batch seqK d_model -> batch seqK")
        # unembedding_coeffs = project(result_pre_attn, unembeddings, return_type="coeffs")
        # unembedding_coeffs = t.cosine_similarity(result_pre_attn, unembeddings, dim=-1)
        if only_use_neg_projections: 
            unembedding_coeffs *= (unembedding_coeffs < 0).float()
        unembedding_coeffs = unembedding_coeffs.squeeze()
        assert unembedding_coeffs.shape == toks.shape
        hook.ctx["unembedding_coeffs"] = unembedding_coeffs


def hook_fn_at_scale(
    ln_scale: Float[Tensor, "batch seq 1"],
    hook: HookPoint,
    toks: Int[Tensor, "batch seq"],
    layer: int,
    model: HookedTransformer,
):
    '''
    This function only gets used when `return_new_loss` is False. In this case, we just want to calculate the projection of the result vectors
    at each key position onto each unembedding.
    '''
    result_hook = model.hook_dict[utils.get_act_name("result", layer)]
    batch, seq_len = toks.shape

    if "result_orig" in result_hook.ctx:
        result_orig = result_hook.ctx.pop("result_orig") / ln_scale
        result_new = result_hook.ctx.pop("result_new") / ln_scale
        logit_change_for_projection = einops.einsum(result_new - result_orig, model.W_U, "batch seqQ d_model, d_model d_vocab -> batch seqQ d_vocab")
        logit_change_for_ablation = einops.einsum(- result_orig, model.W_U, "batch seqQ d_model, d_model d_vocab -> batch seqQ d_vocab")
        result_hook.ctx["logit_change_for_proj"] = logit_change_for_projection
        result_hook.ctx["logit_change_for_perp"] = logit_change_for_ablation - logit_change_for_projection
        result_hook.ctx["logit_change_for_ablation"] = logit_change_for_ablation

    else:
        # * Total amount that vectors moving from `src` to `dest` (neither being BOS or same) pushes down logits for `src`,
        # * divided by the total probability mass of such movements

        unembedding_coeffs = result_hook.ctx.pop("unembedding_coeffs")
        pattern = result_hook.ctx.pop("pattern")

        # Create a mask of shape (batch, seqQ, seqK) where seqQ and seqK are not BOS, and seqQ != seqK (i.e. token isn't self-attending)
        # because these aren't as interesting, and are unlikely to be copy suppression anyway (word coming straight after itself!)
        is_not_bos_2d_mask = (toks != BOS_TOKEN_ID).float()  # EDIT: was `model.tokenizer.bos_token_id`
        is_not_bos_3d_mask = einops.einsum(is_not_bos_2d_mask, is_not_bos_2d_mask, "batch seqQ, batch seqK -> batch seqQ seqK")
        is_not_self_3d_mask = 1.0 - einops.repeat(t.eye(seq_len).to("cpu"), "seqQ seqK -> batch seqQ seqK", batch=batch).float()  # EDIT: was `.to(device)`
        full_mask = is_not_bos_3d_mask #* is_not_self_3d_mask
        # We then get the sum of probabilities paid to non-self and non-BOS tokens for each dest token (and then the sum of these for all sequences)
        non_bos_attn = pattern * full_mask
        non_bos_attn_per_dest = einops.reduce(non_bos_attn, "batch seqQ seqK -> batch seqQ", "sum")
        non_bos_attn_per_src = einops.reduce(non_bos_attn, "batch seqQ seqK -> batch seqK", "sum")
        non_bos_attn_per_seq = einops.reduce(non_bos_attn_per_dest, "batch seqQ -> batch", "sum")

        unembedding_coeffs_per_src_and_dest = einops.einsum(
            unembedding_coeffs, non_bos_attn,
            "batch seqK, batch seqQ seqK -> batch seqQ seqK"
        ) / ln_scale

        unembedding_coeffs_per_src = einops.einsum(
            unembedding_coeffs_per_src_and_dest,
            "batch seqQ seqK -> batch seqK",
        )

        unembedding_coeffs_weighted_avg_by_attn_to_src = einops.einsum(
            unembedding_coeffs_per_src, non_bos_attn_per_src,
            "batch seqK, batch seqK -> batch"
        ) / non_bos_attn_per_src.sum(dim=-1)

        hook.ctx["unembedding_coeffs"] = {
            "per_position": unembedding_coeffs_per_src,
            "per_sequence": unembedding_coeffs_weighted_avg_by_attn_to_src,
        }
        return
        # EDIT: the notebook's unreachable code after this `return` (an older per-destination
        # variant) is omitted.



def compute_weighted_avg_logit_suppression(
    model: HookedTransformer,
    toks: Int[Tensor, "batch seq"],
    head: Tuple[int, int],
    only_use_neg_projections: bool = False,
    return_new_loss = False,
):
    layer, head_idx = head

    model.reset_hooks(including_permanent=True)
    model.clear_contexts()

    scale_hook = model.hook_dict[utils.get_act_name("scale")]
    result_hook = model.hook_dict[utils.get_act_name("result", layer)]

    # Define fwd_hooks
    fwd_hooks = [
        (utils.get_act_name("v", layer), partial(hook_fn_cache_v, model=model, head_idx=head_idx)),
        (utils.get_act_name("pattern", layer), partial(hook_fn_cache_attn, model=model, head_idx=head_idx)),
        (utils.get_act_name("result", layer), partial(hook_fn_at_result, toks=toks, model=model, head_idx=head_idx, only_use_neg_projections=only_use_neg_projections, return_new_loss=return_new_loss)),
        (utils.get_act_name("scale"), partial(hook_fn_at_scale, toks=toks, model=model, layer=layer)),
    ]
    # Forward pass which stores things in hook contexts (but doesn't actually change the logits)
    logits = model.run_with_hooks(
        toks,
        return_type = "logits",
        fwd_hooks = fwd_hooks
    )

    if return_new_loss:
        logit_change_for_proj = result_hook.ctx.pop("logit_change_for_proj")
        logit_change_for_perp = result_hook.ctx.pop("logit_change_for_perp")
        logit_change_for_ablation = result_hook.ctx.pop("logit_change_for_ablation")
        logits_proj = logits + logit_change_for_proj
        logits_perp = logits + logit_change_for_perp
        logits_ablation = logits + logit_change_for_ablation
        loss_proj = utils.lm_cross_entropy_loss(logits_proj, toks, per_token=True)
        loss_perp = utils.lm_cross_entropy_loss(logits_perp, toks, per_token=True)
        loss_ablation = utils.lm_cross_entropy_loss(logits_ablation, toks, per_token=True)
        model.clear_contexts()
        return loss_proj, loss_perp, loss_ablation
    else:
        unembedding_coeffs = scale_hook.ctx.pop("unembedding_coeffs")
        # norm_fractions = result_hook.ctx.pop("norms")
        model.clear_contexts()
        return unembedding_coeffs


def metric_golden(model: HookedTransformer, toks: Tensor):
    """The notebook's sweeps (create_really_hacky_*_pass_metric, compute_loss_diffs_from_projection)
    over every (layer, head), for only_use_neg_projections in {False, True}."""
    nl, nh = model.cfg.n_layers, model.cfg.n_heads
    B, S = toks.shape
    out = {}
    for neg in (False, True):
        N = int(neg)
        per_pos = torch.zeros(nl, nh, B, S)
        per_seq = torch.zeros(nl, nh, B)
        score = torch.zeros(nl, nh)
        losses = {k: torch.zeros(nl, nh, B, S - 1) for k in ("loss_proj", "loss_perp", "loss_ablation")}
        for layer in range(nl):
            for head_idx in range(nh):
                uc = compute_weighted_avg_logit_suppression(
                    model=model, toks=toks, head=(layer, head_idx),
                    only_use_neg_projections=neg, return_new_loss=False,
                )
                per_pos[layer, head_idx] = uc["per_position"]
                per_seq[layer, head_idx] = uc["per_sequence"]
                score[layer, head_idx] = uc["per_sequence"].mean()
                lp, lq, la = compute_weighted_avg_logit_suppression(
                    model=model, toks=toks, head=(layer, head_idx),
                    only_use_neg_projections=neg, return_new_loss=True,
                )
                losses["loss_proj"][layer, head_idx] = lp
                losses["loss_perp"][layer, head_idx] = lq
                losses["loss_ablation"][layer, head_idx] = la
        pre = f"source_suppression.only_negative={N}"
        out[f"{pre}.per_position"] = per_pos
        out[f"{pre}.per_sequence"] = per_seq
        out[f"{pre}.score"] = score
        pre = f"projection_loss.only_negative={N}"
        for k, v in losses.items():
            out[f"{pre}.{k}"] = v
    model.reset_hooks(including_permanent=True)
    out["projection_loss.loss_orig"] = model(toks, return_type="loss", loss_per_token=True)
    return {k: f32(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def pattern_stats(model: HookedTransformer, tokens: Tensor, tag: str):
    _, cache = model.run_with_cache(tokens)
    for L in range(model.cfg.n_layers):
        p = cache[f"blocks.{L}.attn.hook_pattern"][:, :, 4:, :]  # rows with >= 5 keys
        nk = torch.arange(5, tokens.shape[1] + 1).view(1, 1, -1).float()
        ent = -(p.clamp_min(1e-30).log() * p).sum(-1) / nk.log()  # 1 = uniform
        print(f"  [{tag}] layer {L}: normalised pattern entropy mean {ent.mean():.2f} "
              f"min {ent.min():.2f} max {ent.max():.2f}; max prob mean {p.max(-1).values.mean():.2f}")
    logits = cache["ln_final.hook_normalized"] @ model.W_U + model.b_U
    print(f"  [{tag}] logits std over vocab (mean over positions) {logits.std(-1).mean():.2f}")


def sanity_check():
    """Cheap invariants on the written goldens."""
    for name in ("a", "b"):
        for P in ("processed", "raw"):
            g = load_file(os.path.join(GOLD, f"{name}_{P}.safetensors"))
            L = 0
            while f"blocks.{L}.hook_attn_out" in g:
                summed = g[f"blocks.{L}.attn.hook_result"].sum(2) + g[f"weights.blocks.{L}.attn.b_O"]
                err = (summed - g[f"blocks.{L}.hook_attn_out"]).abs().max()
                assert err < 1e-5, f"{name}_{P} layer {L}: sum_h hook_result + b_O != hook_attn_out ({err})"
                L += 1
        m = load_file(os.path.join(GOLD, f"{name}_metrics.safetensors"))
        nans = {k: int(v.isnan().sum()) for k, v in m.items() if v.isnan().any()}
        if nans:
            print(f"  NOTE {name}_metrics has NaNs (0/0 where a sequence's masked attention sums to 0): {nans}")
    print("  sanity checks passed")


def main():
    os.makedirs(GOLD, exist_ok=True)
    from importlib.metadata import version
    print(f"transformer_lens {version('transformer_lens')}, transformers {version('transformers')}, "
          f"torch {torch.__version__}")
    written = []

    token_specs = {
        "a": ("tokens_a.json", 3, 12, [0, 3, 6], 11),
        "b": ("tokens_b.json", 3, 12, [0, 3, 6], 22),
    }
    for name in ("a", "b"):
        hf_model = make_random_gpt2(name)
        ckpt_dir = os.path.join(FIX, f"ckpt_{name}")
        (save_ckpt_a if name == "a" else save_ckpt_b)(hf_model, ckpt_dir)
        hf_model = check_saved_matches(hf_model, ckpt_dir)
        written += [os.path.join(ckpt_dir, "config.json"), os.path.join(ckpt_dir, "model.safetensors")]

        vocab = hf_model.config.vocab_size
        fname, n_seq, seq_len, pads, seed = token_specs[name]
        toks_list = make_tokens(vocab, n_seq, seq_len, pads, seed)
        with open(os.path.join(GOLD, fname), "w") as f:
            json.dump(toks_list, f)
            f.write("\n")
        written.append(os.path.join(GOLD, fname))
        toks = torch.tensor(toks_list, dtype=torch.long)

        hf_logits = hf_model(toks).logits
        for P in ("processed", "raw"):
            model = build_tl_model(hf_model, processed=(P == "processed"))
            golden = activation_golden(model, toks)
            # TL must agree with HF (up to the per-position constant center_unembed removes).
            diff = (golden["logits"] - hf_logits)
            diff = diff - diff.mean(-1, keepdim=True)
            assert diff.abs().max() < 1e-4, f"TL vs HF logits differ by {diff.abs().max()}"
            path = os.path.join(GOLD, f"{name}_{P}.safetensors")
            save_file(golden, path, metadata={"format": "pt"})
            written.append(path)
            if P == "processed":
                pattern_stats(model, toks, name)

        if name == "a":
            toks_long = make_tokens(vocab, 5, 20, [0, 0, 0, 0, 5], 33)
            p = os.path.join(GOLD, "tokens_a_long.json")
            with open(p, "w") as f:
                json.dump(toks_long, f)
                f.write("\n")
            written.append(p)
            model = build_tl_model(hf_model, processed=True)
            golden = activation_golden(model, torch.tensor(toks_long), full=False)
            path = os.path.join(GOLD, "a_long_processed.safetensors")
            save_file(golden, path, metadata={"format": "pt"})
            written.append(path)

        # Metric goldens: processed model, as in the notebook.
        global BOS_TOKEN_ID
        BOS_TOKEN_ID = hf_model.config.bos_token_id
        model = build_tl_model(hf_model, processed=True)
        metrics = metric_golden(model, toks)
        path = os.path.join(GOLD, f"{name}_metrics.safetensors")
        save_file(metrics, path, metadata={"format": "pt"})
        written.append(path)

    sanity_check()
    print("\nwritten:")
    for p in written:
        os.chmod(p, 0o644)
    for p in written:
        print(f"  {os.path.relpath(p, ROOT):45s} {os.path.getsize(p):>9d} bytes")


if __name__ == "__main__":
    main()
