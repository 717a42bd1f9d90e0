#!/usr/bin/env bash
# A two-node Slurm cluster on this host, for tests and for trying launch/slurm/*.sbatch by hand.
#
#   scripts/slurm_cluster.sh start     # slurmctld + slurmd node1 + slurmd node2, then waits until idle
#   eval "$(scripts/slurm_cluster.sh env)"   # SLURM_CONF for sbatch/squeue/scontrol in this shell
#   scripts/slurm_cluster.sh status
#   scripts/slurm_cluster.sh stop
#
# Needs Debian's slurm-wlm (apt-get install -y slurm-wlm), util-linux's unshare and root (slurmd runs
# jobs as the submitting user). No munge: auth/none + cred/none, which is only acceptable on a test
# host. CPUs are the schedulable resource. State, configs and logs live in $ARRA_DS_SLURM_DIR
# (default /var/tmp/arra_ds_slurm).
#
# Each slurmd runs in its own mount namespace with its own /dev/shm (a tmpfs), so jobs on node1 and
# node2 do not share shared memory, as separate machines would not: the local leaders of one job on two
# "nodes" pick the same StreamingDataset shm prefix at the same moment, which on one shared /dev/shm
# fails with FileExistsError. /tmp stays shared, so a checkout or virtualenv under /tmp (a CI clone)
# is visible to the jobs; Slurm 22.05's job_container/tmpfs would hide it.
set -euo pipefail

STATE=${ARRA_DS_SLURM_DIR:-/var/tmp/arra_ds_slurm}
CONF_DIR=$STATE/etc
SLURM_CONF_FILE=$CONF_DIR/slurm.conf
NODES=(node1 node2)
CTLD_PORT=${ARRA_DS_SLURM_PORT:-16817}
CPUS=${ARRA_DS_SLURM_CPUS:-$(nproc)}

write_config() {
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/log"
    local node_lines="" i=0
    for node in "${NODES[@]}"; do
        i=$((i + 1))
        mkdir -p "$STATE/spool/$node"
        node_lines+="NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$((CTLD_PORT + 10 + i)) CPUs=$CPUS State=UNKNOWN"$'\n'
    done
    cat > "$SLURM_CONF_FILE" <<CONF
ClusterName=arra_ds_test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
${node_lines}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
CONF
}

running() {  # pid file -> true while that process lives
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {
    command -v slurmctld >/dev/null || { echo "slurmctld not found: apt-get install -y slurm-wlm" >&2; exit 1; }
    [[ $(id -u) == 0 ]] || { echo "starting slurmd needs root (a private /dev/shm per node; slurmd switches to the job's user)" >&2; exit 1; }
    write_config
    export SLURM_CONF=$SLURM_CONF_FILE
    # -c: forget jobs of an earlier session.
    running "$STATE/slurmctld.pid" || slurmctld -c -f "$SLURM_CONF_FILE"
    for node in "${NODES[@]}"; do
        running "$STATE/slurmd.$node.pid" || unshare --mount --propagation private sh -c \
            'mount -t tmpfs -o mode=1777 "arra_ds_shm_$1" /dev/shm && exec slurmd -f "$2" -N "$1"' \
            _ "$node" "$SLURM_CONF_FILE"
    done
    for _ in $(seq 60); do
        if [[ $(sinfo -h -o '%t' 2>/dev/null | sort -u | tr '\n' ' ') == "idle " ]]; then
            echo "slurm test cluster up: ${NODES[*]} (SLURM_CONF=$SLURM_CONF_FILE)"
            return 0
        fi
        scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "slurm test cluster did not become idle; sinfo:" >&2
    sinfo -N -l >&2 || true
    tail -n 20 "$STATE"/log/*.log >&2 || true
    exit 1
}

stop() {
    export SLURM_CONF=$SLURM_CONF_FILE
    [[ -f $SLURM_CONF_FILE ]] && scancel --full --quiet --partition=debug 2>/dev/null || true
    local pidfile
    for pidfile in "$STATE"/slurmd.*.pid "$STATE/slurmctld.pid"; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in $(seq 30); do running "$pidfile" || break; sleep 0.5; done
        fi
        rm -f "$pidfile"
    done
    echo "slurm test cluster stopped"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$SLURM_CONF_FILE" ;;
    status) export SLURM_CONF=$SLURM_CONF_FILE; sinfo -N -l; squeue ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
