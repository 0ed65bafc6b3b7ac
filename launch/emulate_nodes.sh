#!/usr/bin/env bash
# Emulate N nodes on one host: start N `accelerate launch` "machines" that rendezvous at 127.0.0.1, as
# N real nodes would at node 0's address. Tests the multi-node path (node ranks, rendezvous, a run
# directory shared by all nodes) without a cluster.
#
#   launch/emulate_nodes.sh [-n NODES] [-p PROCS_PER_NODE] [-P PORT] [-c CONFIG] [-l LOG_DIR] \
#       [-- extra accelerate launch options --] SCRIPT [SCRIPT ARGS...]
#
#   launch/emulate_nodes.sh -n 2 runner/train.py --config digits run.name=two-nodes
#   launch/emulate_nodes.sh -n 2 -p 2 -l /tmp/nodes runner/train.py --config digits run.name=x
#
# Node i runs:
#   accelerate launch --config_file CONFIG --num_machines N --num_processes N*P --machine_rank i \
#       --main_process_ip 127.0.0.1 --main_process_port PORT SCRIPT ARGS...
# Output: prefixed with "[node i]" on stdout, or written to LOG_DIR/node_<i>.log with -l.
# Waits for every node. If one fails, the others are stopped (SIGTERM) instead of waiting in a
# collective for a peer that is gone. Exit status: 0 if every node succeeded, else the first failing
# node's status.
#
# Environment: ACCELERATE (the accelerate executable; default: `accelerate` on PATH),
# MASTER_PORT (the port when -P is not given; default: a free one), HF_HOME is left to the caller
# (set it to an empty directory so that no ~/.cache/huggingface default config is merged in).
set -u

nodes=2
per_node=1
port="${MASTER_PORT:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="$here/multi_node.yaml"
log_dir=""
accelerate="${ACCELERATE:-accelerate}"

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while getopts "n:p:P:c:l:h" opt; do
    case "$opt" in
        n) nodes="$OPTARG" ;;
        p) per_node="$OPTARG" ;;
        P) port="$OPTARG" ;;
        c) config="$OPTARG" ;;
        l) log_dir="$OPTARG" ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

extra=()
if [ "${1:-}" = "--" ]; then
    shift
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do extra+=("$1"); shift; done
    if [ "${1:-}" != "--" ]; then
        echo "emulate_nodes.sh: extra accelerate options must end with --" >&2
        exit 2
    fi
    shift
fi
if [ $# -lt 1 ]; then
    echo "emulate_nodes.sh: no script given" >&2
    usage >&2
    exit 2
fi
case "$nodes$per_node" in
    *[!0-9]*) echo "emulate_nodes.sh: -n and -p take positive integers" >&2; exit 2 ;;
esac
if [ "$nodes" -lt 1 ] || [ "$per_node" -lt 1 ]; then
    echo "emulate_nodes.sh: -n and -p take positive integers" >&2
    exit 2
fi
if [ ! -f "$config" ]; then
    echo "emulate_nodes.sh: accelerate config $config not found" >&2
    exit 2
fi
if [ -z "$port" ]; then
    py="$(command -v python3 || command -v python)"
    port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[ -n "$log_dir" ] && mkdir -p "$log_dir"

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

echo "emulate_nodes.sh: $nodes nodes x $per_node processes, rendezvous at 127.0.0.1:$port" >&2
for ((i = 0; i < nodes; i++)); do
    cmd=("$accelerate" launch --config_file "$config" --num_machines "$nodes"
         --num_processes "$((nodes * per_node))" --machine_rank "$i"
         --main_process_ip 127.0.0.1 --main_process_port "$port" ${extra[@]+"${extra[@]}"} "$@")
    if [ -n "$log_dir" ]; then
        "${cmd[@]}" >"$log_dir/node_$i.log" 2>&1 &
    else
        "${cmd[@]}" > >(sed -u "s/^/[node $i] /") 2>&1 &
    fi
    pids+=("$!")
done

# Poll rather than `wait -n -p` (bash >= 5.1), so that this runs on older cluster shells too.
status=0
remaining=$nodes
declare -A done_pids=()
while [ "$remaining" -gt 0 ]; do
    for i in "${!pids[@]}"; do
        pid="${pids[$i]}"
        [ -n "${done_pids[$pid]:-}" ] && continue
        kill -0 "$pid" 2>/dev/null && continue
        wait "$pid"
        rc=$?
        done_pids[$pid]=1
        remaining=$((remaining - 1))
        if [ "$rc" -ne 0 ]; then
            echo "emulate_nodes.sh: node $i exited with status $rc" >&2
            if [ "$status" -eq 0 ]; then
                status=$rc
                stop_all
            fi
        fi
    done
    [ "$remaining" -gt 0 ] && sleep 0.5
done
wait  # the output filters
exit "$status"
