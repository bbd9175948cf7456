#!/usr/bin/env bash
# The GPU check of the Triton kernel, as one script for a lent GPU machine (see README):
# GPU tests, then the kernel benchmark in bf16 and fp16; results under $OUT (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_flash_attention.py tests/test_model.py -s 2>&1 | tee "$OUT/gpu_tests.log"
timeout 150 python3 -m minterleave.kernels.bench_attention --dtype bfloat16 2>&1 | tee "$OUT/bench_bf16.md"
timeout 90 python3 -m minterleave.kernels.bench_attention --dtype float16 --repeats 10 2>&1 | tee "$OUT/bench_fp16.md"
