"""Generate the tiny random GPT-2 that experiments/smoke.toml runs on.

What it makes (relative to the repository root):

  experiments/checkpoints/tiny-gpt2/config.json        n_layer 2, n_head 4, n_embd 64,
      n_positions 256, vocab_size 50257 (GPT-2's real vocabulary, so the real tokenizer and the
      IOI names tokenize as in GPT-2), bos = eos = 50256
  experiments/checkpoints/tiny-gpt2/model.safetensors  hub layout (unprefixed keys `wte.weight`,
      `h.0.attn.c_attn.weight`, ..., `ln_f.bias`, no lm_head: it is tied to wte), stored as
      F16 to keep the file small (~6.5 MB); the loader converts it to f32, so this also
      exercises F16 loading
  experiments/checkpoints/tiny-gpt2/{vocab.json,merges.txt}  copies of GPT-2's tokenizer
      files from /work/shared/data/gpt2/ (OpenAI, MIT licence)
  tests/golden/smoke_logits.json  HF's forward on the smoke prompt (from the saved f16
      weights, in f32): per position the top-5 token ids and their mean-centred logits

The weights are meaningless: GPT2LMHeadModel's random init with torch seed 0, with the
LayerNorm parameters (weight = 1 + 0.2 * randn, bias = 0.1 * randn) and every Conv1D bias
(0.1 * randn) randomised too, so that weight processing (fold_ln, centring, value-bias
folding) has something to fold. It exists so a smoke run needs no download.

Rerun by hand, from the repository root:

    /work/.tlvenv/bin/python tests/golden/make_smoke_checkpoint.py

Needs torch, transformers and safetensors (generated with torch 2.15.0, transformers 5.24.0).
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "experiments", "checkpoints", "tiny-gpt2")
TOKENIZER = os.environ.get("GPT2_TOKENIZER_DIR", "/work/shared/data/gpt2")

CONFIG = dict(
    n_layer=2, n_head=4, n_embd=64, n_inner=None, n_positions=256, vocab_size=50257,
    bos_token_id=50256, eos_token_id=50256, activation_function="gelu_new",
    layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    tie_word_embeddings=True,
)

PROMPT = "Then, Sarah and Arthur went to the store. Arthur gave a bone to"

STD_LN_W = 0.2  # LayerNorm weight = 1 + STD_LN_W * randn
STD_LN_B = 0.1  # LayerNorm bias
STD_BIAS = 0.1  # Conv1D biases (zero after HF's init)

torch.set_grad_enabled(False)


def make_model() -> GPT2LMHeadModel:
    cfg = GPT2Config(**CONFIG)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval().float()
    g = torch.Generator().manual_seed(0)
    for name, p in sorted(model.transformer.named_parameters()):
        is_ln = ".ln_" in name or name.startswith("ln_f.")
        if is_ln and name.endswith("weight"):
            p.copy_(1.0 + STD_LN_W * torch.randn(p.shape, generator=g))
        elif is_ln:
            p.copy_(STD_LN_B * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(STD_BIAS * torch.randn(p.shape, generator=g))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    return model


def write_config(cfg: GPT2Config, path: str):
    """config.json with every field the loader reads spelled out (as the hub's gpt2 has them)."""
    d = json.loads(cfg.to_json_string(use_diff=True))
    full = cfg.to_dict()
    for k in [
        "n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon",
        "activation_function", "n_inner", "bos_token_id", "eos_token_id",
        "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
        "tie_word_embeddings",
    ]:
        d[k] = full[k]
    d["n_ctx"] = full["n_positions"]
    d["architectures"] = ["GPT2LMHeadModel"]
    d["model_type"] = "gpt2"
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    model = make_model()
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("lm_head."):
            continue  # tied to wte, absent as on the hub
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers, not parameters
        sd[k] = v.detach().to(torch.float16).contiguous().clone()
    weights = os.path.join(OUT, "model.safetensors")
    save_file(sd, weights, metadata={"format": "pt"})
    write_config(model.config, os.path.join(OUT, "config.json"))
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(TOKENIZER, f), os.path.join(OUT, f))

    # The saved (f16) weights load back through HF and give finite logits on the smoke prompt.
    reloaded = GPT2LMHeadModel.from_pretrained(OUT, dtype=torch.float32).eval()
    tok = GPT2TokenizerFast.from_pretrained(OUT)  # reads vocab.json + merges.txt
    prompt = [50256] + tok.encode(PROMPT)
    assert len(prompt) == 16, prompt
    print(f"{PROMPT!r} -> {prompt}")
    logits = reloaded(torch.tensor([prompt])).logits
    assert torch.isfinite(logits).all()
    print(f"logits {tuple(logits.shape)}: mean {logits.mean():.4f} std {logits.std():.4f}")
    # A small golden for the Rust smoke test: per position, HF's top-5 token ids and their
    # logits minus the position's mean logit (TL's center_unembed removes exactly that mean).
    centered = logits[0] - logits[0].mean(-1, keepdim=True)
    top = centered.topk(5, dim=-1)
    golden = {
        "prompt": PROMPT,
        "tokens": prompt,
        "top5_ids": top.indices.tolist(),
        "top5_centered_logits": top.values.tolist(),
    }
    path = os.path.join(ROOT, "tests", "golden", "smoke_logits.json")
    with open(path, "w") as f:
        json.dump(golden, f)
        f.write("\n")
    for f in sorted(os.listdir(OUT)):
        p = os.path.join(OUT, f)
        os.chmod(p, 0o644)
        print(f"  {os.path.relpath(p, ROOT):50s} {os.path.getsize(p):>9d} bytes")


if __name__ == "__main__":
    main()
