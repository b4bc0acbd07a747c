#!/usr/bin/env bash
# On a CUDA machine: run the CUDA tests, then the GPU benchmarks, and write their figures.
#
#   bash benchmarks/gpu.sh                 # figures into benchmarks/results/gpu-<date>/
#   OUT=/some/folder bash benchmarks/gpu.sh
#   PYTHON=/path/to/python bash benchmarks/gpu.sh   # an interpreter with reslab and torch
#
# Each step's output goes to its own file (and the terminal); summary.txt names the card,
# the driver and torch. Copy the tables into benchmarks/README.md, "GPU", with the card's
# name. Exit status: 2 when no CUDA device is visible, else the CUDA tests' status.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu.sh: no CUDA device visible to $PYTHON (or no torch); run this on a GPU machine" >&2
  exit 2
fi
out="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$out"
"$PYTHON" - > "$out/summary.txt" <<'PY'
import platform, torch
print("card:", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
print("python:", platform.python_version())
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$out/summary.txt" 2>/dev/null || true
cat "$out/summary.txt"

step() {  # step NAME COMMAND...: run, tee to NAME.txt, record the wall time
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  return "$rc"
}

step cuda-tests "$PYTHON" -m pytest -q -m cuda tests -p no:cacheprovider
tests_rc=$?
step technique-overhead "$PYTHON" benchmarks/technique_overhead.py --device cuda --batch 256 --rounds 11 --steps 10
step inference-speed "$PYTHON" benchmarks/inference_speed.py --device cuda --batch 1024 --channels-last --rounds 7 --iters 10
step train-speed "$PYTHON" benchmarks/train_speed.py --device cuda --train-subset 0 --rounds 2 --workers 8
# packed runs (reslab.engine.packed) against one run at a time, same card, same call; issue 19
# asks for at least 5x at 16 resnet56 runs and 10x at 32 resnet20 runs
step pack-speed "$PYTHON" benchmarks/pack_speed.py --device cuda --width 1 --rounds 3 --steps 3 \
  --configs resnet56:4:512,resnet56:16:512,resnet20:8:128,resnet20:32:128
# the default comparison on the GPU, one process, timed end to end
step quick-preset "$PYTHON" -m reslab compare --preset quick --device cuda --jobs 1 --out "$out/quick-preset" --quiet
# a grid of 16 resnet56 runs (one technique, 16 seeds: one pack) end to end, packed against one
# run at a time, the same card in the same call (compare --pack; issue 19)
grid16=(--models resnet56 --techniques baseline --seeds 16 --no-until-decided --width 1 --epochs 1
  --train-subset 8192 --batch-size 512 --device cuda --no-probe --quiet)
step grid16-alone "$PYTHON" -m reslab compare "${grid16[@]}" --pack 1 --out "$out/grid16-alone"
step grid16-packed "$PYTHON" -m reslab compare "${grid16[@]}" --pack 16 --out "$out/grid16-packed"
# the deep study at realistic length: resnet56, full width, all the training images, 5 epochs,
# 3 seeds, every article technique; its report is the project's evidence (docs/evidence/)
step deep-study "$PYTHON" -m reslab compare --models resnet56 --techniques scale,norm,fusion --seeds 3 \
  --no-until-decided --width 1 --epochs 5 --batch-size 512 --device cuda --pack auto --quiet --out "$out/deep-study"
mkdir -p "$out/evidence" && cp "$out/deep-study/"{report.md,decisions.json,summary.csv,grid.json} "$out/evidence/" 2>/dev/null
echo "figures in $out"
exit "$tests_rc"
