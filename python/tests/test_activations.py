"""`Results.activations` and `Results.weights`: a new plugin checked by hand in numpy, with
no hand-written weight processing (the issue's acceptance test), and the cache holding
exactly the tokens, lengths and padding a run sees."""

import numpy as np

import hookgraph

SPEC = """
name = "entropy"
heads = "all"

[model]
path = "{root}/experiments/checkpoints/tiny-gpt2"
batch_size = 4

[[dataset]]
name = "ioi"
kind = "ioi"
n = 6
seed = 1

[[dataset]]
name = "web"
kind = "text"
path = "{root}/tests/fixtures/corpus/web.jsonl"
n = 5
seq_len = 16
short = "pad"

[[metric]]
plugin = "hg_attention_entropy"

[[metric]]
kind = "loss"
"""


def layer_norm_pre(x, eps):
    # fold_ln leaves LayerNorm as centring and scaling only (TL's LayerNormPre).
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def pattern_from_weights(resid_pre, W, layer, eps):
    """The attention pattern from the residual stream and the processed weights."""
    x = layer_norm_pre(resid_pre.astype(np.float64), eps)
    q = np.einsum("bpd,hde->bhpe", x, W[f"blocks.{layer}.attn.W_Q"]) + W[f"blocks.{layer}.attn.b_Q"][None, :, None]
    k = np.einsum("bpd,hde->bhpe", x, W[f"blocks.{layer}.attn.W_K"]) + W[f"blocks.{layer}.attn.b_K"][None, :, None]
    scores = np.einsum("bhqe,bhke->bhqk", q, k) / np.sqrt(q.shape[-1])
    seq = scores.shape[-1]
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(-1, keepdims=True)


def entropy_table(pattern, tokens, lengths, bos):
    """Mean over sequences of the mean over real, non-BOS destinations (the plugin's doc)."""
    _, n_heads, _, _ = pattern.shape
    out = np.zeros(n_heads)
    for h in range(n_heads):
        per_seq = []
        for b, n in enumerate(lengths):
            ents = [
                -(p[p > 0] * np.log(p[p > 0])).sum()
                for q in range(n)
                if tokens[b, q] != bos
                for p in [pattern[b, h, q, : q + 1]]
            ]
            if ents:
                per_seq.append(np.mean(ents))
        out[h] = np.mean(per_seq)
    return out


def test_attention_entropy_plugin_against_numpy(tmp_path, root):
    spec = tmp_path / "entropy.toml"
    spec.write_text(SPEC.format(root=root))
    r = hookgraph.run(spec, output=tmp_path / "out", device="cpu")
    assert not r.manifest["failures"], r.manifest["failures"]
    table = r.tables["attention_entropy"]
    W = r.weights()
    assert W.metadata["fold_ln"] == "true" and W.metadata["weights_sha256"] == r.manifest["weights_sha256"]
    assert "blocks.0.ln1.w" not in W, "fold_ln leaves no LayerNorm weights"
    cfg = r.manifest["config"]
    bos = cfg["bos_token_id"]
    for dataset in ["ioi", "web"]:
        acts = r.activations(dataset, hooks=["blocks.*.attn.hook_pattern", "blocks.*.hook_resid_pre"])
        for layer in range(cfg["n_layers"]):
            pattern = acts[f"blocks.{layer}.attn.hook_pattern"]
            ours = pattern_from_weights(acts[f"blocks.{layer}.hook_resid_pre"], W, layer, cfg["eps"])
            np.testing.assert_allclose(pattern, ours, rtol=1e-4, atol=1e-5)
            want = entropy_table(pattern.astype(np.float64), acts["tokens"], acts["lengths"], bos)
            got = table[(table["dataset"] == dataset) & (table["layer"] == layer)].sort_values("head")["entropy"]
            np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-4, atol=1e-5)


def test_cache_holds_the_batches_a_run_sees(smoke):
    acts = smoke.activations("web", hooks=["blocks.0.attn.hook_pattern"])
    tokens, lengths, mask = acts["tokens"], acts["lengths"], acts["mask"]
    assert tokens.dtype == np.int64 and lengths.dtype == np.int64 and mask.dtype == bool
    assert acts["blocks.0.attn.hook_pattern"].shape[:1] == tokens.shape[:1]
    assert acts.metadata["dataset"] == "web"
    # The same tokens and padding as the run's loss table, position by position.
    loss = smoke.tables["loss"]
    web = loss[loss["dataset"] == "web"]
    assert (tokens[web["seq"], web["pos"]] == web["token"].to_numpy()).all()
    # `is_pad` in loss.csv is about the predicted (next) token.
    assert (mask[web["seq"], web["pos"] + 1] == ~web["is_pad"].to_numpy()).all()
    assert (mask.sum(1) == lengths).all()
    # `short = "pad"` right-pads with BOS: some padding, which `tokens` alone hides.
    assert (~mask).any() and (tokens[~mask] == smoke.manifest["config"]["bos_token_id"]).all()
