"""How long a 1 GB per-position table takes to reach pandas (issue 23's target: under 10 s).

Writes a CSV shaped exactly like the runner's per-position tables
(`dataset,layer,head,seq,pos,token,token_text,value`, as tests/baselines/smoke has them),
with GPT-2 token texts that need quoting (commas, quotes, newlines) in the mix, then times:

- `hookgraph.results.read_table` (what `Results.tables[...]` uses: pyarrow's multithreaded
  CSV reader, dtypes set, text as pyarrow strings);
- plain `pandas.read_csv` (the C engine, pandas' default), for comparison;
- the same table as Parquet (written once by pyarrow, then `pandas.read_parquet`), to show
  what a Parquet output of the runner would buy.

Each timing is the best of `--repeats` runs. Usage (from the repository root):

    python bench/pandas_load.py [--gb 1.0] [--repeats 2] [--dir target/pandas-load]

Needs numpy, pandas and pyarrow (the hookgraph package's own dependencies).
"""
import argparse
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python", "src"))

# Token texts as the runner writes them (csv crate quoting): plain words, and ones that
# need quotes: a comma, a double quote, a newline.
TEXTS = [" the", " of", "When", " Mary", " John", ",", '"', "\n", " and", " to", "<|endoftext|>",
         " a", " in", ".", " that", " is", " was", " he", " for", " it"]


def csv_cell(t):
    if any(c in t for c in ',"\n\r'):
        return '"' + t.replace('"', '""') + '"'
    return t


def write_table(path, gb, seed=0):
    """A block of 200k rows (12 layers x 12 heads x sequences x 64 positions), written again
    with later sequence numbers until the file holds `gb` GB."""
    rng = np.random.default_rng(seed)
    rows_per_block = 12 * 12 * 64 * 22
    layer = np.repeat(np.arange(12), rows_per_block // 12)
    head = np.tile(np.repeat(np.arange(12), rows_per_block // 144), 12)
    pos = np.tile(np.arange(64), rows_per_block // 64)
    seq_in_block = np.tile(np.repeat(np.arange(22), 64), 144)
    token = rng.integers(0, 50257, rows_per_block)
    text = rng.integers(0, len(TEXTS), rows_per_block)
    value = rng.standard_normal(rows_per_block).astype(np.float32)
    cells = [csv_cell(t) for t in TEXTS]
    target = int(gb * 1e9)
    written = 0
    block = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("dataset,layer,head,seq,pos,token,token_text,value\n")
        while written < target:
            seq = seq_in_block + 22 * block
            lines = [
                f"ioi,{l},{h},{s},{p},{t},{cells[x]},{v!r}\n"
                for l, h, s, p, t, x, v in zip(layer.tolist(), head.tolist(), seq.tolist(),
                                              pos.tolist(), token.tolist(), text.tolist(),
                                              value.tolist())
            ]
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
            block += 1
    return os.path.getsize(path)


def best(f, repeats):
    secs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        secs.append(time.perf_counter() - t)
    return min(secs), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "pandas-load"))
    ap.add_argument("--no-pandas-default", action="store_true",
                    help="skip plain pandas.read_csv (slow: ~10x the others)")
    args = ap.parse_args()

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hookgraph.results import read_table

    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"per_position_{args.gb:g}gb.csv")
    if not os.path.exists(path):
        print(f"writing {path} ...", flush=True)
        write_table(path, args.gb)
    size = os.path.getsize(path)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"{size / 1e9:.2f} GB CSV; {cpu}, {os.cpu_count()} cores; pandas {pd.__version__}, "
          f"pyarrow {pa.__version__}", flush=True)

    secs, df = best(lambda: read_table(path), args.repeats)
    print(f"hookgraph read_table (pyarrow CSV): {secs:6.2f} s  {len(df):,} rows  "
          f"{size / 1e9 / secs:.2f} GB/s", flush=True)
    assert str(df["token_text"].dtype).startswith("string"), df.dtypes
    assert df["layer"].dtype == np.int64 and df["value"].dtype == np.float64, df.dtypes

    pq_path = path[:-4] + ".parquet"
    if not os.path.exists(pq_path):
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), pq_path)
    del df
    secs, df = best(lambda: pd.read_parquet(pq_path), args.repeats)
    print(f"pandas.read_parquet (pyarrow):      {secs:6.2f} s  ({os.path.getsize(pq_path) / 1e9:.2f} GB file)",
          flush=True)
    del df
    if not args.no_pandas_default:
        secs, df = best(lambda: pd.read_csv(path), 1)
        print(f"pandas.read_csv (C engine, default): {secs:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
