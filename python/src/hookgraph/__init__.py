"""hookgraph from Python: run an experiment spec with the bundled `runner` and read its
results as pandas DataFrames and numpy arrays.

    >>> import hookgraph
    >>> r = hookgraph.run("experiments/smoke.toml")
    >>> r.tables["source_suppression"].head()
    >>> acts = r.activations("ioi", hooks=["blocks.*.attn.hook_pattern"])
    >>> W = r.weights()   # processed, under TransformerLens state-dict names
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, List, Optional

from . import _runner
from ._runner import RunnerError, runner_path
from .results import Cache, Results, Tables, load, read_table

__all__ = ["run", "load", "Results", "Tables", "Cache", "RunnerError", "runner_path", "read_table", "overrides_args"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, os.PathLike)):
        s = str(v)
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as a TOML value")


def overrides_args(overrides: dict) -> List[str]:
    """`KEY=VALUE` strings for `runner run --set`: `model__batch_size=4` and
    `model={"batch_size": 4}` both set `[model] batch_size`; `dataset__0__n=5` sets the
    first `[[dataset]]`'s `n`."""
    out: List[str] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        else:
            out.append(f"{prefix}={_toml_value(v)}")

    for k, v in overrides.items():
        walk(k.replace("__", "."), v)
    return out


def run(
    spec: "os.PathLike[str] | str",
    *,
    output: "Optional[os.PathLike[str] | str]" = None,
    device: Optional[str] = None,
    quiet: bool = True,
    **overrides: Any,
) -> Results:
    """Runs the experiment `spec` (a TOML file) and returns its results.

    `output`: the results directory (default: the spec's, `results/<name>`); `device`:
    `cpu`, `cuda` or `auto`; other keywords override the spec's keys (`heads="0.1"`,
    `model__batch_size=4`, `model={"device": "cpu"}`) without editing the file: the
    manifest records the spec as run. A metric that fails still leaves the others' tables
    (see `results.manifest["failures"]`); anything else raises `RunnerError`.
    """
    spec_path = Path(spec).resolve()
    sets = overrides_args(overrides)
    args = ["run", str(spec_path)]
    for s in sets:
        args += ["--set", s]
    if output is not None:
        args += ["--output", str(output)]
    if device is not None:
        args += ["--device", device]
    if quiet:
        args.append("--quiet")
    proc = _runner.call(args, quiet=quiet)
    if output is not None:
        out = Path(output)
    else:
        # The runner's last word on where it wrote (`wrote N files to DIR`).
        found = re.search(r"^wrote \d+ files to (.*)$", proc.stdout, re.M)
        if not found:
            raise RunnerError(args, proc.returncode, proc.stdout + proc.stderr)
        out = Path(found.group(1))
    return Results(out, spec=spec_path, overrides=sets)
