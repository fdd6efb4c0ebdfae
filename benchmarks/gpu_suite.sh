#!/usr/bin/env bash
# The GPU suite: the whole pipeline on CUDA on a small shapes world (prepare, features, bf16
# training, a 1-process DDP run under torchrun, beam-3 evaluation, the server answering one image)
# and every benchmark in benchmarks/ with short settings. One JSON line per step on stdout (the
# last one, "suite", has every step's wall time); progress and logs elsewhere. About 8 minutes at
# most on one GPU; docs/performance.md, "GPU suite", says what each line holds.
#
#   bash benchmarks/gpu_suite.sh              # CUDA; stops at the first step without a GPU
#   bash benchmarks/gpu_suite.sh --cpu        # the same steps on CPU, tiny sizes (tests/test_gpu_suite.py)
#   bash benchmarks/gpu_suite.sh --out DIR    # everything in DIR, kept (default: a temporary folder,
#                                             # removed after a run that passed)
#   bash benchmarks/gpu_suite.sh --no-scores  # no java there: `attncap caption` (beam 3) instead of
#                                             # `attncap evaluate` and its official scores
#
# Python is the repository's .venv (`make install`), or $PYTHON with attncap's dependencies (the
# first step checks them). Nothing is written in the repository. A failing step stops the suite:
# its name and the end of its log on stderr, exit status 1.
set -euo pipefail
export LC_ALL=C  # a decimal point in $EPOCHREALTIME

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
STEP="$ROOT/benchmarks/suite_step.py"
DEVICE=cuda OUT="" KEEP=0 SCORES=1
while (($#)); do
  case $1 in
    --cpu) DEVICE=cpu ;;
    --no-scores) SCORES=0 ;;
    --out) OUT=${2:?--out needs a folder}; KEEP=1; shift ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument '$1' (--cpu, --out DIR, --no-scores)" >&2; exit 2 ;;
  esac
  shift
done
PY=$(command -v "$PY") || { echo "gpu_suite: no Python at $PY: run 'make install' first, or set PYTHON" >&2; exit 1; }

# -- what depends on the device: sizes, workers, settings of each benchmark -------------------
if [[ $DEVICE == cpu ]]; then
  export CUDA_VISIBLE_DEVICES=""  # no step may reach for a GPU, the benchmarks' servers included
  IMAGES=(48 12 12)               # train, val, test images of the shapes world
  SETTINGS=(data.shapes_image_size=128 encoder.batch_size=16 encoder.workers=0
            model.embed_dim=32 model.proj_dim=32 model.attention_dim=32 model.hidden_dim=48 model.fc_dim=32
            train.epochs=2 train.batch_size=16 train.warmup_steps=2 decode.max_len=12 decode.eval_batch_size=16)
  PEAK=(--size 512 --repeats 3)
  TRAIN_BENCH=(--batch 8 --vocab 200 --regions 16 --feature-dim 64 --lengths fixed:8 --steps 2 --warmup 1)
  DECODE_BENCH=(--images 8 --batch 4 --vocab 200 --regions 16 --feature-dim 64 --max-len 5 --repeats 1)
  FEATURE_BENCH=(--limit 16 --batch-size 8 --workers 0)
  LOAD_BENCH=(--clients 2 --seconds 1)
  STEP_LIMIT=180 BUDGET=90
else
  IMAGES=(2000 200 200)
  SETTINGS=(encoder.batch_size=64 encoder.workers=8 train.epochs=3 train.batch_size=64
            train.warmup_steps=20 decode.max_len=20 decode.eval_batch_size=100)  # the seed's network
  PEAK=()
  TRAIN_BENCH=(--batch 64 --vocab 5001 --lengths fixed:12 --steps 20 --warmup 5)
  DECODE_BENCH=(--images 128 --batch 64 --repeats 2)
  FEATURE_BENCH=(--limit 256 --batch-size 64 --workers 8)
  LOAD_BENCH=(--clients 8 --seconds 5)
  STEP_LIMIT=300 BUDGET=480
fi
SETTINGS+=(data.train_images=${IMAGES[0]} data.val_images=${IMAGES[1]} data.test_images=${IMAGES[2]})
SETS=()
for kv in "${SETTINGS[@]}"; do SETS+=(--set "$kv"); done

# -- the work folder, the server, and what happens on exit --------------------------------------
if [[ -n $OUT ]]; then
  mkdir -p "$OUT"
  WORK=$(cd "$OUT" && pwd)
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
fi
LOGS=$WORK/logs RUN=$WORK/run RUN_DDP=$WORK/run_ddp
mkdir -p "$LOGS" "$WORK/tmp" "$WORK/mpl"
export TMPDIR=$WORK/tmp MPLCONFIGDIR=$WORK/mpl PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}  # this checkout's attncap, installed or not
SERVER_PID="" PASSED=0 LAST=""

stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
on_exit() {
  stop_server
  if ((PASSED && !KEEP)); then rm -rf "$WORK"; else echo "gpu_suite: everything is in $WORK" >&2; fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {  # fail STEP WHY LOG
  echo "gpu_suite: step '$1' failed: $2" >&2
  [[ -f $3 ]] && { echo "--- end of $3" >&2; tail -n 40 "$3" >&2; }
  exit 1
}

STEP_TIMES=() STARTED=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

# step NAME CMD...: run CMD with the step limit; its stdout (the JSON line) goes to ours, its
# stderr to LOGS/NAME.log; a non-zero exit or a missing JSON line fails the suite.
step() {
  local name=$1 t0=$EPOCHREALTIME rc=0 line
  shift
  echo "gpu_suite: $name" >&2
  line=$(timeout -k 10 "$STEP_LIMIT" "$@" 2>"$LOGS/$name.log") || rc=$?
  ((rc != 124 && rc != 137)) || fail "$name" "timed out after $STEP_LIMIT s" "$LOGS/$name.log"
  ((rc == 0)) || fail "$name" "exit status $rc" "$LOGS/$name.log"
  [[ $line == "{"* ]] || fail "$name" "no JSON line on stdout (got '${line:0:200}')" "$LOGS/$name.log"
  printf '%s\n' "$line"
  LAST=$line
  STEP_TIMES+=("\"$name\": $(since "$t0")")
}
cli() { local name=$1; shift; step "$name" "$PY" "$STEP" "$name" cli "$@"; }
bench() { local name=$1; shift; step "$name" "$PY" "$STEP" "$name" script -- "$ROOT/benchmarks/$name.py" "$@"; }

serve() {  # attncap serve on a free local port, one image posted and checked, then SIGTERM
  local t0=$EPOCHREALTIME images=("$RUN"/dataset/images/*) rc=0
  "$PY" -m attncap.cli serve "$RUN" --host 127.0.0.1 --port 0 --device "$DEVICE" --quiet \
    >"$LOGS/server.log" 2>&1 &
  SERVER_PID=$!
  echo "gpu_suite: server pid $SERVER_PID" >&2
  step serve "$PY" "$STEP" serve post --server-log "$LOGS/server.log" --pid "$SERVER_PID" \
    --image "${images[0]}" --started "$t0"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || rc=$?
  SERVER_PID=""
  # uvicorn re-raises the signal after its graceful shutdown: 143 (128 + SIGTERM) is a clean stop
  ((rc == 0 || rc == 143)) || fail serve "the server exited with status $rc after SIGTERM" "$LOGS/server.log"
}

# -- the pipeline --------------------------------------------------------------------------------
cd "$WORK"  # relative paths of any stage land here, not in the repository
TOTAL_IMAGES=$((IMAGES[0] + IMAGES[1] + IMAGES[2]))
step env "$PY" "$STEP" env --device "$DEVICE" $( ((SCORES)) || echo --no-scores)
cli prepare --items "$TOTAL_IMAGES" -- prepare --run "$RUN" --quiet "${SETS[@]}"
cli features --items "$TOTAL_IMAGES" -- features --run "$RUN" --quiet "${SETS[@]}"
cp -r "$RUN" "$RUN_DDP"  # the DDP run starts from the same features
cli train -- train --run "$RUN" --quiet "${SETS[@]}" --set train.precision=bf16
# torchrun as docs/distributed.md and tests/test_distributed.py run it, one process. attncap joins a
# process group (NCCL on CUDA, gloo on CPU) only for 2 or more, so the line's backend reads
# "no process group": this checks the launch, the environment and rank-0 output, not the collectives.
step train_ddp env GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo \
  "$PY" -m torch.distributed.run --nnodes=1 --nproc-per-node=1 --rdzv-backend=c10d \
  --rdzv-endpoint=127.0.0.1:0 --local-addr=127.0.0.1 "$STEP" train_ddp cli -- \
  train --run "$RUN_DDP" --quiet "${SETS[@]}" --set train.epochs=1 --set train.precision=auto
if ((SCORES)); then
  cli evaluate --items "${IMAGES[2]}" -- evaluate --run "$RUN" --quiet --beam 3 --samples 2 "${SETS[@]}"
else  # the same beam search, from the image files, with no scores (they need java)
  cli caption --items "$TOTAL_IMAGES" -- caption "$RUN/dataset/images" --run "$RUN" --beam 3 --quiet \
    --out "$WORK/captions.json"
fi
serve

# -- every benchmark -----------------------------------------------------------------------------
bench peak --device "$DEVICE" "${PEAK[@]}"
FP32_PEAK=$(sed -n 's/.*"fp32_gflops_per_s": \([0-9.]*\).*/\1/p' <<<"$LAST")
bench train_throughput --device "$DEVICE" "${TRAIN_BENCH[@]}"
bench decode_throughput --device "$DEVICE" --peak "$FP32_PEAK" "${DECODE_BENCH[@]}"  # shares of that peak
bench feature_throughput --images "$RUN/dataset/images" --skip-parts "${FEATURE_BENCH[@]}"
bench load_test --run "$RUN" "${LOAD_BENCH[@]}"

TOTAL=$(since "$STARTED")
WITHIN=$(awk -v t="$TOTAL" -v b="$BUDGET" 'BEGIN { print (t <= b) ? "true" : "false" }')
printf '{"step": "suite", "device": "%s", "seconds": %s, "budget_s": %s, "within_budget": %s, "steps": %d, "step_seconds": {%s}}\n' \
  "$DEVICE" "$TOTAL" "$BUDGET" "$WITHIN" "${#STEP_TIMES[@]}" "$(IFS=,; echo "${STEP_TIMES[*]}")"
PASSED=1
