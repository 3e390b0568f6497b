"""Goldens for `cspa`, `direct_mean_ablation`, `direct_logit_attribution` and `logit_lens`
from the Copy Suppression paper's own functions and TransformerLens.

The paper's code is NOT copied here: it is read from a checkout of
callummcdougall/SERI-MATS-2023-Streamlit-pages at commit c2a732c (`git show`), and only the
functions named below are executed, out of
  transformer_lens/rs/callum2/cspa/cspa_functions.py: FUNCTION_STR_TOKS, gram_schmidt,
      project, get_top_predicted_semantically_similar_tokens, get_cspa_results,
      get_performance_recovered
  transformer_lens/rs/callum2/utils.py: kl_div, first_occurrence, first_occurrence_2d,
      concat_lists, make_list_correct_length
(the modules' import-time side effects, chdir into the Streamlit app and its forked
TransformerLens, are skipped; everything else runs on the installed TransformerLens).

What it makes (tests/golden/):
  cspa_tokens_{a,t}.json        eval tokens (BOS first, no padding)
  cspa_mean_tokens_{a,t}.json   the mean dataset (100 sequences; the paper's result_mean)
  cspa_{a,t}.safetensors        per head: the paper's kl/loss arrays for CSPA (full, OV-only,
                                QK-only), the mean ablation, effect_explained; TL's DLA and
                                logit-lens values
with a = tests/fixtures/ckpt_a (vocab 512, no tokenizer), t = experiments/checkpoints/
tiny-gpt2 (GPT-2's vocabulary and tokenizer), and small = the GPT-2-small-shaped checkpoint
the Rust tests generate (`small_checkpoint` in tests/it/common.rs; ~500 MB, never committed;
heads 5.3, 10.7, 11.11 only; GPT-2's tokenizer). cspa_small.safetensors records the
checkpoint's sha256 in its metadata and the test checks it first. Make the checkpoint with
    HOOKGRAPH_GOLDEN_CKPT_DIR=/tmp/hg_ckpts cargo test --test it cspa_matches_the_papers_functions_small
(it writes /tmp/hg_ckpts/small, then fails while the golden is missing or stale) and pass the
same HOOKGRAPH_GOLDEN_CKPT_DIR here, with `small` as the argument after the paper path.

Choices the paper's code leaves open, made here and in hookgraph alike:
  * function words on a model without GPT-2's tokenizer (ckpt_a): each string's GPT-2 id
    (GPT-2's tokenizer from experiments/checkpoints/tiny-gpt2), `<|endoftext|>` -> the model's
    BOS, ids outside the vocabulary dropped. On tiny-gpt2 the paper's own
    `model.to_tokens(FUNCTION_STR_TOKS)` runs unchanged.
  * OV only ("every pair kept"): at c2a732c `get_cspa_results(interventions=["ov"])` skips
    the projection (output_attn_cspa = output_attn) and ["qk", "ov"] with K_unembeddings=1.0
    fails its assert, so OV-only is run as ["qk", "ov"] with K_unembeddings = 1 - 1e-9:
    K = ceil((1 - 1e-9)(d + 1)) = d + 1, every causal pair kept and projected.
  * QK only: ["qk"] with no OV config (kept pairs unprojected, the rest mean-ablated).

Run from the repository root:
    PAPER_REPO=/path/to/SERI-MATS-2023-Streamlit-pages /work/.tlvenv/bin/python \
        tests/golden/make_cspa_golden.py
(the path may be a bare git directory; `git show c2a732c:...` reads the files).
Generated with transformer_lens 2.18.0, torch 2.15 (CPU, float32).
"""

import ast
import json
import math
import os
import subprocess
import sys
import types

import einops
import numpy as np
import pandas as pd
import torch
import torch as t
from safetensors.torch import save_file
from torch import Tensor
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from make_golden import build_tl_model  # noqa: E402

from transformer_lens import utils  # noqa: E402

PAPER_COMMIT = "c2a732c"
CSPA_FILE = "transformer_lens/rs/callum2/cspa/cspa_functions.py"
UTILS_FILE = "transformer_lens/rs/callum2/utils.py"

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


def paper_source(repo: str, path: str) -> str:
    return subprocess.check_output(["git", "-C", repo, "show", f"{PAPER_COMMIT}:{path}"]).decode()


