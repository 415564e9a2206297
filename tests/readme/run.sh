#!/usr/bin/env bash
# Runs the README's shell examples as an operator would paste them, against a fresh stack started by `./dev up`.
#
#   tests/readme/run.sh [README.md]
#
# Every ```sh block of the README must follow a marker line:
#   <!-- readme-test: local -->                 run against the local stack
#   <!-- readme-test: kubernetes (...) -->      run against the local stack too, `kubectl` lines dropped, grpcurl on
#                                               the PATH (deploy/README.md's prerequisites)
#   <!-- readme-test: skip (reason) -->         not run (say why)
# so that no new example escapes the test. `./dev up` runs on free ports with its state in a temporary directory; the
# README's default addresses (127.0.0.1:50051, localhost:8080, …) are rewritten to those. Blocks run in README order,
# each in its own `bash -eu` (stop at the first failing command, as a careful operator would; no pipefail, as in an
# interactive shell), from a directory laid out like the checkout (`.tools`, `deploy/`) whose `.fhirgw/` is the
# test stack's state. Exits non-zero on the first failure, showing the block and its output.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
readme="$(cd "$(dirname "${1:-$root/README.md}")" && pwd)/$(basename "${1:-$root/README.md}")"
work="$(mktemp -d "${TMPDIR:-/tmp}/fhirgw-readme.XXXXXX")"
up_pid=""
cleanup() {
  if [[ -n "$up_pid" ]] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf 'readme: %s\n' "$*" >&2; }
# Under `cargo test` the environment carries the test crate's CARGO_MANIFEST_DIR, CARGO_PKG_* and so on: the nested
# `cargo build` of ./dev up would take them for changes and rebuild (ring's build script watches one), twice over.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^CARGO_(MANIFEST_|PKG_|CRATE_|BIN_|PRIMARY_|TARGET_TMPDIR|RUSTC_CURRENT_DIR)' || true)

# Free ports, chosen by the kernel (bound at once, then released for ./dev up to take).
read -r p_fhir p_cp p_cpa p_dp p_dpa p_iss < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
export FHIR_PORT="$p_fhir" CP_ADDR="127.0.0.1:$p_cp" CP_ADMIN="127.0.0.1:$p_cpa" DP_ADDR="127.0.0.1:$p_dp" \
  DP_ADMIN="127.0.0.1:$p_dpa" ISSUER_ADDR="127.0.0.1:$p_iss" FHIRGW_STATE_DIR="$work/.fhirgw"

# The blocks, each in its own file, with what to do with it.
mkdir -p "$work/blocks"
python3 - "$readme" "$work/blocks" <<'PY'
import re, sys
readme, out = sys.argv[1], sys.argv[2]
lines = open(readme).read().split("\n")
marker, n, problems, block = None, 0, [], None
for i, line in enumerate(lines, 1):
    if block is not None:
        if line.strip() == "```":
            n += 1
            open(f"{out}/{n:02d}.{block[0]}", "w").write(f"# README.md line {block[1]}\n" + "\n".join(block[2]) + "\n")
            block = None
        else:
            block[2].append(line)
        continue
    m = re.match(r"<!-- readme-test: (local|kubernetes|skip)\b.*-->$", line.strip())
    if m:
        marker = (m.group(1), i)
        continue
    if re.match(r"```(sh|bash|shell)\s*$", line.strip()):
        if marker is None or marker[1] != i - 1:
            problems.append(f"line {i}: a shell block without a `<!-- readme-test: … -->` marker on the line before")
            marker = ("skip", i)
        block = (marker[0], i, [])
        marker = None
    elif line.strip():
        marker = None
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
PY

say "starting ./dev up on free ports (state in $FHIRGW_STATE_DIR)"
"$root/dev" up >"$work/up.out" 2>"$work/up.err" &
up_pid=$!
for _ in $(seq 1 1800); do
  grep -q '^fhirgw is running' "$work/up.out" 2>/dev/null && break
  if ! kill -0 "$up_pid" 2>/dev/null; then
    say "./dev up exited before the stack was running:"; tail -n 30 "$work/up.err" >&2; exit 1
  fi
  sleep 0.1
done
grep -q '^fhirgw is running' "$work/up.out" || { say "./dev up did not finish within 180 s"; tail -n 30 "$work/up.err" >&2; exit 1; }

# A second ./dev up must refuse at once, leaving the running stack (and its logs) alone.
log_before="$(wc -c <"$FHIRGW_STATE_DIR/dataplane.log")"
started=$SECONDS
if "$root/dev" up >"$work/up2.out" 2>"$work/up2.err"; then
  say "a second ./dev up succeeded while one was running"; exit 1
fi
grep -q 'already running' "$work/up2.err" || { say "a second ./dev up did not say a stack is running:"; cat "$work/up2.err" >&2; exit 1; }
(( SECONDS - started < 10 )) || { say "a second ./dev up took $((SECONDS - started)) s to refuse"; exit 1; }
(( $(wc -c <"$FHIRGW_STATE_DIR/dataplane.log") >= log_before )) || { say "the running stack's log was truncated"; exit 1; }
# Secrets are the user's alone.
for f in "$FHIRGW_STATE_DIR"/*.token; do
  [[ "$(stat -c %a "$f")" == 600 ]] || { say "$f is $(stat -c %a "$f"), not 600"; exit 1; }
done

# Where the blocks run: like the repository root, with the test stack's state as .fhirgw.
mkdir -p "$work/cwd"
ln -s "$root/.tools" "$work/cwd/.tools"
ln -s "$root/deploy" "$work/cwd/deploy"
ln -s "$FHIRGW_STATE_DIR" "$work/cwd/.fhirgw"
OPERATOR_TOKEN="$(cat "$FHIRGW_STATE_DIR/operator.token")"
export OPERATOR_TOKEN

ran=0
for block in "$work"/blocks/*; do
  kind="${block##*.}"
  where="$(head -n1 "$block" | sed 's/^# //')"
  if [[ "$kind" == skip ]]; then
    say "skipped: $where"
    continue
  fi
  script="$work/cwd/block.sh"
  # The README's default addresses, as ./dev up uses them, become the test stack's.
  sed -e "s/\(127\.0\.0\.1\|localhost\):50051/$CP_ADDR/g" -e "s/\(127\.0\.0\.1\|localhost\):9902/$CP_ADMIN/g" \
    -e "s/\(127\.0\.0\.1\|localhost\):8080/$DP_ADDR/g" -e "s/\(127\.0\.0\.1\|localhost\):9901/$DP_ADMIN/g" \
    -e "s/\(127\.0\.0\.1\|localhost\):8091/$ISSUER_ADDR/g" -e "s/\(127\.0\.0\.1\|localhost\):8090/127.0.0.1:$FHIR_PORT/g" \
    "$block" >"$script"
  path="$PATH"
  if [[ "$kind" == kubernetes ]]; then
    sed -i -e '/^kubectl /d' "$script"
    # Its prerequisites (deploy/README.md) include grpcurl on the PATH.
    path="$root/.tools/venv/bin:$PATH"
  fi
  say "running $kind block ($where)"
  if ! (cd "$work/cwd" && PATH="$path" bash -eu "$script") >"$work/block.out" 2>&1; then
    say "FAILED: the $kind block at $where, as run:"
    sed 's/^/    /' "$script" >&2
    say "its output:"
    sed 's/^/    /' "$work/block.out" >&2
    exit 1
  fi
  ran=$((ran + 1))
done
(( ran > 0 )) || { say "no block ran"; exit 1; }
say "all $ran README blocks ran without an error"
