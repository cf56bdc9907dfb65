#!/usr/bin/env bash
# A throw-away Apache Flink 2.3 session cluster on 127.0.0.1, for recording REST fixtures and
# (next) for the flink plugin's integration tests. See README.md next to this file.
#
#   tests/flink/start-cluster.sh start     # JobManager + TaskManager + the SQL job, prints ports/PIDs
#   tests/flink/start-cluster.sh cluster   # only JobManager + TaskManager
#   tests/flink/start-cluster.sh submit    # (re)submit the SQL job to the running cluster
#   tests/flink/start-cluster.sh wait-checkpoints [N]   # wait until N (default 3) checkpoints completed
#   tests/flink/start-cluster.sh cancel    # cancel the submitted job and wait until it is CANCELED
#   tests/flink/start-cluster.sh status    # ports, PIDs, liveness
#   tests/flink/start-cluster.sh stop      # stop both processes (TERM, then KILL after 20 s)
#
# Environment:
#   FLINK_HOME        the unpacked `pyflink` directory of the apache-flink-libraries wheel
#                     (has lib/, plugins/, bin/bash-java-utils.jar); default /opt/picket-tests/flink/pyflink
#   PICKET_FLINK_DIR  state directory (config, logs, pids, checkpoints); default /tmp/picket-flink
#   PICKET_FLINK_ROWS rows per second of the datagen source; default 2000
#   JAVA              the java binary; default `java` (needs 17 or 21)
#   PICKET_FLINK_EXTRA_CONFIG  a YAML file appended to config.yaml (more reporters, say)
#
# After `start`, $PICKET_FLINK_DIR/cluster.env holds the ports, PIDs and job id as shell
# assignments, so a harness can `source` it.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FLINK_HOME=${FLINK_HOME:-/opt/picket-tests/flink/pyflink}
STATE=${PICKET_FLINK_DIR:-/tmp/picket-flink}
ROWS=${PICKET_FLINK_ROWS:-2000}
JAVA=${JAVA:-java}
HOST=127.0.0.1
CONF="$STATE/conf"
LOGS="$STATE/log"
ENV_FILE="$STATE/cluster.env"

# The module flags Flink's own config.yaml (inside flink-dist) passes to every JVM via
# env.java.opts.all. On Java 17 Flink needs reflective access to these packages (Kryo, Pekko,
# the planner's code generation); bin/config.sh would add them, but we start the JVMs ourselves.
JAVA_MODULE_OPTS=(
  --add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.api=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.parser=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.tree=ALL-UNNAMED
  --add-exports=jdk.compiler/com.sun.tools.javac.util=ALL-UNNAMED
  --add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED
  --add-opens=java.base/java.lang=ALL-UNNAMED
  --add-opens=java.base/java.net=ALL-UNNAMED
  --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED
  --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens=java.base/java.text=ALL-UNNAMED
  --add-opens=java.base/java.time=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED
)

log() { printf '[flink] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

check_flink_home() {
  [[ -f "$FLINK_HOME/bin/bash-java-utils.jar" && -d "$FLINK_HOME/lib" ]] || die \
    "no Flink at FLINK_HOME=$FLINK_HOME; install it with:
  pip3 install --no-deps --target /opt/picket-tests/flink 'apache-flink-libraries==2.3.0'"
}

# N distinct free TCP ports on 127.0.0.1. All sockets stay bound until every port is chosen,
# so the N ports differ; another process could still grab one before Flink binds it (rare).
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

rest() { curl -fsS --max-time 5 "http://$HOST:$FLINK_REST_PORT$1"; }

# PID is alive and is one of *our* JVMs (the state dir is on its command line), so a reused
# PID never gets signalled.
ours() {
  local pid=$1 cmdline
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  # Read first, then match: `grep -q` in a pipe can SIGPIPE the writer, which pipefail reports
  # as failure.
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *"$STATE/"* ]]
}

load_env() {
  [[ -f "$ENV_FILE" ]] || die "no $ENV_FILE; run '$0 start' first"
  # shellcheck disable=SC1090
  source "$ENV_FILE"
}

