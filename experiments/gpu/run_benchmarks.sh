#!/usr/bin/env bash
# On an H100/H200 machine (with the .whl/ folder that fetch_wheels.sh filled): installs the
# wheels, then runs the GPU checks and benchmarks of BENCHMARKS.md ("Pending on a
# GPU"), writing JSON and logs to $OUT (default ./gpu_out). About 10 minutes of device time;
# pass a step name (tests, moe, step4, step2) to run one part.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
SITE=/tmp/emo_site; mkdir -p "$SITE/xprof/cli"
python3 -m pip install -q --no-deps --target "$SITE" .whl/*.whl
# tokamax imports xprof's kernel-stats tool at import time; the kernels do not need it.
printf '' > "$SITE/xprof/__init__.py"; printf '' > "$SITE/xprof/cli/__init__.py"
printf 'def get_kernel_stats_tool(*args, **kwargs):\n  raise NotImplementedError\n' \
    > "$SITE/xprof/cli/tools.py"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, tokamax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"
STEP="${1:-all}"
want() { [ "$STEP" = all ] || [ "$STEP" = "$1" ]; }
if want tests; then
  JAX_PLATFORMS=cuda python3 -m pytest tests/test_model.py tests/test_experts.py -q -k "gpu or grouped or ragged" \
      2>&1 | tail -20 | tee "$OUT/tests.log"
fi
if want moe; then
  python3 -m experiments.bench_moe --shapes emo,demo --dtype bfloat16 \
      --backends capacity,ragged:xla,ragged:tokamax --json_out "$OUT/bench_moe.json" \
      2>&1 | tail -20 | tee "$OUT/bench_moe.log"
fi
if want step4; then
  python3 -m experiments.bench_step --config configs/emo_1b14b.py --layers 4 --batch 2 \
      --seq_len 4096 --param_dtype bfloat16 --backends capacity,ragged:tokamax \
      --config.execution.attention_impl=cudnn --config.execution.remat_policy=dots_and_attention \
      --steps 10 --json_out "$OUT/bench_step_l4_bf16.json" 2>&1 | tail -12 | tee "$OUT/step4.log"
fi
if want step2; then
  python3 -m experiments.bench_step --config configs/emo_1b14b.py --layers 2 --batch 4 \
      --seq_len 4096 --backends capacity,ragged:tokamax --config.execution.attention_impl=cudnn \
      --config.execution.remat_policy=dots_and_attention --steps 10 \
      --json_out "$OUT/bench_step_l2_fp32.json" 2>&1 | tail -12 | tee "$OUT/step2.log"
fi
