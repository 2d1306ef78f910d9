#!/usr/bin/env bash
# The GPU path in one call, on a machine with CUDA and no network: the test suite's CUDA cases
# (tests/test_cuda.py: reranker backend, reader, a G-Rerank step, the service's /rerank and /answer on cuda)
# and a short GPU benchmark (python -m bench.gpu), results written to OUT_DIR. Minutes, not more.
#
#   bench/gpu_check.sh OUT_DIR
#
# It uses the machine's own python3 with its PyTorch (CUDA build). Python packages the machine lacks come
# from .whl/ in the checkout, installed offline into a temporary folder: `make gpu-wheels` downloads them
# here beforehand (for Python 3.12, the GPU image's). Exit status: non-zero if the tests or the benchmark failed.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# The CUDA tests fail rather than skip when CUDA is missing: a GPU check must not pass by skipping.
export GRERANK_REQUIRE_CUDA=1
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  # The machine's own packages (torch above all) stay first; the wheels only fill gaps.
  export PYTHONPATH=$PWD:$("$py" -c 'import site; print(":".join(site.getsitepackages()))'):$site
fi
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))' \
  | tee "$out/device.txt" || exit 1
start=$(date +%s)
timeout 360 "$py" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$out/cuda-tests.xml" tests/test_cuda.py 2>&1 \
  | tee "$out/cuda-tests.log"
tests=${PIPESTATUS[0]}
timeout 240 "$py" -m bench.gpu --out "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench, $(( $(date +%s) - start )) s" | tee "$out/summary.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
