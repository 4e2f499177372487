#!/bin/bash
# Multi-node rgrl training under SLURM: one `accelerate launch` per node (srun, one task per node), each starting
# one process per GPU; the rendezvous comes from SLURM's variables. Requeued jobs (preemption, or the time limit
# coming near) resume from the newest complete checkpoint in OUTPUT_DIR. Ten minutes before the time limit the
# script asks the training processes to checkpoint (SIGUSR1), waits for them, and requeues the job; on preemption
# SLURM sends SIGTERM, which makes them checkpoint at the end of the current step too.
#
#   sbatch --nodes=4 launch/slurm_train.sh recipes/wildchat_dream.yaml [--section.key value ...]
#
# Submit from the repository root (or a copy of it on shared storage). Environment knobs (all optional):
#   OUTPUT_DIR          checkpoints, adapter, metrics; must be on storage every node sees.
#                       Default: $SLURM_SUBMIT_DIR/outputs/<job name>-<job id> (stable across requeues; set it
#                       explicitly to continue the checkpoints of an earlier job)
#   ACCELERATE_CONFIG   default launch/multinode_zero2.yaml (launch/multinode_zero3.yaml for ZeRO-3)
#   GPUS_PER_NODE       default $SLURM_GPUS_ON_NODE, else 8
#   MASTER_PORT         default 29500 + (job id mod 1000), so jobs sharing a node do not collide
#   DDP_TIMEOUT         seconds a collective may wait (default 3600: a slow guided rollout on one rank must not
#                       time out the others), passed as --training.ddp_timeout
#   RUN_PREFIX          a command to run `accelerate` in, e.g. "apptainer exec --nv --bind /shared rgrl.sif"
#   SHUTDOWN_TIMEOUT    seconds the launcher gives its processes to finish the current step, checkpoint and exit
#                       after SIGTERM/SIGUSR1 before killing them (default 540, within the 600 s warning)
#SBATCH --job-name=rgrl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: sbatch [--nodes=N] launch/slurm_train.sh RECIPE.yaml [--section.key value ...]" >&2
    exit 2
fi
cd "${SLURM_SUBMIT_DIR:-$PWD}"

# --- rendezvous: node 0 of the allocation is the master; every node learns its rank from SLURM_NODEID
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # (no `| head`: SIGPIPE under pipefail)
export MASTER_ADDR=${NODES[0]}
export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export NUM_MACHINES=$SLURM_NNODES
export NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/multinode_zero2.yaml}
export RUN_PREFIX=${RUN_PREFIX:-}
OUTPUT_DIR=${OUTPUT_DIR:-$PWD/outputs/$SLURM_JOB_NAME-$SLURM_JOB_ID}

# --- communication: fail loudly instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed or timed-out collective aborts the job (then SLURM requeues)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}      # INFO to see the interfaces and rings NCCL picked
# export NCCL_SOCKET_IFNAME=ib0            # the inter-node interface, if NCCL picks a wrong one (e.g. docker0)
# export NCCL_IB_DISABLE=1                 # only on clusters without working InfiniBand
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_TELEMETRY=1
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # compute nodes read the shared HF cache (download on a login node first)

# --- signals: the launcher (torchrun inside accelerate) forwards SIGUSR1 too, and waits for the processes to save
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-540}

# --- resume: the newest checkpoint with rgrl's completion marker (written after every other file of the
# checkpoint, on every process, so a checkpoint cut short has none and is skipped; rgrl.train then also checks the
# sizes of its files). None: `last`, which lets rgrl.train start fresh in an output folder without a checkpoint.
latest_checkpoint() {
    local dir step best="" best_step=-1
    for dir in "$1"/checkpoint-*; do
        step=${dir##*-}
        [[ -f $dir/rgrl_checkpoint.json && $step =~ ^[0-9]+$ ]] || continue
        if ((step > best_step)); then
            best_step=$step
            best=$dir
        fi
    done
    echo "$best"
}

RESUME=$(latest_checkpoint "$OUTPUT_DIR")
TRAIN_ARGS=("$@" --training.output_dir "$OUTPUT_DIR" --training.ddp_timeout "${DDP_TIMEOUT:-3600}"
            --training.resume_from_checkpoint "${RESUME:-last}")
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs," \
     "master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR, resume from ${RESUME:-nothing}"

# --- the time limit is near (SIGUSR1 to this shell, --signal above): srun forwards SIGUSR1 to the launchers, the
# launchers to the training processes, which checkpoint at the end of the current step and exit; then requeue, and
# the next start resumes from that checkpoint
on_time_limit() {
    echo "time limit near: asking the training processes to checkpoint, then requeueing job $SLURM_JOB_ID"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
    wait "$SRUN_PID" || true
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap on_time_limit USR1

# One task per node; the single-quoted variables (SLURM_NODEID above all) expand on the node, inside the task.
# shellcheck disable=SC2016
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec $RUN_PREFIX accelerate launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NUM_MACHINES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
        -m rgrl.train "$@"' rgrl-node "${TRAIN_ARGS[@]}" &
SRUN_PID=$!
wait "$SRUN_PID"
