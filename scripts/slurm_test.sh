#!/usr/bin/env bash
# Sharded runs on a real Slurm, on this machine: installs Debian's slurm-wlm and munge (if
# missing), starts munged, slurmctld and one slurmd on localhost with their own config and
# state in a temporary directory, submits experiments/smoke.toml as a 3-task array
# (experiments/slurm/shards.sbatch) plus the merge that depends on it (merge.sbatch,
# --dependency=afterok), waits, checks that the merged results equal an unsharded run's
# (`runner compare`: counts and text exactly, floats within 1e-12 relative), and stops every
# daemon it started. About a minute on 2 cores once the packages are installed (+45 s).
#
#   scripts/slurm_test.sh            # needs root (apt-get, munged, slurmd)
#
# Environment: RUNNER (default target/debug/runner, built if missing), SLURM_TEST_KEEP=1
# keeps the temporary directory, SLURM_TEST_TIMEOUT (seconds, default 600) bounds the wait.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
say() { echo "[slurm_test $(($(date +%s) - T0))s] $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "slurm_test.sh: run as root (it installs packages and starts munged and slurmd)" >&2
  exit 1
fi

# 1. Packages (Debian's, from the distribution's mirror).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
say "$(slurmctld -V) / $(munged --version 2>&1 | head -n 1)"

# 2. The runner (the debug build the tests use; release works too, via RUNNER).
RUNNER=${RUNNER:-$ROOT/target/debug/runner}
if [ ! -x "$RUNNER" ]; then
  say "building the runner"
  cargo build --quiet --bin runner
fi
RUNNER=$(readlink -f "$RUNNER")
export RUNNER

WORK=$(mktemp -d /tmp/hookgraph-slurm.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  local rc=$?
  # Stop only what this script started, by pid, newest first.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill "${PIDS[$i]}" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  if [ "${SLURM_TEST_KEEP:-0}" = 1 ] || [ $rc != 0 ]; then
    echo "slurm_test: files kept in $WORK (logs: $WORK/log)" >&2
    [ $rc != 0 ] && tail -n 30 "$WORK"/log/*.log 2>/dev/null >&2 || true
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
mkdir -p "$WORK"/{log,munge,spool,state,run,out}

# 3. munge with its own key and socket (not the system's).
chown munge:munge "$WORK/munge" && chmod 700 "$WORK/munge"
mungekey --create --keyfile="$WORK/munge/munge.key" --force
chown munge:munge "$WORK/munge/munge.key" && chmod 400 "$WORK/munge/munge.key"
SOCK=$WORK/munge/munge.socket
runuser -u munge -- munged --foreground --key-file="$WORK/munge/munge.key" --socket="$SOCK" \
  --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" --seed-file="$WORK/munge/seed" --force \
  >"$WORK/log/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "munged did not start" >&2; exit 1; }

# 4. A one-node cluster on localhost: controller and node are this machine.
HOST=$(hostname -s)
CPUS=$(nproc)
PORT=$((17000 + RANDOM % 2000))
cat >"$WORK/slurm.conf" <<CONF
ClusterName=hookgraph-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK
CredType=cred/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool/%n
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$WORK/slurm.conf
slurmctld -D -f "$SLURM_CONF" >"$WORK/log/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" >"$WORK/log/slurmd.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
  sleep 0.2
done
sinfo -h -o '%T' | grep -qE '^(idle|mixed|allocated)' || { echo "the node did not come up: $(sinfo 2>&1)" >&2; exit 1; }
say "slurm up: $(sinfo -h -o '%P %D %T %c')"

# 5. The reference: the same spec, unsharded, outside Slurm.
SPEC=experiments/smoke.toml
"$RUNNER" run "$SPEC" --quiet --output "$WORK/out/whole" >"$WORK/log/whole.log"
say "unsharded run done"

# 6. The array and the dependent merge, exactly as a cluster user submits them.
cd "$WORK/out"
jid=$(sbatch --parsable --array=0-2 "$ROOT/experiments/slurm/shards.sbatch" "$ROOT/$SPEC" --output "$WORK/out/sharded")
say "submitted array job $jid (3 tasks)"
TIMEOUT=${SLURM_TEST_TIMEOUT:-600}
set +e
timeout "$TIMEOUT" sbatch --wait --dependency=afterok:"$jid" "$ROOT/experiments/slurm/merge.sbatch" "$WORK/out/sharded" >"$WORK/log/merge-submit.log" 2>&1
merge_rc=$?
set -e
cd "$ROOT"
for f in "$WORK"/out/slurm-*.out; do cp "$f" "$WORK/log/$(basename "$f" .out).log"; done
if [ $merge_rc != 0 ]; then
  echo "the merge job failed or did not finish in ${TIMEOUT}s (sbatch --wait: $merge_rc)" >&2
  scontrol show job "$jid" >&2 || true
  exit 1
fi
say "array job $jid and its merge finished"
for i in 0 1 2; do
  test -f "$WORK/out/sharded/shards/$i-of-3/shard.json" || { echo "shard $i-of-3 missing" >&2; exit 1; }
done

# 7. Merged == unsharded: `runner compare` matches rows by their key columns (integers and
# text: exact) and allows floats 1e-12 relative, nothing absolute.
"$RUNNER" compare "$WORK/out/sharded" "$WORK/out/whole" --rtol 1e-12 --atol 0
say "ok"
