#!/usr/bin/env bash
# Stop the cluster started by .ci/slurm/start.sh (same MIPNERF_SLURM_BASE): cancel its jobs,
# then stop slurmd, slurmctld and munged by the PIDs in their pid files (never by name).
#   --keep-munge   leave munged running (used by start.sh when the config changed)
#   --purge        also delete MIPNERF_SLURM_BASE and the /etc/slurm/slurm.conf symlink
set -uo pipefail

BASE="${MIPNERF_SLURM_BASE:-/tmp/mipnerf360-slurm}"
export SLURM_CONF="$BASE/etc/slurm.conf"
export PATH="$PATH:/usr/sbin:/sbin"
keep_munge=0; purge=0
for a in "$@"; do
  case "$a" in
    --keep-munge) keep_munge=1 ;;
    --purge) purge=1 ;;
    *) echo "[slurm/stop] unknown option '$a' (use --keep-munge, --purge)" >&2; exit 2 ;;
  esac
done
say() { echo "[slurm/stop] $*" >&2; }
up() { local s; s="$(ps -o stat= -p "$1" 2>/dev/null)" && [ -n "$s" ] && [[ "$s" != Z* ]]; }
up_pidfile() { [ -s "$1" ] && up "$(cat "$1")"; }

stop_pid() {  # stop_pid NAME PIDFILE
  local pf=$2 pid
  [ -s "$pf" ] || return 0
  pid="$(cat "$pf")"
  if up "$pid"; then
    say "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do up "$pid" || break; sleep 0.1; done
    if up "$pid"; then say "$1 ignored SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
  fi
  rm -f "$pf"
}

if [ -f "$SLURM_CONF" ] && up_pidfile "$BASE/run/slurmctld.pid"; then
  jobs="$(squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null | tr '\n' ' ')"
  if [ -n "${jobs// }" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 100); do
      [ -z "$(squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
    # job processes slurmd still knows about, by pid
    for j in $(squeue -h -t R,CG -o %i 2>/dev/null); do
      for p in $(scontrol listpids "$j" 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}'); do
        kill -KILL "$p" 2>/dev/null
      done
    done
  fi
fi

stop_pid slurmd "$BASE/run/slurmd.pid"
stop_pid slurmctld "$BASE/run/slurmctld.pid"
[ "$keep_munge" = 1 ] || stop_pid munged "$BASE/munge/run.pid"

if [ "$purge" = 1 ]; then
  if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$SLURM_CONF" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
  say "removing $BASE"
  rm -rf "$BASE"
fi
exit 0
