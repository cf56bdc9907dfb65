#!/usr/bin/env bash
# Picket's main job on this machine: a picket-aggregator and a picket-agent, TLS on (mutual
# TLS, with certificates generated here by `picket-aggregator certs`), everything else on the
# embedded defaults. Metrics appear at http://127.0.0.1:7401/metrics within seconds.
# Ctrl-C stops both. State (certificates, configs, logs) lives in ./.demo/.
set -euo pipefail
cd "$(dirname "$0")"

profile=${PICKET_DEMO_PROFILE:-release}
cargo build --locked --quiet --profile "$profile" -p picket-agent -p picket-aggregator
[ "${PICKET_DEMO_BUILD_ONLY:-0}" = 1 ] && exit 0
dir_name=$profile; [ "$profile" = dev ] && dir_name=debug
bin="${CARGO_TARGET_DIR:-target}/$dir_name"

state=.demo
rm -rf "$state"
mkdir -p "$state"
"$bin/picket-aggregator" certs init --dir "$state/tls" >/dev/null
"$bin/picket-aggregator" certs issue-agent demo-agent --dir "$state/tls" >/dev/null

cat >"$state/aggregator.toml" <<TOML
[tls]
cert = "$state/tls/aggregator.pem"
key = "$state/tls/aggregator-key.pem"
client_ca = "$state/tls/ca.pem"
TOML
cat >"$state/agent.toml" <<TOML
instance = "demo-agent"
interval = "5s"
[spool]
directory = "$state/spool"
[aggregator.tls]
ca = "$state/tls/ca.pem"
cert = "$state/tls/agents/demo-agent.pem"
key = "$state/tls/agents/demo-agent-key.pem"
TOML

"$bin/picket-aggregator" --config "$state/aggregator.toml" 2>"$state/aggregator.log" &
agg=$!
"$bin/picket-agent" --config "$state/agent.toml" 2>"$state/agent.log" &
agent=$!
trap 'kill -TERM $agent $agg 2>/dev/null; wait $agent $agg 2>/dev/null || true' EXIT INT TERM
echo "picket-aggregator (pid $agg) and picket-agent (pid $agent) running with mutual TLS."
echo "Metrics:  curl http://127.0.0.1:7401/metrics"
echo "Logs:     $state/aggregator.log, $state/agent.log    (Ctrl-C stops both)"
wait $agg $agent
