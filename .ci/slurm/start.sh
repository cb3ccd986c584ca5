#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster on this machine, for CI and tests.
#
# Installs SLURM + munge from Debian's packages when they are missing (needs root), writes a
# one-node configuration with one fake GPU (a GRES backed by /dev/null, so `gpu=1` requests
# are scheduled without a device), starts munged, slurmctld and slurmd by hand (no systemd)
# and waits until the node accepts jobs. Idempotent: daemons already running are kept unless
# the configuration changed. Stop everything with .ci/slurm/stop.sh (same MIPNERF_SLURM_BASE).
#
# Settings (environment, all optional):
#   MIPNERF_SLURM_BASE   folder for config, state, logs, pid files  [/tmp/mipnerf360-slurm]
#   MIPNERF_SLURM_PART   partition name                             [debug]
#   MIPNERF_SLURM_GPUS   fake GPUs declared on the node (0 = none)  [1]
#   MIPNERF_SLURM_CPUS   CPUs declared for the node                 [detected by slurmd -C]
#   MIPNERF_SLURM_MEM    memory (MB) declared for the node          [detected by slurmd -C]
#   MIPNERF_SLURM_WAIT   seconds to wait for the node to be usable  [60]
#
# Facts this script relies on (see ../shared/tools/slurm/README.md, found by hand):
#   * no usable cgroups in containers -> proctrack/linuxproc + task/none;
#   * munged wants its socket folder 0755 and its key folder 0700;
#   * without DefMemPerCPU a job without --mem takes the whole node (jobs serialize);
#   * the snakemake slurm-jobstep plugin strips SLURM_CONF before the nested `srun`, so the
#     config must also be reachable at /etc/slurm/slurm.conf (a symlink is made there);
#   * no slurmdbd here, so `sacct` does not work: use `--slurm-status-command squeue` and keep
#     finished jobs visible to squeue (MinJobAge);
#   * PID 1 in some containers never reaps exited daemons: a zombie counts as stopped.
#
# Last line of stdout: `export SLURM_CONF=...` (so `eval "$(start.sh | tail -1)"` works).
set -euo pipefail

BASE="${MIPNERF_SLURM_BASE:-/tmp/mipnerf360-slurm}"
PART="${MIPNERF_SLURM_PART:-debug}"
GPUS="${MIPNERF_SLURM_GPUS:-1}"
WAIT="${MIPNERF_SLURM_WAIT:-60}"
HERE="$(cd "$(dirname "$0")" && pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "[slurm/start] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
# a pid is "up" when the process exists and is not a zombie
up() { local s; s="$(ps -o stat= -p "$1" 2>/dev/null)" && [ -n "$s" ] && [[ "$s" != Z* ]]; }
up_pidfile() { [ -s "$1" ] && up "$(cat "$1")"; }

# ------------------------------------------------------------------------------ packages
need=(munged mungekey munge unmunge slurmctld slurmd slurmstepd sbatch srun squeue sinfo \
      scontrol scancel)
missing=()
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "SLURM is not installed (missing: ${missing[*]}) and installing needs root"
  command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is not available"
  say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # stop the packages' maintainer scripts from starting system services
  policy=/usr/sbin/policy-rc.d; own_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; own_policy=1; fi
  apt-get update -qq || say "apt-get update failed; trying the install anyway"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || { [ "$own_policy" = 0 ] || rm -f "$policy"; die "apt-get install of SLURM failed"; }
  [ "$own_policy" = 0 ] || rm -f "$policy"
fi

# ------------------------------------------------------------------------------ folders
M="$BASE/munge"
mkdir -p "$BASE"/{etc,log,run,ctld,slurmd} "$M"/{key,sock,lib}
chmod 755 "$BASE" "$M" "$M/sock"
chmod 700 "$M/key" "$M/lib"
SOCK="$M/sock/munge.socket.2"
CONF="$BASE/etc/slurm.conf"
export SLURM_CONF="$CONF"

