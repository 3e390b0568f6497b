#!/usr/bin/env bash
# Builds hookgraph's CUDA binaries on this machine (no GPU, no CUDA install needed) and packs
# what the GPU machine needs into target/gpu-carry/ (under 64 MiB): stripped `runner` and the
# integration-test binary, plus scripts/gpu/check.sh's inputs, which travel with the work tree.
#
# Why it looks like this (see shared/docs/gpu-build.md):
# - CUDA 13.0 comes from PyPI, pinned to 13.0 (nvvm too): PTX from a newer nvcc does not load
#   on the GPU machine's 13.0 driver.
# - dfdx's build script asks `nvidia-smi` for the compute capability: a stand-in answers 9.0
#   (the H100), and CUDA_COMPUTE_CAP=90 makes the choice explicit.
# - cudarc links -lcuda -lcublas -lcublasLt -lnvrtc. The driver is not on PyPI and cuBLAS is a
#   420 MB wheel, so we link against stub libraries with the real sonames; the GPU machine's
#   real libraries load at run time (check.sh puts them on LD_LIBRARY_PATH).
# Not run in CI: it downloads ~250 MB of CUDA packages and does a full release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
CUDA13=${CUDA13:-$repo/.cuda13}
PY=${PYTHON:-python3}
if [ ! -x "$CUDA13/nvidia/cu13/bin/nvcc" ]; then
  echo "== installing CUDA 13.0 (nvcc, nvvm, runtime headers) from PyPI into $CUDA13"
  "$PY" -m pip install -q --target "$CUDA13" "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi
cu=$CUDA13/nvidia/cu13

work=$repo/target/gpu-build
root=$work/cuda-root          # CUDA_ROOT: the toolkit's headers + stub libraries
rm -rf "$work" && mkdir -p "$work/bin" "$root/lib"
ln -s "$cu/include" "$root/include"

cat > "$work/bin/nvidia-smi" <<'SMI'
#!/bin/sh
# Stand-in for dfdx's build script: the GPU machine's H100 is compute capability 9.0.
printf 'compute_cap\n9.0\n'
SMI
chmod +x "$work/bin/nvidia-smi"

# Stub libraries: every `pub fn` cudarc declares for a library, as a symbol that aborts if
# ever called (it never is: the real library wins at run time through its soname).
cudarc=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.9.* 2>/dev/null | sort -V | tail -n 1)
if [ -z "$cudarc" ]; then cargo fetch -q && cudarc=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.9.* | sort -V | tail -n 1); fi
stub() { # stub NAME SONAME SYS_RS...
  local name=$1 soname=$2; shift 2
  local c=$work/$name.c
  echo '#include <stdlib.h>' > "$c"
  grep -ho 'pub fn [A-Za-z0-9_]*' "$@" | awk '{print $3}' | sort -u |
    while read -r f; do echo "void $f(void) { abort(); }" >> "$c"; done
  cc -shared -fPIC -o "$root/lib/$soname" -Wl,-soname,"$soname" "$c"
  ln -sf "$soname" "$root/lib/lib$name.so"
}
stub cuda libcuda.so.1 "$cudarc/src/driver/sys.rs"
stub cublas libcublas.so.13 "$cudarc/src/cublas/sys.rs"
stub cublasLt libcublasLt.so.13 "$cudarc/src/cublaslt/sys.rs"
stub nvrtc libnvrtc.so.13 "$cudarc/src/nvrtc/sys.rs"

# A target directory of its own: the CUDA feature changes dfdx's build, and sharing
# target/release would rebuild everything each time one switches between the two.
tdir=${CARGO_TARGET_DIR:-$repo/target/gpu}
export PATH="$work/bin:$cu/bin:$PATH" CUDA_ROOT="$root" CUDA_COMPUTE_CAP=90 CARGO_TARGET_DIR="$tdir"
echo "== cargo build --release --features cuda (runner + integration tests) into $tdir"
cargo build --release --features cuda --bin runner
cargo test --release --features cuda --test it --no-run 2>&1 | tee "$work/test-build.log"
it_bin=$(grep -o '[^ ]*/release/deps/it-[0-9a-f]*' "$work/test-build.log" | tail -n 1 | sed 's/^(//')

carry=$repo/target/gpu-carry
rm -rf "$carry" && mkdir -p "$carry"
strip -o "$carry/runner" "$tdir/release/runner"
strip -o "$carry/it" "$it_bin"
# What the binaries link against, for the record (check.sh prints the resolution there).
readelf -d "$carry/runner" | grep NEEDED | tee "$carry/NEEDED.txt"
git rev-parse HEAD > "$carry/COMMIT"
du -sh "$carry"
size=$(du -sb "$carry" | cut -f1)
[ "$size" -lt $((64 * 1024 * 1024)) ] || { echo "carry set is $size bytes, over 64 MiB" >&2; exit 1; }
echo "carry: target/gpu-carry ($size bytes). Run there: bash scripts/gpu/check.sh (carry target/gpu-carry)"
