#!/usr/bin/env bash
# The GPU benchmarks in one call on a lent GPU host whose python3 has jax[cuda], flax, optax,
# orbax, torch and transformers. Each benchmark runs in its own time box so that one failure
# leaves the others' figures; logs and JSON go to $OUT (default bench/results).
#
# The project's other dependencies travel as cp312 wheels in a git-ignored .whl/, fetched here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     grain==0.2.18 array_record==0.8.6 symusic==0.6.0 soundfile==0.14.0 soxr==1.1.0 \
#     tensorboardX==2.6.5 librosa==0.11.0 audioread pooch decorator platformdirs \
#     more-itertools portpicker pySmartDL cffi pycparser
#
#   [ONLY="stage0_scale sampling audio_features"] [STAGE0_RUNS=...] [STAGE0_BUDGET_S=170] \
#     bash bench/gpu_session.sh STAGE0_DATA.npz
#
# STAGE0_DATA: made here by `bench/stage0_scale.py prepare` (the BOSSA-mini corpus's windows).
set -u
OUT=${OUT:-bench/results}
DATA=${1:?usage: bench/gpu_session.sh STAGE0_DATA.npz}
LOG=$OUT/gpu_session.log
ONLY=${ONLY:-stage0_scale sampling audio_features}
STAGE0_RUNS=${STAGE0_RUNS:-mini:16000:32 wide:8000:32:1e-3}
STAGE0_BUDGET_S=${STAGE0_BUDGET_S:-170}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
mkdir -p "$OUT"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# the repository itself (not installed there); flax, optax and orbax are the host's (flax 0.12.8
# does not import under jax 0.11: jax.experimental.hijax has no HiPrimitive)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax',
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee -a "$LOG"

box() {  # box NAME SECONDS COMMAND...: one benchmark, time-boxed
  local name=$1 limit=$2 start
  shift 2
  case " $ONLY " in *" $name "*) ;; *) return ;; esac
  start=$(date +%s)
  echo "=== $name (limit $limit s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: rc ${PIPESTATUS[0]}, $(($(date +%s) - start)) s" | tee -a "$LOG"
}

# issue 11: the stage-0 LM longer and wider than the CPU recipe (budget: compiles and steps);
# the recorded runs (bench/results/stage0_scale_gpu.json) decayed the rate to 1e-4, as the recipe
# did then
box stage0_scale 270 python3 bench/stage0_scale.py run --data "$DATA" \
  --runs $STAGE0_RUNS --evals 1000 2400 4000 6000 8000 10000 12000 16000 \
  --set stage0.train.optim.min_lr=1.0e-4 \
  --budget-s "$STAGE0_BUDGET_S" --out "$OUT/stage0_scale_gpu.json"
# issue 10: the sampler at paper size, bf16, against the official recompute loop in torch
box sampling 150 python3 bench/sampling.py --gpu --product auto --lengths 1000 \
  --batches 1 8 --repeats 2 --jax-repeats 2 --official-steps 32
cp bench/results/sampling_gpu.json "$OUT/" 2>/dev/null
# the frozen MusicGen stack at paper width, bf16, against HF MusicgenModel with SDPA
box audio_features 130 python3 bench/audio_features.py --gpu --skip-encodec --repeats 3 \
  --gpu-batches 1 8
cp bench/results/audio_features_gpu.json "$OUT/" 2>/dev/null
