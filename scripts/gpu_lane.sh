#!/usr/bin/env bash
# The GPU lane, for the offline CUDA machine (ENVIRONMENT.md, "The GPU machine"): its image has
# torch with CUDA but lacks pydantic, captum, zennit...; their wheels are fetched beforehand, with
# network, by /work/shared/gpu/fetch_wheels.sh into the repository's git-ignored .whl/ folder.
#
#   bash scripts/gpu_lane.sh            # results under ${OUT:-results/gpu}
#
# 1. installs the wheels into /tmp/site (no index, no dependencies: the image has the rest);
# 2. the CUDA lane: the conformance suite on CUDA, each result compared with the CPU's
#    (pytest -m cuda; junit XML in $OUT/cuda-lane.xml), and the meta-device lane;
# 3. the CPU/CUDA table, method x sample: benchmarks/devices.py -> $OUT/devices.csv (markdown in devices.log);
# 4. the demo on the GPU (python3 -m esegeta demo --output $OUT/demo; its manifest records
#    each method's device and status);
# 5. the mixed-precision table on CUDA (benchmarks/precision.py --device cuda; PRECISION=0 skips it).
# Every step runs even if an earlier one failed; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the first failure
  local name=$1; shift
  echo "== $name: $*"
  "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "== $name: exit $rc"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

if ! ls .whl/*.whl > /dev/null 2>&1; then
  echo "no wheels in .whl/: run /work/shared/gpu/fetch_wheels.sh on a machine with network first" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))' || exit 2

step cuda-lane python3 -m pytest -q -p no:cacheprovider -m cuda tests/ --junitxml="$OUT/cuda-lane.xml"
step meta-lane python3 -m pytest -q -p no:cacheprovider tests/test_device.py --junitxml="$OUT/meta-lane.xml"
step devices python3 benchmarks/devices.py --csv "$OUT/devices.csv"
step demo python3 -m esegeta demo --output "$OUT/demo"
# 5. the mixed-precision table measured on CUDA (fp16 and bf16 against fp32, TF32 off); last, as the
#    longest step (PRECISION=0 skips it): compare with esegeta/amp_safety.json (CPU autocast).
if [ "${PRECISION:-1}" != 0 ]; then
  step precision python3 benchmarks/precision.py --device cuda --limit 30 --output "$OUT/amp_safety_cuda.json" \
    --markdown "$OUT/precision_cuda.md"
fi
echo "results in $OUT: cuda-lane.xml, meta-lane.xml, devices.csv, demo/manifest.json, amp_safety_cuda.json"
exit "$status"
