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
#   EXPORT_MB=1024       size of the bulk export NDJSON file (streamed through a link signed by the data plane)
#   STREAM_REPEAT=3      downloads per path of the octet-stream (median reported); BUNDLE_REPEAT=1 of the Bundle;
#                        EXPORT_REPEAT=1 of the NDJSON file
#   SEARCH_ENTRIES=10    entries in the narrowed search's Bundle (`GET /fhir/Encounter?status=finished`, wrk rows)
#   AUDIT_WARMUP=15      seconds of relaxed and then strict load on the auditing data plane before its rows (a fresh
#                        spool's first seconds cost more than the steady state)
#   IDLE_CONNS=10000     idle keep-alive connections;  IDLE_HOLD=8 seconds they are held
#   PERF_DIR=DIR         after the measurements, profile the data plane (perf record, DWARF call graphs, 10 s per
#                        route: metadata, read, narrowed search; one Bundle and one export file download) into DIR:
#                        DIR/dp_*.self.txt (flat) and DIR/dp_*.children.txt (inclusive)
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
EXPORT_MB="${EXPORT_MB:-1024}"
STREAM_REPEAT="${STREAM_REPEAT:-3}"
BUNDLE_REPEAT="${BUNDLE_REPEAT:-1}"
EXPORT_REPEAT="${EXPORT_REPEAT:-1}"
SEARCH_ENTRIES="${SEARCH_ENTRIES:-10}"
AUDIT_WARMUP="${AUDIT_WARMUP:-15}"
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
# The same bytes as a Binary's content (`/fhir/Binary/big/_history/1`), with its metadata as FHIR (`/fhir/Binary/big`).
cat >"$work/www/binary-big.json" <<'JSON'
{"resourceType": "Binary", "id": "big", "contentType": "application/octet-stream",
 "meta": {"versionId": "1", "tag": [{"system": "https://fhirgw.dev/dataset", "code": "bench"}]}}
JSON
# Generated FHIR content, all of it tagged for the bench tenant (every entry and line is kept), relative references
# only, the same ~1.45 KB Observation throughout:
# - bundle.json: a searchset Bundle of ~BUNDLE_MB MiB (`GET /fhir/Observation`);
# - observation.ndjson: a bulk export file of ~EXPORT_MB MiB, one Observation per line, and export-manifest.json,
#   the completion manifest naming it (both on the upstream's base, as a Bulk Data server hands them out);
# - encounters.json: a searchset Bundle of SEARCH_ENTRIES Encounters (~1.3 KB each), the answer to a narrowed search.
python3 - "$work/www" "$BUNDLE_MB" "$EXPORT_MB" "$SEARCH_ENTRIES" "http://127.0.0.1:$static_port/fhir" <<'PY'
import json, sys
www, bundle_mb, export_mb, search_entries, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
compact = {"separators": (",", ":")}
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

def fill(f, size, target, template, sep):
    """Writes template % {"i": n} for n = 1, 2, ... (joined by sep) until size reaches target; returns (size, n)."""
    i = 0
    while size < target:
        chunk = []
        for _ in range(1000):
            i += 1
            chunk.append((sep if i > 1 else "") + template % {"i": i})
        data = "".join(chunk)
        f.write(data)
        size += len(data)
    return size, i

# The Bundle: entries joined by commas.
entry = {"fullUrl": base + "/Observation/ID", "resource": obs, "search": {"mode": "match"}}
template = json.dumps(entry, **compact).replace("/Observation/ID", "/Observation/o%(i)d").replace('"id":"ID"', '"id":"o%(i)d"')
head = json.dumps({"resourceType": "Bundle", "type": "searchset",
                   "link": [{"relation": "self", "url": base + "/Observation"}]}, **compact)[:-1] + ',"entry":['
with open(f"{www}/bundle.json", "w") as f:
    f.write(head)
    fill(f, len(head), bundle_mb * 1024 * 1024, template, ",")
    f.write("]}")

# The export file: one resource per line, each line ending in a line break. Compact JSON, so the data plane's
# lines (kept as they came, or re-serialised when a line must be rewritten) have the same length: bytes in = bytes out.
line = json.dumps(obs, **compact).replace('"id":"ID"', '"id":"o%(i)d"') + "\n"
with open(f"{www}/observation.ndjson", "w") as f:
    _, lines = fill(f, 0, export_mb * 1024 * 1024, line, "")
with open(f"{www}/export-manifest.json", "w") as f:
    json.dump({"transactionTime": "2026-11-20T09:00:00.000+00:00", "request": base + "/$export?_type=Observation",
               "requiresAccessToken": True,
               "output": [{"type": "Observation", "url": base + "/bulk-files/observation.ndjson", "count": lines}],
               "error": []}, f, indent=1)

# The narrowed search's answer, as a FHIR server sends it: absolute fullUrls on its base, total, a self link.
enc = {
    "resourceType": "Encounter", "id": "ID",
    "meta": {"versionId": "1", "lastUpdated": "2026-11-20T09:41:12.208+00:00", "tag": [tag]},
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
    "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "270427003", "display": "Patient-initiated encounter"}]}],
    "priority": {"coding": [{"system": "http://snomed.info/sct", "code": "709122007", "display": "As soon as possible (qualifier value)"}]},
    "subject": {"reference": "Patient/p1", "display": "Amy V. Shaw"},
    "participant": [{"type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PPRF", "display": "primary performer"}]}],
                     "individual": {"reference": "Practitioner/pr1", "display": "Dr. Ronald Bone"}}],
    "period": {"start": "2026-11-20T09:00:00+00:00", "end": "2026-11-20T09:40:00+00:00"},
    "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertensive disorder, systemic arterial (disorder)"}]}],
    "location": [{"location": {"reference": "Location/l1", "display": "Clinic room 3"}, "status": "completed"}],
    "serviceProvider": {"reference": "Organization/org1", "display": "Good Health Clinic"},
}
entries = []
for i in range(1, search_entries + 1):
    resource = dict(enc, id=f"e{i}")
    entries.append({"fullUrl": f"{base}/Encounter/e{i}", "resource": resource, "search": {"mode": "match"}})
