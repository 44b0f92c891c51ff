#!/usr/bin/env bash
# Create .venv (if missing) and install geo3k with its Megatron, Ray and test extras. Safe to rerun.
#
# torch comes first, on its own, so that a CPU machine never pulls the multi-GB CUDA build by accident:
# where pip finds torch 2.14.1 on local disk (these project machines) it takes that; elsewhere, on a machine
# without an NVIDIA driver, it uses PyTorch's CPU wheel index. Set GEO3K_TORCH_SPEC / GEO3K_TORCH_INDEX to
# choose yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's output goes to .venv/pip.log; on failure its tail is shown (pip 23 has crashed once on an index entry
# without a version, which a second try did not hit: the main install is tried twice)
pip_q() { .venv/bin/python -m pip install -q "$@" > .venv/pip.log 2>&1 || { grep -v "^WARNING: Location" .venv/pip.log | tail -5; return 1; }; }

if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  spec=${GEO3K_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
  if [ -n "${GEO3K_TORCH_INDEX:-}" ]; then
    pip_q $spec --index-url "$GEO3K_TORCH_INDEX"
  elif [ -d /etc/xdg/pip ] || command -v nvidia-smi >/dev/null; then
    pip_q $spec
  else
    pip_q torch torchvision --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip_q -e ".[megatron,ray,test]" || pip_q -e ".[megatron,ray,test]" || { echo "setup: pip install failed (above)" >&2; exit 1; }
.venv/bin/python -c "import torch, transformers, megatron.core, webdataset, xdist, ray" 2>/dev/null \
  || { echo "setup: the install is incomplete; rerun scripts/setup.sh and read pip's errors" >&2; exit 1; }
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
