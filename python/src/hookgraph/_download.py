"""`python -m hookgraph._download REPO --cache DIR --endpoint URL --required F.. --optional F..`:
a hub model's files into the HuggingFace cache with huggingface_hub, for the runner.

The runner calls this when downloads go through Python (`HOOKGRAPH_PYTHON`, or a runner
built without its own client, as the wheel's is: src/model/hub.rs says why). The layout it
writes (`models--*/blobs`, `snapshots/<commit>/`, `refs/main`) is the one the runner reads,
and TransformerLens too. The token comes from the environment (`HF_TOKEN`, the token
file), never from the command line. Progress bars go to stderr; the last line on stdout is
`ok <snapshot dir>` or `error <message>`, which the runner reads.
"""

from __future__ import annotations

import argparse
import os
import sys


def download(repo: str, cache: str, endpoint: str, required, optional) -> str:
    """Downloads `required` (all must exist) and whichever of `optional` the repo has;
    returns the snapshot directory."""
    from huggingface_hub import hf_hub_download

    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError

    snapshot = None
    for f in required:
        path = hf_hub_download(repo, f, cache_dir=cache, endpoint=endpoint)
        snapshot = os.path.dirname(path)
    for f in optional:
        # GPT-2 repos carry both tokenizer forms; a repo with one is still fine.
        try:
            hf_hub_download(repo, f, cache_dir=cache, endpoint=endpoint)
        except EntryNotFoundError:
            pass
    return snapshot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hookgraph._download")
    p.add_argument("repo")
    p.add_argument("--cache", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--required", nargs="+", required=True)
    p.add_argument("--optional", nargs="*", default=[])
    a = p.parse_args(argv)
    try:
        snapshot = download(a.repo, a.cache, a.endpoint, a.required, a.optional)
    except ImportError as e:
        print(f"error huggingface_hub is not installed ({e}): pip install huggingface_hub")
        return 1
    except Exception as e:  # the runner shows the message; a traceback helps no one there
        print(f"error {type(e).__name__}: {' '.join(str(e).split())}")
        return 1
    print(f"ok {snapshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
