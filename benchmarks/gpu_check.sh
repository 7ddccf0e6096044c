#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the bfloat16 attention tests, then the base model's MFU.
#
#     bash benchmarks/gpu_check.sh            # ~2-4 min; stops at GPU_CHECK_SECONDS (280)
#     PYTHON=/opt/venv/bin/python bash benchmarks/gpu_check.sh
#
# 1. Python: $PYTHON, else ./.venv/bin/python, else python3: the first whose jax has a GPU
#    backend (a copied CPU .venv has none). If none has, or GPU_CHECK_VENV=1, it makes a
#    venv (/tmp/gpu_check_venv) with jax[cuda12] (GPU_CHECK_CUDA=cuda13 for CUDA 13) at
#    requirements.txt's jax pin plus requirements.txt, from the package index. Where the
#    index cannot be reached it stops and says so.
# 2. The packages the repository imports beyond jax (flax, optax, grain, ml_collections,
#    tensorflow_datasets, ...) are checked by importing them. On a Python that was not made
#    here, missing ones are installed from the wheels in .whl/ if it holds any (no network:
#    `pip install --no-index --no-deps --target`), never from the index, so the machine's
#    own GPU jax is not replaced. What is still missing is named, with the command that
#    fetches it, and the steps that need it are skipped.
# 3. JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu.py (tests/conftest.py pins cpu
#    when JAX_PLATFORMS is unset, which would skip every test).
# 4. python benchmarks/gpu_mfu.py: the base translation model's bfloat16 train step, MFU
#    against the card's published dense bf16 peak and against a measured bf16 matmul.
#
# Logs and gpu_mfu.json go to runs/gpu_check/ (GPU_CHECK_OUT). Exit status: 0 when both
# steps passed, 1 when one failed or was skipped, 2 when no GPU jax could be had.
#
# GPU_CHECK_DRY_RUN=1 rehearses the flow on a machine without a GPU: it takes the first
# Python with jax on any backend, runs the tests on CPU (they skip, so status is 1) and
# gpu_mfu.py --tiny. Nothing is installed in a dry run.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=${GPU_CHECK_DRY_RUN:-0}
# Named, so that a failed GPU start is an error rather than a quiet fall-back to the CPU.
platform=$([ "$dry" = 1 ] && echo cpu || echo cuda)

budget=${GPU_CHECK_SECONDS:-280}
out=${GPU_CHECK_OUT:-runs/gpu_check}
cuda=${GPU_CHECK_CUDA:-cuda12}
site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}  # where .whl/ is installed
venv=${GPU_CHECK_VENV_DIR:-/tmp/gpu_check_venv}  # outside the repository: nothing to ignore
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
say() { echo "gpu_check: $*" >&2; }

# Exit status 0 when python $1's jax sees a GPU (JAX_PLATFORMS unset: let jax choose).
gpu_jax() {
  [ "$dry" = 1 ] && { "$1" -c 'import jax' >/dev/null 2>&1; return; }
  env -u JAX_PLATFORMS "$1" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
    >/dev/null 2>&1
}
# The modules of $2.. that python $1 cannot import, space-separated.
missing() {
  local py=$1; shift
  "$py" - "$@" <<'EOF' 2>/dev/null
import importlib, sys
gone = []
for name in sys.argv[1:]:
  try:
    importlib.import_module(name)
  except ImportError:
    gone.append(name)
print(" ".join(gone))
EOF
}
index_reachable() { timeout 20 "$1" -m pip index versions pip >/dev/null 2>&1; }

echo "== GPU"
if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; then
  if [ "$dry" != 1 ] && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    say "no NVIDIA GPU here (nvidia-smi fails and there is no /dev/nvidia0)"; exit 2
  fi
  say "nvidia-smi not found or failed"
fi

mkdir -p "$out"

# ---- 1. a Python whose jax sees the GPU
python=""
if [ "${GPU_CHECK_VENV:-0}" != 1 ]; then
  for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if gpu_jax "$candidate"; then python=$candidate; break; fi
  done
fi
made_here=0
if [ -z "$python" ] && [ "$dry" = 1 ]; then
  say "dry run: no Python with jax found"; exit 2
