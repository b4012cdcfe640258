#!/usr/bin/env bash
# Set up a fresh Debian machine (Python 3.11, no GPU): the Debian packages of the built-in
# data, and a virtual environment .venv with the Python packages at the versions the tests
# passed with (requirements.lock). Safe to run again.
#     bash setup.sh                  # install what requirements.lock pins
#     bash setup.sh --refresh-lock   # a new .venv from requirements.txt alone (today's releases
#                                    # within its bounds), written back to requirements.lock
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
pip_version() { grep -m1 "^pip==" requirements.lock | cut -d= -f3; }
if [ "${1:-}" = "--refresh-lock" ]; then
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -r requirements.txt
  { echo "# Every package that setup.sh installs, pinned: written by bash setup.sh --refresh-lock on $(date +%F)"
    echo "# (Python $(.venv/bin/python -c 'import platform; print(platform.python_version())'), CPU). A refresh is a change like any other: run the tests"
    echo "# (bash .ci/run from a clean clone) before committing it."
    .venv/bin/python -m pip freeze --all | sed 's/+cpu$//'; } > requirements.lock.new
  mv requirements.lock.new requirements.lock
  echo "requirements.lock refreshed: run the tests (bash .ci/run from a clean clone), then commit it"
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q "pip==$(pip_version)"
.venv/bin/python -m pip install -q torch==2.13.0 -c requirements.lock
.venv/bin/python -m pip install -q -r requirements.txt -c requirements.lock
# Nothing beyond the lock: a package it does not pin (a new dependency of a pinned one cannot
# appear, but a hand-made .venv may hold anything) is said, with how to refresh the pins.
extra=$(.venv/bin/python -m pip freeze --all | sed 's/+cpu$//' | grep -vxF -f <(grep -v '^#' requirements.lock) || true)
if [ -n "$extra" ]; then
  echo "setup.sh: .venv holds packages or versions that requirements.lock does not pin:" >&2
  echo "$extra" >&2
  echo "(a fresh .venv: rm -rf .venv && bash setup.sh; new pins: bash setup.sh --refresh-lock)" >&2
  exit 1
fi
echo "setup done: .venv is ready"
