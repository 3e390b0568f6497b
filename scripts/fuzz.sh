#!/usr/bin/env bash
# Bounded fuzzing of the readers of untrusted input (property tests in tests/it/fuzz.rs):
# the spec parser, the checkpoint loader (config.json + model.safetensors), the token-file
# reader, the output directory's readers (manifest marker, checkpoint header, lock file) and the
# shard state (checkpoint file, shard.json, the metrics' saved states), each for FUZZ_SECONDS
# (default 45) in rounds of PROPTEST_CASES (default 256) random cases.
# Exits non-zero on the first failure, printing the minimal failing input; add it as a
# `regression_*` test at the end of tests/it/fuzz.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-45}"
export PROPTEST_CASES="${PROPTEST_CASES:-256}"
export HOOKGRAPH_FUZZ_SECONDS="$seconds"

cargo test --quiet --test it --no-run
for target in "fuzz_spec_" "fuzz_config_ fuzz_safetensors_" "fuzz_token_" "fuzz_outdir_" "fuzz_shard_"; do
  echo "== fuzz: ${target} (${seconds}s, ${PROPTEST_CASES} cases per round)"
  # shellcheck disable=SC2086  # several filters on purpose
  cargo test --quiet --test it -- $target --nocapture --test-threads=4
done
echo "== fuzz: nothing found"
