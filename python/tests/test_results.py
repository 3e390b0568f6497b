"""`hookgraph.run` / `hookgraph.load`: tables with the right dtypes, the manifest, the
inline figures, overrides, and the command-line entry points."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import hookgraph


def test_run_gives_tables_with_right_dtypes(smoke, root):
    t = smoke.tables["source_suppression"]
    assert list(t.columns)[:3] == ["dataset", "layer", "head"]
    assert isinstance(t["dataset"].dtype, pd.CategoricalDtype)
    assert t["layer"].dtype == np.int64 and t["head"].dtype == np.int64
    assert t["score"].dtype == np.float64
    # 2 layers x 4 heads, on both datasets.
    assert len(t) == 2 * 8
    # The same numbers as the committed baseline (the CI gate compares them too).
    base = hookgraph.read_table(root / "tests/baselines/smoke/source_suppression.csv")
    pd.testing.assert_frame_equal(
        t[["layer", "head"]].reset_index(drop=True), base[["layer", "head"]].reset_index(drop=True)
    )
    np.testing.assert_allclose(t["score"], base["score"], rtol=1e-4, atol=1e-5)

    loss = smoke.tables["loss"]
    assert loss["is_pad"].dtype == bool
    assert loss["token"].dtype == np.int64
    assert loss["target_text"].dtype == pd.StringDtype("pyarrow")


def test_manifest_and_load(smoke):
    m = smoke.manifest
    assert m["spec"]["name"] == "smoke"
    assert len(m["git_commit"]) >= 7
    again = hookgraph.load(smoke.path)
    assert list(again.tables) == list(smoke.tables)
    pd.testing.assert_frame_equal(again.tables["loss"], smoke.tables["loss"])
    with pytest.raises(KeyError, match="no such table"):
        smoke.tables["nope"]


def test_repr_html_inlines_the_heatmaps(smoke):
    page = smoke._repr_html_()
    assert page.count("<svg") >= 1
    assert "<?xml" not in page
    assert "source_suppression" in page


def test_text_columns_stay_text(tmp_path):
    p = tmp_path / "t_per_position.csv"
    p.write_text('dataset,seq,pos,token,token_text,value\nweb,0,0,1,nan,1.5\nweb,0,1,2,,NaN\nweb,0,2,3,"a,b",2\n')
    t = hookgraph.read_table(p)
    assert list(t["token_text"]) == ["nan", "", "a,b"]
    assert t["token"].dtype == np.int64
    assert np.isnan(t["value"][1])


def test_overrides_reach_the_run_and_the_manifest(tmp_path, root):
    r = hookgraph.run(
        root / "experiments/smoke.toml",
        output=tmp_path / "r",
        heads=["1.*"],
        model__batch_size=3,
        dataset__0__n=4,
    )
    t = r.tables["source_suppression"]
    assert set(zip(t["layer"], t["head"])) == {(1, h) for h in range(4)}
    assert r.manifest["spec"]["model"]["batch_size"] == 3
    assert r.manifest["spec_overrides"] == ['heads=["1.*"]', "model.batch_size=3", "dataset.0.n=4"]
    assert set(t.loc[t["dataset"] == "ioi", "n_sequences"]) == {4}
    with pytest.raises(hookgraph.RunnerError, match="no index 9"):
        hookgraph.run(root / "experiments/smoke.toml", output=tmp_path / "x", dataset__9__n=1)


def test_command_line_entry_points():
    out = subprocess.run([sys.executable, "-m", "hookgraph", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("runner "), out
