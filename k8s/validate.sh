#!/usr/bin/env bash
# Renders every kustomize tree and validates the result offline against the
# Kubernetes OpenAPI schemas (strict: unknown fields are errors). A kind with
# no schema is reported as WARN by kubernetes-validate with exit code 0; this
# script treats it as a failure too.
#
#   python3 -m pip install --target /tmp/kv kubernetes-validate   # 1.37.0 used
#   KV_PATH=/tmp/kv k8s/validate.sh
set -euo pipefail
cd "$(dirname "$0")"
kv_path=${KV_PATH:-/tmp/kv}
# 1.30: the oldest release with lifecycle.preStop.sleep on by default;
# 1.37: the newest schema kubernetes-validate 1.37.0 ships.
versions=${K8S_VERSIONS:-"1.30.0 1.37.0"}
status=0
for tree in base overlays/dev overlays/prod overlays/prod-tls; do
  rendered=$(kubectl kustomize "$tree")
  for version in $versions; do
    out=$(printf '%s\n' "$rendered" |
      PYTHONPATH="$kv_path" python3 -m kubernetes_validate --strict \
        --kubernetes-version "$version" -) || status=1
    if grep -qE '^(ERROR|WARN|FATAL)' <<<"$out"; then
      status=1
    fi
    printf '%s\n' "$out" | sed -E "s#^(INFO|ERROR|WARN|FATAL) - #\1 $tree: #"
  done
done
exit $status
