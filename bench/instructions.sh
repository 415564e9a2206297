#!/usr/bin/env bash
# bench/instructions.sh — instructions per verified read, counted by valgrind (callgrind) in the data plane process
# and in the bare hyper proxy (tests/src/bin/bare-proxy.rs) on the same requests. Instruction counts do not depend
# on what else the machine is doing (unlike CPU time, and unlike `perf stat`, which this VM does not offer), so two
# builds can be compared on a shared machine.
#
#   FHIRGW_BIN_DIR=target/release bench/instructions.sh              one build
#   FHIRGW_BIN_DIR=A FHIRGW_BIN_DIR_BEFORE=B bench/instructions.sh    two builds, B first: the table compares them
#
# Environment: REQUESTS=2000 (counted, after WARMUP=300) on one keep-alive connection; CALLGRIND_KEEP=dir keeps the
# callgrind files (read them with `callgrind_annotate --inclusive=yes dir/cg.dp.*.1`); AUDIT=relaxed|strict runs the
# data plane with an audit spool and an NDJSON file sink, the tenant audited in that mode (the writer thread and the
# shipper are counted too: callgrind counts every thread of the process); WHAT=search counts a narrowed search
# (`GET /fhir/Encounter?status=finished`, a 10-entry searchset Bundle of ~13 KB with fullUrls on the upstream's base,
# as bench/proxy.sh's search row) instead of the read. Prints a markdown table.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="$root/bench"
REQUESTS="${REQUESTS:-2000}"
AUDIT="${AUDIT:-}"
[[ -z "$AUDIT" || "$AUDIT" == relaxed || "$AUDIT" == strict ]] || { echo "AUDIT must be relaxed or strict" >&2; exit 2; }
WARMUP="${WARMUP:-300}"
WHAT="${WHAT:-read}"
case "$WHAT" in
  read) request_path=/fhir/Patient/p1 what_label="verified read (GET /fhir/Patient/p1 + bearer, 1.5 KB)" ;;
  search) request_path='/fhir/Encounter?status=finished' what_label="narrowed search (GET /fhir/Encounter?status=finished + bearer, 10 entries, ~13 KB)" ;;
  *) echo "WHAT must be read or search" >&2; exit 2 ;;
esac
# shellcheck source=bench/lib.sh
source "$bench/lib.sh"

install_tools valgrind
command -v callgrind_control >/dev/null 2>&1 || die "callgrind_control (valgrind) is missing"
after_bins="$(release_bins)"
before_bins="${FHIRGW_BIN_DIR_BEFORE:-}"

