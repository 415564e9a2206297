#!/usr/bin/env bash
# bench/access.sh — what access control costs next to plain proxying, in one run: a narrowed search, a verified read
# and a filtered Patient/$everything of ~50 MB, each (a) direct to a static nginx upstream, (b) through an nginx
# reverse proxy (plain proxying, upstream token injected) and (c) through the fhirgw data plane with a bearer JWT
# (authentication, grants, `_tag` narrowing, every resource and Bundle entry verified).
#
#   bench/access.sh                build (release) and run everything; prints markdown tables on stdout
#
# Environment (all optional):
#   FHIRGW_BIN_DIR=DIR   use these fhirgw-{controlplane,dataplane,dev-issuer} binaries instead of building
#                        (they are copied into the run's temp dir first, so a rebuild during the run changes nothing)
#   FHIRGW_BIN_LABEL=..  what they were built from (printed with the results)
#   DURATION=10 WARMUP=2 THREADS=2 CONNS=32   wrk parameters per measured row
#   PROXY_WORKERS=auto   nginx reverse proxy worker_processes
#   EVERYTHING_MB=50     size of the $everything Bundle the upstream serves; about 1/3 of its entries are another
#                        tenant's and are dropped by the data plane
#   EVERYTHING_REPEAT=3  downloads per path of the $everything Bundle (median reported)
#
# All traffic stays on 127.0.0.1. Every wait is bounded; every process started here is stopped on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
THREADS="${THREADS:-2}"
CONNS="${CONNS:-32}"
PROXY_WORKERS="${PROXY_WORKERS:-auto}"
EVERYTHING_MB="${EVERYTHING_MB:-50}"
EVERYTHING_REPEAT="${EVERYTHING_REPEAT:-3}"
# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"

# ---------------------------------------------------------------------------------------------------- tools
install_tools
src_bin="$(release_bins)"
ulimit -n 8192 2>/dev/null || true

# ---------------------------------------------------------------------------------------------------- processes
make_work fhirgw-access

mkdir -p "$work/bin"
for b in fhirgw-controlplane fhirgw-dataplane fhirgw-dev-issuer; do cp "$src_bin/$b" "$work/bin/$b"; done
bin="$work/bin"