fi
if [ -z "$python" ]; then
  pin=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)
  if ! index_reachable python3; then
    say "no Python here has a jax that sees a GPU (tried \$PYTHON, .venv/bin/python, python3),"
    say "and the package index cannot be reached to install jax[$cuda]==$pin."
    say "Give a GPU-enabled Python with PYTHON=..., or run where pip can reach the index."
    exit 2
  fi
  say "no GPU jax found: making $venv with jax[$cuda]==$pin and requirements.txt"
  python3 -m venv "$venv" \
    && timeout "$(left)" "$venv/bin/python" -m pip install -q "jax[$cuda]==$pin" -r requirements.txt
  if ! gpu_jax "$venv/bin/python"; then
    say "the jax of $venv does not see a GPU (the install failed or timed out, or the"
    say "driver does not match $cuda: try GPU_CHECK_CUDA=cuda13)"
    exit 2
  fi
  python=$venv/bin/python
  made_here=1
fi
JAX_PLATFORMS=$platform "$python" -c \
  'import jax; print("jax", jax.__version__, "on", jax.devices()[0].device_kind)'

# ---- 2. the packages the repository imports
test_modules="flax numpy pytest"
mfu_modules="flax numpy optax orbax.checkpoint grain ml_collections tensorflow_datasets
  sentencepiece tensorboardX absl"
all_modules=$(echo $test_modules $mfu_modules | tr ' ' '\n' | sort -u)
gone=$(missing "$python" $all_modules)
if [ -n "$gone" ] && [ "$made_here" = 0 ] && [ "$dry" != 1 ] \
    && compgen -G ".whl/*.whl" >/dev/null; then
  say "missing: $gone; installing the wheels in .whl/ into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    || say "installing .whl/ failed"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  gone=$(missing "$python" $all_modules)
fi
if [ -n "$gone" ]; then
  say "still missing: $gone (requirements.txt pins their packages). Where pip reaches the"
  say "index, fetch wheels for this machine's Python into .whl/ and rerun (installed without"
  version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  say "network): pip download --no-deps --only-binary=:all: --python-version $version \\"
  say "  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \\"
  say "  PACKAGE==VERSION"
  say "  for each missing package and each of its own missing dependencies."
fi
missing_for() { for m in $1; do case " $gone " in *" $m "*) echo -n "$m ";; esac; done; }

# ---- 3. tests
status=0
tests_gone=$(missing_for "$test_modules")
if [ -n "$tests_gone" ]; then
  say "tests skipped: missing $tests_gone"; status=1
elif [ "$(left)" -lt 30 ]; then
  say "tests skipped: only $(left) s of the ${budget} s left"; status=1
else
  limit=$(( $(left) < 150 ? $(left) : 150 ))
  echo "== JAX_PLATFORMS=$platform pytest -q tests/test_gpu.py (limit ${limit} s)"
  JAX_PLATFORMS=$platform timeout "$limit" "$python" -m pytest -q -rs -p no:cacheprovider \
    tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then say "tests timed out after ${limit} s"; status=1
  elif [ "$rc" != 0 ]; then say "tests failed (exit $rc)"; status=1
  elif grep -q "skipped" "$out/test_gpu.log"; then
    say "tests were skipped: jax did not run on the GPU"; status=1
  fi
fi

# ---- 4. MFU
mfu_gone=$(missing_for "$mfu_modules")
if [ -n "$mfu_gone" ]; then
  say "MFU skipped: missing $mfu_gone"; status=1
elif [ "$(left)" -lt 60 ]; then
  say "MFU skipped: only $(left) s of the ${budget} s left"; status=1
else
  limit=$(left)
  echo "== benchmarks/gpu_mfu.py (limit ${limit} s)"
  tiny=$([ "$dry" = 1 ] && echo --tiny)
  JAX_PLATFORMS=$platform PYTHONUNBUFFERED=1 timeout "$limit" \
    "$python" benchmarks/gpu_mfu.py $tiny --output="$out/gpu_mfu.json" 2>&1 \
    | tee "$out/gpu_mfu.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then say "MFU timed out after ${limit} s"; status=1
  elif [ "$rc" != 0 ]; then say "MFU failed (exit $rc)"; status=1
  fi
fi

echo "== done in $((SECONDS - start)) s; logs in $out/; status $status"
exit "$status"