with open(f"{www}/encounters.json", "w") as f:
    json.dump({"resourceType": "Bundle", "type": "searchset", "total": search_entries,
               "link": [{"relation": "self", "url": base + "/Encounter?status=finished"}], "entry": entries}, f, **compact)
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
g PutRouteTable <<'JSON'
{"route_table": {"name": "main", "base_path": "/fhir", "routes": [
  {"id": "metadata", "path": "/metadata", "methods": ["GET"], "proxy": {"upstream": "static"}},
  {"id": "search", "path": "/{type}", "methods": ["GET"], "proxy": {"upstream": "static"}},
  {"id": "read", "path": "/{type}/{id}", "methods": ["GET", "HEAD"], "proxy": {"upstream": "static"}},
  {"id": "vread", "path": "/{type}/{id}/_history/{vid}", "methods": ["GET"], "proxy": {"upstream": "static"}},
  {"id": "export-system", "path": "/$export", "methods": ["GET", "POST"], "handler": {"name": "export", "upstream": "static"}},
  {"id": "export-status", "path": "/$export-poll-status", "methods": ["GET", "DELETE"], "handler": {"name": "export", "upstream": "static"}},
  {"id": "export-file", "path": "/$export-file", "methods": ["GET"], "handler": {"name": "export", "upstream": "static"}}]}}
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
wait_http "http://127.0.0.1:$proxy_port/fhir/metadata" 200
# Sanity: every path answers the same resource.
for url in "http://127.0.0.1:$static_port/fhir/Patient/p1" "http://127.0.0.1:$proxy_port/fhir/Patient/p1" \
  "http://$dp_addr/fhir/Patient/p1"; do
  curl -sf --max-time 5 -H "$auth" "$url" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["id"] == "p1", r' \
    || die "$url did not return Patient/p1"
done
# The narrowed search: every path answers a searchset Bundle with all SEARCH_ENTRIES Encounters, the data plane's
# with every fullUrl moved to its own base (it sent the search upstream with `_tag` added, and verified each entry).
search_path="/fhir/Encounter?status=finished"
for base in "http://127.0.0.1:$static_port" "http://127.0.0.1:$proxy_port" "http://$dp_addr"; do
  fullurl_base="http://127.0.0.1:$static_port/fhir"
  [[ "$base" == "http://$dp_addr" ]] && fullurl_base="http://$dp_addr/fhir"
  curl -sf --max-time 5 -H "$auth" "$base$search_path" | python3 -c '
import json, sys
n, base = int(sys.argv[1]), sys.argv[2]
b = json.load(sys.stdin)
assert b.get("resourceType") == "Bundle" and b.get("type") == "searchset", "not a searchset Bundle"
entries = b.get("entry") or []
ids = sorted(e["resource"]["id"] for e in entries)
assert ids == sorted("e%d" % i for i in range(1, n + 1)), "entries: %s" % ids
bad = [e.get("fullUrl") for e in entries if e.get("fullUrl") != "%s/Encounter/%s" % (base, e["resource"]["id"])]
assert not bad, "fullUrls: %s" % bad
' "$SEARCH_ENTRIES" "$fullurl_base" || die "$base$search_path did not return all $SEARCH_ENTRIES Encounters (fullUrls on $fullurl_base)"
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
reset_hwm() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || log "cannot reset VmHWM of $1 (peak is since start)"; }
sys_irq() { awk '/^cpu / { print $7 + $8 }' /proc/stat; }           # irq softirq (loopback TCP lands here)

idle_rss_kb="$(proc_kb "$dp_pid" VmRSS)"
idle_hwm_kb="$(proc_kb "$dp_pid" VmHWM)"
log "data plane idle: VmRSS ${idle_rss_kb} kB, VmHWM ${idle_hwm_kb} kB"