def load_paper(repo: str) -> dict:
    """The named functions of the paper's two files, defined in one namespace."""
    from typing import Dict, List, Literal, Optional, Tuple, Union

    from jaxtyping import Bool, Float, Int
    from tqdm.auto import tqdm

    ns = dict(
        t=t, torch=torch, einops=einops, np=np, pd=pd, math=math, utils=utils, Tensor=Tensor,
        Float=Float, Int=Int, Bool=Bool, Dict=Dict, List=List, Tuple=Tuple,
        Optional=Optional, Literal=Literal, Union=Union, tqdm=tqdm, time=__import__("time"),
        gc=__import__("gc"), warnings=__import__("warnings"),
        HookedTransformer=object, QKProjectionConfig=object,
    )
    wanted = {
        UTILS_FILE: {"kl_div", "first_occurrence", "first_occurrence_2d", "concat_lists",
                     "make_list_correct_length"},
        CSPA_FILE: {"FUNCTION_STR_TOKS", "gram_schmidt", "project",
                    "get_top_predicted_semantically_similar_tokens", "get_cspa_results",
                    "get_performance_recovered", "OVProjectionConfig"},
    }
    for path, names in wanted.items():
        tree = ast.parse(paper_source(repo, path))
        found = set()
        body = []
        for node in tree.body:
            name = None
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                name = node.name
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
            if name in names:
                if isinstance(node, ast.ClassDef):
                    node.decorator_list = []  # @dataclass with no fields
                body.append(node)
                found.add(name)
        assert found == names, f"{path}: missing {names - found}"
        exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)
    return ns


def tokenizer() -> GPT2TokenizerFast:
    return GPT2TokenizerFast.from_pretrained(os.path.join(ROOT, "experiments/checkpoints/tiny-gpt2"))


def gpt2_function_ids(paper: dict, tok) -> list:
    ids = []
    for s in paper["FUNCTION_STR_TOKS"]:
        e = tok.encode(s)
        assert len(e) == 1, (s, e)
        ids.append(e[0])
    return ids


def make_tokens(vocab, bos, n, s, seed):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (n, s), generator=g)
    toks[toks == bos] = (bos + 1) % vocab  # BOS only at position 0: no padding
    toks[:, 0] = bos
    return toks


def load_model(name):
    if name == "small":
        hf = GPT2LMHeadModel.from_pretrained(os.path.join(os.environ["HOOKGRAPH_GOLDEN_CKPT_DIR"], "small"), dtype=torch.float32).eval()
    elif name == "a":
        hf = GPT2LMHeadModel.from_pretrained(os.path.join(ROOT, "tests/fixtures/ckpt_a"), dtype=torch.float32).eval()
    else:
        hf = GPT2LMHeadModel.from_pretrained(os.path.join(ROOT, "experiments/checkpoints/tiny-gpt2"), dtype=torch.float32).eval()
    model = build_tl_model(hf, processed=True)
    return model


