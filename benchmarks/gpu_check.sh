#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one call: the bfloat16 attention tests, the train
# step's speed and MFU against nanoGPT, the training loop against its pure step, and the
# tiny-Shakespeare GPU recipe's time to nanoGPT's validation loss, then one table.
#
#     bash benchmarks/gpu_check.sh            # ~7-9 min; stops at GPU_CHECK_SECONDS (540)
#     PYTHON=/opt/venv/bin/python bash benchmarks/gpu_check.sh
#     GPU_CHECK_STEPS=mfu,loop bash benchmarks/gpu_check.sh     # some of the steps
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
# Then the steps of GPU_CHECK_STEPS (default tests,mfu,profile,loop,recipe), each within
# the time left:
# tests   JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu.py (tests/conftest.py pins
#         cpu when JAX_PLATFORMS is unset, which would skip every test).
# mfu     benchmarks/gpu_mfu.py --shapes=gpu --peer=nanogpt: GPT-2 small (batch 12 and 32)
#         and the paper's base model, bfloat16; MFU against the card's published dense
#         bf16 peak and a measured bf16 matmul; nanoGPT's bench.py before and after.
# profile benchmarks/profile_step.py --shapes=gpt2_small,paper_base_gpu: 5 steps of each
#         under jax.profiler; per-op and per-kind times, the compiled HLO and the trace in
#         $out/profile/ (where the step's time goes, which issue 15 asks for first).
# loop    benchmarks/loop_speed.py on configs/generation.py:recipe=gpu: main.py's loop
#         steps/s against the pure step, with steps_per_call 1 and 10.
# recipe  benchmarks/generation.py nanogpt --variant=recipe=gpu --target=1.47 (ours) and
#         nanoGPT's own GPU recipe (benchmarks/peers.py): wall time to validation 1.47.
# The peer (nanoGPT, run with $PEER_PYTHON, default python3, which needs torch) and the
# text come from ../shared beside the checkout or, where only the checkout travels, from
# .gpu_carry/peers/nanogpt and .gpu_carry/data/tinyshakespeare (copy them there and carry
# the folder; .gitignore keeps it out of git).
#
# Logs and JSON go to runs/gpu_check/ (GPU_CHECK_OUT); benchmarks/gpu_report.py prints the
# table from them. Exit status: 0 when every step passed, 1 when one failed or was
# skipped, 2 when no GPU jax could be had.
#
# GPU_CHECK_DRY_RUN=1 rehearses the flow on a machine without a GPU: it takes the first
# Python with jax on any backend, runs the tests on CPU (they skip, so status is 1),
# gpu_mfu.py --tiny, and the loop and recipe steps on a one-layer model for a few steps
# (the GPU peer steps fail on a CPU-only torch and say so). Nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=${GPU_CHECK_DRY_RUN:-0}
# Named, so that a failed GPU start is an error rather than a quiet fall-back to the CPU.
platform=$([ "$dry" = 1 ] && echo cpu || echo cuda)

budget=${GPU_CHECK_SECONDS:-540}
steps=${GPU_CHECK_STEPS:-tests,mfu,profile,loop,recipe}
wanted() { case ",$steps," in *",$1,"*) return 0;; esac; return 1; }
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
  sentencepiece absl"
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