declare -A R # results: R[key,field]
run_wrk() { # key url proxy-pid|"" [header]
  local key="$1" url="$2" proxy="$3" header="${4:-}" args=(-t"$THREADS" -c"$CONNS" --latency)
  [[ -n "$header" ]] && args+=(-H "$header")
  log "wrk $key: $url (${WARMUP}s warm-up, ${DURATION}s measured)"
  wrk "${args[@]}" -d"${WARMUP}s" "$url" >/dev/null
  local up_pids proxy_pids=() u0 p0 u1 p1 s0 s1 q0 q1 out="$work/wrk-$key.txt"
  mapfile -t up_pids < <(tree_pids "$static_pid")
  [[ -n "$proxy" ]] && mapfile -t proxy_pids < <(tree_pids "$proxy")
  s0="$(sys_busy)" q0="$(sys_irq)"
  u0="$(cpu_ticks "${up_pids[@]}")"
  p0="$( ((${#proxy_pids[@]})) && cpu_ticks "${proxy_pids[@]}" || echo 0)"
  local TIMEFORMAT='%U %S'
  { time wrk "${args[@]}" -d"${DURATION}s" "$url" >"$out" 2>&1; } 2>"$work/time-$key.txt"
  s1="$(sys_busy)" q1="$(sys_irq)"
  u1="$(cpu_ticks "${up_pids[@]}")"
  p1="$( ((${#proxy_pids[@]})) && cpu_ticks "${proxy_pids[@]}" || echo 0)"
  R[$key,rps]="$(awk '/^Requests\/sec/ { print $2 }' "$out")"
  R[$key,reqs]="$(awk '/requests in/ { print $1 }' "$out")"
  R[$key,p50]="$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")"
  R[$key,p99]="$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")"
  R[$key,errors]="$(awk '/Non-2xx/ { n += $NF } /Socket errors/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$out")"
  R[$key,cpu_wrk]="$(awk -v d="$DURATION" '{ printf "%.2f", ($1 + $2) / d }' "$work/time-$key.txt")"
  R[$key,cpu_up]="$(awk -v a="$u0" -v b="$u1" -v hz="$hz" -v d="$DURATION" 'BEGIN { printf "%.2f", (b - a) / hz / d }')"
  R[$key,cpu_proxy]="$(awk -v a="$p0" -v b="$p1" -v hz="$hz" -v d="$DURATION" 'BEGIN { printf "%.2f", (b - a) / hz / d }')"
  R[$key,cpu_irq]="$(awk -v a="$q0" -v b="$q1" -v hz="$hz" -v d="$DURATION" 'BEGIN { printf "%.2f", (b - a) / hz / d }')"
  # Every other process on the machine (e.g. someone's cargo build): should be ~0, else the row is contaminated.
  R[$key,cpu_other]="$(awk -v s0="$s0" -v s1="$s1" -v hz="$hz" -v d="$DURATION" -v w="${R[$key,cpu_wrk]}" -v u="${R[$key,cpu_up]}" -v p="${R[$key,cpu_proxy]}" \
    'BEGIN { o = (s1 - s0) / hz / d - w - u - p; if (o < 0) o = 0; printf "%.2f", o }')"
  R[$key,us_per_req]="$(awk -v a="$p0" -v b="$p1" -v hz="$hz" -v n="${R[$key,reqs]}" 'BEGIN { if (n > 0 && b > a) printf "%.1f", (b - a) / hz / n * 1e6; else print "–" }')"
  [[ "${R[$key,errors]}" == 0 ]] || log "WARNING: $key had ${R[$key,errors]} errors / non-2xx responses"
}

meta=/fhir/metadata
read_path=/fhir/Patient/p1
run_wrk direct_meta "http://127.0.0.1:$static_port$meta" ""
run_wrk nginx_meta "http://127.0.0.1:$proxy_port$meta" "$proxy_pid"
run_wrk dp_meta "http://$dp_addr$meta" "$dp_pid"
mint
run_wrk direct_read "http://127.0.0.1:$static_port$read_path" "" "$auth"
run_wrk nginx_read "http://127.0.0.1:$proxy_port$read_path" "$proxy_pid" "$auth"
run_wrk dp_read "http://$dp_addr$read_path" "$dp_pid" "$auth"
# A narrowed search (SEARCH_ENTRIES Encounters): the data plane adds `_tag`, verifies every entry, rewrites fullUrls.
mint
run_wrk direct_search "http://127.0.0.1:$static_port$search_path" "" "$auth"
run_wrk nginx_search "http://127.0.0.1:$proxy_port$search_path" "$proxy_pid" "$auth"
run_wrk dp_search "http://$dp_addr$search_path" "$dp_pid" "$auth"
# The floor of the stack the data plane is built on: hyper + hyper-util + tokio with no logic (bare-proxy.rs), in the
# data plane's runtime shape (two work-stealing workers) and one single-threaded runtime per core. The multi one
# also relays the narrowed search (the same upstream bytes as the data plane's row, no `_tag`, nothing checked).
bare_modes=()
if [[ -x "$bin/bare-proxy" ]]; then
  mint
  for mode in multi per-core; do
    "$bin/bare-proxy" 127.0.0.1:0 "http://127.0.0.1:$static_port" "$work/upstream.token" "$mode" >"$work/bare-$mode.out" 2>&1 & bare_pid=$!; pids+=("$bare_pid")
    bare_addr="$(wait_for_line "$work/bare-$mode.out")"
    wait_http "http://$bare_addr$read_path" 200
    run_wrk "bare_${mode//-/}_read" "http://$bare_addr$read_path" "$bare_pid" "$auth"
    [[ "$mode" == multi ]] && run_wrk bare_multi_search "http://$bare_addr$search_path" "$bare_pid" "$auth"
    bare_modes+=("$mode")
    kill -TERM "$bare_pid" 2>/dev/null || true
  done
fi
# Auditing, on the second data plane: a tenant not audited, one relaxed, one strict (same read, same upstream). The
# first seconds of audited load on a fresh spool cost 20-50 % more than the steady state (bench/audit.sh's round 0):
# AUDIT_WARMUP seconds of each audited mode first, not measured.
mint
for h in "$auth_relaxed" "$auth_strict"; do
  log "audit warm-up: ${AUDIT_WARMUP}s"
  wrk -t"$THREADS" -c"$CONNS" -d"${AUDIT_WARMUP}s" -H "$h" "http://$dpa_addr$read_path" >/dev/null
