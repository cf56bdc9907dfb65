#!/usr/bin/env bash
# Records real Flink REST (and Prometheus reporter) responses into plugins/flink/fixtures/,
# from the cluster that start-cluster.sh started. Responses are stored byte for byte as curl
# received them (no pretty-printing), so parser tests see exactly what Flink sends.
#
#   tests/flink/start-cluster.sh start
#   tests/flink/start-cluster.sh wait-checkpoints 5
#   sleep 30          # let per-second rates and record counters fill in
#   tests/flink/record-fixtures.sh [out-dir]      # default plugins/flink/fixtures
#   tests/flink/start-cluster.sh stop
#
# The last step CANCELS the job and records the cluster afterwards; re-submit with
# `start-cluster.sh submit` if you need it running again.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-"$HERE/../../plugins/flink/fixtures"}
STATE=${PICKET_FLINK_DIR:-/tmp/picket-flink}
# shellcheck disable=SC1091
source "$STATE/cluster.env"
U=$FLINK_REST_URL
J=$FLINK_JOB_ID
mkdir -p "$OUT"

log() { printf '[record] %s\n' "$*" >&2; }

# get PATH FILE: GET and store the body; fails on a non-2xx status.
get() {
  curl -fsS --max-time 10 -o "$OUT/$2" "$U$1"
  log "$2 <- $1"
}

# get_status PATH FILE: store the body whatever the status (for error responses).
get_status() {
  local code
  code=$(curl -sS --max-time 10 -o "$OUT/$2" -w '%{http_code}' "$U$1")
  log "$2 <- $1 (HTTP $code)"
}

json() { python3 -c "import json,sys; d=json.load(sys.stdin); $1"; }

# Vertices in the job's topological order: source, calc, sink.
mapfile -t VIDS < <(curl -fsS "$U/jobs/$J" | json 'print("\n".join(v["id"] for v in d["vertices"]))')
NAMES=(source calc sink)
((${#VIDS[@]} == 3)) || { log "expected 3 vertices, got ${#VIDS[@]}"; exit 1; }

TM=$(curl -fsS "$U/taskmanagers" | json 'print(d["taskmanagers"][0]["id"])')

get /overview overview.json
get /jobs/overview jobs-overview.json
get "/jobs/$J" job.json
get "/jobs/$J/checkpoints" job-checkpoints.json
get "/jobs/$J/metrics" job-metrics-list.json
get "/jobs/$J/metrics?get=uptime,numRestarts,numberOfCompletedCheckpoints,numberOfFailedCheckpoints,numberOfInProgressCheckpoints,totalNumberOfCheckpoints,lastCheckpointDuration,lastCheckpointSize,lastCheckpointFullSize,lastCheckpointRestoreTimestamp,downtime,restartingTime" job-metrics.json
get /taskmanagers taskmanagers.json
get "/taskmanagers/$TM/metrics" taskmanager-metrics-list.json
get "/taskmanagers/$TM/metrics?get=Status.JVM.Memory.Heap.Used,Status.JVM.Memory.Heap.Max,Status.JVM.CPU.Load,Status.JVM.Threads.Count,Status.JVM.GarbageCollector.All.Count,Status.Shuffle.Netty.AvailableMemorySegments,Status.Shuffle.Netty.TotalMemorySegments,Status.Flink.Memory.Managed.Used,Status.Flink.Memory.Managed.Total" taskmanager-metrics.json

VMETRICS=busyTimeMsPerSecond,idleTimeMsPerSecond,backPressuredTimeMsPerSecond,numRecordsIn,numRecordsOut
for i in 0 1 2; do
  v=${VIDS[$i]}
  n=${NAMES[$i]}
  # The first request for a vertex starts a back-pressure sample; the second returns it.
  get "/jobs/$J/vertices/$v/backpressure" "vertex-$n-backpressure-first.json"
  sleep 2
  get "/jobs/$J/vertices/$v/backpressure" "vertex-$n-backpressure.json"
  # Vertex-scope metric ids carry the subtask index ("0.busyTimeMsPerSecond"); plain names
  # return an empty list, which vertex-*-metrics-unprefixed.json records.
  prefixed=$(for s in 0 1; do tr ',' '\n' <<<"$VMETRICS" | sed "s/^/$s./"; done | paste -sd,)
  get "/jobs/$J/vertices/$v/metrics?get=$prefixed" "vertex-$n-metrics.json"
  get "/jobs/$J/vertices/$v/metrics?get=$VMETRICS" "vertex-$n-metrics-unprefixed.json"
  # Aggregated over subtasks: min/max/avg/sum/skew per metric, one request per vertex.
  get "/jobs/$J/vertices/$v/subtasks/metrics?get=$VMETRICS" "vertex-$n-subtasks-metrics.json"
done
get "/jobs/$J/vertices/${VIDS[0]}/metrics" vertex-source-metrics-list.json

get_status /jobs/00000000000000000000000000000000 job-not-found-404.json
get_status /jobs/not-a-job-id job-bad-id-400.json

curl -fsS --max-time 10 -o "$OUT/reporter-jobmanager.txt" "http://127.0.0.1:$FLINK_JM_PROM_PORT/metrics"
log "reporter-jobmanager.txt <- :$FLINK_JM_PROM_PORT/metrics"
curl -fsS --max-time 10 -o "$OUT/reporter-taskmanager.txt" "http://127.0.0.1:$FLINK_TM_PROM_PORT/metrics"
log "reporter-taskmanager.txt <- :$FLINK_TM_PROM_PORT/metrics"

# Cancel and record the aftermath. PATCH answers 202 with "{}" at once; the job needs a moment
# to reach CANCELED.
curl -fsS --max-time 10 -X PATCH -o "$OUT/job-cancel-response.json" "$U/jobs/$J?mode=cancel"
log "job-cancel-response.json <- PATCH /jobs/$J?mode=cancel"
for _ in $(seq 30); do
  state=$(curl -fsS "$U/jobs/$J" | json 'print(d["state"])')
  [[ "$state" == CANCELED ]] && break
  sleep 1
done
log "job state $state"
get /overview overview-cancelled.json
get /jobs/overview jobs-overview-cancelled.json
get "/jobs/$J" job-cancelled.json
get "/jobs/$J/checkpoints" job-checkpoints-cancelled.json
get_status "/jobs/$J/metrics?get=uptime,numRestarts" job-metrics-cancelled.json
get_status "/jobs/$J/vertices/${VIDS[1]}/subtasks/metrics?get=$VMETRICS" vertex-calc-subtasks-metrics-cancelled.json
get_status "/jobs/$J/vertices/${VIDS[1]}/backpressure" vertex-calc-backpressure-cancelled.json
log "done: $(find "$OUT" -type f | wc -l) files in $OUT"
