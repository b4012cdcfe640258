#!/usr/bin/env bash
# Set up a fresh Debian machine (Python 3.11, no GPU): the Debian packages of the built-in
# data, and a virtual environment .venv with the Python packages. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

# The emoji font (text-to-image data) and Fashion-MNIST (class-conditional data).
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || ! [ -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends fonts-noto-color-emoji dataset-fashion-mnist >/dev/null
fi

# torch first and pinned (its CPU build: an unpinned torch pulls GBs of CUDA packages), then
# everything else, some of which depends on torch.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt
echo "setup done: .venv is ready"
