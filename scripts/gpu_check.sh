#!/usr/bin/env bash
# GPU check of moe_compile's kernels, about 6 minutes on an H200:
#   1. the GPU tests: the Triton kernel compiled (not interpreted) against the op's CPU implementation, the op's
#      CUDA dispatch, the custom op itself, and TensorRT engines where TensorRT is installed (else skipped, said so);
#   2. benchmarks/moe_kernel.py: one MoE layer in bf16 at GPT-2-small, LLaMA-7B-like and fine-grained shapes for
#      512 .. 16384 tokens: moe_ffn (Triton) vs dense cuBLAS of equal FLOPs vs grouped_mm vs the eager loop, and
#      the `ort` target on ONNX Runtime's CUDA provider when onnxruntime-gpu is installed; JSON + markdown under
#      benchmarks/results/ (moe_kernel_<gpu>.json / .md).
#
# Needs: torch >= 2.11 with CUDA, triton >= 3.6; moe_compile's own dependencies (safetensors, tqdm, onnx,
# onnxscript). On an image without them and without network, build a folder of their wheels on a machine that has
# network and carry it as .gpu_deps (the script puts it on PYTHONPATH):
#   pip install --target .gpu_deps --python-version 3.12 --only-binary=:all: --no-deps \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       safetensors tqdm onnx onnxscript onnx_ir ml_dtypes typing_extensions protobuf \
#       pytest pluggy iniconfig packaging                                       (about 50 MB)
# Usage: scripts/gpu_check.sh [extra benchmark flags, e.g. --tokens 4096 --no-tune]
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/.gpu_deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

"$PYTHON" - <<'PY' || exit 2
import importlib, sys
missing = [m for m in ("torch", "triton", "safetensors", "tqdm", "onnx", "onnxscript", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing}; see the header of scripts/gpu_check.sh (.gpu_deps)")
import torch, triton
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
PY

echo "== GPU tests"
timeout 120 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/kernels tests/export/test_tensorrt.py || status=1

echo "== benchmark"
gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
timeout 230 "$PYTHON" benchmarks/moe_kernel.py --budget 170 --out "benchmarks/results/moe_kernel_${gpu}" "$@" || status=1
exit $status
