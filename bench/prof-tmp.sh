#!/usr/bin/env bash
# bench/proxy.sh — proxy throughput, latency and memory of the fhirgw data plane, with nginx baselines in the same run.
#
#   bench/proxy.sh                 build (release) and run everything; prints markdown tables on stdout
#
# Environment (all optional):
#   FHIRGW_BIN_DIR=DIR   use these fhirgw-{controlplane,dataplane,dev-issuer} binaries instead of building
#   FHIRGW_BIN_LABEL=..  what they were built from (printed with the results)
#   DURATION=15 WARMUP=3 THREADS=2 CONNS=32   wrk parameters per measured run
#   PROXY_WORKERS=auto   nginx reverse proxy worker_processes
#   BIG_MB=1024          size of the streamed octet-stream file;  BUNDLE_MB=1024 size of the streamed searchset Bundle
#   STREAM_REPEAT=3      downloads per path of the octet-stream (median reported); BUNDLE_REPEAT=1 of the Bundle
#   IDLE_CONNS=10000     idle keep-alive connections;  IDLE_HOLD=8 seconds they are held
#   PERF_DIR=DIR         after the measurements, profile the data plane (perf record, DWARF call graphs, 10 s per
#                        route) into DIR: DIR/dp_*.self.txt (flat) and DIR/dp_*.children.txt (inclusive)
#
# Auditing (issue 15) is measured on a second data plane with a spool (--audit-dir in the work dir) and an NDJSON file
# sink: verified reads by a tenant not audited, one audited in relaxed mode and one in strict mode, against the
# first data plane's reads (no spool at all) in the same run.
#
# All traffic stays on 127.0.0.1. Every wait is bounded; every process started here is stopped on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="$root/bench"
DURATION="${DURATION:-15}"
WARMUP="${WARMUP:-3}"
THREADS="${THREADS:-2}"
CONNS="${CONNS:-32}"
PROXY_WORKERS="${PROXY_WORKERS:-auto}"
BIG_MB="${BIG_MB:-1024}"
BUNDLE_MB="${BUNDLE_MB:-1024}"
STREAM_REPEAT="${STREAM_REPEAT:-3}"
BUNDLE_REPEAT="${BUNDLE_REPEAT:-1}"
IDLE_CONNS="${IDLE_CONNS:-10000}"
IDLE_HOLD="${IDLE_HOLD:-8}"
((IDLE_HOLD >= 5)) || IDLE_HOLD=5 # the server is measured 2 s after the last connection is up
PERF_DIR="${PERF_DIR:-}"
# shellcheck source=bench/lib.sh
source "$bench/lib.sh"

# ---------------------------------------------------------------------------------------------------- tools
extra=()
command -v ss >/dev/null 2>&1 || extra+=(iproute2)
install_tools "${extra[@]}"
if [[ -n "$PERF_DIR" ]] && ! command -v perf >/dev/null 2>&1; then
  log "installing linux-perf (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
fi

bin="$(release_bins)"

# The 10,000 client sockets live in idle_conns.py, the 10,000 server sockets in the data plane: both inherit this.
hard="$(ulimit -Hn)"
want=$((IDLE_CONNS + 2048))
((want >= 8192)) || want=8192
if [[ "$hard" != unlimited ]] && ((hard < want)); then
  ulimit -Hn "$want" 2>/dev/null || { log "hard fd limit $hard < $want: IDLE_CONNS lowered"; IDLE_CONNS=$((hard - 2048)); want=$hard; }
fi
ulimit -n "$want"

# ---------------------------------------------------------------------------------------------------- processes
make_work fhirgw-bench

wait_route() { # url [curl args...]: until the route exists (not 404/503), up to 30 s; the status itself may vary
  local url="$1" code; shift
  for _ in $(seq 1 300); do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" "$url" || true)"
    [[ "$code" == 000 || "$code" == 404 || "$code" == 503 ]] || return 0
    sleep 0.1
  done
  die "$url: no route"
}

