#!/bin/bash
# The GPU run behind benchmarks/gpu_h100/ (issue #7): machine facts, the GPU tests, then
# saisa-bench at Vicuna-7B width in bf16 (train-step MFU, decode tokens/s) beside the HF
# PyTorch peer on the same GPU. Run from the repository root on a machine whose python3
# has jax with CUDA, flax, optax, torch and transformers; wheels in .whl/ (ml-collections
# where the image lacks it) are installed first. Results land in $OUT (default
# runs/gpu_h100): env.txt, tests.txt, $NAME/{bench.json,log.txt} (NAME default bench_<attention>).
#
#   ATTENTION=cudnn LAYERS=4 BATCH=8 bash benchmarks/gpu_h100/run.sh
set -u
OUT=${OUT:-runs/gpu_h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The HF peer runs (in a child process) before JAX opens the GPU: JAX may take 90%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, transformers, torch, ml_collections
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'transformers', transformers.__version__, 'torch', torch.__version__)
print(jax.devices(), jax.devices()[0].device_kind)"
} 2>&1 | tee "$OUT/env.txt"

if [ "${TESTS:-1}" = 1 ]; then
  JAX_PLATFORMS=cuda timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py "tests/test_attention.py::test_cudnn_on_gpu_equals_einsum_in_bfloat16" \
    2>&1 | tee "$OUT/tests.txt" | tail -25
fi

ATTENTION=${ATTENTION:-cudnn}
dir="$OUT/${NAME:-bench_$ATTENTION}"
mkdir -p "$dir"
timeout "${BENCH_TIMEOUT:-420}" python3 -m saisa_jax.tools.bench --presets "${PRESETS:-w7b}" \
  --dtype "${DTYPE:-bfloat16}" --remat "${REMAT:-full}" --attention "$ATTENTION" \
  --batch "${BATCH:-8}" --llm_layers "${LAYERS:-4}" --alignments "${ALIGNMENTS:-saisa,llava}" \
  --repeats "${REPEATS:-10}" --train_unroll "${TRAIN_UNROLL:-full}" \
  ${BENCH_FLAGS:-} --out "$dir" 2>&1 | tee "$dir/log.txt" | grep -v "^W0000\|^I0000"
echo "bench exit ${PIPESTATUS[0]}"
rm -f "$dir/bench.png" "$dir/bench.md"  # 8 files come back from the device machine
