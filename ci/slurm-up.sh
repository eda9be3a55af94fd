#!/usr/bin/env bash
# Start a throwaway one-node Slurm cluster (Debian 12: Slurm 22.05, munge) for the cluster tests. Run as root.
#
# Idempotent: with the daemons already up (same settings) it only checks them and exits. Every daemon writes a PID
# file under /run; ci/slurm-down.sh stops them by those PIDs only.
#
# Environment:
#   SLURM_CPUS=N   advertise N CPUs on the node (slurmd config_overrides), so that more 1-CPU jobs run at once
#                  than the machine has cores. Default: what `slurmd -C` detects.
#   WITH_ACCT=1    also start MariaDB + slurmdbd, so that sacct works (the snakemake plugin's default status command).
#   SLURM_PARTITION=name   partition name (default: debug).
# After changing SLURM_CPUS or WITH_ACCT, run ci/slurm-down.sh first: running daemons do not reread slurm.conf.
#
# Why things are done this way: see /work/shared/notes/local-slurm.md (no systemd, policy-rc.d forbids service
# starts during install, sacct needs slurmdbd, MinJobAge keeps finished jobs visible to squeue).
set -euo pipefail

WITH_ACCT=${WITH_ACCT:-0}
PARTITION=${SLURM_PARTITION:-debug}
export DEBIAN_FRONTEND=noninteractive
T0=$(date +%s.%N)

if [ "$(id -u)" != 0 ]; then
  echo "slurm-up.sh: must run as root (it installs packages and starts daemons)" >&2
  exit 2
fi

# One run at a time (two concurrent test sessions must not race on slurm.conf). Every daemon below is started
# with fd 9 closed (`9>&-`): a daemon that inherited it would hold the lock for its whole life.
exec 9>/run/slurm-ci.lock
flock 9

is_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

# --- packages (8 without recommends; 22 s and 43 packages with them) -------------------------------------------
PKGS="munge slurm-client slurmctld slurmd"
[ "$WITH_ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
# shellcheck disable=SC2086
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
fi

# --- munge (authentication for every Slurm RPC) ------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || mungekey --create --force
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged 9>&-   # forks; writes /run/munge/munged.pid
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# --- accounting (optional): MariaDB + slurmdbd ---------------------------------------------------------------------
ACCT_CONF="AccountingStorageType=accounting_storage/none"
if [ "$WITH_ACCT" = 1 ]; then
  install -d -o mysql -g mysql /run/mysqld
  if ! mysqladmin ping >/dev/null 2>&1; then
    nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
      --bind-address=127.0.0.1 >/var/log/mariadb-slurmci.log 2>&1 9>&- &
    for _ in $(seq 100); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  mysql -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
  install -d /etc/slurm /var/log/slurm
  cat >/etc/slurm/slurmdbd.conf <<'CONF'
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
  chmod 600 /etc/slurm/slurmdbd.conf
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
fi

# --- slurm.conf ----------------------------------------------------------------------------------------------------
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
NODE=$(slurmd -C | head -1)   # "NodeName=<hostname -s> CPUs=.. Boards=.. ... RealMemory=.."
OVERRIDES=""
if [ -n "${SLURM_CPUS:-}" ]; then
  case "$SLURM_CPUS" in '' | *[!0-9]*) echo "slurm-up.sh: SLURM_CPUS must be a positive integer" >&2; exit 2 ;; esac
  NODE="NodeName=$(hostname -s) CPUs=$SLURM_CPUS $(grep -o 'RealMemory=[0-9]*' <<<"$NODE")"
  OVERRIDES="SlurmdParameters=config_overrides"
fi
CONF_NEW=$(
  cat <<CONF
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
# linuxproc + task/none: no cgroup enforcement, which would also OOM-kill the snakemake process inside small jobs
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
$ACCT_CONF
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# finished jobs stay visible to squeue for 5 min: the plugin's squeue status mode needs >= 3x its poll interval
MinJobAge=300
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
$OVERRIDES
$NODE State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
if ctld_up && [ -f /etc/slurm/slurm.conf ] && [ "$CONF_NEW" != "$(cat /etc/slurm/slurm.conf)" ]; then
  echo "slurm-up.sh: Slurm is up with another slurm.conf; run ci/slurm-down.sh first to change settings" >&2
  exit 3
fi
printf '%s\n' "$CONF_NEW" >/etc/slurm/slurm.conf

# --- daemons -------------------------------------------------------------------------------------------------------
if [ "$WITH_ACCT" = 1 ]; then
  if ! is_alive /run/slurmdbd.pid; then
    slurmdbd 9>&-
    for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  sacctmgr -n show cluster format=cluster | grep -qw localci || sacctmgr -i add cluster localci >/dev/null
fi
ctld_up || slurmctld 9>&-
for _ in $(seq 100); do ctld_up && break; sleep 0.2; done
ctld_up || { echo "slurm-up.sh: slurmctld did not come up; see /var/log/slurm/slurmctld.log" >&2; exit 1; }
is_alive /run/slurmd.pid || slurmd 9>&-
for _ in $(seq 150); do
  case "$(sinfo -h -o %T 2>/dev/null)" in idle | mixed | allocated) break ;; esac
  sleep 0.2
done
sinfo
srun -t 1 hostname >/dev/null 9>&-   # end-to-end smoke test: fails the script if a job cannot run

echo "slurm up in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}") s:" \
  "slurmctld=$(cat /run/slurmctld.pid) slurmd=$(cat /run/slurmd.pid) munged=$(cat /run/munge/munged.pid)" \
  "partition=$PARTITION cpus=$(sinfo -h -o %c)"
if [ "$WITH_ACCT" = 1 ]; then
  echo "accounting: slurmdbd=$(cat /run/slurmdbd.pid) mariadbd=$(cat /run/mysqld/mysqld.pid)"
fi
exit 0
