#!/bin/bash
# One rank of a job step started by `srun`, one task per rank: set torch.distributed's variables from Slurm's,
# then run the command in place of this shell.
#
#   srun --kill-on-bad-exit=1 launch/slurm_task.sh python runner/train.py --config digits
#
# Sets RANK (SLURM_PROCID), WORLD_SIZE (tasks in the step), LOCAL_RANK (SLURM_LOCALID), LOCAL_WORLD_SIZE (tasks
# on this node), NODE_RANK (SLURM_NODEID), MASTER_ADDR (the step's first node, where rank 0 runs) and
# MASTER_PORT (10000 + job id % 20000: the same after a requeue, different for jobs sharing a node).
# RUNNER_MASTER_ADDR / RUNNER_MASTER_PORT override the last two (e.g. a node name that does not resolve).
set -eu

if [[ -z ${SLURM_PROCID:-} || -z ${SLURM_JOB_ID:-} ]]; then
    echo "launch/slurm_task.sh: run this under srun (SLURM_PROCID is not set)" >&2
    exit 2
fi

# Tasks on node number $2 from a Slurm task count list such as "2(x3),1".
tasks_on_node() {
    local index=$2 part count repeat
    local -a parts
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        count=${part%%(*}
        repeat=1
        if [[ $part == *"(x"* ]]; then
            repeat=${part#*(x}
            repeat=${repeat%)}
        fi
        if (( index < repeat )); then
            echo "$count"
            return
        fi
        index=$(( index - repeat ))
    done
    echo 1
}

export RANK=$SLURM_PROCID
export WORLD_SIZE=${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-1}}
export LOCAL_RANK=${SLURM_LOCALID:-0}
export NODE_RANK=${SLURM_NODEID:-0}
export LOCAL_WORLD_SIZE
LOCAL_WORLD_SIZE=$(tasks_on_node "${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}" "$NODE_RANK")
if [[ -n ${RUNNER_MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$RUNNER_MASTER_ADDR
else
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n1)
fi
export MASTER_ADDR
export MASTER_PORT=${RUNNER_MASTER_PORT:-$(( 10000 + SLURM_JOB_ID % 20000 ))}

# Slurm signals every process of the step. Until the runner installs its own handler (it checkpoints on USR1),
# an early preemption warning is ignored rather than killing this rank; the handler replaces this.
trap '' USR1
exec "$@"