static_port="$(free_port)"
proxy_port="$(free_port)"
log "preparing $work"
mkdir -p "$work/www" "$work/dp" "$work/nginx-static-tmp" "$work/nginx-proxy-tmp"
for t in operator dataplane upstream; do head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/$t.token"; done
head -c 48 /dev/urandom >"$work/paging.key"
chmod 600 "$work"/*.token "$work/paging.key"
upstream_token="$(cat "$work/upstream.token")"
# Realistic small resources (~1.5 KB each).
python3 - "$work/www" "$bench/patient-p1.json" <<'PY'
import json, sys
www = sys.argv[1]
patient = json.load(open(sys.argv[2]))  # bench/patient-p1.json, shared with bench/access.sh
interactions = [{"code": c} for c in ("read", "vread", "search-type", "history-instance")]
capability = {
    "resourceType": "CapabilityStatement", "id": "bench", "status": "active", "date": "2026-11-27",
    "publisher": "fhirgw bench", "kind": "instance",
    "software": {"name": "static nginx", "version": "1.22"},
    "implementation": {"description": "Static upstream for bench/proxy.sh", "url": "http://127.0.0.1/fhir"},
    "fhirVersion": "4.0.1", "format": ["application/fhir+json", "json"],
    "rest": [{"mode": "server",
              "security": {"cors": False, "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}]},
              "resource": [{"type": t, "interaction": interactions,
                            "searchParam": [{"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"}]}
                           for t in ("Patient", "Observation", "Encounter", "Condition")]}],
}
for name, value in (("patient-p1.json", patient), ("metadata.json", capability)):
    with open(f"{www}/{name}", "w") as f:
        json.dump(value, f, indent=1)
PY
truncate -s "${BIG_MB}M" "$work/www/big.bin" # sparse: content does not matter
# A searchset Bundle of ~BUNDLE_MB MiB: ~1.45 KB Observation entries, all tagged for the bench tenant (all are kept).
python3 - "$work/www/bundle.json" "$BUNDLE_MB" "http://127.0.0.1:$static_port/fhir" <<'PY'
import json, sys
path, mb, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tag = {"system": "https://fhirgw.dev/dataset", "code": "bench"}
obs = {
    "resourceType": "Observation", "id": "ID",
    "meta": {"versionId": "1", "lastUpdated": "2026-11-20T09:14:03.512+00:00", "tag": [tag]},
    "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "Vital Signs"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel with all children optional"}], "text": "Blood pressure systolic and diastolic"},
    "subject": {"reference": "Patient/p1", "display": "Amy V. Shaw"},
    "effectiveDateTime": "2026-11-20T09:10:00+00:00",
    "performer": [{"reference": "Practitioner/pr1", "display": "Dr. Ronald Bone"}],
    "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "L", "display": "low"}]}],
    "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "368209003", "display": "Right arm"}]},
    "component": [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
         "valueQuantity": {"value": 107, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
         "valueQuantity": {"value": 60, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}],
}
entry = {"fullUrl": base + "/Observation/ID", "resource": obs, "search": {"mode": "match"}}
template = json.dumps(entry, separators=(",", ":")).replace("/Observation/ID", "/Observation/o%(i)d").replace('"id":"ID"', '"id":"o%(i)d"')
head = json.dumps({"resourceType": "Bundle", "type": "searchset",
                   "link": [{"relation": "self", "url": base + "/Observation"}]}, separators=(",", ":"))[:-1] + ',"entry":['
target = mb * 1024 * 1024
with open(path, "w") as f:
    f.write(head)
    size, i = len(head), 0
    while size < target:
        chunk = []
        for _ in range(1000):
            i += 1
            chunk.append(("," if i > 1 else "") + template % {"i": i})
        data = "".join(chunk)
        f.write(data)
        size += len(data)
    f.write("]}")
PY
chmod -R a+rX "$work/www"
big_bytes=$((BIG_MB * 1024 * 1024))

start_nginx_pair "$bench/nginx-static.conf.tmpl" "$bench/nginx-proxy.conf.tmpl"

log "starting the control plane, the data plane and the dev issuer (RUST_LOG=warn)"
export RUST_LOG=warn
start_control_plane
"$bin/fhirgw-dataplane" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --control-plane "http://$cp_addr" \
  --token-file "$work/dataplane.token" --state-dir "$work/dp" --paging-key-file "$work/paging.key" \
  >"$work/dp.out" 2>"$work/dp.log" & dp_pid=$!; pids+=("$dp_pid")
dp_line="$(wait_for_line "$work/dp.out")"
dp_addr="$(json_get fhir <<<"$dp_line")"
dp_admin="$(json_get admin <<<"$dp_line")"
audience="http://$dp_addr/fhir"
# The same, auditing: a spool on this disk, shipped to an NDJSON file (fsynced per batch).
"$bin/fhirgw-dataplane" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --control-plane "http://$cp_addr" \
  --token-file "$work/dataplane.token" --state-dir "$work/dp-audit" --paging-key-file "$work/paging.key" \
  --audit-dir "$work/audit-spool" --audit-ndjson "$work/audit.ndjson" \
  >"$work/dpa.out" 2>"$work/dpa.log" & dpa_pid=$!; pids+=("$dpa_pid")
dpa_line="$(wait_for_line "$work/dpa.out")"
dpa_addr="$(json_get fhir <<<"$dpa_line")"
dpa_admin="$(json_get admin <<<"$dpa_line")"
"$bin/fhirgw-dev-issuer" 127.0.0.1:0 "$audience" >"$work/issuer.out" 2>"$work/issuer.log" & pids+=($!)
issuer_url="$(wait_for_line "$work/issuer.out" | json_get url)"

log "configuring through the operator API (grpcurl)"
g PutUpstream <<JSON
{"upstream": {"name": "static", "base_url": "http://127.0.0.1:$static_port/fhir",
  "auth": {"static_token": {"token_file": "$work/upstream.token"}}}}
JSON
g PutUpstream <<JSON
{"upstream": {"name": "big", "base_url": "http://127.0.0.1:$static_port/big",
  "auth": {"static_token": {"token_file": "$work/upstream.token"}}}}
JSON
g PutRouteTable <<'JSON'
{"route_table": {"name": "main", "base_path": "/fhir", "routes": [
  {"id": "metadata", "path": "/metadata", "methods": ["GET"], "proxy": {"upstream": "static"}},
  {"id": "search", "path": "/{type}", "methods": ["GET"], "proxy": {"upstream": "static"}},
  {"id": "read", "path": "/{type}/{id}", "methods": ["GET", "HEAD"], "proxy": {"upstream": "static"}}]}}
JSON
# The 1 GB file behind a second table: its `metadata` route is public, so this is the pure streaming path.
g PutRouteTable <<'JSON'
{"route_table": {"name": "big", "base_path": "/big", "routes": [
  {"id": "big", "path": "/metadata", "methods": ["GET"], "proxy": {"upstream": "big"}}]}}
JSON
g PutIdentityProvider <<JSON
{"identity_provider": {"name": "dev", "issuer": "$issuer_url", "jwks_uri": "$issuer_url/jwks",
  "audiences": ["$audience"], "tenant_claim": "tenant"}}
JSON
g PutTenant <<<'{"tenant": {"name": "bench"}}'
g PutGrant <<<'{"grant": {"tenant": "bench", "tag": {"system": "https://fhirgw.dev/dataset", "code": "bench"}}}'
for m in relaxed strict; do
  g PutTenant <<<"{\"tenant\": {\"name\": \"bench-$m\", \"audit\": {\"mode\": \"AUDIT_MODE_${m^^}\"}}}"
  g PutGrant <<<"{\"grant\": {\"tenant\": \"bench-$m\", \"tag\": {\"system\": \"https://fhirgw.dev/dataset\", \"code\": \"bench\"}}}"
done

token_for() { # tenant -> an Authorization header with a fresh token (they live 300 s; the run is longer)
  echo "Authorization: Bearer $(curl -sf --max-time 5 -d "client_id=$1" -d 'scope=user/*.read' "$issuer_url/token" | json_get access_token)"
}
mint() {
  auth="$(token_for bench)"
  auth_relaxed="$(token_for bench-relaxed)"
  auth_strict="$(token_for bench-strict)"
}
mint
wait_http "http://$dp_admin/readyz" 200
wait_http "http://$dp_addr/fhir/metadata" 200
wait_http "http://$dp_addr/fhir/Patient/p1" 200 -H "$auth"
wait_http "http://$dpa_addr/fhir/Patient/p1" 200 -H "$auth_strict"
wait_http "http://$dpa_addr/fhir/Patient/p1" 200 -H "$auth_relaxed"
wait_route "http://$dp_addr/big/metadata" -r 0-0
wait_http "http://127.0.0.1:$proxy_port/fhir/metadata" 200
# Sanity: every path answers the same resource.
for url in "http://127.0.0.1:$static_port/fhir/Patient/p1" "http://127.0.0.1:$proxy_port/fhir/Patient/p1" \
  "http://$dp_addr/fhir/Patient/p1"; do
  curl -sf --max-time 5 -H "$auth" "$url" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["id"] == "p1", r' \
    || die "$url did not return Patient/p1"
done
# Does the data plane pass the CapabilityStatement through untouched (streaming) or rewrite it?
if cmp -s <(curl -s --max-time 5 "http://127.0.0.1:$static_port/fhir/metadata") <(curl -s --max-time 5 "http://$dp_addr/fhir/metadata"); then
  meta_mode="public, passed through untouched"
else
  meta_mode="public, body rewritten by the gateway"
fi
# The data plane must be the one adding the upstream credential, and the caller's must not pass.
[[ "$(status_of "http://$dp_addr/fhir/Patient/p1")" == 401 ]] || die "the data plane served a read without a token"

# ---------------------------------------------------------------------------------------------------- measuring
mint
for key in relaxed; do
  h="$auth_relaxed"
  wrk -t2 -c32 -d3s -H "$h" "http://$dpa_addr/fhir/Patient/p1" >/dev/null
  perf record -q -F 199 --call-graph dwarf,16384 -p "$dpa_pid" -o "/tmp/prof-$key.data" -- sleep 6 2>/dev/null & perf_pid=$!
  wrk -t2 -c32 -d6s -H "$h" "http://$dpa_addr/fhir/Patient/p1" > "/tmp/prof-$key.wrk"
  wait "$perf_pid" || true
  perf report -i "/tmp/prof-$key.data" --children --sort symbol --stdio -g none 2>/dev/null | grep -v '^$' | grep -v '^#' | head -400 > "/tmp/prof-$key.children.txt" || true
  # strace -c style syscall count
  perf stat -x, -o "/tmp/prof-$key.sys.csv" -e 'raw_syscalls:sys_enter' -e 'syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_futex,syscalls:sys_enter_openat' -p "$dpa_pid" -- sleep 5 2>/dev/null & perf_pid=$!
  wrk -t2 -c32 -d5s -H "$h" "http://$dpa_addr/fhir/Patient/p1" > "/tmp/prof-$key.sys.wrk"
  wait "$perf_pid" || true
done
