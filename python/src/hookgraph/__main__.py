"""`python -m hookgraph ARGS`: the runner, with the same arguments."""

from __future__ import annotations

import os
import subprocess
import sys

from ._runner import runner_env, runner_path


def main() -> int:
    exe = runner_path()
    args = [exe, *sys.argv[1:]]
    env = runner_env()
    if sys.platform == "win32":
        return subprocess.run(args, env=env).returncode
    os.execve(exe, args, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