write_env() {
  cat >"$ENV_FILE" <<EOF
FLINK_REST_URL=http://$HOST:$FLINK_REST_PORT
FLINK_REST_PORT=$FLINK_REST_PORT
FLINK_RPC_PORT=$FLINK_RPC_PORT
FLINK_JM_PROM_PORT=$FLINK_JM_PROM_PORT
FLINK_TM_PROM_PORT=$FLINK_TM_PROM_PORT
FLINK_JM_PID=${FLINK_JM_PID:-}
FLINK_TM_PID=${FLINK_TM_PID:-}
FLINK_JOB_ID=${FLINK_JOB_ID:-}
EOF
}

write_config() {
  mkdir -p "$CONF" "$LOGS" "$STATE/tmp" "$STATE/checkpoints" "$STATE/classes"
  # Flink 2 reads only config.yaml (flink-conf.yaml is ignored). Flat dotted keys are valid YAML
  # and Flink accepts them alongside nested ones.
  cat >"$CONF/config.yaml" <<EOF
# Generated by tests/flink/start-cluster.sh; rewritten on every start.
jobmanager.rpc.address: $HOST
jobmanager.rpc.port: $FLINK_RPC_PORT
jobmanager.bind-host: $HOST
# Small but sufficient: BashJavaUtils derives -Xmx etc. from these.
jobmanager.memory.process.size: 1024m
jobmanager.execution.failover-strategy: region

taskmanager.host: $HOST
taskmanager.bind-host: $HOST
taskmanager.numberOfTaskSlots: 2
taskmanager.memory.process.size: 1280m
# taskmanager.rpc.port, taskmanager.data.port and blob.server.port default to 0 (any free port).

rest.address: $HOST
rest.bind-address: $HOST
rest.port: $FLINK_REST_PORT

parallelism.default: 2
execution.checkpointing.interval: 2s
# A filesystem checkpoint directory makes checkpoints report an external_path and a real size.
state.checkpoints.dir: file://$STATE/checkpoints
io.tmp.dirs: $STATE/tmp

# Prometheus reporter (plugins/metrics-prometheus, found through FLINK_PLUGINS_DIR). The range
# covers both processes; each JVM also gets its own port with -D so the ports are known.
metrics.reporter.prom.factory.class: org.apache.flink.metrics.prometheus.PrometheusReporterFactory
metrics.reporter.prom.port: $FLINK_JM_PROM_PORT-$FLINK_TM_PROM_PORT
EOF
  if [[ -n "${PICKET_FLINK_EXTRA_CONFIG:-}" ]]; then
    [[ -f "$PICKET_FLINK_EXTRA_CONFIG" ]] || die "PICKET_FLINK_EXTRA_CONFIG=$PICKET_FLINK_EXTRA_CONFIG does not exist"
    { echo "# From $PICKET_FLINK_EXTRA_CONFIG"; cat "$PICKET_FLINK_EXTRA_CONFIG"; } >>"$CONF/config.yaml"
  fi
  # Log files per process; the file name comes from -Dlog.file like bin/flink-daemon.sh does.
  cat >"$CONF/log4j.properties" <<'EOF'
monitorInterval = 0
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = MainAppender
appender.main.name = MainAppender
appender.main.type = File
# append = true matters: log4j gives the plugin class loaders (the Prometheus reporter) their
# own logger context, which opens the same file again; with append = false that truncates the
# log, typically during shutdown. Old logs are rotated to *.1 by the script instead.
appender.main.append = true
appender.main.fileName = ${sys:log.file}
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %-60c %x - %m%n
logger.pekko.name = org.apache.pekko
logger.pekko.level = WARN
EOF
  # The SQL client side only needs warnings, on stderr.
  cat >"$CONF/log4j-client.properties" <<'EOF'
rootLogger.level = WARN
rootLogger.appenderRef.console.ref = Console
appender.console.name = Console
appender.console.type = CONSOLE
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %-5p %c{1} - %m%n
EOF
}

# BashJavaUtils prints two lines prefixed BASH_JAVA_UTILS_EXEC_RESULT: the JVM flags (-Xmx,
# -Xms, -XX:MaxDirectMemorySize, -XX:MaxMetaspaceSize) and the fully derived memory/CPU
# settings as `-D key=value` pairs. TaskManagerRunner refuses to start without the latter
# (it expects every memory component to be set explicitly, as bin/taskmanager.sh does).
resource_params() {
  local which=$1 out
  out=$("$JAVA" -cp "$FLINK_HOME/bin/bash-java-utils.jar:$FLINK_HOME/lib/*" \
    -Dlog4j.configurationFile=file:"$CONF/log4j-client.properties" \
    org.apache.flink.runtime.util.bash.BashJavaUtils "$which" --configDir "$CONF" 2>&1) ||
    die "BashJavaUtils $which failed: $out"
  grep '^BASH_JAVA_UTILS_EXEC_RESULT:' <<<"$out" | sed 's/^BASH_JAVA_UTILS_EXEC_RESULT://'
}

