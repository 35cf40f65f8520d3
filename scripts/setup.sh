#!/usr/bin/env bash
# Create .venv and install TextCAM with its audit and test extras. Idempotent and offline-safe:
# torch/torchvision come from pip's local cache or the registry; nothing downloads model weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.textcam-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies (first run takes a few minutes; pip's output: .venv/setup.log)"
  # pip's warnings about the machine's package indexes go to the log; on failure its end is shown.
  install() { .venv/bin/pip install -q "$@" >>.venv/setup.log 2>&1 || { tail -n 30 .venv/setup.log >&2; exit 1; }; }
  install --upgrade pip
  # torch first and pinned: a bare 'torch' requirement would otherwise pick a newer CUDA build.
  install torch==2.14.1 torchvision==0.29.1
  install -e '.[audit,test]'
  echo "$want" > "$stamp"
fi
# Headless Chromium for the report's browser test (Debian package; needs root or sudo).
if [ "${TEXTCAM_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[setup] warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "[setup] note: chromium not installed (sudo apt-get install chromium) - browser test will skip" >&2
  fi
fi
