"""Finding the `runner` binary and running it.

The wheel installs `runner` into the environment's scripts directory (maturin's `bin`
bindings, as ruff ships its binary). `HOOKGRAPH_RUNNER` points at another one, e.g. the
runner `cargo test` built in a checkout (`target/debug/runner`), so tests need no wheel.

The runner downloads a hub model it does not find in the cache with the huggingface_hub of
`HOOKGRAPH_PYTHON`; `runner_env` names this interpreter, so a model fetched from a notebook
uses the notebook's huggingface_hub (its token, its proxy settings) and lands in the cache
TransformerLens reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

EXE = "runner" + (".exe" if sys.platform == "win32" else "")


class RunnerError(RuntimeError):
    """The runner exited with an error; the message is what it printed on stderr."""

    def __init__(self, args: Sequence[str], code: int, stderr: str):
        self.args_ = list(args)
        self.code = code
        self.stderr = stderr
        tail = stderr.strip() or f"(no message; exit code {code})"
        super().__init__(f"runner {' '.join(args)}: exit {code}\n{tail}")


def runner_path() -> str:
    """The runner binary this module runs."""
    env = os.environ.get("HOOKGRAPH_RUNNER")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"HOOKGRAPH_RUNNER={env}: no such file")
        return env
    candidates = [Path(sysconfig.get_path("scripts")) / EXE]
    user = sysconfig.get_path("scripts", f"{os.name}_user")
    if user:
        candidates.append(Path(user) / EXE)
    # The interpreter's own directory (a venv run without activating it).
    candidates.append(Path(sys.executable).parent / EXE)
    for c in candidates:
        if c.is_file():
            return str(c)
    found = shutil.which(EXE)
    if found:
        return found
    raise FileNotFoundError(
        "the hookgraph runner is not installed: `pip install ./python` in a hookgraph "
        "checkout (or a hookgraph wheel), or set HOOKGRAPH_RUNNER to a built runner"
    )


def runner_env() -> dict:
    """The environment the runner gets: this one, with `HOOKGRAPH_PYTHON` set to this
    interpreter unless the user set it."""
    env = dict(os.environ)
    env.setdefault("HOOKGRAPH_PYTHON", sys.executable)
    return env


def call(args: Sequence[str], quiet: bool = True) -> subprocess.CompletedProcess:
    """Runs `runner ARGS`; raises RunnerError on a non-zero exit (exit 3, some metric
    failed but the others were written, is returned: the caller decides)."""
    cmd = [runner_path(), *args]
    # Progress bars go to the terminal (stderr) unless quiet; errors are always kept.
    proc = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=runner_env(),
    )
    if not quiet and proc.stdout:
        sys.stdout.write(proc.stdout)
    if proc.returncode not in (0, 3):
        raise RunnerError(args, proc.returncode, proc.stderr)
    return proc
