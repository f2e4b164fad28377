#!/usr/bin/env bash
# The GPU checks in ONE device call, staged: each stage has its own time limit, writes its result as soon as it
# ends, and the most valuable come first, so a call stopped at its limit still returns everything measured before.
#
#   run(command="bash scripts/device_check.sh", carry=[".ortgpu/ort.04", ".ortgpu/ort-gpu-install.sh",
#       ".ortgpu/ort.name", ".ortgpu/ort.sha256", ".whl"], timeout_s=420)
#
# .whl: the wheels the device image lacks (pydantic and its three dependencies, 2.8 MB), from
# `bash scripts/device_wheels.sh` here (KINDS.md's package list has no pydantic: dgopt would not import).
# after ort.00..ort.03 went over in calls of their own (../shared/DEVICE.md: bash ../shared/tools/ort-gpu-parts.sh
# here first); with .ortgpu/ carried it gathers the parts and installs onnxruntime-gpu into /tmp/ortsite itself.
#
# Budget (/work/.library/device/README.md, ../shared/DEVICE.md): 15 minutes of device time per task, starts, idle
# and the ~1 minute part transfer included, 10 minutes per command. The stages' limits add up to BUDGET_S (default
# 330 s, ~5.5 min), so start + transfer + this script fit twice in 15 minutes: room for one rerun.
#
#   stage        limit  what
#   env            20s  versions, providers, GPU; dgopt does not import: exit 4; no CUDA EP: exit 2 (one line)
#   tests          90s  tests/test_cuda.py (GPU tokens == CPU == transformers; fp16) and the TensorRT engine tests
#                       (skip without TensorRT); no pytest: exit 3, loudly (never a silent skip)
#   ar_fp16        60s  benchmarks/ar_decode.py --device cuda --precision fp16: tokens/s vs transformers fp16 and
#                       the per-token latency floor (weights / bandwidth + launches)
#   sampling       40s  benchmarks/sampling.py --device cuda: the sampler alone, torch CUDA vs ORT CUDA EP
#   strategies     75s  benchmarks/strategies.py --device cuda on the shipped code-tiny and drafts (no training, no
#                       tokenizer retraining: shipped assets only); rows are written as each completes
#   tune           45s  dgopt tune specs/lookahead.yaml --kinds lookahead ngram on the device: the GPU's cost curve
#                       by positions per forward and the config it picks there (tune.yaml, its header the numbers)
#   ar_fp32        45s  the same as ar_fp16 in fp32 (last: runs when the stages before left it room)
#
# A stage whose limit no longer fits in what is left of BUDGET_S is skipped and says so. Results, all under $OUT (at
# most 8 files come back): stages.json (one entry per stage, rewritten after each: rc, seconds, status, the last
# lines of its output), log.txt (every stage's full output), ar_fp16.json, ar_fp32.json, sampling.json,
# strategies.json, tune.yaml. Exit status: 4 dgopt does not import, 2 no CUDA EP, 3 no pytest, 1 a stage failed or was
# skipped, 0 all passed.
#
# Knobs (environment): DEVICE (cuda; cpu runs the same plumbing, as checked on the CPU machine with
# DEVICE=cpu BUDGET_S=120), BUDGET_S, PY (python3), NEW / PROMPTS / REPEATS (benchmark sizes), MODEL (code-tiny; a
# built model dir also works). No pip: a missing `dgopt` is put on PYTHONPATH from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-330}
PY=${PY:-python3}
NEW=${NEW:-64}
PROMPTS=${PROMPTS:-6}
REPEATS=${REPEATS:-3}
MODEL=${MODEL:-code-tiny}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/dgopt-device.XXXXXX)
START=$(date +%s)
FAILED=0
: >"$OUT/log.txt"
echo '{}' >"$OUT/stages.json"

if ! "$PY" -c "import dgopt.passes" 2>/dev/null; then      # the package maps passes/ and backends/ into dgopt
    shim=$WORK/src
    mkdir -p "$shim"
    cp -r dgopt "$shim/dgopt"
    ln -s "$PWD/passes" "$shim/dgopt/passes"
    ln -s "$PWD/backends" "$shim/dgopt/backends"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONSAFEPATH=1         # else `python -m` puts this checkout's dgopt/ (without passes/) first
fi
if [ "$DEVICE" = cuda ] && [ -f .ortgpu/ort-gpu-install.sh ] && [ ! -d /tmp/ortsite/onnxruntime ]; then
    mkdir -p /tmp/ortp && cp .ortgpu/ort.0* /tmp/ortp/ 2>/dev/null || true
    bash .ortgpu/ort-gpu-install.sh 2>&1 | tail -3