done
run_wrk dpa_off "http://$dpa_addr$read_path" "$dpa_pid" "$auth"
run_wrk dpa_relaxed "http://$dpa_addr$read_path" "$dpa_pid" "$auth_relaxed"
run_wrk dpa_strict "http://$dpa_addr$read_path" "$dpa_pid" "$auth_strict"
audit_metric() { curl -s --max-time 5 "http://$dpa_admin/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'; }
for _ in $(seq 1 100); do [[ "$(audit_metric fhirgw_dp_audit_oldest_unshipped_seconds)" == 0 ]] && break; sleep 0.1; done
audit_written="$(audit_metric fhirgw_dp_audit_events_written_total)"
audit_dropped="$(audit_metric fhirgw_dp_audit_events_dropped_total)"
audit_shipped="$(audit_metric fhirgw_dp_audit_events_shipped_total)"
audit_lines="$(wc -l <"$work/audit.ndjson")"
after_wrk_rss_kb="$(proc_kb "$dp_pid" VmRSS)"
after_wrk_hwm_kb="$(proc_kb "$dp_pid" VmHWM)"

declare -A S
stream() { # key repeat url want-bytes(exact, or "" for any size > 90% of the source) source-bytes [curl args...]
  local key="$1" repeat="$2" url="$3" want="$4" src="$5" speeds=() line code size secs rc
  shift 5
  log "streaming: $key ($repeat downloads)"
  S[$key,fail]="" S[$key,size]=""
  for _ in $(seq 1 "$repeat"); do
    line="$(curl -s -o /dev/null --max-time 300 -w '%{http_code} %{size_download} %{time_total}' "$@" "$url")" && rc=0 || rc=$?
    read -r code size secs <<<"$line"
    S[$key,size]="$size"
    if [[ "$rc" != 0 || "$code" != 200 ]] || { [[ -n "$want" ]] && [[ "$size" != "$want" ]]; } || ((size < src * 9 / 10)); then
      S[$key,fail]="curl exit $rc, HTTP $code, $size bytes received after ${secs} s"
      log "WARNING: $key: ${S[$key,fail]}"
      break
    fi
    # Throughput in source (upstream) bytes per second: what the proxy had to read and check.
    speeds+=("$(awk -v s="$src" -v t="$secs" 'BEGIN { printf "%.0f", s / t / 1048576 }')")
  done
  S[$key,all]="${speeds[*]:-–}"
  S[$key,median]="$( ((${#speeds[@]})) && printf '%s\n' "${speeds[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }' || echo 0)"
}
dp_stream() { # like stream, for the data plane: also its peak RSS (VmHWM reset just before)
  local key="$1"
  reset_hwm "$dp_pid"
  S[$key,rss_before]="$(proc_kb "$dp_pid" VmRSS)"
  stream "$@"
  S[$key,hwm]="$(proc_kb "$dp_pid" VmHWM)"
  S[$key,rss_after]="$(proc_kb "$dp_pid" VmRSS)"
}
bundle_bytes="$(stat -c %s "$work/www/bundle.json")"
# Untimed: page the files into the cache (the sparse file's zero pages are materialised on first read).
curl -s -o /dev/null --max-time 120 "http://127.0.0.1:$static_port/fhir/Observation" || true
curl -s -o /dev/null --max-time 120 "http://127.0.0.1:$static_port/fhir/Binary/big/_history/1" || true
# (No unverified row: every answer the data plane relays is checked, `metadata` included; raw bytes stream only as
# the content of a Binary whose metadata was verified, the Binary row below.)
mint
stream direct_bundle "$BUNDLE_REPEAT" "http://127.0.0.1:$static_port/fhir/Observation" "$bundle_bytes" "$bundle_bytes" -H "$auth"
stream nginx_bundle "$BUNDLE_REPEAT" "http://127.0.0.1:$proxy_port/fhir/Observation" "$bundle_bytes" "$bundle_bytes" -H "$auth"
dp_stream dp_bundle "$BUNDLE_REPEAT" "http://$dp_addr/fhir/Observation" "" "$bundle_bytes" -H "$auth"
mint
binary_content=/fhir/Binary/big/_history/1
stream direct_binary "$STREAM_REPEAT" "http://127.0.0.1:$static_port$binary_content" "$big_bytes" "$big_bytes"
stream nginx_binary "$STREAM_REPEAT" "http://127.0.0.1:$proxy_port$binary_content" "$big_bytes" "$big_bytes"
dp_stream dp_binary "$STREAM_REPEAT" "http://$dp_addr/fhir/Binary/big" "$big_bytes" "$big_bytes" -H "$auth" \
  -H "Accept: application/octet-stream"

# Bulk export: nginx serves the file at its own URL; the data plane only through the link it signed, reached as a
# client does (kick-off, status, manifest). Every line is checked (kept lines pass as they came); all are kept and the
# file is compact JSON, so the client receives exactly as many bytes as the upstream sent.
export_file_link() { # -> the data plane's signed link to the NDJSON file, through kick-off and status (bench token)
  local hdrs="$work/export-kickoff.headers" body="$work/export-kickoff.body" code status
  code="$(curl -s -D "$hdrs" -o "$body" -w '%{http_code}' --max-time 10 -H "$auth" -H 'Prefer: respond-async' \
    -H 'Accept: application/fhir+json' "http://$dp_addr/fhir/\$export?_type=Observation")" || true
  [[ "$code" == 202 ]] || die "export kick-off through the data plane: HTTP $code $(head -c 1000 "$body")"
  status="$(awk 'tolower($1) == "content-location:" { print $2 }' "$hdrs" | tr -d '\r')"
  [[ "$status" == "http://$dp_addr/fhir/\$export-poll-status?_token="* ]] || die "export kick-off: status link '$status'"
  code="$(curl -s -o "$work/export-manifest.json" -w '%{http_code}' --max-time 10 -H "$auth" -H 'Accept: application/json' "$status")" || true
  [[ "$code" == 200 ]] || die "export status through the data plane: HTTP $code $(head -c 1000 "$work/export-manifest.json")"
  python3 - "$work/export-manifest.json" "http://$dp_addr/fhir/\$export-file?_token=" "127.0.0.1:$static_port" <<'PY' \
    || die "the data plane's export manifest: $(head -c 1000 "$work/export-manifest.json")"
import json, sys
text = open(sys.argv[1]).read()
manifest = json.loads(text)
assert sys.argv[3] not in text, "the upstream's address leaked into the manifest"
assert manifest.get("requiresAccessToken") is True, "requiresAccessToken"
output = manifest.get("output") or []
assert len(output) == 1 and output[0].get("type") == "Observation", "output: %s" % output
assert output[0]["url"].startswith(sys.argv[2]), "not a signed file link: %s" % output[0]["url"]
print(output[0]["url"])
PY
}
export_bytes="$(stat -c %s "$work/www/observation.ndjson")"
export_lines="$(wc -l <"$work/www/observation.ndjson")"
export_path=/fhir/bulk-files/observation.ndjson
ndjson=(-H "Accept: application/fhir+ndjson")
curl -s -o /dev/null --max-time 120 "http://127.0.0.1:$static_port$export_path" || true # untimed: into the cache
mint
stream direct_export "$EXPORT_REPEAT" "http://127.0.0.1:$static_port$export_path" "$export_bytes" "$export_bytes" "${ndjson[@]}"
stream nginx_export "$EXPORT_REPEAT" "http://127.0.0.1:$proxy_port$export_path" "$export_bytes" "$export_bytes" "${ndjson[@]}" -H "$auth"
export_link="$(export_file_link)"
dp_stream dp_export "$EXPORT_REPEAT" "$export_link" "$export_bytes" "$export_bytes" "${ndjson[@]}" -H "$auth"

log "opening $IDLE_CONNS idle keep-alive connections to the data plane"
dp_port="${dp_addr##*:}"
reset_hwm "$dp_pid"
conn_before_kb="$(proc_kb "$dp_pid" VmRSS)"
python3 "$bench/idle_conns.py" 127.0.0.1 "$dp_port" "$meta" "$IDLE_CONNS" "$IDLE_HOLD" "$work/idle.ready" \
  >"$work/idle.out" 2>"$work/idle.err" & idle_pid=$!; pids+=("$idle_pid")
for _ in $(seq 1 1200); do [[ -s "$work/idle.ready" ]] && break; kill -0 "$idle_pid" 2>/dev/null || break; sleep 0.1; done
[[ -s "$work/idle.ready" ]] || die "idle_conns.py did not report: $(cat "$work/idle.err")"
sleep 2 # let the server settle with every connection idle
conn_after_kb="$(proc_kb "$dp_pid" VmRSS)"
conn_hwm_kb="$(proc_kb "$dp_pid" VmHWM)"
conn_established="$(ss -Htn state established "( sport = :$dp_port )" | wc -l)"
conn_threads="$(proc_kb "$dp_pid" Threads)"
idle_report="$(cat "$work/idle.ready")"
for _ in $(seq 1 $(((IDLE_HOLD + 30) * 10))); do kill -0 "$idle_pid" 2>/dev/null || break; sleep 0.1; done
idle_after_hold="$(tail -n1 "$work/idle.out")"
conn_held="$(json_get held <<<"$idle_report")"
conn_ok="$(json_get ok <<<"$idle_report")"
conn_open_secs="$(json_get open_secs <<<"$idle_report")"
still_open="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("still_open_after_hold", "?"))' "$idle_after_hold" 2>/dev/null || echo '?')"
sleep 1
conn_closed_kb="$(proc_kb "$dp_pid" VmRSS)"

# The same against the nginx reverse proxy, for scale: the sum of its processes' VmRSS.
nginx_rss() { local sum=0 p; for p in $(tree_pids "$proxy_pid"); do sum=$((sum + $(proc_kb "$p" VmRSS))); done; echo "$sum"; }
log "opening $IDLE_CONNS idle keep-alive connections to the nginx reverse proxy"
rm -f "$work/idle-nginx.ready"
ngx_before_kb="$(nginx_rss)"
python3 "$bench/idle_conns.py" 127.0.0.1 "$proxy_port" "$meta" "$IDLE_CONNS" 5 "$work/idle-nginx.ready" \
  >"$work/idle-nginx.out" 2>"$work/idle-nginx.err" & idle_pid=$!; pids+=("$idle_pid")
for _ in $(seq 1 1200); do [[ -s "$work/idle-nginx.ready" ]] && break; kill -0 "$idle_pid" 2>/dev/null || break; sleep 0.1; done
[[ -s "$work/idle-nginx.ready" ]] || die "idle_conns.py (nginx) did not report: $(cat "$work/idle-nginx.err")"
sleep 2
ngx_after_kb="$(nginx_rss)"
ngx_held="$(json_get held <"$work/idle-nginx.ready")"
for _ in $(seq 1 400); do kill -0 "$idle_pid" 2>/dev/null || break; sleep 0.1; done

# ---------------------------------------------------------------------------------------------------- profiling
if [[ -n "$PERF_DIR" ]]; then
  mkdir -p "$PERF_DIR"
  mint
  for key in dp_meta dp_read dp_search; do
    case "$key" in
      dp_meta) url="http://$dp_addr$meta"; hdr=() ;;
      dp_read) url="http://$dp_addr$read_path"; hdr=(-H "$auth") ;;
      dp_search) url="http://$dp_addr$search_path"; hdr=(-H "$auth") ;;
    esac
    log "perf record on the data plane: $key (10 s)"
    perf record -q -F 199 --call-graph dwarf,32768 -p "$dp_pid" -o "$PERF_DIR/$key.data" -- sleep 10 2>/dev/null & perf_pid=$!
    wrk -t"$THREADS" -c"$CONNS" -d10s "${hdr[@]}" "$url" >"$PERF_DIR/$key.wrk.txt"
    wait "$perf_pid" || true
    # System calls per request (tracepoint counts over a 5 s wrk run).
    perf stat -x, -o "$PERF_DIR/$key.syscalls.csv" -p "$dp_pid" -e 'raw_syscalls:sys_enter' \
      -e 'syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_read,syscalls:sys_enter_write' \
      -- sleep 5 2>/dev/null & perf_pid=$!
    wrk -t"$THREADS" -c"$CONNS" -d5s "${hdr[@]}" "$url" >"$PERF_DIR/$key.syscalls.wrk.txt"
    wait "$perf_pid" || true
    reqs="$(awk '/requests in/ { print $1 }' "$PERF_DIR/$key.syscalls.wrk.txt")"
    awk -F, -v n="$reqs" '$1 ~ /^[0-9]+$/ { printf "%-36s %12d  %6.2f per request\n", $3, $1, $1 / n }' "$PERF_DIR/$key.syscalls.csv" >"$PERF_DIR/$key.syscalls.txt"
    perf report -i "$PERF_DIR/$key.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null | grep -v '^$' | head -80 >"$PERF_DIR/$key.self.txt" || true
    perf report -i "$PERF_DIR/$key.data" --children --sort symbol --stdio -g none 2>/dev/null | grep -v '^$' | head -300 >"$PERF_DIR/$key.children.txt" || true
  done
  perf_download() { # key what url: perf record on the data plane while one download runs
    local key="$1" what="$2" url="$3"
    mint
    log "perf record on the data plane: one $what download"
    perf record -q -F 199 --call-graph dwarf,32768 -p "$dp_pid" -o "$PERF_DIR/$key.data" 2>/dev/null & perf_pid=$!
    sleep 0.5
    curl -s -o /dev/null --max-time 300 -H "$auth" "$url" || true
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" || true
    perf report -i "$PERF_DIR/$key.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null | grep -v '^$' | head -80 >"$PERF_DIR/$key.self.txt" || true
    perf report -i "$PERF_DIR/$key.data" --children --sort symbol --stdio -g none 2>/dev/null | grep -v '^$' | head -300 >"$PERF_DIR/$key.children.txt" || true
  }
  perf_download dp_bundle Bundle "http://$dp_addr/fhir/Observation"
  perf_download dp_export "export file" "$export_link"
