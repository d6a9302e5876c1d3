#!/usr/bin/env bash
# The packages this engine needs that a GPU machine's image lacks, as wheels in .whl/ for bench/gpu.sh to install
# there. Run it here, where pip reaches the registries (the GPU machine reaches nothing), then carry .whl in the
# device call bench/README.md gives ("On a GPU machine"):
#
#   bash bench/gpu_wheels.sh                   # PYVER=3.12 (the image's python3), x86-64 manylinux wheels
#
# The image holds torch, transformers, tokenizers, safetensors, numpy, msgpack, tqdm, pyyaml and pytest (the device
# tool's KINDS.md lists it), not pyzmq, soxr or soundfile (nor soundfile's cffi); setuptools comes along to build
# this checkout there in pip's isolated environment (gpu.sh says why). Packages only for tests that never run there
# (the Realtime endpoint, voice enrolment) are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PACKAGES=(pyzmq soxr soundfile cffi pycparser setuptools)
rm -rf .whl  # one version of each: two would stop the install there
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d .whl "${PACKAGES[@]}"
ls .whl
du -sh .whl
