#!/usr/bin/env bash
# Install and start the services the test suite runs against, on a Debian machine (CI or a dev box):
#   - a one-node SLURM on localhost (Debian's slurm-wlm: slurmctld + slurmd, authenticated by munge),
#     for the sweep launcher's SLURM executor (tests/test_sweep_slurm.py);
#   - chromium, for the headless-browser check of the sweep report.
# Idempotent: packages are installed only if missing, daemons started only if not running (or restarted
# when the generated slurm.conf changed). No systemd needed: the daemons are started directly, which is
# what a container offers. Needs root (or sudo). Usage: tools/setup_ci_services.sh  [WAIT_S (default 60)]
set -euo pipefail

WAIT_S="${1:-60}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup_ci_services: must run as root (or with sudo available) to install and start slurm/munge" >&2
    exit 2
  fi
fi
log() { echo "setup_ci_services: $*"; }
die() { echo "setup_ci_services: ERROR: $*" >&2; exit 1; }
t0=$(date +%s)

# ---------------------------------------------------------------- packages (only the missing ones)
missing=()
command -v munged >/dev/null 2>&1 || missing+=(munge)
{ command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null 2>&1 || missing+=(slurm-wlm)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  APT=($SUDO apt-get -o DPkg::Lock::Timeout=600 -y -q)
  "${APT[@]}" update >/dev/null
  "${APT[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
else
  log "munge, slurm-wlm and chromium already installed"
fi

# ---------------------------------------------------------------- slurm.conf for this one machine
HOST="$(hostname -s)"
CPUS="$(nproc)"
# RealMemory (MiB) must not exceed what slurmd measures, or the node is drained: leave 5% headroom.
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
$SUDO mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge
conf=$(mktemp)
cat >"$conf" <<EOF
# Written by pymetric tools/setup_ci_services.sh: a one-node SLURM on localhost for tests.
ClusterName=pymetric
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Containers give no cgroup control: track job processes through /proc, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEM_MB / CPUS))
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (defaults: 60 s main loop, 30 s backfill): tests wait less.
SchedulerParameters=sched_interval=2,bf_interval=2
# Requeue (our time-limit signal trap, and MAX_RETRY of failing sweep tasks) needs JobRequeue.
JobRequeue=1
ReturnToService=2
# A requeued job may start again only after the credential lifetime (default 120 s): keep tests fast.
AuthInfo=cred_expire=5
KillWait=5
MinJobAge=600
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=ci Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
if ! $SUDO cmp -s "$conf" "$CONF_DIR/slurm.conf"; then
  $SUDO install -m 644 "$conf" "$CONF_DIR/slurm.conf"
  changed=1
  log "wrote $CONF_DIR/slurm.conf (node $HOST, $CPUS CPUs, ${MEM_MB} MiB)"
fi
rm -f "$conf"

# ---------------------------------------------------------------- daemons, started directly
running() { [ -f "$1" ] && $SUDO kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # stop the daemon whose pid file is $1, waiting for it to exit
  if running "$1"; then
    local pid; pid=$(cat "$1")
    $SUDO kill "$pid"
    for _ in $(seq 50); do $SUDO kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    die "daemon $pid ($1) did not stop"
  fi
}

if [ ! -s /etc/munge/munge.key ]; then
  log "creating the munge key"
  $SUDO mkdir -p /etc/munge
  if command -v mungekey >/dev/null 2>&1; then $SUDO mungekey --create --keyfile=/etc/munge/munge.key
  else $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
$SUDO chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
$SUDO chmod 400 /etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
if ! running "$MUNGE_PID"; then
  log "starting munged"
  # munged refuses to run as root; the Debian package creates the munge user.
  if [ -z "$SUDO" ]; then runuser -u munge -- /usr/sbin/munged; else $SUDO -u munge /usr/sbin/munged; fi
fi
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

if [ "$changed" = 1 ]; then stop /run/slurmd.pid; stop /run/slurmctld.pid; fi
if ! running /run/slurmctld.pid; then
  log "starting slurmctld"
  $SUDO /usr/sbin/slurmctld || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
fi
if ! running /run/slurmd.pid; then
  log "starting slurmd"
  $SUDO /usr/sbin/slurmd || die "slurmd did not start; see $LOG_DIR/slurmd.log"
fi

# ---------------------------------------------------------------- wait for the node
state=""
for _ in $(seq $((WAIT_S * 2))); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
  case "$state" in
    idle | mixed | allocated) break ;;
    drain* | down*) $SUDO scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle | mixed | allocated) ;;
  *)
    echo "--- last lines of $LOG_DIR/slurmctld.log:" >&2; $SUDO tail -n 15 "$LOG_DIR/slurmctld.log" >&2 || true
    echo "--- last lines of $LOG_DIR/slurmd.log:" >&2; $SUDO tail -n 15 "$LOG_DIR/slurmd.log" >&2 || true
    die "slurm node $HOST not ready after ${WAIT_S}s (state '${state:-unknown}', reason: $(sinfo -h -n "$HOST" -o %E 2>/dev/null))"
    ;;
esac
log "slurm ready: node $HOST $state, partition $(sinfo -h -o %P | head -1), $(( $(date +%s) - t0 ))s"
