#!/usr/bin/env bash
# The GPU check, run ON the GPU machine (one H100, CUDA 13.0 driver, no Rust, no internet) from
# the repository root, with target/gpu-carry built here by scripts/gpu/build.sh:
#
#   device run: bash scripts/gpu/check.sh        (carry: target/gpu-carry; timeout_s ~420:
#   the steps are bounded at 120 + 150 + 90 s plus the smoke runs, so a second try fits
#   in a 15-minute lease)
#
# 1. the TransformerLens parity tests on device `cuda` and CPU/GPU agreement (the carried
#    integration-test binary, `cuda` module);
# 2. the smoke experiment on `cpu` and `cuda` through the runner, compared table by table;
# 3. `runner bench --device cuda` (its cases, plus the paper-scale source_suppression
#    500x1000) and PyTorch on the same GPU, the same random GPT-2-small-shaped checkpoint and
#    tokens (scripts/gpu/torch_peer.py: HF GPT2LMHeadModel's eager forward and the one-pass
#    vectorised source_suppression sweep).
# Writes $OUT/check.log and $OUT/gpu.json (the figures) and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/../.."
carry=${CARRY:-target/gpu-carry}
out=${OUT:-/tmp/hookgraph-gpu}
mkdir -p "$out"
exec > >(tee "$out/check.log") 2>&1
status=0
step() { echo; echo "== $*"; }
fail() { echo "FAILED: $*"; status=1; }

step "machine"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || fail "nvidia-smi"
lscpu | grep 'Model name' || true
cat "$carry/COMMIT" 2>/dev/null

step "CUDA libraries (the real ones; the build linked stubs with the same sonames)"
libdirs=$(find / -xdev \( -name 'libcublas.so.13*' -o -name 'libnvrtc.so.13*' \) -not -path '/proc/*' 2>/dev/null |
  xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$carry/runner" | grep -E 'cuda|cublas|nvrtc' || fail "ldd runner"
if ldd "$carry/runner" | grep -q 'not found'; then fail "a CUDA library is missing"; fi

step "1. parity on cuda (TransformerLens goldens) and CPU/GPU agreement"
t0=$(date +%s.%N)
HOOKGRAPH_ROOT=$PWD timeout 120 "$carry/it" cuda --test-threads=1 2>&1 | tail -n 40
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || fail "parity tests on cuda (exit $rc)"
parity_s=$(echo "$(date +%s.%N) - $t0" | bc)

step "2. smoke experiment: cpu vs cuda"
"$carry/runner" -q --device cpu --output "$out/smoke-cpu" experiments/smoke.toml || fail "smoke on cpu"
"$carry/runner" -q --device cuda --output "$out/smoke-cuda" experiments/smoke.toml || fail "smoke on cuda"
"$carry/runner" compare "$out/smoke-cuda" "$out/smoke-cpu" --rtol 1e-4 --atol 1e-5 || fail "cpu and cuda results differ"

step "3. bench on cuda, and PyTorch on the same GPU"
# The random checkpoint (~500 MB) stays off $OUT, whose files travel back.
bench_dir=/tmp/hookgraph-bench-gpt2-small
timeout 150 "$carry/runner" bench --device cuda --dir "$bench_dir" --json "$out/bench-cuda.json" || fail "runner bench --device cuda"
timeout 90 python3 scripts/gpu/torch_peer.py --dir "$bench_dir" --out "$out/torch-cuda.json" || fail "torch peer"

step "summary"
python3 - "$out" "$parity_s" "$status" <<'PY'
import json, os, sys
out, parity_s, status = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
bench, torch_ = load("bench-cuda.json") or [], load("torch-cuda.json") or {}
fig = {"parity_seconds": parity_s, "status": status, "runner": bench, "torch": torch_}
json.dump(fig, open(os.path.join(out, "gpu.json"), "w"), indent=1)
print("| case | runner s | TFLOP/s | PyTorch s | PyTorch s / runner s |")
print("|---|---|---|---|---|")
def peer(name):
    # runner bench's baseline scheme (src/bench.rs, Baseline), which torch_peer.py writes.
    if name.startswith("forward "):
        return torch_.get("hf " + name)
    return torch_.get("peer " + name)
for c in bench:
    t = peer(c.get("name", ""))
    tf = c.get("gflop", 0) / c["seconds"] / 1e3 if c.get("seconds") else 0
    ratio = f"{t / c['seconds']:.2f}x" if t and c.get("seconds") else "-"
    print(f"| {c.get('name')} | {c.get('seconds', 0):.4f} | {tf:.2f} | {t if t else '-'} | {ratio} |")
print("status:", "ok" if status == 0 else "FAILED")
PY
exit $status
