# shellcheck shell=bash disable=SC2034  # the names below are used by the scripts that source this
# Shared by up.sh and down.sh: where the local cluster lives and which ports it uses.
# Everything is under one folder of the checkout, so `down.sh` can remove it all at once.
# Two checkouts can run side by side if they use different SENET_SLURM_PORT_BASE values (ports do not overlap).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOCAL=${SENET_SLURM_DIR:-$ROOT/.slurm-local}
PORT_BASE=${SENET_SLURM_PORT_BASE:-16817}
NODE_COUNT=${SENET_SLURM_NODES:-4}  # an idle slurmd costs nothing; 4 lets a 2-node job lose a node and go on
case $PORT_BASE in
    ''|*[!0-9]*) echo "SENET_SLURM_PORT_BASE=$PORT_BASE is not a number; use e.g. 16817" >&2; exit 2 ;;
esac
case $NODE_COUNT in
    ''|*[!0-9]*) echo "SENET_SLURM_NODES=$NODE_COUNT is not a number; use e.g. 4" >&2; exit 2 ;;
esac
if (( NODE_COUNT < 1 || NODE_COUNT > 64 )); then
    echo "SENET_SLURM_NODES=$NODE_COUNT is out of range; use 1..64" >&2
    exit 2
fi
# Ports: slurmctld, slurmdbd, mariadbd, then one per node (3 + NODE_COUNT from PORT_BASE).
if (( PORT_BASE < 1024 || PORT_BASE + 2 + NODE_COUNT > 65535 )); then
    echo "SENET_SLURM_PORT_BASE=$PORT_BASE is out of range; use 1024..$((65535 - 2 - NODE_COUNT)) (it needs $((3 + NODE_COUNT)) ports)" >&2
    exit 2
fi

CTLD_PORT=$PORT_BASE           # slurmctld
DBD_PORT=$((PORT_BASE + 1))    # slurmdbd
DB_PORT=$((PORT_BASE + 2))     # mariadbd
CLUSTER=senet$PORT_BASE        # accounting keys its tables by cluster name
NODES=()
for ((i = 1; i <= NODE_COUNT; i++)); do
    NODES+=("node$i")
done
# node_port N: the port of `slurmd -N nodeN`.
node_port() { echo $((PORT_BASE + 2 + $1)); }
# Slurm's host list of every node: node1 or node[1-4].
if (( NODE_COUNT == 1 )); then NODE_RANGE=node1; else NODE_RANGE="node[1-$NODE_COUNT]"; fi

RUN=$LOCAL/run  # pid files
LOG=$LOCAL/log
SLURM_CONF_FILE=$LOCAL/etc/slurm.conf
# Present only while a munged started by up.sh runs; shared, so the last checkout to go down stops it.
MUNGE_MARK=/run/munge/started-by-senet

# running PID [NAME]: the process exists, is not a zombie (PID 1 here reaps orphans only now and
# then, and `kill -0` succeeds on a zombie) and, given NAME, is that program (pids get reused).
running() {
    local stat comm
    read -r stat comm < <(ps -o stat=,comm= -p "$1" 2>/dev/null) || return 1
    [[ $stat != Z* && ( -z ${2:-} || $comm == "$2" ) ]]
}

# pid_alive FILE: the pid in FILE names a running process of the program the file is named after
# (slurmd-node1.pid: slurmd).
pid_alive() {
    local pid name
    name=$(basename "$1" .pid)
    [[ -s $1 ]] && pid=$(<"$1") && [[ $pid =~ ^[0-9]+$ ]] && running "$pid" "${name%%-*}"
}

# stop_pids SECONDS PID...: SIGTERM them all, wait for all to exit, SIGKILL what is left after SECONDS.
stop_pids() {
    local timeout=$1 pid deadline
    shift
    for pid in "$@"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + timeout))
    for pid in "$@"; do
        while running "$pid"; do
            if (( SECONDS >= deadline )); then
                echo "slurm: pid $pid ignored SIGTERM for ${timeout}s; sending SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
}
