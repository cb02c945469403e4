#!/usr/bin/env bash
# One command for a fresh machine: system data package (where apt exists), a virtual environment with the
# pinned stack, this project, then the main job on the embedded default (Fashion-MNIST class-to-image generation).
#   bash install.sh            # everything
#   SKIP_MAIN_JOB=1 bash install.sh   # install only
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# 1. From Debian, where apt exists: Fashion-MNIST (the tests fall back to the committed subset without it) and
#    chromium, the headless browser of the app's end-to-end tests (playwright drives it; it never downloads one).
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
APT_UPDATED=""
apt_install() {  # apt_install PACKAGE WHAT-IF-IT-FAILS: one line of output either way
  [ -n "$APT_UPDATED" ] || { $SUDO apt-get update -qq >/dev/null 2>&1; APT_UPDATED=1; }
  if $SUDO apt-get install -y -qq "$1" >/dev/null 2>&1; then echo "installed $1"; else echo "note: could not apt-get install $1; $2"; fi
}
if command -v apt-get >/dev/null 2>&1; then
  [ -d /usr/share/datasets/fashion-mnist ] || apt_install dataset-fashion-mnist "using the committed Fashion-MNIST subset"
  command -v chromium >/dev/null 2>&1 || apt_install chromium "the app's browser tests will skip"
fi

# 2. Virtual environment with the pinned stack and this project (editable, so configs/ stay beside the code), with
#    the optional extras the tests cover: diffusers (SSDD as a diffusers VAE) and wandb (log_with=wandb, offline).
#    pip's own output goes to .venv/pip-install.log; its last lines are shown if it fails.
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
LOG=.venv/pip-install.log
if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e ".[test,diffusers,wandb]"; } >"$LOG" 2>&1; then
  echo "error: pip install failed; the last lines of $LOG:" >&2
  tail -n 25 "$LOG" >&2
  exit 1
fi
echo "installed into .venv: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)') (pip log: $LOG)"

# 3. The main job on the embedded default: class-to-image generation with the committed Fashion-MNIST bundle
#    (DiT-Ti/1 on the latents of the project's SSDD tokenizer, decoded by its distilled one-step decoder).
if [ -z "${SKIP_MAIN_JOB:-}" ]; then
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} GRADIO_ANALYTICS_ENABLED=False
  .venv/bin/python sample/generate.py --class sneaker "ankle boot" bag --num 8 --seed 0 --out runs/generate/quickstart
  echo "main job done: see runs/generate/quickstart/grid.png"
fi
