#!/usr/bin/env bash
# Install kdlab and what it needs on a fresh machine: the offline data (Debian's dataset-fashion-mnist
# and fortunes, when apt is there), and a virtual environment .venv holding torch
# (pinned by constraints.txt) and kdlab itself with its dev tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# The offline data: Fashion-MNIST (images) and Debian's fortunes (English text, for language models).
packages=""
if [ ! -d /usr/share/datasets/fashion-mnist ]; then packages="dataset-fashion-mnist"; fi
if ! ls /usr/share/games/fortunes/*.u8 >/dev/null 2>&1; then packages="$packages fortunes"; fi
if [ -n "$packages" ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "== Installing the offline data (Debian packages:$packages)"
  # shellcheck disable=SC2086  # the package list is words
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq $packages; }; then
    echo "warning: could not install$packages; kdlab will try torchvision's download for Fashion-MNIST." >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "== Creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
echo "== Installing kdlab into .venv (torch from constraints.txt)"
# The filter only trims noise; with pipefail a pip failure still stops the script.
.venv/bin/python -m pip install --disable-pip-version-check -c constraints.txt -e ".[dev,sweep,slurm,export,lm]" 2>&1 \
  | { grep -v -e "^Requirement already satisfied" -e "is ignored: it is neither a file nor a directory" || true; }
.venv/bin/python -c "import kdlab, torch, lightning, hydra; print('kdlab ready: torch', torch.__version__)"