fi

# ---------------------------------------------------------------------------------------------------- report
sub_ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
verdict() { [[ "$1" == 1 ]] && echo "**met**" || echo "**not met**"; }
quot() { # a b -> a ÷ b with two decimals, or – when either is not a measured number
  awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^-?[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a / b; else print "–" }'
}
goal() { # value op(<=, >=, <) limit -> **met**, **not met**, or – when nothing was measured
  awk -v v="$1" -v op="$2" -v g="$3" 'BEGIN {
    if (v !~ /^-?[0-9.]+$/) { print "–"; exit }
    ok = (op == "<=") ? v <= g : (op == ">=") ? v >= g : v < g
    print ok ? "**met**" : "**not met**" }'
}
per_conn="$(awk -v a="$conn_after_kb" -v b="$conn_before_kb" -v n="$conn_held" 'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "–" }')"
per_conn_peak="$(awk -v a="$conn_hwm_kb" -v b="$conn_before_kb" -v n="$conn_held" 'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "–" }')"
ngx_per_conn="$(awk -v a="$ngx_after_kb" -v b="$ngx_before_kb" -v n="$ngx_held" 'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "–" }')"
bundle_mib="$(awk -v b="$bundle_bytes" 'BEGIN { printf "%.0f", b / 1048576 }')"
export_mib="$(awk -v b="$export_bytes" 'BEGIN { printf "%.0f", b / 1048576 }')"

