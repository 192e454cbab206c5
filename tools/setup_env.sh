#!/usr/bin/env bash
# One-command environment for swav_fast: Debian packages FFCV compiles against, a .venv, the project in it.
# Idempotent: each part is skipped when it is already in place. Called by `make env`.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(libopencv-dev libturbojpeg0-dev pkg-config)
EXTRAS="dev,demo,ffcv,dali"

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "[env] installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "[env] FFCV needs Debian packages that are missing: ${missing[*]}"
        echo "[env] run:  sudo apt-get update && sudo apt-get install -y ${missing[*]}"
        echo "[env] continuing without the ffcv extra"
        EXTRAS="dev,demo,dali"
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[env] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
    echo "[env] installing swav_fast[$EXTRAS] into .venv (torch comes from local disk where available)"
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    .venv/bin/python -c "import torch, torchvision, swav_fast, pipelines" \
        || { echo "[env] install failed: see the pip output above"; exit 1; }
    rm -f .venv/.installed-*
    touch "$stamp"
fi
echo "[env] ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