def main():
    repo = os.environ.get("PAPER_REPO") or (sys.argv[1] if len(sys.argv) > 1 else None)
    which = sys.argv[2:] or ["a", "t"]
    assert repo, "set PAPER_REPO to a checkout of callummcdougall/SERI-MATS-2023-Streamlit-pages"
    paper = load_paper(repo)
    tok = tokenizer()
    fn_ids = gpt2_function_ids(paper, tok)
    print(f"function words: {len(fn_ids)} strings, {len(set(fn_ids))} distinct GPT-2 ids")

    for name, n, s in [("a", 6, 24), ("t", 4, 40), ("small", 3, 20)]:
        if name not in which:
            continue
        model = load_model(name)
        meta = {}
        if name == "small":
            import hashlib
            h = hashlib.sha256()
            with open(os.path.join(os.environ["HOOKGRAPH_GOLDEN_CKPT_DIR"], "small", "model.safetensors"), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            meta["sha256"] = h.hexdigest()
        # The heads the paper's functions run on (all of layers >= 1 on the tiny ones).
        heads = [(5, 3), (10, 7), (11, 11)] if name == "small" else [
            (l, h) for l in range(1, model.cfg.n_layers) for h in range(model.cfg.n_heads)]
        cfg = model.cfg
        bos = 511 if name == "a" else 50256
        vocab = cfg.d_vocab
        seed = {"a": 20, "t": 21, "small": 22}[name]
        toks = make_tokens(vocab, bos, n, s, seed=seed)
        mean_toks = make_tokens(vocab, bos, 100, s, seed=seed + 10)
        json.dump(toks.tolist(), open(os.path.join(HERE, f"cspa_tokens_{name}.json"), "w"))
        json.dump(mean_toks.tolist(), open(os.path.join(HERE, f"cspa_mean_tokens_{name}.json"), "w"))

        if name == "a":
            # No tokenizer: the documented mapping of the paper's strings to this vocabulary.
            mapped = sorted({bos if i == 50256 else i for i in fn_ids if (bos if i == 50256 else i) < vocab})
            model.to_tokens = lambda strs, prepend_bos=False: torch.tensor(mapped)[:, None]
        else:
            model.set_tokenizer(tok)

        # The mean of every head of the layers used (all layers but on `small`, where a cache
        # of every layer's result over 100 sequences would be ~1 GB).
        layers = sorted({l for l, _ in heads} | ({0} if name != "small" else set()))
        _, mcache = model.run_with_cache(mean_toks, names_filter=lambda x: x in {f"blocks.{l}.attn.hook_result" for l in layers})
        result_mean = {
            (l, h): mcache[f"blocks.{l}.attn.hook_result"][:, :, h].mean(0)
            for l in layers for h in range(cfg.n_heads)
        }
        out = {}
        logits, cache = model.run_with_cache(toks)
        # get_cspa_results reads the result of layer L - 1: heads of layer 0 are out of its
        # reach. Their mean ablation is the same formula as its step 1, written out here.
        for h in range(cfg.n_heads if name != "small" else 0):
            r = cache["blocks.0.attn.hook_result"][:, :, h]
            resid = cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"] + (result_mean[(0, h)][:s] - r)
            lg = (resid / cache["ln_final.hook_scale"]) @ model.W_U + model.b_U
            out[f"0.{h}.kl_ablated"] = paper["kl_div"](logits, lg)
            out[f"0.{h}.loss_ablated"] = model.loss_fn(lg, toks, per_token=True)
        for (l, h) in heads:
            if True:
                for mode, kw in [
                    ("both", dict(interventions=["qk", "ov"], K_unembeddings=0.05, only_keep_negative_components=True)),
                    ("ov_only", dict(interventions=["qk", "ov"], K_unembeddings=1 - 1e-9, only_keep_negative_components=True)),
                    ("qk_only", dict(interventions=["qk"], K_unembeddings=0.05, only_keep_negative_components=False)),
                ]:
                    res = paper["get_cspa_results"](
                        model=model, toks=toks, negative_head=(l, h), K_semantic=1,
                        result_mean=result_mean, **kw,
                    )[0]
                    key = f"{l}.{h}.{mode}"
                    out[f"{key}.kl_cspa"] = res["kl_div_cspa_to_orig"]
                    out[f"{key}.loss_cspa"] = res["loss_cspa"]
                    out[f"{key}.effect_explained"] = torch.tensor([paper["get_performance_recovered"](res)])
                    if mode == "both":
                        out[f"{l}.{h}.kl_ablated"] = res["kl_div_ablated_to_orig"]
                        out[f"{l}.{h}.loss_ablated"] = res["loss_ablated"]
                        out["loss"] = res["loss"]

        # DLA as TL computes it: apply_ln_to_stack on the stacked head results, then the
        # next token's unembedding (logit_attrs' directions); answers: the last position.
        stack, labels = cache.stack_head_results(layer=-1, return_labels=True)  # [LH, B, S, D]
        scaled = cache.apply_ln_to_stack(stack, layer=-1)
        dirs = model.tokens_to_residual_directions(toks[:, 1:])  # [B, S-1, D]
        out["dla"] = (scaled[:, :, :-1] * dirs).sum(-1)  # [LH, B, S-1]
        g = torch.Generator().manual_seed(40)
        answers = torch.randint(0, vocab, (n, 2), generator=g)
        json.dump(answers.tolist(), open(os.path.join(HERE, f"cspa_answers_{name}.json"), "w"))
        d_ans = model.tokens_to_residual_directions(answers[:, 0]) - model.tokens_to_residual_directions(answers[:, 1])
        out["dla_logit_diff"] = (scaled[:, :, -1] * d_ans).sum(-1)  # [LH, B]

        # Logit lens: resid_pre 0 then every resid_post, through ln_final (own scale).
        losses, ranks = [], []
        for k in range(cfg.n_layers + 1):
            hook = "blocks.0.hook_resid_pre" if k == 0 else f"blocks.{k - 1}.hook_resid_post"
            lg = model.unembed(model.ln_final(cache[hook]))
            losses.append(model.loss_fn(lg, toks, per_token=True))
            tgt = lg[:, :-1].gather(-1, toks[:, 1:, None])
            ranks.append(1.0 + (lg[:, :-1] > tgt).sum(-1).float())
        out["lens_loss"] = torch.stack(losses)
        out["lens_rank"] = torch.stack(ranks)
        out = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
        save_file(out, os.path.join(HERE, f"cspa_{name}.safetensors"), metadata=meta or None)
        ee = [out[f"{l}.{h}.both.effect_explained"].item() for (l, h) in heads]
        print(name, "effect_explained per head:", [round(x, 4) for x in ee])


if __name__ == "__main__":
    main()
