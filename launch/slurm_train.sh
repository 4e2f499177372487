#!/bin/bash
# Multi-node rgrl training under SLURM: one `accelerate launch` per node (srun, one task per node), each starting
# one process per GPU; the rendezvous comes from SLURM's variables. Requeued jobs (preemption, or the time limit
# coming near) resume from the newest complete checkpoint in OUTPUT_DIR.
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

# --- resume: the newest checkpoint whose trainer_state.json exists (the Trainer writes it last, so a
# checkpoint cut short by preemption has none and is skipped)
latest_checkpoint() {
    local dir step best="" best_step=-1
    for dir in "$1"/checkpoint-*; do
        step=${dir##*-}
        [[ -f $dir/trainer_state.json && $step =~ ^[0-9]+$ ]] || continue
        if ((step > best_step)); then
            best_step=$step
            best=$dir
        fi
    done
    echo "$best"
}

TRAIN_ARGS=("$@" --training.output_dir "$OUTPUT_DIR" --training.ddp_timeout "${DDP_TIMEOUT:-3600}")
RESUME=$(latest_checkpoint "$OUTPUT_DIR")
if [[ -n $RESUME ]]; then
    TRAIN_ARGS+=(--training.resume_from_checkpoint "$RESUME")
fi
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs," \
     "master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR, resume from ${RESUME:-nothing}"

# --- the time limit is near (SIGUSR1, --signal above): requeue; the next start resumes from the last checkpoint
trap 'echo "time limit near: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1

# One task per node; the single-quoted variables (SLURM_NODEID above all) expand on the node, inside the task.
# shellcheck disable=SC2016
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec $RUN_PREFIX accelerate launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NUM_MACHINES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
        -m rgrl.train "$@"' rgrl-node "${TRAIN_ARGS[@]}" &
wait $!
