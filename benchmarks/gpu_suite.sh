#!/usr/bin/env bash
# The local-attention checks and benchmarks for a machine with a GPU, as one script that fits a short
# lease (e.g. the project's lent device machine, which reaches no package registry).
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
#
# It runs this checkout from PYTHONPATH (nothing is installed; ml_collections, which the trainer's step
# needs, may come as a wheel unpacked onto PYTHONPATH beforehand) and writes under $OUT (default
# ./gpu_results): versions.txt, tests.log, pallas_check.log, layers.{json,md}, models.{json,md} and
# suite.log (8 files).
#   0. versions: Python, JAX (and its CUDA plugin), Flax, optax, orbax, chex, torch; nvidia-smi.
#   1. the test files that exercise every attention implementation (patches, halo, pallas compiled by
#      Triton), on the default backend, at float32 matmul precision (the tests compare the math with
#      naive references; JAX's GPU default would be TF32).
#   1b. the whole student trained a few steps with impl="pallas" against impl="halo".
#   2. the layer benchmark at every SA-ResNet26 attention shape, float32 and bfloat16.
#   3. the whole-model benchmark (teacher, student with each impl, sparse distillation, inference).
# The benchmarks run at JAX's default matmul precision, as training does. Each step has a time budget
# (seconds, overridable: TESTS_S, LAYERS_S, MODELS_S); a benchmark starts no new setting past its
# budget and keeps what it measured (and is stopped 60 s / 120 s past it). LAYER_SIZES/LAYER_BATCHES,
# MODEL_CONFIGS and DTYPES choose the settings; EXTRA_ARGS go to both benchmark commands, LAYER_ARGS and
# MODEL_ARGS to one (e.g. LAYER_ARGS="--layer-impls halo pallas"); TESTS_N is pytest's worker count.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}  # the torch peer shares it
PY=${PYTHON:-python3}
TESTS_S=${TESTS_S:-120}
LAYERS_S=${LAYERS_S:-150}
MODELS_S=${MODELS_S:-150}
EXTRA_ARGS=${EXTRA_ARGS:-}
LAYER_ARGS=${LAYER_ARGS:-}
MODEL_ARGS=${MODEL_ARGS:-}
PALLAS_CHECK_S=${PALLAS_CHECK_S:-60}
PALLAS_CHECK_ARGS=${PALLAS_CHECK_ARGS:-"--size 32 --width 1.0 --batch 128 --steps 4"}
LAYER_SIZES=${LAYER_SIZES:-"32 64 32"}
LAYER_BATCHES=${LAYER_BATCHES:-"128 64 256"}
MODEL_CONFIGS=${MODEL_CONFIGS:-"128x32 64x64 256x32"}
DTYPES=${DTYPES:-"float32 bfloat16"}
exec > >(tee -a "$OUT/suite.log") 2>&1
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

stamp "0. versions"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("jax", "jaxlib", "jax_cuda13_plugin", "jax_cuda12_plugin", "flax", "optax", "orbax.checkpoint",
             "chex", "ml_collections", "torch", "triton", "numpy"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not importable ({type(e).__name__}: {e})")
import jax
print("backend", jax.default_backend(), jax.devices())
print("platform_version", getattr(jax.devices()[0].client, "platform_version", "?"))
major, minor = (int(v) for v in jax.__version__.split(".")[:2])
if (major, minor) < (0, 10):
    sys.exit(f"jax {jax.__version__} is older than this code supports (0.10)")
import alite_jax.models, alite_jax.train  # noqa: F401  (the code under test imports here)
print("alite_jax from", alite_jax.__file__)
EOF
} 2>&1 | tee "$OUT/versions.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { stamp "versions check failed: stopping"; exit 1; }

stamp "1. attention tests on the default backend (float32 matmul precision)"
JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
  timeout "$TESTS_S" "$PY" -m pytest -q -n "${TESTS_N:-8}" --dist load -p no:cacheprovider -rfE \
  tests/test_attention.py tests/test_attention_impls.py 2>&1 | tee "$OUT/tests.log" | tail -n 40
stamp "tests exit status ${PIPESTATUS[0]} (124: stopped at ${TESTS_S} s)"

stamp "1b. the whole student trained with pallas against halo (benchmarks/pallas_model_check.py)"
# shellcheck disable=SC2086
timeout "$PALLAS_CHECK_S" "$PY" benchmarks/pallas_model_check.py $PALLAS_CHECK_ARGS 2>&1 | tee "$OUT/pallas_check.log"
stamp "pallas check exit status ${PIPESTATUS[0]}"

stamp "2. layers"
# shellcheck disable=SC2086
timeout $((LAYERS_S + 60)) "$PY" benchmarks/local_attention.py --skip-models --skip-autodiff \
  --image-sizes $LAYER_SIZES --layer-batches $LAYER_BATCHES --dtypes $DTYPES --repeats 7 \
  --deadline-s "$LAYERS_S" --json "$OUT/layers.json" --markdown "$OUT/layers.md" $EXTRA_ARGS $LAYER_ARGS
stamp "layers exit status $?"

stamp "3. models"
# shellcheck disable=SC2086
timeout $((MODELS_S + 120)) "$PY" benchmarks/local_attention.py --skip-layers \
  --model-configs $MODEL_CONFIGS --dtypes $DTYPES --steps 7 --deadline-s "$MODELS_S" \
  --json "$OUT/models.json" --markdown "$OUT/models.md" $EXTRA_ARGS $MODEL_ARGS
stamp "models exit status $?"
stamp "done"
