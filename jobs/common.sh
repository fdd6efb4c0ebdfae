# Sourced by jobs/*.sbatch: environment, run directory, and requeue on preemption or time-out.
#
# Variables (export them before sbatch, or `sbatch --export=ALL,NAME=value ...`):
#   ATTNCAP_HOME  the attncap checkout (default: the directory sbatch was called from)
#   ATTNCAP_VENV  a virtual environment with attncap installed (default: ATTNCAP_HOME/.venv,
#                 made with `make install` when it has no attncap yet)
#   RUN           the run directory (default: runs/$SLURM_JOB_NAME)
#
# SLURM signals the batch shell 120 s before the time limit (#SBATCH --signal=B:USR1@120) and
# sends SIGTERM on preemption. The trap passes SIGTERM on to the running stage: `attncap train`
# writes a checkpoint at the next step boundary and exits with status 75 (under srun + torchrun,
# srun and torchrun forward it to every process); other stages simply stop (features resume from
# their .partial store). The job is then requeued under the same id and every stage resumes.

set -euo pipefail

ATTNCAP_HOME=${ATTNCAP_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ATTNCAP_HOME"
if [ -z "${ATTNCAP_VENV:-}" ]; then
    ATTNCAP_VENV=$ATTNCAP_HOME/.venv
    if [ ! -x "$ATTNCAP_VENV/bin/attncap" ]; then
        make install
    fi
fi
if [ ! -x "$ATTNCAP_VENV/bin/attncap" ]; then
    echo "error: no attncap in ATTNCAP_VENV=$ATTNCAP_VENV; run 'make install' in the checkout" \
         "or point ATTNCAP_VENV at a virtual environment with attncap installed" >&2
    exit 2
fi
export PATH="$ATTNCAP_VENV/bin:$PATH"
export RUN=${RUN:-runs/${SLURM_JOB_NAME:-attncap}}
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}  # progress bars: about one line a minute in the log
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun no longer inherits --cpus-per-task
fi
echo "$(date '+%F %T') job ${SLURM_JOB_ID:-} (${SLURM_JOB_NAME:-}) on ${SLURM_JOB_NODELIST:-$(hostname)}," \
     "start ${SLURM_RESTART_COUNT:-0}: run $RUN"

_attncap_step=""
_attncap_signal=""

_attncap_on_signal() {
    _attncap_signal=$1
    echo "$(date '+%F %T') got SIG$1: the running step checkpoints and stops, then the job is requeued"
    if [ -n "$_attncap_step" ]; then
        kill -TERM "$_attncap_step" 2>/dev/null || true
    fi
}
trap '_attncap_on_signal USR1' USR1
trap '_attncap_on_signal TERM' TERM

_attncap_requeue() {
    echo "$(date '+%F %T') requeueing job $SLURM_JOB_ID; it resumes from $RUN"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

# step COMMAND...: run one stage and return its status; requeue instead when a signal came or the
# stage exited with 75 (stopped after a checkpoint). The stage runs in the background because bash
# runs a trap only once the foreground command has finished, which would be too late.
step() {
    if [ -n "$_attncap_signal" ]; then
        _attncap_requeue
    fi
    "$@" &
    _attncap_step=$!
    local status=0
    while :; do
        wait "$_attncap_step" && status=0 || status=$?
        kill -0 "$_attncap_step" 2>/dev/null || break  # still running: the wait ended for the trap
    done
    _attncap_step=""
    if [ -n "$_attncap_signal" ] || [ "$status" -eq 75 ]; then
        _attncap_requeue
    fi
    return "$status"
}