if [[ -n "${FHIRGW_BIN_DIR:-}" ]]; then
  built="binaries from $bin (FHIRGW_BIN_DIR)${FHIRGW_BIN_LABEL:+, $FHIRGW_BIN_LABEL}"
else
  built="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
  git -C "$root" status --porcelain -- '*.rs' '*.toml' 2>/dev/null | grep -q . && built="$built + uncommitted changes"
fi
echo "### Run $(date -u +%Y-%m-%dT%H:%MZ), fhirgw $built"
echo
echo "$(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(free -g | awk '/Mem:/ { print $2 }') GiB," \
  "Linux $(uname -r), $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -n1 | awk '{ print "wrk " $2 }')." \
  "wrk -t$THREADS -c$CONNS, ${WARMUP} s warm-up + ${DURATION} s measured per row; nginx proxy worker_processes $PROXY_WORKERS."
echo
echo "#### Against the goals of issue 16 (ratios to rows of this run; details in the sections below)"
echo
echo "| what | this run | goal | |"
echo "|---|---:|---:|---|"
cpu_goal() { # label dp-key reference-key reference-label limit
  local a="${R[$2,us_per_req]:-–}" b="${R[$3,us_per_req]:-–}" q
  q="$(quot "$a" "$b")"
  echo "| $1: CPU per request, data plane ÷ $4 | $a ÷ $b µs = **$q×** | ≤ $5× | $(goal "$q" "<=" "$5") |"
}
stream_goal() { # label kind limit
  local a="${S[dp_$2,median]}" b="${S[nginx_$2,median]}" q ok
  q="$(quot "$a" "$b")"
  ok="$(goal "$q" ">=" "$3")"
  [[ -z "${S[dp_$2,fail]}" ]] || ok="**failed**: ${S[dp_$2,fail]}"
  echo "| $1: MiB/s, data plane ÷ nginx reverse proxy | $a ÷ $b = **$q×** | ≥ $3× | $ok |"
  echo "| same, data plane peak RSS | $(mb "${S[dp_$2,hwm]}") MiB | < 32 MiB | $(goal "$(mb "${S[dp_$2,hwm]}")" "<" 32) |"
}
cpu_goal "verified read (\`GET $read_path\` + bearer)" dp_read bare_multi_read "bare hyper proxy (multi runtime)" 1.25
cpu_goal "same" dp_read nginx_read "nginx reverse proxy" 1.6
stream_goal "verified $bundle_mib MiB searchset Bundle" bundle 0.75
echo "| idle keep-alive connection, resident KiB each ($conn_held held) | **$per_conn** (nginx $ngx_per_conn) | ≤ 8 | $(goal "$per_conn" "<=" 8) |"
cpu_goal "narrowed search returning a $SEARCH_ENTRIES-entry Bundle (\`GET $search_path\` + bearer)" dp_search bare_multi_search "bare hyper proxy (multi runtime) on the same bytes" 1.5
stream_goal "bulk export NDJSON file of $export_mib MiB, verified line by line" export 0.75
stream_goal "$BIG_MB MiB Binary content (metadata verified)" binary 0.9
echo
echo "#### 1. Small requests (~1.5 KB JSON reads; a $SEARCH_ENTRIES-entry searchset Bundle)"
echo
echo "| path | request | req/s | p50 ms | p99 ms | vs direct | vs nginx-proxy | added p50 vs direct | CPU cores: wrk / upstream / proxy / softirq / other | proxy CPU µs/req | errors |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
row() { # key path-label request-label
  local k="$1" kind="${1##*_}"
  local d="direct_$kind" n="nginx_$kind"
  local vs_direct vs_nginx added
  vs_direct="$(ratio "${R[$k,rps]}" "${R[$d,rps]}")"
  [[ "$k" == direct_* ]] && vs_nginx="–" || vs_nginx="$(ratio "${R[$k,rps]}" "${R[$n,rps]}")"
  [[ "$k" == direct_* ]] && added="–" || added="$(sub_ms "${R[$k,p50]}" "${R[$d,p50]}") ms"
  echo "| $2 | $3 | ${R[$k,rps]} | ${R[$k,p50]} | ${R[$k,p99]} | $vs_direct | $vs_nginx | $added | ${R[$k,cpu_wrk]} / ${R[$k,cpu_up]} / ${R[$k,cpu_proxy]} / ${R[$k,cpu_irq]} / ${R[$k,cpu_other]} | ${R[$k,us_per_req]} | ${R[$k,errors]} |"
}
row direct_meta "(a) direct static nginx" "GET $meta"
row nginx_meta "(b) nginx reverse proxy" "GET $meta"
row dp_meta "(c) fhirgw data plane" "GET $meta ($meta_mode)"
row direct_read "(a) direct static nginx" "GET $read_path + bearer"
row nginx_read "(b) nginx reverse proxy" "GET $read_path + bearer"
row dp_read "(c) fhirgw data plane" "GET $read_path + bearer (JWT, grant, verified body)"
for mode in "${bare_modes[@]}"; do
  row "bare_${mode//-/}_read" "(d) bare hyper proxy, $mode runtime" "GET $read_path + bearer (no checks: the stack's floor)"
