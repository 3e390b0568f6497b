"""TransformerLens goldens for hookgraph's interventions (`[[intervention]]`).

Every case is computed the way TransformerLens's `patching.py` does it: one
`run_with_hooks` forward pass per intervention, the hook function writing the new value at
the TL hook point (the layers are recomputed, nothing is shared), then the measures of
`docs/metrics.md` (loss, kl, logit_diff, recovered) from the full logits.

Writes tests/golden/interventions_{a,b}.json: the token sets, the answers, and per case the
spec keys and the expected rows. Rerun by hand from the repository root:

    /work/.tlvenv/bin/python tests/golden/make_intervention_golden.py

The checkpoints are tests/fixtures/ckpt_a and ckpt_b (made by make_golden.py), loaded into
TL with every processing step on (as hookgraph's default), and use_attn_result on.
"""

import json
import os
import sys

import torch
from transformers import GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_golden as mg  # noqa: E402  (build_tl_model, make_tokens)

ROOT = os.path.dirname(os.path.dirname(HERE))
torch.set_grad_enabled(False)
torch.set_num_threads(1)


def seq_lens(tokens, bos):
    out = []
    for row in tokens.tolist():
        n = len(row)
        for p in range(1, len(row)):
            if row[p] == bos:
                n = p
                break
        out.append(n)
    return out


def log_probs(logits):
    return torch.log_softmax(logits.double(), dim=-1)


def measures(logits, clean_lp, tokens, lens, answers):
    """Per the definitions: pooled loss and kl, mean logit_diff."""
    lp = log_probs(logits)
    loss_s, loss_n, kl_s, kl_n, ld = 0.0, 0, 0.0, 0, []
    for i, n in enumerate(lens):
        for p in range(n - 1):
            loss_s -= lp[i, p, tokens[i, p + 1]].item()
            loss_n += 1
        if clean_lp is not None:
            c = clean_lp[i, :n]
            kl_s += (c.exp() * (c - lp[i, :n])).sum().item()
            kl_n += n
        if answers is not None:
            a, b = answers[i]
            ld.append((logits[i, n - 1, a].double() - logits[i, n - 1, b].double()).item())
    return dict(
        loss=loss_s / loss_n,
        kl=(kl_s / kl_n) if kl_n else 0.0,
        logit_diff=(sum(ld) / len(ld)) if ld else None,
    )


def hook_name(hook, l):
    return {
        "z": f"blocks.{l}.attn.hook_z",
        "result": f"blocks.{l}.attn.hook_result",
        "attn_out": f"blocks.{l}.hook_attn_out",
        "mlp_out": f"blocks.{l}.hook_mlp_out",
        "resid_pre": f"blocks.{l}.hook_resid_pre",
        "resid_post": f"blocks.{l}.hook_resid_post",
    }[hook]


def mean_of(model, tokens, name, per_position, bos):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    a = cache[name].double()
    lens = seq_lens(tokens, bos)
    s = a.shape[1]
    if per_position:
        out = torch.zeros(a.shape[1:], dtype=torch.float64)
        for p in range(s):
            rows = [i for i, n in enumerate(lens) if p < n]
            if rows:
                out[p] = a[rows, p].mean(0)
        return out.float()
    rows = torch.cat([a[i, :n] for i, n in enumerate(lens)])
    return rows.mean(0).float()


def run_case(model, cfg_b, case, toks, answers):
    bos = cfg_b
    target = toks[case.get("dataset", "clean")]
    lens = seq_lens(target, bos)
    ans = answers
    hook = case["hook"]
    kind = case["kind"]
    nl, nh = model.cfg.n_layers, model.cfg.n_heads
    clean_logits = model(target)
    clean_lp = log_probs(clean_logits)
    orig = measures(clean_logits, None, target, lens, ans)
    src_cache = None
    ld_src = None
    if kind == "patch":
        src = toks[case["source"]]
        src_logits, src_cache = model.run_with_cache(src)
        ld_src = measures(src_logits, None, target, lens, ans)["logit_diff"]
    per_pos = case.get("per_position", False)
    positions = list(range(target.shape[1])) if per_pos else [None]
    if hook in ("z", "result"):
        heads = [tuple(map(int, h.split("."))) for h in case.get("heads", [f"{l}.{h}" for l in range(nl) for h in range(nh)])]
        if case.get("together"):
            units = [(heads[0][0], [h for _, h in heads], p) for p in positions]
        else:
            units = [(l, [h], p) for (l, h) in heads for p in positions]
    else:
        units = [(l, None, p) for l in range(nl) for p in positions]
    rows = []
    for (l, hs, p) in units:
        name = hook_name(hook, l)
        if kind == "ablate":
            value = case["value"]
            if value == "zero":
                new = None
            else:
                over = toks[case.get("mean_over", case.get("dataset", "clean"))]
                new = mean_of(model, over, name, value == "mean_per_position", bos)
                if value == "mean_per_position":
                    new = new[: target.shape[1]]
        else:
            new = src_cache[name]

        def fn(act, hook=None, hs=hs, p=p, new=new):
            sl = slice(None) if p is None else slice(p, p + 1)
            if hs is None:
                if new is None:
                    act[:, sl] = 0.0
                elif kind == "patch":
                    act[:, sl] = new[:, sl]
                elif case["value"] == "mean_per_position":
                    act[:, sl] = new[sl].unsqueeze(0)
                else:
                    act[:, sl] = new
            else:
                for h in hs:
                    if new is None:
                        act[:, sl, h] = 0.0
                    elif kind == "patch":
                        act[:, sl, h] = new[:, sl, h]
                    elif case["value"] == "mean_per_position":
                        act[:, sl, h] = new[sl, h].unsqueeze(0)
                    else:
                        act[:, sl, h] = new[h]
            return act

        logits = model.run_with_hooks(target, fwd_hooks=[(name, fn)])
        m = measures(logits, clean_lp, target, lens, ans)
        row = dict(layer=l, loss_orig=orig["loss"], loss=m["loss"], kl=m["kl"])
        if hs is not None:
            row["head"] = hs[0] if len(hs) == 1 else "+".join(map(str, hs))
        if p is not None:
            row["pos"] = p
        if ans is not None:
            row["logit_diff_orig"] = orig["logit_diff"]
            row["logit_diff"] = m["logit_diff"]
            if kind == "patch":
                row["logit_diff_source"] = ld_src
                row["recovered"] = (m["logit_diff"] - orig["logit_diff"]) / (ld_src - orig["logit_diff"])
        rows.append(row)
    return rows