make_work fhirgw-instr
static_port="$(free_port)"
proxy_port="$(free_port)"
PROXY_WORKERS=1
mkdir -p "$work/www/fhir/Patient" "$work/nginx-static-tmp" "$work/nginx-proxy-tmp"
for t in operator dataplane upstream; do head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/$t.token"; done
head -c 48 /dev/urandom >"$work/paging.key"
chmod 600 "$work"/*.token "$work/paging.key"
upstream_token="$(cat "$work/upstream.token")"
python3 - "$work/www" "$bench/patient-p1.json" "http://127.0.0.1:$static_port/fhir" <<'PY'
import json, sys
www, base = sys.argv[1], sys.argv[3]
patient = json.load(open(sys.argv[2]))
# The narrowed search's answer (WHAT=search): ten tagged Encounters, fullUrls on the upstream's base, total, self link.
tag = {"system": "https://fhirgw.dev/dataset", "code": "bench"}
enc = {"resourceType": "Encounter", "meta": {"versionId": "1", "lastUpdated": "2026-11-20T09:41:12.208+00:00", "tag": [tag]},
       "status": "finished",
       "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
       "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "270427003", "display": "Patient-initiated encounter"}]}],
       "subject": {"reference": "Patient/p1", "display": "Amy V. Shaw"},
       "participant": [{"individual": {"reference": "Practitioner/pr1", "display": "Dr. Ronald Bone"}}],
       "period": {"start": "2026-11-20T09:00:00+00:00", "end": "2026-11-20T09:40:00+00:00"},
       "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertensive disorder, systemic arterial (disorder)"}]}],
       "location": [{"location": {"reference": "Location/l1", "display": "Clinic room 3"}, "status": "completed"}],
       "serviceProvider": {"reference": "Organization/org1", "display": "Good Health Clinic"}}
entries = [{"fullUrl": f"{base}/Encounter/e{i}", "resource": dict(enc, id=f"e{i}"), "search": {"mode": "match"}} for i in range(1, 11)]
with open(f"{www}/encounters.json", "w") as f:
    json.dump({"resourceType": "Bundle", "type": "searchset", "total": 10,
               "link": [{"relation": "self", "url": base + "/Encounter?status=finished"}], "entry": entries}, f, separators=(",", ":"))
for name, value in (("patient-p1.json", patient), ("metadata.json", {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"], "rest": [{"mode": "server"}]})):
    with open(f"{www}/{name}", "w") as f:
        json.dump(value, f, indent=1)
PY
start_nginx_pair "$bench/nginx-static.conf.tmpl" "$bench/nginx-proxy.conf.tmpl"

# The requests, counted by the caller: one keep-alive connection, REQUESTS sequential GETs, each must be 200.
client() { # host:port path count auth-header
  python3 - "$@" <<'PY'
import http.client, sys
host, port = sys.argv[1].rsplit(":", 1)
path, count, auth = sys.argv[2], int(sys.argv[3]), sys.argv[4]
conn = http.client.HTTPConnection(host, int(port), timeout=120)
headers = {"Authorization": auth.split(": ", 1)[1]} if auth else {}
for _ in range(count):
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200 or b'"id"' not in body:
        sys.exit(f"{path}: {r.status} {body[:200]!r}")
PY
}

# Counts the instructions `pid` (under callgrind) executes while `count` requests go through it.
count_instructions() { # pid out-prefix addr path auth
  local pid="$1" out="$2" addr="$3" path="$4" auth="$5"
  client "$addr" "$path" "$WARMUP" "$auth"
  callgrind_control -i on "$pid" >/dev/null
  callgrind_control -z "$pid" >/dev/null
  client "$addr" "$path" "$REQUESTS" "$auth"
  callgrind_control -d "$pid" >/dev/null
  callgrind_control -i off "$pid" >/dev/null
  sleep 1
  # Sum the `summary:` / `totals:` lines of every dump of this process (one per thread with --separate-threads=no).
  [[ -n "${CALLGRIND_KEEP:-}" ]] && mkdir -p "$CALLGRIND_KEEP" && cp "$out".* "$CALLGRIND_KEEP"/
  local total
  total="$(cat "$out".* 2>/dev/null | awk '/^summary:/ { s += $2 } END { print s + 0 }')"
  awk -v t="$total" -v n="$REQUESTS" 'BEGIN { printf "%.0f", t / n }'
}

measure() { # label bin-dir -> prints "label dp bare" instructions per request
  local label="$1" bin="$2"
  rm -f "$work"/cg.*
  export RUST_LOG=warn
  # Each build with its own control plane, store and issuer (the previous ones are stopped below).
  local first_pid=${#pids[@]}
  mkdir -p "$work/$label"
  local saved_work="$work"
  work="$work/$label"
  cp "$saved_work"/*.token "$saved_work/paging.key" "$work"/
  start_control_plane
  work="$saved_work"
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.dp.%p" \
    "$bin/fhirgw-dataplane" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --control-plane "http://$cp_addr" \
    --token-file "$work/dataplane.token" --state-dir "$work/dp-$label" --paging-key-file "$work/paging.key" \
    ${AUDIT:+--audit-dir "$work/audit-$label" --audit-ndjson "$work/audit-$label.ndjson"} \
    >"$work/dp-$label.out" 2>"$work/dp-$label.log" & local dp_pid=$!; pids+=("$dp_pid")
  local dp_line dp_addr dp_admin audience issuer_url auth
  dp_line="$(wait_for_line "$work/dp-$label.out")"
  dp_addr="$(json_get fhir <<<"$dp_line")"
  dp_admin="$(json_get admin <<<"$dp_line")"
  audience="http://$dp_addr/fhir"
  "$bin/fhirgw-dev-issuer" 127.0.0.1:0 "$audience" >"$work/issuer-$label.out" 2>"$work/issuer-$label.log" & pids+=($!)
  issuer_url="$(wait_for_line "$work/issuer-$label.out" | json_get url)"
  g PutUpstream <<JSON
{"upstream": {"name": "static", "base_url": "http://127.0.0.1:$static_port/fhir",
  "auth": {"static_token": {"token_file": "$work/upstream.token"}}}}
JSON
  g PutRouteTable <<'JSON'
{"route_table": {"name": "main", "base_path": "/fhir", "routes": [
  {"id": "search", "path": "/{type}", "methods": ["GET"], "proxy": {"upstream": "static"}},
  {"id": "read", "path": "/{type}/{id}", "methods": ["GET", "HEAD"], "proxy": {"upstream": "static"}}]}}
JSON
  g PutIdentityProvider <<JSON
{"identity_provider": {"name": "dev", "issuer": "$issuer_url", "jwks_uri": "$issuer_url/jwks",
  "audiences": ["$audience"], "tenant_claim": "tenant"}}
JSON
  if [[ -n "$AUDIT" ]]; then
    g PutTenant <<<"{\"tenant\": {\"name\": \"bench\", \"audit\": {\"mode\": \"AUDIT_MODE_${AUDIT^^}\"}}}"
  else
    g PutTenant <<<'{"tenant": {"name": "bench"}}'
  fi
  g PutGrant <<<'{"grant": {"tenant": "bench", "tag": {"system": "https://fhirgw.dev/dataset", "code": "bench"}}}'
  auth="Authorization: Bearer $(curl -sf --max-time 5 -d client_id=bench -d 'scope=user/*.read' "$issuer_url/token" | json_get access_token)"
  wait_http "http://$dp_admin/readyz" 200
  wait_http "http://$dp_addr/fhir/Patient/p1" 200 -H "$auth"
  local dp bare=""
  dp="$(count_instructions "$dp_pid" "$work/cg.dp" "$dp_addr" "$request_path" "$auth")"
  kill -TERM "$dp_pid" 2>/dev/null || true
  if [[ -x "$bin/bare-proxy" ]]; then
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.bare.%p" \
      "$bin/bare-proxy" 127.0.0.1:0 "http://127.0.0.1:$static_port" "$work/upstream.token" multi \
      >"$work/bare-$label.out" 2>"$work/bare-$label.log" & local bare_pid=$!; pids+=("$bare_pid")
    local bare_addr
    bare_addr="$(wait_for_line "$work/bare-$label.out")"
    wait_http "http://$bare_addr/fhir/Patient/p1" 200 -H "$auth"
    bare="$(count_instructions "$bare_pid" "$work/cg.bare" "$bare_addr" "$request_path" "$auth")"
    kill -TERM "$bare_pid" 2>/dev/null || true
  fi
  local i
  for ((i = ${#pids[@]} - 1; i >= first_pid; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  sleep 1
  echo "$label $dp $bare"
}

results=()
[[ -n "$before_bins" ]] && results+=("$(measure before "$before_bins")")
results+=("$(measure after "$after_bins")")

echo
echo "Instructions per $what_label, $REQUESTS requests on one keep-alive connection, callgrind${AUDIT:+, tenant audited ($AUDIT; spool and NDJSON file sink)}"
echo
echo "| build | data plane | bare hyper proxy | data plane ÷ bare |"
echo "|---|---:|---:|---:|"
for r in "${results[@]}"; do
  read -r label dp bare <<<"$r"
  echo "| $label | $dp | ${bare:-–} | $(ratio "$dp" "${bare:-0}") |"
done