# ------------------------------------------------------------------------------ config
NODE="$(hostname -s)"
HW="$(slurmd -C | head -1)"   # "NodeName=x CPUs=2 ... RealMemory=24105"
hw() { tr ' ' '\n' <<<"$HW" | sed -n "s/^$1=//p"; }
CPUS="${MIPNERF_SLURM_CPUS:-$(hw CPUs)}"
MEM="${MIPNERF_SLURM_MEM:-$(hw RealMemory)}"
gres_types=""; gres_node=""
if [ "$GPUS" -gt 0 ]; then gres_types="GresTypes=gpu"; gres_node="Gres=gpu:$GPUS"; fi

tmpconf="$(mktemp)"; tmpgres="$(mktemp)"
cat >"$tmpconf" <<CONF
# written by .ci/slurm/start.sh (mipnerf360 CI); do not edit
ClusterName=mipnerfci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${SOCK}
StateSaveLocation=${BASE}/ctld
SlurmdSpoolDir=${BASE}/slurmd
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# no slurmdbd: finished jobs must stay visible to squeue long enough for snakemake
MinJobAge=600
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=300
InactiveLimit=0
KillWait=10
# requeued jobs may start again at once
JobRequeue=1
${gres_types}
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} ${gres_node} State=UNKNOWN
PartitionName=${PART} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
if [ "$GPUS" -eq 1 ]; then
  echo "NodeName=${NODE} Name=gpu File=/dev/null" >"$tmpgres"    # indexed: CUDA_VISIBLE_DEVICES=0
elif [ "$GPUS" -gt 1 ]; then
  echo "NodeName=${NODE} Name=gpu Count=${GPUS}" >"$tmpgres"
fi
changed=0
cmp -s "$tmpconf" "$CONF" || changed=1
cmp -s "$tmpgres" "$BASE/etc/gres.conf" || changed=1
mv "$tmpconf" "$CONF"; mv "$tmpgres" "$BASE/etc/gres.conf"
chmod 644 "$CONF" "$BASE/etc/gres.conf"

# the jobstep plugin's nested srun only finds the default path
mkdir -p /etc/slurm
if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
  ln -sfn "$CONF" /etc/slurm/slurm.conf
else
  say "WARNING: /etc/slurm/slurm.conf is a real file; srun inside jobs will read it, not $CONF"
fi

if [ "$changed" = 1 ] && { up_pidfile "$BASE/run/slurmctld.pid" || up_pidfile "$BASE/run/slurmd.pid"; }; then
  say "configuration changed: restarting slurmctld and slurmd"
  "$HERE/stop.sh" --keep-munge
fi

# ------------------------------------------------------------------------------ munge
if ! up_pidfile "$M/run.pid"; then
  [ -s "$M/key/munge.key" ] || mungekey --create --keyfile="$M/key/munge.key"
  chmod 600 "$M/key/munge.key"
  rm -f "$SOCK" "$SOCK.lock"
  say "starting munged"
  munged --socket="$SOCK" --key-file="$M/key/munge.key" --pid-file="$M/run.pid" \
         --log-file="$M/lib/munged.log" --seed-file="$M/lib/munged.seed"
fi
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
munge -n -S "$SOCK" | unmunge -S "$SOCK" >/dev/null || die "munge does not work, see $M/lib/munged.log"

# ------------------------------------------------------------------------------ slurm
if ! up_pidfile "$BASE/run/slurmctld.pid"; then
  say "starting slurmctld"
  slurmctld -i -f "$CONF"
fi
for _ in $(seq 100); do
  scontrol ping 2>/dev/null | grep -q UP && break
  up_pidfile "$BASE/run/slurmctld.pid" || break
  sleep 0.2
done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld is not up, see $BASE/log/slurmctld.log"

if ! up_pidfile "$BASE/run/slurmd.pid"; then
  say "starting slurmd"
  slurmd -f "$CONF" -N "$NODE"
fi

state=""
for _ in $(seq $((WAIT * 4))); do
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)"
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.25
done
case "$state" in
  idle|mixed|allocated|completing) say "node $NODE is $state (partition $PART, $CPUS CPUs, $MEM MB, $GPUS GPU)" ;;
  *) scontrol show node "$NODE" >&2 || true
     die "node $NODE is not usable (state '$state'); logs in $BASE/log" ;;
esac
echo "export SLURM_CONF=$CONF"