done
row direct_search "(a) direct static nginx" "GET $search_path + bearer"
row nginx_search "(b) nginx reverse proxy" "GET $search_path + bearer"
row dp_search "(c) fhirgw data plane" "GET $search_path + bearer (JWT, grant, narrowed with \`_tag\`, $SEARCH_ENTRIES entries verified, fullUrls rewritten)"
[[ -n "${R[bare_multi_search,rps]:-}" ]] && row bare_multi_search "(d) bare hyper proxy, multi runtime" "GET $search_path + bearer (no checks: the stack's floor)"
echo
echo "Goals (data plane ≥ 1.2× nginx-proxy req/s; added p50 ≤ nginx-proxy's added p50):"
echo
echo "| route | dp / nginx-proxy req/s | goal ≥ 1.20 | dp added p50 | nginx added p50 | goal dp ≤ nginx |"
echo "|---|---:|---|---:|---:|---|"
for kind in meta read; do
  r="$(ratio "${R[dp_$kind,rps]}" "${R[nginx_$kind,rps]}")"
  da="$(sub_ms "${R[dp_$kind,p50]}" "${R[direct_$kind,p50]}")"
  na="$(sub_ms "${R[nginx_$kind,p50]}" "${R[direct_$kind,p50]}")"
  t_ok="$(awk -v r="$r" 'BEGIN { print (r >= 1.2) ? 1 : 0 }')"
  l_ok="$(awk -v a="$da" -v b="$na" 'BEGIN { print (a <= b) ? 1 : 0 }')"
  label="GET $meta"; [[ "$kind" == read ]] && label="GET $read_path"
  echo "| $label | $r | $(verdict "$t_ok") | $da ms | $na ms | $(verdict "$l_ok") |"
done
echo
search_q="$(quot "${R[dp_search,us_per_req]}" "${R[bare_multi_search,us_per_req]:-–}")"
echo "Narrowed search (issue 16): data plane CPU per request ÷ bare hyper proxy (multi runtime) on the same upstream bytes:" \
  "${R[dp_search,us_per_req]} ÷ ${R[bare_multi_search,us_per_req]:-–} µs = **$search_q×**, goal ≤ 1.5×: $(goal "$search_q" "<=" 1.5)."
echo
echo "#### 1b. Verified reads with auditing (second data plane: --audit-dir, NDJSON file sink; same run)"
echo
echo "| path | tenant audit mode | req/s | p50 ms | p99 ms | CPU cores: wrk / upstream / proxy / softirq / other | proxy CPU µs/req | CPU/read vs (c) | goal | errors |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"
arow() { # key label goal-ratio
  local k="$1" r ok goal="–"
  r="$(ratio "${R[$k,us_per_req]}" "${R[dp_read,us_per_req]}")"
  if [[ -n "$3" ]]; then
    ok="$(awk -v r="$r" -v g="$3" 'BEGIN { print (r <= g) ? 1 : 0 }')"
    goal="≤ $3: $(verdict "$ok")"
  fi
  echo "| (c) fhirgw data plane, audit spool on | $2 | ${R[$k,rps]} | ${R[$k,p50]} | ${R[$k,p99]} | ${R[$k,cpu_wrk]} / ${R[$k,cpu_up]} / ${R[$k,cpu_proxy]} / ${R[$k,cpu_irq]} / ${R[$k,cpu_other]} | ${R[$k,us_per_req]} | $r | $goal | ${R[$k,errors]} |"
}
echo "| (c) fhirgw data plane, no spool (row c above) | – | ${R[dp_read,rps]} | ${R[dp_read,p50]} | ${R[dp_read,p99]} | ${R[dp_read,cpu_wrk]} / ${R[dp_read,cpu_up]} / ${R[dp_read,cpu_proxy]} / ${R[dp_read,cpu_irq]} / ${R[dp_read,cpu_other]} | ${R[dp_read,us_per_req]} | 1.00 | | ${R[dp_read,errors]} |"
arow dpa_off "off (not audited)" ""
arow dpa_relaxed "relaxed" "1.10"
arow dpa_strict "strict (each answer waits for its fsync)" "1.25"
echo
echo "Audit events: $audit_written written to the spool, $audit_shipped shipped, $audit_dropped dropped;" \
  "$audit_lines lines in the NDJSON sink; spool on $(df -P "$work" | awk 'NR == 2 { print $1 }')."
