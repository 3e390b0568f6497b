#!/usr/bin/env bash
# Peak memory of `runner compare` on two large per-position tables (issue 21, item 9).
#
# Writes two CSVs shaped like `source_suppression_per_position.csv` (dataset, layer, head,
# seq, pos, token, value; about 45 bytes a row) of SIZE_GB each (default 2) into a scratch
# directory, the second with every value nudged inside the tolerance, then runs
# `runner compare NEW BASE` under `/usr/bin/time -v` and prints its peak RSS and wall time.
# Needs 2 x SIZE_GB of free disk in TMPDIR and a release build (`cargo build --release`).
#   scripts/compare_memory.sh            # 2 GB each
#   SIZE_GB=0.1 scripts/compare_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
size_gb="${SIZE_GB:-2}"
runner="${RUNNER:-target/release/runner}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/hg-compare-mem.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/new" "$scratch/base"
python3 - "$scratch" "$size_gb" <<'PY'
import sys
scratch, size = sys.argv[1], float(sys.argv[2])
target = int(size * 1e9)
tokens = ["When", " Mary", " and", " John", " went", " to", " the", " store", ",", " gave"]
with open(f"{scratch}/base/t_per_position.csv", "w") as b, open(f"{scratch}/new/t_per_position.csv", "w") as n:
    head = "dataset,layer,head,seq,pos,token,value\n"
    b.write(head); n.write(head)
    written, seq = len(head), 0
    while written < target:
        rows_b, rows_n = [], []
        for layer in range(12):
            for h in range(12):
                for pos in range(24):
                    v = ((seq * 7919 + layer * 131 + h * 17 + pos) % 20011) / 20011.0 - 0.5
                    key = f"ioi,{layer},{h},{seq},{pos},\"{tokens[pos % 10]}\","
                    rows_b.append(f"{key}{v:.9g}\n")
                    rows_n.append(f"{key}{v * (1 + 1e-6):.9g}\n")
        chunk_b, chunk_n = "".join(rows_b), "".join(rows_n)
        b.write(chunk_b); n.write(chunk_n)
        written += len(chunk_b)
        seq += 1
PY
ls -l "$scratch/new" "$scratch/base" | grep csv
echo "== $runner compare (peak RSS from /usr/bin/time -v)"
/usr/bin/time -v "$runner" compare "$scratch/new" "$scratch/base" 2>"$scratch/time.txt" | tail -3 || true
grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$scratch/time.txt"
lscpu | grep "Model name"
