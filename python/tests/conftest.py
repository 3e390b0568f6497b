"""Shared fixtures: the repository root, and one smoke run (to a temporary directory) that
several tests read.

The runner is the installed wheel's, or `HOOKGRAPH_RUNNER` (CI points it at the runner
`cargo test` built, so the tests need no second build).
"""

from pathlib import Path

import pytest

import hookgraph

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> "hookgraph.Results":
    out = tmp_path_factory.mktemp("smoke") / "results"
    return hookgraph.run(ROOT / "experiments" / "smoke.toml", output=out, device="cpu")
