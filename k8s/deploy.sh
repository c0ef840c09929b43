#!/usr/bin/env bash
# One release with kubectl: replaces the migration Job (a Job's template is
# immutable, so a new image or config cannot update it), applies the
# overlay, waits for the migration, then for the rollout. Rolling back is
# the same command on the previous release's overlay (its image digest).
#
#   k8s/deploy.sh overlays/prod            # namespace from the overlay
#   KUBECTL="kubectl --context prod" k8s/deploy.sh overlays/prod
set -euo pipefail
overlay=${1:?an overlay, e.g. overlays/prod}
kubectl=${KUBECTL:-kubectl}
# Relative to the caller, or to k8s/ as in the examples.
[ -d "$overlay" ] || overlay="$(dirname "$0")/$overlay"

rendered=$($kubectl kustomize "$overlay")
namespace=$(printf '%s\n' "$rendered" | awk '/^kind: Job$/ { job = 1 } job && /^  namespace: / { print $2; exit }')
namespace=${namespace:?the overlay sets no namespace on the migration Job}

# The previous release's Job, finished or not: waiting for its pods to go
# keeps two migrations from running at once.
$kubectl -n "$namespace" delete job -l app.kubernetes.io/component=migrate \
  --ignore-not-found --wait=true --cascade=foreground
printf '%s\n' "$rendered" | $kubectl apply -f -
# New pods stay NOT_SERVING until the migration has run; old ones serve.
# (A Job that exhausts its retries fails this wait only at the timeout.)
$kubectl -n "$namespace" wait --for=condition=complete job/stockgate-migrate --timeout=15m
$kubectl -n "$namespace" rollout status deployment/stockgate-api --timeout=15m
$kubectl -n "$namespace" rollout status deployment/stockgate-processor --timeout=15m