fi
if [ -d /tmp/ortsite/onnxruntime ]; then export PYTHONPATH="/tmp/ortsite${PYTHONPATH:+:$PYTHONPATH}"; fi
if ls .whl/*.whl >/dev/null 2>&1; then      # scripts/device_wheels.sh: what the device image lacks (pydantic)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        .whl/*.whl || echo "device_check: installing the carried .whl failed (see above)" >&2
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$WORK/site"      # last: never shadow the image's own packages
fi

# record NAME RC SECONDS STATUS: merge one stage's entry into stages.json (atomically: a kill leaves the last one)
record() {
    "$PY" - "$OUT/stages.json" "$1" "$2" "$3" "$4" "$WORK/$1.log" <<'EOF'
import json, os, sys
path, name, rc, secs, status, log = sys.argv[1:]
d = json.load(open(path))
tail = open(log, errors="replace").read().splitlines()[-15:] if os.path.exists(log) else []
d[name] = {"rc": int(rc), "seconds": int(secs), "status": status, "tail": tail}
open(path + ".tmp", "w").write(json.dumps(d, indent=1))
os.replace(path + ".tmp", path)
EOF
}

# stage NAME LIMIT_S COMMAND...: run it under its limit if the budget still holds it; log, record, copy its JSON
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$limit" -gt "$left" ]; then
        echo "== $name: skipped (needs ${limit}s, ${left}s of BUDGET_S left)" | tee -a "$OUT/log.txt"
        record "$name" -1 0 "skipped: budget"
        FAILED=1
        return
    fi
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/log.txt"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    grep -v "^Loading weights" "$WORK/$name.log" >>"$OUT/log.txt"
    local status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out"; elif [ "$rc" != 0 ]; then status=failed; fi
    [ "$status" = ok ] || FAILED=1
    for f in "$WORK/$name"/*.json; do [ -f "$f" ] && cp "$f" "$OUT/$name.json"; done
    record "$name" "$rc" $(($(date +%s) - t0)) "$status"
    echo "== $name: $status (rc $rc, $(($(date +%s) - t0))s)" | tee -a "$OUT/log.txt"
}

stage env 20 "$PY" -c "
import platform, onnxruntime, torch, transformers, dgopt
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__,
      onnxruntime.get_available_providers(), 'dgopt', dgopt.__file__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
try:
    import tensorrt
    print('tensorrt', tensorrt.__version__)
except Exception as e:
    print('tensorrt: not installed (' + type(e).__name__ + ')')
"
if ! "$PY" -c "import torch, onnxruntime, transformers, pydantic, dgopt.pipeline" 2>"$WORK/import.err"; then
    echo "device_check: dgopt or what it needs does not import: $(tail -1 "$WORK/import.err") (the device image" \
        "has no pydantic: run scripts/device_wheels.sh here and carry .whl)" | tee -a "$OUT/log.txt" >&2
    record env 4 0 "dgopt does not import"
    exit 4
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    echo "device_check: onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu first (../shared/DEVICE.md)" \
        | tee -a "$OUT/log.txt" >&2
    record env 2 0 "no CUDAExecutionProvider"
    exit 2
fi
if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "device_check: pytest is not installed for $PY: the GPU tests cannot run (carry a pytest wheel, see the device README)" \
        | tee -a "$OUT/log.txt" >&2
    record tests 3 0 "no pytest"
    exit 3
fi

tests=(tests/test_cuda.py)
[ "$DEVICE" = cuda ] && tests+=(tests/test_tensorrt.py -k "cuda or engine")   # -k spans both files
stage tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
if [ "$DEVICE" = cuda ]; then
    stage ar_fp16 60 "$PY" benchmarks/ar_decode.py --device cuda --precision fp16 --model "$MODEL" \
        --prompts "$PROMPTS" --new "$NEW" --repeats "$REPEATS" --out "$WORK/ar_fp16"
fi
stage sampling 40 "$PY" benchmarks/sampling.py --device "$DEVICE" --repeats 5 --out "$WORK/sampling"
stage strategies 75 "$PY" benchmarks/strategies.py --device "$DEVICE" --model "$MODEL" --prompts "$PROMPTS" \
    --new "$NEW" --configs 5,4,5 --jacobi 8 --k 3 --unfused-k --sample-k 3 --heuristic 8 --confidence \
    --repeats "$REPEATS" --out "$WORK/strategies"
mkdir -p "$WORK/tune"
stage tune 45 "$PY" -m dgopt tune specs/lookahead.yaml --set target.device="$DEVICE" --kinds lookahead ngram \
    --minutes 0.5 --new-tokens 32 -o "$WORK/tune/lookahead.tuned.yaml"
[ -f "$WORK/tune/lookahead.tuned.yaml" ] && cp "$WORK/tune/lookahead.tuned.yaml" "$OUT/tune.yaml"
stage ar_fp32 45 "$PY" benchmarks/ar_decode.py --device "$DEVICE" --model "$MODEL" \
    --prompts "$PROMPTS" --new "$NEW" --repeats "$REPEATS" --out "$WORK/ar_fp32"

echo "device_check: $(($(date +%s) - START))s of BUDGET_S=${BUDGET_S}s; results in $OUT" | tee -a "$OUT/log.txt"
rm -rf "$WORK"
exit $FAILED
