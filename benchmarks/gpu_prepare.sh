#!/usr/bin/env bash
# Before a GPU run: what the lent GPU machine lacks, put in git-ignored folders of the
# checkout (only the checkout travels there; ../shared/GPU.md says what the machine has).
#
#     bash benchmarks/gpu_prepare.sh          # here, where pip reaches the package index
#     # then, on the GPU machine: bash benchmarks/gpu_check.sh, carrying .whl and .gpu_carry
#
# .whl/        wheels for the GPU machine's Python (GPU_PYTHON_VERSION, 3.12) of the packages
#              it lacks (GPU_WHEELS below; promise has no wheel and is built here). Never jax,
#              flax or optax: the machine's own GPU builds must stay. gpu_check.sh installs
#              them with --no-index --no-deps into /tmp.
# .gpu_carry/  peers/nanogpt (../shared/peers/nanogpt, unmodified) and
#              data/tinyshakespeare (../shared/data/tinyshakespeare), which gpu_check.sh
#              reads when ../shared is not beside the checkout.
# Files already there are kept. Prints the size of what will travel (the limit is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${GPU_PYTHON_VERSION:-3.12}
# The GPU machine's missing packages, as ../shared/GPU.md lists them (2026-12-04).
GPU_WHEELS="array_record==0.8.6 dm-tree==0.1.10 docstring_parser==0.18.0
  googleapis-common-protos==1.76.0 grain==0.2.18 immutabledict==4.3.1
  importlib_resources==7.1.0 ml_collections==1.1.0 portpicker==1.6.0 simple-parsing==0.1.9
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0
  termcolor==3.3.0 toml==0.10.2"

mkdir -p .whl .gpu_carry/peers .gpu_carry/data
for spec in $GPU_WHEELS; do
  name=${spec%%==*}
  # A wheel's file name has the name in lower case with "_" for "-".
  if ls .whl | grep -qi "^$(echo "$name" | tr '-' '_')-"; then continue; fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec"
done
compgen -G ".whl/promise-*.whl" >/dev/null || python3 -m pip wheel -q --no-deps -w .whl promise==2.3

for pair in "peers/nanogpt" "data/tinyshakespeare"; do
  [ -d ".gpu_carry/$pair" ] && continue
  if [ ! -d "../shared/$pair" ]; then
    echo "gpu_prepare: ../shared/$pair is missing; the steps that need it will be skipped" >&2
    continue
  fi
  cp -r "../shared/$pair" ".gpu_carry/$pair"
  rm -rf ".gpu_carry/$pair/out-shakespeare-char"  # a run's output, if the copy had one
done
du -sh .whl .gpu_carry
echo "carry: [\".whl\", \".gpu_carry\"]; command: bash benchmarks/gpu_check.sh"
