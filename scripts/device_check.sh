#!/usr/bin/env bash
# Issue 7's GPU numbers in ONE device call (see ../shared/DEVICE.md and the README's "TensorRT and GPU"):
# build code-small on the GPU, check GPU tokens == CPU tokens == transformers, then time autoregressive,
# speculative and UAG side by side on onnxruntime's CUDA EP with code-small as the target.
#
#   run(command="bash scripts/device_check.sh", carry=[".ortgpu/ort.04", ".ortgpu/ort-gpu-install.sh",
#       ".ortgpu/ort.name", ".ortgpu/ort.sha256"], timeout_s=540)
#
# after ort.00..ort.03 went over in calls of their own (../shared/DEVICE.md: bash ../shared/tools/ort-gpu-parts.sh
# here first): with .ortgpu/ carried it gathers the parts and installs onnxruntime-gpu into /tmp/ortsite itself.
#
# Everything it reports goes to $OUT (env.txt, train.txt, cuda_tests.txt, strategies.txt, strategies.json). It needs
# no pip: a missing `dgopt` is put on PYTHONPATH from this checkout. Knobs (environment): DEVICE (cuda; cpu runs
# the same plumbing: checked on the CPU machine with DEVICE=cpu STEPS=2 PROMPTS=2 NEW=8 REPEATS=1 and a python
# without dgopt installed; never run on a GPU yet), STEPS (code-small's optimizer steps: the recipe's 4000 do not
# fit a 15-minute lease), PROMPTS, NEW, REPEATS, PY (python3), MODEL_DIR (a built code-small: skips the build).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1000}
PROMPTS=${PROMPTS:-20}
NEW=${NEW:-96}
REPEATS=${REPEATS:-3}
PY=${PY:-python3}
MODEL=${MODEL_DIR:-/tmp/dgopt-device/code-small}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if ! "$PY" -c "import dgopt.passes" 2>/dev/null; then      # the package maps passes/ and backends/ into dgopt
    shim=/tmp/dgopt-device/src
    rm -rf "$shim" && mkdir -p "$shim"
    cp -r dgopt "$shim/dgopt"
    ln -s "$PWD/passes" "$shim/dgopt/passes"
    ln -s "$PWD/backends" "$shim/dgopt/backends"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONSAFEPATH=1         # else `python -m` puts this checkout's dgopt/ (without passes/) first
fi

if [ "$DEVICE" = cuda ] && [ -f .ortgpu/ort-gpu-install.sh ]; then      # DEVICE.md's last part call
    mkdir -p /tmp/ortp && cp .ortgpu/ort.0* /tmp/ortp/ 2>/dev/null || true
    bash .ortgpu/ort-gpu-install.sh
fi
if [ -d /tmp/ortsite/onnxruntime ]; then export PYTHONPATH="/tmp/ortsite${PYTHONPATH:+:$PYTHONPATH}"; fi

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, onnxruntime, torch, transformers, dgopt
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "transformers", transformers.__version__, "onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers(), "dgopt", dgopt.__file__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
EOF
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    echo "device_check: onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu first (../shared/DEVICE.md)" >&2
    exit 2
fi

if [ ! -f "$MODEL/config.json" ]; then
    "$PY" -m dgopt.models.train build code-small --device "$DEVICE" --steps "$STEPS" --out "$MODEL" --no-progress \
        2>&1 | tee "$OUT/train.txt"
fi

if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt" || true
fi

# code-draft-sd / code-draft-xtok-sd were trained on code-tiny's outputs (code-small shares its tokenizer); the
# rows say how well they serve a larger target as well as what the fused step costs on the GPU
"$PY" benchmarks/strategies.py --device "$DEVICE" --model "$MODEL" --prompts "$PROMPTS" --new "$NEW" \
    --configs --jacobi --k 3 4 --unfused-k 3 --sample-k 3 --heuristic 12 --confidence 0.4 \
    --draft code-draft-sd --xdraft code-draft-xtok-sd --sample-draft code-draft-kd --repeats "$REPEATS" --out "$OUT" 2>&1 \
    | grep -v "^Loading weights" | tee "$OUT/strategies.txt"