static_port="$(free_port)"
proxy_port="$(free_port)"
log "preparing $work"
mkdir -p "$work/www" "$work/dp" "$work/dp-fresh" "$work/nginx-static-tmp" "$work/nginx-proxy-tmp"
for t in operator dataplane upstream; do head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/$t.token"; done
head -c 48 /dev/urandom >"$work/paging.key"
chmod 600 "$work"/*.token "$work/paging.key"
upstream_token="$(cat "$work/upstream.token")"

# The upstream's files: Patient/p1 (~1.5 KB), a 10-entry searchset (~15 KB) and the ~EVERYTHING_MB MiB $everything
# Bundle (Patient/p1, then Observations, Conditions and Encounters; every third entry carries another tenant's tag).
python3 - "$work/www" "$EVERYTHING_MB" "http://127.0.0.1:$static_port/fhir" "$root/bench/patient-p1.json" <<'PY'
import json, sys
www, mb, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
DATASET = "https://fhirgw.dev/dataset"
bench, other = {"system": DATASET, "code": "bench"}, {"system": DATASET, "code": "other"}
compact = lambda v: json.dumps(v, separators=(",", ":"))
patient = json.load(open(sys.argv[4]))  # bench/patient-p1.json, shared with bench/proxy.sh (tagged `bench`)
with open(f"{www}/patient-p1.json", "w") as f:
    json.dump(patient, f, indent=1)

def observation(i, tag):
    return {
        "resourceType": "Observation", "id": f"o{i}",
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
             "valueQuantity": {"value": 100 + i % 40, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
             "valueQuantity": {"value": 60 + i % 25, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}],
    }

def condition(i, tag):
    return {
        "resourceType": "Condition", "id": f"c{i}",
        "meta": {"versionId": "2", "lastUpdated": "2026-10-02T11:40:12.044+00:00", "tag": [tag]},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item", "display": "Problem List Item"}]}],
        "severity": {"coding": [{"system": "http://snomed.info/sct", "code": "6736007", "display": "Moderate"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertensive disorder, systemic arterial (disorder)"}], "text": "Hypertension"},
        "subject": {"reference": "Patient/p1", "display": "Amy V. Shaw"},
        "encounter": {"reference": f"Encounter/e{i}"},
        "onsetDateTime": "2019-04-11", "recordedDate": "2019-04-11",
        "recorder": {"reference": "Practitioner/pr1", "display": "Dr. Ronald Bone"},
        "note": [{"text": "Follow up in three months; home blood pressure log reviewed at each visit."}],
    }

def encounter(i, tag):
    return {
        "resourceType": "Encounter", "id": f"e{i}",
        "meta": {"versionId": "1", "lastUpdated": "2026-09-14T15:02:47.310+00:00", "tag": [tag]},
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Encounter for check up (procedure)"}], "text": "Check-up"}],
        "subject": {"reference": "Patient/p1", "display": "Amy V. Shaw"},
        "participant": [{"type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PPRF", "display": "primary performer"}]}],
                         "individual": {"reference": "Practitioner/pr1", "display": "Dr. Ronald Bone"}}],
        "period": {"start": "2026-09-14T14:30:00+00:00", "end": "2026-09-14T15:00:00+00:00"},
        "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"}]}],
        "serviceProvider": {"reference": "Organization/o1", "display": "Acme Healthcare"},
    }

def entry(resource):
    return {"fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}", "resource": resource, "search": {"mode": "match"}}

# The narrowed search's answer: 10 Observations of the bench tenant.
search = {"resourceType": "Bundle", "type": "searchset", "total": 10,
          "link": [{"relation": "self", "url": f"{base}/Observation?code=x&_count=10&_tag={DATASET}|bench"}],
          "entry": [entry(observation(i, bench)) for i in range(1, 11)]}
with open(f"{www}/search.json", "w") as f:
    f.write(compact(search))

# $everything: streamed out entry by entry, never held whole.
kinds = (observation, observation, condition, encounter)
head = compact({"resourceType": "Bundle", "type": "searchset",
                "link": [{"relation": "self", "url": f"{base}/Patient/p1/$everything"}]})[:-1] + ',"entry":['
target = mb * 1024 * 1024
counts = {"entries": 1, "bench": 1, "other": 0}
with open(f"{www}/everything.json", "w") as f:
    first = compact(dict(entry(patient), search={"mode": "match"}))
    f.write(head + first)
    size, i = len(head) + len(first), 0
    while size < target:
        chunk = []
        for _ in range(1000):
            i += 1
            tag = other if i % 3 == 0 else bench
            counts["other" if tag is other else "bench"] += 1
            chunk.append("," + compact(entry(kinds[(i // 3) % len(kinds)](i, tag))))
        data = "".join(chunk)
        f.write(data)
        size += len(data)
    f.write("]}")
    counts["entries"] += i
    counts["bytes"] = size + 2
with open(f"{www}/../everything.counts.json", "w") as f:
    json.dump(counts, f)
PY
chmod -R a+rX "$work/www"

# nginx configurations (templates filled in below). `location` matching ignores the query string, so the search
# answers whatever the data plane adds (`_tag`); `$everything` in a location is a literal, not a variable.
cat >"$work/nginx-static.conf.tmpl" <<'NGINX'
worker_processes 1;
pid @DIR@/nginx-static.pid;
error_log @DIR@/nginx-static.error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    etag off;
    client_body_temp_path @DIR@/nginx-static-tmp/body;
    proxy_temp_path @DIR@/nginx-static-tmp/proxy;
    fastcgi_temp_path @DIR@/nginx-static-tmp/fastcgi;
    uwsgi_temp_path @DIR@/nginx-static-tmp/uwsgi;
    scgi_temp_path @DIR@/nginx-static-tmp/scgi;
    types { }
    server {
        listen 127.0.0.1:@STATIC_PORT@ backlog=4096;
        root @DIR@/www;
        default_type application/fhir+json;
        location = /fhir/Patient/p1 {
            try_files /patient-p1.json =404;
        }
        location = /fhir/Observation {
            try_files /search.json =404;
        }
        location = "/fhir/Patient/p1/$everything" {
            try_files /everything.json =404;
        }
        location / {
            return 404;
        }
    }
}
NGINX
cat >"$work/nginx-proxy.conf.tmpl" <<'NGINX'
worker_processes @PROXY_WORKERS@;
pid @DIR@/nginx-proxy.pid;
error_log @DIR@/nginx-proxy.error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    client_body_temp_path @DIR@/nginx-proxy-tmp/body;
    proxy_temp_path @DIR@/nginx-proxy-tmp/proxy;
    fastcgi_temp_path @DIR@/nginx-proxy-tmp/fastcgi;
    uwsgi_temp_path @DIR@/nginx-proxy-tmp/uwsgi;
    scgi_temp_path @DIR@/nginx-proxy-tmp/scgi;
    upstream static {
        server 127.0.0.1:@STATIC_PORT@;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:@PROXY_PORT@ backlog=4096;
        location / {
            proxy_pass http://static;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Like the data plane's credential injection: replace the caller's Authorization with the upstream's.
            proxy_set_header Authorization "Bearer @UPSTREAM_TOKEN@";
            # Stream big bodies through memory buffers; never spool them to a temp file.
            proxy_max_temp_file_size 0;
        }
    }
}
NGINX
start_nginx_pair "$work/nginx-static.conf.tmpl" "$work/nginx-proxy.conf.tmpl"

log "starting the control plane, the data plane and the dev issuer (RUST_LOG=warn)"
export RUST_LOG=warn
start_control_plane
start_dp() { # name -> sets dp_pid dp_addr dp_admin
  "$bin/fhirgw-dataplane" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --control-plane "http://$cp_addr" \
    --token-file "$work/dataplane.token" --state-dir "$work/$1" --paging-key-file "$work/paging.key" \
    >"$work/$1.out" 2>"$work/$1.log" & dp_pid=$!; pids+=("$dp_pid")
  local line
  line="$(wait_for_line "$work/$1.out")"
  dp_addr="$(json_get fhir <<<"$line")"
  dp_admin="$(json_get admin <<<"$line")"
}
start_dp dp
audience="http://$dp_addr/fhir" # a later data plane accepts it too: the audience is the configured one, not its address
"$bin/fhirgw-dev-issuer" 127.0.0.1:0 "$audience" >"$work/issuer.out" 2>"$work/issuer.log" & pids+=($!)
issuer_url="$(wait_for_line "$work/issuer.out" | json_get url)"

log "configuring through the operator API (grpcurl)"
g PutUpstream <<JSON
{"upstream": {"name": "static", "base_url": "http://127.0.0.1:$static_port/fhir",
  "auth": {"static_token": {"token_file": "$work/upstream.token"}}}}
JSON
g PutRouteTable <<'JSON'
{"route_table": {"name": "main", "base_path": "/fhir", "routes": [
  {"id": "search", "path": "/{type}", "methods": ["GET"], "proxy": {"upstream": "static"}},
  {"id": "read", "path": "/{type}/{id}", "methods": ["GET", "HEAD"], "proxy": {"upstream": "static"}},
  {"id": "everything", "path": "/Patient/{id}/$everything", "methods": ["GET"], "proxy": {"upstream": "static"}}]}}
JSON
g PutIdentityProvider <<JSON
{"identity_provider": {"name": "dev", "issuer": "$issuer_url", "jwks_uri": "$issuer_url/jwks",
  "audiences": ["$audience"], "tenant_claim": "tenant"}}
JSON
g PutTenant <<<'{"tenant": {"name": "bench"}}'
g PutTenant <<<'{"tenant": {"name": "other"}}'
g PutGrant <<<'{"grant": {"tenant": "bench", "tag": {"system": "https://fhirgw.dev/dataset", "code": "bench"}}}'
g PutGrant <<<'{"grant": {"tenant": "other", "tag": {"system": "https://fhirgw.dev/dataset", "code": "other"}}}'

mint() { # a fresh token (they live 300 s)
  auth="Authorization: Bearer $(curl -sf --max-time 5 -d client_id=bench -d 'scope=user/*.read' "$issuer_url/token" | json_get access_token)"
}
mint
search_path='/fhir/Observation?code=x&_count=10'
read_path=/fhir/Patient/p1
everything_path='/fhir/Patient/p1/$everything'
wait_http "http://$dp_admin/readyz" 200
wait_http "http://$dp_addr$read_path" 200 -H "$auth"
wait_http "http://127.0.0.1:$proxy_port$read_path" 200

# Sanity: every path answers the same resources; the data plane needs a token and keeps every bench entry.
[[ "$(status_of "http://$dp_addr$read_path")" == 401 ]] || die "the data plane served a read without a token"
for base in "http://127.0.0.1:$static_port" "http://127.0.0.1:$proxy_port" "http://$dp_addr"; do
  curl -sf --max-time 5 -H "$auth" "$base$read_path" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["id"] == "p1", r' \
    || die "$base$read_path did not return Patient/p1"
  curl -sf --max-time 5 -H "$auth" "$base$search_path" | python3 -c '
import json, sys
b = json.load(sys.stdin)
assert b["resourceType"] == "Bundle" and len(b["entry"]) == 10, b
assert all(e["resource"]["meta"]["tag"][0]["code"] == "bench" for e in b["entry"])' \
    || die "$base$search_path did not return the 10-entry searchset"
done
search_bytes="$(stat -c %s "$work/www/search.json")"
read_bytes="$(stat -c %s "$work/www/patient-p1.json")"
dp_search_bytes="$(curl -s -o /dev/null -w '%{size_download}' --max-time 5 -H "$auth" "http://$dp_addr$search_path")"
dp_read_bytes="$(curl -s -o /dev/null -w '%{size_download}' --max-time 5 -H "$auth" "http://$dp_addr$read_path")"

# ---------------------------------------------------------------------------------------------------- measuring
declare -A R # results: R[key,field]
run_wrk() { # key url proxy-pid|"" header
  local key="$1" url="$2" proxy="$3" args=(-t"$THREADS" -c"$CONNS" --latency -H "$4")
  log "wrk $key: $url (${WARMUP}s warm-up, ${DURATION}s measured)"
  wrk "${args[@]}" -d"${WARMUP}s" "$url" >/dev/null
  local up_pids proxy_pids=() u0 p0 u1 p1 s0 s1 out="$work/wrk-$key.txt"
  mapfile -t up_pids < <(tree_pids "$static_pid")
  [[ -n "$proxy" ]] && mapfile -t proxy_pids < <(tree_pids "$proxy")
  s0="$(sys_busy)"
  u0="$(cpu_ticks "${up_pids[@]}")"
  p0="$( ((${#proxy_pids[@]})) && cpu_ticks "${proxy_pids[@]}" || echo 0)"
  local TIMEFORMAT='%U %S'
  { time wrk "${args[@]}" -d"${DURATION}s" "$url" >"$out" 2>&1; } 2>"$work/time-$key.txt"
  s1="$(sys_busy)"
  u1="$(cpu_ticks "${up_pids[@]}")"
  p1="$( ((${#proxy_pids[@]})) && cpu_ticks "${proxy_pids[@]}" || echo 0)"
  R[$key,rps]="$(awk '/^Requests\/sec/ { printf "%.0f", $2 }' "$out")"
  R[$key,reqs]="$(awk '/requests in/ { print $1 }' "$out")"
  R[$key,p50]="$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")"
  R[$key,p99]="$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")"
  R[$key,errors]="$(awk '/Non-2xx/ { n += $NF } /Socket errors/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$out")"
  # CPU of every process that is neither wrk, the upstream nor the proxy (someone else's build): ~0 for a clean row.
  R[$key,cpu_other]="$(awk -v s0="$s0" -v s1="$s1" -v hz="$hz" -v d="$DURATION" -v a="$u0" -v b="$u1" -v c="$p0" -v e="$p1" \
    -v w="$(awk '{ print $1 + $2 }' "$work/time-$key.txt")" \
    'BEGIN { o = ((s1 - s0) - (b - a) - (e - c)) / hz / d - w / d; if (o < 0) o = 0; printf "%.2f", o }')"
  R[$key,us_per_req]="$(awk -v a="$p0" -v b="$p1" -v hz="$hz" -v n="${R[$key,reqs]}" 'BEGIN { if (n > 0 && b > a) printf "%.0f", (b - a) / hz / n * 1e6; else print "–" }')"
  [[ "${R[$key,errors]}" == 0 ]] || log "WARNING: $key had ${R[$key,errors]} errors / non-2xx responses"
}

run_wrk direct_search "http://127.0.0.1:$static_port$search_path" "" "$auth"
run_wrk nginx_search "http://127.0.0.1:$proxy_port$search_path" "$proxy_pid" "$auth"
mint
run_wrk dp_search "http://$dp_addr$search_path" "$dp_pid" "$auth"
run_wrk direct_read "http://127.0.0.1:$static_port$read_path" "" "$auth"
run_wrk nginx_read "http://127.0.0.1:$proxy_port$read_path" "$proxy_pid" "$auth"
mint
run_wrk dp_read "http://$dp_addr$read_path" "$dp_pid" "$auth"
wrk_dp_hwm_kb="$(proc_kb "$dp_pid" VmHWM)"

# $everything: curl -o /dev/null, MiB/s of the upstream's bytes.
declare -A S
proxy_ticks() { # pid|"" -> CPU ticks of the process and its children
  local p=()
  [[ -n "$1" ]] || { echo 0; return; }
  mapfile -t p < <(tree_pids "$1")
  cpu_ticks "${p[@]}"
}
stream() { # key url min-bytes src-bytes proxy-pid|"" [curl args...]
  local key="$1" url="$2" min="$3" src="$4" proxy="$5" speeds=() line code size secs rc c0 c1
  shift 5
  log "streaming: $key ($EVERYTHING_REPEAT downloads)"
  S[$key,fail]="" S[$key,size]=""
  c0="$(proxy_ticks "$proxy")"
  for _ in $(seq 1 "$EVERYTHING_REPEAT"); do
    line="$(curl -s -o /dev/null --max-time 300 -w '%{http_code} %{size_download} %{time_total}' "$@" "$url")" && rc=0 || rc=$?
    read -r code size secs <<<"$line"
    S[$key,size]="$size"
    if [[ "$rc" != 0 || "$code" != 200 ]] || ((size < min)); then
      S[$key,fail]="curl exit $rc, HTTP $code, $size bytes received after ${secs} s"
      log "WARNING: $key: ${S[$key,fail]}"
      break
    fi
    speeds+=("$(awk -v s="$src" -v t="$secs" 'BEGIN { printf "%.0f", s / t / 1048576 }')")
  done
  c1="$(proxy_ticks "$proxy")"
  S[$key,cpu]="$( [[ -n "$proxy" && ${#speeds[@]} -gt 0 ]] && awk -v a="$c0" -v b="$c1" -v hz="$hz" -v n="${#speeds[@]}" 'BEGIN { printf "%.2f s", (b - a) / hz / n }' || echo –)"
  S[$key,all]="${speeds[*]:-–}"
  S[$key,median]="$( ((${#speeds[@]})) && printf '%s\n' "${speeds[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }' || echo 0)"
}
count_entries() { # file -> "kept dropped-by-tag-count" as "N entries, B bench, O other"
  python3 - "$1" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
tags = [e["resource"]["meta"]["tag"][0]["code"] for e in b.get("entry", [])]
print(len(tags), tags.count("bench"), tags.count("other"), sum(1 for e in b.get("entry", []) if "fullUrl" in e))
PY
}
everything_bytes="$(stat -c %s "$work/www/everything.json")"
read -r exp_entries exp_bench exp_other < <(python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); print(c["entries"], c["bench"], c["other"])' "$work/everything.counts.json")
log "\$everything Bundle: $everything_bytes bytes, $exp_entries entries ($exp_bench bench, $exp_other other)"
# Untimed: page the file into the cache, and check what each path returns.
curl -s -o /dev/null --max-time 120 "http://127.0.0.1:$static_port$everything_path"
mint
curl -sf --max-time 120 -H "$auth" -o "$work/everything.nginx.json" "http://127.0.0.1:$proxy_port$everything_path" || die "nginx \$everything failed"
curl -sf --max-time 300 -H "$auth" -o "$work/everything.dp.json" "http://$dp_addr$everything_path" || die "data plane \$everything failed"
read -r n_entries _ _ _ < <(count_entries "$work/everything.nginx.json")
read -r d_entries d_bench d_other d_fullurl < <(count_entries "$work/everything.dp.json")
[[ "$n_entries" == "$exp_entries" ]] || die "nginx \$everything: $n_entries entries, want $exp_entries"
[[ "$d_other" == 0 && "$d_bench" == "$exp_bench" ]] || die "data plane \$everything: $d_bench bench + $d_other other entries, want $exp_bench + 0"
grep -q "127.0.0.1:$static_port" "$work/everything.dp.json" && dp_leak="the upstream's base still appears in the output" || dp_leak="no upstream URL left in the output"
dp_out_bytes="$(stat -c %s "$work/everything.dp.json")"
rm -f "$work/everything.nginx.json" "$work/everything.dp.json"

stream direct_everything "http://127.0.0.1:$static_port$everything_path" "$everything_bytes" "$everything_bytes" "" -H "$auth"
stream nginx_everything "http://127.0.0.1:$proxy_port$everything_path" "$everything_bytes" "$everything_bytes" "$proxy_pid" -H "$auth"
# A fresh data plane, so that its VmHWM is this row's peak (plus start-up and the configuration), not the wrk rows'.
old_dp_pid="$dp_pid"
kill -TERM "$old_dp_pid"
for _ in $(seq 1 300); do kill -0 "$old_dp_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$old_dp_pid" 2>/dev/null && die "the first data plane did not stop within 30 s"
start_dp dp-fresh
mint
wait_http "http://$dp_admin/readyz" 200
wait_http "http://$dp_addr$read_path" 200 -H "$auth"
fresh_rss_before="$(proc_kb "$dp_pid" VmRSS)"
fresh_hwm_before="$(proc_kb "$dp_pid" VmHWM)"
stream dp_everything "http://$dp_addr$everything_path" "$((dp_out_bytes * 9 / 10))" "$everything_bytes" "$dp_pid" -H "$auth"
fresh_hwm="$(proc_kb "$dp_pid" VmHWM)"
fresh_rss_after="$(proc_kb "$dp_pid" VmRSS)"

# ---------------------------------------------------------------------------------------------------- report
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

if [[ -n "${FHIRGW_BIN_DIR:-}" ]]; then
  built="binaries from $src_bin (FHIRGW_BIN_DIR)${FHIRGW_BIN_LABEL:+, $FHIRGW_BIN_LABEL}"
else
  built="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
  git -C "$root" status --porcelain -- '*.rs' '*.toml' 2>/dev/null | grep -q . && built="$built + uncommitted changes"
fi
echo "### Run $(date -u +%Y-%m-%dT%H:%MZ), fhirgw $built"
echo
echo "$(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(free -g | awk '/Mem:/ { print $2 }') GiB," \
  "Linux $(uname -r), $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -n1 | awk '{ print "wrk " $2 }')." \
  "wrk -t$THREADS -c$CONNS, ${WARMUP} s warm-up + ${DURATION} s measured per row; nginx proxy worker_processes $PROXY_WORKERS." \
  "Every request carries the bearer JWT; only the data plane checks it."
echo
echo "#### 1. Narrowed search and verified read (wrk)"
echo
echo "| path | request | req/s | p50 ms | p99 ms | vs direct | vs nginx-proxy | proxy CPU µs/req | other CPU (cores) | errors |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
row() { # key path-label request-label
  local k="$1" kind="${1#*_}" vs_nginx
  [[ "$k" == direct_* ]] && vs_nginx="–" || vs_nginx="$(ratio "${R[$k,rps]}" "${R[nginx_$kind,rps]}")"
  echo "| $2 | $3 | ${R[$k,rps]} | ${R[$k,p50]} | ${R[$k,p99]} | $(ratio "${R[$k,rps]}" "${R[direct_$kind,rps]}") | $vs_nginx | ${R[$k,us_per_req]} | ${R[$k,cpu_other]} | ${R[$k,errors]} |"
}
row direct_search "(a) direct static nginx" "\`GET $search_path\`"
row nginx_search "(b) nginx reverse proxy" "same"
row dp_search "(c) fhirgw data plane" "same; \`_tag\` added, 10 entries verified"
row direct_read "(a) direct static nginx" "\`GET $read_path\`"
row nginx_read "(b) nginx reverse proxy" "same"
row dp_read "(c) fhirgw data plane" "same; JWT, grant, resource verified"
echo
echo "Bodies: search $search_bytes bytes from the upstream, $dp_search_bytes through the data plane; read $read_bytes bytes," \
  "$dp_read_bytes through the data plane (\`fullUrl\`s and links moved to the gateway's base, re-serialised where changed)."
echo
echo "#### 2. Filtered \`GET $everything_path\` of $(mib "$everything_bytes") MiB (curl -o /dev/null; median of $EVERYTHING_REPEAT; MiB/s of upstream bytes)"
echo
echo "| path | MiB/s (median) | all runs | vs direct | vs nginx-proxy | bytes delivered | entries kept / dropped | proxy CPU per download | peak RSS |"
echo "|---|---:|---|---:|---:|---:|---:|---:|---:|"
echo "| (a) direct static nginx | ${S[direct_everything,median]} | ${S[direct_everything,all]} | 1.00 | – | ${S[direct_everything,size]} | $exp_entries / 0 | – | |"
echo "| (b) nginx reverse proxy | ${S[nginx_everything,median]} | ${S[nginx_everything,all]} | $(ratio "${S[nginx_everything,median]}" "${S[direct_everything,median]}") | 1.00 | ${S[nginx_everything,size]} | $n_entries / 0 | ${S[nginx_everything,cpu]} | |"
echo "| (c) fhirgw data plane (fresh process) | ${S[dp_everything,median]} | ${S[dp_everything,all]} | $(ratio "${S[dp_everything,median]}" "${S[direct_everything,median]}") | $(ratio "${S[dp_everything,median]}" "${S[nginx_everything,median]}") | ${S[dp_everything,size]} | $d_entries / $((exp_entries - d_entries)) | ${S[dp_everything,cpu]} | $(mb "$fresh_hwm") MiB |"
echo
for k in direct_everything nginx_everything dp_everything; do
  [[ -z "${S[$k,fail]}" ]] || echo "- **$k failed**: ${S[$k,fail]}."
done
echo "- Upstream Bundle: $everything_bytes bytes, $exp_entries entries ($exp_bench of the bench tenant incl. Patient/p1, $exp_other tagged" \
  "\`other\`). Through the data plane: $d_entries entries, all \`bench\` ($d_fullurl with \`fullUrl\`); $dp_leak."
echo "- The data plane reads Patient/p1 (the focal check) before it asks for \`\$everything\`, then filters the Bundle entry by entry."
echo "- Fresh data plane: VmRSS $(mb "$fresh_rss_before") MiB (VmHWM $(mb "$fresh_hwm_before")) ready and idle →" \
  "VmRSS $(mb "$fresh_rss_after") MiB after the $EVERYTHING_REPEAT downloads; **peak (VmHWM) $(mb "$fresh_hwm") MiB**." \
  "For comparison, the first data plane's VmHWM after the wrk rows: $(mb "$wrk_dp_hwm_kb") MiB."
