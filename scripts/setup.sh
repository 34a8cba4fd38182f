#!/usr/bin/env bash
# Install kdlab and what it needs on a fresh machine: the offline Fashion-MNIST (Debian's
# dataset-fashion-mnist, when apt is there), and a virtual environment .venv holding torch
# (pinned by constraints.txt) and kdlab itself with its dev tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "== Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; }; then
    echo "warning: could not install dataset-fashion-mnist; kdlab will try torchvision's download instead." >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "== Creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
echo "== Installing kdlab into .venv (torch from constraints.txt)"
# The filter only trims noise; with pipefail a pip failure still stops the script.
.venv/bin/python -m pip install --disable-pip-version-check -c constraints.txt -e ".[dev,sweep,slurm,export]" 2>&1 \
  | { grep -v -e "^Requirement already satisfied" -e "is ignored: it is neither a file nor a directory" || true; }
.venv/bin/python -c "import kdlab, torch, lightning, hydra; print('kdlab ready: torch', torch.__version__)"
