#!/usr/bin/env bash
# Start a real Slurm 22.05 cluster on this machine: munge, MariaDB + slurmdbd, slurmctld and four
# slurmd "nodes" (node1..node4; 16 pretended CPUs and 8 fake GPUs each), all under .slurm-local/.
# Idempotent: whatever already runs is kept (a node whose slurmd was killed is started again);
# returns once every node answers, or fails with log tails.
# Then `source .slurm-local/env` to use sinfo, sbatch, sacct... Stop and wipe it with down.sh.
# Needs root (daemons, apt-get, /etc/hosts). Why each setting is what it is: the comments below and in slurm.conf.in.
# Environment: SENET_SLURM_NODES (default 4), SENET_SLURM_PORT_BASE (default 16817; 3 + nodes ports from
# there, see common.sh), SENET_SLURM_DIR (default .slurm-local), SENET_SLURM_TIMEOUT (60 s),
# SENET_SLURM_GRACE_TIME (10 s).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# eatmydata turns fsync into a no-op for MariaDB: the database is wiped with the cluster anyway, and its
# ~1000 fsyncs while creating tables took 1.5-4 s of a 3-9 s start on this disk (0.5 s without).
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server eatmydata)
READY_TIMEOUT=${SENET_SLURM_TIMEOUT:-60}   # seconds for each daemon and for the nodes
GRACE_TIME=${SENET_SLURM_GRACE_TIME:-10}   # seconds a preempted job has to checkpoint
for setting in "SENET_SLURM_TIMEOUT=$READY_TIMEOUT" "SENET_SLURM_GRACE_TIME=$GRACE_TIME"; do
    [[ ${setting#*=} =~ ^[0-9]+$ ]] || { echo "slurm-up: $setting is not a whole number of seconds" >&2; exit 2; }
done
DB_SOCKET=$RUN/mariadb.sock
DATADIR=$LOCAL/mariadb

log() { echo "slurm-up: $*"; }

# fail MESSAGE: a daemon did not come up; print MESSAGE and the end of each daemon's log, exit 1.
fail() {
    echo "slurm-up: ERROR: $*" >&2
    local f
    for f in "$LOG"/*.log "$LOG"/*.out; do  # *.out: what a daemon printed before its log was open
        [[ -s $f && $f != */mariadb-install.log ]] || continue
        echo "---- last lines of $f" >&2
        tail -n 10 "$f" >&2
    done
    echo "slurm-up: fix the cause, then 'make slurm-down && make slurm-up' starts from scratch" >&2
    exit 1
}

# refuse MESSAGE: nothing is wrong with the daemons, the request is; exit 1.
refuse() {
    echo "slurm-up: ERROR: $*" >&2
    exit 1
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.2 s until it succeeds.
wait_for() {
    local seconds=$1 what=$2 out deadline=$((SECONDS + $1))
    shift 2
    until out=$("$@" 2>&1); do
        (( SECONDS < deadline )) || fail "$what did not happen within $seconds s; '$*' said: $out"
        sleep 0.2
    done
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    (( ${#missing[@]} )) || return 0
    log "installing ${missing[*]}"
    # No init system here: keep the packages' own services from starting (the Docker convention).
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >"$LOCAL/apt.log" 2>&1 || rc=$?
    (( ours )) && rm -f "$policy"
    (( rc == 0 )) || { tail -n 20 "$LOCAL/apt.log" >&2; refuse "apt-get install ${missing[*]} failed (exit $rc; log: $LOCAL/apt.log)"; }
}

# Node names must resolve: submitit uses the first one as MASTER_ADDR (gloo hangs 60 s otherwise).
add_hosts() {
    local n
    for n in "${NODES[@]}"; do
        awk -v n="$n" '$1 == "127.0.0.1" { for (i = 2; i <= NF; i++) if ($i == n) found = 1 }
                       END { exit !found }' /etc/hosts && continue
        log "adding '127.0.0.1 $n' to /etc/hosts"
        echo "127.0.0.1 $n" >>/etc/hosts
    done
}

munge_works() { { munge -n </dev/null | unmunge; } >/dev/null 2>&1; }

# One munged serves every checkout on the machine; start it only if none answers.
start_munge() {
    munge_works && return 0
    log "starting munged"
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null
    # As root with the default paths munged refuses to run ("insecure logfile").
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged 9<&- </dev/null >>"$LOG/munged.out" 2>&1
    touch "$MUNGE_MARK"
    wait_for "$READY_TIMEOUT" "munged answering" munge_works
}

# node_lines: one NodeName line per node, each slurmd on its own port.
node_lines() {
    local i
    for ((i = 1; i <= NODE_COUNT; i++)); do
        echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(node_port "$i") CPUs=16 Boards=1" \
             "SocketsPerBoard=1 CoresPerSocket=16 ThreadsPerCore=1 RealMemory=16000 Gres=gpu:8 State=UNKNOWN"
    done
}

# render TEMPLATE OUT: replace @NAME@ with $NAME for each name used below, and the line @NODE_LINES@
# with one line per node.
render() {
    local name args=()
    for name in CLUSTER CTLD_HOST CTLD_PORT DBD_PORT DB_PORT DB_PASS LOCAL GRACE_TIME NODE_COUNT NODE_RANGE; do
        args+=(-e "s|@$name@|${!name}|g")
    done
    sed "${args[@]}" "$(dirname "${BASH_SOURCE[0]}")/$1" |
        awk -v nodes="$(node_lines)" '$0 == "@NODE_LINES@" { print nodes; next } { print }' >"$2"
}

any_daemon_alive() {
    local f
    for f in "$RUN"/slurmctld.pid "$RUN"/slurmd-*.pid "$RUN"/slurmdbd.pid "$RUN"/mariadbd.pid; do
        pid_alive "$f" && return 0
    done
    return 1
}

# Write the configs. Running daemons keep the config they started with, so a changed one needs a restart.
write_configs() {
    local recorded
    if [[ -s $LOCAL/port_base ]] && recorded=$(<"$LOCAL/port_base") && [[ $recorded != "$PORT_BASE" ]]; then
        refuse "$LOCAL was made with SENET_SLURM_PORT_BASE=$recorded, not $PORT_BASE; run 'make slurm-down' first or use $recorded"
    fi
    echo "$PORT_BASE" >"$LOCAL/port_base"
    [[ -s $LOCAL/etc/db.pass ]] || (umask 077 && od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"$LOCAL/etc/db.pass")
    DB_PASS=$(<"$LOCAL/etc/db.pass")
    # shellcheck disable=SC2034  # read by render() as ${!name}
    CTLD_HOST=$(hostname -s)  # slurmctld checks that SlurmctldHost names this host
    local new=$LOCAL/etc/new changed=0 f
    mkdir -p "$new"
    render slurm.conf.in "$new/slurm.conf"
    render gres.conf.in "$new/gres.conf"
    (umask 077 && render slurmdbd.conf.in "$new/slurmdbd.conf")
    for f in slurm.conf gres.conf slurmdbd.conf; do
        cmp -s "$new/$f" "$LOCAL/etc/$f" || changed=1
    done
    if (( changed )) && any_daemon_alive; then
        rm -rf "$new"
        refuse "the cluster runs with an older config; run 'make slurm-down && make slurm-up' to apply the new one"
    fi
    mv -f "$new"/* "$LOCAL/etc/" && rmdir "$new"
    chmod 600 "$LOCAL/etc/slurmdbd.conf"  # slurmdbd refuses a config others can read
    chown root:root "$LOCAL/etc/slurmdbd.conf"  # ... or one not owned by SlurmUser

    local i
    for i in 0 1 2 3 4 5 6 7; do
        ln -sfn /dev/null "$LOCAL/dev/nvidia$i"  # fake GPUs: gres needs a file per device
    done
    cat >"$LOCAL/env" <<EOF
# Source this to use the local cluster: sinfo, sbatch, squeue, sacct, scontrol.
export SLURM_CONF="$SLURM_CONF_FILE"
export SENET_SLURM_CLUSTER="$CLUSTER"
export SENET_SLURM_PORT_BASE="$PORT_BASE"
EOF
}

db() { mariadb --no-defaults --socket="$DB_SOCKET" -u root "$@"; }

start_mariadb() {
    pid_alive "$RUN/mariadbd.pid" && return 0
    if [[ ! -d $DATADIR/mysql ]]; then
        log "creating the accounting database in $DATADIR"
        eatmydata mariadb-install-db --no-defaults --user=root --datadir="$DATADIR" --skip-test-db \
            --skip-name-resolve >"$LOG/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    # Small buffers and no binlog: a few test jobs, started and wiped often.
    setsid eatmydata mariadbd --no-defaults --user=root --datadir="$DATADIR" --socket="$DB_SOCKET" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/mariadbd.pid" \
        --log-error="$LOG/mariadbd.log" --skip-name-resolve --skip-log-bin \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-flush-log-at-trx-commit=0 \
        9<&- </dev/null >>"$LOG/mariadbd.log" 2>&1 &
    wait_for "$READY_TIMEOUT" "mariadbd answering on $DB_SOCKET" \
        mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping
    db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
           CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || fail "could not create the slurm database user"
}

start_slurmdbd() {
    pid_alive "$RUN/slurmdbd.pid" && return 0
    log "starting slurmdbd on port $DBD_PORT"
    slurmdbd 9<&- </dev/null >>"$LOG/slurmdbd.out" 2>&1 || fail "slurmdbd did not start"
    wait_for "$READY_TIMEOUT" "slurmdbd answering" sacctmgr -n list cluster
    # slurmctld registers with accounting only if its cluster exists there.
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr could not add cluster $CLUSTER"
    fi
}

start_slurmctld() {
    pid_alive "$RUN/slurmctld.pid" && return 0
    log "starting slurmctld on port $CTLD_PORT"
    slurmctld 9<&- </dev/null >>"$LOG/slurmctld.out" 2>&1 || fail "slurmctld did not start"
    wait_for "$READY_TIMEOUT" "slurmctld answering (scontrol ping)" scontrol ping
}

# Debian's slurmd supports several per host; `-N name` picks the node (a bare slurmd becomes node1).
start_slurmd() {
    local node=$1
    pid_alive "$RUN/slurmd-$node.pid" && return 0
    log "starting slurmd -N $node"
    mkdir -p "$LOCAL/spool/$node"
    slurmd -N "$node" 9<&- </dev/null >>"$LOG/slurmd-$node.out" 2>&1 || fail "slurmd -N $node did not start"
}

# Every node answers and takes jobs. sinfo -N lists a node once per partition, hence sort -u.
nodes_ready() {
    local states
    states=$(sinfo -N -h -o '%N %t' 2>/dev/null | sort -u) || return 1
    local n
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc|comp)$" <<<"$states" || return 1
    done
}

wait_for_nodes() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    until nodes_ready; do
        if (( SECONDS >= deadline )); then
            sinfo -N -o '%N %P %t %E' >&2 || true
            fail "nodes not ready within $READY_TIMEOUT s"
        fi
        sleep 0.2
    done
}

any_daemon_missing() {
    local f
    for f in mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}"; do
        pid_alive "$RUN/$f.pid" || return 0
    done
    return 1
}

main() {
    (( EUID == 0 )) || refuse "run as root: it starts daemons and edits /etc/hosts"
    export SLURM_CONF=$SLURM_CONF_FILE
    local start=$SECONDS
    mkdir -p "$LOCAL"/{etc,state,spool,dev} "$RUN" "$LOG"
    # A second `up` at the same time waits, then finds the cluster up. Daemons must not inherit fd 9.
    exec 9<"$LOCAL"
    flock -w 120 9 || refuse "another slurm-up has held $LOCAL for 2 minutes"
    add_hosts
    write_configs  # fails if the running cluster has another config
    if munge_works && ! any_daemon_missing && nodes_ready; then
        log "already up (cluster $CLUSTER); source $LOCAL/env"
        return 0
    fi
    install_packages
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    local n
    for n in "${NODES[@]}"; do
        start_slurmd "$n"
    done
    wait_for_nodes
    log "up in $((SECONDS - start))s: cluster $CLUSTER, nodes ${NODES[*]}, partitions debug (default, requeued" \
        "on preemption), cancel (cancelled on preemption) and urgent (preempts both)"
    log "source $LOCAL/env to use it"
}

main
