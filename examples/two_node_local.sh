#!/usr/bin/env bash
# Two torchrun agents on one machine, standing in for two nodes of a cluster (CPU, gloo):
#   node 0 = the learner pool: Megatron TP2 (ranks 0-1)
#   node 1 = the rollout pool: one vLLM engine with TP2 in multi-process mode (rank 2 its leader, rank 3 idle; vLLM
#            starts its own two TP worker processes), weights through shared memory, bucket by bucket
# joined by a c10d rendezvous on 127.0.0.1, as `--nnodes 2` agents on two hosts would be. Runs
# tools/check_weight_sync.py through it (sample, recompute log-probs on the learner, compare; one optimizer step;
# again); the last line printed is the tool's last line, and stderr says both agents' exit codes. Exit status: the
# tool's (either node's failure fails it).
#
#   bash examples/two_node_local.sh [HF_DIR]      # default: a tiny tied-embedding LLaMA made on the spot
#
# Which agent becomes node 0 is decided by the rendezvous (on one host: the agent that started first); both run the
# same command, so the pools follow the node ranks whichever it is. On two real hosts, run the same torchrun line on
# each with --rdzv_endpoint=<first host>:<port>.
# When one agent fails, the other is stopped after a grace (a torchrun agent whose peer node failed would wait in its
# exit barrier for minutes): SIGTERM to its whole process group, then SIGKILL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d); [ "${KEEP_LOGS:-0}" = 1 ] && echo "logs: $WORK"
GRACE=${GRACE:-20}
# each agent leads its own process group (setsid): its ranks and vLLM's processes go with it
stop() { kill -TERM -- "-$1" 2>/dev/null || return 0; for _ in $(seq 20); do kill -0 -- "-$1" 2>/dev/null || return 0; sleep 0.5; done; kill -KILL -- "-$1" 2>/dev/null || true; }
trap 'for p in ${A:-} ${B:-}; do stop "$p"; done; [ "${KEEP_LOGS:-0}" = 1 ] || rm -rf "$WORK"' EXIT
HF=${1:-}
if [ -z "$HF" ]; then
  HF="$WORK/tiny"
  "$PY" tools/make_tiny_model.py --out "$HF" --preset tiny-tied > /dev/null 2>&1
fi
# the run's id, in the name of its shared-memory files (megatron_async_rlhf/weights/shm.py); on two hosts, pass one
export MRLHF_RUN_ID=${MRLHF_RUN_ID:-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')}
PORT=${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

agent() {
  exec setsid "$PY" -m torch.distributed.run --nnodes 2 --nproc_per_node 2 \
    --rdzv_backend c10d --rdzv_endpoint "127.0.0.1:$PORT" --rdzv_id two_node_local --max_restarts 0 \
    tools/check_weight_sync.py --hf "$HF" --learner-tp 2 --rollout-tp 2 --multiprocess
}

agent > "$WORK/a.log" 2>&1 &
A=$!
sleep 1  # the first agent hosts the rendezvous store
agent > "$WORK/b.log" 2>&1 &
B=$!
if wait -n -p first "$A" "$B"; then s1=0; else s1=$?; fi
if [ "$first" = "$A" ]; then other=$B; else other=$A; fi
if [ "$s1" -ne 0 ]; then  # the other node cannot finish without this one: a grace to fail on its own, then stop it
  ( sleep "$GRACE"; stop "$other" ) & watchdog=$!
fi
if wait "$other"; then s2=0; else s2=$?; fi
[ -n "${watchdog:-}" ] && { kill "$watchdog" 2>/dev/null || true; }
if [ "$first" = "$A" ]; then sa=$s1; sb=$s2; else sa=$s2; sb=$s1; fi
status=$(( sa > sb ? sa : sb ))
echo "agent exit codes: $sa (first) $sb (second)" >&2

# the controller (global rank 0, on node 0) prints the report: the other node's log tail on failure, then node 0's
if grep -q '^max_abs_logprob_diff=' "$WORK/a.log"; then other=b; node0=a; else other=a; node0=b; fi
if [ "$status" -ne 0 ]; then
  echo "--- agents exited with $sa (first) and $sb (second); the other node's log: ---"
  tail -n 40 "$WORK/$other.log"
  echo "--- node 0 ---"
fi
grep -E '^(v[0-9]+:|train step:|FAIL:|max_abs_logprob_diff=)' "$WORK/$node0.log" || tail -n 40 "$WORK/$node0.log"
exit "$status"
