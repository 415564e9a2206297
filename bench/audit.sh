#!/usr/bin/env bash
# bench/audit.sh — the audit rows of bench/proxy.sh alone, repeated: CPU per verified read of a data plane with an
# audit spool and an NDJSON file sink, for a tenant not audited, one audited in relaxed mode and one in strict mode,
# interleaved ROUNDS times after one round not counted (so drift on a shared VM hits every mode alike). Minutes instead of proxy.sh's quarter hour:
# for trying a change to the audit path; proxy.sh stays the record for BENCHMARKS.md.
#
#   FHIRGW_BIN_DIR=target/release bench/audit.sh
#
# Environment: ROUNDS=3, DURATION=10, WARMUP=2, THREADS=2, CONNS=32 (wrk); FHIRGW_BIN_DIR as in bench/proxy.sh;
# PERF_DIR=dir: one more run per mode under `perf record` (call graphs), reported into dir/<mode>.{self,children}.txt.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="$root/bench"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
THREADS="${THREADS:-2}"
CONNS="${CONNS:-32}"
PROXY_WORKERS=1
# shellcheck source=bench/lib.sh
source "$bench/lib.sh"
install_tools
bin="$(release_bins)"
make_work fhirgw-audit
static_port="$(free_port)"
proxy_port="$(free_port)"
mkdir -p "$work/www" "$work/nginx-static-tmp" "$work/nginx-proxy-tmp"
for t in operator dataplane upstream; do head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/$t.token"; done
head -c 48 /dev/urandom >"$work/paging.key"
chmod 600 "$work"/*.token "$work/paging.key"
upstream_token="$(cat "$work/upstream.token")"
cp "$bench/patient-p1.json" "$work/www/patient-p1.json"
echo '{"resourceType":"CapabilityStatement","status":"active","kind":"instance","fhirVersion":"4.0.1","format":["json"]}' >"$work/www/metadata.json"
chmod -R a+rX "$work/www"
start_nginx_pair "$bench/nginx-static.conf.tmpl" "$bench/nginx-proxy.conf.tmpl"

export RUST_LOG=warn
start_control_plane
"$bin/fhirgw-dataplane" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --control-plane "http://$cp_addr" \
  --token-file "$work/dataplane.token" --state-dir "$work/dp" --paging-key-file "$work/paging.key" \
  --audit-dir "$work/audit-spool" --audit-ndjson "$work/audit.ndjson" >"$work/dp.out" 2>"$work/dp.log" & dp_pid=$!; pids+=("$dp_pid")
dp_line="$(wait_for_line "$work/dp.out")"
dp_addr="$(json_get fhir <<<"$dp_line")"
dp_admin="$(json_get admin <<<"$dp_line")"
"$bin/fhirgw-dev-issuer" 127.0.0.1:0 "http://$dp_addr/fhir" >"$work/issuer.out" 2>"$work/issuer.log" & pids+=($!)
issuer_url="$(wait_for_line "$work/issuer.out" | json_get url)"
g PutUpstream <<JSON
{"upstream": {"name": "static", "base_url": "http://127.0.0.1:$static_port/fhir",
  "auth": {"static_token": {"token_file": "$work/upstream.token"}}}}
JSON
g PutRouteTable <<<'{"route_table": {"name": "main", "base_path": "/fhir", "routes": [{"id": "read", "path": "/{type}/{id}", "methods": ["GET"], "proxy": {"upstream": "static"}}]}}'
g PutIdentityProvider <<JSON
{"identity_provider": {"name": "dev", "issuer": "$issuer_url", "jwks_uri": "$issuer_url/jwks",
  "audiences": ["http://$dp_addr/fhir"], "tenant_claim": "tenant"}}
JSON
declare -A auth
for m in off relaxed strict; do
  mode="$([[ $m == off ]] && echo OFF || echo "${m^^}")"
  g PutTenant <<<"{\"tenant\": {\"name\": \"bench-$m\", \"audit\": {\"mode\": \"AUDIT_MODE_$mode\"}}}"
  g PutGrant <<<"{\"grant\": {\"tenant\": \"bench-$m\", \"tag\": {\"system\": \"https://fhirgw.dev/dataset\", \"code\": \"bench\"}}}"
done
mint() {
  for m in off relaxed strict; do
    auth[$m]="Authorization: Bearer $(curl -sf --max-time 5 -d "client_id=bench-$m" -d 'scope=user/*.read' "$issuer_url/token" | json_get access_token)"
  done
}
mint
for m in off relaxed strict; do wait_http "http://$dp_addr/fhir/Patient/p1" 200 -H "${auth[$m]}"; done

declare -A us sys
# Round 0 is not counted: the first seconds of audited load on a fresh spool cost more than the steady state (in
# runs here, the first relaxed round 20-50 % more than the next ones, in user and kernel time alike).
for round in $(seq 0 "$ROUNDS"); do
  mint
  for m in off relaxed strict; do
    if ((round == 0)); then
      wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -H "${auth[$m]}" "http://$dp_addr/fhir/Patient/p1" >/dev/null
      continue
    fi
    wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" -H "${auth[$m]}" "http://$dp_addr/fhir/Patient/p1" >/dev/null
    p0="$(cpu_ticks $(tree_pids "$dp_pid"))" k0="$(awk '{ print $15 }' "/proc/$dp_pid/stat")"
    out="$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -H "${auth[$m]}" "http://$dp_addr/fhir/Patient/p1")"
    p1="$(cpu_ticks $(tree_pids "$dp_pid"))" k1="$(awk '{ print $15 }' "/proc/$dp_pid/stat")"
    reqs="$(awk '/requests in/ { print $1 }' <<<"$out")"
    bad="$(awk '/Non-2xx/ { print $NF }' <<<"$out")"
    [[ -z "$bad" ]] || log "WARNING: $m: $bad non-2xx answers"
    us[$m,$round]="$(awk -v a="$p0" -v b="$p1" -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.1f", (b - a) / hz / n * 1e6 }')"
    sys[$m,$round]="$(awk -v a="$k0" -v b="$k1" -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.1f", (b - a) / hz / n * 1e6 }')"
    log "round $round $m: ${us[$m,$round]} µs/req, ${sys[$m,$round]} of it in the kernel ($reqs requests)"
  done
done
if [[ -n "${PERF_DIR:-}" ]]; then
  mkdir -p "$PERF_DIR"
  mint
  for m in off relaxed strict; do
    log "perf record: $m"
    perf record -q -g -p "$dp_pid" -o "$PERF_DIR/$m.data" -- sleep "$DURATION" 2>/dev/null &
    perf_pid=$!
    wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -H "${auth[$m]}" "http://$dp_addr/fhir/Patient/p1" >/dev/null
    wait "$perf_pid" || true
    perf report -q -i "$PERF_DIR/$m.data" --no-children --sort dso,symbol --percent-limit 0.3 2>/dev/null >"$PERF_DIR/$m.self.txt" || true
    perf report -q -i "$PERF_DIR/$m.data" --children --sort symbol --percent-limit 1 -g none 2>/dev/null >"$PERF_DIR/$m.children.txt" || true
  done
fi
echo "Data plane CPU per verified read (µs), ${ROUNDS} rounds of ${DURATION}s, bins $bin"
echo
echo "| mode | per round (of it in the kernel) | median | ÷ off (median) |"
echo "|---|---|---:|---:|"
med() { tr ' ' '\n' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
off_med="$(for r in $(seq 1 "$ROUNDS"); do echo -n "${us[off,$r]} "; done | med)"
for m in off relaxed strict; do
  all="$(for r in $(seq 1 "$ROUNDS"); do echo -n "${us[$m,$r]} "; done)"
  shown="$(for r in $(seq 1 "$ROUNDS"); do echo -n "${us[$m,$r]} (${sys[$m,$r]}) "; done)"
  m_med="$(echo -n "$all" | med)"
  echo "| $m | $shown | $m_med | $(ratio "$m_med" "$off_med") |"
done
written="$(curl -s "http://$dp_admin/metrics" | awk '$1 ~ /^fhirgw_dp_audit_events_written_total/ { s += $2 } END { print s + 0 }')"
echo
echo "Audit events written: $written; NDJSON sink lines: $(wc -l <"$work/audit.ndjson")"
