#!/usr/bin/env bash
# One device session's checks and benchmarks, as one script (the device tool lends 15 minutes,
# start-up included: ../.library/device/README.md). Nothing in it has run on CUDA yet.
#
# The device image has torch, triton, tokenizers, safetensors and transformers 5.17 but not the
# transformers >= 5.24 this project needs, nor PyAV; they travel as wheels. Here, once:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl "transformers>=5.24,<6" "av>=14"
#
# then `run` with carry [".whl"], timeout_s 540 and the command:
#
#   bash benchmarks/gpu_session.sh
#
# Every result lands under $OUT (tables and the logs); a step that fails does not stop the
# others. Cheapest and most telling first: the DiffFP kernel against its torch reference, then
# the engine at the real 2B architecture (random weights), then the standing-question cost.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? ; last line: $(tail -n 1 "$OUT/$name.log")"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
python3 -c "import torch, transformers, livelens.model.engine as e; \
print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"

cd benchmarks || exit 1
step kernel_tests 90 python3 -m pytest -q -m gpu ../tests/test_kernels_diffp.py
step diffp 60 python3 diffp.py --streams 32
step scale_2b 200 python3 scale.py --device cuda --arch 2b --streams 1,4,16,64 --seconds 20 \
  --ask-every 5
step alerts_2b 120 python3 scale.py --device cuda --arch 2b --streams 16 --seconds 20 \
  --alerts 0,1,4 --no-sequential --ask-every 5
step latency_2b 60 python3 latency.py --device cuda --arch 2b --frames 10,100,600
python3 -c "import torch; print(f'peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB')" \
  >>"$OUT/versions.txt" 2>&1
grep -h "=" "$OUT"/*.log | grep -E "^[a-z_]+=" | tee "$OUT/summary.txt"
