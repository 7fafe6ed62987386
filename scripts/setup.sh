#!/usr/bin/env bash
# The project's set-up step: Debian packages the stages need, then .venv with the project.
# Idempotent; `make demo` and `make test` call it. Nothing here is to be done by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
ldconfig -p 2>/dev/null | grep -q libsndfile.so.1 || need+=(libsndfile1)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# torch is pinned by constraints.txt to the CPU wheel: unpinned, the resolver picks a
# multi-GB CUDA build. torchaudio must never be installed (see README, developer notes).
# --no-compile: Python compiles what is imported on first use; compiling every installed file up
# front (torch, transformers, prefect) costs a minute of set-up for modules never imported.
$PIP install -q --no-compile --disable-pip-version-check -c constraints.txt -e '.[dev]'
$PIP install -q --no-compile --disable-pip-version-check --no-deps -r requirements-nodeps.txt
if $PIP show torchaudio >/dev/null 2>&1; then
  echo "setup: torchaudio got installed (it breaks diffusers with torch 2.13); removing it" >&2
  $PIP uninstall -y -q torchaudio
fi
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} installed; expected 2.13.0"
PY
touch "$VENV/.installed"
