#!/usr/bin/env bash
# Stop what ci/slurm-up.sh started, by PID file only (never pkill/killall). Safe to run when nothing is up.
#   RESET=1  also wipe the Slurm state (job ids restart at 1) and the logs.
# Order: slurmctld and slurmd first (`scontrol shutdown` needs munge), then slurmdbd, MariaDB, and munged last.
set -u
T0=$(date +%s.%N)

if [ "$(id -u)" != 0 ]; then
  echo "slurm-down.sh: must run as root" >&2
  exit 2
fi

# wait up to 10 s for a PID to exit, then SIGKILL it
wait_gone() {
  for _ in $(seq 100); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null
  return 0
}

# SIGTERM the process named by a PID file (if alive), wait for it, and remove the stale file
stop_pidfile() {
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1" 2>/dev/null)
  case "$pid" in '' | *[!0-9]*) rm -f "$1"; return 0 ;; esac
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    wait_gone "$pid"
  fi
  rm -f "$1"
}

CTLD=$(cat /run/slurmctld.pid 2>/dev/null || true)
SLURMD=$(cat /run/slurmd.pid 2>/dev/null || true)
if command -v scontrol >/dev/null 2>&1; then
  scontrol shutdown >/dev/null 2>&1 || true   # asks slurmctld and every slurmd to exit
fi
[ -n "$CTLD" ] && wait_gone "$CTLD"
[ -n "$SLURMD" ] && wait_gone "$SLURMD"
stop_pidfile /run/slurmctld.pid   # in case the shutdown RPC failed
stop_pidfile /run/slurmd.pid
stop_pidfile /run/slurmdbd.pid
stop_pidfile /run/mysqld/mysqld.pid
stop_pidfile /run/munge/munged.pid

if [ "${RESET:-0}" = 1 ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*
fi
echo "slurm down in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}") s"
