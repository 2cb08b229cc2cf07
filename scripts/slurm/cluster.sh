#!/usr/bin/env bash
# A real one-machine Slurm cluster for tests (Debian's slurm-wlm and munge): slurmctld and two
# slurmd daemons on this machine (Debian builds Slurm with multiple-slurmd) as nodes titan-node1
# and titan-node2, so SLURM_JOB_NODELIST holds two hosts ("titan-node[1-2]"), from which titan takes
# rank 0's address. The names must resolve here: when they do not, start adds them to /etc/hosts
# as 127.0.0.1 (or skips where it cannot). proctrack/linuxproc, no task plugin, no cgroups: it runs
# in a container. Everything else lives in DIR.
#
#   scripts/slurm/cluster.sh start DIR   # writes DIR/slurm.conf, starts the daemons, waits for idle nodes;
#                                        # prints SLURM_CONF=DIR/slurm.conf (export it for srun/sbatch)
#   scripts/slurm/cluster.sh stop DIR    # cancels the jobs and stops the daemons started in DIR
# Exit status 77 (ctest's skip code) when Slurm or munge is not installed or the cluster cannot start.
set -euo pipefail

action=${1:?usage: cluster.sh start|stop DIR}
dir=${2:?usage: cluster.sh start|stop DIR}
skip() { echo "slurm cluster: $*" >&2; exit 77; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop() {
  [[ -f "$dir/slurm.conf" ]] || return 0
  export SLURM_CONF="$dir/slurm.conf"
  scancel --full --quiet --partition=debug 2>/dev/null || true
  for pid_file in "$dir"/run/*.pid; do
    [[ -f $pid_file ]] && kill "$(cat "$pid_file")" 2>/dev/null || true
  done
  sleep 1
}

start() {
  for tool in slurmctld slurmd srun sbatch scancel sinfo munged; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || skip "$tool is not installed (Debian: slurm-wlm, munge)"
  done
  export PATH="/usr/sbin:$PATH"
  stop
  mkdir -p "$dir"/{state,spool,log,run}
  local host ctld_port port1 port2
  host=$(hostname)
  getent hosts "$host" >/dev/null || skip "this host's name '$host' does not resolve"
  if ! getent hosts titan-node1 >/dev/null || ! getent hosts titan-node2 >/dev/null; then
    { [[ -w /etc/hosts ]] && echo "127.0.0.1 titan-node1 titan-node2" >> /etc/hosts; } ||
      skip "the node names titan-node1 and titan-node2 do not resolve and /etc/hosts is not writable"
  fi
  ctld_port=$(free_port) port1=$(free_port) port2=$(free_port)
  cat > "$dir/slurm.conf" <<CONF
ClusterName=titantest
SlurmctldHost=$host
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
SlurmctldPort=$ctld_port
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=10
NodeName=titan-node1 NodeHostname=$host Port=$port1 CPUs=2 State=UNKNOWN
NodeName=titan-node2 NodeHostname=$host Port=$port2 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=titan-node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  export SLURM_CONF="$dir/slurm.conf"
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -f /etc/munge/munge.key ]] || mungekey -c >/dev/null 2>&1 || skip "cannot create /etc/munge/munge.key"
    mkdir -p /run/munge
    munged --force >/dev/null 2>&1 || skip "munged does not start"
    munge -n | unmunge >/dev/null 2>&1 || skip "munge does not authenticate"
  fi
  slurmctld -i >/dev/null 2>&1 || skip "slurmctld does not start (see $dir/log/slurmctld.log)"
  sleep 1
  slurmd -N titan-node1 >/dev/null 2>&1 || skip "slurmd does not start (see $dir/log/slurmd.titan-node1.log)"
  slurmd -N titan-node2 >/dev/null 2>&1 || skip "a second slurmd does not start (multiple-slurmd)"
  for _ in $(seq 60); do
    [[ $(sinfo -h -t idle -o %D 2>/dev/null) == 2 ]] && { echo "SLURM_CONF=$dir/slurm.conf"; return 0; }
    sleep 0.5
  done
  skip "the nodes did not become idle: $(sinfo 2>&1 | tr '\n' ' ')"
}

case $action in
  start) start ;;
  stop) stop ;;
  *) echo "usage: cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
