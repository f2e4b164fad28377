#!/usr/bin/env bash
# The pure-Python dependencies dgopt needs that the device image lacks (/work/.library/device/KINDS.md lists its
# packages: no pydantic), as cp312 x86-64 wheels in .whl/ (.gitignore'd). Run once here; device_check.sh installs
# them when `.whl` is carried:  run(command="bash scripts/device_check.sh", carry=[..., ".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pydantic==${PYDANTIC:-2.14.4}" "pydantic-core==${PYDANTIC_CORE:-2.50.5}" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5"
ls -la .whl
