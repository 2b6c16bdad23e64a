#!/usr/bin/env bash
# The local-attention checks and benchmarks for a machine with a GPU, as one script that fits a short
# lease (e.g. the project's lent device machine, which reaches no package registry).
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh                          # every step (about 13 minutes)
#   OUT=/some/dir STEPS="tests check layers" bash benchmarks/gpu_suite.sh   # call 1 of 2 (~7 minutes)
#   OUT=/some/dir STEPS="models inference" bash benchmarks/gpu_suite.sh     # call 2 of 2 (~6 minutes)
#
# It runs this checkout from PYTHONPATH (nothing is installed; ml_collections, which the trainer's step
# needs, may come as a wheel unpacked onto PYTHONPATH beforehand; so may NATTEN, the fused kernels' speed
# peer, when a wheel for the device's torch exists) and writes under $OUT (default ./gpu_results):
# versions.txt, tests.log, model_check.log, layers.{json,md}, models.{json,md}, inference.log and
# suite.log.
#   0. versions: Python, JAX (and its CUDA plugin), Flax, optax, orbax, chex, torch, NATTEN; nvidia-smi.
#   1. tests: the test files that exercise every attention implementation (patches, halo, and the Pallas
#      kernels pallas and fused compiled by Triton; the fused ones against a dense float64 reference,
#      their lowering with no k*k-sized array outside the kernels), on the default backend, at float32
#      matmul precision (the tests compare the math with naive references; JAX's GPU default would be
#      TF32). The slow whole-student test is left to step 1b.
#   1b. check: the whole student trained a few steps with impl="fused" (CHECK_IMPL) against impl="halo".
#   2. layers: every SA-ResNet26 attention shape, float32 and bfloat16, fwd and fwd+bwd of conv, halo,
#      pallas, fused (and FUSED_TILINGS, e.g. "128x4 512x8", the tiling sweep), NATTEN if importable;
#      the peak column is XLA's buffers of each program (the fused ones hold no logits).
#   3. models: teacher and student training images/s (halo and fused), the sparse-distillation step
#      with each, inference, peak memory.
#   4. inference: benchmarks/inference.py's deployable forms (JAX and StableHLO; no TFLite on a GPU).
# The benchmarks run at JAX's default matmul precision, as training does. Each step has a time budget
# (seconds, overridable: TESTS_S, CHECK_S, LAYERS_S, MODELS_S, INFERENCE_S); a benchmark starts no new
# setting past its budget and keeps what it measured (and is stopped 60 s / 120 s past it).
# LAYER_SIZES/LAYER_BATCHES, MODEL_CONFIGS and DTYPES choose the settings; EXTRA_ARGS go to both benchmark
# commands, LAYER_ARGS and MODEL_ARGS to one (e.g. LAYER_ARGS="--layer-impls halo fused"); TESTS_N is
# pytest's worker count.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}  # the torch peer shares it
PY=${PYTHON:-python3}
STEPS=${STEPS:-"tests check layers models inference"}
TESTS_S=${TESTS_S:-150}
CHECK_S=${CHECK_S:-120}
LAYERS_S=${LAYERS_S:-150}
MODELS_S=${MODELS_S:-150}
INFERENCE_S=${INFERENCE_S:-90}
INFERENCE_ARGS=${INFERENCE_ARGS:-"--width 1.0 --batch 256 --skip-tflite"}
EXTRA_ARGS=${EXTRA_ARGS:-}
LAYER_ARGS=${LAYER_ARGS:-}
MODEL_ARGS=${MODEL_ARGS:-"--student-impls halo fused --distill-impls halo fused"}
CHECK_IMPL=${CHECK_IMPL:-fused}
CHECK_ARGS=${CHECK_ARGS:-"--size 32 --width 1.0 --batch 128 --steps 4"}
FUSED_TILINGS=${FUSED_TILINGS:-"128x4 512x8"}
LAYER_SIZES=${LAYER_SIZES:-"32 64 32"}
LAYER_BATCHES=${LAYER_BATCHES:-"128 64 256"}
MODEL_CONFIGS=${MODEL_CONFIGS:-"128x32 64x64 256x32"}
DTYPES=${DTYPES:-"float32 bfloat16"}
step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
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
             "chex", "ml_collections", "torch", "triton", "natten", "numpy"):
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

if step tests; then
  stamp "1. attention tests on the default backend (float32 matmul precision)"
  JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout "$TESTS_S" "$PY" -m pytest -q -n "${TESTS_N:-8}" --dist load -p no:cacheprovider -rfE -m "not slow" \
    tests/test_attention.py tests/test_attention_impls.py 2>&1 | tee "$OUT/tests.log" | tail -n 40
  stamp "tests exit status ${PIPESTATUS[0]} (124: stopped at ${TESTS_S} s)"
fi

if step check; then
  stamp "1b. the whole student trained with $CHECK_IMPL against halo (benchmarks/pallas_model_check.py)"
  # shellcheck disable=SC2086
  timeout "$CHECK_S" "$PY" benchmarks/pallas_model_check.py --impl "$CHECK_IMPL" $CHECK_ARGS 2>&1 \
    | tee "$OUT/model_check.log"
  stamp "model check exit status ${PIPESTATUS[0]}"
fi

if step layers; then
  stamp "2. layers"
  # shellcheck disable=SC2086
  timeout $((LAYERS_S + 60)) "$PY" benchmarks/local_attention.py --skip-models --skip-autodiff \
    --image-sizes $LAYER_SIZES --layer-batches $LAYER_BATCHES --dtypes $DTYPES --repeats 7 \
    ${FUSED_TILINGS:+--fused-tilings $FUSED_TILINGS} \
    --deadline-s "$LAYERS_S" --json "$OUT/layers.json" --markdown "$OUT/layers.md" $EXTRA_ARGS $LAYER_ARGS
  stamp "layers exit status $?"
fi

if step models; then
  stamp "3. models"
  # shellcheck disable=SC2086
  timeout $((MODELS_S + 120)) "$PY" benchmarks/local_attention.py --skip-layers \
    --model-configs $MODEL_CONFIGS --dtypes $DTYPES --steps 7 --deadline-s "$MODELS_S" \
    --json "$OUT/models.json" --markdown "$OUT/models.md" $EXTRA_ARGS $MODEL_ARGS
  stamp "models exit status $?"
fi

if step inference; then
  stamp "4. inference of the deployable forms (benchmarks/inference.py)"
  # shellcheck disable=SC2086
  timeout "$INFERENCE_S" "$PY" benchmarks/inference.py $INFERENCE_ARGS 2>&1 \
    | tee "$OUT/inference.log"
  stamp "inference exit status ${PIPESTATUS[0]}"
fi
stamp "done"