CASES = [
    dict(kind="ablate", value="zero", hook="z"),
    dict(kind="ablate", value="mean", hook="z"),
    dict(kind="ablate", value="mean_per_position", hook="result", mean_over="other"),
    dict(kind="ablate", value="zero", hook="result"),
    dict(kind="ablate", value="mean", hook="attn_out", mean_over="other"),
    dict(kind="ablate", value="zero", hook="mlp_out"),
    dict(kind="ablate", value="mean", hook="resid_pre"),
    dict(kind="ablate", value="mean_per_position", hook="resid_post"),
    dict(kind="patch", hook="z", source="corrupt"),
    dict(kind="patch", hook="result", source="corrupt", heads=["0.1", "1.0"]),
    dict(kind="patch", hook="attn_out", source="corrupt"),
    dict(kind="patch", hook="mlp_out", source="corrupt"),
    dict(kind="patch", hook="resid_pre", source="corrupt"),
    dict(kind="patch", hook="resid_post", source="corrupt"),
    dict(kind="patch", hook="z", source="corrupt", heads=["1.0", "1.1"], together=True),
    dict(kind="ablate", value="zero", hook="z", heads=["0.0", "0.1"], together=True),
    dict(kind="patch", hook="resid_pre", source="eq_corrupt", dataset="eq", per_position=True),
    dict(kind="ablate", value="mean", hook="attn_out", dataset="eq", per_position=True),
    dict(kind="patch", hook="z", source="eq_corrupt", dataset="eq", per_position=True, heads=["1.0"]),
]


def main():
    for ck, seed in (("a", 7001), ("b", 7002)):
        hf = GPT2LMHeadModel.from_pretrained(os.path.join(ROOT, "tests", "fixtures", f"ckpt_{ck}"), dtype=torch.float32).eval()
        model = mg.build_tl_model(hf, processed=True)
        vocab = model.cfg.d_vocab
        bos = vocab - 1
        s = 12
        pads = [0, 3, 5]
        toks = {
            "clean": mg.make_tokens(vocab, 3, s, pads, seed),
            "corrupt": mg.make_tokens(vocab, 3, s, pads, seed + 1),
            "other": mg.make_tokens(vocab, 4, 14, [0, 2, 6, 1], seed + 2),
            "eq": mg.make_tokens(vocab, 3, 8, [0, 0, 0], seed + 3),
            "eq_corrupt": mg.make_tokens(vocab, 3, 8, [0, 0, 0], seed + 4),
        }
        g = torch.Generator().manual_seed(seed + 5)
        answers = {k: torch.randint(0, vocab - 1, (len(v), 2), generator=g).tolist() for k, v in toks.items()}
        tt = {k: torch.tensor(v) for k, v in toks.items()}
        heads_b = None
        out = dict(tokens=toks, answers=answers, cases=[])
        for case in CASES:
            case = dict(case)
            if ck == "b" and "heads" in case:
                # ckpt_b has 2 heads per layer and 3 layers.
                case["heads"] = [h for h in case["heads"]]
            ds = case.get("dataset", "clean")
            rows = run_case(model, bos, case, tt, answers[ds])
            out["cases"].append(dict(spec=case, rows=rows))
        path = os.path.join(HERE, f"interventions_{ck}.json")
        with open(path, "w") as f:
            json.dump(out, f)
        print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