# ---- where the peer and the text are
for pair in "peers/nanogpt:PEER_NANOGPT_DIR" "data/tinyshakespeare:PEER_SHAKESPEARE_DIR"; do
  sub=${pair%%:*}; var=${pair##*:}
  if [ -z "${!var:-}" ] && [ ! -d "../shared/$sub" ] && [ -d ".gpu_carry/$sub" ]; then
    export "$var=$PWD/.gpu_carry/$sub"
  fi
done
data_dir=${PEER_SHAKESPEARE_DIR:-../shared/data/tinyshakespeare}
peer_python=${PEER_PYTHON:-python3}
[ "$dry" = 1 ] && peer_python=${PEER_PYTHON:-$python}

status=0
# run NAME LIMIT_CAP COMMAND...: runs a step within the time left (at most LIMIT_CAP s),
# teeing its output to $out/NAME.log; a failure or timeout sets status 1.
run() {
  local name=$1 cap=$2; shift 2
  local limit=$(( $(left) < cap ? $(left) : cap ))
  if [ "$limit" -lt 20 ]; then say "$name skipped: only $(left) s of the ${budget} s left"
    status=1; return; fi
  echo "== $name (limit ${limit} s): $*"
  JAX_PLATFORMS=$platform PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then say "$name timed out after ${limit} s"; status=1
  elif [ "$rc" != 0 ]; then say "$name failed (exit $rc)"; status=1
  fi
}
mfu_gone=$(missing_for "$mfu_modules")
tiny=$([ "$dry" = 1 ] && echo --tiny)  # the dry run's shapes: one layer, a few tokens

# ---- 3. tests
if wanted tests; then
  tests_gone=$(missing_for "$test_modules")
  if [ -n "$tests_gone" ]; then
    say "tests skipped: missing $tests_gone"; status=1
  else
    run test_gpu 150 "$python" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
    if grep -q "skipped" "$out/test_gpu.log" 2>/dev/null; then
      say "tests were skipped: jax did not run on the GPU"; status=1
    fi
  fi
fi

# ---- 4. step speed and MFU, beside nanoGPT's bench.py
if wanted mfu; then
  if [ -n "$mfu_gone" ]; then say "mfu skipped: missing $mfu_gone"; status=1
  else
    # nanoGPT's bench.py (torch) runs while this JAX process holds the GPU: JAX takes half
    # of its memory here, not its default 75%.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
    run gpu_mfu 240 "$python" benchmarks/gpu_mfu.py $tiny --shapes=gpu --peer=nanogpt \
      --peer_python="$peer_python" --output="$out/gpu_mfu.json"
    unset XLA_PYTHON_CLIENT_MEM_FRACTION
  fi
fi

# ---- 5. where the step's time goes: a per-op profile
if wanted profile; then
  if [ -n "$mfu_gone" ]; then say "profile skipped: missing $mfu_gone"; status=1
  else
    run profile 150 "$python" -m benchmarks.profile_step $tiny \
      --shapes=gpt2_small,paper_base_gpu --steps=5 --out="$out/profile"
  fi
fi

# ---- 6. the loop against its pure step
small=()  # the dry run: a one-layer model, a few steps
[ "$dry" = 1 ] && small=(--config.model.num_decoder_layers=1 --config.model.d_model=32
  --config.model.d_ff=64 --config.model.num_heads=2 --config.train.batch_size=4
  --config.data.max_target_length=32 --config.train.log_every_steps=10
  --config.eval.eval_batch_size=16)
accel=$([ "$dry" = 1 ] && echo ",accel=cpu")
if wanted loop; then
  if [ -n "$mfu_gone" ]; then say "loop skipped: missing $mfu_gone"; status=1
  else
    loop_steps=$([ "$dry" = 1 ] && echo 40 || echo 1000)
    run loop_speed 150 "$python" -m benchmarks.loop_speed \
      --config="configs/generation.py:recipe=gpu$accel" --steps_per_call=1,10 \
      --steps="$loop_steps" --output="$out/loop_speed.json" \
      --config.data.data_dir="$data_dir" "${small[@]}"
  fi
fi

# ---- 7. the GPU recipe: time to validation loss 1.47, ours and nanoGPT's
if wanted recipe; then
  if [ -n "$mfu_gone" ]; then say "recipe skipped: missing $mfu_gone"; status=1
  else
    recipe_steps=()
    peer_flags=()
    [ "$dry" = 1 ] && { recipe_steps=(--config.train.num_train_steps=20
      --config.eval.eval_every_steps=10); peer_flags=(--device=cpu --compile=False
      --max_iters=20 --eval_interval=10 --eval_iters=2 --batch_size=4 --block_size=32
      --n_layer=1 --n_head=2 --n_embd=32); }
    run recipe_ours 200 "$python" benchmarks/generation.py nanogpt \
      --variant="recipe=gpu$accel" --target=1.47 --output="$out/recipe_ours.json" \
      --config.data.data_dir="$data_dir" "${small[@]}" "${recipe_steps[@]}"
    run recipe_nanogpt 200 "$python" -m benchmarks.peers nanogpt_shakespeare \
      --peer_python="$peer_python" --output="$out/recipe_nanogpt.json" -- "${peer_flags[@]}"
  fi
fi

echo "== summary"
"$python" benchmarks/gpu_report.py "$out" | tee "$out/summary.md"
echo "== done in $((SECONDS - start)) s; logs in $out/; status $status"
exit "$status"
