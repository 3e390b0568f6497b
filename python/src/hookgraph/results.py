"""A run's results directory, read from Python: its tables as pandas DataFrames, its
manifest, and (by running the runner again on the same spec) activations and processed
weights as numpy arrays.

Must not: compute anything the runner computes; every number comes from the runner.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _runner, _safetensors

PathLike = Union[str, "os.PathLike[str]"]

# Columns that hold text whatever they look like (a token's text may be "1", "nan", "").
TEXT_COLUMNS = {"dataset", "metric", "hook", "name", "text"}
# Columns that hold 0/1 flags.
BOOL_COLUMNS = {"is_pad"}


def _is_text(column: str) -> bool:
    return column in TEXT_COLUMNS or column.endswith("_text")


def read_table(path: PathLike):
    """One CSV table as a pandas DataFrame with the right dtypes: integers as int64,
    values as float64 (the runner writes the shortest text that round-trips an f32, so
    `astype("float32")` gives the runner's value exactly), flags as bool, `dataset` as a
    category and text columns as strings (never NaN: a token may read "nan").

    pyarrow's multithreaded CSV reader: a 1 GB per-position table loads in a few seconds
    (see docs/python.md for the measurement).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pandas as pd

    with open(path, "r", encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split(",")
    types = {}
    for c in header:
        if c == "dataset":
            types[c] = pa.dictionary(pa.int32(), pa.string())
        elif _is_text(c):
            types[c] = pa.string()
        elif c in BOOL_COLUMNS:
            types[c] = pa.bool_()
    table = pacsv.read_csv(
        path,
        # GPT-2 has tokens that are newlines: quoted cells may hold them.
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=types,
            # Only numbers can be missing: text columns keep "", "NaN", "null" as text.
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    # Text as pyarrow-backed strings: no Python object per cell (fast for big tables).
    mapper = {pa.string(): pd.StringDtype("pyarrow")}.get
    return table.to_pandas(types_mapper=mapper)


class Tables(Mapping):
    """The run's CSV tables by name (`source_suppression`, `loss`, ...), read on first use."""

    def __init__(self, root: Path):
        self._root = root
        self._names = sorted(p.stem for p in root.glob("*.csv"))
        self._cache: Dict[str, object] = {}

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(f"{name!r}: no such table in {self._root} (tables: {', '.join(self._names)})")
        if name not in self._cache:
            self._cache[name] = read_table(self._root / f"{name}.csv")
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"Tables({', '.join(self._names)})"


class Cache(dict):
    """Arrays by name (TransformerLens hook names, `tokens`, `lengths`, `mask`) with the
    file's `metadata` (model sha256, processing switches, spec, dataset)."""

    metadata: Dict[str, str]

    def __init__(self, arrays: Dict[str, np.ndarray], metadata: Dict[str, str]):
        super().__init__(arrays)
        self.metadata = metadata


class Results:
    """A results directory (`results/NAME`), as `hookgraph.run` wrote it or `hookgraph.load`
    found it."""

    def __init__(self, path: PathLike, spec: Optional[PathLike] = None, overrides: Sequence[str] = ()):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: not found (is {self.path} a hookgraph results directory?)")
        self.manifest: dict = json.loads(manifest.read_text(encoding="utf-8"))
        self._spec = Path(spec) if spec is not None else None
        self._overrides = list(overrides) or list(self.manifest.get("spec_overrides", []))
        self.tables = Tables(self.path)

    def __repr__(self) -> str:
        return f"Results({str(self.path)!r}, tables={list(self.tables)})"

    @property
    def spec_path(self) -> Path:
        """The spec the run was made from (needed to cache activations or weights)."""
        if self._spec is not None:
            return self._spec
        p = Path(self.manifest["spec_path"])
        if not p.is_file():
            raise FileNotFoundError(
                f"the run's spec {p} is not there (relative paths are from where it ran); "
                f"pass it: hookgraph.load({str(self.path)!r}, spec='path/to/spec.toml')"
            )
        return p

    def _spec_args(self) -> List[str]:
        args = ["--spec", str(self.spec_path)]
        for s in self._overrides:
            args += ["--set", s]
        return args

    def _cache(self, args: List[str], quiet: bool) -> Cache:
        with tempfile.TemporaryDirectory(prefix="hookgraph-") as tmp:
            out = Path(tmp) / "cache.safetensors"
            _runner.call(["cache", *args, "--out", str(out)], quiet=quiet)
            arrays, meta = _safetensors.read(out)
        # A spec edited since the run would give other activations than its tables'.
        want = self.manifest.get("weights_sha256")
        if want and meta.get("weights_sha256") not in (None, want):
            raise RuntimeError(
                f"the model's weights changed since the run (sha256 {meta.get('weights_sha256')} "
                f"now, {want} in the manifest)"
            )
        return Cache(arrays, meta)

    def activations(
        self,
        dataset: str,
        hooks: Iterable[str] = ("logits",),
        *,
        device: Optional[str] = None,
        quiet: bool = True,
    ) -> Cache:
        """Runs the spec's `dataset` again, in the run's batches, and returns the asked hook
        points (names or globs, `blocks.*.attn.hook_pattern`) under TransformerLens names,
        plus `logits`, `tokens` (`[n, seq]`), `lengths` (`[n]`) and `mask` (`[n, seq]`,
        True on real tokens: GPT-2 right-pads with BOS, so `tokens` alone cannot tell)."""
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        args = [*self._spec_args(), "--dataset", dataset, "--hooks", *hooks]
        if device:
            args += ["--device", device]
        return self._cache(args, quiet)

    def weights(self, *, quiet: bool = True) -> Cache:
        """The processed parameters the run used (fold_ln, centring, ... as its spec says),
        under TransformerLens state-dict names: `embed.W_E`, `blocks.0.attn.W_O`
        (`[n_heads, d_head, d_model]`), `unembed.W_U`, ..."""
        return self._cache([*self._spec_args(), "--weights"], quiet)

    def figures(self) -> List[Path]:
        """The run's heatmaps and views (SVG), as the index page shows them."""
        files = self.manifest.get("files", [])
        return [self.path / f for f in files if f.endswith(".svg")]

    def _repr_html_(self) -> str:
        m = self.manifest
        parts = [
            f"<p><b>hookgraph results</b> <code>{html.escape(str(self.path))}</code>: "
            f"{m.get('heads', '?')} heads, datasets "
            + ", ".join(html.escape(d["name"]) for d in m.get("datasets", []))
            + f"; tables: {html.escape(', '.join(self.tables))}</p>"
        ]
        # The per-head heatmaps first, then the views, as the index page orders them.
        figures = sorted(self.figures(), key=lambda p: p.name.startswith("view_"))
        for svg in figures:
            text = svg.read_text(encoding="utf-8")
            # Inline, so the cells' <title> hover values work in the notebook.
            start = text.find("<svg")
            parts.append(
                f"<figure><figcaption>{html.escape(svg.name)}</figcaption>{text[start:]}</figure>"
            )
        return "\n".join(parts)


def load(path: PathLike, spec: Optional[PathLike] = None) -> Results:
    """An existing results directory (`results/NAME`). `spec`: the spec it was made from,
    if its recorded path no longer holds (needed for activations and weights only)."""
    return Results(path, spec=spec)
