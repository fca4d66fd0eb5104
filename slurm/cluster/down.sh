#!/usr/bin/env bash
# Stop the local cluster that up.sh started and wipe .slurm-local/: Slurm state and the accounting
# database go together, so the next `up` starts again at JobID 1 with nothing drained or queued.
# Safe to run when nothing is up. munged is stopped only if an up.sh started it and no other cluster uses it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STOP_TIMEOUT=30  # seconds; slurmctld saves its state first

log() { echo "slurm-down: $*"; }

# stop PIDFILE...: stop those daemons together: each takes 1-3 s to exit, and the state is wiped anyway.
stop() {
    local file pid pids=()
    for file in "$@"; do
        pid_alive "$file" || continue
        pid=$(<"$file")
        log "stopping $(basename "$file" .pid) (pid $pid)"
        pids+=("$pid")
    done
    stop_pids "$STOP_TIMEOUT" "${pids[@]}"
}

# descendants PID...: the processes below them, read before anything is signalled (orphans move to pid 1).
descendants() {
    ps -eo pid=,ppid= | awk -v roots="$*" '
        { parent[$1] = $2 }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) mine[r[i]] = 1
            do { added = 0; for (p in parent) if (!(p in mine) && (parent[p] in mine)) { mine[p] = 1; added = 1 } } while (added)
            for (i = 1; i <= n; i++) delete mine[r[i]]
            for (p in mine) print p
        }'
}

# Job steps outlive slurmd; ours carry our SLURM_CONF in their environment (inherited from slurmd).
# They are left only when scancel could not run (slurmctld dead), and then neither they nor their
# tasks reliably end on SIGTERM (srun ignores the first one): hence the short timeout before SIGKILL.
stop_orphan_steps() {
    local pid steps=()
    for pid in $(pgrep -x slurmstepd || true); do
        tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF_FILE" || continue
        steps+=("$pid")
    done
    (( ${#steps[@]} )) || return 0
    local tasks
    mapfile -t tasks < <(descendants "${steps[@]}")
    log "stopping leftover job steps (pids ${steps[*]}) and their tasks (pids ${tasks[*]})"
    stop_pids 5 "${steps[@]}" "${tasks[@]}"
}

cancel_jobs() {
    pid_alive "$RUN/slurmctld.pid" || return 0
    local jobs
    mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
    (( ${#jobs[@]} )) || return 0
    log "cancelling jobs ${jobs[*]}"
    scancel "${jobs[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + 15))  # KillWait=5 plus epilog time
    while [[ -n $(squeue -h -t running,completing -o %A 2>/dev/null) ]] && (( SECONDS < deadline )); do
        sleep 0.2
    done
}

# Other checkouts' clusters share the system munged.
# Zombies do not count: ours linger a moment until pid 1 reaps them.
other_slurm_daemons() {
    ps -eo stat=,comm= | awk '$1 !~ /^Z/ && ($2 == "slurmctld" || $2 == "slurmd" || $2 == "slurmdbd") { found = 1 }
                              END { exit !found }'
}

main() {
    (( EUID == 0 )) || { echo "slurm-down: run as root" >&2; exit 1; }
    export SLURM_CONF=$SLURM_CONF_FILE
    [[ -d $LOCAL ]] || { log "nothing to stop ($LOCAL does not exist)"; return 0; }
    exec 9<"$LOCAL"
    flock -w 60 9 || log "WARNING: $LOCAL is still locked by a slurm-up after 60 s; stopping anyway"
    cancel_jobs
    stop "$RUN"/slurmd-*.pid "$RUN"/slurmctld.pid "$RUN"/slurmdbd.pid "$RUN"/mariadbd.pid
    stop_orphan_steps
    if [[ -e $MUNGE_MARK ]]; then
        if other_slurm_daemons; then
            log "leaving munged running: another Slurm cluster on this machine uses it"
        else
            stop /run/munge/munged.pid
            rm -f "$MUNGE_MARK"
        fi
    fi
    rm -rf "$LOCAL"
    log "stopped; removed $LOCAL"
}

main
