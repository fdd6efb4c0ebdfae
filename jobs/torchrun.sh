#!/usr/bin/env bash
# One node's torchrun, its rendezvous derived from SLURM's environment. Run it once per node:
#
#   srun --ntasks-per-node=1 bash jobs/torchrun.sh train --run DIR [attncap train options]
#
# The arguments are an attncap command line. The rendezvous host is the job's first node; the
# port is MASTER_PORT, else 20000 + job id mod 20000 (a requeued job keeps its id, so its port).
# Processes per node: NPROC_PER_NODE, else SLURM_GPUS_ON_NODE, else 1.
set -euo pipefail
: "${SLURM_JOB_NODELIST:?not inside a SLURM job step: start this with srun, or see docs/distributed.md for plain torchrun}"

nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes%%$'\n'*}
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

# `--` keeps torchrun's own parser from reading attncap's --run as an abbreviation of --run-path.
exec torchrun \
    --nnodes="$SLURM_NNODES" --nproc-per-node="$nproc" --node-rank="$SLURM_NODEID" \
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:$port" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts=0 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    -m attncap.cli -- "$@"