wait_for() { # description, timeout seconds, command...
  local what=$1 timeout=$2 start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS - start < timeout)) || die "timed out after ${timeout}s waiting for $what (logs in $LOGS)"
    sleep 1
  done
  log "$what after $((SECONDS - start))s"
}

tm_slots_registered() {
  local o
  o=$(rest /overview) || return 1
  [[ "$o" == *'"slots-total":2'* ]]
}

start_cluster() {
  check_flink_home
  if [[ -f "$ENV_FILE" ]]; then
    # shellcheck disable=SC1090
    source "$ENV_FILE"
    if ours "${FLINK_JM_PID:-}" || ours "${FLINK_TM_PID:-}"; then
      die "a cluster from $STATE is still running; '$0 stop' first"
    fi
  fi
  FLINK_JOB_ID=
  read -r FLINK_REST_PORT FLINK_RPC_PORT FLINK_JM_PROM_PORT FLINK_TM_PROM_PORT <<<"$(free_ports 4)"
  # The range in config.yaml must be ascending.
  if ((FLINK_JM_PROM_PORT > FLINK_TM_PROM_PORT)); then
    local t=$FLINK_JM_PROM_PORT
    FLINK_JM_PROM_PORT=$FLINK_TM_PROM_PORT
    FLINK_TM_PROM_PORT=$t
  fi
  write_config
  local f
  for f in "$LOGS"/*.log "$LOGS"/*.out; do
    [[ -e "$f" ]] && mv -f "$f" "$f.1"
  done

  # Plugins (the Prometheus reporter) load from FLINK_PLUGINS_DIR, default ./plugins of the cwd.
  export FLINK_PLUGINS_DIR="$FLINK_HOME/plugins"
  export FLINK_CONF_DIR="$CONF"

  local jm_jvm jm_dyn tm_jvm tm_dyn
  { read -r jm_jvm; read -r jm_dyn; } <<<"$(resource_params GET_JM_RESOURCE_PARAMS)"
  { read -r tm_jvm; read -r tm_dyn; } <<<"$(resource_params GET_TM_RESOURCE_PARAMS)"

  # setsid: the JVMs get their own session, so they outlive this script and a Ctrl-C in the
  # calling terminal. It execs in place (no fork: a background job is not a group leader), so
  # $! is the JVM's PID.
  # shellcheck disable=SC2086 # jm_jvm / jm_dyn are word lists on purpose
  setsid "$JAVA" "${JAVA_MODULE_OPTS[@]}" $jm_jvm \
    -Dlog.file="$LOGS/jobmanager.log" \
    -Dlog4j.configurationFile=file:"$CONF/log4j.properties" \
    -Djava.io.tmpdir="$STATE/tmp" \
    -cp "$FLINK_HOME/lib/*" \
    org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint \
    --configDir "$CONF" $jm_dyn -D metrics.reporter.prom.port="$FLINK_JM_PROM_PORT" \
    </dev/null >"$LOGS/jobmanager.out" 2>&1 &
  FLINK_JM_PID=$!
  write_env
  log "JobManager pid $FLINK_JM_PID, REST http://$HOST:$FLINK_REST_PORT"
  wait_for "JobManager REST up" 90 rest /overview

  # shellcheck disable=SC2086
  setsid "$JAVA" "${JAVA_MODULE_OPTS[@]}" $tm_jvm \
    -Dlog.file="$LOGS/taskmanager.log" \
    -Dlog4j.configurationFile=file:"$CONF/log4j.properties" \
    -Djava.io.tmpdir="$STATE/tmp" \
    -cp "$FLINK_HOME/lib/*" \
    org.apache.flink.runtime.taskexecutor.TaskManagerRunner \
    --configDir "$CONF" $tm_dyn -D metrics.reporter.prom.port="$FLINK_TM_PROM_PORT" \
    </dev/null >"$LOGS/taskmanager.out" 2>&1 &
  FLINK_TM_PID=$!
  write_env
  log "TaskManager pid $FLINK_TM_PID"
  wait_for "TaskManager registered with 2 slots" 90 tm_slots_registered
}

submit_job() {
  check_flink_home
  load_env
  local classes="$STATE/classes"
  if [[ ! -f "$classes/SqlJob.class" || "$HERE/SqlJob.java" -nt "$classes/SqlJob.class" ]]; then
    log "compiling SqlJob.java"
    javac -cp "$FLINK_HOME/lib/*" -d "$classes" "$HERE/SqlJob.java"
  fi
  local out
  # The client builds the job graph locally (the planner unpacks itself into java.io.tmpdir)
  # and submits it over REST; it exits as soon as the job id is known.
  out=$("$JAVA" "${JAVA_MODULE_OPTS[@]}" \
    -Dlog4j.configurationFile=file:"$CONF/log4j-client.properties" \
    -Djava.io.tmpdir="$STATE/tmp" \
    -cp "$classes:$FLINK_HOME/lib/*" SqlJob "$HOST" "$FLINK_REST_PORT" "$ROWS" \
    2>>"$LOGS/client.log") || die "SqlJob failed, see $LOGS/client.log"
  FLINK_JOB_ID=$(sed -n 's/^JOB_ID=//p' <<<"$out")
  [[ -n "$FLINK_JOB_ID" ]] || die "SqlJob printed no job id: $out"
  write_env
  log "job $FLINK_JOB_ID submitted"
  wait_for "job RUNNING" 60 job_running
}

# Job state RUNNING and every vertex RUNNING (the job turns RUNNING before its tasks deploy).
job_running() {
  local j
  j=$(rest "/jobs/$FLINK_JOB_ID") || return 1
  grep -q '"state":"RUNNING"' <<<"$j" || return 1
  ! grep -Eq '"status":"(CREATED|SCHEDULED|DEPLOYING|INITIALIZING)"' <<<"$j"
}

completed_checkpoints() {
  rest "/jobs/$FLINK_JOB_ID/checkpoints" | python3 -c \
    'import json,sys; print(json.load(sys.stdin)["counts"]["completed"])'
}

wait_checkpoints() {
  load_env
  local want=${1:-3}
  [[ -n "${FLINK_JOB_ID:-}" ]] || die "no job submitted"
  enough() { (($(completed_checkpoints) >= want)); }
  wait_for "$want checkpoints completed" 120 enough
}

job_canceled() {
  local j
  j=$(rest "/jobs/$FLINK_JOB_ID") || return 1
  grep -q '"state":"CANCELED"' <<<"$j"
}

cancel_job() {
  load_env
  [[ -n "${FLINK_JOB_ID:-}" ]] || die "no job submitted"
  curl -fsS --max-time 5 -X PATCH "http://$HOST:$FLINK_REST_PORT/jobs/$FLINK_JOB_ID?mode=cancel" >/dev/null ||
    die "cancelling $FLINK_JOB_ID failed"
  wait_for "job $FLINK_JOB_ID CANCELED" 60 job_canceled
}

status() {
  load_env
  cat "$ENV_FILE"
  local name pid
  for name in JM TM; do
    pid=$(eval echo "\${FLINK_${name}_PID:-}")
    if ours "$pid"; then echo "$name pid $pid: running"; else echo "$name pid ${pid:-?}: not running"; fi
  done
}

stop_pid() {
  local name=$1 pid=$2 i
  if ! ours "$pid"; then
    log "$name (pid ${pid:-?}) not running"
    return 0
  fi
  kill -TERM "$pid"
  for ((i = 0; i < 20; i++)); do
    kill -0 "$pid" 2>/dev/null || { log "$name (pid $pid) stopped"; return 0; }
    sleep 1
  done
  log "$name (pid $pid) ignored TERM for 20s; KILL"
  kill -KILL "$pid" 2>/dev/null || true
}

stop_cluster() {
  [[ -f "$ENV_FILE" ]] || { log "nothing to stop (no $ENV_FILE)"; return 0; }
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  # TaskManager first, so it does not spend its shutdown trying to reconnect to the JobManager.
  stop_pid TaskManager "${FLINK_TM_PID:-}"
  stop_pid JobManager "${FLINK_JM_PID:-}"
}

case "${1:-start}" in
  start)
    start_cluster
    submit_job
    status
    ;;
  cluster)
    start_cluster
    status
    ;;
  submit) submit_job ;;
  wait-checkpoints) wait_checkpoints "${2:-3}" ;;
  cancel) cancel_job ;;
  status) status ;;
  stop) stop_cluster ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
