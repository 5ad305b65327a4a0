#!/usr/bin/env bash
# A throwaway two-node Slurm cluster on this host, for tests (Debian's Slurm 22.05, run as root).
#
#   tests/slurm/cluster.sh up DIR     # slurmctld + slurmd n1 (port 17001) + slurmd n2 (17002), waits for idle
#   tests/slurm/cluster.sh down DIR   # cancels jobs, stops every daemon it started
#
# Then `export SLURM_CONF=DIR/slurm.conf` and use sbatch/srun/squeue as usual. Both nodes have
# NodeAddr 127.0.0.1; their names (n1, n2) are not host names, as on clusters whose node names
# differ from their addresses. Install: apt-get install slurmctld slurmd slurm-client munge.
set -euo pipefail

cmd=${1:?usage: cluster.sh up|down DIR}
dir=$(realpath -m "${2:?usage: cluster.sh up|down DIR}")
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

up() {
  for bin in slurmctld slurmd sbatch sinfo; do
    command -v "$bin" >/dev/null || { echo "error: $bin not found; apt-get install slurmctld slurmd slurm-client" >&2; exit 2; }
  done
  mkdir -p "$dir/state" "$dir/spool/n1" "$dir/spool/n2" "$dir/log"
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  cat > "$conf" <<EOF
ClusterName=gptosstest
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire seconds before it starts again (default 120): 10 here
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
InactiveLimit=0
KillWait=5
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  : > "$dir/pids"
  slurmctld -D -f "$conf" > "$dir/log/slurmctld.out" 2>&1 &
  echo $! >> "$dir/pids"
  for node in n1 n2; do
    slurmd -D -N "$node" -f "$conf" > "$dir/log/slurmd.$node.out" 2>&1 &
    echo $! >> "$dir/pids"
  done
  for _ in $(seq 120); do
    states=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ')
    if [ "$states" = "idle " ]; then
      echo "slurm up: 2 nodes idle (SLURM_CONF=$conf)"
      return 0
    fi
    sleep 0.5
  done
  echo "error: the nodes did not become idle (states: ${states:-none}); logs in $dir/log" >&2
  down
  exit 1
}

down() {
  [ -f "$conf" ] || return 0
  scancel --full --quiet --user=root 2>/dev/null || true
  scontrol shutdown 2>/dev/null || true
  [ -f "$dir/pids" ] || return 0
  local pids
  pids=$(cat "$dir/pids")
  for _ in $(seq 20); do
    alive=""
    for p in $pids; do
      if kill -0 "$p" 2>/dev/null && [ "$(ps -o stat= -p "$p" | cut -c1)" != "Z" ]; then alive="$alive $p"; fi
    done
    [ -z "$alive" ] && break
    kill -TERM $alive 2>/dev/null || true
    sleep 0.5
  done
  for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
  rm -f "$dir/pids"
  echo "slurm down"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "error: unknown command $cmd; use up or down" >&2; exit 2 ;;
esac
