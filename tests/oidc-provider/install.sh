#!/usr/bin/env bash
# Installs the test OpenID provider's npm packages (oidc-provider, pinned by package-lock.json) with `npm ci`.
# It runs on the Node 22 the test FHIR server installs, so that is installed first. Idempotent: skips npm when
# node_modules matches package-lock.json (a sha256 stamp). Needs only npm.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/../fhir-server/install.sh"
cd "$here"

stamp="node_modules/.fhirgw-install-stamp"
want="$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)"

up_to_date() {
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]
}

if up_to_date; then
  exit 0
fi

# Serialise concurrent installs (e.g. parallel test processes) when flock is available.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/fhirgw-oidc-provider-install.lock"
  flock 9
  if up_to_date; then
    exit 0
  fi
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "oidc-provider/install.sh: npm not found (on Debian: apt-get install -y npm)" >&2
  exit 1
fi

echo "oidc-provider/install.sh: npm ci in $here" >&2
# The system node running npm may be older than 22; the provider itself runs on the FHIR server's Node 22.
npm ci --no-audit --no-fund --engine-strict=false --loglevel=error >&2
echo "$want" > "$stamp"
echo "oidc-provider/install.sh: installed oidc-provider $(node -p 'require("./node_modules/oidc-provider/package.json").version' 2>/dev/null || echo '?')" >&2
