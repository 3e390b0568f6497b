"""TransformerLens's patching.py procedure for the intervention cases of `runner bench`.

Imported by bench/transformer_lens_baseline.py (run by hand, never in CI). Each case is what
a TransformerLens user writes for the sweep hookgraph runs in one `[[intervention]]`, on the
same random GPT-2-small-shaped checkpoint, token, source and answer files that
`runner bench` writes (target/bench-gpt2-small/):

- `<kind> z sweep BxS`: `patching.get_act_patch_attn_head_out_all_pos`, one hooked forward
  pass per head (144), the target batch whole. `patch` patches from the source run's cache
  (one `run_with_cache` on the source tokens); `ablate_zero` patches from a cache of zeros
  (TransformerLens has no ablation sweep; this is the same loop). TL's default
  `use_attn_result = False`.
- `patch resid_pre per-position BxS`: `patching.get_act_patch_resid_pre`, one pass per
  (layer, position).

Every case also runs the unchanged target pass whose logits the measures compare against.
The patching metric computes what hookgraph's table holds: with every measure, the pooled
per-token loss, the mean KL(unchanged || patched) over every position and the mean logit
difference at the last position (returned summed: TL's loop keeps one float per patch,
and the work is the same); with `logit_diff` alone, only that.
"""
import json
import os
import time

import torch
from transformer_lens import patching

# (batch, seq) of the intervention cases; the same list is in src/bench.rs (PATCH_SHAPES).
SHAPES = [(20, 16), (10, 100)]


def load(dir_, b, s):
    """The target tokens, the source tokens and the answers of shape (b, s)."""
    def rd(name):
        with open(os.path.join(dir_, name)) as f:
            return torch.tensor(json.load(f))
    return (rd(f"tokens_{b}x{s}.json"), rd(f"tokens_{b}x{s}_source.json"),
            rd(f"answers_{b}x{s}.json"))


def make_metric(orig_logits, toks, answers, every):
    """The patching metric: every measure (loss + kl + logit_diff) or logit_diff alone."""
    rows = torch.arange(toks.shape[0])
    correct, wrong = answers[:, 0], answers[:, 1]
    if every:
        logp_orig = orig_logits.log_softmax(-1)
        p_orig = logp_orig.exp()

    def metric(logits):
        ld = (logits[rows, -1, correct] - logits[rows, -1, wrong]).mean()
        if not every:
            return ld
        logp = logits.log_softmax(-1)
        loss = -logp[:, :-1].gather(-1, toks[:, 1:, None]).mean()
        kl = (p_orig * (logp_orig - logp)).sum(-1).mean()
        return loss + kl + ld

    return metric


def cases(model, dir_, timed):
    """Times every intervention case with `timed(name, fn)`."""
    model.set_use_attn_result(False)
    for b, s in SHAPES:
        toks, source, answers = load(dir_, b, s)
        model(toks[:2, :4])  # warm-up

        def z_sweep(kind, every, toks=toks, source=source, answers=answers):
            orig = model(toks)
            if kind == "patch":
                _, cache = model.run_with_cache(source, names_filter=lambda n: n.endswith("hook_z"))
            else:
                zero = torch.zeros(b, s, model.cfg.n_heads, model.cfg.d_head)
                cache = {f"blocks.{l}.attn.hook_z": zero for l in range(model.cfg.n_layers)}
            return patching.get_act_patch_attn_head_out_all_pos(
                model, toks, cache, make_metric(orig, toks, answers, every))

        for kind in ["ablate_zero", "patch"]:
            timed(f"{kind} z sweep {b}x{s}", lambda k=kind: z_sweep(k, True))
            timed(f"{kind} z sweep {b}x{s} logit_diff", lambda k=kind: z_sweep(k, False))
        if (b, s) == (20, 16):
            def resid(toks=toks, source=source, answers=answers):
                orig = model(toks)
                _, cache = model.run_with_cache(
                    source, names_filter=lambda n: n.endswith("hook_resid_pre"))
                return patching.get_act_patch_resid_pre(
                    model, toks, cache, make_metric(orig, toks, answers, True))
            timed(f"patch resid_pre per-position {b}x{s}", resid)


def _quiet_tqdm():
    """TL's loop wraps its indices in tqdm; its bar is noise in the bench's output."""
    try:
        from functools import partialmethod

        from tqdm import tqdm
        tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)
    except ImportError:
        pass


_quiet_tqdm()
