#!/usr/bin/env bash
# Stop the local cluster that up.sh started and wipe .slurm-local/: Slurm state and the accounting
# database go together, so the next `up` starts again at JobID 1 with nothing drained or queued.
# Safe to run when nothing is up. munged is stopped only if up.sh started it and no other cluster uses it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STOP_TIMEOUT=30  # seconds per daemon; slurmctld saves its state first

log() { echo "slurm-down: $*"; }

# stop NAME PIDFILE: SIGTERM the pid in PIDFILE and wait for it to exit (SIGKILL after STOP_TIMEOUT).
stop() {
    local name=$1 file=$2 pid deadline
    pid_alive "$file" || return 0
    pid=$(<"$file")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid"
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if (( SECONDS >= deadline )); then
            log "WARNING: $name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
}

# Job steps outlive slurmd; ours carry our SLURM_CONF in their environment (inherited from slurmd).
stop_orphan_steps() {
    local pid
    for pid in $(pgrep -x slurmstepd || true); do
        tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF_FILE" || continue
        log "stopping leftover slurmstepd (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
    done
}

cancel_jobs() {
    pid_alive "$RUN/slurmctld.pid" || return 0
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null) || return 0
    [[ -n $jobs ]] || return 0
    log "cancelling jobs $(echo $jobs)"
    scancel $jobs 2>/dev/null || true
    local deadline=$((SECONDS + 15))  # KillWait=5 plus epilog time
    while [[ -n $(squeue -h -t running,completing -o %A 2>/dev/null) ]] && (( SECONDS < deadline )); do
        sleep 0.2
    done
}

# Other checkouts' clusters share the system munged.
other_slurm_daemons() { pgrep -x 'slurmctld|slurmd|slurmdbd' >/dev/null; }

main() {
    (( EUID == 0 )) || { echo "slurm-down: run as root" >&2; exit 1; }
    export SLURM_CONF=$SLURM_CONF_FILE
    [[ -d $LOCAL ]] || { log "nothing to stop ($LOCAL does not exist)"; return 0; }
    cancel_jobs
    local n
    for n in "${NODES[@]}"; do
        stop "slurmd -N $n" "$RUN/slurmd-$n.pid"
    done
    stop_orphan_steps
    stop slurmctld "$RUN/slurmctld.pid"
    stop slurmdbd "$RUN/slurmdbd.pid"
    stop mariadbd "$RUN/mariadbd.pid"
    if [[ -e $MUNGE_MARK ]]; then
        if other_slurm_daemons; then
            log "leaving munged running: another Slurm cluster on this machine uses it"
        else
            stop munged /run/munge/munged.pid
        fi
    fi
    rm -rf "$LOCAL"
    log "stopped; removed $LOCAL"
}

main
