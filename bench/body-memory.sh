#!/usr/bin/env bash
# bench/body-memory.sh — the data plane's peak memory under N concurrent maximum-size writes: N clients each POST
# one ~SIZE_MB MB Patient (many small `identifier` objects, the costly shape once parsed) at the same moment, through
# the data plane to the test FHIR server; the data plane's peak RSS (VmHWM, reset before each run through
# /proc/PID/clear_refs) and its RSS afterwards are read from /proc. One run per body budget in BUDGETS, each on a
# fresh data plane.
#
#   bench/body-memory.sh          build (release) and run; prints a markdown table on stdout
#
# Environment (all optional):
#   FHIRGW_BIN_DIR=DIR   use these fhirgw-{controlplane,dataplane,dev-issuer} binaries instead of building
#   N=10 SIZE_MB=15      concurrent writes and the size of each body
#   BUDGETS="1073741824 67108864"   --body-budget-bytes of each run ("none": a data plane without the flag, for
#                        binaries that predate it)
#
# All traffic stays on 127.0.0.1. Every wait is bounded; every process started here is stopped on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${N:-10}"
SIZE_MB="${SIZE_MB:-15}"
BUDGETS="${BUDGETS:-1073741824 67108864}"
# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"

install_tools
bin="$(release_bins)"
make_work fhirgw-body-memory
for t in operator dataplane upstream; do head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/$t.token"; done
chmod 600 "$work"/*.token

log "writing a ${SIZE_MB} MB Patient"
python3 - "$work/body.json" "$SIZE_MB" <<'PY'
import json, sys
path, mb = sys.argv[1], float(sys.argv[2])
one = {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "0000000000", "use": "usual"}
per = len(json.dumps(one, separators=(",", ":"))) + 1
n = int(mb * 1_000_000 / per)
body = {"resourceType": "Patient", "identifier": [dict(one, value=f"{i:010d}") for i in range(n)],
        "name": [{"family": "Memory"}]}
with open(path, "w") as f:
    json.dump(body, f, separators=(",", ":"))
PY
body_bytes="$(stat -c %s "$work/body.json")"

log "starting the test FHIR server, the control plane and the dev issuer"
export RUST_LOG=warn
"$root/tests/fhir-server/run.sh" --listen 127.0.0.1:0 --require-token "$work/upstream.token" \
  >"$work/fhir.out" 2>"$work/fhir.log" & pids+=($!)
fhir_base="$(wait_for_line "$work/fhir.out" | json_get base_url)"
start_control_plane
start_dp() { # name [args...] -> sets dp_pid dp_addr dp_admin
  local name="$1"; shift
  "$bin/fhirgw-dataplane" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --control-plane "http://$cp_addr" \
    --token-file "$work/dataplane.token" --state-dir "$work/$name" "$@" \
    >"$work/$name.out" 2>"$work/$name.log" & dp_pid=$!; pids+=("$dp_pid")
  local line
  line="$(wait_for_line "$work/$name.out")"
  dp_addr="$(json_get fhir <<<"$line")"
  dp_admin="$(json_get admin <<<"$line")"
}
audience="https://fhirgw.bench/fhir"
"$bin/fhirgw-dev-issuer" 127.0.0.1:0 "$audience" >"$work/issuer.out" 2>"$work/issuer.log" & pids+=($!)
issuer_url="$(wait_for_line "$work/issuer.out" | json_get url)"
g PutUpstream <<JSON
{"upstream": {"name": "fhir", "base_url": "$fhir_base",
  "auth": {"static_token": {"token_file": "$work/upstream.token"}}}}
JSON
g PutRouteTable <<'JSON'
{"route_table": {"name": "main", "base_path": "/fhir", "routes": [
  {"id": "create", "path": "/{type}", "methods": ["POST"], "proxy": {"upstream": "fhir"}}]}}
JSON
g PutIdentityProvider <<JSON
{"identity_provider": {"name": "dev", "issuer": "$issuer_url", "jwks_uri": "$issuer_url/jwks",
  "audiences": ["$audience"], "tenant_claim": "tenant"}}
JSON
g PutTenant <<<'{"tenant": {"name": "bench"}}'
g PutGrant <<<'{"grant": {"tenant": "bench", "tag": {"system": "https://fhirgw.dev/dataset", "code": "bench"}}}'
auth="Authorization: Bearer $(curl -sf --max-time 5 -d client_id=bench -d 'scope=user/*.*' "$issuer_url/token" | json_get access_token)"

echo "| body budget | N × body | 201 | 503 | other | RSS before | peak RSS | peak − before | RSS after (5 s) |"
echo "|---|---|---|---|---|---|---|---|---|"
run=0
for budget in $BUDGETS; do
  run=$((run + 1))
  if [[ "$budget" == none ]]; then start_dp "dp$run"; else start_dp "dp$run" --body-budget-bytes "$budget"; fi
  wait_http "http://$dp_admin/readyz" 200
  # One small write first, so the pools and caches exist before the baseline.
  [[ "$(status_of -X POST -H "$auth" -H 'content-type: application/fhir+json' \
    --data-binary '{"resourceType":"Patient"}' "http://$dp_addr/fhir/Patient")" == 201 ]] || die "warm-up write failed"
  before="$(proc_kb "$dp_pid" VmRSS)"
  echo 5 >"/proc/$dp_pid/clear_refs" # resets VmHWM to the current RSS
  codes="$work/codes-$run"
  : >"$codes"
  for _ in $(seq 1 "$N"); do
    curl -s -o /dev/null -w '%{http_code}\n' --max-time 300 -X POST -H "$auth" \
      -H 'content-type: application/fhir+json' --data-binary "@$work/body.json" "http://$dp_addr/fhir/Patient" >>"$codes" &
  done
  wait_curls() { while [[ "$(wc -l <"$codes")" -lt "$N" ]]; do sleep 0.2; done; }
  wait_curls
  peak="$(proc_kb "$dp_pid" VmHWM)"
  sleep 5
  after="$(proc_kb "$dp_pid" VmRSS)"
  ok="$(grep -c '^201$' "$codes" || true)"
  busy="$(grep -c '^503$' "$codes" || true)"
  other=$((N - ok - busy))
  label="$budget"; [[ "$budget" =~ ^[0-9]+$ ]] && label="$(mb $((budget / 1024))) MiB"
  echo "| $label | $N × $(mb $((body_bytes / 1024))) MiB | $ok | $busy | $other | $(mb "$before") MiB | $(mb "$peak") MiB | $(mb $((peak - before))) MiB | $(mb "$after") MiB |"
  kill -TERM "$dp_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$dp_pid" 2>/dev/null || break; sleep 0.1; done
done