echo
echo "#### 2. Streaming large responses (curl -o /dev/null; median of $STREAM_REPEAT downloads of the Binary content, $BUNDLE_REPEAT of the Bundle, $EXPORT_REPEAT of the NDJSON file; MiB/s of upstream bytes)"
echo
echo "| body | path | MiB/s (median) | all runs | vs direct | vs nginx-proxy | data plane peak RSS (VmHWM) | goal < 32 MiB |"
echo "|---|---|---:|---|---:|---:|---:|---|"
srow() { # kind label
  local k="$1" label="$2" d n p hwm ok
  d="$(ratio "${S[dp_$k,median]}" "${S[direct_$k,median]}")"
  n="$(ratio "${S[dp_$k,median]}" "${S[nginx_$k,median]}")"
  hwm="${S[dp_$k,hwm]}"
  ok="$(verdict "$(awk -v k="$hwm" 'BEGIN { print (k < 32 * 1024) ? 1 : 0 }')")"
  [[ -z "${S[dp_$k,fail]}" ]] || ok="$ok (but the download failed)"
  echo "| $label | (a) direct static nginx | ${S[direct_$k,median]} | ${S[direct_$k,all]} | 1.00 | – | | |"
  echo "| $label | (b) nginx reverse proxy | ${S[nginx_$k,median]} | ${S[nginx_$k,all]} | $(ratio "${S[nginx_$k,median]}" "${S[direct_$k,median]}") | 1.00 | | |"
  echo "| $label | (c) fhirgw data plane, $3 | ${S[dp_$k,median]} | ${S[dp_$k,all]} | $d | $n | $(mb "$hwm") MiB | $ok |"
}
srow bundle "$bundle_mib MiB searchset Bundle" "\`GET /fhir/Observation\` + bearer (verified entry by entry)"
srow binary "$BIG_MB MiB Binary content" "\`GET /fhir/Binary/big\` + bearer, \`Accept: application/octet-stream\` (metadata verified, then the content of that version streamed)"
srow export "$export_mib MiB bulk export NDJSON ($export_lines Observations)" "\`GET\` the signed \`\$export-file\` link (from \`GET /fhir/\$export?_type=Observation\`, then its status link) + bearer (verified line by line)"
echo
for k in direct_bundle nginx_bundle dp_bundle direct_binary nginx_binary dp_binary direct_export nginx_export dp_export; do
  [[ -z "${S[$k,fail]}" ]] || echo "- **$k failed**: ${S[$k,fail]}."
done
echo "- Data plane VmRSS before → after:" \
  "Bundle $(mb "${S[dp_bundle,rss_before]}") → $(mb "${S[dp_bundle,rss_after]}") MiB;" \
  "Binary $(mb "${S[dp_binary,rss_before]}") → $(mb "${S[dp_binary,rss_after]}") MiB;" \
  "NDJSON $(mb "${S[dp_export,rss_before]}") → $(mb "${S[dp_export,rss_after]}") MiB."
echo "- Bundle bytes: $bundle_bytes from the upstream, ${S[dp_bundle,size]} to the client through the data plane" \
  "(every entry checked; kept entries pass as the upstream sent them, \`fullUrl\`s moved to the public base). NDJSON bytes:" \
  "$export_bytes from the upstream, ${S[dp_export,size]} to the client (every line checked; all kept, as they came, so the same count)."
echo
echo "#### 3. Data plane memory"
echo
echo "| state | VmRSS MiB | VmHWM MiB |"
echo "|---|---:|---:|"
echo "| idle, configured, a few requests served (before any load) | $(mb "$idle_rss_kb") | $(mb "$idle_hwm_kb") |"
echo "| after the wrk runs (peak since start) | $(mb "$after_wrk_rss_kb") | $(mb "$after_wrk_hwm_kb") |"
echo "| before opening the idle connections | $(mb "$conn_before_kb") | – |"
echo "| $conn_held idle keep-alive connections open | $(mb "$conn_after_kb") | $(mb "$conn_hwm_kb") |"
echo "| after they were closed | $(mb "$conn_closed_kb") | – |"
echo
echo "$IDLE_CONNS connections requested, $conn_held answered and held ($conn_ok with 200) in ${conn_open_secs} s;" \
  "$conn_established established on the server side while measured; $still_open still open after ${IDLE_HOLD} s idle;" \
  "data plane threads: $conn_threads. Cost per idle connection: **$per_conn KiB** resident ($per_conn_peak KiB at peak)."
echo
echo "For scale, the nginx reverse proxy ($PROXY_WORKERS workers) with $ngx_held idle keep-alive connections: VmRSS (all its" \
  "processes) $(mb "$ngx_before_kb") → $(mb "$ngx_after_kb") MiB, **$ngx_per_conn KiB** per connection."
